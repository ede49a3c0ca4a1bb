import { EmbeddingClientImpl } from './client.js';

export { EmbeddingClientImpl };
export type { EmbeddingClient as EmbeddingClientInterface, EmbeddingsResult, GetEmbeddingsOptions, PutEmbeddingsOptions } from './client.js';
export { MAX_PUT_KEYS } from '../common/limits.js';
export {
  DEFAULT_DEADLINE_MS, DEFAULT_MAX_KEYS_PER_REQUEST, DEFAULT_HEDGING, DEFAULT_HEDGE_PERCENTILE, DEFAULT_HEDGE_MIN_DELAY_MS,
  DEFAULT_HEDGE_MAX_DELAY_MS, DEFAULT_HEDGE_MAX_TOKENS, DEFAULT_HEDGE_TOKEN_RATIO, DEFAULT_HEALTH_PROBE_INTERVAL_MS,
} from './options.js';
export type { ClientStats } from './client.js';
export type { FanoutStats, GroupStats, LatencyPercentiles, ReplicaStats } from '../fanout/stats.js';
export type { EmbeddingClientOptions } from './options.js';
/** The SDK entry point: `new EmbeddingClient({ config: 'cluster.json' })`. */
export const EmbeddingClient = EmbeddingClientImpl;
export type EmbeddingClient = EmbeddingClientImpl;
