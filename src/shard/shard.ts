import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { firstNonFinite, keyAt } from '../common/keys.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { allocLookupResponse } from '../common/wire.js';
import { ShardStore, type TableMeta, type VersionMeta } from './store.js';
import { VersionData } from './version-data.js';

/** Bounds on what a replica accepts. */
export const MAX_DIM = 16384;
export const MAX_LOOKUP_KEYS = 4_000_000;
export const MAX_LOAD_BATCH_ROWS = 1 << 17;
/** A write version that receives nothing for this long may be replaced by another load. */
export const DEFAULT_LOAD_IDLE_MS = 60_000;
interface WriteVersion {
  version: number;
  loadId: string;
  data: VersionData;
  meta: VersionMeta;
  lastActivityMs: number;
  startedMs: number;
  failed: KvError | undefined;
  pending: Set<Promise<void>>;
}

interface TableState {
  name: string;
  current: number;
  /** Sealed, read-only versions. */
  versions: Map<number, { data: VersionData; meta: VersionMeta }>;
  write: WriteVersion | undefined;
}

export interface ShardOptions {
  keepVersions: number;
  loadIdleMs?: number;
  logger: Logger;
}

export interface VersionStatusInfo {
  version: number;
  dim: number;
  keys: number;
  state: 'loading' | 'sealed';
  bytes: number;
}

export interface TableStatusInfo {
  name: string;
  currentVersion: number;
  versions: VersionStatusInfo[];
}

/**
 * The tables of one replica. Sealed versions are read-only and looked up without locks; the single
 * write version of a table takes loads. Metadata changes are serialised per table and persisted
 * before they are acknowledged.
 */
export class Shard {
  private readonly tables = new Map<string, TableState>();
  private readonly metaChains = new Map<string, Promise<unknown>>();
  private readonly keepVersions: number;
  private readonly loadIdleMs: number;
  private readonly log: Logger;

  constructor(private readonly store: ShardStore, options: ShardOptions) {
    this.keepVersions = options.keepVersions;
    this.loadIdleMs = options.loadIdleMs ?? DEFAULT_LOAD_IDLE_MS;
    this.log = options.logger;
  }

  /** Rebuilds every sealed version from disk; loads cut short by a crash are discarded. */
  async restore(): Promise<void> {
    const metas = await this.store.readTables();
    for (const meta of metas) {
      const t: TableState = { name: meta.name, current: meta.current, versions: new Map(), write: undefined };
      const kept: VersionMeta[] = [];
      for (const vm of meta.versions) {
        if (vm.state !== 'sealed') {
          this.log.warn({ table: meta.name, version: vm.version, rows: vm.rows }, 'discarding a load that did not complete before restart');
          await this.store.dropVersionRows(meta.name, vm.version);
          continue;
        }
        const started = Date.now();
        const data = new VersionData(vm.dim, vm.rows);
        for await (const block of this.store.readBlocks(meta.name, vm.version)) {
          const dup = data.append(block.keys, block.values, block.n);
          if (dup >= 0) throw new Error(`table ${meta.name} v${vm.version} on disk repeats key ${keyAt(block.keys, dup)}`);
        }
        if (data.count !== vm.rows) {
          throw new Error(`table ${meta.name} v${vm.version}: ${data.count} rows on disk, ${vm.rows} recorded`);
        }
        data.seal();
        t.versions.set(vm.version, { data, meta: vm });
        kept.push(vm);
        this.log.info({ table: meta.name, version: vm.version, rows: vm.rows, ms: Date.now() - started }, 'restored');
      }
      if (kept.length !== meta.versions.length) await this.store.putTable({ ...meta, versions: kept }, true);
      if (t.current !== 0 && !t.versions.has(t.current)) {
        throw new Error(`table ${meta.name}: current version ${t.current} is not on disk`);
      }
      this.tables.set(meta.name, t);
    }
  }

  // ---- lookups ------------------------------------------------------------------------------------

  /** Answers a lookup as an encoded LookupResponse, filled in place. */
  lookup(table: string, version: number, keys: Uint32Array): Buffer {
    const n = keys.length / 2;
    if (n > MAX_LOOKUP_KEYS) throw invalidArgument(`a lookup holds ${n} keys; at most ${MAX_LOOKUP_KEYS} are accepted`);
    const v = this.readable(table, version);
    const res = allocLookupResponse(v.meta.version, v.data.dim, n);
    v.data.lookup(keys, n, res.values, res.found);
    return res.buf;
  }

  private readable(table: string, version: number): { data: VersionData; meta: VersionMeta } {
    const t = this.tables.get(table);
    if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
    const want = version === 0 ? t.current : version;
    if (want === 0) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} has no published version`);
    const v = t.versions.get(want);
    if (v === undefined) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} version ${want} is not held by this replica`);
    return v;
  }

  // ---- loads --------------------------------------------------------------------------------------

  async loadBegin(table: string, version: number, dim: number, loadId: string, force: boolean): Promise<number> {
    checkTableName(table);
    checkVersion(version);
    if (!Number.isInteger(dim) || dim < 1 || dim > MAX_DIM) throw invalidArgument(`dim must be in [1, ${MAX_DIM}], got ${dim}`);
    if (typeof loadId !== 'string' || loadId.length === 0 || loadId.length > 128) throw invalidArgument('load_id must be a non-empty string');
    return this.withTable(table, async () => {
      let t = this.tables.get(table);
      if (t === undefined) {
        t = { name: table, current: 0, versions: new Map(), write: undefined };
        this.tables.set(table, t);
      }
      if (t.versions.has(version)) {
        throw new KvError(KvErrorCode.VERSION_EXISTS, `table ${table} version ${version} exists already`);
      }
      if (version < t.current && !force) {
        throw new KvError(KvErrorCode.VERSION_TOO_OLD, `table ${table} version ${version} is older than the current version ${t.current} (use force to load it anyway)`);
      }
      const w = t.write;
      if (w !== undefined) {
        const idle = Date.now() - w.lastActivityMs;
        if (w.loadId !== loadId && idle < this.loadIdleMs) {
          throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table}: version ${w.version} is being loaded (load ${w.loadId}, active ${Math.round(idle / 1000)} s ago)`);
        }
        this.log.warn({ table, version: w.version, loadId: w.loadId, idleMs: idle }, 'replacing an unfinished load');
        await this.dropWrite(t);
      }
      const meta: VersionMeta = { version, dim, rows: 0, state: 'loading', loadId, blocks: 0 };
      t.write = {
        version, loadId, meta, data: new VersionData(dim), lastActivityMs: Date.now(), startedMs: Date.now(),
        failed: undefined, pending: new Set(),
      };
      await this.store.putTable(this.metaOf(t), false);
      this.log.info({ table, version, dim, loadId }, 'load begun');
      return t.current;
    });
  }

  async loadRows(table: string, version: number, loadId: string, keys: Uint32Array, values: Float32Array): Promise<number> {
    const w = this.writeVersion(table, version, loadId);
    if (w.failed !== undefined) throw w.failed;
    const n = keys.length / 2;
    const dim = w.data.dim;
    if (n > MAX_LOAD_BATCH_ROWS) throw invalidArgument(`a load batch holds ${n} rows; at most ${MAX_LOAD_BATCH_ROWS}`);
    if (values.length !== n * dim) {
      throw new KvError(KvErrorCode.DIM_MISMATCH, `batch of ${n} keys carries ${values.length} floats; table ${table} v${version} has dim ${dim}`);
    }
    const bad = firstNonFinite(values);
    if (bad >= 0) {
      const row = Math.floor(bad / dim);
      throw new KvError(KvErrorCode.INVALID_DATA, `batch row ${row} (key ${keyAt(keys, row)}) holds ${values[bad]}`, { detail: { row } });
    }
    w.lastActivityMs = Date.now();
    const dup = w.data.append(keys, values, n);
    if (dup >= 0) {
      // The version is now partly appended: the load cannot go on, the loader must abort it.
      w.failed = new KvError(KvErrorCode.DUPLICATE_KEY, `key ${keyAt(keys, dup)} is repeated within this load`, { detail: { row: dup, key: keyAt(keys, dup).toString() } });
      throw w.failed;
    }
    const block = w.meta.blocks++;
    const write = this.store.appendBlock(table, version, block, keys, values, n, dim);
    w.pending.add(write);
    try {
      await write;
    } catch (err) {
      w.failed = new KvError(KvErrorCode.INTERNAL, `writing to disk failed: ${(err as Error).message}`, { cause: err });
      throw w.failed;
    } finally {
      w.pending.delete(write);
    }
    return w.data.count;
  }

  /** Confirms the write version is complete, persists it and makes it a sealed (not yet current) version. */
  async loadSeal(table: string, version: number, loadId: string, expectedRows: number): Promise<number> {
    return this.withTable(table, async () => {
      const w = this.writeVersion(table, version, loadId);
      if (w.failed !== undefined) throw w.failed;
      await Promise.all(w.pending);
      if (w.data.count !== expectedRows) {
        throw new KvError(KvErrorCode.INVALID_DATA, `table ${table} v${version}: this replica holds ${w.data.count} rows, the loader sent ${expectedRows}`);
      }
      const t = this.tables.get(table)!;
      w.data.seal();
      w.meta.rows = w.data.count;
      w.meta.state = 'sealed';
      t.versions.set(version, { data: w.data, meta: w.meta });
      t.write = undefined;
      await this.store.putTable(this.metaOf(t), true);
      this.log.info({ table, version, rows: w.data.count, ms: Date.now() - w.startedMs }, 'load sealed');
      return w.data.count;
    });
  }

  async loadAbort(table: string, version: number, loadId: string): Promise<void> {
    return this.withTable(table, async () => {
      const t = this.tables.get(table);
      const w = t?.write;
      if (t === undefined || w === undefined || w.version !== version || w.loadId !== loadId) return;
      await this.dropWrite(t);
      this.log.info({ table, version, loadId }, 'load aborted');
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
      if (!t.versions.has(version)) {
        throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} version ${version} is not held complete by this replica`);
      }
      const previous = t.current;
      if (version < previous && !rollback) {
        throw new KvError(KvErrorCode.VERSION_TOO_OLD, `table ${table}: version ${version} is older than the current ${previous}; use rollback`);
      }
      t.current = version;
      const dropped = this.prune(t);
      await this.store.putTable(this.metaOf(t), true);
      for (const v of dropped) await this.store.dropVersionRows(table, v);
      this.log.info({ table, version, previous, dropped }, rollback ? 'rolled back' : 'published');
      return previous;
    });
  }

  /** Keeps the current version, every sealed version newer than it, and the newest older ones up to keepVersions. */
  private prune(t: TableState): number[] {
    const older = [...t.versions.keys()].filter((v) => v < t.current).sort((a, b) => b - a);
    const dropped = older.slice(Math.max(0, this.keepVersions - 1));
    for (const v of dropped) t.versions.delete(v);
    return dropped;
  }

  // ---- status -------------------------------------------------------------------------------------

  status(): TableStatusInfo[] {
    const out: TableStatusInfo[] = [];
    for (const t of [...this.tables.values()].sort((a, b) => a.name.localeCompare(b.name))) {
      const versions: VersionStatusInfo[] = [...t.versions.values()]
        .sort((a, b) => a.meta.version - b.meta.version)
        .map((v) => ({ version: v.meta.version, dim: v.data.dim, keys: v.data.count, state: 'sealed' as const, bytes: v.data.bytes }));
      if (t.write !== undefined) {
        versions.push({ version: t.write.version, dim: t.write.data.dim, keys: t.write.data.count, state: 'loading', bytes: t.write.data.bytes });
      }
      out.push({ name: t.name, currentVersion: t.current, versions });
    }
    return out;
  }

  private metaOf(t: TableState): TableMeta {
    const versions = [...t.versions.values()].map((v) => v.meta);
    if (t.write !== undefined) versions.push(t.write.meta);
    return { name: t.name, current: t.current, versions };
  }

  /** Runs metadata changes of one table one at a time. */
  private withTable<T>(table: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.metaChains.get(table) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    this.metaChains.set(table, next.catch(() => undefined));
    return next;
  }
}
