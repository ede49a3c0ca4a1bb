import { hostname } from 'node:os';
import { Etcd3, type Lease, type Watcher } from 'etcd3';
import { KvError, KvErrorCode } from '../common/errors.js';
import { parseManifest, type Manifest } from './manifest.js';
import type { ClusterSource, CurrentVersion, EtcdSourceOptions, Registration, RegistrationEvent, SourceEvent } from './source.js';

/**
 * The keys of one cluster, under /embkv/<cluster>/ (docs/operations.md: Keys in etcd):
 *
 *   manifest                   the manifest JSON, as `kvctl cluster init` stored it
 *   members/<group>/<replica>  {"address":"10.0.0.5:7100","host":...,"pid":...,"since":...}, under the replica's lease
 *   tables/<table>/current     the table's current version, a decimal number
 */
export const etcdPrefix = (cluster: string): string => `/embkv/${cluster}/`;
const MEMBER = /^members\/(\d{1,4})\/(\d{1,2})$/;
const CURRENT = /^tables\/([A-Za-z0-9_.-]{1,128})\/current$/;
/** Re-registration after a lost lease: the first try at once, then every so often while etcd is away. */
const REREGISTER_MIN_MS = 250;
const REREGISTER_MAX_MS = 2000;

/** A watch stream broken by etcd going away is opened again after at most this long. */
class CappedBackoff {
  constructor(readonly duration: number, private readonly max: number) {}
  next(): CappedBackoff {
    return new CappedBackoff(Math.min(this.max, this.duration * 2), this.max);
  }
}

/** The cluster's state in etcd: the manifest, the members' addresses, the current version of each table. */
export class EtcdSource implements ClusterSource {
  readonly followsVersions = true;
  readonly name: string;
  private readonly client: Etcd3;
  private readonly prefix: string;
  private loaded: Manifest | undefined;
  private readonly members = new Map<string, string>();
  private readonly current = new Map<string, number>();
  private readonly listeners = new Set<(e: SourceEvent) => void>();
  private watcher: Watcher | undefined;
  private readonly registrations = new Set<EtcdRegistration>();
  private closed = false;

  constructor(private readonly options: Required<EtcdSourceOptions> & { endpoints: string[] }) {
    this.name = `etcd ${options.endpoints.join(',')} cluster ${options.cluster}`;
    this.prefix = etcdPrefix(options.cluster);
    this.client = new Etcd3({
      hosts: options.endpoints,
      dialTimeout: options.callTimeoutMs,
      defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + options.callTimeoutMs }),
      faultHandling: { watchBackoff: new CappedBackoff(250, 2000) as never },
    });
  }

  /** A failure of etcd as the one error every caller sees: KV_UNAVAILABLE naming etcd and its endpoints. */
  unavailable(what: string, err: unknown): KvError {
    if (err instanceof KvError) return err;
    const e = err as { details?: unknown; message?: unknown };
    const raw = typeof e?.details === 'string' && e.details !== '' ? e.details : typeof e?.message === 'string' ? e.message : String(err);
    // grpc-js wraps the reason ("No connection established. Last error: Error: connect ECONNREFUSED ... Resolution note: ").
    const msg = raw.replace(/\.? *Resolution note: *$/, '').replace(/^No connection established\. Last error: (Error: )?/, '').replace(/^\d+ [A-Z_]+: /, '');
    return new KvError(KvErrorCode.UNAVAILABLE, `KV_UNAVAILABLE: etcd ${this.options.endpoints.join(',')} (cluster ${this.options.cluster}): ${what}: ${msg}`, { cause: err });
  }

  private async etcd<T>(what: string, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new KvError(KvErrorCode.CLOSED, `${this.name} is closed`);
    try {
      return await fn();
    } catch (err) {
      throw this.unavailable(what, err);
    }
  }

  get manifest(): Manifest {
    if (this.loaded === undefined) throw new KvError(KvErrorCode.CLOSED, `${this.name} is not open`);
    return this.loaded;
  }

  async open(): Promise<Manifest> {
    if (this.loaded !== undefined) return this.loaded;
    const res = await this.etcd('reading the cluster', () => this.client.getAll().prefix(this.prefix).exec());
    let manifestText: string | undefined;
    for (const kv of res.kvs) {
      const key = kv.key.toString().slice(this.prefix.length);
      if (key === 'manifest') manifestText = kv.value.toString();
      else this.apply(key, kv.value.toString(), false);
    }
    if (manifestText === undefined) {
      throw new KvError(KvErrorCode.INVALID_CONFIG, `${this.name} holds no manifest; store one with kvctl cluster init --etcd ... --cluster ${this.options.cluster} --config cluster.json`);
    }
    this.loaded = parseJsonManifest(manifestText, `${this.name} manifest`);
    const watcher = await this.etcd('watching the cluster', () =>
      this.client.watch().prefix(this.prefix).startRevision(String(Number(res.header.revision) + 1)).create(),
    );
    watcher.on('put', (kv) => this.apply(kv.key.toString().slice(this.prefix.length), kv.value.toString(), true));
    watcher.on('delete', (kv) => this.apply(kv.key.toString().slice(this.prefix.length), undefined, true));
    // Reconnection is the client's (watchBackoff): 'error' would otherwise be thrown as unhandled.
    watcher.on('error', () => {});
    this.watcher = watcher;
    return this.loaded;
  }

  /** One key's value (undefined: deleted) into the state, reported to the listeners when `notify`. */
  private apply(key: string, value: string | undefined, notify: boolean): void {
    let m = MEMBER.exec(key);
    if (m !== null) {
      const group = Number(m[1]);
      const replica = Number(m[2]);
      const address = value === undefined ? undefined : memberAddress(value);
      if (address === undefined) this.members.delete(`${group}/${replica}`);
      else this.members.set(`${group}/${replica}`, address);
      if (notify) this.emit({ kind: 'member', group, replica, address });
      return;
    }
    m = CURRENT.exec(key);
    if (m !== null && value !== undefined && /^\d{1,16}$/.test(value.trim())) {
      const version = Number(value.trim());
      if (!Number.isSafeInteger(version) || version < 1) return;
      this.current.set(m[1]!, version);
      if (notify) this.emit({ kind: 'current', table: m[1]!, version });
    }
  }

  private emit(e: SourceEvent): void {
    for (const l of this.listeners) l(e);
  }

  address(group: number, replica: number): string | undefined {
    return this.members.get(`${group}/${replica}`);
  }

  currentVersion(table: string): number | undefined {
    return this.current.get(table);
  }

  /** Every table's current version as last seen. */
  currentVersions(): ReadonlyMap<string, number> {
    return new Map(this.current);
  }

  subscribe(listener: (e: SourceEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async ensureAvailable(): Promise<void> {
    await this.etcd('checking that etcd answers', () => this.client.get(`${this.prefix}manifest`).exists());
  }

  async readCurrent(table: string): Promise<CurrentVersion> {
    const res = await this.etcd(`reading the current version of ${table}`, () => this.client.get(`${this.prefix}tables/${table}/current`).exec());
    const kv = res.kvs[0];
    if (kv === undefined) return { version: undefined, revision: '0' };
    const v = Number(kv.value.toString());
    return { version: Number.isSafeInteger(v) && v > 0 ? v : undefined, revision: String(kv.mod_revision) };
  }

  async setCurrent(table: string, version: number, expected: CurrentVersion): Promise<void> {
    const key = `${this.prefix}tables/${table}/current`;
    const res = await this.etcd(`making ${table} v${version} current`, () =>
      this.client.if(key, 'Mod', '==', expected.revision).then(this.client.put(key).value(String(version))).commit(),
    );
    if (!res.succeeded) {
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `${this.name}: the current version of ${table} changed while this publish ran (another publish or rollback?); nothing was changed: run it again`);
    }
  }

  /** Stores the manifest: refused when a different one is stored, unless `force`. Returns whether it changed. */
  async storeManifest(text: string, force: boolean): Promise<'stored' | 'unchanged' | 'replaced'> {
    const manifest = parseJsonManifest(text, 'the manifest');
    const key = `${this.prefix}manifest`;
    const existing = await this.etcd('reading the stored manifest', () => this.client.get(key).string());
    if (existing !== null) {
      let same = false;
      try {
        same = JSON.stringify(parseJsonManifest(existing, 'stored')) === JSON.stringify(manifest);
      } catch {
        same = false;
      }
      if (same) return 'unchanged';
      if (!force) {
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `${this.name} already holds a different manifest; give --force to replace it (running replicas and clients keep the one they read until they restart)`);
      }
    }
    await this.etcd('storing the manifest', () => this.client.put(key).value(text).exec());
    return existing === null ? 'stored' : 'replaced';
  }

  async register(group: number, replica: number, address: string, onChange?: (e: RegistrationEvent) => void): Promise<Registration> {
    const r = new EtcdRegistration(this, this.client, `${this.prefix}members/${group}/${replica}`, address, this.options.leaseTtlS, onChange ?? (() => {}));
    await r.start();
    this.registrations.add(r);
    return {
      close: async () => {
        this.registrations.delete(r);
        await r.close();
      },
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await Promise.allSettled([...this.registrations].map((r) => r.close()));
    this.closed = true;
    this.listeners.clear();
    await this.watcher?.cancel().catch(() => {});
    this.client.close();
  }
}

/**
 * A replica's address under a lease: put once granted; when the lease is lost (etcd was away longer
 * than the TTL, or the process was frozen), granted and put again until it succeeds.
 */
class EtcdRegistration {
  private lease: Lease | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private retryMs = REREGISTER_MIN_MS;
  private closed = false;
  private readonly value: string;

  constructor(
    private readonly source: EtcdSource, private readonly client: Etcd3, private readonly key: string, address: string, private readonly ttlS: number,
    private readonly onChange: (e: RegistrationEvent) => void,
  ) {
    this.value = JSON.stringify({ address, host: hostname(), pid: process.pid, since: Date.now() });
  }

  /** The first registration: rejects with KV_UNAVAILABLE when etcd does not take it. */
  async start(): Promise<void> {
    try {
      await this.grantAndPut();
    } catch (err) {
      throw this.source.unavailable(`registering ${this.key}`, err);
    }
  }

  private async grantAndPut(): Promise<void> {
    const lease = this.client.lease(this.ttlS, { autoKeepAlive: true });
    lease.on('lost', (err) => {
      if (this.lease !== lease || this.closed) return;
      this.onChange({ kind: 'lost', reason: this.source.unavailable('keeping the registration alive', err).message });
      this.again();
    });
    this.lease = lease;
    try {
      await lease.put(this.key).value(this.value).exec();
    } catch (err) {
      if (this.lease === lease) this.lease = undefined;
      lease.release();
      throw err;
    }
  }

  /** Lost: try again, with the interval doubling up to REREGISTER_MAX_MS while etcd does not answer. */
  private again(): void {
    this.lease = undefined;
    if (this.closed || this.retryTimer !== undefined) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      if (this.closed) return;
      this.grantAndPut().then(
        () => {
          this.retryMs = REREGISTER_MIN_MS;
          if (!this.closed) this.onChange({ kind: 'restored' });
        },
        () => {
          this.retryMs = Math.min(REREGISTER_MAX_MS, this.retryMs * 2);
          this.again();
        },
      );
    }, this.retryMs);
    this.retryTimer.unref();
  }

  /** Revokes the lease, so that the key goes at once (best effort: without etcd, it expires). */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.retryTimer);
    const lease = this.lease;
    this.lease = undefined;
    if (lease !== undefined) await lease.revoke({ deadline: Date.now() + 1000 }).catch(() => lease.release());
  }
}

function memberAddress(value: string): string | undefined {
  try {
    const v = JSON.parse(value) as { address?: unknown };
    return typeof v.address === 'string' && v.address.length <= 300 ? v.address : undefined;
  } catch {
    return undefined;
  }
}

function parseJsonManifest(text: string, where: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new KvError(KvErrorCode.INVALID_CONFIG, `${where} is not valid JSON: ${(err as Error).message}`);
  }
  // Security paths are relative to the working directory of each process.
  return parseManifest(raw, where);
}
