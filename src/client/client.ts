import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { packKeys, type KeyInput } from '../common/keys.js';
import { resolveManifest, type Manifest } from '../common/manifest.js';
import { Fanout } from '../router/fanout.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { MAX_DEADLINE_MS, checkPositiveInt, parseClientOptions, type EmbeddingClientOptions, type ResolvedClientOptions } from './options.js';

export interface GetEmbeddingsOptions {
  table: string;
  /** A version to read; by default the current one (the same for every shard group). */
  version?: number;
  deadlineMs?: number;
  signal?: AbortSignal;
}

export interface EmbeddingsResult {
  /** keys.length * dim floats in request order; zeros where a key is absent. */
  values: Float32Array;
  /** 1 where the key exists. */
  found: Uint8Array;
  dim: number;
  /** The version that answered. */
  version: number;
}

/** The SDK: batched lookups fanned out to every shard group at once. */
export interface EmbeddingClient {
  getEmbeddings(keys: KeyInput, options: GetEmbeddingsOptions): Promise<EmbeddingsResult>;
  close(): Promise<void>;
}

const GET_OPTIONS = new Set(['table', 'version', 'deadlineMs', 'signal']);

export class EmbeddingClientImpl implements EmbeddingClient {
  private state: 'open' | 'closed' = 'open';
  private readonly options: ResolvedClientOptions;
  readonly manifest: Manifest;
  private readonly fanout: Fanout;

  constructor(options?: EmbeddingClientOptions) {
    this.options = parseClientOptions(options);
    this.manifest = resolveManifest(this.options.config);
    this.fanout = new Fanout(this.manifest);
  }

  async getEmbeddings(keys: KeyInput, options: GetEmbeddingsOptions): Promise<EmbeddingsResult> {
    // The deadline error is made here so its stack points at the caller.
    const started = Date.now();
    if (this.state !== 'open') throw new KvError(KvErrorCode.CLOSED, 'the client is closed');
    if (typeof options !== 'object' || options === null) throw invalidArgument('options must be an object with at least { table }');
    for (const k of Object.keys(options)) if (!GET_OPTIONS.has(k)) throw invalidArgument(`unsupported option ${k} (known: ${[...GET_OPTIONS].join(', ')})`);
    const table = checkTableName(options.table, 'options.table');
    const version = options.version === undefined ? 0 : checkVersion(options.version, 'options.version');
    const deadlineMs = options.deadlineMs === undefined ? this.options.deadlineMs : checkPositiveInt(options.deadlineMs, 'options.deadlineMs', MAX_DEADLINE_MS);
    if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) throw invalidArgument('options.signal must be an AbortSignal');
    const len = (keys as { length?: unknown }).length;
    if (typeof len === 'number' && len > this.options.maxKeysPerRequest) {
      throw invalidArgument(`keys holds ${len} keys; at most ${this.options.maxKeysPerRequest} per request (maxKeysPerRequest)`);
    }
    const packed = await packKeys(keys, 'keys');
    const r = await this.fanout.lookup({ table, version, keys: packed, deadline: started + deadlineMs, signal: options.signal });
    return { values: r.values, found: r.found, dim: r.dim, version: r.version };
  }

  async close(): Promise<void> {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.fanout.close();
  }
}
