/**
 * The load protocol: checks the options and the dump, opens a write version on every replica, streams
 * the rows (row-streamer.ts), seals, and publishes or drops the write version everywhere.
 */
import { randomUUID } from 'node:crypto';
import { unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import type { Manifest } from '../cluster/manifest.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { MAX_SNAPSHOT_SKEW_MS } from '../common/snapshot-time.js';
import { installZeroCopyRequests } from '../transport/grpc-patches.js';
import { ClusterConnections, type ReplicaConn } from '../cluster/connections.js';
import { call, statusAll, switchVersion } from './cluster-ops.js';
import { dataError } from './dump-files.js';
import { readDumpMetadata } from './dump-meta.js';
import { RowStreamer } from './row-streamer.js';
import { parseDumpSource, planDump, type DumpPlan, type S3SourceOptions } from './sources.js';
import { DEFAULT_STAGE_RANGE_BYTES, stageGroups, type Stage } from './stage.js';

export { DEFAULT_STAGE_RANGE_BYTES } from './stage.js';

export const DEFAULT_BATCH_ROWS = 8192;
export const DEFAULT_INFLIGHT_PER_GROUP = 4;
const MAX_BATCH_BYTES = 32 * 1024 * 1024;

export interface LoadOptions {
  manifest: Manifest;
  table: string;
  version: number;
  /**
   * A file, a NumPy pair or a directory of parts: a local path, or in S3-compatible object storage
   * `s3://BUCKET/PREFIX/` (a prefix of parts) or `s3://BUCKET/KEY` (one part), reached with `s3`.
   */
  path: string;
  /** How to reach object storage for an s3:// path (endpoint, addressing, retries, read-ahead). */
  s3?: S3SourceOptions;
  /**
   * A dump following the Hadoop/Spark convention (every S3 prefix; a local directory holding a marker
   * such as _SUCCESS or _temporary) is loaded only once it holds _SUCCESS (default true).
   */
  requireSuccessMarker?: boolean;
  /** 'incremental': a delta (upserts and deletes) on top of the current version. Default 'full'. */
  mode?: 'full' | 'incremental';
  publish?: boolean;
  /** Allow a version number lower than the current one. */
  force?: boolean;
  /** Allow a full load with no rows, which publishes an empty table (refused by default). */
  allowEmpty?: boolean;
  /** The dim of a full load that changes the table's dimension; by default it must match the current version's. */
  dim?: number;
  /**
   * A full load: when the training snapshot behind the dump was taken (ms since the epoch). Real-time
   * puts stamped at or after it (or after the load began, if that is earlier) stay layered over the
   * version once published; older ones are superseded. By default the dump directory's `_embkv.json`
   * says (dump-meta.ts), else the load's start.
   */
  snapshotAtMs?: number;
  /** Rows per LoadRows call. */
  batchRows?: number;
  /** LoadRows calls in flight per shard group. */
  inflightPerGroup?: number;
  /** Bytes of a staged file's blocks named to its replicas in one LoadRowsFrom (default 4 MiB). */
  stageRangeBytes?: number;
  logger?: Logger;
  signal?: AbortSignal;
  /** Called after each batch is acknowledged: rows sent so far, and the total (-1 when unknown). */
  onProgress?: (rows: number, total: number) => void;
  /** Connections to use (and leave open); by default the load opens its own and closes them. */
  connections?: ClusterConnections;
  /**
   * A full load's rows go through staged files to the groups whose replicas all run on this host
   * (default true): see stageGroups. false: over gRPC to every group.
   */
  staging?: boolean;
  /**
   * How messages name the options, for a caller whose users set them under other names (kvctl passes
   * its flags, `--dim`); by default the names of these fields.
   */
  optionNames?: Partial<LoadOptionNames>;
}

/** The options a load's refusals tell the user to set, named as the user sets them. */
export interface LoadOptionNames {
  table: string;
  version: string;
  dim: string;
  allowEmpty: string;
  /** How to load a dump without its _SUCCESS marker. */
  noSuccessMarker: string;
  snapshotTime: string;
}

export const DEFAULT_LOAD_OPTION_NAMES: Readonly<LoadOptionNames> = {
  table: 'table', version: 'version', dim: 'dim', allowEmpty: 'allowEmpty', noSuccessMarker: 'requireSuccessMarker: false',
  snapshotTime: 'snapshotAtMs',
};

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
  /** Groups whose rows went through a staged file instead of gRPC. */
  stagedGroups: number;
  /** The snapshot time the version records (ms since the epoch), from the options or the dump; 0: none. */
  snapshotAtMs: number;
}

/**
 * A load: validates the dump, opens a write version of `version` on every replica (for a delta,
 * derived from the current version), streams each row to every replica of its group in batches, then
 * seals (and with `publish`, publishes). On any failure every replica drops the write version; what
 * is served never changes.
 */
export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const started = Date.now();
  const names: LoadOptionNames = { ...DEFAULT_LOAD_OPTION_NAMES, ...options.optionNames };
  const table = checkTableName(options.table, names.table);
  const version = checkVersion(options.version, names.version);
  const batchRows = options.batchRows ?? DEFAULT_BATCH_ROWS;
  const inflight = options.inflightPerGroup ?? DEFAULT_INFLIGHT_PER_GROUP;
  if (!Number.isInteger(batchRows) || batchRows < 1) throw invalidArgument('batchRows must be a positive integer');
  if (!Number.isInteger(inflight) || inflight < 1 || inflight > 64) throw invalidArgument('inflightPerGroup must be an integer in [1, 64]');
  const rangeBytes = options.stageRangeBytes ?? DEFAULT_STAGE_RANGE_BYTES;
  if (!Number.isInteger(rangeBytes) || rangeBytes < 1 || rangeBytes > 16 * 1024 * 1024) throw invalidArgument('stageRangeBytes must be an integer in [1, 16 MiB]');
  const mode = options.mode ?? 'full';
  const snapshotAtMs = options.snapshotAtMs;
  if (snapshotAtMs !== undefined) {
    if (mode !== 'full') throw invalidArgument(`${names.snapshotTime} applies to a full load only: a delta leaves the real-time puts over the current version as they are`);
    if (!Number.isSafeInteger(snapshotAtMs) || snapshotAtMs < 1) throw invalidArgument(`${names.snapshotTime} must be a positive integer of ms since the epoch, got ${snapshotAtMs}`);
    if (snapshotAtMs > started + MAX_SNAPSHOT_SKEW_MS) {
      throw invalidArgument(`${names.snapshotTime} is ${Math.round((snapshotAtMs - started) / 1000)} s in the future (more than the ${MAX_SNAPSHOT_SKEW_MS / 1000} s allowed for clock skew)`);
    }
  }
  // Full batches leave from their own buffers, not from a copy grpc-js would make of each.
  await installZeroCopyRequests();
  const conns = options.connections ?? new ClusterConnections(options.manifest);
  try {
    // A load with etcd away would end in a publish that cannot happen: it fails before it starts.
    await conns.source.ensureAvailable();
    return await load(conns, { options, names, table, version, batchRows, inflight, rangeBytes, mode, started });
  } finally {
    if (options.connections === undefined) conns.close();
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

/** A load's options, checked, with their defaults applied. */
interface CheckedLoad {
  options: LoadOptions;
  names: LoadOptionNames;
  table: string;
  version: number;
  batchRows: number;
  inflight: number;
  rangeBytes: number;
  mode: 'full' | 'incremental';
  /** Date.now() when runLoad was called. */
  started: number;
}

async function load(conns: ClusterConnections, run: CheckedLoad): Promise<LoadResult> {
  const { options, names, table, mode } = run;
  const incremental = mode === 'incremental';
  // A delta has the current version's dim. A full load does too, unless it declares a new one.
  const current = await currentVersion(conns, table);
  if (incremental && current === undefined) {
    throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} has no current version for a delta to apply to`);
  }
  const expectDim = options.dim ?? current?.dim;
  const what = options.dim !== undefined ? `${names.dim} ${options.dim}`
    : `the dim of ${table} v${current?.version}${incremental ? '' : `; pass ${names.dim} to load a version with a new dimension`}`;
  const source = parseDumpSource(options.path, options.s3);
  try {
    const plan = await planDump(options.path, mode, {
      expectedDim: expectDim, expectedDimWhat: what, source,
      requireSuccessMarker: options.requireSuccessMarker ?? true, successMarkerWhat: names.noSuccessMarker,
    });
    // The dump's own snapshot time, unless the caller gave one.
    let snapshotAtMs = options.snapshotAtMs ?? 0;
    if (plan.metadataPath !== undefined) {
      const meta = await readDumpMetadata(source, plan.metadataPath);
      if (meta.snapshotAtMs !== undefined && incremental) {
        throw dataError(`${plan.metadataPath}: snapshotTime applies to a full dump only; a delta leaves the real-time puts over the current version as they are`);
      }
      if (options.snapshotAtMs === undefined) snapshotAtMs = meta.snapshotAtMs ?? 0;
    }
    return await loadPlan(conns, run, plan, snapshotAtMs);
  } finally {
    source.close();
  }
}

/** The load of a planned dump, whose source stays open until it returns. */
async function loadPlan(conns: ClusterConnections, run: CheckedLoad, plan: DumpPlan, snapshotAtMs: number): Promise<LoadResult> {
  const { options, names, table, version, batchRows, inflight, rangeBytes, mode, started } = run;
  const { manifest } = options;
  const incremental = mode === 'incremental';
  const rowsPerBatch = Math.max(1, Math.min(batchRows, Math.floor(MAX_BATCH_BYTES / (plan.dim * 4 + 8))));
  const loadId = randomUUID();
  const log = options.logger?.child({ component: 'loader', table, version, loadId });
  const G = manifest.groups.length;
  let begun: ReplicaConn[] = [];
  const stageDirs = new Map<ReplicaConn, string>();
  let stages: (Stage | undefined)[] = [];
  try {
    log?.info({ path: plan.path, parts: plan.parts.length, dim: plan.dim, rows: plan.totalRows, mode, ...(snapshotAtMs > 0 ? { snapshotAtMs } : {}) }, 'load starting');
    // The write versions open (and staged files are set up) while the first rows are read; the
    // first batch to leave waits for them.
    const opening = (async (): Promise<number> => {
      const results = await Promise.allSettled(
        conns.all().map(async (c) => {
          // Keys spread evenly over the groups; 5% over the mean leaves room for the spread.
          const expectedRows = plan.totalRows > 0 && !incremental ? Math.ceil((plan.totalRows / G) * 1.05) : 0;
          const r = await call<{ baseVersion: number; stageDir: string }>(c, 'LoadBegin', {
            table, version, dim: plan.dim, loadId, force: options.force ?? false, incremental, expectedRows, startedAtMs: started, snapshotAtMs,
          });
          stageDirs.set(c, r.stageDir);
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
      if (!incremental && options.staging !== false) stages = await stageGroups({ conns, stageDirs, table, version, loadId, log });
      return [...bases][0] ?? 0;
    })();
    const opened = opening.then(() => stages);
    // Both are awaited below in every case: a failure is reported from there.
    opening.catch(() => undefined);
    opened.catch(() => undefined);
    let streamer: RowStreamer | undefined;
    try {
      streamer = new RowStreamer({
        plan, conns, table, version, loadId, rowsPerBatch, inflight, incremental, stageRangeBytes: rangeBytes, opened,
        onProgress: options.onProgress, signal: options.signal,
      });
      await streamer.run();
    } catch (err) {
      // A refused LoadBegin is the failure to report; either way the write versions are open or
      // refused before they are dropped.
      await opening;
      throw err;
    }
    const { rowsPerGroup, deletesPerGroup } = streamer;
    const baseVersion = await opening;
    if (!incremental && options.allowEmpty !== true && rowsPerGroup.every((n) => n === 0)) {
      // An empty dump is far more often a failed export than a wish to empty the table.
      throw new KvError(KvErrorCode.INVALID_DATA, `${plan.path} holds no rows: a full load of it would leave table ${table} empty; pass ${names.allowEmpty} to load an empty version`);
    }

    await Promise.all(stages.map((st) => st?.syncing));
    const unsynced = stages.find((st) => st?.syncError !== undefined);
    if (unsynced !== undefined) {
      throw new KvError(KvErrorCode.INTERNAL, `writing ${unsynced.path} to disk failed: ${unsynced.syncError!.message}`, { cause: unsynced.syncError });
    }
    await Promise.all(
      conns.all().map((c) => call(c, 'LoadSeal', { table, version, loadId, expectedRows: rowsPerGroup[c.group]! + deletesPerGroup[c.group]! }, 120_000)),
    );
    begun = [];
    const rows = rowsPerGroup.reduce((a, b) => a + b, 0);
    const deletes = deletesPerGroup.reduce((a, b) => a + b, 0);
    log?.info({ rows, deletes, ms: Date.now() - started }, 'load sealed on every replica');
    // Every replica has just answered its LoadSeal: the version is sealed everywhere, so the
    // publish needs no round of Status calls first.
    if (options.publish) await switchVersion(conns, { table, version, rollback: false });
    const stagedGroups = stages.filter((st) => st !== undefined).length;
    return { rows, deletes, baseVersion, rowsPerGroup, dim: plan.dim, ms: Date.now() - started, published: options.publish ?? false, stagedGroups, snapshotAtMs };
  } catch (err) {
    // Drop the write version everywhere it was opened; nothing served has changed.
    await Promise.allSettled(begun.map((c) => call(c, 'LoadAbort', { table, version, loadId }, 10_000)));
    throw err;
  } finally {
    // Sealed replicas hold the staged files under their own names (links or copies) by now.
    await Promise.allSettled(stages.map(async (st) => {
      if (st === undefined) return;
      await st.fh.close();
      await unlink(st.path);
    }));
  }
}

