import { randomBytes, randomUUID } from 'node:crypto';
import { open, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { keyAt } from '../common/keys.js';
import type { Manifest } from '../cluster/manifest.js';
import { blockBytes, writeBlock } from '../common/rows-file.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { installZeroCopyRequests } from '../transport/grpc-patches.js';
import { LoadRowsMessage, encodeLoadRowsRequest } from '../wire/load-rows.js';
import { ClusterConnections, type ReplicaConn } from '../cluster/connections.js';
import { assignGroups, groupTable } from '../cluster/partition.js';
import { call, statusAll, switchVersion } from './cluster-ops.js';
import { planDump, readDump, type DeleteChunk, type DumpPlan, type RowChunk } from './sources.js';

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
  /** Allow a full load with no rows, which publishes an empty table (refused by default). */
  allowEmpty?: boolean;
  /** The dim of a full load that changes the table's dimension; by default it must match the current version's. */
  dim?: number;
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
  /** Groups whose rows went through a staged file instead of gRPC. */
  stagedGroups: number;
}

/** Where a run of batch rows came from, for messages: a file, and its row numbering. */
interface RowSource {
  file: string;
  firstRow: number;
  rowNumbers: Int32Array | undefined;
}

/**
 * Where each row of a batch came from, for messages. A staged batch's buffers are reused once its
 * block is written; its origins stay until the replicas have taken the block.
 */
class RowOrigins {
  /** Source of row i (upserts first, then deletes at size + j): an index into `sources` and the index within it. */
  private readonly sourceOf: Uint32Array;
  private readonly indexIn: Int32Array;
  private sources: RowSource[] = [];

  constructor(size: number, deletes: boolean) {
    this.sourceOf = new Uint32Array(deletes ? 2 * size : size);
    this.indexIn = new Int32Array(deletes ? 2 * size : size);
  }

  /** Records that batch row `at` is row `i` of `chunk`. */
  from(at: number, chunk: RowChunk | DeleteChunk, i: number): void {
    // Compared by file and first row, not by identity: holding the chunk would hold its rows.
    const last = this.sources[this.sources.length - 1];
    if (last === undefined || last.firstRow !== chunk.firstRow || last.file !== chunk.file) {
      this.sources.push({ file: chunk.file, firstRow: chunk.firstRow, rowNumbers: chunk.rowNumbers });
    }
    this.sourceOf[at] = this.sources.length - 1;
    this.indexIn[at] = i;
  }

  /** "file: row N" (or line N) of batch row `at`. */
  where(at: number): string {
    const src = this.sources[this.sourceOf[at]!]!;
    const i = this.indexIn[at]!;
    const row = src.rowNumbers ? src.rowNumbers[i]! : src.firstRow + i;
    return `${src.file}: ${src.file.endsWith('.npy') ? 'row' : 'line'} ${row}`;
  }

  reset(): void {
    this.sources = [];
  }
}

/**
 * One group's batch under construction. Upserts are written straight into a LoadRows message laid
 * out for a full batch, which is sent as is when full; batches are reused once every replica of the
 * group has acknowledged them (or, staged, once their block is written), so a load allocates its
 * buffers once.
 */
class Batch {
  n = 0;
  nd = 0;
  readonly msg: LoadRowsMessage;
  readonly keys: Uint32Array;
  readonly values: Float32Array;
  readonly values64: Float64Array;
  /** A delta's deletes (allocated for deltas only). */
  readonly deletes: Uint32Array;
  origins: RowOrigins;

  constructor(readonly size: number, readonly dim: number, table: string, version: number, loadId: string, readonly withDeletes: boolean) {
    this.msg = new LoadRowsMessage(table, version, loadId, size, dim);
    this.keys = this.msg.keys;
    this.values = this.msg.values;
    // 8-byte aligned by construction (LoadRowsMessage); used for even dims only.
    this.values64 = new Float64Array(this.values.buffer, this.values.byteOffset, this.values.length >>> 1);
    this.deletes = new Uint32Array(withDeletes ? 2 * size : 0);
    this.origins = new RowOrigins(size, withDeletes);
  }

  get full(): boolean {
    return this.n === this.size || this.nd === this.size;
  }

  /** The upserts' keys and values as bytes. */
  keyBytes(): Uint8Array {
    return new Uint8Array(this.keys.buffer, this.keys.byteOffset, this.n * 8);
  }

  valueBytes(): Uint8Array {
    return new Uint8Array(this.values.buffer, this.values.byteOffset, this.n * this.dim * 4);
  }

  reset(): void {
    this.n = 0;
    this.nd = 0;
    this.origins.reset();
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
  const rangeBytes = options.stageRangeBytes ?? DEFAULT_STAGE_RANGE_BYTES;
  if (!Number.isInteger(rangeBytes) || rangeBytes < 1 || rangeBytes > 16 * 1024 * 1024) throw invalidArgument('stageRangeBytes must be an integer in [1, 16 MiB]');
  const mode = options.mode ?? 'full';
  const { manifest } = options;
  // Full batches leave from their own buffers, not from a copy grpc-js would make of each.
  await installZeroCopyRequests();
  const conns = options.connections ?? new ClusterConnections(manifest);
  try {
    return await load(conns, options, table, version, batchRows, inflight, mode, started);
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
  const stageDirs = new Map<ReplicaConn, string>();
  let stages: (Stage | undefined)[] = [];
  try {
    log?.info({ path: plan.path, parts: plan.parts.length, dim: plan.dim, rows: plan.totalRows, mode }, 'load starting');
    // The write versions open (and staged files are set up) while the first rows are read; the
    // first batch to leave waits for them.
    const opening = (async (): Promise<number> => {
      const results = await Promise.allSettled(
        conns.all().map(async (c) => {
          // Keys spread evenly over the groups; 5% over the mean leaves room for the spread.
          const expectedRows = plan.totalRows > 0 && !incremental ? Math.ceil((plan.totalRows / G) * 1.05) : 0;
          const r = await call<{ baseVersion: number; stageDir: string }>(c, 'LoadBegin', {
            table, version, dim: plan.dim, loadId, force: options.force ?? false, incremental, expectedRows, startedAtMs: started,
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
      if (!incremental && options.staging !== false) stages = await stageGroups(conns, stageDirs, table, version, loadId, log);
      return [...bases][0] ?? 0;
    })();
    const opened = opening.then(() => stages);
    // Both are awaited below in every case: a failure is reported from there.
    opening.catch(() => undefined);
    opened.catch(() => undefined);
    try {
      await streamRows(plan, conns, { table, version, loadId, rowsPerBatch, inflight, rowsPerGroup, deletesPerGroup, incremental, options, opened });
    } catch (err) {
      // A refused LoadBegin is the failure to report; either way the write versions are open or
      // refused before they are dropped.
      await opening;
      throw err;
    }
    const baseVersion = await opening;
    if (!incremental && options.allowEmpty !== true && rowsPerGroup.every((n) => n === 0)) {
      // An empty dump is far more often a failed export than a wish to empty the table.
      throw new KvError(KvErrorCode.INVALID_DATA, `${plan.path} holds no rows: a full load of it would leave table ${table} empty; pass --allow-empty to load an empty version`);
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
    if (options.publish) await switchVersion(conns, table, version, false);
    const stagedGroups = stages.filter((st) => st !== undefined).length;
    return { rows, deletes, baseVersion, rowsPerGroup, dim: plan.dim, ms: Date.now() - started, published: options.publish ?? false, stagedGroups };
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

/** A group's staged file as the loader writes it. */
interface Stage {
  path: string;
  fh: FileHandle;
  /** Where the next block goes. */
  end: number;
  /** Bytes up to which a background fdatasync has started; the one in flight; its failure. */
  syncedTo: number;
  syncing: Promise<void> | undefined;
  syncError: Error | undefined;
}

/** A block written to a staged file: where, how many rows, and where they came from. */
interface WrittenBlock {
  at: number;
  bytes: number;
  n: number;
  origins: RowOrigins;
  written: Promise<void>;
}

/**
 * Blocks are named to the replicas this many bytes at a time (one LoadRowsFrom for several blocks;
 * replicas read a range block by block): a call costs the loader ~1 ms of CPU.
 */
export const DEFAULT_STAGE_RANGE_BYTES = 4 * 1024 * 1024;

/**
 * A staged file is written back to disk as it grows, by an fdatasync every this many bytes, so that
 * the replicas' fsync at the seal finds little left to write (2M keys on 8 groups, ~34 MB a file:
 * from the last rows to the publish took 240-330 ms with a sync every 32 MiB, which came too late
 * to write anything back early, and 65-190 ms with one every 4 MiB).
 */
const STAGE_SYNC_BYTES = 4 * 1024 * 1024;

function syncInBackground(st: Stage): void {
  if (st.syncing !== undefined || st.end - st.syncedTo < STAGE_SYNC_BYTES) return;
  st.syncedTo = st.end;
  // A failed write-back fails the load: once reported, the kernel may call the pages clean.
  st.syncing = st.fh.datasync().catch((err: Error) => void (st.syncError ??= err)).then(() => {
    st.syncing = undefined;
  });
}

/**
 * Staged full loads: for each group, the loader creates a file in the stage directory of the
 * group's first replica and asks every replica of the group whether it sees that file (a probe
 * file with a random token). Where all do, the group's rows are written to the file as rows-file
 * blocks and the replicas read them from there (LoadRowsFrom), and keep the file as their rows file
 * at the seal: on one host, rows need not cross a socket, be reassembled by gRPC and be written
 * again by each replica. Other groups (replicas on other hosts, or a stage directory this process
 * cannot write) get their rows over gRPC, as with staging off.
 */
async function stageGroups(
  conns: ClusterConnections, stageDirs: Map<ReplicaConn, string>, table: string, version: number, loadId: string, log: Logger | undefined,
): Promise<(Stage | undefined)[]> {
  // Every group settles (a group that cannot be staged gets its rows over gRPC), so no file made
  // for another group is left open when one fails.
  return Promise.all(conns.groups.map(async (replicas, g) => {
    const dir = stageDirs.get(replicas[0]!);
    if (!dir) return undefined;
    const path = join(dir, `${loadId}-g${g}.rows`);
    const probePath = join(dir, `${loadId}-g${g}.probe`);
    let fh: FileHandle;
    try {
      fh = await open(path, 'wx');
    } catch (err) {
      log?.debug({ group: g, path, err: (err as Error).message }, 'rows go over gRPC: the stage directory is not writable here');
      return undefined;
    }
    let refused: string | undefined;
    try {
      const token = randomBytes(32);
      await writeFile(probePath, token);
      // A replica that refuses the call (an older release, a conflict) gets the rows over gRPC,
      // where a real conflict shows again; replicas that took the stage give it up at the first rows.
      const answers = await Promise.allSettled(replicas.map((c) => call<{ readable: boolean; reason: string }>(c, 'LoadStage', { table, version, loadId, path, probePath, token })));
      for (const a of answers) {
        if (a.status === 'rejected') refused ??= (a.reason as Error).message;
        else if (!a.value.readable) refused ??= a.value.reason;
      }
    } catch (err) {
      refused = (err as Error).message;
    } finally {
      await unlink(probePath).catch(() => undefined);
    }
    if (refused !== undefined) {
      log?.info({ group: g, path, reason: refused }, 'rows go over gRPC: a replica does not read the staged file');
      await fh.close();
      await unlink(path).catch(() => undefined);
      return undefined;
    }
    return { path, fh, end: 0, syncedTo: 0, syncing: undefined, syncError: undefined };
  }));
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
  /** Once the write versions are open: per group, its staged file, or undefined for rows over gRPC. */
  opened: Promise<(Stage | undefined)[]>;
}

async function streamRows(plan: DumpPlan, conns: ClusterConnections, ctx: StreamContext): Promise<void> {
  const { manifest } = conns;
  const G = manifest.groups.length;
  const dim = plan.dim;
  const groupOfPartition = groupTable(manifest.partitions, G);
  // Batches ready for reuse: acknowledged by their group, or staged and written (at most inflight + 1
  // per group exist).
  const spare: Batch[][] = Array.from({ length: G }, () => []);
  const newBatch = (g: number): Batch =>
    spare[g]!.pop() ?? new Batch(ctx.rowsPerBatch, dim, ctx.table, ctx.version, ctx.loadId, ctx.incremental);
  const batches = Array.from({ length: G }, (_, g) => newBatch(g));
  const pending: Set<Promise<void>>[] = Array.from({ length: G }, () => new Set());
  let failure: unknown;
  let sent = 0;

  /** Tracks a group's write or call in flight; its failure stops the load. */
  const track = (g: number, work: Promise<void>): void => {
    const set = pending[g]!;
    const p: Promise<void> = work.then(
      () => void set.delete(p),
      (err: unknown) => {
        set.delete(p);
        failure ??= err;
      },
    );
    set.add(p);
  };

  const acknowledged = (g: number, rows: number, deletes: number): void => {
    ctx.rowsPerGroup[g]! += rows;
    ctx.deletesPerGroup[g]! += deletes;
    sent += rows + deletes;
    ctx.options.onProgress?.(sent, plan.totalRows);
  };

  const send = async (g: number, b: Batch): Promise<void> => {
    try {
      // A full batch of upserts goes as laid out; anything else (the last batch of a group, a
      // delta's deletes) is encoded to its size.
      const req = b.n === b.size && b.nd === 0 ? b.msg.buf : encodeLoadRowsRequest({
        table: ctx.table, version: ctx.version, loadId: ctx.loadId, keys: b.keyBytes(), values: b.valueBytes(),
        deletes: new Uint8Array(b.deletes.buffer, b.deletes.byteOffset, b.nd * 8),
      });
      await Promise.all(conns.groups[g]!.map((c) => call(c, 'LoadRows', req, 120_000)));
    } catch (err) {
      throw explainRowError(err, b, ctx.incremental ? 'delta' : 'load');
    }
    acknowledged(g, b.n, b.nd);
    b.reset();
    spare[g]!.push(b);
  };

  // Staged groups (full loads only, so no deletes): each batch becomes a block of the group's file,
  // and its buffers are reused once written. Written blocks are named to the replicas a range of
  // stageRangeBytes at a time: one call for several blocks.
  const rangeBytes = ctx.options.stageRangeBytes ?? DEFAULT_STAGE_RANGE_BYTES;
  const unnamed: WrittenBlock[][] = Array.from({ length: G }, () => []);
  const spareOrigins: RowOrigins[] = [];

  const stage = (g: number, st: Stage, b: Batch): void => {
    const at = st.end;
    const bytes = blockBytes(b.n, dim);
    st.end += bytes;
    const written = writeBlock(st.fh, st.path, at, b.keyBytes(), b.valueBytes(), b.n, dim).then(() => {
      syncInBackground(st);
      b.reset();
      spare[g]!.push(b);
    });
    unnamed[g]!.push({ at, bytes, n: b.n, origins: b.origins, written });
    b.origins = spareOrigins.pop() ?? new RowOrigins(b.size, b.withDeletes);
    track(g, written);
    if (at + bytes - unnamed[g]![0]!.at >= rangeBytes) nameRange(g);
  };

  const nameRange = (g: number): void => {
    const blocks = unnamed[g]!;
    if (blocks.length === 0) return;
    unnamed[g] = [];
    const at = blocks[0]!.at;
    const last = blocks[blocks.length - 1]!;
    const bytes = last.at + last.bytes - at;
    track(g, (async () => {
      await Promise.all(blocks.map((x) => x.written));
      try {
        await Promise.all(conns.groups[g]!.map((c) => call(c, 'LoadRowsFrom', { table: ctx.table, version: ctx.version, loadId: ctx.loadId, at, bytes }, 120_000)));
      } catch (err) {
        throw explainStagedError(err, blocks);
      }
      let rows = 0;
      for (const x of blocks) {
        rows += x.n;
        x.origins.reset();
        spareOrigins.push(x.origins);
      }
      acknowledged(g, rows, 0);
    })());
  };

  const flush = async (g: number): Promise<void> => {
    const b = batches[g]!;
    if (b.n === 0 && b.nd === 0) return;
    const set = pending[g]!;
    while (set.size >= ctx.inflight) await Promise.race(set);
    if (failure !== undefined) throw failure;
    batches[g] = newBatch(g);
    const st = (await ctx.opened)[g];
    if (st !== undefined) stage(g, st, b);
    else track(g, send(g, b));
  };

  let groupOf = new Uint16Array(0);
  const counts = new Uint32Array(G);
  // Rows are copied into batches at once, so the reader may reuse its buffers.
  for await (const item of readDump(plan, { signal: ctx.options.signal, reuseBuffers: true })) {
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
        b.origins.from(b.size + at, chunk, i);
        b.nd = at + 1;
        if (b.full) await flush(g);
      }
      continue;
    }
    const chunk: RowChunk = item.chunk;
    if (groupOf.length < chunk.n) groupOf = new Uint16Array(chunk.n);
    assignGroups(chunk.keys, chunk.n, manifest.partitions, groupOfPartition, groupOf, counts);
    // Rows are placed by a plain function that stops when a batch fills: V8 optimises it at once,
    // where this async loop body ran long in baseline code.
    for (let i = 0; i < chunk.n;) {
      i = placeRows(chunk, i, groupOf, batches, dim);
      const g = groupOf[i - 1]!;
      if (batches[g]!.full) await flush(g);
    }
  }
  for (let g = 0; g < G; g++) {
    if (failure === undefined) await flush(g);
    nameRange(g);
  }
  await Promise.all(pending.flatMap((s) => [...s]));
  if (failure !== undefined) throw failure;
}

/**
 * Copies rows from `from` on into their groups' batches until one fills (it is the batch of the last
 * row placed) or the chunk ends; returns the index after the last row placed. Rows move as Float64
 * pairs when dim is even and both sides are 8-byte aligned (the reader's buffers and the batch
 * messages are): the values were checked finite, and finite float32 pairs never form a NaN double,
 * so the copy is bit-exact. Plain loops: set(subarray()) would allocate a view per row.
 */
function placeRows(chunk: RowChunk, from: number, groupOf: Uint16Array, batches: Batch[], dim: number): number {
  const ck = chunk.keys;
  const cv = chunk.values;
  const wide = (dim & 1) === 0 && (cv.byteOffset & 7) === 0;
  const cv64 = wide ? new Float64Array(cv.buffer, cv.byteOffset, cv.length >>> 1) : undefined;
  const half = dim >>> 1;
  for (let i = from; i < chunk.n; i++) {
    const b = batches[groupOf[i]!]!;
    const at = b.n;
    b.keys[2 * at] = ck[2 * i]!;
    b.keys[2 * at + 1] = ck[2 * i + 1]!;
    if (cv64 !== undefined) {
      const bv = b.values64;
      let src = i * half;
      let dst = at * half;
      const stop = src + half;
      while (src < stop) bv[dst++] = cv64[src++]!;
    } else {
      const bv = b.values;
      let src = i * dim;
      let dst = at * dim;
      const stop = src + dim;
      while (src < stop) bv[dst++] = cv[src++]!;
    }
    b.origins.from(at, chunk, i);
    b.n = at + 1;
    if (at + 1 === b.size) return i + 1;
  }
  return chunk.n;
}

/** A replica's refusal of a row of a staged range, told as the file and row the row came from. */
function explainStagedError(err: unknown, blocks: WrittenBlock[]): unknown {
  if (!(err instanceof KvError) || typeof err.detail?.['row'] !== 'number' || typeof err.detail['block'] !== 'number') return err;
  const r = err.detail['row'];
  const x = blocks.find((b) => b.at === err.detail!['block']);
  if (x === undefined || r < 0 || r >= x.n) return err;
  return rowError(err, x.origins.where(r), String(err.detail['key'] ?? ''), 'load');
}

/** A refusal of one row, told by where it came from (a repeated key is the data's fault, not a replica's). */
function rowError(err: KvError, where: string, key: string, what: 'delta' | 'load'): KvError {
  if (err.code === KvErrorCode.DUPLICATE_KEY && key !== '') {
    return new KvError(KvErrorCode.DUPLICATE_KEY, `${where}: key ${key} is repeated within this ${what}`, { cause: err });
  }
  return new KvError(err.code, `${where}: ${err.message}`, { cause: err });
}

/** A replica's refusal of a batch row, told as the file and row the row came from. */
function explainRowError(err: unknown, b: Batch, what: 'delta' | 'load'): unknown {
  if (!(err instanceof KvError) || err.detail === undefined || typeof err.detail['row'] !== 'number') return err;
  // The replica numbers upserts first, then deletes.
  const r = err.detail['row'];
  if (r < 0 || r >= b.n + b.nd) return err;
  const at = r < b.n ? r : b.size + (r - b.n);
  const key = r < b.n ? keyAt(b.keys, r) : keyAt(b.deletes, r - b.n);
  return rowError(err, b.origins.where(at), String(key), what);
}
