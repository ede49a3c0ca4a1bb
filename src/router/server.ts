import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument, toGrpcError } from '../common/errors.js';
import { checkAnswerSize } from '../common/limits.js';
import { keysFromBytes } from '../common/keys.js';
import type { Manifest } from '../cluster/manifest.js';
import { checkTableName } from '../common/validate.js';
import { AUTHORIZATION, type TokenAuth, checkProtectedMode, serverCredentials, tokenAuthOf } from '../cluster/security.js';
import { releaseReceived } from '../transport/pooled-receive.js';
import { AnswerBufferPool } from '../transport/answer-pool.js';
import { installZeroCopyFraming, streamOf } from '../transport/grpc-patches.js';
import { SERVER_OPTIONS } from '../transport/options.js';
import { allocLookupResponse, type LookupRequest } from '../wire/lookup.js';
import { decoded, embkvServerService, UndecodableRequest } from '../wire/services.js';
import { Fanout } from '../fanout/fanout.js';
import { ClusterConnections } from '../cluster/connections.js';
import type { ClusterSource } from '../cluster/source.js';
import { parseReplicaPolicy, type ReplicaPolicyOptions } from '../cluster/policy.js';
import type { FanoutStats } from '../fanout/stats.js';
import { ROUTER_STATS_SERVICE } from './stats-service.js';
import type { MetricSet } from '../metrics/registry.js';
import { registerFanoutMetrics } from '../metrics/fanout-metrics.js';

export const DEFAULT_ROUTER_DEADLINE_MS = 5000;
/** At most this many keys a call, as the SDK takes by default. */
export const MAX_ROUTER_KEYS = 2_000_000;
/** Bytes the calls in flight may hold together (keys, the groups' answers, the merged answer). */
export const DEFAULT_MAX_INFLIGHT_BYTES = 1024 * 1024 * 1024;
/** The dim assumed for a table the router has not answered yet, to price a call. */
const UNSEEN_DIM = 64;

export interface RouterOptions {
  manifest: Manifest;
  /** An opened cluster source whose replica addresses and current versions the router follows (default: the manifest alone). */
  source?: ClusterSource;
  host: string;
  port: number;
  logger: Logger;
  /** Deadline of a request whose caller set none. */
  deadlineMs?: number;
  /** Replica choice, hedging and probes, as in the SDK (validated by parseReplicaPolicy). */
  policy?: ReplicaPolicyOptions;
  /** Logs the per-group stats this often (0: never). They are also served by `/embkv.v1.Router/Stats`. */
  statsIntervalMs?: number;
  /** Allow a non-loopback host without security (protected mode, README: Security). */
  insecure?: boolean;
  /** Bytes the calls in flight may hold together; a call beyond it is refused with KV_RESOURCE_EXHAUSTED. */
  maxInflightBytes?: number;
}

export const DEFAULT_ROUTER_STATS_INTERVAL_MS = 0;

/** RouterOptions with the defaults filled in. */
interface ResolvedRouterOptions {
  deadlineMs: number;
  policy: ReturnType<typeof parseReplicaPolicy>;
  statsIntervalMs: number;
  insecure: boolean;
  maxInflightBytes: number;
}

/** Merges RouterOptions with the exported defaults and validates them, in one place. */
export function parseRouterOptions(o: RouterOptions): ResolvedRouterOptions {
  const positive = (v: number, name: string, min: number): number => {
    if (!Number.isSafeInteger(v) || v < min) throw invalidArgument(`${name} must be an integer >= ${min}, got ${v}`);
    return v;
  };
  return {
    deadlineMs: positive(o.deadlineMs ?? DEFAULT_ROUTER_DEADLINE_MS, 'deadlineMs', 1),
    policy: parseReplicaPolicy((o.policy ?? {}) as Record<string, unknown>),
    statsIntervalMs: positive(o.statsIntervalMs ?? DEFAULT_ROUTER_STATS_INTERVAL_MS, 'statsIntervalMs', 0),
    insecure: o.insecure === true,
    maxInflightBytes: positive(o.maxInflightBytes ?? DEFAULT_MAX_INFLIGHT_BYTES, 'maxInflightBytes', 1),
  };
}

/**
 * The router endpoint: the same Embkv.Lookup service as a replica, for any keys. It fans out exactly
 * like the SDK and writes the merged answer straight into the response buffer.
 */
export class RouterServer {
  private readonly server = new grpc.Server(SERVER_OPTIONS);
  private readonly fanout: Fanout;
  private readonly log: Logger;
  private boundPort = 0;
  private statsTimer: NodeJS.Timeout | undefined;
  /** Answer buffers, reused once their stream closes: a 150k-key answer at dim 32 is 19 MB. */
  private readonly answers = new AnswerBufferPool();
  /** What the calls in flight hold, by the price each was admitted at; released when its stream closes. */
  private inflightBytes = 0;
  private readonly resolved: ResolvedRouterOptions;
  private closing = false;
  private drained: (() => void) | undefined;
  /** The dim each table answered with last, to price the next call of it. */
  private readonly dims = new Map<string, number>();

  /**
   * The router checks its callers' tokens against the manifest's tokens file, and forwards the
   * caller's authorization to the replicas, which check it again: a caller can do through the router
   * exactly what it could do directly, and the router holds no credential of its own.
   */
  private readonly auth: TokenAuth | undefined;

  constructor(private readonly options: RouterOptions) {
    this.resolved = parseRouterOptions(options);
    checkProtectedMode(options.manifest.security, `${options.host}:${options.port}`, this.resolved.insecure, 'the router');
    const conns = options.source === undefined ? undefined : ClusterConnections.of(options.source);
    this.fanout = new Fanout(options.manifest, conns, this.resolved.policy);
    this.log = options.logger.child({ component: 'router' });
    this.auth = tokenAuthOf(options.manifest);
  }

  /** Re-reads the tokens file (kvctl router does on SIGHUP); see ReplicaServer.reloadTokens. */
  reloadTokens(): number | undefined {
    return this.auth?.reload(this.log);
  }

  get port(): number {
    return this.boundPort;
  }

  async start(): Promise<void> {
    // Answers leave from their pooled buffers, as a replica's do (see installZeroCopyFraming).
    if (!installZeroCopyFraming()) this.log.warn('this grpc-js frames messages differently: answers are copied into frames');
    this.server.addService(embkvServerService(this.answers), { lookup: this.onLookup.bind(this) });
    this.server.addService(ROUTER_STATS_SERVICE, {
      stats: (call: grpc.ServerUnaryCall<unknown, FanoutStats>, cb: grpc.sendUnaryData<FanoutStats>) => {
        try {
          this.auth?.check(call.metadata, 'Stats');
        } catch (err) {
          return cb(toGrpcError(err));
        }
        cb(null, this.fanout.stats());
      },
    });
    const addr = this.options.host.includes(':') ? `[${this.options.host}]:${this.options.port}` : `${this.options.host}:${this.options.port}`;
    this.boundPort = await new Promise<number>((resolve, reject) =>
      this.server.bindAsync(addr, serverCredentials(this.options.manifest.security), (err, port) => (err ? reject(err) : resolve(port))),
    );
    this.log.info({ host: this.options.host, port: this.boundPort, groups: this.options.manifest.groups.length }, 'router serving');
    if (this.resolved.statsIntervalMs > 0) {
      this.statsTimer = setInterval(() => this.logStats(), this.resolved.statsIntervalMs);
      this.statsTimer.unref();
    }
  }

  stats(): FanoutStats {
    return this.fanout.stats();
  }

  /** The router's Prometheus series: the fan-out's (as the SDK's), and what its calls in flight hold. */
  registerMetrics(set: MetricSet): void {
    registerFanoutMetrics(set, this.fanout);
    set.gauge('embkv_router_inflight_bytes', 'Bytes the router\'s calls in flight hold, by their admission price (bounded by --max-inflight-mb).', [],
      () => [[{}, this.inflightBytes]]);
  }

  /** One line per group with traffic: requests, hedges, retries, failures, p50/p99. */
  private logStats(): void {
    const s = this.fanout.stats();
    const groups = s.groups.filter((g) => g.requests > 0).map((g) => ({
      group: g.group, requests: g.requests, hedgesSent: g.hedgesSent, hedgesWon: g.hedgesWon, hedgesThrottled: g.hedgesThrottled,
      retries: g.retries, failures: g.failures, p50Ms: g.latencyMs.p50, p99Ms: g.latencyMs.p99,
      down: g.replicas.filter((r) => r.health === 'down').map((r) => r.address),
    }));
    this.log.info({ requests: s.requests, failures: s.failures, p50Ms: s.latencyMs.p50, p99Ms: s.latencyMs.p99, groups }, 'router stats');
  }

  /**
   * Stops as a replica does: new calls are refused with KV_UNAVAILABLE, the calls in flight finish
   * (at most `drainMs`), then every connection is closed without waiting for clients to hang up.
   */
  async close(drainMs = 10_000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    clearInterval(this.statsTimer);
    if (this.inflightBytes > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, drainMs);
        this.drained = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    this.server.forceShutdown();
    this.fanout.close();
  }

  /**
   * Admits a call: its price is what it will hold at its peak (its keys, the groups' answers, and the
   * merged answer). Refused at once when the price would pass the bound on bytes in flight (a call
   * arriving when nothing is in flight is always taken), or when its answer would pass what a replica
   * answers. The price is released when the call's stream closes.
   */
  private admit(call: object, table: string, n: number): void {
    if (this.closing) throw new KvError(KvErrorCode.UNAVAILABLE, 'the router is shutting down');
    const dim = this.dims.get(table);
    if (dim !== undefined) checkAnswerSize(n, dim);
    const price = n * (8 + 2 * (4 * (dim ?? UNSEEN_DIM) + 1));
    if (this.inflightBytes > 0 && this.inflightBytes + price > this.resolved.maxInflightBytes) {
      throw new KvError(KvErrorCode.RESOURCE_EXHAUSTED, `the router holds ${this.inflightBytes} bytes for calls in flight and this call needs ${price}; the limit is ${this.resolved.maxInflightBytes} (maxInflightBytes): retry with backoff`);
    }
    this.inflightBytes += price;
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      this.inflightBytes -= price;
      if (this.inflightBytes === 0) this.drained?.();
    };
    const stream = streamOf(call);
    if (stream !== undefined) stream.once('close', release);
    else (call as grpc.ServerUnaryCall<unknown, unknown>).on('finish', release);
  }

  private onLookup(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    let buf: Buffer | undefined;
    Promise.resolve()
      .then(() => {
        // Before any other work, the token check included (see the replica's checkRequest).
        const req = decoded(call.request);
        checkTableName(req.table);
        this.auth?.check(call.metadata, 'Lookup');
        const keys = keysFromBytes(req.keys);
        if (keys.length / 2 > MAX_ROUTER_KEYS) throw invalidArgument(`a lookup holds ${keys.length / 2} keys; at most ${MAX_ROUTER_KEYS}`);
        this.admit(call, req.table, keys.length / 2);
        const callDeadline = call.getDeadline();
        const deadline = callDeadline instanceof Date ? callDeadline.getTime()
          : Number.isFinite(callDeadline) ? Number(callDeadline) : Date.now() + this.resolved.deadlineMs;
        const ctl = new AbortController();
        call.on('cancelled', () => ctl.abort());
        return this.fanout.lookup({
          table: req.table,
          version: req.version,
          keys,
          deadline,
          signal: ctl.signal,
          metadata: this.auth === undefined ? undefined : forwarded(call.metadata),
          // A pooled buffer holds an earlier answer: the placement writes every row, absent ones as zeros.
          alloc: (n, dim, version) => {
            this.rememberDim(req.table, dim);
            checkAnswerSize(n, dim);
            const r = allocLookupResponse(version, dim, n, this.answers);
            buf = r.buf;
            return { values: r.values, found: r.found, dirty: true };
          },
        });
      })
      .then(() => callback(null, buf!), (err: unknown) => callback(toGrpcError(err)))
      // The request's keys were partitioned into the fan-out's own arrays: its buffer can be reused.
      .finally(() => {
        if (!(call.request instanceof UndecodableRequest)) releaseReceived(call.request.keys.buffer);
      });
  }

  private rememberDim(table: string, dim: number): void {
    // Bounded: a caller naming many tables cannot grow it without end.
    if (!this.dims.has(table) && this.dims.size >= 4096) this.dims.clear();
    this.dims.set(table, dim);
  }
}

/** The caller's authorization alone, to be sent on to the replicas. */
function forwarded(from: grpc.Metadata): grpc.Metadata {
  const md = new grpc.Metadata();
  const v = from.get(AUTHORIZATION)[0];
  if (v !== undefined) md.set(AUTHORIZATION, v);
  return md;
}
