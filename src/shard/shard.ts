import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { basename, dirname, isAbsolute } from 'node:path';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { readFully } from '../common/files.js';
import { firstNonFinite, keyAt } from '../common/keys.js';
import { MAX_DIM, MAX_PUT_KEYS, ORDER_SCALE, checkAnswerSize } from '../common/limits.js';
import { BLOCK_HEAD, BLOCK_MAGIC, blockBytes, blockChecksum } from '../common/rows-file.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { type AnswerBufferPool } from '../transport/answer-pool.js';
import { allocLookupResponse } from '../wire/lookup.js';
import { Overlay } from './overlay.js';
import { ShardStore, type PutRecord, type TableMeta, type VersionMeta } from './store.js';
import { KeySet, VersionData } from './version-data.js';

/** Bounds on what a replica accepts. */
export const MAX_LOOKUP_KEYS = 4_000_000;
/** The largest answer a replica builds (the message limit of the wire is 512 MiB). */
export const MAX_LOAD_BATCH_ROWS = 1 << 17;
/** Memory that real-time updates of one table may hold on a replica before puts are refused. */
export const DEFAULT_MAX_REALTIME_BYTES = 512 * 1024 * 1024;
/** A write version that receives nothing for this long may be replaced by another load. */
export const DEFAULT_LOAD_IDLE_MS = 60_000;
/** A catch-up answer carries about this much at most (the wire's message limit is 512 MiB). */
const MAX_PULL_BYTES = 64 * 1024 * 1024;
/** Disk writes of one load in flight before a batch waits for the oldest. */
const MAX_PENDING_WRITES = 8;
/** The most bytes of a staged file one LoadRowsFrom may name, and how many may be read at once. */
export const MAX_STAGED_READ_BYTES = 64 * 1024 * 1024;
const MAX_STAGED_READS = 16;
const EMPTY_KEYS = new Uint32Array(0);

/** A full load whose rows a loader on this host writes to a file for this replica to read. */
interface StagedFile {
  path: string;
  fh: FileHandle;
  /** [at, bytes] of every range read so far; at the seal they must tile the file from byte 0. */
  ranges: [number, number][];
  /** Read buffers, reused. */
  scratch: ArrayBuffer[];
  /** Ranges being read now. */
  reading: number;
}

interface Held {
  data: VersionData;
  meta: VersionMeta;
}

interface WriteVersion {
  version: number;
  loadId: string;
  data: VersionData;
  meta: VersionMeta;
  /** Keys a delta has touched, to refuse one repeated. */
  touched: KeySet | undefined;
  ops: number;
  lastActivityMs: number;
  failed: KvError | undefined;
  /** LoadSeal has begun: rows arriving now would not be in what it seals. */
  sealing: boolean;
  pending: Set<Promise<void>>;
  /** Set by loadStage: the rows come from the loader's staged file, which becomes the rows file. */
  staged: StagedFile | undefined;
}

interface TableState {
  name: string;
  current: number;
  /** Sealed, read-only versions that serve. */
  versions: Map<number, Held>;
  /** Versions no longer served but kept on disk as the base of a kept delta version. */
  retained: Map<number, VersionMeta>;
  write: WriteVersion | undefined;
  overlay: Overlay | undefined;
  putsFrom: number;
  realtimeBatches: number;
  lastPutOrder: number;
  realtimeLagMs: number;
}

export interface ShardOptions {
  keepVersions: number;
  loadIdleMs?: number;
  maxRealtimeBytes?: number;
  logger: Logger;
}

/** LoadBegin: opens the write version of a full load, or with `incremental` of a delta on the current version. */
export interface LoadBeginRequest {
  table: string;
  version: number;
  dim: number;
  loadId: string;
  /** Take over another load's write version, or load a version older than the current one. */
  force?: boolean;
  incremental?: boolean;
  /** The loader's count of the rows coming, to size the index (a hint only). */
  expectedRows?: number;
  /** The loader's clock when the load began; 0: this replica's. */
  startedAtMs?: number;
}

/** LoadRows: a batch of rows (and for a delta, deletes) into the write version. */
export interface LoadRowsRequest {
  table: string;
  version: number;
  loadId: string;
  keys: Uint32Array;
  values: Float32Array;
  deletes: Uint32Array;
}

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

/** LoadSeal: the load is complete once this replica holds `expectedOps` rows and deletes. */
export interface LoadSealRequest {
  table: string;
  version: number;
  loadId: string;
  expectedOps: number;
}

/** Put: a real-time batch for the table's current version. */
export interface PutRequest {
  table: string;
  keys: Uint32Array;
  values: Float32Array;
  /** The write order (ms since the epoch times ORDER_SCALE); the highest wins a key. */
  order: number;
  writer: string;
  /** For a batch caught up from a peer: how late it arrived. */
  lagMs?: number;
}

export interface VersionStatusInfo {
  version: number;
  dim: number;
  keys: number;
  state: 'loading' | 'sealed';
  bytes: number;
  baseVersion: number;
  deltaUpserts: number;
  deltaDeletes: number;
  createdAtMs: number;
}

export interface TableStatusInfo {
  name: string;
  currentVersion: number;
  versions: VersionStatusInfo[];
  realtimeKeys: number;
  realtimeBatches: number;
  lastPutAtMs: number;
  realtimeLagMs: number;
}

/**
 * The tables of one replica. Sealed versions are read-only and looked up without locks; the single
 * write version of a table takes a full load or a delta; real-time puts land in the table's overlay,
 * one batch per synchronous step. Metadata changes are serialised per table and persisted before
 * they are acknowledged.
 */
export class Shard {
  private readonly tables = new Map<string, TableState>();
  private readonly metaChains = new Map<string, Promise<unknown>>();
  private readonly keepVersions: number;
  private readonly loadIdleMs: number;
  private readonly maxRealtimeBytes: number;
  private readonly log: Logger;
  /** Put batches in the log, by `${order}:${writer}`, so a batch arriving twice is applied once. */
  private readonly putsSeen = new Set<string>();
  /** Seqs handed out whose log write has not finished. */
  private readonly putsWriting = new Set<number>();
  /** Batches being written, by id, so a second copy waits for the first. */
  private readonly putsInFlight = new Map<string, Promise<number>>();
  private putSeq = 0;

  constructor(private readonly store: ShardStore, options: ShardOptions) {
    this.keepVersions = options.keepVersions;
    this.loadIdleMs = options.loadIdleMs ?? DEFAULT_LOAD_IDLE_MS;
    this.maxRealtimeBytes = options.maxRealtimeBytes ?? DEFAULT_MAX_REALTIME_BYTES;
    this.log = options.logger;
  }

  /** The newest put log position. */
  get lastPutSeq(): number {
    return this.putSeq;
  }

  // ---- restore ------------------------------------------------------------------------------------

  /** Rebuilds every kept version from disk (deltas on their bases), then replays the put log. */
  async restore(): Promise<void> {
    const metas = await this.store.readTables();
    for (const meta of metas) {
      const t = this.newTable(meta.name);
      t.current = meta.current;
      t.putsFrom = meta.putsFrom ?? 0;
      const byVersion = new Map<number, VersionMeta>();
      for (const vm of meta.versions) {
        if (vm.state === 'loading') {
          this.log.warn({ table: meta.name, version: vm.version, rows: vm.rows }, 'discarding a load that did not complete before restart');
          await this.store.dropVersionRows(meta.name, vm.version);
          continue;
        }
        byVersion.set(vm.version, vm);
      }
      const built = new Map<number, VersionData>();
      const build = async (v: number): Promise<VersionData> => {
        const done = built.get(v);
        if (done) return done;
        const vm = byVersion.get(v);
        if (vm === undefined) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${meta.name}: version ${v} is needed but not on disk`);
        const started = Date.now();
        const data = vm.base ? (await build(vm.base)).derive() : new VersionData(vm.dim, vm.rows);
        await this.replayBlocks(meta.name, vm, data);
        data.seal();
        if (data.count !== vm.rows) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${meta.name} v${v}: ${data.count} keys rebuilt, ${vm.rows} recorded`);
        built.set(v, data);
        this.log.info({ table: meta.name, version: v, base: vm.base, rows: vm.rows, ms: Date.now() - started }, 'restored');
        return data;
      };
      for (const vm of byVersion.values()) {
        if (vm.state === 'retained') {
          t.retained.set(vm.version, vm);
          continue;
        }
        t.versions.set(vm.version, { data: await build(vm.version), meta: vm });
      }
      if (t.current !== 0 && !t.versions.has(t.current)) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${meta.name}: current version ${t.current} is not on disk`);
      if (byVersion.size !== meta.versions.length) await this.store.putTable(this.metaOf(t), true);
    }
    // Rows files of versions no table lists: a crash came between dropping a version and deleting its file.
    const listed = [...this.tables.values()].flatMap((t) => [...t.versions.keys(), ...t.retained.keys()].map((version) => ({ table: t.name, version })));
    const unlisted = await this.store.dropUnlistedRows(listed);
    if (unlisted.length > 0) this.log.warn({ files: unlisted }, 'deleted rows files of versions no longer listed');
    // Replay the put log over the restored versions.
    this.putSeq = await this.store.putSeqHighWater();
    for (let after = 0; ;) {
      const recs = await this.store.readPuts(after, Number.MAX_SAFE_INTEGER, 1024);
      if (recs.length === 0) break;
      for (const rec of recs) {
        this.putSeq = Math.max(this.putSeq, rec.seq);
        this.putsSeen.add(`${rec.order}:${rec.writer}`);
        const t = this.tables.get(rec.table);
        if (t !== undefined) this.applyPut(t, rec.keys, rec.values, rec.order);
        after = rec.seq;
      }
    }
  }

  private async replayBlocks(table: string, vm: VersionMeta, data: VersionData): Promise<void> {
    for await (const block of this.store.readBlocks(table, vm)) {
      if (block.dim === 0) data.delete(block.keys, block.n);
      else if (vm.base) data.upsert(block.keys, block.values, block.n);
      else {
        const dup = data.append(block.keys, block.values, block.n);
        if (dup >= 0) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${table} v${vm.version} on disk repeats key ${keyAt(block.keys, dup)}`);
      }
    }
  }

  private newTable(name: string, register = true): TableState {
    const t: TableState = {
      name, current: 0, versions: new Map(), retained: new Map(), write: undefined, overlay: undefined,
      putsFrom: 0, realtimeBatches: 0, lastPutOrder: 0, realtimeLagMs: 0,
    };
    if (register) this.tables.set(name, t);
    return t;
  }

  // ---- lookups ------------------------------------------------------------------------------------

  /** Answers a lookup as an encoded LookupResponse, filled in place. */
  lookup(table: string, version: number, keys: Uint32Array, pool?: AnswerBufferPool): Buffer {
    const n = keys.length / 2;
    if (n > MAX_LOOKUP_KEYS) throw invalidArgument(`a lookup holds ${n} keys; at most ${MAX_LOOKUP_KEYS} are accepted`);
    const t = this.tables.get(table);
    if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
    const want = version === 0 ? t.current : version;
    if (want === 0) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} has no published version`);
    const v = t.versions.get(want);
    if (v === undefined) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} version ${want} is not held by this replica`);
    checkAnswerSize(n, v.data.dim);
    const res = allocLookupResponse(v.meta.version, v.data.dim, n, pool);
    v.data.lookup(keys, n, res.values, res.found);
    if (t.overlay !== undefined && t.overlay.dim === v.data.dim) t.overlay.lookupOver(keys, n, res.values, res.found);
    return res.buf;
  }

  /** Where a loader on this host may stage a full load's rows for this replica (see loadStage). */
  get stageDir(): string {
    return this.store.stageDir;
  }

  // ---- loads --------------------------------------------------------------------------------------

  /** Opens the write version of a full load, or of a delta on top of the current version. */
  async loadBegin(req: LoadBeginRequest): Promise<{ current: number; base: number }> {
    const { table, version, dim, loadId, force = false, incremental = false, expectedRows = 0, startedAtMs = 0 } = req;
    checkTableName(table);
    checkVersion(version);
    if (!Number.isInteger(dim) || dim < 1 || dim > MAX_DIM) throw invalidArgument(`dim must be in [1, ${MAX_DIM}], got ${dim}`);
    if (typeof loadId !== 'string' || loadId.length === 0 || loadId.length > 128) throw invalidArgument('load_id must be a non-empty string');
    return this.withTable(table, async () => {
      // A new table is registered only once its first load has begun.
      const known = this.tables.get(table);
      const t = known ?? this.newTable(table, false);
      if (t.versions.has(version) || t.retained.has(version)) {
        throw new KvError(KvErrorCode.VERSION_EXISTS, `table ${table} version ${version} exists already`);
      }
      if (version < t.current && !force) {
        throw new KvError(KvErrorCode.VERSION_TOO_OLD, `table ${table} version ${version} is older than the current version ${t.current} (use force to load it anyway)`);
      }
      let base: Held | undefined;
      if (incremental) {
        base = t.versions.get(t.current);
        if (base === undefined) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} has no current version for a delta to apply to`);
        if (base.data.dim !== dim) {
          throw new KvError(KvErrorCode.DIM_MISMATCH, `the delta has dim ${dim}; table ${table} v${t.current} has dim ${base.data.dim}`);
        }
      }
      const w = t.write;
      if (w !== undefined) {
        const idle = Date.now() - w.lastActivityMs;
        if (w.loadId !== loadId && idle < this.loadIdleMs && !force) {
          throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table}: version ${w.version} is being loaded (load ${w.loadId}, active ${Math.round(idle / 1000)} s ago; force takes it over)`);
        }
        this.log.warn({ table, version: w.version, loadId: w.loadId, idleMs: idle }, 'replacing an unfinished load');
        await this.dropWrite(t);
      }
      // Rows left by a load of this version number that a crash cut short before they were dropped.
      await this.store.dropVersionRows(table, version);
      await this.cleanStage(loadId);
      const now = Date.now();
      // The loader's clock, one value for every replica, so all drop the same older puts at publish.
      const createdAtMs = Number.isSafeInteger(startedAtMs) && startedAtMs > 0 ? startedAtMs : now;
      const meta: VersionMeta = {
        version, dim, rows: 0, state: 'loading', loadId, blocks: 0, base: base?.meta.version ?? 0, upserts: 0, deletes: 0, createdAtMs,
      };
      if (known === undefined) this.tables.set(table, t);
      t.write = {
        // The index is sized from the loader's hint (bounded: a wrong hint must not exhaust memory).
        version, loadId, meta, data: base ? base.data.derive() : new VersionData(dim, Math.min(Math.max(0, expectedRows), 1 << 22)), touched: base ? new KeySet() : undefined,
        ops: 0, lastActivityMs: now, failed: undefined, sealing: false, pending: new Set(), staged: undefined,
      };
      await this.store.putTable(this.metaOf(t), false);
      this.log.info({ table, version, dim, loadId, base: meta.base }, incremental ? 'delta begun' : 'load begun');
      return { current: t.current, base: meta.base };
    });
  }

  /** A batch of rows (and for a delta, deletes) into the write version; persisted before the answer. */
  async loadRows(req: LoadRowsRequest): Promise<number> {
    const { table, version, loadId, keys, values, deletes } = req;
    const w = this.acceptingWrite(table, version, loadId);
    if (w.staged !== undefined) {
      // A staged file no range was read from is given up (another replica of the group did not see
      // it, so the loader sends the rows); once rows came from it, the load cannot mix the two.
      if (w.staged.ranges.length > 0) {
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `load ${loadId} of ${table} v${version} takes its rows from ${w.staged.path}; LoadRows is refused`);
      }
      // Closed without waiting: nothing may come between the checks above and applying the rows.
      void letGoStage(w);
    }
    const n = keys.length / 2;
    const nd = deletes.length / 2;
    const dim = w.data.dim;
    this.applyRows(w, table, version, keys, values, deletes);
    const writes: Promise<void>[] = [];
    if (n > 0) writes.push(this.store.appendBlock(table, version, keys, values, n, dim));
    if (nd > 0) writes.push(this.store.appendBlock(table, version, deletes, new Float32Array(0), nd, 0));
    w.meta.blocks += writes.length;
    // The batch is answered once it is in memory and its disk write is under way: the load is only
    // acknowledged by loadSeal, which waits for every write. A bounded number of writes in flight
    // keeps the loader from outrunning the disk.
    const write: Promise<void> = Promise.all(writes).then(
      () => void w.pending.delete(write),
      (err: unknown) => {
        w.pending.delete(write);
        w.failed ??= new KvError(KvErrorCode.INTERNAL, `writing to disk failed: ${(err as Error).message}`, { cause: err });
      },
    );
    w.pending.add(write);
    while (w.pending.size > MAX_PENDING_WRITES) await Promise.race(w.pending);
    if (w.failed !== undefined) throw w.failed;
    return w.ops;
  }

  /**
   * Staged full loads. A loader on this host writes the group's rows to one file of rows-file blocks
   * (`path`) and names byte ranges of it (loadRowsFrom) instead of sending the rows; at the seal the
   * file becomes this version's rows file (a hard link, or a copy on another file system). First the
   * loader proves that this replica sees the file it wrote: `probePath` must hold `token`. Answers
   * whether this replica will read the load's rows from `path`, and if not, why.
   */
  async loadStage(req: LoadStageRequest): Promise<{ readable: boolean; reason: string }> {
    const { table, version, loadId, path, probePath, token } = req;
    const w = this.acceptingWrite(table, version, loadId);
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
    if (this.tables.get(table)?.write !== w || w.failed !== undefined || w.sealing || (w.staged !== undefined && w.staged.ranges.length > 0)) {
      await fh.close();
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `load ${loadId} of ${table} v${version} changed while its staged file was opened`);
    }
    const previous = w.staged;
    w.staged = { path, fh, ranges: [], scratch: [], reading: 0 };
    await previous?.fh.close();
    w.lastActivityMs = Date.now();
    this.log.info({ table, version, loadId, path }, 'load rows staged in a file');
    return { readable: true, reason: '' };
  }

  /**
   * Reads bytes [at, at + bytes) of the load's staged file: whole blocks, each checked (magic, dim,
   * checksum) and applied as a LoadRows batch would be. Ranges may come in any order, never twice.
   */
  async loadRowsFrom(req: LoadRowsFromRequest): Promise<number> {
    const { table, version, loadId, at, bytes } = req;
    const w = this.acceptingWrite(table, version, loadId);
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
    const read = this.readStaged(w, st, table, version, at, bytes);
    const tracked: Promise<void> = read.then(() => void w.pending.delete(tracked), () => void w.pending.delete(tracked));
    w.pending.add(tracked);
    await read;
    return w.ops;
  }

  /**
   * Reads a range block by block: its header, then its body into a reused buffer, so a range of
   * many blocks costs one call and memory for one block.
   */
  private async readStaged(w: WriteVersion, st: StagedFile, table: string, version: number, at: number, bytes: number): Promise<void> {
    st.reading++;
    let buf = st.scratch.pop() ?? new ArrayBuffer(0);
    const dim = w.data.dim;
    try {
      for (let p = 0; p < bytes;) {
        const where = at + p;
        const badBlock = (): KvError => new KvError(KvErrorCode.INVALID_DATA, `${st.path}: no block of rows of dim ${dim} at byte ${where}`);
        if (p + BLOCK_HEAD > bytes) throw badBlock();
        const head = new Uint32Array(BLOCK_HEAD / 4);
        await this.readStagedBytes(st, new Uint8Array(head.buffer), where, at + bytes);
        const n = head[1]!;
        if (head[0] !== BLOCK_MAGIC || head[2] !== dim || n > MAX_LOAD_BATCH_ROWS || p + blockBytes(n, dim) > bytes) throw badBlock();
        const body = blockBytes(n, dim) - BLOCK_HEAD;
        if (buf.byteLength < body) buf = new ArrayBuffer(body);
        await this.readStagedBytes(st, new Uint8Array(buf, 0, body), where + BLOCK_HEAD, at + bytes);
        if (w.failed !== undefined) throw w.failed;
        if (blockChecksum(head, [new Uint8Array(buf, 0, n * 8), new Uint8Array(buf, n * 8, n * dim * 4)]) !== head[3]) {
          throw new KvError(KvErrorCode.INVALID_DATA, `${st.path}: checksum mismatch in the block at byte ${where}`);
        }
        const keys = new Uint32Array(buf, 0, 2 * n);
        try {
          this.applyRows(w, table, version, keys, new Float32Array(buf, n * 8, n * dim), EMPTY_KEYS);
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
  private async readStagedBytes(st: StagedFile, into: Uint8Array, at: number, end: number): Promise<void> {
    const got = await readFully(st.fh, into, at);
    if (got < into.byteLength) throw new KvError(KvErrorCode.INVALID_DATA, `${st.path} ends at byte ${at + got}; the loader named bytes up to ${end}`);
  }

  /**
   * Removes staged files of loads no table here is taking, idle for the load idle time: a loader
   * that died leaves its files, and they would hold disk until this replica restarts.
   */
  private async cleanStage(starting?: string): Promise<void> {
    // A load idle for the idle time is stalled (any new load may take it over): its files go too.
    const now = Date.now();
    const active: string[] = [];
    for (const t of this.tables.values()) {
      const w = t.write;
      if (w === undefined) continue;
      if (now - w.lastActivityMs < this.loadIdleMs) {
        active.push(w.loadId);
      } else if (w.staged !== undefined && !w.sealing) {
        // A stalled load's handle on its staged file would keep the file's disk space after its
        // name is gone: the load is failed (a loader that comes back is told so) and the handle closed.
        w.failed ??= new KvError(KvErrorCode.ABORTED, `load ${w.loadId} of ${t.name} v${w.version} stalled for ${Math.round((now - w.lastActivityMs) / 1000)} s; its staged file was let go`);
        void letGoStage(w);
      }
    }
    if (starting !== undefined) active.push(starting);
    const removed = await this.store.cleanStage(active, this.loadIdleMs).catch(() => []);
    if (removed.length > 0) this.log.info({ removed }, 'staged files of finished or abandoned loads removed');
  }

  /** The write version of a load that still takes rows. */
  private acceptingWrite(table: string, version: number, loadId: string): WriteVersion {
    const w = this.writeVersion(table, version, loadId);
    if (w.failed !== undefined) throw w.failed;
    if (w.sealing) throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is being sealed; no more rows are accepted for load ${loadId}`);
    return w;
  }

  /** Checks a batch and applies it to the write version's memory (not to disk). */
  private applyRows(w: WriteVersion, table: string, version: number, keys: Uint32Array, values: Float32Array, deletes: Uint32Array): void {
    const n = keys.length / 2;
    const nd = deletes.length / 2;
    const dim = w.data.dim;
    if (n + nd > MAX_LOAD_BATCH_ROWS) throw invalidArgument(`a load batch holds ${n + nd} rows; at most ${MAX_LOAD_BATCH_ROWS}`);
    if (values.length !== n * dim) {
      throw new KvError(KvErrorCode.DIM_MISMATCH, `batch of ${n} keys carries ${values.length} floats; table ${table} v${version} has dim ${dim}`);
    }
    if (nd > 0 && w.touched === undefined) throw invalidArgument('deletes are only accepted in a delta (incremental load)');
    const bad = firstNonFinite(values);
    if (bad >= 0) {
      const row = Math.floor(bad / dim);
      throw new KvError(KvErrorCode.INVALID_DATA, `batch row ${row} (key ${keyAt(keys, row)}) holds ${values[bad]}`, { detail: { row } });
    }
    w.lastActivityMs = Date.now();
    if (w.touched !== undefined) {
      // A delta: refuse a key it touches twice, before changing anything.
      const dupAt = (ks: Uint32Array, m: number, offset: number): void => {
        for (let i = 0; i < m; i++) {
          if (!w.touched!.add(ks[2 * i]!, ks[2 * i + 1]!)) {
            w.failed = new KvError(KvErrorCode.DUPLICATE_KEY, `key ${keyAt(ks, i)} is repeated within this delta`, { detail: { row: offset + i } });
            throw w.failed;
          }
        }
      };
      dupAt(keys, n, 0);
      dupAt(deletes, nd, n);
      w.data.upsert(keys, values, n);
      w.data.delete(deletes, nd);
      w.meta.upserts += n;
      w.meta.deletes += nd;
    } else {
      const dup = w.data.append(keys, values, n);
      if (dup >= 0) {
        // The version is now partly appended: the load cannot go on, the loader must abort it.
        w.failed = new KvError(KvErrorCode.DUPLICATE_KEY, `key ${keyAt(keys, dup)} is repeated within this load`, { detail: { row: dup } });
        throw w.failed;
      }
    }
    w.ops += n + nd;
  }

  /** Confirms the write version is complete, persists it and makes it a sealed (not yet current) version. */
  async loadSeal(req: LoadSealRequest): Promise<number> {
    const { table, version, loadId, expectedOps } = req;
    return this.withTable(table, async () => {
      const w = this.writeVersion(table, version, loadId);
      if (w.failed !== undefined) throw w.failed;
      // From here on rows are refused: the count below and the synced file are final.
      w.sealing = true;
      await Promise.all(w.pending);
      if (w.failed !== undefined) throw w.failed;
      if (w.ops !== expectedOps) {
        w.failed = new KvError(KvErrorCode.INVALID_DATA, `table ${table} v${version}: this replica received ${w.ops} rows, the loader sent ${expectedOps}`);
        throw w.failed;
      }
      const t = this.tables.get(table)!;
      // The rows file is synced before the metadata that declares the version sealed.
      try {
        if (w.staged !== undefined) {
          const st = w.staged;
          const length = stagedLength(st);
          w.staged = undefined;
          try {
            // Synced through the handle opened before the loader wrote: a write-back error that
            // happened since is reported to it, where a handle opened now would not see it.
            await st.fh.sync();
            w.meta.rowsBytes = await this.store.adoptRows(table, version, st.path, length, await st.fh.stat());
          } finally {
            await st.fh.close();
          }
        } else {
          w.meta.rowsBytes = await this.store.sealRows(table, version, w.meta.blocks);
        }
      } catch (err) {
        // The store's own KV_INTERNAL failures are wrapped like an error of the file system.
        if (err instanceof KvError && err.code !== KvErrorCode.INTERNAL) {
          w.failed = err;
          throw err;
        }
        // A failed sync is final (after an fsync error the kernel may report later ones as clean):
        // only an abort, or loading the version again, follows.
        w.failed = new KvError(KvErrorCode.INTERNAL, `syncing the rows of ${table} v${version} failed: ${(err as Error).message}`, { cause: err });
        throw w.failed;
      }
      w.data.seal();
      w.meta.rows = w.data.count;
      w.meta.state = 'sealed';
      t.versions.set(version, { data: w.data, meta: w.meta });
      t.write = undefined;
      await this.store.putTable(this.metaOf(t), true);
      this.log.info({ table, version, rows: w.data.count, base: w.meta.base, ms: Date.now() - w.meta.createdAtMs }, 'load sealed');
      return w.data.count;
    });
  }

  /**
   * Drops the write version of this load; or, when the loader gives up after this replica already
   * sealed it (another replica failed to), the sealed but never published version, so the same
   * version number can be loaded again.
   */
  async loadAbort(table: string, version: number, loadId: string): Promise<void> {
    return this.withTable(table, async () => {
      const t = this.tables.get(table);
      if (t === undefined) return;
      const w = t.write;
      if (w !== undefined && w.version === version && w.loadId === loadId) {
        await this.dropWrite(t);
        this.log.info({ table, version, loadId }, 'load aborted');
        return;
      }
      const sealed = t.versions.get(version);
      if (sealed === undefined || sealed.meta.loadId !== loadId || version === t.current) return;
      t.versions.delete(version);
      await this.store.putTable(this.metaOf(t), true);
      await this.store.dropVersionRows(table, version);
      this.log.info({ table, version, loadId }, 'sealed but unpublished version dropped: its load was aborted');
    });
  }

  private writeVersion(table: string, version: number, loadId: string): WriteVersion {
    const w = this.tables.get(table)?.write;
    if (w === undefined || w.version !== version || w.loadId !== loadId) {
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} has no load ${loadId} of version ${version} in progress (the replica may have restarted)`);
    }
    return w;
  }

  private async dropWrite(t: TableState): Promise<void> {
    const w = t.write;
    if (w === undefined) return;
    w.failed ??= new KvError(KvErrorCode.ABORTED, `load of ${t.name} v${w.version} was aborted`);
    t.write = undefined;
    await Promise.allSettled(w.pending);
    await letGoStage(w);
    await this.cleanStage();
    await this.store.putTable(this.metaOf(t), false);
    await this.store.dropVersionRows(t.name, w.version);
  }

  // ---- publish ------------------------------------------------------------------------------------

  /** Makes a sealed version current. Going back to an older version needs `rollback`. */
  async publish(table: string, version: number, rollback: boolean): Promise<number> {
    checkTableName(table);
    checkVersion(version);
    return this.withTable(table, async () => {
      const t = this.tables.get(table);
      if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
      const held = t.versions.get(version);
      if (held === undefined) {
        throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} version ${version} is not held complete by this replica`);
      }
      const previous = t.current;
      if (version < previous && !rollback) {
        throw new KvError(KvErrorCode.VERSION_TOO_OLD, `table ${table}: version ${version} is older than the current ${previous}; use rollback`);
      }
      if (!rollback && held.meta.base !== 0 && held.meta.base !== previous && version !== previous) {
        // A delta applies to the version it was built on; over anything newer it would revert data.
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table}: version ${version} is a delta on v${held.meta.base}, but v${previous} is current; load the delta again on v${previous}`);
      }
      if (version === previous) return previous;
      t.current = version;
      if (!rollback && held.meta.base === 0) {
        // A new full version holds everything written before its load began; puts since stay on top.
        t.putsFrom = held.meta.createdAtMs * ORDER_SCALE;
        t.overlay = t.overlay?.dim === held.data.dim ? t.overlay.since(t.putsFrom) : undefined;
      }
      const dropped = this.prune(t);
      await this.store.putTable(this.metaOf(t), true);
      for (const v of dropped) await this.store.dropVersionRows(table, v);
      if (!rollback && held.meta.base === 0) {
        // Puts older than the new full version are never applied again: the log forgets them.
        const gone = await this.store.prunePuts(table, t.putsFrom);
        for (const id of gone) this.putsSeen.delete(id);
        if (gone.length > 0) this.log.info({ table, batches: gone.length }, 'pruned real-time puts that the new version holds');
      }
      this.log.info({ table, version, previous, dropped }, rollback ? 'rolled back' : 'published');
      return previous;
    });
  }

  /**
   * Drops a sealed version that is not current: its memory and its rows file. Refused for the current
   * version, a version being loaded, and a version a kept delta (or the load under way) builds on.
   * Returns false when this replica does not hold the version.
   */
  async dropVersion(table: string, version: number): Promise<boolean> {
    checkTableName(table);
    checkVersion(version);
    return this.withTable(table, async () => {
      const t = this.tables.get(table);
      if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
      if (version === t.current) {
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is current; publish or roll back to another version before dropping it`);
      }
      if (t.write?.version === version) {
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is being loaded; a load that fails is dropped by itself, and kvctl load --force takes a stalled one over`);
      }
      const dependents = [...t.versions.values()].filter((v) => v.meta.base === version).map((v) => v.meta.version);
      if (t.write?.meta.base === version) dependents.push(t.write.version);
      if (dependents.length > 0 || t.retained.has(version)) {
        const on = dependents.length > 0 ? dependents.map((v) => `v${v}`).join(', ') : 'a kept delta';
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is the base of ${on}; drop ${dependents.length > 0 ? 'that' : 'it'} first`);
      }
      if (!t.versions.has(version)) return false;
      t.versions.delete(version);
      // Retained bases that only the dropped version needed go too.
      const alsoGone = this.prune(t);
      await this.store.putTable(this.metaOf(t), true);
      for (const v of [version, ...alsoGone]) await this.store.dropVersionRows(table, v);
      this.log.info({ table, version, alsoDropped: alsoGone }, 'version dropped');
      return true;
    });
  }

  /**
   * Keeps the current version, every sealed version newer than it, and the newest older ones up to
   * keepVersions. A version left out but still the base of a kept delta stays on disk as 'retained'.
   * Returns the versions whose rows can go.
   */
  private prune(t: TableState): number[] {
    const older = [...t.versions.keys()].filter((v) => v < t.current).sort((a, b) => b - a);
    for (const v of older.slice(Math.max(0, this.keepVersions - 1))) {
      const held = t.versions.get(v)!;
      t.versions.delete(v);
      t.retained.set(v, { ...held.meta, state: 'retained' });
    }
    // Retained versions that no kept version builds on any more are dropped.
    const needed = new Set<number>();
    const all = new Map<number, VersionMeta>([...t.retained, ...[...t.versions].map(([v, h]) => [v, h.meta] as const)]);
    const roots = [...t.versions.keys(), ...(t.write ? [t.write.meta.base] : [])];
    for (let v of roots) {
      while (v !== 0 && all.get(v)?.base) {
        v = all.get(v)!.base;
        needed.add(v);
      }
    }
    const dropped: number[] = [];
    for (const v of [...t.retained.keys()]) {
      if (!needed.has(v)) {
        t.retained.delete(v);
        dropped.push(v);
      }
    }
    return dropped;
  }

  // ---- real-time puts -----------------------------------------------------------------------------

  /**
   * A real-time batch for the table's current version: validated, appended to the put log with a
   * disk sync, then applied in one step. A batch already logged (same order and writer) is not
   * applied twice. `lagMs`: for a batch caught up from a peer, how late it arrived.
   */
  async put(req: PutRequest): Promise<number> {
    const { table, keys, values, order, writer, lagMs = 0 } = req;
    checkTableName(table);
    const t = this.tables.get(table);
    if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
    const cur = t.versions.get(t.current);
    if (cur === undefined) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} has no published version to update`);
    const n = keys.length / 2;
    const dim = cur.data.dim;
    if (n === 0) throw invalidArgument('a put needs at least one key');
    if (n > MAX_PUT_KEYS) throw invalidArgument(`a put batch holds ${n} keys; at most ${MAX_PUT_KEYS}`);
    if (values.length !== n * dim) throw invalidArgument(`${n} keys need ${n * dim} floats (dim ${dim} of ${table} v${t.current}), got ${values.length}`);
    if (!Number.isSafeInteger(order) || order <= 0) throw invalidArgument(`order must be a positive integer, got ${order}`);
    if (typeof writer !== 'string' || writer.length === 0 || writer.length > 128) throw invalidArgument('writer must be a non-empty string');
    const bad = firstNonFinite(values);
    if (bad >= 0) throw invalidArgument(`values[${bad}] (key ${keyAt(keys, Math.floor(bad / dim))}) is ${values[bad]}; vectors must be finite`);
    const id = `${order}:${writer}`;
    // The same batch again (a retry, or from a peer): answer when the first copy is on disk.
    const writing = this.putsInFlight.get(id);
    if (writing !== undefined) return writing;
    if (this.putsSeen.has(id)) return this.putSeq;
    // Written before the current full version's load began: that version holds newer data.
    if (order < t.putsFrom) return this.putSeq;
    if ((t.overlay?.bytesWith(n) ?? 0) > this.maxRealtimeBytes) {
      throw new KvError(KvErrorCode.RESOURCE_EXHAUSTED, `table ${table}: real-time updates hold ${t.overlay!.bytes} bytes, the limit is ${this.maxRealtimeBytes}; load a new version`);
    }
    this.putsSeen.add(id);
    const seq = ++this.putSeq;
    const rec: PutRecord = { seq, table, order, writer, keys, values };
    this.putsWriting.add(seq);
    const write = this.store.appendPut(rec).then(() => seq);
    this.putsInFlight.set(id, write);
    try {
      await write;
    } catch (err) {
      this.putsSeen.delete(id);
      throw new KvError(KvErrorCode.INTERNAL, `writing the put to disk failed: ${(err as Error).message}`, { cause: err });
    } finally {
      this.putsWriting.delete(seq);
      this.putsInFlight.delete(id);
    }
    // Re-read: a publish may have changed the current version while the log was written.
    this.applyPut(t, keys, values, order);
    if (lagMs > 0) t.realtimeLagMs = lagMs;
    return seq;
  }

  private applyPut(t: TableState, keys: Uint32Array, values: Float32Array, order: number): void {
    if (order < t.putsFrom) return;
    const cur = t.versions.get(t.current);
    if (cur === undefined) return;
    const dim = cur.data.dim;
    if (values.length !== (keys.length / 2) * dim) return; // written for another dim: superseded
    if (t.overlay === undefined || t.overlay.dim !== dim) t.overlay = new Overlay(dim);
    t.overlay.put(keys, values, keys.length / 2, order);
    t.realtimeBatches++;
    if (order > t.lastPutOrder) t.lastPutOrder = order;
  }

  /** Logged put batches after `after`, for a peer catching up. */
  async putsSince(after: number, limit: number): Promise<{ batches: PutRecord[]; last: number }> {
    // Only up to the durable watermark: a batch whose write is still under way may end below one
    // already on disk, and a peer that moved its cursor past it would never pull it.
    let durable = this.putSeq;
    for (const s of this.putsWriting) durable = Math.min(durable, s - 1);
    const batches = await this.store.readPuts(after, durable, Math.min(Math.max(limit, 1), 1024), MAX_PULL_BYTES);
    return { batches, last: durable };
  }

  /** Whether this replica has the batch (order, writer) on disk. */
  hasPut(order: number, writer: string): boolean {
    const id = `${order}:${writer}`;
    return this.putsSeen.has(id) && !this.putsInFlight.has(id);
  }

  // ---- status -------------------------------------------------------------------------------------

  status(): TableStatusInfo[] {
    const out: TableStatusInfo[] = [];
    const vs = (meta: VersionMeta, data: VersionData, state: 'loading' | 'sealed', keys: number): VersionStatusInfo => ({
      version: meta.version, dim: data.dim, keys, state, bytes: data.ownBytes, baseVersion: meta.base,
      deltaUpserts: meta.upserts, deltaDeletes: meta.deletes, createdAtMs: meta.createdAtMs,
    });
    for (const t of [...this.tables.values()].sort((a, b) => a.name.localeCompare(b.name))) {
      const versions = [...t.versions.values()].sort((a, b) => a.meta.version - b.meta.version).map((v) => vs(v.meta, v.data, 'sealed', v.data.count));
      if (t.write !== undefined) versions.push(vs(t.write.meta, t.write.data, 'loading', t.write.ops));
      out.push({
        name: t.name, currentVersion: t.current, versions,
        realtimeKeys: t.overlay?.count ?? 0, realtimeBatches: t.realtimeBatches,
        lastPutAtMs: Math.floor(t.lastPutOrder / ORDER_SCALE), realtimeLagMs: t.realtimeLagMs,
      });
    }
    return out;
  }

  private metaOf(t: TableState): TableMeta {
    const versions = [...t.versions.values()].map((v) => v.meta);
    versions.push(...t.retained.values());
    if (t.write !== undefined) versions.push(t.write.meta);
    return { name: t.name, current: t.current, versions, putsFrom: t.putsFrom };
  }

  /** Runs metadata changes of one table one at a time. */
  private withTable<T>(table: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.metaChains.get(table) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    this.metaChains.set(table, next.catch(() => undefined));
    return next;
  }
}

/** The length of a staged file whose ranges, read so far, cover it from byte 0 without a gap. */
function stagedLength(st: StagedFile): number {
  const ranges = [...st.ranges].sort((a, b) => a[0] - b[0]);
  let end = 0;
  for (const [at, bytes] of ranges) {
    if (at !== end) throw new KvError(KvErrorCode.INVALID_DATA, `${st.path}: bytes ${end}-${at} were never read; the load is incomplete`);
    end = at + bytes;
  }
  return end;
}

/** Drops a write version's staged file, if it has one, and closes the handle on it. */
async function letGoStage(w: WriteVersion): Promise<void> {
  const st = w.staged;
  w.staged = undefined;
  await st?.fh.close().catch(() => undefined);
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
