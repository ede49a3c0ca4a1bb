import { copyFile, link, mkdir, open, readdir, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { ClassicLevel } from 'classic-level';
import { pack, unpack } from 'msgpackr';
import { KvError, KvErrorCode, errnoOf, ioError } from '../common/errors.js';
import { readFully } from '../common/files.js';
import { BLOCK_HEAD, BLOCK_MAGIC, blockBytes, blockChecksum, writeBlock } from '../common/rows-file.js';
import { bytesOf, floatsFromBytes, keysFromBytes } from '../common/keys.js';
import { PutLog } from './put-log.js';
import type { WatcherNote } from '../common/watcher-note.js';

/**
 * A replica's disk, under --data: a classic-level (LevelDB) database for metadata and the put log,
 * and one append-only rows file per loaded version.
 *
 *   LevelDB
 *     t!<table>                                  -> msgpack TableMeta (versions, current)
 *     p!<seq:16 digits>, m!putseq                -> the put log (put-log.ts)
 *     w!<table>                                  -> msgpack WatcherNote (kvctl watch's last action)
 *     r!<table>!<version:16 digits>!<block:10>   -> rows of versions written before rows files
 *                                                   (read at restore, never written any more)
 *   rows/<table>@<version:16 digits>.rows        -> the version's load batches as blocks
 *     (common/rows-file.ts: magic, n, dim, crc32, keys, floats). A table name with capitals is
 *     written as in rowsFileName. A staged full load's file becomes this file (adoptRows).
 *   incoming/                                    -> staged files of loaders on this host (loadStage)
 *
 * Rows go to files, not to LevelDB: a load writes each byte once to a file (and syncs it at the seal),
 * where LevelDB wrote it to its log and again to a table, checksummed and copied on the way: 32 MB
 * of 1 MB blocks cost 360 ms of CPU in LevelDB and 46 ms as a file (bench/RESULTS.md). The seal syncs
 * the file and its directory, then records the file's length in the version's metadata; restore reads
 * that many bytes and checks every block's checksum and dim. A load cut short leaves a 'loading'
 * version whose file restore deletes. Releases before rows files cannot read these versions.
 */
export interface VersionMeta {
  version: number;
  dim: number;
  rows: number;
  /** 'retained': no longer served, kept on disk because a kept delta version is built on it. */
  state: 'loading' | 'sealed' | 'retained';
  loadId: string;
  blocks: number;
  /** Bytes of the version's rows file, set at the seal; absent for versions whose rows are in LevelDB. */
  rowsBytes?: number;
  /** A delta: the version it applies to (0 for a full version). */
  base: number;
  upserts: number;
  deletes: number;
  createdAtMs: number;
  /** A full version: when the training snapshot behind its dump was taken (absent: not declared). */
  snapshotAtMs?: number;
}

export interface TableMeta {
  name: string;
  current: number;
  versions: VersionMeta[];
  /** Real-time puts with a lower write order predate the current full version and are not applied. */
  putsFrom: number;
}


export type { WatcherNote };

const pad = (n: number, width: number): string => String(n).padStart(width, '0');
const versionPrefix = (table: string, version: number): string => `r!${table}!${pad(version, 16)}!`;

/**
 * `<table>@<version>.rows`. Table names are case-sensitive, and on a case-insensitive file system
 * `Emb` and `emb` would share a file: a name with capitals is written in lower case followed by `~`
 * and a hex mask of where its capitals were (`Emb` -> `emb~1`; four letters a digit, first letter in
 * the lowest bit). `~` is not allowed in table names, and the longest name stays under 190 bytes.
 */
function rowsFileName(table: string, version: number): string {
  let name = table;
  if (/[A-Z]/.test(table)) {
    let mask = '';
    for (let i = 0; i < table.length; i += 4) {
      let nibble = 0;
      for (let j = 0; j < 4 && i + j < table.length; j++) if (/[A-Z]/.test(table[i + j]!)) nibble |= 1 << j;
      mask += nibble.toString(16);
    }
    name = `${table.toLowerCase()}~${mask}`;
  }
  return `${name}@${pad(version, 16)}.rows`;
}

/** fsync of a directory, so that a file created or removed in it survives a machine crash. */
async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** A rows file being written: blocks are placed at increasing offsets as they come. */
interface RowsWriter {
  fh: FileHandle;
  end: number;
  writes: Set<Promise<void>>;
}

export class ShardStore {
  private readonly db: ClassicLevel<string, Uint8Array>;
  private readonly rowsDir: string;
  /**
   * Where a loader on this host may write a full load's rows for this replica (and the other
   * replicas of its group on this host) to read; emptied at every start, as no load outlives one.
   */
  readonly stageDir: string;
  private readonly writers = new Map<string, Promise<RowsWriter>>();
  /** The real-time put log, in the same database. */
  readonly putLog: PutLog;

  constructor(readonly dir: string) {
    // Vectors do not compress: Snappy would only spend CPU on them. Blocks are read once, at
    // restore, in order: a block cache would only hold memory.
    this.db = new ClassicLevel<string, Uint8Array>(dir, { keyEncoding: 'utf8', valueEncoding: 'view', compression: false, cacheSize: 1 << 20 });
    this.rowsDir = join(dir, 'rows');
    this.putLog = new PutLog(this.db);
    this.stageDir = resolve(dir, 'incoming');
  }

  async open(): Promise<void> {
    try {
      await this.db.open();
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause;
      if (cause?.code === 'LEVEL_LOCKED') {
        throw new KvError(KvErrorCode.DATA_DIR_LOCKED, `data directory ${this.dir} is in use by another process (is this replica already running?)`, { cause: err });
      }
      // classic-level says only "Database failed to open"; the reason is down its cause chain.
      if (errnoOf(err) !== undefined) throw ioError(err, `opening data directory ${this.dir}`, `: ${causeChain(err)}`);
      throw new KvError(KvErrorCode.INTERNAL, `cannot open data directory ${this.dir}: ${causeChain(err)}`, { cause: err });
    }
    if ((await mkdir(this.rowsDir, { recursive: true })) !== undefined) await syncDir(this.dir);
    await rm(this.stageDir, { recursive: true, force: true });
    await mkdir(this.stageDir, { recursive: true });
  }

  async close(): Promise<void> {
    const writers = [...this.writers.values()];
    this.writers.clear();
    await Promise.allSettled(writers.map(async (w) => (await w).fh.close()));
    await this.db.close();
  }

  async readTables(): Promise<TableMeta[]> {
    const out: TableMeta[] = [];
    for await (const [, value] of this.db.iterator({ gte: 't!', lt: 't"' })) {
      out.push(unpack(value) as TableMeta);
    }
    return out;
  }

  /** Writes a table's metadata; `sync` makes it durable against a machine crash, not just a process crash. */
  async putTable(meta: TableMeta, sync: boolean): Promise<void> {
    await this.db.put(`t!${meta.name}`, pack(meta), { sync });
  }

  async readWatcherNotes(): Promise<WatcherNote[]> {
    const out: WatcherNote[] = [];
    for await (const [, value] of this.db.iterator({ gte: 'w!', lt: 'w"' })) out.push(unpack(value) as WatcherNote);
    return out;
  }

  /** Not synced: a note lost to a machine crash is rewritten at the watcher's next action. */
  async putWatcherNote(note: WatcherNote): Promise<void> {
    await this.db.put(`w!${note.table}`, pack(note));
  }

  private rowsPath(table: string, version: number): string {
    return join(this.rowsDir, rowsFileName(table, version));
  }

  /**
   * Appends one block of rows to the version's rows file. Blocks may be written concurrently: each
   * gets its offset when called, so the file holds them in call order.
   */
  async appendBlock(table: string, version: number, keys: Uint32Array, values: Float32Array, n: number, dim: number): Promise<void> {
    const id = `${table}@${version}`;
    let opening = this.writers.get(id);
    if (opening === undefined) {
      // 'w': a file left by a crash of an earlier attempt at this version starts over.
      opening = open(this.rowsPath(table, version), 'w').then((fh) => ({ fh, end: 0, writes: new Set<Promise<void>>() }));
      this.writers.set(id, opening);
    }
    const w = await opening;
    const at = w.end;
    w.end += blockBytes(n, dim);
    const write = writeBlock(w.fh, this.rowsPath(table, version), at, bytesOf(keys.subarray(0, 2 * n)), bytesOf(values.subarray(0, n * dim)), n, dim);
    w.writes.add(write);
    try {
      await write;
    } finally {
      w.writes.delete(write);
    }
  }

  /**
   * Syncs and closes the version's rows file once every block is written; returns its length.
   * `blocks`: how many blocks the version was sent, so that a version with rows but no open file
   * (a seal tried again after a failed sync) is refused instead of sealed empty.
   */
  async sealRows(table: string, version: number, blocks: number): Promise<number> {
    const id = `${table}@${version}`;
    const opening = this.writers.get(id);
    if (opening === undefined && blocks > 0) {
      throw new KvError(KvErrorCode.INTERNAL, `the rows file of ${table} v${version} is no longer open for writing; load the version again`);
    }
    if (opening === undefined) {
      // A version without rows here (no key of the load fell in this group): an empty file, so
      // restore finds what the seal recorded.
      const fh = await open(this.rowsPath(table, version), 'w');
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
      await syncDir(this.rowsDir);
      return 0;
    }
    const w = await opening;
    this.writers.delete(id);
    try {
      await Promise.all(w.writes);
      await w.fh.sync();
    } finally {
      await w.fh.close();
    }
    // The file's directory entry, too: it was created by this load.
    await syncDir(this.rowsDir);
    return w.end;
  }

  /**
   * Deletes files in the stage directory that belong to no load in `active` (loaders write
   * `<loadId>-...`) and were last written over `minAgeMs` ago: what a loader that died left behind.
   * A younger file may still be linked by another replica sealing its load. Returns their names.
   */
  async cleanStage(active: Iterable<string>, minAgeMs: number): Promise<string[]> {
    const prefixes = [...active].map((id) => `${id}-`);
    const removed: string[] = [];
    let names: string[];
    try {
      names = await readdir(this.stageDir);
    } catch {
      return removed;
    }
    const before = Date.now() - minAgeMs;
    for (const name of names) {
      if (prefixes.some((p) => name.startsWith(p))) continue;
      const path = join(this.stageDir, name);
      const st = await stat(path).catch(() => undefined);
      if (st === undefined || st.mtimeMs > before) continue;
      await rm(path, { force: true, recursive: true });
      removed.push(name);
    }
    return removed;
  }

  /**
   * Makes a staged file (a loader's, of `bytes` bytes of checked blocks) the version's rows file: a
   * hard link, or a copy where the file system refuses one. Synced like sealRows; returns `bytes`.
   */
  async adoptRows(table: string, version: number, staged: string, bytes: number, read: { dev: number; ino: number }): Promise<number> {
    if (bytes === 0) return this.sealRows(table, version, 0);
    const path = this.rowsPath(table, version);
    await unlink(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
    let linked = true;
    try {
      await link(staged, path);
    } catch {
      linked = false;
      await copyFile(staged, path);
    }
    const fh = await open(path, 'r');
    try {
      const st = await fh.stat();
      if (st.size < bytes) throw new KvError(KvErrorCode.INTERNAL, `${path} holds ${st.size} bytes of the ${bytes} read from ${staged}`);
      // The name must still lead to the file that was read (a link) or have been copied from it.
      const source = linked ? st : await stat(staged);
      if (source.dev !== read.dev || source.ino !== read.ino) throw new KvError(KvErrorCode.INTERNAL, `${staged} was replaced while it was read`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await syncDir(this.rowsDir);
    return bytes;
  }

  /** The blocks of one version, in storage order. */
  async *readBlocks(table: string, vm: VersionMeta): AsyncGenerator<{ keys: Uint32Array; values: Float32Array; n: number; dim: number }> {
    if (vm.rowsBytes === undefined) {
      yield* this.readLegacyBlocks(table, vm.version);
      return;
    }
    const path = this.rowsPath(table, vm.version);
    if (vm.rowsBytes === 0) return;
    const fh = await open(path, 'r');
    try {
      const size = (await fh.stat()).size;
      if (size < vm.rowsBytes) throw new KvError(KvErrorCode.DATA_CORRUPT, `${path} holds ${size} bytes; the seal recorded ${vm.rowsBytes}`);
      // One buffer, reused: each block is consumed before the next is read.
      let buf = new ArrayBuffer(1 << 20);
      const head = new Uint32Array(BLOCK_HEAD / 4);
      for (let at = 0; at < vm.rowsBytes;) {
        if (at + BLOCK_HEAD > vm.rowsBytes) throw new KvError(KvErrorCode.DATA_CORRUPT, `${path}: truncated block header at byte ${at}`);
        await readExactly(fh, path, new Uint8Array(head.buffer), at);
        const n = head[1]!;
        const dim = head[2]!;
        const bodyBytes = n * 8 + n * dim * 4;
        // Rows have the version's dim; a delta's deletes have none.
        const dimOk = dim === vm.dim || (dim === 0 && vm.base !== 0);
        if (head[0] !== BLOCK_MAGIC || !dimOk || at + BLOCK_HEAD + bodyBytes > vm.rowsBytes) {
          throw new KvError(KvErrorCode.DATA_CORRUPT, `${path}: corrupt block at byte ${at} (${n} rows of dim ${dim}; the version has dim ${vm.dim})`);
        }
        if (buf.byteLength < bodyBytes) buf = new ArrayBuffer(bodyBytes);
        await readExactly(fh, path, new Uint8Array(buf, 0, bodyBytes), at + BLOCK_HEAD);
        const keys = new Uint8Array(buf, 0, n * 8);
        const floats = new Uint8Array(buf, n * 8, n * dim * 4);
        if (blockChecksum(head, [keys, floats]) !== head[3]) throw new KvError(KvErrorCode.DATA_CORRUPT, `${path}: checksum mismatch in the block at byte ${at}`);
        yield { keys: new Uint32Array(buf, 0, 2 * n), values: new Float32Array(buf, n * 8, n * dim), n, dim };
        at += BLOCK_HEAD + bodyBytes;
      }
    } finally {
      await fh.close();
    }
  }

  /** Blocks of a version written before rows files: one LevelDB entry per block. */
  private async *readLegacyBlocks(table: string, version: number): AsyncGenerator<{ keys: Uint32Array; values: Float32Array; n: number; dim: number }> {
    const prefix = versionPrefix(table, version);
    for await (const value of this.db.values({ gte: prefix, lt: `${prefix}~` })) {
      const head = keysFromBytes(value.subarray(0, 8));
      const n = head[0]!;
      const dim = head[1]!;
      if (value.byteLength !== 8 + n * 8 + n * dim * 4) {
        throw new KvError(KvErrorCode.DATA_CORRUPT, `corrupt block in ${this.dir} for ${table} v${version}: ${value.byteLength} bytes for ${n} rows of dim ${dim}`);
      }
      yield { keys: keysFromBytes(value.subarray(8, 8 + n * 8)), values: floatsFromBytes(value.subarray(8 + n * 8)), n, dim };
    }
  }

  /** Deletes a version's rows (its file, or its LevelDB blocks if it predates rows files). */
  async dropVersionRows(table: string, version: number): Promise<void> {
    const id = `${table}@${version}`;
    const opening = this.writers.get(id);
    if (opening !== undefined) {
      this.writers.delete(id);
      const w = await opening.catch(() => undefined);
      if (w !== undefined) {
        await Promise.allSettled(w.writes);
        await w.fh.close();
      }
    }
    await unlink(this.rowsPath(table, version)).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
    const prefix = versionPrefix(table, version);
    await this.db.clear({ gte: prefix, lt: `${prefix}~` });
  }

  /** Deletes rows files of versions the metadata does not list (a crash between the two); returns their names. */
  async dropUnlistedRows(listed: Iterable<{ table: string; version: number }>): Promise<string[]> {
    const keep = new Set<string>();
    for (const { table, version } of listed) keep.add(rowsFileName(table, version));
    const removed: string[] = [];
    for (const name of await readdir(this.rowsDir)) {
      if (keep.has(name) || !name.endsWith('.rows')) continue;
      await unlink(join(this.rowsDir, name));
      removed.push(name);
    }
    return removed;
  }
}

async function readExactly(fh: FileHandle, path: string, into: Uint8Array, position: number): Promise<void> {
  const got = await readFully(fh, into, position);
  if (got < into.byteLength) throw new KvError(KvErrorCode.DATA_CORRUPT, `${path}: unexpected end of file at byte ${position + got}`);
}

/** The messages of an error and its causes, joined: "Database failed to open: IO error: ...". */
function causeChain(err: unknown): string {
  const parts: string[] = [];
  for (let e = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) parts.push(e.message);
  return parts.join(': ');
}
