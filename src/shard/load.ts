import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { MAX_DIM } from '../common/limits.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import type { ShardCore } from './core.js';
import { cleanStage, stagedLength } from './staged-load.js';
import type { VersionMeta } from './store.js';
import { metaOf, newTableState, type Held, type TableState } from './tables.js';
import { KeySet } from './slots.js';
import { VersionData } from './version-data.js';
import { acceptingWrite, applyRows, letGoStage, writeVersion } from './write-version.js';

/**
 * The load protocol: LoadBegin opens a table's one write version (a full load, or a delta on the
 * current version), LoadRows fills it, LoadSeal persists it as a sealed (not yet current) version,
 * LoadAbort drops it. Staged loads (rows read from a file) are in staged-load.ts.
 */

/** A write version that receives nothing for this long may be replaced by another load. */
export const DEFAULT_LOAD_IDLE_MS = 60_000;
/** Disk writes of one load in flight before a batch waits for the oldest. */
const MAX_PENDING_WRITES = 8;

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
  /** A full load: when the training snapshot behind the dump was taken (ms since the epoch); 0: not declared. */
  snapshotAtMs?: number;
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

/** LoadSeal: the load is complete once this replica holds `expectedOps` rows and deletes. */
export interface LoadSealRequest {
  table: string;
  version: number;
  loadId: string;
  expectedOps: number;
}

export async function loadBegin(core: ShardCore, req: LoadBeginRequest): Promise<{ current: number; base: number }> {
  const { table, version, dim, loadId, force = false, incremental = false, expectedRows = 0, startedAtMs = 0, snapshotAtMs = 0 } = req;
  checkTableName(table);
  checkVersion(version);
  if (!Number.isInteger(dim) || dim < 1 || dim > MAX_DIM) throw invalidArgument(`dim must be in [1, ${MAX_DIM}], got ${dim}`);
  if (typeof loadId !== 'string' || loadId.length === 0 || loadId.length > 128) throw invalidArgument('load_id must be a non-empty string');
  if (!Number.isSafeInteger(snapshotAtMs) || snapshotAtMs < 0) throw invalidArgument(`snapshot_at_ms must be a non-negative integer, got ${snapshotAtMs}`);
  // A delta carries no snapshot: it leaves the puts over the version it applies to as they are.
  if (incremental && snapshotAtMs > 0) throw invalidArgument('a snapshot time applies to a full load only, not to a delta');
  return core.withTable(table, async () => {
    // A new table is registered only once its first load has begun.
    const known = core.tables.get(table);
    const t = known ?? newTableState(table);
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
      if (w.loadId !== loadId && idle < core.loadIdleMs && !force) {
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table}: version ${w.version} is being loaded (load ${w.loadId}, active ${Math.round(idle / 1000)} s ago; force takes it over)`);
      }
      core.log.warn({ table, version: w.version, loadId: w.loadId, idleMs: idle }, 'replacing an unfinished load');
      await dropWrite(core, t);
    }
    // Rows left by a load of this version number that a crash cut short before they were dropped.
    await core.store.dropVersionRows(table, version);
    await cleanStage(core, loadId);
    const now = Date.now();
    // The loader's clock, one value for every replica, so all drop the same older puts at publish.
    const createdAtMs = Number.isSafeInteger(startedAtMs) && startedAtMs > 0 ? startedAtMs : now;
    const meta: VersionMeta = {
      version, dim, rows: 0, state: 'loading', loadId, blocks: 0, base: base?.meta.version ?? 0, upserts: 0, deletes: 0, createdAtMs,
      ...(snapshotAtMs > 0 ? { snapshotAtMs } : {}),
    };
    if (known === undefined) core.tables.set(table, t);
    t.write = {
      // The index is sized from the loader's hint (bounded: a wrong hint must not exhaust memory).
      version, loadId, meta, data: base ? base.data.derive() : new VersionData(dim, Math.min(Math.max(0, expectedRows), 1 << 22)), touched: base ? new KeySet() : undefined,
      ops: 0, lastActivityMs: now, failed: undefined, sealing: false, pending: new Set(), staged: undefined,
    };
    await core.store.putTable(metaOf(t), false);
    core.log.info({ table, version, dim, loadId, base: meta.base, ...(snapshotAtMs > 0 ? { snapshotAtMs } : {}) }, incremental ? 'delta begun' : 'load begun');
    return { current: t.current, base: meta.base };
  });
}

/** A batch of rows (and for a delta, deletes) into the write version; persisted before the answer. */
export async function loadRows(core: ShardCore, req: LoadRowsRequest): Promise<number> {
  const { table, version, loadId, keys, values, deletes } = req;
  const w = acceptingWrite(core.tables, table, version, loadId);
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
  applyRows(w, table, version, keys, values, deletes);
  const writes: Promise<void>[] = [];
  if (n > 0) writes.push(core.store.appendBlock(table, version, keys, values, n, dim));
  if (nd > 0) writes.push(core.store.appendBlock(table, version, deletes, new Float32Array(0), nd, 0));
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

/** Confirms the write version is complete, persists it and makes it a sealed (not yet current) version. */
export async function loadSeal(core: ShardCore, req: LoadSealRequest): Promise<number> {
  const { table, version, loadId, expectedOps } = req;
  return core.withTable(table, async () => {
    const w = writeVersion(core.tables, table, version, loadId);
    if (w.failed !== undefined) throw w.failed;
    // From here on rows are refused: the count below and the synced file are final.
    w.sealing = true;
    await Promise.all(w.pending);
    if (w.failed !== undefined) throw w.failed;
    if (w.ops !== expectedOps) {
      w.failed = new KvError(KvErrorCode.INVALID_DATA, `table ${table} v${version}: this replica received ${w.ops} rows, the loader sent ${expectedOps}`);
      throw w.failed;
    }
    const t = core.tables.get(table)!;
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
          w.meta.rowsBytes = await core.store.adoptRows(table, version, st.path, length, await st.fh.stat());
        } finally {
          await st.fh.close();
        }
      } else {
        w.meta.rowsBytes = await core.store.sealRows(table, version, w.meta.blocks);
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
    await core.store.putTable(metaOf(t), true);
    core.log.info({ table, version, rows: w.data.count, base: w.meta.base, ms: Date.now() - w.meta.createdAtMs }, 'load sealed');
    return w.data.count;
  });
}

/**
 * Drops the write version of this load; or, when the loader gives up after this replica already
 * sealed it (another replica failed to), the sealed but never published version, so the same
 * version number can be loaded again.
 */
export async function loadAbort(core: ShardCore, table: string, version: number, loadId: string): Promise<void> {
  return core.withTable(table, async () => {
    const t = core.tables.get(table);
    if (t === undefined) return;
    const w = t.write;
    if (w !== undefined && w.version === version && w.loadId === loadId) {
      await dropWrite(core, t);
      core.log.info({ table, version, loadId }, 'load aborted');
      return;
    }
    const sealed = t.versions.get(version);
    if (sealed === undefined || sealed.meta.loadId !== loadId || version === t.current) return;
    t.versions.delete(version);
    await core.store.putTable(metaOf(t), true);
    await core.store.dropVersionRows(table, version);
    core.log.info({ table, version, loadId }, 'sealed but unpublished version dropped: its load was aborted');
  });
}

async function dropWrite(core: ShardCore, t: TableState): Promise<void> {
  const w = t.write;
  if (w === undefined) return;
  w.failed ??= new KvError(KvErrorCode.ABORTED, `load of ${t.name} v${w.version} was aborted`);
  t.write = undefined;
  await Promise.allSettled(w.pending);
  await letGoStage(w);
  await cleanStage(core);
  await core.store.putTable(metaOf(t), false);
  await core.store.dropVersionRows(t.name, w.version);
}
