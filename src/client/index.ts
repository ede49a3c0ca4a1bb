import { EmbeddingClientImpl, type EmbeddingClient as Client } from './client.js';
import type { EmbeddingClientOptions } from './options.js';

export type { EmbeddingsResult, GetEmbeddingsOptions, PutEmbeddingsOptions } from './client.js';
export { MAX_PUT_KEYS } from '../common/limits.js';
export {
  DEFAULT_DEADLINE_MS, DEFAULT_MAX_KEYS_PER_REQUEST, DEFAULT_HEDGING, DEFAULT_HEDGE_PERCENTILE, DEFAULT_HEDGE_MIN_DELAY_MS,
  DEFAULT_HEDGE_MAX_DELAY_MS, DEFAULT_HEDGE_MAX_TOKENS, DEFAULT_HEDGE_TOKEN_RATIO, DEFAULT_HEALTH_PROBE_INTERVAL_MS,
} from './options.js';
export type { ClientStats } from './client.js';
export type { FanoutStats, GroupStats, LatencyPercentiles, ReplicaStats } from '../fanout/stats.js';
export type { ClientMetricsOptions, EmbeddingClientOptions } from './options.js';
export type { EtcdSourceOptions } from '../cluster/source.js';
/**
 * The SDK entry point, a value and an interface of one name: `new EmbeddingClient({ config })`
 * gives an EmbeddingClient; the class behind it is not part of the public surface.
 */
export interface EmbeddingClient extends Client {}
export const EmbeddingClient: new (options?: EmbeddingClientOptions) => EmbeddingClient = EmbeddingClientImpl;
