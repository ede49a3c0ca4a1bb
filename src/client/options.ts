import { echo, invalidArgument } from '../common/errors.js';
import { DEFAULT_CONFIG_PATH } from '../cluster/manifest.js';
import { checkClientToken } from '../cluster/security.js';
import { parseEtcdOptions, type EtcdSourceOptions } from '../cluster/source.js';
import { refuseUnknownOptions } from '../common/validate.js';
import { checkRegistry, type Registry } from '../metrics/registry.js';
import {
  REPLICA_POLICY_KEYS, REPLICA_POLICY_RENAMED, parseReplicaPolicy, type ReplicaPolicyOptions, type ResolvedReplicaPolicy,
} from '../cluster/policy.js';

// Replica choice, hedging and health probes: the options and defaults live with the code that uses
// them (src/router/policy.ts, shared with the router) and are re-exported here.
export {
  DEFAULT_HEDGING, DEFAULT_HEDGE_PERCENTILE, DEFAULT_HEDGE_MIN_DELAY_MS, DEFAULT_HEDGE_MAX_DELAY_MS, DEFAULT_HEDGE_MAX_TOKENS,
  DEFAULT_HEDGE_TOKEN_RATIO, DEFAULT_HEALTH_PROBE_INTERVAL_MS,
} from '../cluster/policy.js';

export const DEFAULT_DEADLINE_MS = 5000;
export const DEFAULT_MAX_KEYS_PER_REQUEST = 2_000_000;
export const MAX_DEADLINE_MS = 10 * 60_000;

/**
 * Options of `new EmbeddingClient(options)`. Besides these fields, the ReplicaPolicyOptions:
 * `hedging` (default true), `hedgeDelayMs` (fixed; unset = adaptive), `hedgePercentile` (95),
 * `hedgeMinDelayMs` (5), `hedgeMaxDelayMs` (1000), `hedgeMaxTokens` (10), `hedgeTokenRatio` (0.2),
 * `healthProbeIntervalMs` (250).
 */
export interface EmbeddingClientOptions extends ReplicaPolicyOptions {
  /** The cluster manifest: a path to cluster.json, or the manifest object. Default `./cluster.json`. */
  config?: string | object;
  /**
   * The cluster in etcd instead of a manifest: `{ endpoints: ['http://10.0.0.9:2379'], cluster: 'prod' }`.
   * The client reads the manifest there at its first call and follows the replicas' addresses and
   * each table's current version (README: Running on many hosts).
   */
  etcd?: EtcdSourceOptions;
  /** Deadline of a request when the call gives none. */
  deadlineMs?: number;
  /** Requests with more keys are refused with KV_INVALID_ARGUMENT. */
  maxKeysPerRequest?: number;
  /** Sent as `authorization: Bearer <token>` when the cluster has a tokens file (README: Security). */
  token?: string;
  /**
   * Prometheus series of this client (lookups, keys, latency, hedges, replica health; README:
   * Metrics) in `registry`, a prom-client Registry such as prom-client's default `register`, or in
   * a registry of the client's own (`client.metrics`) when none is given. Off by default.
   */
  metrics?: ClientMetricsOptions;
}

export interface ClientMetricsOptions {
  registry?: Registry;
}

export interface ResolvedClientOptions {
  /** Undefined with etcd. */
  config: string | object | undefined;
  etcd: EtcdSourceOptions | undefined;
  deadlineMs: number;
  maxKeysPerRequest: number;
  policy: ResolvedReplicaPolicy;
  token: string | undefined;
  /** undefined: no metrics; null registry: one of the client's own. */
  metrics: { registry: Registry | null } | undefined;
}

const KNOWN = new Set<string>(['config', 'etcd', 'deadlineMs', 'maxKeysPerRequest', 'token', 'metrics', ...REPLICA_POLICY_KEYS]);
const METRICS_KNOWN = new Set<string>(['registry']);
const METRICS_RENAMED: Record<string, string> = { register: 'registry', promRegistry: 'registry' };
const RENAMED: Record<string, string> = {
  deadline: 'deadlineMs', timeout: 'deadlineMs', timeoutMs: 'deadlineMs', manifest: 'config', maxKeys: 'maxKeysPerRequest', auth: 'token', bearer: 'token',
  ...REPLICA_POLICY_RENAMED, prometheus: 'metrics', registry: 'metrics: { registry }',
};

export function checkPositiveInt(value: unknown, name: string, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > max) {
    throw invalidArgument(`${name} must be an integer in [1, ${max}], got ${echo(value)}`);
  }
  return value;
}

/** Merges options with the exported defaults and validates them, in one place. */
export function parseClientOptions(options: EmbeddingClientOptions | undefined): ResolvedClientOptions {
  const o = (options ?? {}) as Record<string, unknown>;
  if (typeof o !== 'object' || o === null) throw invalidArgument('options must be an object');
  refuseUnknownOptions(o, KNOWN, RENAMED);
  if (o['etcd'] !== undefined && o['config'] !== undefined) throw invalidArgument('give the cluster as either config (a manifest) or etcd, not both');
  const etcd = o['etcd'] === undefined ? undefined : parseEtcdOptions(o['etcd'], 'etcd');
  const config = etcd !== undefined ? undefined : o['config'] ?? DEFAULT_CONFIG_PATH;
  if (config !== undefined && typeof config !== 'string' && (typeof config !== 'object' || config === null)) {
    throw invalidArgument('config must be a path to cluster.json or a manifest object');
  }
  return {
    config,
    etcd,
    deadlineMs: checkPositiveInt(o['deadlineMs'] ?? DEFAULT_DEADLINE_MS, 'deadlineMs', MAX_DEADLINE_MS),
    maxKeysPerRequest: checkPositiveInt(o['maxKeysPerRequest'] ?? DEFAULT_MAX_KEYS_PER_REQUEST, 'maxKeysPerRequest', 100_000_000),
    policy: parseReplicaPolicy(o),
    token: o['token'] === undefined ? undefined : checkClientToken(o['token'], 'token'),
    metrics: parseMetrics(o['metrics']),
  };
}

function parseMetrics(m: unknown): ResolvedClientOptions['metrics'] {
  if (m === undefined) return undefined;
  if (typeof m !== 'object' || m === null || Array.isArray(m)) throw invalidArgument(`metrics must be an object such as { registry }, got ${echo(m)}`);
  const o = m as Record<string, unknown>;
  refuseUnknownOptions(o, METRICS_KNOWN, METRICS_RENAMED);
  return { registry: o['registry'] === undefined ? null : checkRegistry(o['registry'], 'metrics.registry') };
}
