import * as grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument, toGrpcError } from '../common/errors.js';
import { bytesOf, floatsFromBytes, keyAt, keysFromBytes, repeatedKey } from '../common/keys.js';
import { ORDER_SCALE } from '../common/limits.js';
import { partitionOfHalves } from '../cluster/partition.js';
import type { Manifest } from '../cluster/manifest.js';
import { YoungGcBudget } from '../common/process-tuning.js';
import { AnswerBufferPool } from '../transport/answer-pool.js';
import { installZeroCopyFraming, streamOf } from '../transport/grpc-patches.js';
import { SERVER_OPTIONS } from '../transport/options.js';
import { type LookupRequest } from '../wire/lookup.js';
import { decoded, embkvServerService, shardControlService } from '../wire/services.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { Shard } from '../shard/shard.js';
import { PeerSync } from './peer-sync.js';
import { type TokenAuth, checkProtectedMode, serverCredentials, tokenAuthOf } from '../cluster/security.js';
import { ShardStore } from '../shard/store.js';

export interface ReplicaOptions {
  manifest: Manifest;
  group: number;
  replica: number;
  dataDir: string;
  logger: Logger;
  /** Listen here instead of the manifest's address (tests). */
  listenAddress?: string;
  /** How far ahead of this replica's clock a put's write order may be (default DEFAULT_MAX_PUT_SKEW_MS). */
  maxPutSkewMs?: number;
  /** Bytes of answers not yet sent beyond which lookups are refused (default DEFAULT_REPLICA_MAX_INFLIGHT_BYTES). */
  maxInflightBytes?: number;
  /** Allow a non-loopback address without security (protected mode, README: Security). */
  insecure?: boolean;
}

/**
 * A put stamped further ahead than this is refused: a later put of the same key, stamped by a writer
 * with a correct clock, would otherwise lose to it until its stamp came round.
 */
export const DEFAULT_MAX_PUT_SKEW_MS = 5000;

/**
 * A replica refuses lookups with KV_RESOURCE_EXHAUSTED while its answers not yet sent hold this much
 * (clients that do not read, or a burst larger than the network drains): at most this plus one answer.
 */
export const DEFAULT_REPLICA_MAX_INFLIGHT_BYTES = 512 * 1024 * 1024;

type State = 'new' | 'opening' | 'open' | 'closing' | 'closed';

/** The longest a stop waits for calls in flight: each is waited for up to its own deadline, at most this. */
export const DEFAULT_DRAIN_MS = 10_000;

/**
 * One shard replica process: restores its tables from its own disk, then serves Lookup, the control
 * RPCs of the loader and operators, and grpc.health.v1.
 */
export class ReplicaServer {
  private state: State = 'new';
  private readonly server = new grpc.Server(SERVER_OPTIONS);
  private readonly store: ShardStore;
  private readonly shard: Shard;
  private readonly health = new HealthImplementation({ '': 'NOT_SERVING' });
  private readonly log: Logger;
  private readonly address: string;
  private readonly startedMs = Date.now();
  private boundPort = 0;
  private readonly peerSync: PeerSync;
  private readonly answers = new AnswerBufferPool();
  /**
   * A minor GC every 1 MiB of lookup garbage (a 19k-key call leaves ~300 KB). Measured against 2, 4
   * and 16 MiB and none (bench/RESULTS.md): the garbage a budget lets build up stays resident, 1 MiB
   * rather than 4 took ~45 MB off 8 replicas, for no CPU measurable above the noise.
   */
  private readonly youngGc = new YoungGcBudget(2 ** 20);
  /** Calls admitted and not yet answered, with their deadlines (ms since the epoch; Infinity for none). */
  private readonly inFlight = new Map<object, number>();
  private drained: (() => void) | undefined;
  /** Set when a call's stream could not be watched: a stop then gives answers a moment to leave. */
  private untracked = false;
  private heldLoad = false;
  /** Bytes of lookup answers handed to grpc-js whose streams have not closed yet. */
  private answerBytes = 0;
  private readonly maxInflightBytes: number;
  /** Token checks when the manifest names a tokens file; undefined: every call is let in. */
  private readonly auth: TokenAuth | undefined;

  constructor(private readonly options: ReplicaOptions) {
    const { manifest, group, replica } = options;
    const g = manifest.groups[group];
    if (g === undefined) throw invalidArgument(`group ${group} is not in the manifest (it has ${manifest.groups.length} groups)`);
    const addr = g.replicas[replica];
    if (addr === undefined) throw invalidArgument(`replica ${replica} is not in group ${group} (it has ${g.replicas.length} replicas)`);
    this.address = options.listenAddress ?? addr;
    this.maxInflightBytes = options.maxInflightBytes ?? DEFAULT_REPLICA_MAX_INFLIGHT_BYTES;
    checkProtectedMode(manifest.security, this.address, options.insecure === true, `replica ${group}/${replica}`);
    this.log = options.logger.child({ component: 'replica', group, replica });
    this.auth = tokenAuthOf(manifest);
    if (this.auth === undefined && manifest.security?.tls !== undefined) this.log.warn('TLS without a tokens file: anyone who can reach this port may call every method');
    if (this.auth !== undefined && manifest.security?.tls === undefined) this.log.warn('tokens without TLS: tokens cross the network in plain text');
    this.store = new ShardStore(options.dataDir);
    this.shard = new Shard(this.store, { keepVersions: manifest.keepVersions, logger: this.log });
    const peers = g.replicas.filter((_, i) => i !== replica);
    this.peerSync = new PeerSync(this.shard, peers, this.log, manifest.security, () => this.auth?.adminTokens() ?? []);
  }

  get port(): number {
    return this.boundPort;
  }

  /**
   * Re-reads the tokens file (kvctl serve does on SIGHUP). An invalid file is refused and the tokens
   * in force stay; returns the number of tokens now in force, or undefined without a tokens file.
   */
  reloadTokens(): number | undefined {
    return this.auth?.reload(this.log);
  }

  async start(): Promise<void> {
    if (this.state !== 'new') throw new KvError(KvErrorCode.CLOSED, `replica is ${this.state}`);
    this.state = 'opening';
    await this.store.open();
    await this.shard.restore();
    // Answers leave from their pooled buffers, not from a copy per call (see installZeroCopyFraming).
    if (!installZeroCopyFraming()) this.log.warn('this grpc-js frames messages differently: answers are copied into frames');
    this.server.addService(embkvServerService(this.answers), { lookup: (TEST_FAULTS ? this.onLookupWithTestFaults : this.onLookup).bind(this) });
    this.server.addService(shardControlService(), this.controlHandlers());
    warmCodecs(shardControlService());
    this.health.addToServer(this.server);
    this.boundPort = await new Promise<number>((resolve, reject) => {
      this.server.bindAsync(this.address, serverCredentials(this.options.manifest.security), (err, port) => (err ? reject(err) : resolve(port)));
    });
    // Peers can pull from this replica now; it answers lookups only once it has caught up on the
    // real-time puts it missed while it was down.
    await this.peerSync.catchUp();
    this.peerSync.start();
    this.health.setStatus('', 'SERVING');
    this.state = 'open';
    this.log.info({ address: this.address, port: this.boundPort, data: this.options.dataDir }, 'serving');
  }

  /**
   * Stops: refuses new calls with KV_UNAVAILABLE at once, lets the calls in flight finish (each up to
   * its deadline, all within `drainMs`), then closes every connection and the store. Idle, this takes
   * milliseconds: connections that peers and clients hold open are closed, not waited for.
   */
  async close(drainMs = DEFAULT_DRAIN_MS): Promise<void> {
    if (this.state === 'closed' || this.state === 'closing') return;
    this.state = 'closing';
    this.peerSync.stop();
    this.health.setStatus('', 'NOT_SERVING');
    const waiting = this.inFlight.size;
    let forced = 0;
    if (waiting > 0) {
      // A little past the last deadline, so that a call ends by its own deadline (DEADLINE_EXCEEDED
      // to its caller) rather than by the stop.
      const latest = Math.min(Date.now() + drainMs, Math.max(...this.inFlight.values()) + DEADLINE_MARGIN_MS);
      this.log.info({ calls: waiting, waitMs: Math.max(0, latest - Date.now()) }, 'draining calls in flight');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(0, latest - Date.now()));
        this.drained = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.drained = undefined;
      forced = this.inFlight.size;
    }
    if (this.untracked) await new Promise<void>((resolve) => setTimeout(resolve, UNTRACKED_FLUSH_MS).unref());
    this.server.forceShutdown();
    await this.store.close();
    this.state = 'closed';
    this.log.info({ drained: waiting - forced, cut: forced }, 'stopped');
  }

  /**
   * Admits a call: refused once the replica stops (or, for lookups, before it serves). It counts as in
   * flight until its HTTP/2 stream closes, that is until its answer has left, so a stop cuts no answer
   * half-sent.
   */
  private admit(call: grpc.ServerUnaryCall<unknown, unknown>, what: 'lookup' | 'control', method: string): void {
    // The token first: a caller without one learns nothing of the replica's state.
    this.auth?.check(call.metadata, method);
    if (this.state !== 'open' && !(what === 'control' && this.state === 'opening')) {
      const why = this.state === 'opening' ? 'catching up' : this.state === 'closing' ? 'shutting down' : this.state;
      throw new KvError(KvErrorCode.UNAVAILABLE, `replica is ${why}`);
    }
    const d = call.getDeadline();
    const at = d instanceof Date ? d.getTime() : d;
    this.inFlight.set(call, Number.isFinite(at) && at > 0 ? at : Infinity);
    const stream = streamOf(call);
    if (stream !== undefined) stream.once('close', () => this.finished(call));
    else this.untracked = true;
  }

  /** A call's answer has left (or, where grpc-js hides its stream, has been handed to grpc-js). */
  private finished(call: object): void {
    if (!this.inFlight.delete(call)) return;
    if (this.inFlight.size === 0) this.drained?.();
  }

  private onLookup(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    try {
      checkRequest(call.request);
      this.admit(call, 'lookup', 'Lookup');
    } catch (err) {
      return callback(toGrpcError(err));
    }
    this.lookup(call, callback);
    if (this.untracked) this.finished(call);
  }

  private lookup(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    try {
      const req = call.request;
      const keys = keysFromBytes(req.keys);
      if (this.answerBytes > 0 && this.answerBytes >= this.maxInflightBytes) {
        throw new KvError(KvErrorCode.RESOURCE_EXHAUSTED, `this replica holds ${this.answerBytes} bytes of answers not yet sent; the limit is ${this.maxInflightBytes} (kvctl serve --max-inflight-mb): retry on another replica or with backoff`);
      }
      const answer = this.shard.lookup(req.table, req.version, keys, this.answers);
      // Held until the answer has left (its stream closes); without a stream to watch, until handed over.
      const bytes = answer.length;
      const stream = streamOf(call);
      if (stream !== undefined) {
        this.answerBytes += bytes;
        stream.once('close', () => void (this.answerBytes -= bytes));
      }
      callback(null, answer);
      // The request's message and its HTTP/2 read buffers are garbage now (see YoungGcBudget).
      this.youngGc.spend(2 * req.keys.byteLength);
    } catch (err) {
      callback(toGrpcError(err));
    }
  }

  // ---- test fault switch (only with EMBKV_TEST_FAULTS=1) ----
  /** Lookup with the delay that the request's `embkv-test-delay-ms` metadata asks of this replica. */
  private onLookupWithTestFaults(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    const delayMs = testDelayMs(call.metadata, this.options.group, this.options.replica);
    if (delayMs === 0) return this.onLookup(call, callback);
    try {
      checkRequest(call.request);
      this.admit(call, 'lookup', 'Lookup');
    } catch (err) {
      return callback(toGrpcError(err));
    }
    this.log.info({ delayMs }, 'test switch: delaying a lookup');
    setTimeout(() => {
      this.lookup(call, callback);
      if (this.untracked) this.finished(call);
    }, delayMs).unref();
  }

  /**
   * With EMBKV_TEST_HOLD_LOAD=table:version:rows, the first row call that takes that load to `rows`
   * or more is never answered (once: a load that takes it over goes through).
   */
  private holdLoad(table: string, version: number, rows: number): Promise<never> | undefined {
    const hold = TEST_HOLD_LOAD;
    if (hold === undefined || this.heldLoad || hold.table !== table || hold.version !== version || rows < hold.rows) return undefined;
    this.heldLoad = true;
    this.log.info({ table, version, rows }, 'test switch: holding the load');
    return new Promise<never>(() => undefined);
  }
  // ---- end of test fault switch ----

  /**
   * What a writer's put must hold before this replica logs it: keys of this replica's group only (any
   * other would be logged and synced to its peers but never served), each once, and a write order
   * no further ahead of this replica's clock than maxPutSkewMs.
   */
  private checkPut(keys: Uint32Array, order: number): void {
    const { manifest, group } = this.options;
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
    const maxSkewMs = this.options.maxPutSkewMs ?? DEFAULT_MAX_PUT_SKEW_MS;
    const aheadMs = Math.floor(order / ORDER_SCALE) - Date.now();
    if (Number.isFinite(aheadMs) && aheadMs > maxSkewMs) {
      throw invalidArgument(`the put's write order is stamped ${aheadMs} ms ahead of this replica's clock; at most ${maxSkewMs} ms of clock skew is accepted (check the writer's clock)`);
    }
  }

  private controlHandlers(): grpc.UntypedServiceImplementation {
    const unary = <Req, Res>(fn: (req: Req) => Promise<Res> | Res) =>
      (call: grpc.ServerUnaryCall<Req, Res>, callback: grpc.sendUnaryData<Res>): void => {
        try {
          checkRequest(call.request);
          // A stopping replica refuses new calls with a clear answer, and waits for those it took.
          this.admit(call, 'control', methodOf(call));
        } catch (err) {
          return callback(toGrpcError(err));
        }
        Promise.resolve()
          .then(() => fn(call.request))
          .then((res) => callback(null, res), (err: unknown) => {
            if (!(err instanceof KvError)) this.log.error({ err }, 'control call failed');
            callback(toGrpcError(err));
          })
          .finally(() => {
            if (this.untracked) this.finished(call);
          });
      };
    return {
      LoadBegin: unary(async (r: { table: string; version: number; dim: number; loadId: string; force: boolean; incremental: boolean; expectedRows: number; startedAtMs: number }) => {
        const b = await this.shard.loadBegin({ ...r, version: checkVersion(r.version) });
        return { currentVersion: b.current, baseVersion: b.base, stageDir: this.shard.stageDir };
      }),
      LoadStage: unary(async (r: { table: string; version: number; loadId: string; path: string; probePath: string; token: Buffer }) =>
        this.shard.loadStage({ ...r, version: checkVersion(r.version) })),
      LoadRowsFrom: unary(async (r: { table: string; version: number; loadId: string; at: number; bytes: number }) => {
        const rows = await this.shard.loadRowsFrom({ ...r, version: checkVersion(r.version) });
        return (TEST_FAULTS && this.holdLoad(r.table, r.version, rows)) || { rows };
      }),
      LoadRows: unary(async (r: { table: string; version: number; loadId: string; keys: Buffer; values: Buffer; deletes: Buffer }) => {
        const rows = await this.shard.loadRows({
          table: r.table, version: r.version, loadId: r.loadId, keys: keysFromBytes(r.keys), values: floatsFromBytes(r.values), deletes: keysFromBytes(r.deletes, 'deletes'),
        });
        return (TEST_FAULTS && this.holdLoad(r.table, r.version, rows)) || { rows };
      }),
      Put: unary(async (r: { table: string; keys: Buffer; values: Buffer; order: number; writer: string }) => {
        const keys = keysFromBytes(r.keys);
        this.checkPut(keys, r.order);
        return { seq: await this.shard.put({ table: r.table, keys, values: floatsFromBytes(r.values), order: r.order, writer: r.writer }) };
      }),
      PutsSince: unary(async (r: { afterSeq: number; maxBatches: number }) => {
        const { batches, last } = await this.shard.putsSince(r.afterSeq, r.maxBatches || 256);
        return {
          lastSeq: last,
          batches: batches.map((b) => ({ seq: b.seq, table: b.table, order: b.order, writer: b.writer, keys: bytesOf(b.keys), values: bytesOf(b.values) })),
        };
      }),
      LoadSeal: unary(async (r: { table: string; version: number; loadId: string; expectedRows: number }) => ({
        rows: await this.shard.loadSeal({ table: r.table, version: r.version, loadId: r.loadId, expectedOps: r.expectedRows }),
      })),
      LoadAbort: unary(async (r: { table: string; version: number; loadId: string }) => {
        await this.shard.loadAbort(r.table, r.version, r.loadId);
        return {};
      }),
      Publish: unary(async (r: { table: string; version: number; rollback: boolean }) => ({
        previousVersion: await this.shard.publish(r.table, r.version, r.rollback),
      })),
      Drop: unary(async (r: { table: string; version: number }) => ({
        dropped: await this.shard.dropVersion(r.table, r.version),
      })),
      Status: unary(() => {
        const mem = process.memoryUsage();
        return {
          group: this.options.group,
          replica: this.options.replica,
          address: this.address,
          uptimeMs: Date.now() - this.startedMs,
          rssBytes: mem.rss,
          heapUsedBytes: mem.heapUsed,
          tables: this.shard.status(),
          pid: process.pid,
        };
      }),
    };
  }
}

/**
 * Before any other work, the token check included: a request the decoder refused, or a table name
 * past its length, is answered INVALID_ARGUMENT with a bounded message and costs nothing more.
 */
function checkRequest(request: unknown): void {
  const table = (decoded(request) as { table?: unknown }).table;
  if (table !== undefined) checkTableName(table);
}

/** A stop waits this long past the last deadline of the calls in flight. */
const DEADLINE_MARGIN_MS = 250;

/** The method of a call ("/embkv.v1.ShardControl/LoadBegin" gives "LoadBegin"), for the role check. */
function methodOf(call: grpc.ServerUnaryCall<unknown, unknown>): string {
  const path = call.getPath();
  return path.slice(path.lastIndexOf('/') + 1);
}

/** How long a stop waits for answers to leave when grpc-js does not show a call's stream. */
const UNTRACKED_FLUSH_MS = 500;

/**
 * protobufjs compiles each message type's codec on first use: ~10-15 ms per replica on the first
 * load after a start, inside that load. Compiled here, before the replica serves.
 */
function warmCodecs(service: grpc.ServiceDefinition): void {
  for (const m of Object.values(service)) {
    try {
      m.requestDeserialize(Buffer.alloc(0));
      m.responseSerialize({});
    } catch {
      // A hand codec that refuses an empty message has nothing to compile.
    }
  }
}

// ---- test fault switch ----
/**
 * Like grpc-js tests' `respond-with-status`: a replica started with EMBKV_TEST_FAULTS=1 delays a Lookup
 * by the request's `embkv-test-delay-ms` metadata: "300" on every replica, or "g0r0=300,g1r1=50" on
 * the replicas listed. Without the variable the metadata is ignored.
 */
const TEST_FAULTS = process.env['EMBKV_TEST_FAULTS'] === '1';
export const TEST_DELAY_METADATA = 'embkv-test-delay-ms';

/**
 * EMBKV_TEST_HOLD_LOAD=table:version:rows (with EMBKV_TEST_FAULTS=1): the load call that brings that
 * version's write version to `rows` rows or more gets no answer, so a test can fault a load midway.
 */
const TEST_HOLD_LOAD = ((): { table: string; version: number; rows: number } | undefined => {
  const m = /^([^:]+):(\d+):(\d+)$/.exec(TEST_FAULTS ? (process.env['EMBKV_TEST_HOLD_LOAD'] ?? '') : '');
  return m ? { table: m[1]!, version: Number(m[2]), rows: Number(m[3]) } : undefined;
})();

function testDelayMs(metadata: grpc.Metadata, group: number, replica: number): number {
  const v = metadata.get(TEST_DELAY_METADATA)[0];
  if (typeof v !== 'string') return 0;
  if (/^\d+$/.test(v)) return Number(v);
  for (const part of v.split(',')) {
    const m = /^g(\d+)r(\d+)=(\d+)$/.exec(part.trim());
    if (m && Number(m[1]) === group && Number(m[2]) === replica) return Number(m[3]);
  }
  return 0;
}
// ---- end of test fault switch ----
