import * as grpc from '@grpc/grpc-js';
import type { ReplicaConn } from '../cluster/connections.js';
import { HEALTH_PROBE_DEADLINE_MS, HEALTH_PROBE_MAX_INTERVAL_MS } from '../cluster/policy.js';
import type { ReplicaStats } from './stats.js';
import { readField } from '../wire/protobuf.js';

const HEALTH_CHECK_PATH = '/grpc.health.v1.Health/Check';
// HealthCheckRequest { string service = 1; } with service "" (the whole server) encodes as no bytes.
const EMPTY = Buffer.alloc(0);
const SERVING = 1;
const EWMA_WEIGHT = 0.2;
/**
 * A replica that lost to a hedge is passed over for twice as long as it had kept the request, doubled for
 * every further loss in a row (outlier ejection, as Envoy's base_ejection_time x ejections), within these
 * bounds. A replica that keeps stalling is tried again less and less often, so it stops draining the
 * group's hedge budget; one answer that wins resets the streak.
 */
const AVOID_MIN_MS = 20;
const AVOID_MAX_MS = 5000;
const AVOID_MAX_DOUBLINGS = 8;

/** HealthCheckResponse { ServingStatus status = 1; }: reads field 1 (0, UNKNOWN, when absent or malformed). */
function servingStatus(buf: Buffer): number {
  try {
    const v = readField(buf, 1);
    return typeof v === 'number' ? v : 0;
  } catch {
    return 0;
  }
}

/**
 * What the caller knows of one replica: its health, whether it is being passed over after a stall, how
 * many attempts it holds, and its recent latency. A replica starts 'up'; a transport failure marks it
 * 'down' and starts health probes (grpc.health.v1 Check on its own channel, so a probe that answers
 * means the channel is usable again) on an unref'd timer with backoff, until one answers SERVING.
 */
export class ReplicaTracker {
  health: 'up' | 'down' = 'up';
  /** Passed over (when another replica can take the attempt) until this time, ms since the epoch. */
  avoidUntil = 0;
  /** Losses to a hedge since this replica last answered first. */
  lossStreak = 0;
  outstanding = 0;
  attempts = 0;
  answers = 0;
  failures = 0;
  ewmaMs = NaN;
  lastError: string | undefined;
  private probeTimer: NodeJS.Timeout | undefined;
  private probeDelayMs: number;
  private probeCall: grpc.ClientUnaryCall | undefined;
  private closed = false;

  constructor(readonly conn: ReplicaConn, private readonly probeIntervalMs: number) {
    this.probeDelayMs = probeIntervalMs;
    this.probe = this.probe.bind(this);
  }

  onAnswer(ms: number): void {
    this.answers++;
    this.lossStreak = 0;
    this.ewmaMs = Number.isNaN(this.ewmaMs) ? ms : this.ewmaMs + EWMA_WEIGHT * (ms - this.ewmaMs);
    // It answered a lookup: whatever a probe would say, it serves.
    if (this.health === 'down') this.markUp();
  }

  /** The replica kept an attempt for `heldMs` and lost to a hedge: pass over it for a while. */
  avoid(now: number, heldMs: number): void {
    const base = Math.max(AVOID_MIN_MS, 2 * heldMs);
    const ms = Math.min(AVOID_MAX_MS, base * 2 ** Math.min(this.lossStreak, AVOID_MAX_DOUBLINGS));
    this.lossStreak++;
    this.avoidUntil = Math.max(this.avoidUntil, now + ms);
  }

  onFailure(message: string): void {
    this.failures++;
    this.lastError = message;
  }

  /** The replica registered again or moved: what was known of its old address no longer holds. */
  reset(): void {
    this.avoidUntil = 0;
    this.lossStreak = 0;
    this.ewmaMs = NaN;
    this.probeCall?.cancel();
    this.probeCall = undefined;
    this.markUp();
  }

  /** A transport failure: avoid the replica until a health probe answers. */
  markDown(): void {
    if (this.health === 'down' || this.closed) return;
    this.health = 'down';
    this.probeDelayMs = this.probeIntervalMs;
    this.scheduleProbe();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
    this.probeCall?.cancel();
  }

  snapshot(now: number): ReplicaStats {
    return {
      replica: this.conn.replica,
      address: this.conn.address,
      health: this.health,
      avoidedForMs: Math.max(0, Math.round(this.avoidUntil - now)),
      outstanding: this.outstanding,
      attempts: this.attempts,
      answers: this.answers,
      failures: this.failures,
      ewmaMs: this.ewmaMs,
      lastError: this.lastError,
    };
  }

  private markUp(): void {
    this.health = 'up';
    clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
  }

  private scheduleProbe(): void {
    clearTimeout(this.probeTimer);
    this.probeTimer = setTimeout(this.probe, this.probeDelayMs);
    this.probeTimer.unref();
  }

  private probe(): void {
    this.probeTimer = undefined;
    if (this.closed || this.health === 'up') return;
    this.probeCall = this.conn.lookup.makeUnaryRequest<Buffer, Buffer>(
      HEALTH_CHECK_PATH,
      () => EMPTY,
      (b) => b,
      EMPTY,
      new grpc.Metadata(),
      { deadline: Date.now() + HEALTH_PROBE_DEADLINE_MS },
      (err, res) => {
        this.probeCall = undefined;
        if (this.closed || this.health === 'up') return;
        if (!err && res !== undefined && servingStatus(res) === SERVING) {
          this.markUp();
          return;
        }
        this.probeDelayMs = Math.min(this.probeDelayMs * 2, Math.max(HEALTH_PROBE_MAX_INTERVAL_MS, this.probeIntervalMs));
        this.scheduleProbe();
      },
    );
  }
}
