import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { randomInt, randomUUID } from 'node:crypto';
import { firstNonFinite, packKeys, repeatedKey, type KeyInput } from '../common/keys.js';
import { MAX_PUT_KEYS, ORDER_SCALE } from '../common/limits.js';
import { resolveManifest, type Manifest } from '../cluster/manifest.js';
import { FileSource, clusterSource, type ClusterSource } from '../cluster/source.js';
import { Fanout, type AnswerAllocator } from '../fanout/fanout.js';
import { ClusterConnections } from '../cluster/connections.js';
import type { FanoutStats } from '../fanout/stats.js';
import { putToGroups } from '../fanout/put.js';
import { checkTableName, checkVersion, refuseUnknownOptions } from '../common/validate.js';
import { MAX_DEADLINE_MS, checkPositiveInt, parseClientOptions, type EmbeddingClientOptions, type ResolvedClientOptions } from './options.js';
import { MetricSet, newRegistry, type Registry } from '../metrics/registry.js';
import { registerFanoutMetrics } from '../metrics/fanout-metrics.js';

export interface GetEmbeddingsOptions {
  table: string;
  /**
   * A version to read; by default the current one (the same for every shard group). A bigint is
   * taken up to 2^53-1; a larger one is refused with KV_INVALID_ARGUMENT.
   */
  version?: number | bigint;
  deadlineMs?: number;
  signal?: AbortSignal;
  /**
   * Write the answer into these arrays instead of new ones: a service that keeps one result buffer
   * per worker saves allocating (and the GC of) keys.length * dim * 4 bytes per request. `values`
   * must hold at least keys.length * dim floats and `found` at least keys.length bytes; the result's
   * `values` and `found` are views of them of exactly that length, with absent rows zeroed. Checked
   * once the dim is known: too small a `values` rejects with KV_INVALID_ARGUMENT. After a rejected
   * call their contents are unspecified.
   */
  out?: { values: Float32Array; found: Uint8Array };
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

export interface PutEmbeddingsOptions {
  table: string;
  deadlineMs?: number;
}


/** The SDK: batched lookups fanned out to every shard group at once, and real-time updates. */
export interface EmbeddingClient {
  getEmbeddings(keys: KeyInput, options: GetEmbeddingsOptions): Promise<EmbeddingsResult>;
  putEmbeddings(keys: KeyInput, values: Float32Array, options: PutEmbeddingsOptions): Promise<void>;
  /** Per shard group: requests, hedges sent and won, retries, failures, latency percentiles, replica health. */
  stats(): ClientStats;
  /**
   * The prom-client Registry holding this client's series, when created with `metrics` (the one
   * given, or the client's own: serve it, or merge it into yours with Registry.merge); else undefined.
   */
  readonly metrics: Registry | undefined;
  close(): Promise<void>;
}

/** What `client.stats()` returns (see src/router/stats.ts for the fields). */
export type ClientStats = FanoutStats;


const GET_OPTIONS = new Set(['table', 'version', 'deadlineMs', 'signal', 'out']);
const PUT_OPTIONS = new Set(['table', 'deadlineMs']);

export class EmbeddingClientImpl implements EmbeddingClient {
  private state: 'open' | 'closed' = 'open';
  private readonly options: ResolvedClientOptions;
  /** Set once the cluster source is open: at once for a manifest, at the first call with etcd. */
  private fanout: Fanout | undefined;
  private source: ClusterSource | undefined;
  private opening: Promise<Fanout> | undefined;
  /** Names this client's put batches; the tag breaks ties between writers within one millisecond. */
  private readonly writerId = randomUUID();
  private readonly writerTag = randomInt(ORDER_SCALE);
  private lastPutMs = 0;
  private readonly metricSet: MetricSet | undefined;

  constructor(options?: EmbeddingClientOptions) {
    this.options = parseClientOptions(options);
    // Before any connection: a registry that holds another client's series is refused here.
    const m = this.options.metrics;
    this.metricSet = m === undefined ? undefined : new MetricSet(m.registry ?? newRegistry());
    if (this.options.etcd === undefined) {
      try {
        // A manifest is read (and refused) at once, as it always was.
        this.source = FileSource.of(resolveManifest(this.options.config));
        this.fanout = this.fanoutOver(this.source);
      } catch (err) {
        this.metricSet?.remove();
        throw err;
      }
    }
  }

  get metrics(): Registry | undefined {
    return this.metricSet?.registry;
  }

  get manifest(): Manifest {
    if (this.source === undefined || this.fanout === undefined) throw new KvError(KvErrorCode.CLOSED, 'the client has not read the cluster from etcd yet');
    return this.source.manifest;
  }

  /** TLS from the manifest's security.tls; the token goes with every call. */
  private fanoutOver(source: ClusterSource): Fanout {
    const fanout = new Fanout(source.manifest, ClusterConnections.of(source, { token: this.options.token }), this.options.policy);
    try {
      if (this.metricSet !== undefined) registerFanoutMetrics(this.metricSet, fanout);
    } catch (err) {
      fanout.close();
      throw err;
    }
    return fanout;
  }

  /** The fan-out, once the cluster source is open; a failed open is tried again at the next call. */
  private ready(): Fanout | Promise<Fanout> {
    if (this.fanout !== undefined) return this.fanout;
    this.opening ??= (async () => {
      const source = await clusterSource({ etcd: this.options.etcd });
      try {
        await source.open();
      } catch (err) {
        await source.close();
        throw err;
      }
      if (this.state !== 'open') {
        await source.close();
        throw new KvError(KvErrorCode.CLOSED, 'the client is closed');
      }
      this.source = source;
      this.fanout = this.fanoutOver(source);
      return this.fanout;
    })().finally(() => {
      this.opening = undefined;
    });
    return this.opening;
  }

  async getEmbeddings(keys: KeyInput, options: GetEmbeddingsOptions): Promise<EmbeddingsResult> {
    // The deadline error is made here so its stack points at the caller.
    const started = Date.now();
    if (this.state !== 'open') throw new KvError(KvErrorCode.CLOSED, 'the client is closed');
    if (typeof options !== 'object' || options === null) throw invalidArgument('options must be an object with at least { table }');
    refuseUnknownOptions(options, GET_OPTIONS);
    const table = checkTableName(options.table, 'options.table');
    const version = options.version === undefined ? 0 : checkVersion(options.version, 'options.version');
    const deadlineMs = options.deadlineMs === undefined ? this.options.deadlineMs : checkPositiveInt(options.deadlineMs, 'options.deadlineMs', MAX_DEADLINE_MS);
    if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) throw invalidArgument('options.signal must be an AbortSignal');
    const len = (keys as { length?: unknown }).length;
    if (typeof len === 'number' && len > this.options.maxKeysPerRequest) {
      throw invalidArgument(`keys holds ${len} keys; at most ${this.options.maxKeysPerRequest} per request (maxKeysPerRequest)`);
    }
    const out = options.out === undefined ? undefined : checkOut(options.out);
    const packed = await packKeys(keys, 'keys');
    const n = packed.length / 2;
    if (out !== undefined && out.found.length < n) throw invalidArgument(`options.out.found holds ${out.found.length} bytes for ${n} keys`);
    const alloc: AnswerAllocator | undefined = out === undefined ? undefined : (m, dim) => {
      if (out.values.length < m * dim) {
        throw invalidArgument(`options.out.values holds ${out.values.length} floats; ${m} keys of dim ${dim} need ${m * dim}`);
      }
      return { values: out.values.subarray(0, m * dim), found: out.found.subarray(0, m), dirty: true };
    };
    const fanout = this.fanout ?? (await this.ready());
    const r = await fanout.lookup({ table, version, keys: packed, deadline: started + deadlineMs, signal: options.signal, alloc });
    return { values: r.values, found: r.found, dim: r.dim, version: r.version };
  }

  /**
   * A real-time update of the table's current version: resolves once every owning group has it on
   * disk, and it is visible on every replica of those groups within a second. The batch applies
   * atomically per group. Concurrent writers of one key: the later write (by client clock) wins.
   * A rejected call may have been applied on some groups; calling again with the same data is safe.
   */
  async putEmbeddings(keys: KeyInput, values: Float32Array, options: PutEmbeddingsOptions): Promise<void> {
    const started = Date.now();
    if (this.state !== 'open') throw new KvError(KvErrorCode.CLOSED, 'the client is closed');
    if (typeof options !== 'object' || options === null) throw invalidArgument('options must be an object with at least { table }');
    refuseUnknownOptions(options, PUT_OPTIONS);
    const table = checkTableName(options.table, 'options.table');
    const deadlineMs = options.deadlineMs === undefined ? this.options.deadlineMs : checkPositiveInt(options.deadlineMs, 'options.deadlineMs', MAX_DEADLINE_MS);
    if (!(values instanceof Float32Array)) throw invalidArgument('values must be a Float32Array of keys.length * dim floats');
    const packed = await packKeys(keys, 'keys');
    const n = packed.length / 2;
    if (n === 0) throw invalidArgument('keys must not be empty');
    if (n > MAX_PUT_KEYS) throw invalidArgument(`keys holds ${n} keys; at most ${MAX_PUT_KEYS} per putEmbeddings call`);
    const dup = repeatedKey(packed);
    if (dup !== undefined) throw invalidArgument(`keys[${dup.first}] and keys[${dup.second}] are the same key ${dup.key}; a put, like a load, takes each key once`);
    if (values.length === 0 || values.length % n !== 0) {
      throw invalidArgument(`values holds ${values.length} floats, not a multiple of the ${n} keys`);
    }
    const bad = firstNonFinite(values);
    if (bad >= 0) throw invalidArgument(`values[${bad}] is ${values[bad]}; vectors must be finite`);
    const fanout = this.fanout ?? (await this.ready());
    this.lastPutMs = Math.max(Date.now(), this.lastPutMs + 1);
    const counters = fanout.puts.of(table);
    counters.requests++;
    counters.keys += n;
    const t0 = performance.now();
    try {
      await putToGroups(fanout.conns, {
        table, keys: packed, values, dim: values.length / n, order: this.lastPutMs * ORDER_SCALE + this.writerTag, writer: this.writerId,
        deadline: started + deadlineMs,
      });
    } catch (err) {
      counters.error(err instanceof KvError ? err.code : KvErrorCode.INTERNAL);
      throw err;
    }
    counters.seconds.observe((performance.now() - t0) / 1000);
  }

  stats(): ClientStats {
    // Before an etcd client's first call: nothing asked yet.
    return this.fanout?.stats() ?? { requests: 0, failures: 0, latencyMs: { p50: NaN, p95: NaN, p99: NaN, samples: 0 }, groups: [] };
  }

  async close(): Promise<void> {
    if (this.state === 'closed') return;
    this.state = 'closed';
    // Its series leave the registry, so that a client made in its place can register them.
    this.metricSet?.remove();
    await this.opening?.catch(() => undefined);
    this.fanout?.close();
    await this.source?.close();
  }
}

/** options.out, checked: two typed arrays of the right kinds that do not overlap. */
function checkOut(out: unknown): { values: Float32Array; found: Uint8Array } {
  if (typeof out !== 'object' || out === null) throw invalidArgument('options.out must be { values: Float32Array, found: Uint8Array }');
  const { values, found } = out as { values?: unknown; found?: unknown };
  if (!(values instanceof Float32Array)) throw invalidArgument('options.out.values must be a Float32Array');
  if (!(found instanceof Uint8Array)) throw invalidArgument('options.out.found must be a Uint8Array');
  if (values.buffer === found.buffer) {
    const a = values.byteOffset;
    const b = found.byteOffset;
    if (a < b + found.byteLength && b < a + values.byteLength) throw invalidArgument('options.out.values and options.out.found overlap');
  }
  return { values, found };
}
