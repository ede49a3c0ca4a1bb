import { EmbeddingClientImpl } from './client.js';

export { EmbeddingClientImpl };
export type { EmbeddingClient as EmbeddingClientInterface, EmbeddingsResult, GetEmbeddingsOptions } from './client.js';
export { DEFAULT_DEADLINE_MS, DEFAULT_MAX_KEYS_PER_REQUEST } from './options.js';
export type { EmbeddingClientOptions } from './options.js';
/** The SDK entry point: `new EmbeddingClient({ config: 'cluster.json' })`. */
export const EmbeddingClient = EmbeddingClientImpl;
export type EmbeddingClient = EmbeddingClientImpl;
