import * as grpc from '@grpc/grpc-js';
import { KvError, KvErrorCode, fromGrpcError } from '../common/errors.js';
import { type LookupRequest, type LookupResponse } from '../wire/lookup.js';
import { EMBKV_CLIENT_SERVICE } from '../wire/services.js';
import type { ReplicaConn } from '../cluster/connections.js';
import type { ResolvedReplicaPolicy } from '../cluster/policy.js';
import { ReplicaTracker } from './replica-health.js';
import { LatencyWindow, latencyOf, type GroupStats } from './stats.js';
import { HedgeThrottle } from './throttle.js';

/** gRPC statuses after which the same sub-request goes to another replica of the group at once. */
const RETRYABLE = new Set<number>([grpc.status.UNAVAILABLE, grpc.status.UNKNOWN, grpc.status.INTERNAL, grpc.status.RESOURCE_EXHAUSTED]);
/** Of those, the ones that say the replica (not the request) is in trouble: it is marked down. */
const MARKS_DOWN = new Set<number>([grpc.status.UNAVAILABLE]);

const LATENCY_WINDOW = 1024;
/** Adaptive hedge delay: a window per power of two of keys, re-read every few samples. */
const DELAY_WINDOW = 128;
const DELAY_MIN_SAMPLES = 16;
const DELAY_REFRESH_EVERY = 8;
const SIZE_CLASSES = 33;
/**
 * An attempt held this many times longer than both the hedge delay for its size (the group's recent
 * p95) and the hedge target's recent answer time is stalled: it is hedged even when the budget is
 * spent. The budget exists for a group that is slow as a whole, where a hedge would only add load (and
 * where the p95 and the target's answer times rise with it); a frozen replica next to one answering in
 * a few ms is not that.
 */
const STALL_FACTOR = 4;

const LOOKUP = EMBKV_CLIENT_SERVICE.lookup;

/** The recent attempt latencies of one request size class of one group, and the delay they give. */
class DelayEstimate {
  readonly window = new LatencyWindow(DELAY_WINDOW);
  private sinceRefresh = 0;
  delayMs = NaN;

  add(ms: number): void {
    this.window.add(ms);
    this.sinceRefresh++;
  }

  /** The percentile, recomputed every DELAY_REFRESH_EVERY samples; NaN until DELAY_MIN_SAMPLES. */
  read(percentile: number): number {
    if (this.window.count < DELAY_MIN_SAMPLES) return NaN;
    if (Number.isNaN(this.delayMs) || this.sinceRefresh >= DELAY_REFRESH_EVERY) {
      this.delayMs = this.window.percentiles([percentile])[0]!;
      this.sinceRefresh = 0;
    }
    return this.delayMs;
  }
}

/**
 * Everything one shard group's sub-requests share: the replicas' trackers, the hedge budget, the
 * adaptive delay and the counters. Each sub-request is a GroupCall.
 */
export class GroupCaller {
  readonly replicas: ReplicaTracker[];
  readonly throttle: HedgeThrottle;
  readonly latency = new LatencyWindow(LATENCY_WINDOW);
  private readonly delays: (DelayEstimate | undefined)[] = new Array<DelayEstimate | undefined>(SIZE_CLASSES);
  private rr = 0;
  requests = 0;
  hedgesSent = 0;
  hedgesWon = 0;
  hedgesThrottled = 0;
  retries = 0;
  failures = 0;
  lastDelayMs = NaN;

  constructor(readonly group: number, conns: readonly ReplicaConn[], readonly policy: ResolvedReplicaPolicy) {
    this.replicas = conns.map((c) => new ReplicaTracker(c, policy.healthProbeIntervalMs));
    this.throttle = new HedgeThrottle(policy.hedgeMaxTokens, policy.hedgeTokenRatio);
    // Start each group's round-robin at a different replica so replica 0 is not everyone's first.
    this.rr = group;
  }

  /** One sub-request: resolves with the first answer, rejects with a KvError naming the group. */
  call(sub: LookupRequest, keys: number, deadline: number, signal: AbortSignal, metadata: grpc.Metadata | undefined): Promise<LookupResponse> {
    this.requests++;
    return new GroupCall(this, sub, keys, deadline, signal, metadata).promise;
  }

  close(): void {
    for (const r of this.replicas) r.close();
  }

  /**
   * The replica for the next attempt, among those not `tried`: first the healthy ones not passed over,
   * then healthy ones passed over, then (only when `allowDown`) the ones marked down, so a group whose
   * replicas all failed is still tried, once each, and fails fast. Within a tier the fewest attempts in
   * flight wins, ties going round-robin. -1: none left.
   */
  pick(tried: Uint8Array, allowDown: boolean, first: boolean, now: number): number {
    const n = this.replicas.length;
    const start = first ? this.rr++ % n : this.rr % n;
    let best = -1;
    let bestTier = 3;
    let bestOut = Infinity;
    for (let k = 0; k < n; k++) {
      const i = (start + k) % n;
      if (tried[i] === 1) continue;
      const r = this.replicas[i]!;
      // A replica the cluster source has no address for (its etcd lease expired) counts as down.
      const tier = r.health === 'down' || !r.conn.present ? 2 : r.avoidUntil > now ? 1 : 0;
      if (tier === 2 && !allowDown) continue;
      if (tier < bestTier || (tier === bestTier && r.outstanding < bestOut)) {
        best = i;
        bestTier = tier;
        bestOut = r.outstanding;
      }
    }
    return best;
  }

  /** The hedge delay for a sub-request of `keys` keys: fixed, or the group's recent percentile for that size. */
  hedgeDelay(keys: number): number {
    const p = this.policy;
    if (p.hedgeDelayMs !== undefined) return p.hedgeDelayMs;
    const c = sizeClass(keys);
    let v = this.delays[c]?.read(p.hedgePercentile) ?? NaN;
    // Too few answers of this size yet: the next larger size's delay bounds it, or twice the next smaller's.
    if (Number.isNaN(v)) v = this.delays[c + 1]?.read(p.hedgePercentile) ?? NaN;
    if (Number.isNaN(v)) v = 2 * (this.delays[c - 1]?.read(p.hedgePercentile) ?? NaN);
    const d = Number.isNaN(v) ? p.hedgeMaxDelayMs : Math.min(p.hedgeMaxDelayMs, Math.max(p.hedgeMinDelayMs, Math.ceil(v)));
    this.lastDelayMs = d;
    return d;
  }

  /** An answered sub-request: `attemptMs` of the attempt that won, `totalMs` since the sub-request began. */
  onAnswer(keys: number, attemptMs: number, totalMs: number): void {
    const c = sizeClass(keys);
    (this.delays[c] ??= new DelayEstimate()).add(attemptMs);
    this.latency.add(totalMs);
    this.throttle.onAnswer();
  }

  snapshot(now: number): GroupStats {
    return {
      group: this.group,
      requests: this.requests,
      hedgesSent: this.hedgesSent,
      hedgesWon: this.hedgesWon,
      hedgesThrottled: this.hedgesThrottled,
      retries: this.retries,
      failures: this.failures,
      latencyMs: latencyOf(this.latency),
      hedgeDelayMs: this.policy.hedgeDelayMs ?? this.lastDelayMs,
      hedgeTokens: this.throttle.level,
      replicas: this.replicas.map((r) => r.snapshot(now)),
    };
  }
}

/** Requests of 2^(c-1) .. 2^c - 1 keys share size class c. */
const sizeClass = (keys: number): number => Math.min(SIZE_CLASSES - 1, 32 - Math.clz32(keys));

/** One attempt of a sub-request on one replica. */
interface Attempt {
  replica: number;
  started: number;
  hedge: boolean;
  call: grpc.ClientUnaryCall | undefined;
  done: boolean;
}

/**
 *   waiting ──hedge delay, a token, another healthy replica──▶ hedged
 *      │  ╲                                                    │
 *      │   ╲ an attempt fails (UNAVAILABLE...): another replica at once, same state
 *      ▼                                                       ▼
 *   committed (first answer: the others are cancelled)   failed (no replica left, deadline, abort,
 *                                                          or an answer that another replica would repeat)
 */
type GroupCallState = 'waiting' | 'hedged' | 'committed' | 'failed';

/** One group's sub-request, modelled on grpc-js's RetryingCall (hedging policy). */
class GroupCall {
  readonly promise: Promise<LookupResponse>;
  private state: GroupCallState = 'waiting';
  private readonly attempts: Attempt[] = [];
  private readonly tried: Uint8Array;
  private readonly started = Date.now();
  private hedgeTimer: NodeJS.Timeout | undefined;
  private hedgeCheck: NodeJS.Immediate | undefined;
  /** After the budget refused a hedge: the wait before looking again (doubling), 0 before any refusal. */
  private recheckMs = 0;
  private readonly errors: string[] = [];
  private resolve!: (r: LookupResponse) => void;
  private reject!: (e: KvError) => void;

  constructor(
    private readonly caller: GroupCaller,
    private readonly sub: LookupRequest,
    private readonly keys: number,
    private readonly deadline: number,
    private readonly signal: AbortSignal,
    private readonly metadata: grpc.Metadata | undefined,
  ) {
    this.promise = new Promise<LookupResponse>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.tried = new Uint8Array(caller.replicas.length);
    this.onHedgeTimer = this.onHedgeTimer.bind(this);
    this.hedgeIfStillWaiting = this.hedgeIfStillWaiting.bind(this);
    this.onAbort = this.onAbort.bind(this);
    if (signal.aborted) {
      this.fail(new KvError(KvErrorCode.ABORTED, `group ${caller.group}: lookup aborted`), false);
      return;
    }
    signal.addEventListener('abort', this.onAbort, { once: true });
    const first = caller.pick(this.tried, true, true, this.started);
    this.startAttempt(first, false);
  }

  private get inFlight(): number {
    let n = 0;
    for (const a of this.attempts) if (!a.done) n++;
    return n;
  }

  private startAttempt(replica: number, hedge: boolean): void {
    const tracker = this.caller.replicas[replica]!;
    this.tried[replica] = 1;
    tracker.attempts++;
    tracker.outstanding++;
    const a: Attempt = { replica, started: Date.now(), hedge, call: undefined, done: false };
    this.attempts.push(a);
    a.call = tracker.conn.lookup.makeUnaryRequest<LookupRequest, LookupResponse>(
      LOOKUP.path,
      LOOKUP.requestSerialize,
      LOOKUP.responseDeserialize,
      this.sub,
      tracker.conn.callMetadata(this.metadata),
      // waitForReady stays false (the default): a call to a replica whose channel is in
      // TRANSIENT_FAILURE fails at once instead of waiting for a connection.
      { deadline: this.deadline },
      (err, res) => this.onAttemptDone(a, err, res),
    );
    this.armHedge();
  }

  /** Arms the hedge timer when another healthy replica could take a backup attempt. */
  private armHedge(): void {
    const c = this.caller;
    if (!c.policy.hedging || this.hedgeTimer !== undefined || this.hedgeCheck !== undefined || (this.state !== 'waiting' && this.state !== 'hedged')) return;
    const now = Date.now();
    if (c.pick(this.tried, false, false, now) < 0) return;
    const delay = c.hedgeDelay(this.keys);
    // A hedge that could not answer before the deadline is only load.
    if (now + delay >= this.deadline) return;
    this.hedgeTimer = setTimeout(this.onHedgeTimer, delay);
    this.hedgeTimer.unref();
  }

  private onHedgeTimer(): void {
    this.hedgeTimer = undefined;
    // Timers run before the event loop polls for I/O: after a busy stretch (placing another request's
    // rows, a GC) the answer may already be waiting in the socket. Decide after the poll phase, so an
    // answer that is there wins without a hedge.
    // (Not unref'd: an unref'd immediate lets the poll phase block until some other event.)
    this.hedgeCheck = setImmediate(this.hedgeIfStillWaiting);
  }

  private hedgeIfStillWaiting(): void {
    this.hedgeCheck = undefined;
    if (this.state !== 'waiting' && this.state !== 'hedged') return;
    const c = this.caller;
    const now = Date.now();
    const next = c.pick(this.tried, false, false, now);
    if (next < 0) return;
    const untilStalled = this.untilStalled(next, now);
    if (!c.throttle.canHedge() && untilStalled > 0) {
      if (this.recheckMs === 0) c.hedgesThrottled++;
      // Look again later, less and less often (answers elsewhere refill the bucket), and at the
      // latest when the attempt counts as stalled.
      this.recheckMs = this.recheckMs === 0 ? c.hedgeDelay(this.keys) : 2 * this.recheckMs;
      const wait = Math.max(1, Math.min(this.recheckMs, untilStalled));
      if (now + wait < this.deadline) {
        this.hedgeTimer = setTimeout(this.onHedgeTimer, wait);
        this.hedgeTimer.unref();
      }
      return;
    }
    c.throttle.onCost();
    c.hedgesSent++;
    this.state = 'hedged';
    this.startAttempt(next, true);
  }

  /**
   * Milliseconds until every attempt in flight has been held STALL_FACTOR times longer than both the
   * hedge delay for this size and replica `next`'s moving average answer time: 0 when they have,
   * Infinity when `next` has no answer time yet.
   */
  private untilStalled(next: number, now: number): number {
    const ewma = this.caller.replicas[next]!.ewmaMs;
    if (Number.isNaN(ewma)) return Infinity;
    const limit = STALL_FACTOR * Math.max(ewma, this.caller.hedgeDelay(this.keys));
    let wait = 0;
    for (const a of this.attempts) if (!a.done) wait = Math.max(wait, a.started + limit - now);
    return wait;
  }

  private onAttemptDone(a: Attempt, err: grpc.ServiceError | null, res: LookupResponse | undefined): void {
    if (a.done) return;
    a.done = true;
    const c = this.caller;
    const tracker = c.replicas[a.replica]!;
    tracker.outstanding--;
    if (this.state === 'committed' || this.state === 'failed') return;
    if (err === null) {
      this.commit(a, res!);
      return;
    }
    const conn = tracker.conn;
    const now = Date.now();
    if (err.code === grpc.status.DEADLINE_EXCEEDED || now >= this.deadline) {
      this.fail(new KvError(KvErrorCode.DEADLINE_EXCEEDED,
        `group ${c.group}: no answer within the deadline (${this.deadline - this.started} ms; last tried replica ${conn.replica} at ${conn.address})`,
        { cause: err, detail: { group: c.group } }), true);
      return;
    }
    const kv = fromGrpcError(err, `group ${c.group} replica ${conn.replica} (${conn.address})`);
    tracker.onFailure(kv.message);
    if (!RETRYABLE.has(err.code)) {
      // The replica answered that the request is wrong (no such table, say): another would say the same.
      this.fail(kv, true);
      return;
    }
    c.throttle.onCost();
    if (MARKS_DOWN.has(err.code)) tracker.markDown();
    this.errors.push(kv.message);
    // Retried at once on another replica, without a token: it replaces the failed attempt, it adds no load.
    const next = c.pick(this.tried, true, false, now);
    if (next >= 0) {
      c.retries++;
      this.startAttempt(next, false);
      return;
    }
    if (this.inFlight === 0) {
      this.fail(new KvError(KvErrorCode.UNAVAILABLE, `group ${c.group}: no replica could answer: ${this.errors.join('; ')}`,
        { cause: kv, detail: { group: c.group } }), true);
    }
  }

  private commit(winner: Attempt, res: LookupResponse): void {
    this.state = 'committed';
    this.finish();
    const c = this.caller;
    const now = Date.now();
    const attemptMs = now - winner.started;
    c.replicas[winner.replica]!.onAnswer(attemptMs);
    c.onAnswer(this.keys, attemptMs, now - this.started);
    if (winner.hedge) c.hedgesWon++;
    for (const a of this.attempts) {
      if (a.done) continue;
      a.done = true;
      const loser = c.replicas[a.replica]!;
      loser.outstanding--;
      // It held the sub-request longer than the winner took from a later start: stalled or slow.
      if (a.started < winner.started) loser.avoid(now, now - a.started);
      a.call?.cancel();
    }
    this.resolve(res);
  }

  private onAbort(): void {
    if (this.state === 'committed' || this.state === 'failed') return;
    this.fail(new KvError(KvErrorCode.ABORTED, `group ${this.caller.group}: lookup aborted`), false);
  }

  private fail(err: KvError, count: boolean): void {
    this.state = 'failed';
    this.finish();
    if (count) this.caller.failures++;
    for (const a of this.attempts) {
      if (a.done) continue;
      a.done = true;
      this.caller.replicas[a.replica]!.outstanding--;
      a.call?.cancel();
    }
    this.reject(err);
  }

  private finish(): void {
    clearTimeout(this.hedgeTimer);
    this.hedgeTimer = undefined;
    clearImmediate(this.hedgeCheck);
    this.hedgeCheck = undefined;
    this.signal.removeEventListener('abort', this.onAbort);
  }
}
