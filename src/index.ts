export { EmbeddingClient, DEFAULT_DEADLINE_MS, DEFAULT_MAX_KEYS_PER_REQUEST } from './client/index.js';
export type { EmbeddingClientOptions, EmbeddingsResult, GetEmbeddingsOptions } from './client/index.js';
export { KvError, KvErrorCode } from './common/errors.js';
export type { KvErrorCodeName } from './common/errors.js';
export type { KeyInput } from './common/keys.js';
export { stringKey } from './common/keys.js';
export type { Manifest } from './common/manifest.js';
export { parseManifest } from './common/manifest.js';
export { partitionOf } from './router/partition.js';
