import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { keyAt } from '../common/keys.js';
import type { Manifest } from '../common/manifest.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { ClusterConnections, type ReplicaConn } from '../router/connections.js';
import { assignGroups, groupTable } from '../router/partition.js';
import { call, publishVersion, statusAll } from './cluster-ops.js';
import { planDump, readDump, type DumpPlan, type RowChunk } from './sources.js';

export const DEFAULT_BATCH_ROWS = 8192;
export const DEFAULT_INFLIGHT_PER_GROUP = 4;
const MAX_BATCH_BYTES = 32 * 1024 * 1024;

export interface LoadOptions {
  manifest: Manifest;
  table: string;
  version: number;
  /** A file, a NumPy pair or a directory of parts. */
  path: string;
  /** 'incremental': a delta (upserts and deletes) on top of the current version. Default 'full'. */
  mode?: 'full' | 'incremental';
  publish?: boolean;
  /** Allow a version number lower than the current one. */
  force?: boolean;
  /** The dim of a full load that changes the table's dimension; by default it must match the current version's. */
  dim?: number;
  /** Rows per LoadRows call. */
  batchRows?: number;
  /** LoadRows calls in flight per shard group. */
  inflightPerGroup?: number;
  logger?: Logger;
  signal?: AbortSignal;
  /** Called after each batch is acknowledged: rows sent so far, and the total (-1 when unknown). */
  onProgress?: (rows: number, total: number) => void;
}

export interface LoadResult {
  /** Upserts (rows of a full load). */
  rows: number;
  deletes: number;
  /** For a delta: the version it was applied to. */
  baseVersion: number;
  rowsPerGroup: number[];
  dim: number;
  ms: number;
  published: boolean;
}

/** One group's batch under construction, with where each row came from (for messages). */
class Batch {
  n = 0;
  nd = 0;
  readonly keys: Uint32Array;
  readonly values: Float32Array;
  readonly deletes: Uint32Array;
  /** Source of row i (upserts first, then deletes at n + j). */
  readonly file: string[] = [];
  readonly row: Int32Array;
  constructor(readonly size: number, readonly dim: number) {
    this.keys = new Uint32Array(2 * size);
    this.values = new Float32Array(size * dim);
    this.deletes = new Uint32Array(2 * size);
    this.row = new Int32Array(2 * size);
  }
  get full(): boolean {
    return this.n === this.size || this.nd === this.size;
  }
}

/**
 * A load: validates the dump, opens a write version of `version` on every replica (for a delta,
 * derived from the current version), streams each row to every replica of its group in batches, then
 * seals (and with `publish`, publishes). On any failure every replica drops the write version; what
 * is served never changes.
 */
export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const started = Date.now();
  const table = checkTableName(options.table, '--table');
  const version = checkVersion(options.version, '--version');
  const batchRows = options.batchRows ?? DEFAULT_BATCH_ROWS;
  const inflight = options.inflightPerGroup ?? DEFAULT_INFLIGHT_PER_GROUP;
  if (!Number.isInteger(batchRows) || batchRows < 1) throw invalidArgument('batchRows must be a positive integer');
  if (!Number.isInteger(inflight) || inflight < 1 || inflight > 64) throw invalidArgument('inflightPerGroup must be an integer in [1, 64]');
  const mode = options.mode ?? 'full';
  const { manifest } = options;
  const conns = new ClusterConnections(manifest);
  try {
    return await load(conns, options, table, version, batchRows, inflight, mode, started);
  } finally {
    conns.close();
  }
}

/**
 * The dim of the table's current version, which every replica must agree on; undefined when the
 * table has no current version anywhere (its first load).
 */
async function currentVersion(conns: ClusterConnections, table: string): Promise<{ version: number; dim: number } | undefined> {
  const all = await statusAll(conns);
  const seen = new Map<string, { version: number; dim: number } | undefined>();
  for (const s of all) {
    if (s.error) throw s.error;
    const t = s.status!.tables.find((x) => x.name === table);
    const v = t?.versions.find((x) => x.version === t.currentVersion);
    seen.set(v ? `v${v.version} dim ${v.dim}` : 'none', v ? { version: v.version, dim: v.dim } : undefined);
  }
  if (seen.size > 1) {
    throw new KvError(KvErrorCode.LOAD_CONFLICT, `replicas disagree on the current version of ${table} (${[...seen.keys()].join(', ')}); finish the publish first`);
  }
  return [...seen.values()][0];
}

async function load(
  conns: ClusterConnections, options: LoadOptions, table: string, version: number, batchRows: number, inflight: number,
  mode: 'full' | 'incremental', started: number,
): Promise<LoadResult> {
  const { manifest } = options;
  const incremental = mode === 'incremental';
  // A delta has the current version's dim. A full load does too, unless it declares a new one.
  const current = await currentVersion(conns, table);
  if (incremental && current === undefined) {
    throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} has no current version for a delta to apply to`);
  }
  const expectDim = options.dim ?? current?.dim;
  const what = options.dim !== undefined ? `--dim ${options.dim}`
    : `the dim of ${table} v${current?.version}${incremental ? '' : `; pass --dim to load a version with a new dimension`}`;
  const plan = await planDump(options.path, mode, expectDim, what);
  const rowsPerBatch = Math.max(1, Math.min(batchRows, Math.floor(MAX_BATCH_BYTES / (plan.dim * 4 + 8))));
  const loadId = randomUUID();
  const log = options.logger?.child({ component: 'loader', table, version, loadId });
  const G = manifest.groups.length;
  const rowsPerGroup = new Array<number>(G).fill(0);
  const deletesPerGroup = new Array<number>(G).fill(0);
  let begun: ReplicaConn[] = [];
  try {
    log?.info({ path: plan.path, parts: plan.parts.length, dim: plan.dim, rows: plan.totalRows, mode }, 'load starting');
    const results = await Promise.allSettled(
      conns.all().map(async (c) => {
        // Keys spread evenly over the groups; 5% over the mean leaves room for the spread.
        const expectedRows = plan.totalRows > 0 && !incremental ? Math.ceil((plan.totalRows / G) * 1.05) : 0;
        const r = await call<{ baseVersion: number }>(c, 'LoadBegin', {
          table, version, dim: plan.dim, loadId, force: options.force ?? false, incremental, expectedRows, startedAtMs: started,
        });
        return { c, base: r.baseVersion };
      }),
    );
    begun = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value.c] : []));
    const refused = results.find((r) => r.status === 'rejected');
    if (refused) throw (refused as PromiseRejectedResult).reason;
    const bases = new Set(results.map((r) => (r as PromiseFulfilledResult<{ base: number }>).value.base));
    if (bases.size > 1) {
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `replicas would apply the delta to different versions (${[...bases].join(', ')}); finish the publish first`);
    }
    const baseVersion = [...bases][0] ?? 0;

    await streamRows(plan, conns, { table, version, loadId, rowsPerBatch, inflight, rowsPerGroup, deletesPerGroup, incremental, options });

    await Promise.all(
      conns.all().map((c) => call(c, 'LoadSeal', { table, version, loadId, expectedRows: rowsPerGroup[c.group]! + deletesPerGroup[c.group]! }, 120_000)),
    );
    begun = [];
    const rows = rowsPerGroup.reduce((a, b) => a + b, 0);
    const deletes = deletesPerGroup.reduce((a, b) => a + b, 0);
    log?.info({ rows, deletes, ms: Date.now() - started }, 'load sealed on every replica');
    if (options.publish) await publishVersion(conns, table, version, false);
    return { rows, deletes, baseVersion, rowsPerGroup, dim: plan.dim, ms: Date.now() - started, published: options.publish ?? false };
  } catch (err) {
    // Drop the write version everywhere it was opened; nothing served has changed.
    await Promise.allSettled(begun.map((c) => call(c, 'LoadAbort', { table, version, loadId }, 10_000)));
    throw err;
  }
}

interface StreamContext {
  table: string;
  version: number;
  loadId: string;
  rowsPerBatch: number;
  inflight: number;
  rowsPerGroup: number[];
  deletesPerGroup: number[];
  incremental: boolean;
  options: LoadOptions;
}

async function streamRows(plan: DumpPlan, conns: ClusterConnections, ctx: StreamContext): Promise<void> {
  const { manifest } = conns;
  const G = manifest.groups.length;
  const groupOfPartition = groupTable(manifest.partitions, G);
  const batches = Array.from({ length: G }, () => new Batch(ctx.rowsPerBatch, plan.dim));
  const pending: Set<Promise<void>>[] = Array.from({ length: G }, () => new Set());
  let failure: unknown;
  let sent = 0;

  const send = async (g: number, b: Batch): Promise<void> => {
    const keys = Buffer.from(b.keys.buffer, 0, b.n * 8);
    const values = Buffer.from(b.values.buffer, 0, b.n * plan.dim * 4);
    const deletes = Buffer.from(b.deletes.buffer, 0, b.nd * 8);
    const req = { table: ctx.table, version: ctx.version, loadId: ctx.loadId, keys, values, deletes };
    try {
      await Promise.all(conns.groups[g]!.map((c) => call(c, 'LoadRows', req, 120_000)));
    } catch (err) {
      throw explainRowError(err, b, ctx.incremental ? 'delta' : 'load');
    }
    ctx.rowsPerGroup[g]! += b.n;
    ctx.deletesPerGroup[g]! += b.nd;
    sent += b.n + b.nd;
    ctx.options.onProgress?.(sent, plan.totalRows);
  };

  const flush = async (g: number): Promise<void> => {
    const b = batches[g]!;
    if (b.n === 0 && b.nd === 0) return;
    batches[g] = new Batch(ctx.rowsPerBatch, plan.dim);
    const set = pending[g]!;
    while (set.size >= ctx.inflight) await Promise.race(set);
    if (failure !== undefined) throw failure;
    const p: Promise<void> = send(g, b).then(
      () => void set.delete(p),
      (err: unknown) => {
        set.delete(p);
        failure ??= err;
      },
    );
    set.add(p);
  };

  let groupOf = new Uint16Array(0);
  const counts = new Uint32Array(G);
  for await (const item of readDump(plan, { signal: ctx.options.signal })) {
    if (failure !== undefined) break;
    if (item.type === 'deletes') {
      if (!ctx.incremental) throw new KvError(KvErrorCode.INVALID_DATA, `${item.chunk.file}: deletes are only allowed in an incremental load`);
      const chunk = item.chunk;
      if (groupOf.length < chunk.n) groupOf = new Uint16Array(chunk.n);
      assignGroups(chunk.keys, chunk.n, manifest.partitions, groupOfPartition, groupOf, counts);
      for (let i = 0; i < chunk.n; i++) {
        const g = groupOf[i]!;
        const b = batches[g]!;
        const at = b.nd;
        b.deletes[2 * at] = chunk.keys[2 * i]!;
        b.deletes[2 * at + 1] = chunk.keys[2 * i + 1]!;
        b.file[b.size + at] = chunk.file;
        b.row[b.size + at] = chunk.rowNumbers ? chunk.rowNumbers[i]! : chunk.firstRow + i;
        b.nd = at + 1;
        if (b.full) await flush(g);
      }
      continue;
    }
    const chunk: RowChunk = item.chunk;
    if (groupOf.length < chunk.n) groupOf = new Uint16Array(chunk.n);
    assignGroups(chunk.keys, chunk.n, manifest.partitions, groupOfPartition, groupOf, counts);
    const dim = plan.dim;
    for (let i = 0; i < chunk.n; i++) {
      const g = groupOf[i]!;
      const b = batches[g]!;
      const at = b.n;
      b.keys[2 * at] = chunk.keys[2 * i]!;
      b.keys[2 * at + 1] = chunk.keys[2 * i + 1]!;
      // A plain loop: set(subarray()) would allocate a view per row.
      const bv = b.values;
      const cv = chunk.values;
      let src = i * dim;
      let dst = at * dim;
      const stop = src + dim;
      while (src < stop) bv[dst++] = cv[src++]!;
      b.file[at] = chunk.file;
      b.row[at] = chunk.rowNumbers ? chunk.rowNumbers[i]! : chunk.firstRow + i;
      b.n = at + 1;
      if (b.full) await flush(g);
    }
  }
  for (let g = 0; g < G; g++) if (failure === undefined) await flush(g);
  await Promise.all(pending.flatMap((s) => [...s]));
  if (failure !== undefined) throw failure;
}

/** A replica's refusal of a batch row, told as the file and row the row came from. */
function explainRowError(err: unknown, b: Batch, what: 'delta' | 'load'): unknown {
  if (!(err instanceof KvError) || err.detail === undefined || typeof err.detail['row'] !== 'number') return err;
  // The replica numbers upserts first, then deletes.
  const r = err.detail['row'];
  if (r < 0 || r >= b.n + b.nd) return err;
  const i = r < b.n ? r : b.size + (r - b.n);
  const key = r < b.n ? keyAt(b.keys, r) : keyAt(b.deletes, r - b.n);
  const where = `${b.file[i]}: ${b.file[i]!.endsWith('.npy') ? 'row' : 'line'} ${b.row[i]}`;
  if (err.code === KvErrorCode.DUPLICATE_KEY) {
    return new KvError(KvErrorCode.DUPLICATE_KEY, `${where}: key ${key} is repeated within this ${what}`, { cause: err });
  }
  return new KvError(err.code, `${where}: ${err.message}`, { cause: err });
}
