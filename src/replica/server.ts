import * as grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument, toGrpcError } from '../common/errors.js';
import { keysFromBytes } from '../common/keys.js';
import type { Manifest } from '../cluster/manifest.js';
import { YoungGcBudget } from '../common/process-tuning.js';
import { AnswerBufferPool } from '../transport/answer-pool.js';
import { installZeroCopyFraming, streamOf } from '../transport/grpc-patches.js';
import { SERVER_OPTIONS } from '../transport/options.js';
import { type LookupRequest } from '../wire/lookup.js';
import { decoded, embkvServerService, shardControlService } from '../wire/services.js';
import { checkTableName } from '../common/validate.js';
import { Shard } from '../shard/shard.js';
import { CallsInFlight, DEFAULT_DRAIN_MS } from './admission.js';
import { controlHandlers } from './control.js';
import { PeerSync } from './peer-sync.js';
import { LoadHold, TEST_FAULTS, testDelayMs } from './test-faults.js';
import { type TokenAuth, checkProtectedMode, serverCredentials, tokenAuthOf } from '../cluster/security.js';
import { ShardStore } from '../shard/store.js';
import { TableCounters } from '../common/request-counters.js';
import type { TableStatusInfo } from '../shard/status.js';
import type { MetricSet } from '../metrics/registry.js';
import { registerReplicaMetrics } from '../metrics/replica-metrics.js';
import { FileSource, type ClusterSource, type Registration, type SourceEvent } from '../cluster/source.js';

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
  /**
   * An opened cluster source (default: the manifest alone). With etcd, the replica registers the
   * address it listens on under a lease once it serves, follows its peers' addresses, and makes
   * current whatever version each table's key in etcd names.
   */
  source?: ClusterSource;
}

export { DEFAULT_DRAIN_MS } from './admission.js';
export { DEFAULT_MAX_PUT_SKEW_MS } from './control.js';
export { TEST_DELAY_METADATA } from './test-faults.js';

/**
 * A replica refuses lookups with KV_RESOURCE_EXHAUSTED while its answers not yet sent hold this much
 * (clients that do not read, or a burst larger than the network drains): at most this plus one answer.
 */
export const DEFAULT_REPLICA_MAX_INFLIGHT_BYTES = 512 * 1024 * 1024;

type State = 'new' | 'opening' | 'open' | 'closing' | 'closed';

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
  private readonly calls = new CallsInFlight();
  private readonly hold: LoadHold;
  /** Bytes of lookup answers handed to grpc-js whose streams have not closed yet. */
  private answerBytes = 0;
  private readonly maxInflightBytes: number;
  /** Token checks when the manifest names a tokens file; undefined: every call is let in. */
  private readonly auth: TokenAuth | undefined;
  /** Lookups answered per table, and refused by code: read by src/metrics at a scrape. */
  readonly lookups = new TableCounters();
  readonly lookupErrors = new Map<string, number>();
  private readonly source: ClusterSource;
  private registration: Registration | undefined;
  private unsubscribe: (() => void) | undefined;
  /** Versions the source made current, applied one after another in the order the source gave them. */
  private following: Promise<unknown> = Promise.resolve();

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
    this.hold = new LoadHold(this.log);
    this.auth = tokenAuthOf(manifest);
    if (this.auth === undefined && manifest.security?.tls !== undefined) this.log.warn('TLS without a tokens file: anyone who can reach this port may call every method');
    if (this.auth !== undefined && manifest.security?.tls === undefined) this.log.warn('tokens without TLS: tokens cross the network in plain text');
    this.store = new ShardStore(options.dataDir);
    this.shard = new Shard(this.store, { keepVersions: manifest.keepVersions, logger: this.log });
    this.source = options.source ?? FileSource.of(manifest);
    const peers = g.replicas.map((_, i) => ({ replica: i, address: this.source.address(group, i) })).filter((p) => p.replica !== replica);
    this.peerSync = new PeerSync(this.shard, peers, this.log, manifest.security, () => this.auth?.adminTokens() ?? []);
  }

  get port(): number {
    return this.boundPort;
  }

  /** True while grpc.health.v1 says SERVING (restored, caught up, not stopping). */
  serving(): boolean {
    return this.state === 'open';
  }

  /** Every table's versions and real-time state, as Status answers them. */
  tables(): TableStatusInfo[] {
    return this.shard.status();
  }

  answerBytesInFlight(): number {
    return this.answerBytes;
  }

  /** This replica's Prometheus series (src/metrics/replica-metrics.ts), read at each scrape. */
  registerMetrics(set: MetricSet): void {
    registerReplicaMetrics(set, this);
  }

  private countError(err: unknown): void {
    const code = err instanceof KvError ? err.code : KvErrorCode.INTERNAL;
    this.lookupErrors.set(code, (this.lookupErrors.get(code) ?? 0) + 1);
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
    this.unsubscribe = this.source.subscribe((e) => this.onSourceEvent(e));
    // What the source says is current wins over what this replica had on disk.
    for (const [table, version] of this.source.currentVersions()) this.follow(table, version);
    await this.following;
    // Answers leave from their pooled buffers, not from a copy per call (see installZeroCopyFraming).
    if (!installZeroCopyFraming()) this.log.warn('this grpc-js frames messages differently: answers are copied into frames');
    this.server.addService(embkvServerService(this.answers), { lookup: (TEST_FAULTS ? this.onLookupWithTestFaults : this.onLookup).bind(this) });
    this.server.addService(shardControlService(), controlHandlers({
      shard: this.shard, log: this.log, manifest: this.options.manifest, group: this.options.group, maxPutSkewMs: this.options.maxPutSkewMs, hold: this.hold,
      admit: (call) => {
        checkRequest(call.request);
        this.admit(call, 'control', methodOf(call));
      },
      answered: (call) => {
        if (this.calls.untracked) this.calls.finished(call);
      },
      identity: () => ({ group: this.options.group, replica: this.options.replica, address: this.address, uptimeMs: Date.now() - this.startedMs }),
    }));
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
    // The address clients reach it at: the one it listens on, with the port it was given for port 0.
    const advertised = `${this.address.slice(0, this.address.lastIndexOf(':'))}:${this.boundPort}`;
    this.registration = await this.source.register(this.options.group, this.options.replica, advertised, (e) => {
      if (e.kind === 'lost') this.log.warn({ address: advertised, err: e.reason }, 'registration lost; registering again as soon as the cluster source answers');
      else this.log.info({ address: advertised, source: this.source.name }, 'registration restored');
    });
    this.log.info({ address: this.address, port: this.boundPort, data: this.options.dataDir, source: this.source.name }, 'serving');
  }

  private onSourceEvent(e: SourceEvent): void {
    if (e.kind === 'current') this.follow(e.table, e.version);
    else if (e.group === this.options.group && e.replica !== this.options.replica) this.peerSync.setPeerAddress(e.replica, e.address);
  }

  /** Makes `version` of `table` current after the versions before it; a refusal is logged (the replica keeps serving what it has). */
  private follow(table: string, version: number): void {
    this.following = this.following.then(() => this.shard.follow(table, version)).then(
      (previous) => {
        if (previous !== version) this.log.info({ table, version, previous, source: this.source.name }, 'followed the current version');
      },
      (err: unknown) => this.log.warn({ table, version, err: (err as Error).message, source: this.source.name }, 'cannot make the current version of the cluster source current here'),
    );
  }

  /**
   * Stops: refuses new calls with KV_UNAVAILABLE at once, lets the calls in flight finish (each up to
   * its deadline, all within `drainMs`), then closes every connection and the store. Idle, this takes
   * milliseconds: connections that peers and clients hold open are closed, not waited for.
   */
  async close(drainMs = DEFAULT_DRAIN_MS): Promise<void> {
    if (this.state === 'closed' || this.state === 'closing') return;
    this.state = 'closing';
    this.unsubscribe?.();
    // Its registration goes first, so that clients stop choosing it before it refuses calls.
    await this.registration?.close().catch(() => undefined);
    this.peerSync.stop();
    this.health.setStatus('', 'NOT_SERVING');
    const { waiting, forced } = await this.calls.drain(drainMs, this.log);
    this.server.forceShutdown();
    await this.store.close();
    this.state = 'closed';
    this.log.info({ drained: waiting - forced, cut: forced }, 'stopped');
  }

  /**
   * Admits a call: refused once the replica stops (or, for lookups, before it serves). It counts as in
   * flight until its answer has left (CallsInFlight).
   */
  private admit(call: grpc.ServerUnaryCall<unknown, unknown>, what: 'lookup' | 'control', method: string): void {
    // The token first: a caller without one learns nothing of the replica's state.
    this.auth?.check(call.metadata, method);
    if (this.state !== 'open' && !(what === 'control' && this.state === 'opening')) {
      const why = this.state === 'opening' ? 'catching up' : this.state === 'closing' ? 'shutting down' : this.state;
      throw new KvError(KvErrorCode.UNAVAILABLE, `replica is ${why}`);
    }
    this.calls.add(call);
  }

  private onLookup(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    try {
      checkRequest(call.request);
      this.admit(call, 'lookup', 'Lookup');
    } catch (err) {
      this.countError(err);
      return callback(toGrpcError(err));
    }
    this.lookup(call, callback);
    if (this.calls.untracked) this.calls.finished(call);
  }

  private lookup(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    try {
      const req = call.request;
      const keys = keysFromBytes(req.keys);
      if (this.answerBytes > 0 && this.answerBytes >= this.maxInflightBytes) {
        throw new KvError(KvErrorCode.RESOURCE_EXHAUSTED, `this replica holds ${this.answerBytes} bytes of answers not yet sent; the limit is ${this.maxInflightBytes} (maxInflightBytes): retry on another replica or with backoff`);
      }
      const t0 = performance.now();
      const answer = this.shard.lookup(req.table, req.version, keys, this.answers);
      // Counted once the table is known to exist: a caller's made-up names never become labels.
      const counters = this.lookups.of(req.table);
      counters.requests++;
      counters.keys += keys.length / 2;
      counters.seconds.observe((performance.now() - t0) / 1000);
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
      this.countError(err);
      callback(toGrpcError(err));
    }
  }

  /** With EMBKV_TEST_FAULTS=1 (test-faults.ts): Lookup with the delay that the request's `embkv-test-delay-ms` metadata asks of this replica. */
  private onLookupWithTestFaults(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    const delayMs = testDelayMs(call.metadata, this.options.group, this.options.replica);
    if (delayMs === 0) return this.onLookup(call, callback);
    try {
      checkRequest(call.request);
      this.admit(call, 'lookup', 'Lookup');
    } catch (err) {
      this.countError(err);
      return callback(toGrpcError(err));
    }
    this.log.info({ delayMs }, 'test switch: delaying a lookup');
    setTimeout(() => {
      this.lookup(call, callback);
      if (this.calls.untracked) this.calls.finished(call);
    }, delayMs).unref();
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

/** The method of a call ("/embkv.v1.ShardControl/LoadBegin" gives "LoadBegin"), for the role check. */
function methodOf(call: grpc.ServerUnaryCall<unknown, unknown>): string {
  const path = call.getPath();
  return path.slice(path.lastIndexOf('/') + 1);
}

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
