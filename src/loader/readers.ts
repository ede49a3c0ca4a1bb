/**
 * Streaming readers of a planned dump: rows in chunks of bounded size, values (NaN/Inf) and text syntax
 * checked as they are read.
 */
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { firstNonFinite } from '../common/keys.js';
import { MAX_LOAD_DIM, dataError } from './dump-files.js';
import { LOCAL_SOURCE, type DumpSource, type RandomAccessReader } from './dump-source.js';
import { readNpyHeader, type NpyHeader, type NpyRole } from './npy.js';
import { planDimDesc, type DumpPlan, type PartInfo } from './plan.js';
import { LINE_BLANK, LINE_ROW, TextLineParser, textLineBlocks } from './text.js';

export interface RowChunk {
  /** The file to name in messages about these rows: the keys file of a NumPy pair, or the text file. */
  file: string;
  /** 0-based row (npy) or 1-based line (text) of the chunk's first row, for messages. */
  firstRow: number;
  n: number;
  /** 2n words packed [lo0, hi0, lo1, hi1, ...]. */
  keys: Uint32Array;
  /** n*dim floats, row-major. */
  values: Float32Array;
  /** Text only: the 1-based line number of each row. */
  rowNumbers?: Int32Array;
}

export interface DeleteChunk {
  file: string;
  firstRow: number;
  n: number;
  keys: Uint32Array;
  rowNumbers?: Int32Array;
}

export type DumpItem = { type: 'rows'; chunk: RowChunk } | { type: 'deletes'; chunk: DeleteChunk };

export interface ReadDumpOptions {
  /** Most rows in one chunk (default DEFAULT_CHUNK_ROWS). */
  chunkRows?: number;
  signal?: AbortSignal;
  /**
   * NumPy rows are read into two buffer pairs used in turn, instead of fresh arrays per chunk: a
   * chunk's arrays are then valid only until the consumer asks for the next item. For consumers that
   * copy the rows out at once (the loader): fresh memory is what reading costs most on a VM.
   */
  reuseBuffers?: boolean;
}

/**
 * Rows read per chunk. The reader's buffers are fresh memory once per load, and fresh pages are
 * dear on some VMs: 16384 rows took 4.5k page faults off a 2M-key load against 65536 (same speed
 * otherwise, bench/RESULTS.md).
 */
export const DEFAULT_CHUNK_ROWS = 16384;
/** Chunks are also cut so their values stay under this many bytes, which bounds memory at large dims. */
export const MAX_CHUNK_BYTES = 64 * 1024 * 1024;
const MAX_CHUNK_ROWS = 1 << 24;

function abortError(signal: AbortSignal): KvError {
  return new KvError(KvErrorCode.ABORTED, 'load aborted', { cause: signal.reason });
}

/** One readDump's settings, as its part readers use them. */
interface ReadPass {
  plan: DumpPlan;
  /** Rows per chunk, also bounded by MAX_CHUNK_BYTES; text deletes are chunked the same. */
  rowsPerChunk: number;
  /** NumPy deletes per chunk: chunkRows, as they carry no values. */
  deletesPerChunk: number;
  signal: AbortSignal | undefined;
  /** NumPy rows go to two buffer pairs used in turn (ReadDumpOptions.reuseBuffers). */
  reuse: boolean;
  source: DumpSource;
}

/**
 * Streams the rows in bounded memory: chunks of at most `chunkRows` rows (default DEFAULT_CHUNK_ROWS, and fewer when a
 * chunk's values would pass MAX_CHUNK_BYTES), validating values (NaN/Inf) and text syntax as it goes.
 * Yields upserts as {type:'rows', chunk} and deletes as {type:'deletes', chunk}; a NumPy part yields its
 * deletes after its rows. Each chunk owns fresh arrays, so the consumer may keep them (unless
 * `reuseBuffers`). Stops early with a
 * KV_ABORTED KvError if `signal` aborts.
 */
export async function* readDump(plan: DumpPlan, options: ReadDumpOptions = {}): AsyncGenerator<DumpItem> {
  const chunkRows = options.chunkRows ?? DEFAULT_CHUNK_ROWS;
  if (!Number.isSafeInteger(chunkRows) || chunkRows < 1 || chunkRows > MAX_CHUNK_ROWS) {
    throw invalidArgument(`chunkRows must be an integer in [1, ${MAX_CHUNK_ROWS}], not ${String(chunkRows)}`);
  }
  const signal = options.signal;
  const rowsPerChunk = plan.dim > 0 ? Math.max(1, Math.min(chunkRows, Math.floor(MAX_CHUNK_BYTES / (plan.dim * 4)))) : chunkRows;
  const pass: ReadPass = { plan, rowsPerChunk, deletesPerChunk: chunkRows, signal, reuse: options.reuseBuffers ?? false, source: plan.source ?? LOCAL_SOURCE };
  for (const part of plan.parts) {
    if (signal?.aborted) throw abortError(signal);
    if (part.kind === 'text') {
      yield* readTextPart(part.textPath!, pass);
      continue;
    }
    if (part.keysPath !== undefined && part.valuesPath !== undefined) {
      yield* readNpyRows(part, pass);
    }
    if (part.deletesPath !== undefined) {
      yield* readNpyDeletes(part, pass);
    }
  }
}

/**
 * Reads exactly `len` bytes at `pos` into the start of `into`, or of a fresh ArrayBuffer (offset 0, so
 * any typed view is aligned).
 */
async function readExact(fh: RandomAccessReader, file: string, len: number, pos: number, into?: ArrayBuffer): Promise<ArrayBuffer> {
  const ab = into ?? new ArrayBuffer(len);
  const view = new Uint8Array(ab, 0, len);
  let got = 0;
  while (got < len) {
    const n = await fh.read(view, got, len - got, pos + got);
    if (n === 0) break;
    got += n;
  }
  if (got < len) {
    throw dataError(`${file}: truncated while reading (the file shrank after it was checked)`);
  }
  return ab;
}

async function reopenChecked(source: DumpSource, path: string, role: NpyRole, planned: { rows: number; dim: number }): Promise<NpyHeader> {
  const { rows, dim } = planned;
  const h = await readNpyHeader(path, role, source);
  if (h.shape[0] !== rows || (role === 'values' && h.shape[1] !== dim)) {
    throw dataError(`${path}: changed since the load was planned (shape now (${h.shape.join(', ')}))`);
  }
  return h;
}

async function* readNpyRows(part: PartInfo, pass: ReadPass): AsyncGenerator<DumpItem> {
  const { rowsPerChunk: chunkRows, signal, reuse } = pass;
  const dim = pass.plan.dim;
  const keysPath = part.keysPath!;
  const valuesPath = part.valuesPath!;
  const rows = part.rows;
  const source = pass.source;
  const kh = await reopenChecked(source, keysPath, 'keys', { rows, dim });
  const vh = await reopenChecked(source, valuesPath, 'values', { rows, dim });
  const kf = await source.open(keysPath);
  let vf: RandomAccessReader | undefined;
  let pending: Promise<DumpItem> | undefined;
  try {
    vf = await source.open(valuesPath);
    const valuesFile = vf;
    const rowBytes = dim * 4;
    // With reuse: chunk k is read into pair k % 2. Pair k % 2 is refilled for chunk k + 2, which is
    // read only once the consumer has asked for the item after chunk k.
    const pairs = reuse ? [0, 1].map(() => ({ keys: new ArrayBuffer(chunkRows * 8), values: new ArrayBuffer(chunkRows * rowBytes) })) : [];
    let chunkNo = 0;
    const readChunk = async (first: number): Promise<DumpItem> => {
      const n = Math.min(chunkRows, rows - first);
      const pair = pairs[chunkNo++ % 2];
      // `<i8` keys are taken as the same 64 bits (two's complement), so -1 is key 2^64-1: no conversion needed.
      const [kab, vab] = await Promise.all([
        readExact(kf, keysPath, n * 8, kh.dataOffset + first * 8, pair?.keys),
        readExact(valuesFile, valuesPath, n * rowBytes, vh.dataOffset + first * rowBytes, pair?.values),
      ]);
      const values = new Float32Array(vab, 0, n * dim);
      const i = firstNonFinite(values);
      if (i >= 0) {
        const v = values[i]!;
        const what = Number.isNaN(v) ? 'NaN' : v > 0 ? 'Inf' : '-Inf';
        throw dataError(`${valuesPath}: row ${first + Math.floor(i / dim)} column ${i % dim} is ${what}`);
      }
      return { type: 'rows', chunk: { file: keysPath, firstRow: first, n, keys: new Uint32Array(kab, 0, 2 * n), values } };
    };
    // Read one chunk ahead so disk reads overlap the consumer's work on the chunk just yielded.
    let first = 0;
    if (rows > 0) pending = readChunk(0);
    while (pending !== undefined) {
      const item = await pending;
      pending = undefined;
      first += item.chunk.n;
      if (first < rows) {
        pending = readChunk(first);
        pending.catch(() => undefined); // awaited next turn, or dropped if the consumer stops
      }
      if (signal?.aborted) throw abortError(signal);
      yield item;
    }
  } finally {
    if (pending !== undefined) await pending.catch(() => undefined);
    await kf.close();
    await vf?.close();
  }
}

async function* readNpyDeletes(part: PartInfo, pass: ReadPass): AsyncGenerator<DumpItem> {
  const { deletesPerChunk: chunkRows, signal } = pass;
  const path = part.deletesPath!;
  const h = await reopenChecked(pass.source, path, 'deletes', { rows: part.deletes, dim: 0 });
  const fh = await pass.source.open(path);
  try {
    for (let first = 0; first < part.deletes; first += chunkRows) {
      if (signal?.aborted) throw abortError(signal);
      const n = Math.min(chunkRows, part.deletes - first);
      const ab = await readExact(fh, path, n * 8, h.dataOffset + first * 8);
      if (signal?.aborted) throw abortError(signal);
      yield { type: 'deletes', chunk: { file: path, firstRow: first, n, keys: new Uint32Array(ab) } };
    }
  } finally {
    await fh.close();
  }
}

/** A full chunk keeps its arrays; a short one (end of file) is copied so it does not pin a chunk-sized buffer. */
function fit<T extends Uint32Array | Int32Array | Float32Array>(a: T, len: number): T {
  return (len === a.length ? a : a.slice(0, len)) as T;
}

/** Text rows accumulate in fresh arrays; upserts and deletes go to separate chunks, each in file order. */
async function* readTextPart(path: string, pass: ReadPass): AsyncGenerator<DumpItem> {
  const { plan, rowsPerChunk: chunkRows, signal } = pass;
  const dim = plan.dim;
  const parser = new TextLineParser({ file: path, mode: plan.mode, dim, dimSource: planDimDesc.get(plan) ?? 'the dim of the load' });
  // dim 0 means planning found no upsert line anywhere; parse into a scratch row so such a line is refused.
  const noRows = dim === 0 ? new Float32Array(MAX_LOAD_DIM) : null;
  let rowKeys: Uint32Array | undefined;
  let rowValues: Float32Array | undefined;
  let rowLines: Int32Array | undefined;
  let nRows = 0;
  let delKeys: Uint32Array | undefined;
  let delLines: Int32Array | undefined;
  let nDel = 0;
  const ready: DumpItem[] = [];

  const flushRows = (): void => {
    if (nRows === 0) return;
    const n = nRows;
    ready.push({
      type: 'rows',
      chunk: {
        file: path,
        firstRow: rowLines![0]!,
        n,
        keys: fit(rowKeys!, 2 * n),
        values: fit(rowValues!, n * dim),
        rowNumbers: fit(rowLines!, n),
      },
    });
    rowKeys = rowValues = rowLines = undefined;
    nRows = 0;
  };
  const flushDeletes = (): void => {
    if (nDel === 0) return;
    const n = nDel;
    ready.push({ type: 'deletes', chunk: { file: path, firstRow: delLines![0]!, n, keys: fit(delKeys!, 2 * n), rowNumbers: fit(delLines!, n) } });
    delKeys = delLines = undefined;
    nDel = 0;
  };

  for await (const { lines, firstLine } of textLineBlocks(path, pass.source)) {
    if (signal?.aborted) throw abortError(signal);
    for (let i = 0; i < lines.length; i++) {
      const lineNo = firstLine + i;
      if (noRows === null && rowValues === undefined) {
        rowKeys = new Uint32Array(2 * chunkRows);
        rowValues = new Float32Array(chunkRows * dim);
        rowLines = new Int32Array(chunkRows);
      }
      const kind = parser.parse(lines[i]!, lineNo, noRows ?? rowValues!, noRows === null ? nRows * dim : 0);
      if (kind === LINE_BLANK) continue;
      if (kind === LINE_ROW) {
        if (noRows !== null) throw dataError(`${path}: line ${lineNo}: has values, but the file held none when the load was planned (it changed)`);
        rowKeys![2 * nRows] = parser.lo;
        rowKeys![2 * nRows + 1] = parser.hi;
        rowLines![nRows] = lineNo;
        nRows++;
        if (nRows === chunkRows) flushRows();
        continue;
      }
      if (delKeys === undefined) {
        delKeys = new Uint32Array(2 * chunkRows);
        delLines = new Int32Array(chunkRows);
      }
      delKeys[2 * nDel] = parser.lo;
      delKeys[2 * nDel + 1] = parser.hi;
      delLines![nDel] = lineNo;
      nDel++;
      if (nDel === chunkRows) flushDeletes();
    }
    for (let j = 0; j < ready.length; j++) {
      if (signal?.aborted) throw abortError(signal);
      yield ready[j]!;
    }
    ready.length = 0;
  }
  flushRows();
  flushDeletes();
  for (const item of ready) {
    if (signal?.aborted) throw abortError(signal);
    yield item;
  }
}
