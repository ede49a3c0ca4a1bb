import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { KvError, invalidArgument, toGrpcError } from '../common/errors.js';
import { bytesOf, floatsFromBytes, keyAt, keysFromBytes, repeatedKey } from '../common/keys.js';
import { ORDER_SCALE } from '../common/limits.js';
import { checkVersion } from '../common/validate.js';
import type { Manifest } from '../cluster/manifest.js';
import { partitionOfHalves } from '../cluster/partition.js';
import type { Shard } from '../shard/shard.js';
import type { LoadHold } from './test-faults.js';

/**
 * A put stamped further ahead than this is refused: a later put of the same key, stamped by a writer
 * with a correct clock, would otherwise lose to it until its stamp came round.
 */
export const DEFAULT_MAX_PUT_SKEW_MS = 5000;

/** What the ShardControl handlers need of the replica that serves them. */
export interface ControlContext {
  shard: Shard;
  log: Logger;
  manifest: Manifest;
  group: number;
  maxPutSkewMs: number | undefined;
  hold: LoadHold;
  /** Checks the request and admits the call (token, replica state), or throws. */
  admit(call: grpc.ServerUnaryCall<unknown, unknown>): void;
  /** The call is answered (for calls whose stream could not be watched). */
  answered(call: grpc.ServerUnaryCall<unknown, unknown>): void;
  /** This replica's part of a Status answer (all but its tables and memory). */
  identity(): { group: number; replica: number; address: string; uptimeMs: number };
}

/** The ShardControl service of a replica: the loader's and operators' calls, each admitted first. */
export function controlHandlers(ctx: ControlContext): grpc.UntypedServiceImplementation {
  const { shard, hold } = ctx;
  const unary = <Req, Res>(fn: (req: Req) => Promise<Res> | Res) =>
    (call: grpc.ServerUnaryCall<Req, Res>, callback: grpc.sendUnaryData<Res>): void => {
      try {
        // A stopping replica refuses new calls with a clear answer, and waits for those it took.
        ctx.admit(call);
      } catch (err) {
        return callback(toGrpcError(err));
      }
      Promise.resolve()
        .then(() => fn(call.request))
        .then((res) => callback(null, res), (err: unknown) => {
          if (!(err instanceof KvError)) ctx.log.error({ err }, 'control call failed');
          callback(toGrpcError(err));
        })
        .finally(() => ctx.answered(call));
    };
  return {
    LoadBegin: unary(async (r: { table: string; version: number; dim: number; loadId: string; force: boolean; incremental: boolean; expectedRows: number; startedAtMs: number; snapshotAtMs: number }) => {
      const b = await shard.loadBegin({ ...r, version: checkVersion(r.version) });
      return { currentVersion: b.current, baseVersion: b.base, stageDir: shard.stageDir };
    }),
    LoadStage: unary(async (r: { table: string; version: number; loadId: string; path: string; probePath: string; token: Buffer }) =>
      shard.loadStage({ ...r, version: checkVersion(r.version) })),
    LoadRowsFrom: unary(async (r: { table: string; version: number; loadId: string; at: number; bytes: number }) => {
      const rows = await shard.loadRowsFrom({ ...r, version: checkVersion(r.version) });
      return hold.check(r.table, r.version, rows) || { rows };
    }),
    LoadRows: unary(async (r: { table: string; version: number; loadId: string; keys: Buffer; values: Buffer; deletes: Buffer }) => {
      const rows = await shard.loadRows({
        table: r.table, version: r.version, loadId: r.loadId, keys: keysFromBytes(r.keys), values: floatsFromBytes(r.values), deletes: keysFromBytes(r.deletes, 'deletes'),
      });
      return hold.check(r.table, r.version, rows) || { rows };
    }),
    Put: unary(async (r: { table: string; keys: Buffer; values: Buffer; order: number; writer: string }) => {
      const keys = keysFromBytes(r.keys);
      checkPut(ctx, keys, r.order);
      return { seq: await shard.put({ table: r.table, keys, values: floatsFromBytes(r.values), order: r.order, writer: r.writer }) };
    }),
    PutsSince: unary(async (r: { afterSeq: number; maxBatches: number }) => {
      const { batches, last } = await shard.putsSince(r.afterSeq, r.maxBatches || 256);
      return {
        lastSeq: last,
        batches: batches.map((b) => ({ seq: b.seq, table: b.table, order: b.order, writer: b.writer, keys: bytesOf(b.keys), values: bytesOf(b.values) })),
      };
    }),
    LoadSeal: unary(async (r: { table: string; version: number; loadId: string; expectedRows: number }) => ({
      rows: await shard.loadSeal({ table: r.table, version: r.version, loadId: r.loadId, expectedOps: r.expectedRows }),
    })),
    LoadAbort: unary(async (r: { table: string; version: number; loadId: string }) => {
      await shard.loadAbort(r.table, r.version, r.loadId);
      return {};
    }),
    Publish: unary(async (r: { table: string; version: number; rollback: boolean }) => ({
      previousVersion: await shard.publish(r.table, r.version, r.rollback),
    })),
    Drop: unary(async (r: { table: string; version: number }) => ({
      dropped: await shard.dropVersion(r.table, r.version),
    })),
    Status: unary(() => {
      const mem = process.memoryUsage();
      return {
        ...ctx.identity(),
        rssBytes: mem.rss,
        heapUsedBytes: mem.heapUsed,
        tables: shard.status(),
        pid: process.pid,
        watchers: shard.watcherNotes(),
      };
    }),
    SetWatcherNote: unary(async (r: { table: string; watcher: string; source: string; atMs: number; action: string; error: string; errorAtMs: number }) => {
      await shard.setWatcherNote(r);
      return {};
    }),
  };
}

/**
 * What a writer's put must hold before this replica logs it: keys of this replica's group only (any
 * other would be logged and synced to its peers but never served), each once, and a write order
 * no further ahead of this replica's clock than maxPutSkewMs.
 */
function checkPut(ctx: ControlContext, keys: Uint32Array, order: number): void {
  const { manifest, group } = ctx;
  const groups = manifest.groups.length;
  for (let i = 0; i < keys.length / 2; i++) {
    const p = partitionOfHalves(keys[2 * i]!, keys[2 * i + 1]!, manifest.partitions);
    if (p % groups !== group) {
      throw invalidArgument(`key ${keyAt(keys, i)} (row ${i} of the put) is in partition ${p} of shard group ${p % groups}, not of this replica's group ${group}; the SDK and the router send each key to its own group`);
    }
  }
  const dup = repeatedKey(keys);
  if (dup !== undefined) {
    throw invalidArgument(`key ${dup.key} appears twice in one put (rows ${dup.first} and ${dup.second}); a put, like a load, takes each key once`);
  }
  const maxSkewMs = ctx.maxPutSkewMs ?? DEFAULT_MAX_PUT_SKEW_MS;
  const aheadMs = Math.floor(order / ORDER_SCALE) - Date.now();
  if (Number.isFinite(aheadMs) && aheadMs > maxSkewMs) {
    throw invalidArgument(`the put's write order is stamped ${aheadMs} ms ahead of this replica's clock; at most ${maxSkewMs} ms of clock skew is accepted (check the writer's clock)`);
  }
}
