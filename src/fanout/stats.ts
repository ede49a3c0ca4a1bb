
/**
 * Latency windows and the counters that the SDK (`client.stats()`) and the router (`kvctl status
 * --router`, its periodic log) report.
 */

/**
 * The last `capacity` samples in a ring. `next` is where the next sample goes (the oldest once full):
 *
 *   ring: [ s8 s9 s2 s3 s4 s5 s6 s7 ]   capacity 8, 10 samples added
 *                 ^ next = 2
 *
 * Percentiles sort a copy in a scratch array allocated once.
 */
export class LatencyWindow {
  private readonly ring: Float64Array;
  private readonly scratch: Float64Array;
  private next = 0;
  private filled = 0;

  constructor(readonly capacity: number) {
    this.ring = new Float64Array(capacity);
    this.scratch = new Float64Array(capacity);
  }

  get count(): number {
    return this.filled;
  }

  add(ms: number): void {
    this.ring[this.next] = ms;
    this.next = this.next + 1 === this.capacity ? 0 : this.next + 1;
    if (this.filled < this.capacity) this.filled++;
  }

  /** Nearest-rank percentiles (each p in (0, 100]); NaN when empty. */
  percentiles(ps: readonly number[]): number[] {
    const n = this.filled;
    if (n === 0) return ps.map(() => NaN);
    const s = this.scratch.subarray(0, n);
    s.set(this.ring.subarray(0, n));
    s.sort();
    return ps.map((p) => s[Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1))]!);
  }
}

/** Percentiles of a latency window, in ms (NaN before any sample). */
export interface LatencyPercentiles {
  p50: number;
  p95: number;
  p99: number;
  /** How many recent samples they are computed from. */
  samples: number;
}

export function latencyOf(w: LatencyWindow): LatencyPercentiles {
  const [p50, p95, p99] = w.percentiles([50, 95, 99]) as [number, number, number];
  return { p50, p95, p99, samples: w.count };
}

export interface ReplicaStats {
  replica: number;
  address: string;
  /** 'down': an attempt failed and the replica has not answered a health probe since. */
  health: 'up' | 'down';
  /** > 0 while the replica is passed over after losing to a hedge (it was stalled or slow). */
  avoidedForMs: number;
  /** Attempts in flight now. */
  outstanding: number;
  /** Attempts sent, answered, failed. */
  attempts: number;
  answers: number;
  failures: number;
  /** Exponentially weighted mean of answered attempts' latency (all request sizes together). */
  ewmaMs: number;
  lastError: string | undefined;
}

export interface GroupStats {
  group: number;
  /** Sub-requests to this group (one per request that has keys of the group). */
  requests: number;
  /** Backup requests sent after the hedge delay, and those that answered first. */
  hedgesSent: number;
  hedgesWon: number;
  /** Hedges wanted but refused by the token bucket. */
  hedgesThrottled: number;
  /** Attempts sent at once to another replica after an attempt failed. */
  retries: number;
  /** Sub-requests that rejected (no replica could answer, deadline, a refused request). */
  failures: number;
  /** Sub-request latency, first attempt to answer, over the recent window. */
  latencyMs: LatencyPercentiles;
  /** The hedge delay the latest sub-request used (ms), and the bucket's level now. */
  hedgeDelayMs: number;
  hedgeTokens: number;
  replicas: ReplicaStats[];
}

export interface FanoutStats {
  /** Whole requests (every group together). */
  requests: number;
  failures: number;
  latencyMs: LatencyPercentiles;
  groups: GroupStats[];
}
