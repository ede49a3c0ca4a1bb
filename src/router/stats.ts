import * as grpc from '@grpc/grpc-js';
import { readField } from '../common/wire.js';
import type { SecurityConfig } from '../common/manifest.js';
import { authMetadata, channelCredentials } from '../common/security.js';

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

// ---- the router's stats RPC ---------------------------------------------------------------------------
//
// `/embkv.v1.Router/Stats`, served by the router next to Embkv.Lookup for `kvctl status --router`.
// Standard protobuf (proto/embkv.proto: Router.Stats, RouterStatsResponse { string json = 1; }) where json
// is a FanoutStats object.

export const ROUTER_STATS_PATH = '/embkv.v1.Router/Stats';

export function encodeStatsResponse(stats: FanoutStats): Buffer {
  // NaN (no samples yet) is not JSON: it travels as null.
  const json = Buffer.from(JSON.stringify(stats), 'utf8');
  const head: number[] = [0x0a];
  let len = json.length;
  while (len >= 128) {
    head.push((len % 128) | 128);
    len = Math.floor(len / 128);
  }
  head.push(len);
  return Buffer.concat([Buffer.from(head), json]);
}

export function decodeStatsResponse(buf: Buffer): FanoutStats {
  const json = readField(buf, 1);
  if (!(json instanceof Uint8Array)) throw new Error('stats answer without its json field');
  return JSON.parse(Buffer.from(json.buffer, json.byteOffset, json.byteLength).toString('utf8')) as FanoutStats;
}

export const ROUTER_STATS_SERVICE = {
  stats: {
    path: ROUTER_STATS_PATH,
    requestStream: false,
    responseStream: false,
    requestSerialize: (): Buffer => Buffer.alloc(0),
    requestDeserialize: (): Record<string, never> => ({}),
    responseSerialize: encodeStatsResponse,
    responseDeserialize: decodeStatsResponse,
    originalName: 'Stats',
  },
};

const fmt = (x: number | null): string => (x === null || Number.isNaN(x) ? '-' : x < 10 ? x.toFixed(1) : x.toFixed(0));

/** Human-readable lines of FanoutStats (for `kvctl status --router` and logs). */
export function formatFanoutStats(s: FanoutStats): string {
  const l = s.latencyMs;
  const lines = [`  requests ${s.requests}  failures ${s.failures}  p50/p95/p99 ${fmt(l.p50)}/${fmt(l.p95)}/${fmt(l.p99)} ms`];
  for (const g of s.groups) {
    const gl = g.latencyMs;
    lines.push(
      `  group ${g.group}  requests ${g.requests}  hedges ${g.hedgesSent} (won ${g.hedgesWon}, throttled ${g.hedgesThrottled})  retries ${g.retries}` +
        `  failures ${g.failures}  p50/p95/p99 ${fmt(gl.p50)}/${fmt(gl.p95)}/${fmt(gl.p99)} ms  hedge delay ${fmt(g.hedgeDelayMs)} ms  tokens ${g.hedgeTokens.toFixed(1)}`,
    );
    for (const r of g.replicas) {
      lines.push(
        `    replica ${r.replica}  ${r.address}  ${r.health.toUpperCase()}${r.avoidedForMs > 0 ? ` (avoided ${r.avoidedForMs} ms)` : ''}` +
          `  attempts ${r.attempts}  answers ${r.answers}  failures ${r.failures}  ewma ${fmt(r.ewmaMs)} ms${r.lastError ? `  last error: ${r.lastError}` : ''}`,
      );
    }
  }
  return lines.join('\n') + '\n';
}

/** Asks a router (`kvctl router`) for its stats. */
export function fetchRouterStats(address: string, deadlineMs: number, security?: SecurityConfig, token?: string): Promise<FanoutStats> {
  const client = new grpc.Client(address, channelCredentials(security));
  const m = ROUTER_STATS_SERVICE.stats;
  return new Promise<FanoutStats>((resolve, reject) => {
    client.makeUnaryRequest<Record<string, never>, FanoutStats>(m.path, m.requestSerialize, m.responseDeserialize, {}, authMetadata(token),
      { deadline: Date.now() + deadlineMs }, (err, res) => (err ? reject(err) : resolve(res!)));
  }).finally(() => client.close());
}
