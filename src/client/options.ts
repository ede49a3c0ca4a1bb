import { invalidArgument } from '../common/errors.js';
import { DEFAULT_CONFIG_PATH } from '../common/manifest.js';

export const DEFAULT_DEADLINE_MS = 5000;
export const DEFAULT_MAX_KEYS_PER_REQUEST = 2_000_000;
export const MAX_DEADLINE_MS = 10 * 60_000;

export interface EmbeddingClientOptions {
  /** The cluster manifest: a path to cluster.json, or the manifest object. Default `./cluster.json`. */
  config?: string | object;
  /** Deadline of a request when the call gives none. */
  deadlineMs?: number;
  /** Requests with more keys are refused with KV_INVALID_ARGUMENT. */
  maxKeysPerRequest?: number;
}

export interface ResolvedClientOptions {
  config: string | object;
  deadlineMs: number;
  maxKeysPerRequest: number;
}

const KNOWN = new Set(['config', 'deadlineMs', 'maxKeysPerRequest']);
const RENAMED: Record<string, string> = { deadline: 'deadlineMs', timeout: 'deadlineMs', timeoutMs: 'deadlineMs', manifest: 'config', maxKeys: 'maxKeysPerRequest' };

export function checkPositiveInt(value: unknown, name: string, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > max) {
    throw invalidArgument(`${name} must be an integer in [1, ${max}], got ${JSON.stringify(value)}`);
  }
  return value;
}

/** Merges options with the exported defaults and validates them, in one place. */
export function parseClientOptions(options: EmbeddingClientOptions | undefined): ResolvedClientOptions {
  const o = (options ?? {}) as Record<string, unknown>;
  if (typeof o !== 'object' || o === null) throw invalidArgument('options must be an object');
  for (const k of Object.keys(o)) {
    if (!KNOWN.has(k)) {
      const hint = RENAMED[k];
      throw invalidArgument(hint ? `unsupported option ${k}, use ${hint}` : `unsupported option ${k} (known: ${[...KNOWN].join(', ')})`);
    }
  }
  const config = o['config'] ?? DEFAULT_CONFIG_PATH;
  if (typeof config !== 'string' && (typeof config !== 'object' || config === null)) {
    throw invalidArgument('config must be a path to cluster.json or a manifest object');
  }
  return {
    config,
    deadlineMs: checkPositiveInt(o['deadlineMs'] ?? DEFAULT_DEADLINE_MS, 'deadlineMs', MAX_DEADLINE_MS),
    maxKeysPerRequest: checkPositiveInt(o['maxKeysPerRequest'] ?? DEFAULT_MAX_KEYS_PER_REQUEST, 'maxKeysPerRequest', 100_000_000),
  };
}
