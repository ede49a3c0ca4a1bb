import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { keyAt } from '../common/keys.js';
import type { Manifest } from '../common/manifest.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { ClusterConnections, type ReplicaConn } from '../router/connections.js';
import { assignGroups, groupTable } from '../router/partition.js';
import { call, publishVersion } from './cluster-ops.js';
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
  publish?: boolean;
  /** Allow a version number lower than the current one. */
  force?: boolean;
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
  rows: number;
  rowsPerGroup: number[];
  dim: number;
  ms: number;
  published: boolean;
}

/** One group's batch under construction, with where each row came from (for messages). */
class Batch {
  n = 0;
  readonly keys: Uint32Array;
  readonly values: Float32Array;
  readonly file: string[] = [];
  readonly row: Int32Array;
  constructor(size: number, readonly dim: number) {
    this.keys = new Uint32Array(2 * size);
    this.values = new Float32Array(size * dim);
    this.row = new Int32Array(size);
  }
}

/**
 * A full load: validates the dump, opens a write version of `version` on every replica, streams each
 * row to every replica of its group in batches, then seals (and with `publish`, publishes). On any
 * failure every replica drops the write version; what is served never changes.
 */
export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const started = Date.now();
  const table = checkTableName(options.table, '--table');
  const version = checkVersion(options.version, '--version');
  const batchRows = options.batchRows ?? DEFAULT_BATCH_ROWS;
  const inflight = options.inflightPerGroup ?? DEFAULT_INFLIGHT_PER_GROUP;
  if (!Number.isInteger(batchRows) || batchRows < 1) throw invalidArgument('batchRows must be a positive integer');
  const plan = await planDump(options.path, 'full');
  const rowsPerBatch = Math.max(1, Math.min(batchRows, Math.floor(MAX_BATCH_BYTES / (plan.dim * 4 + 8))));
  const { manifest } = options;
  const conns = new ClusterConnections(manifest);
  const loadId = randomUUID();
  const log = options.logger?.child({ component: 'loader', table, version, loadId });
  const G = manifest.groups.length;
  const rowsPerGroup = new Array<number>(G).fill(0);
  let begun: ReplicaConn[] = [];
  try {
    log?.info({ path: plan.path, parts: plan.parts.length, dim: plan.dim, rows: plan.totalRows }, 'load starting');
    const results = await Promise.allSettled(
      conns.all().map(async (c) => {
        await call(c, 'LoadBegin', { table, version, dim: plan.dim, loadId, force: options.force ?? false });
        return c;
      }),
    );
    begun = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const refused = results.find((r) => r.status === 'rejected');
    if (refused) throw (refused as PromiseRejectedResult).reason;

    await streamRows(plan, conns, { table, version, loadId, rowsPerBatch, inflight, rowsPerGroup, options });

    await Promise.all(
      conns.all().map((c) => call(c, 'LoadSeal', { table, version, loadId, expectedRows: rowsPerGroup[c.group]! }, 120_000)),
    );
    begun = [];
    const rows = rowsPerGroup.reduce((a, b) => a + b, 0);
    log?.info({ rows, ms: Date.now() - started }, 'load sealed on every replica');
    if (options.publish) await publishVersion(conns, table, version, false);
    return { rows, rowsPerGroup, dim: plan.dim, ms: Date.now() - started, published: options.publish ?? false };
  } catch (err) {
    // Drop the write version everywhere it was opened; nothing served has changed.
    await Promise.allSettled(begun.map((c) => call(c, 'LoadAbort', { table, version, loadId }, 10_000)));
    throw err;
  } finally {
    conns.close();
  }
}

interface StreamContext {
  table: string;
  version: number;
  loadId: string;
  rowsPerBatch: number;
  inflight: number;
  rowsPerGroup: number[];
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
    const req = { table: ctx.table, version: ctx.version, loadId: ctx.loadId, keys, values };
    try {
      await Promise.all(conns.groups[g]!.map((c) => call(c, 'LoadRows', req, 120_000)));
    } catch (err) {
      throw explainRowError(err, b);
    }
    ctx.rowsPerGroup[g]! += b.n;
    sent += b.n;
    ctx.options.onProgress?.(sent, plan.totalRows);
  };

  const flush = async (g: number): Promise<void> => {
    const b = batches[g]!;
    if (b.n === 0) return;
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
    if (item.type !== 'rows') {
      throw new KvError(KvErrorCode.INVALID_DATA, `${item.chunk.file}: deletes are only allowed in an incremental load`);
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
      b.values.set(chunk.values.subarray(i * dim, i * dim + dim), at * dim);
      b.file[at] = chunk.file;
      b.row[at] = chunk.rowNumbers ? chunk.rowNumbers[i]! : chunk.firstRow + i;
      b.n = at + 1;
      if (b.n === ctx.rowsPerBatch) await flush(g);
    }
  }
  for (let g = 0; g < G; g++) if (failure === undefined) await flush(g);
  await Promise.all(pending.flatMap((s) => [...s]));
  if (failure !== undefined) throw failure;
}

/** A replica's refusal of a batch row, told as the file and row the row came from. */
function explainRowError(err: unknown, b: Batch): unknown {
  if (!(err instanceof KvError) || err.detail === undefined || typeof err.detail['row'] !== 'number') return err;
  const i = err.detail['row'];
  if (i < 0 || i >= b.n) return err;
  const where = `${b.file[i]}: ${b.file[i]!.endsWith('.npy') ? 'row' : 'line'} ${b.row[i]}`;
  if (err.code === KvErrorCode.DUPLICATE_KEY) {
    return new KvError(KvErrorCode.DUPLICATE_KEY, `${where}: key ${keyAt(b.keys, i)} is repeated within this load`, { cause: err });
  }
  return new KvError(err.code, `${where}: ${err.message}`, { cause: err });
}
