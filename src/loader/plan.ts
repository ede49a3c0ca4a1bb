/**
 * Dump planning: lists the parts of a PATH (a file, a NumPy pair, a directory of parts) and checks every
 * header, file size and dim before a single row is sent.
 */
import { invalidArgument } from '../common/errors.js';
import { MAX_LOAD_DIM, dataError, fmt, type LoadMode } from './dump-files.js';
import { DUMP_METADATA_FILE } from './dump-meta.js';
import { LOCAL_SOURCE, SUCCESS_MARKER, isHadoopMarker, isS3Url, type DumpEntry, type DumpSource } from './dump-source.js';
import { readNpyHeader, type NpyRole } from './npy.js';
import { textPartDim } from './text.js';

export interface PartInfo {
  kind: 'npy' | 'text';
  /** NAME for a NumPy pair, the file name for a text part. */
  name: string;
  keysPath?: string;
  valuesPath?: string;
  deletesPath?: string;
  textPath?: string;
  /** Upsert rows, -1 if unknown (text). */
  rows: number;
  /** Deletes, -1 if unknown (text). */
  deletes: number;
}

export interface DumpPlan {
  path: string;
  /** Where the parts are read from (local files unless the plan says otherwise). */
  source?: DumpSource;
  mode: LoadMode;
  /** The dim of every upsert row; 0 only for an incremental load that holds deletes alone (and no expectedDim). */
  dim: number;
  parts: PartInfo[];
  /** Sum of known upsert rows, -1 if any part is text. */
  totalRows: number;
  /** The dump directory's metadata file (dump-meta.ts), when it has one. */
  metadataPath?: string;
}

const NPY_SUFFIX: Record<string, NpyRole> = { '.keys.npy': 'keys', '.values.npy': 'values', '.deletes.npy': 'deletes' };

function npyRoleOf(name: string): { prefix: string; role: NpyRole } | undefined {
  for (const suffix of Object.keys(NPY_SUFFIX)) {
    if (name.endsWith(suffix) && name.length > suffix.length) return { prefix: name.slice(0, -suffix.length), role: NPY_SUFFIX[suffix]! };
  }
  return undefined;
}

/** Where each plan's dim came from, for messages about rows read later. */
export const planDimDesc = new WeakMap<DumpPlan, string>();

interface NpyGroup {
  name: string;
  keysPath?: string;
  valuesPath?: string;
  deletesPath?: string;
}

export interface PlanDumpOptions {
  /** The dim every upsert row must have; by default the dump's own (all parts must agree). */
  expectedDim?: number;
  /** Where expectedDim comes from, for messages (default 'the expected dim'). */
  expectedDimWhat?: string;
  /** Where the dump is: local files by default; an s3:// path needs an S3 source (parseDumpSource). */
  source?: DumpSource;
  /**
   * A dump that follows the Hadoop/Spark convention (any S3 prefix; a local directory holding a marker
   * such as _SUCCESS, _temporary, _started_*) is read only once it holds _SUCCESS (default true).
   */
  requireSuccessMarker?: boolean;
  /** How messages name the way to skip that check (default 'requireSuccessMarker: false'). */
  successMarkerWhat?: string;
}

/**
 * Refuses an incomplete dump: a directory following the Hadoop/Spark convention without _SUCCESS.
 * `entries`: the directory's listing when it is at hand (S3 directories always follow the convention).
 */
async function checkSuccessMarker(source: DumpSource, dir: string, entries: DumpEntry[] | undefined, options: PlanDumpOptions): Promise<void> {
  if (options.requireSuccessMarker === false) return;
  const follows = source.kind === 's3' || (entries ?? []).some((e) => isHadoopMarker(e.name));
  if (!follows) return;
  const marker = source.join(dir, SUCCESS_MARKER);
  const present = entries !== undefined ? entries.some((e) => e.name === SUCCESS_MARKER && e.type === 'file') : (await source.stat(marker))?.type === 'file';
  if (!present) {
    throw dataError(
      `${marker} is missing: the dump is not complete (its writer has not finished, or failed); ` +
        `load it once the marker is written, or pass ${options.successMarkerWhat ?? 'requireSuccessMarker: false'} to load it as it is`,
    );
  }
}

/**
 * Lists the parts and validates every header, size and dim before a single row is sent. For text parts,
 * reads the first data line to learn dim. `expectedDim` (optional) must match.
 */
export async function planDump(path: string, mode: LoadMode, options: PlanDumpOptions = {}): Promise<DumpPlan> {
  const { expectedDim, expectedDimWhat = 'the expected dim' } = options;
  if (typeof path !== 'string' || path.length === 0) throw invalidArgument('path must be a non-empty string');
  const source = options.source ?? LOCAL_SOURCE;
  if (source.kind === 'local' && isS3Url(path)) throw invalidArgument(`${path}: an s3:// location is read through an S3 source (parseDumpSource)`);
  if (mode !== 'full' && mode !== 'incremental') throw invalidArgument(`mode must be 'full' or 'incremental', not ${String(mode)}`);
  if (expectedDim !== undefined && (!Number.isSafeInteger(expectedDim) || expectedDim < 1 || expectedDim > MAX_LOAD_DIM)) {
    throw invalidArgument(`expectedDim must be an integer in [1, ${MAX_LOAD_DIM}], not ${String(expectedDim)}`);
  }

  const groups: (NpyGroup | { text: string; name: string })[] = [];
  let metadataPath: string | undefined;
  const st = await source.stat(path);
  if (st?.type === 'dir') {
    const entries = await source.list(path);
    const meta = entries.find((e) => e.name === DUMP_METADATA_FILE);
    if (meta !== undefined) {
      metadataPath = source.join(path, meta.name);
      if (meta.type !== 'file') throw dataError(`${metadataPath} is ${meta.type === 'dir' ? 'a directory' : meta.what ?? 'not a regular file'}, not a regular file`);
    }
    // Hidden files and markers such as _SUCCESS are not data.
    const data = entries.filter((e) => !e.name.startsWith('.') && !e.name.startsWith('_'));
    const subdirs = data.filter((e) => e.type === 'dir');
    if (subdirs.length > 0) {
      // Say so before a missing marker: a prefix holding full/7/ and full/8/ is one level too high.
      const first = source.join(path, subdirs[0]!.name);
      throw dataError(
        `${first}: subdirectories are not read; a dump directory holds the part files of one version only` +
          `${subdirs.length > 1 ? ` (this one holds ${subdirs.slice(0, 3).map((e) => `${e.name}/`).join(', ')}${subdirs.length > 3 ? ', ...' : ''})` : ''}` +
          `: name one version's directory, such as ${source.join(first, '')}`,
      );
    }
    await checkSuccessMarker(source, path, entries, options);
    const byPrefix = new Map<string, NpyGroup>();
    for (const e of data) {
      const name = e.name;
      const full = source.join(path, name);
      if (e.type === 'other') throw dataError(`${full} is ${e.what ?? 'not a regular file'}, not a regular file`);
      const npy = npyRoleOf(name);
      if (npy !== undefined) {
        let g = byPrefix.get(npy.prefix);
        if (g === undefined) {
          g = { name: npy.prefix };
          byPrefix.set(npy.prefix, g);
          groups.push(g);
        }
        g[`${npy.role}Path`] = full;
      } else if (name.endsWith('.txt') || name.endsWith('.tsv')) {
        groups.push({ text: full, name });
      } else {
        throw dataError(
          `${full}: unexpected file in a dump directory; parts are NAME.keys.npy + NAME.values.npy` +
            `${mode === 'incremental' ? ' (+ NAME.deletes.npy)' : ''}, *.txt or *.tsv (names starting with '.' or '_' are ignored)`,
        );
      }
    }
    if (groups.length === 0) throw dataError(`${path}: the directory holds no data parts`);
  } else {
    const base = source.basename(path);
    if (st?.type === 'file' && npyRoleOf(base) !== undefined) {
      const { prefix } = npyRoleOf(base)!;
      groups.push(await npyGroupAt(source, source.join(source.dirname(path), prefix), prefix));
    } else if (st?.type === 'file' && path.endsWith('.npy')) {
      throw dataError(`${path}: a NumPy part must be named NAME.keys.npy, NAME.values.npy or NAME.deletes.npy`);
    } else if (st?.type === 'file') {
      groups.push({ text: path, name: base });
    } else if (st !== undefined) {
      throw dataError(`${path} is ${st.what ?? 'not a regular file'}, not a regular file or directory`);
    } else if ((await source.stat(`${path}.keys.npy`)) !== undefined || (await source.stat(`${path}.deletes.npy`)) !== undefined) {
      groups.push(await npyGroupAt(source, path, base));
    } else {
      throw invalidArgument(`${path}: no such file or directory (nor ${path}.keys.npy)`);
    }
    // A single object is complete when its prefix is; local files named one by one are taken as they are.
    if (source.kind === 's3') await checkSuccessMarker(source, source.dirname(path), undefined, options);
  }

  let dim = expectedDim ?? 0;
  // Where the dim came from, for messages: "the expected dim", "the dim of data/a.values.npy".
  let dimDesc = expectedDim !== undefined ? expectedDimWhat : '';
  const parts: PartInfo[] = [];
  let totalRows = 0;
  for (const g of groups) {
    if ('text' in g) {
      const d = await textPartDim({ file: g.text, mode, dim, dimSource: dimDesc }, source);
      if (d > 0 && dim === 0) {
        dim = d;
        dimDesc = `the dim of the first data line of ${g.text}`;
      }
      parts.push({ kind: 'text', name: g.name, textPath: g.text, rows: -1, deletes: -1 });
      totalRows = -1;
      continue;
    }
    if (g.deletesPath !== undefined && mode !== 'incremental') {
      throw dataError(`${g.deletesPath}: deletes are only allowed in an incremental load`);
    }
    if (g.keysPath !== undefined && g.valuesPath === undefined) {
      throw dataError(`${g.keysPath}: keys file without its values file ${g.name}.values.npy`);
    }
    if (g.valuesPath !== undefined && g.keysPath === undefined) {
      throw dataError(`${g.valuesPath}: values file without its keys file ${g.name}.keys.npy`);
    }
    const part: PartInfo = { kind: 'npy', name: g.name, rows: 0, deletes: 0 };
    if (g.keysPath !== undefined && g.valuesPath !== undefined) {
      const kh = await readNpyHeader(g.keysPath, 'keys', source);
      const vh = await readNpyHeader(g.valuesPath, 'values', source);
      if (kh.shape[0] !== vh.shape[0]) {
        throw dataError(`${g.valuesPath}: holds ${fmt(vh.shape[0]!)} rows but ${g.keysPath} holds ${fmt(kh.shape[0]!)} keys`);
      }
      const d = vh.shape[1]!;
      if (dim === 0) {
        dim = d;
        dimDesc = `the dim of ${g.valuesPath}`;
      } else if (d !== dim) {
        throw dataError(`${g.valuesPath}: dim ${d} differs from ${dim} (${dimDesc})`);
      }
      part.keysPath = g.keysPath;
      part.valuesPath = g.valuesPath;
      part.rows = kh.shape[0]!;
      if (totalRows >= 0) totalRows += part.rows;
    }
    if (g.deletesPath !== undefined) {
      const dh = await readNpyHeader(g.deletesPath, 'deletes', source);
      part.deletesPath = g.deletesPath;
      part.deletes = dh.shape[0]!;
    }
    parts.push(part);
  }
  if (mode === 'full' && dim === 0) {
    throw dataError(`${path}: no part holds a data row, so the dim is unknown`);
  }
  const plan: DumpPlan = { path, source, mode, dim, parts, totalRows, ...(metadataPath !== undefined ? { metadataPath } : {}) };
  planDimDesc.set(plan, dimDesc);
  return plan;
}

async function npyGroupAt(source: DumpSource, prefixPath: string, name: string): Promise<NpyGroup> {
  const g: NpyGroup = { name };
  for (const [suffix, role] of Object.entries(NPY_SUFFIX)) {
    const p = prefixPath + suffix;
    const s = await source.stat(p);
    if (s === undefined) continue;
    if (s.type !== 'file') throw dataError(s.type === 'dir' ? `${p} is a directory, not a regular file` : `${p} is ${s.what ?? 'not a regular file'}, not a regular file`);
    g[`${role}Path`] = p;
  }
  return g;
}
