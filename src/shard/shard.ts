import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { checkAnswerSize } from '../common/limits.js';
import { checkTableName } from '../common/validate.js';
import { type AnswerBufferPool } from '../transport/answer-pool.js';
import { allocLookupResponse } from '../wire/lookup.js';
import type { ShardCore } from './core.js';
import { DEFAULT_LOAD_IDLE_MS, loadAbort, loadBegin, loadRows, loadSeal, type LoadBeginRequest, type LoadRowsRequest, type LoadSealRequest } from './load.js';
import { dropVersion, publish } from './publish.js';
import { DEFAULT_MAX_REALTIME_BYTES, RealtimePuts, type PutRequest } from './puts.js';
import { restore } from './restore.js';
import { loadRowsFrom, loadStage, type LoadRowsFromRequest, type LoadStageRequest } from './staged-load.js';
import { status, type TableStatusInfo } from './status.js';
import type { PutRecord } from './put-log.js';
import type { ShardStore, WatcherNote } from './store.js';
import type { TableState } from './tables.js';

export { DEFAULT_LOAD_IDLE_MS, type LoadBeginRequest, type LoadRowsRequest, type LoadSealRequest } from './load.js';
export { DEFAULT_MAX_REALTIME_BYTES, type PutRequest } from './puts.js';
export { MAX_STAGED_READ_BYTES, type LoadRowsFromRequest, type LoadStageRequest } from './staged-load.js';
export type { TableStatusInfo, VersionStatusInfo } from './status.js';
export { MAX_LOAD_BATCH_ROWS } from './write-version.js';
export type { WatcherNote } from './store.js';

/** Bounds of a watcher note's strings (a note is display text, never echoed whole when refused). */
export const MAX_WATCHER_NOTE_CHARS = 2000;

/** The most keys one lookup may hold on a replica. */
export const MAX_LOOKUP_KEYS = 4_000_000;

export interface ShardOptions {
  keepVersions: number;
  loadIdleMs?: number;
  maxRealtimeBytes?: number;
  logger: Logger;
}

/**
 * The tables of one replica. Sealed versions are read-only and looked up without locks; the single
 * write version of a table takes a full load or a delta; real-time puts land in the table's overlay,
 * one batch per synchronous step. Metadata changes are serialised per table and persisted before
 * they are acknowledged.
 *
 * This class holds the state and answers lookups; each request's work is in its own module:
 * restore.ts, load.ts, staged-load.ts, publish.ts, puts.ts, status.ts.
 */
export class Shard {
  private readonly tables = new Map<string, TableState>();
  private readonly core: ShardCore;
  private readonly notes = new Map<string, WatcherNote>();

  constructor(private readonly store: ShardStore, options: ShardOptions) {
    const metaChains = new Map<string, Promise<unknown>>();
    this.core = {
      store,
      log: options.logger,
      tables: this.tables,
      keepVersions: options.keepVersions,
      loadIdleMs: options.loadIdleMs ?? DEFAULT_LOAD_IDLE_MS,
      puts: new RealtimePuts(store.putLog, this.tables, options.maxRealtimeBytes ?? DEFAULT_MAX_REALTIME_BYTES),
      withTable<T>(table: string, fn: () => Promise<T>): Promise<T> {
        const prev = metaChains.get(table) ?? Promise.resolve();
        const next = prev.then(fn, fn);
        metaChains.set(table, next.catch(() => undefined));
        return next;
      },
    };
  }

  /** The newest put log position. */
  get lastPutSeq(): number {
    return this.core.puts.lastSeq;
  }

  /** Where a loader on this host may stage a full load's rows for this replica (see loadStage). */
  get stageDir(): string {
    return this.store.stageDir;
  }

  /** Rebuilds every kept version from disk (deltas on their bases), then replays the put log. */
  async restore(): Promise<void> {
    await restore(this.core);
    for (const n of await this.store.readWatcherNotes()) this.notes.set(n.table, n);
  }

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

  /** Opens the write version of a full load, or of a delta on top of the current version. */
  loadBegin(req: LoadBeginRequest): Promise<{ current: number; base: number }> {
    return loadBegin(this.core, req);
  }

  /** A batch of rows (and for a delta, deletes) into the write version; persisted before the answer. */
  loadRows(req: LoadRowsRequest): Promise<number> {
    return loadRows(this.core, req);
  }

  /** Offers the load's rows in a staged file (see staged-load.ts); answers whether this replica reads them there. */
  loadStage(req: LoadStageRequest): Promise<{ readable: boolean; reason: string }> {
    return loadStage(this.core, req);
  }

  /** Reads a range of the load's staged file into the write version. */
  loadRowsFrom(req: LoadRowsFromRequest): Promise<number> {
    return loadRowsFrom(this.core, req);
  }

  /** Confirms the write version is complete, persists it and makes it a sealed (not yet current) version. */
  loadSeal(req: LoadSealRequest): Promise<number> {
    return loadSeal(this.core, req);
  }

  /** Drops the load's write version, or the version it sealed here if never published. */
  loadAbort(table: string, version: number, loadId: string): Promise<void> {
    return loadAbort(this.core, table, version, loadId);
  }

  /** Makes a sealed version current. Going back to an older version needs `rollback`. */
  publish(table: string, version: number, rollback: boolean): Promise<number> {
    return publish(this.core, table, version, rollback);
  }

  /** Makes `version` current as the cluster source (etcd) says: a rollback when it is older than the current one. */
  follow(table: string, version: number): Promise<number> {
    const current = this.core.tables.get(table)?.current ?? 0;
    return publish(this.core, table, version, version < current);
  }

  /** Drops a sealed version that is not current; false when this replica does not hold it. */
  dropVersion(table: string, version: number): Promise<boolean> {
    return dropVersion(this.core, table, version);
  }

  /** A real-time batch for the table's current version: logged with a disk sync, then applied in one step. */
  put(req: PutRequest): Promise<number> {
    return this.core.puts.put(req);
  }

  /** Logged put batches after `after`, for a peer catching up. */
  putsSince(after: number, limit: number): Promise<{ batches: PutRecord[]; last: number }> {
    return this.core.puts.since(after, limit);
  }

  /** Whether this replica has the batch (order, writer) on disk. */
  hasPut(order: number, writer: string): boolean {
    return this.core.puts.has(order, writer);
  }

  status(): TableStatusInfo[] {
    return status(this.tables.values());
  }

  /** Replaces the table's watcher note (the table need not exist: a watcher may report before its first load). */
  async setWatcherNote(note: WatcherNote): Promise<void> {
    checkTableName(note.table);
    for (const k of ['watcher', 'source', 'action', 'error'] as const) {
      if (typeof note[k] !== 'string' || note[k].length > MAX_WATCHER_NOTE_CHARS) throw invalidArgument(`a watcher note's ${k} must be a string of at most ${MAX_WATCHER_NOTE_CHARS} characters`);
    }
    const n: WatcherNote = { table: note.table, watcher: note.watcher, source: note.source, atMs: note.atMs, action: note.action, error: note.error, errorAtMs: note.errorAtMs };
    this.notes.set(n.table, n);
    await this.store.putWatcherNote(n);
  }

  /** Every table's last watcher note, by table name. */
  watcherNotes(): WatcherNote[] {
    return [...this.notes.values()].sort((a, b) => a.table.localeCompare(b.table));
  }
}
