import { echo, invalidArgument } from '../common/errors.js';

/**
 * How a request picks replicas, hedges and probes: the options shared by the SDK (EmbeddingClientOptions
 * extends these) and the router. Validated here, in one place; the SDK's parseClientOptions calls
 * parseReplicaPolicy for these fields.
 */

/** Backup requests are on unless `hedging: false`. */
export const DEFAULT_HEDGING = true;
/** The adaptive hedge delay is this percentile of the group's recent answers to requests of the same size. */
export const DEFAULT_HEDGE_PERCENTILE = 95;
/** Floor of the adaptive delay: below it, ordinary jitter (a GC pause) would trigger hedges. */
export const DEFAULT_HEDGE_MIN_DELAY_MS = 5;
/** Ceiling of the adaptive delay, and the delay used until a group has seen enough answers of a size. */
export const DEFAULT_HEDGE_MAX_DELAY_MS = 1000;
/** Token bucket of hedges per group (grpc-js RetryThrottler): hedging stops at maxTokens/2 or fewer. */
export const DEFAULT_HEDGE_MAX_TOKENS = 10;
/** Tokens earned per answered group sub-request; a hedge or a failed attempt costs 1. So at most about
 * this fraction of extra sub-requests is sent once the bucket is half empty. */
export const DEFAULT_HEDGE_TOKEN_RATIO = 0.2;
/** First health probe of a replica marked down; later probes back off (x2) up to HEALTH_PROBE_MAX_INTERVAL_MS. */
export const DEFAULT_HEALTH_PROBE_INTERVAL_MS = 250;
export const HEALTH_PROBE_MAX_INTERVAL_MS = 5000;
export const HEALTH_PROBE_DEADLINE_MS = 1000;
export const MAX_HEDGE_DELAY_MS = 60_000;

export interface ReplicaPolicyOptions {
  /**
   * Send a backup (hedged) request to another replica of a group whose answer is late. Default true.
   * With false, a failed attempt is still retried on another replica at once.
   */
  hedging?: boolean;
  /**
   * A fixed hedge delay in ms (0 sends to two replicas at once). Unset (the default): adaptive, the
   * group's recent `hedgePercentile` latency for requests of the same size (by powers of two of keys),
   * clamped to [hedgeMinDelayMs, hedgeMaxDelayMs].
   */
  hedgeDelayMs?: number;
  /** Percentile of the adaptive delay, in [50, 99.9]. Default DEFAULT_HEDGE_PERCENTILE. */
  hedgePercentile?: number;
  /** Floor of the adaptive delay. Default DEFAULT_HEDGE_MIN_DELAY_MS. */
  hedgeMinDelayMs?: number;
  /** Ceiling of the adaptive delay. Default DEFAULT_HEDGE_MAX_DELAY_MS. */
  hedgeMaxDelayMs?: number;
  /** Size of each group's hedge token bucket. Default DEFAULT_HEDGE_MAX_TOKENS. */
  hedgeMaxTokens?: number;
  /** Tokens an answered sub-request returns to the bucket, in (0, 1]. Default DEFAULT_HEDGE_TOKEN_RATIO. */
  hedgeTokenRatio?: number;
  /** First health probe of a replica that failed, in ms. Default DEFAULT_HEALTH_PROBE_INTERVAL_MS. */
  healthProbeIntervalMs?: number;
}

export interface ResolvedReplicaPolicy {
  hedging: boolean;
  /** undefined: adaptive. */
  hedgeDelayMs: number | undefined;
  hedgePercentile: number;
  hedgeMinDelayMs: number;
  hedgeMaxDelayMs: number;
  hedgeMaxTokens: number;
  hedgeTokenRatio: number;
  healthProbeIntervalMs: number;
}

export const REPLICA_POLICY_KEYS: readonly (keyof ReplicaPolicyOptions)[] = [
  'hedging', 'hedgeDelayMs', 'hedgePercentile', 'hedgeMinDelayMs', 'hedgeMaxDelayMs', 'hedgeMaxTokens', 'hedgeTokenRatio', 'healthProbeIntervalMs',
];

/** Names a user may reach for, and the option that does it. */
export const REPLICA_POLICY_RENAMED: Readonly<Record<string, string>> = {
  hedge: 'hedging',
  hedged: 'hedging',
  hedgeDelay: 'hedgeDelayMs',
  hedgingDelay: 'hedgeDelayMs',
  hedgingDelayMs: 'hedgeDelayMs',
  backupDelayMs: 'hedgeDelayMs',
  hedgeMinDelay: 'hedgeMinDelayMs',
  hedgeMaxDelay: 'hedgeMaxDelayMs',
  maxTokens: 'hedgeMaxTokens',
  tokenRatio: 'hedgeTokenRatio',
  retryThrottling: 'hedgeMaxTokens and hedgeTokenRatio',
  healthCheckIntervalMs: 'healthProbeIntervalMs',
  healthProbeInterval: 'healthProbeIntervalMs',
  probeIntervalMs: 'healthProbeIntervalMs',
};

function int(value: unknown, name: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw invalidArgument(`${name} must be an integer in [${min}, ${max}], got ${echo(value)}`);
  }
  return value;
}

function num(value: unknown, name: string, min: number, max: number, minOpen = false): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value > max || (minOpen ? value <= min : value < min)) {
    throw invalidArgument(`${name} must be a number in ${minOpen ? '(' : '['}${min}, ${max}], got ${echo(value)}`);
  }
  return value;
}

/** Merges the policy fields of `o` with the defaults and validates them; other fields are ignored. */
export function parseReplicaPolicy(o: Readonly<Record<string, unknown>>): ResolvedReplicaPolicy {
  const hedging = o['hedging'] ?? DEFAULT_HEDGING;
  if (typeof hedging !== 'boolean') throw invalidArgument(`hedging must be true or false, got ${echo(hedging)}`);
  const fixed = o['hedgeDelayMs'] === undefined ? undefined : int(o['hedgeDelayMs'], 'hedgeDelayMs', 0, MAX_HEDGE_DELAY_MS);
  if (fixed !== undefined) {
    if (!hedging) throw invalidArgument('hedgeDelayMs has no effect with hedging: false; drop one of them');
    for (const k of ['hedgePercentile', 'hedgeMinDelayMs', 'hedgeMaxDelayMs']) {
      if (o[k] !== undefined) throw invalidArgument(`${k} tunes the adaptive hedge delay; it has no effect with a fixed hedgeDelayMs`);
    }
  }
  const hedgeMinDelayMs = int(o['hedgeMinDelayMs'] ?? DEFAULT_HEDGE_MIN_DELAY_MS, 'hedgeMinDelayMs', 0, MAX_HEDGE_DELAY_MS);
  const hedgeMaxDelayMs = int(o['hedgeMaxDelayMs'] ?? Math.max(DEFAULT_HEDGE_MAX_DELAY_MS, hedgeMinDelayMs), 'hedgeMaxDelayMs', 1, MAX_HEDGE_DELAY_MS);
  if (hedgeMinDelayMs > hedgeMaxDelayMs) {
    throw invalidArgument(`hedgeMinDelayMs (${hedgeMinDelayMs}) must not exceed hedgeMaxDelayMs (${hedgeMaxDelayMs})`);
  }
  return {
    hedging,
    hedgeDelayMs: fixed,
    hedgePercentile: num(o['hedgePercentile'] ?? DEFAULT_HEDGE_PERCENTILE, 'hedgePercentile', 50, 99.9),
    hedgeMinDelayMs,
    hedgeMaxDelayMs,
    hedgeMaxTokens: int(o['hedgeMaxTokens'] ?? DEFAULT_HEDGE_MAX_TOKENS, 'hedgeMaxTokens', 1, 1000),
    hedgeTokenRatio: num(o['hedgeTokenRatio'] ?? DEFAULT_HEDGE_TOKEN_RATIO, 'hedgeTokenRatio', 0, 1, true),
    healthProbeIntervalMs: int(o['healthProbeIntervalMs'] ?? DEFAULT_HEALTH_PROBE_INTERVAL_MS, 'healthProbeIntervalMs', 10, 60_000),
  };
}
