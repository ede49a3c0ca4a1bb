import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { basename, dirname, isAbsolute } from 'node:path';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { readFully } from '../common/files.js';
import { keyAt } from '../common/keys.js';
import { BLOCK_HEAD, BLOCK_MAGIC, blockBytes, blockChecksum } from '../common/rows-file.js';
import type { ShardCore } from './core.js';
import type { StagedFile, WriteVersion } from './tables.js';
import { MAX_LOAD_BATCH_ROWS, acceptingWrite, applyRows, letGoStage } from './write-version.js';

/**
 * Staged full loads. A loader on this host writes the group's rows to one file of rows-file blocks
 * and names byte ranges of it (loadRowsFrom) instead of sending the rows; at the seal the file
 * becomes this version's rows file (a hard link, or a copy on another file system).
 */

/** The most bytes of a staged file one LoadRowsFrom may name, and how many may be read at once. */
export const MAX_STAGED_READ_BYTES = 64 * 1024 * 1024;
const MAX_STAGED_READS = 16;
const EMPTY_KEYS = new Uint32Array(0);

/** LoadStage: the loader's staged file of the load's rows, and the probe that proves this replica sees it. */
export interface LoadStageRequest {
  table: string;
  version: number;
  loadId: string;
  path: string;
  probePath: string;
  token: Uint8Array;
}

/** LoadRowsFrom: bytes [at, at + bytes) of the load's staged file. */
export interface LoadRowsFromRequest {
  table: string;
  version: number;
  loadId: string;
  at: number;
  bytes: number;
}

/**
 * First the loader proves that this replica sees the file it wrote: `probePath` must hold `token`.
 * Answers whether this replica will read the load's rows from `path`, and if not, why.
 */
export async function loadStage(core: ShardCore, req: LoadStageRequest): Promise<{ readable: boolean; reason: string }> {
  const { table, version, loadId, path, probePath, token } = req;
  const w = acceptingWrite(core.tables, table, version, loadId);
  if (w.touched !== undefined) return { readable: false, reason: 'a delta takes its rows over gRPC' };
  if (w.ops > 0) return { readable: false, reason: 'rows of this load have arrived over gRPC already' };
  if (w.staged !== undefined && w.staged.ranges.length > 0) {
    throw new KvError(KvErrorCode.LOAD_CONFLICT, `load ${loadId} of ${table} v${version} is reading ${w.staged.path} already`);
  }
  // Only files a loader stages: <stage dir>/<loadId>-g<group>.rows and .probe, in a directory
  // named like a replica's stage directory. Not any path this process could read.
  const stem = new RegExp(`^${loadId.replace(/[^A-Za-z0-9]/g, (c) => `\\${c}`)}-g\\d{1,5}$`);
  const okName = (p: string, ext: string): boolean =>
    isAbsolute(p) && basename(dirname(p)) === 'incoming' && p.endsWith(ext) && stem.test(basename(p, ext));
  if (!okName(path, '.rows') || !okName(probePath, '.probe') || dirname(path) !== dirname(probePath)) {
    throw invalidArgument(`a staged file must be <stage dir>/${loadId}-g<group>.rows with its .probe beside it, in a directory named incoming`);
  }
  if (token.byteLength < 16 || token.byteLength > 64) throw invalidArgument('the probe token must hold 16 to 64 bytes');
  let fh: FileHandle | undefined;
  try {
    const probe = await openRegular(probePath);
    try {
      const seen = new Uint8Array(token.byteLength + 1);
      const got = await readFully(probe, seen, 0);
      if (got !== token.byteLength || !Buffer.from(token).equals(seen.subarray(0, got))) {
        return { readable: false, reason: `${probePath} holds something else here: another host's file system` };
      }
    } finally {
      await probe.close();
    }
    fh = await openRegular(path);
  } catch (err) {
    await fh?.close();
    return { readable: false, reason: (err as Error).message };
  }
  // The load may have been dropped, failed or staged again while the files were opened.
  if (core.tables.get(table)?.write !== w || w.failed !== undefined || w.sealing || (w.staged !== undefined && w.staged.ranges.length > 0)) {
    await fh.close();
    throw new KvError(KvErrorCode.LOAD_CONFLICT, `load ${loadId} of ${table} v${version} changed while its staged file was opened`);
  }
  const previous = w.staged;
  w.staged = { path, fh, ranges: [], scratch: [], reading: 0 };
  await previous?.fh.close();
  w.lastActivityMs = Date.now();
  core.log.info({ table, version, loadId, path }, 'load rows staged in a file');
  return { readable: true, reason: '' };
}

/**
 * Reads bytes [at, at + bytes) of the load's staged file: whole blocks, each checked (magic, dim,
 * checksum) and applied as a LoadRows batch would be. Ranges may come in any order, never twice.
 */
export async function loadRowsFrom(core: ShardCore, req: LoadRowsFromRequest): Promise<number> {
  const { table, version, loadId, at, bytes } = req;
  const w = acceptingWrite(core.tables, table, version, loadId);
  const st = w.staged;
  if (st === undefined) throw invalidArgument(`load ${loadId} of ${table} v${version} has no staged file (LoadStage first)`);
  if (!Number.isSafeInteger(at) || at < 0 || !Number.isSafeInteger(bytes) || bytes < BLOCK_HEAD || bytes > MAX_STAGED_READ_BYTES) {
    throw invalidArgument(`a staged range must start at a byte >= 0 and hold ${BLOCK_HEAD} to ${MAX_STAGED_READ_BYTES} bytes; got ${bytes} bytes at ${at}`);
  }
  for (const [a, b] of st.ranges) {
    if (at < a + b && a < at + bytes) throw invalidArgument(`bytes ${at}-${at + bytes} of ${st.path} overlap bytes ${a}-${a + b}, read already`);
  }
  if (st.reading >= MAX_STAGED_READS) {
    throw new KvError(KvErrorCode.RESOURCE_EXHAUSTED, `${MAX_STAGED_READS} ranges of ${st.path} are being read already; wait for their answers`);
  }
  st.ranges.push([at, bytes]);
  // The seal waits for ranges being read, as it does for rows being written.
  const read = readStaged(w, st, table, version, at, bytes);
  const tracked: Promise<void> = read.then(() => void w.pending.delete(tracked), () => void w.pending.delete(tracked));
  w.pending.add(tracked);
  await read;
  return w.ops;
}

/**
 * Reads a range block by block: its header, then its body into a reused buffer, so a range of
 * many blocks costs one call and memory for one block.
 */
async function readStaged(w: WriteVersion, st: StagedFile, table: string, version: number, at: number, bytes: number): Promise<void> {
  st.reading++;
  let buf = st.scratch.pop() ?? new ArrayBuffer(0);
  const dim = w.data.dim;
  try {
    for (let p = 0; p < bytes;) {
      const where = at + p;
      const badBlock = (): KvError => new KvError(KvErrorCode.INVALID_DATA, `${st.path}: no block of rows of dim ${dim} at byte ${where}`);
      if (p + BLOCK_HEAD > bytes) throw badBlock();
      const head = new Uint32Array(BLOCK_HEAD / 4);
      await readStagedBytes(st, new Uint8Array(head.buffer), where, at + bytes);
      const n = head[1]!;
      if (head[0] !== BLOCK_MAGIC || head[2] !== dim || n > MAX_LOAD_BATCH_ROWS || p + blockBytes(n, dim) > bytes) throw badBlock();
      const body = blockBytes(n, dim) - BLOCK_HEAD;
      if (buf.byteLength < body) buf = new ArrayBuffer(body);
      await readStagedBytes(st, new Uint8Array(buf, 0, body), where + BLOCK_HEAD, at + bytes);
      if (w.failed !== undefined) throw w.failed;
      if (blockChecksum(head, [new Uint8Array(buf, 0, n * 8), new Uint8Array(buf, n * 8, n * dim * 4)]) !== head[3]) {
        throw new KvError(KvErrorCode.INVALID_DATA, `${st.path}: checksum mismatch in the block at byte ${where}`);
      }
      const keys = new Uint32Array(buf, 0, 2 * n);
      try {
        applyRows(w, table, version, keys, new Float32Array(buf, n * 8, n * dim), EMPTY_KEYS);
      } catch (err) {
        // The loader tells a refused row by its block (a range holds many) and its key.
        const row = err instanceof KvError ? err.detail?.['row'] : undefined;
        if (typeof row === 'number' && row >= 0 && row < n) Object.assign((err as KvError).detail!, { block: where, key: String(keyAt(keys, row)) });
        throw err;
      }
      w.meta.blocks++;
      p += BLOCK_HEAD + body;
    }
  } catch (err) {
    // Blocks before the bad one are applied already: the load cannot go on.
    w.failed ??= err instanceof KvError ? err : new KvError(KvErrorCode.INTERNAL, `reading ${st.path} failed: ${(err as Error).message}`, { cause: err });
    throw err;
  } finally {
    st.reading--;
    if (st.scratch.length < MAX_STAGED_READS) st.scratch.push(buf);
  }
}

/** Fills `into` from byte `at` of a staged file; the loader named bytes up to `end`. */
async function readStagedBytes(st: StagedFile, into: Uint8Array, at: number, end: number): Promise<void> {
  const got = await readFully(st.fh, into, at);
  if (got < into.byteLength) throw new KvError(KvErrorCode.INVALID_DATA, `${st.path} ends at byte ${at + got}; the loader named bytes up to ${end}`);
}

/**
 * Removes staged files of loads no table here is taking, idle for the load idle time: a loader
 * that died leaves its files, and they would hold disk until this replica restarts.
 */
export async function cleanStage(core: ShardCore, starting?: string): Promise<void> {
  // A load idle for the idle time is stalled (any new load may take it over): its files go too.
  const now = Date.now();
  const active: string[] = [];
  for (const t of core.tables.values()) {
    const w = t.write;
    if (w === undefined) continue;
    if (now - w.lastActivityMs < core.loadIdleMs) {
      active.push(w.loadId);
    } else if (w.staged !== undefined && !w.sealing) {
      // A stalled load's handle on its staged file would keep the file's disk space after its
      // name is gone: the load is failed (a loader that comes back is told so) and the handle closed.
      w.failed ??= new KvError(KvErrorCode.ABORTED, `load ${w.loadId} of ${t.name} v${w.version} stalled for ${Math.round((now - w.lastActivityMs) / 1000)} s; its staged file was let go`);
      void letGoStage(w);
    }
  }
  if (starting !== undefined) active.push(starting);
  const removed = await core.store.cleanStage(active, core.loadIdleMs).catch(() => []);
  if (removed.length > 0) core.log.info({ removed }, 'staged files of finished or abandoned loads removed');
}

/** The length of a staged file whose ranges, read so far, cover it from byte 0 without a gap. */
export function stagedLength(st: StagedFile): number {
  const ranges = [...st.ranges].sort((a, b) => a[0] - b[0]);
  let end = 0;
  for (const [at, bytes] of ranges) {
    if (at !== end) throw new KvError(KvErrorCode.INVALID_DATA, `${st.path}: bytes ${end}-${at} were never read; the load is incomplete`);
    end = at + bytes;
  }
  return end;
}

/** Opens a file for reading only if it is a regular file (not a FIFO or device, not through a symlink). */
async function openRegular(path: string): Promise<FileHandle> {
  const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    if (!(await fh.stat()).isFile()) throw invalidArgument(`${path} is not a regular file`);
  } catch (err) {
    await fh.close();
    throw err;
  }
  return fh;
}
