import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { DEFAULT_CONFIG_PATH, resolveManifest, type Manifest } from './manifest.js';

/** How long a replica's registration outlives its last keepalive (etcd lease TTL), in seconds. */
export const DEFAULT_LEASE_TTL_S = 5;
/** An etcd call (not a watch) that has not answered by then fails with KV_UNAVAILABLE. */
export const DEFAULT_ETCD_CALL_TIMEOUT_MS = 3000;

/** Where the cluster's state lives: `{ config }` (a manifest file or object) or `{ etcd }`. */
export interface ClusterSourceOptions {
  config?: string | object | undefined;
  etcd?: EtcdSourceOptions | undefined;
}

export interface EtcdSourceOptions {
  /** `http://host:port` (or `host:port`), one or more. */
  endpoints: string[] | string;
  /** The cluster's name: its keys live under /embkv/<cluster>/. */
  cluster: string;
  /** Lease TTL of a replica's registration (default DEFAULT_LEASE_TTL_S). */
  leaseTtlS?: number;
  /** Bound of one etcd call (default DEFAULT_ETCD_CALL_TIMEOUT_MS). */
  callTimeoutMs?: number;
}

/** A registration lost (etcd away longer than the lease, the process frozen), or restored. */
export type RegistrationEvent = { kind: 'lost'; reason: string } | { kind: 'restored' };

/** A replica's registration, kept alive until close(). */
export interface Registration {
  close(): Promise<void>;
}

/** Something the source reports as it changes: a replica's address (undefined: not registered), a table's current version. */
export type SourceEvent =
  | { kind: 'member'; group: number; replica: number; address: string | undefined }
  | { kind: 'current'; table: string; version: number };

/** A table's current version as the source holds it, with what a compare-and-set compares. */
export interface CurrentVersion {
  version: number | undefined;
  revision: string;
}

/**
 * The cluster's state as every process sees it: the manifest, where each replica is, and (with etcd)
 * each table's current version. A manifest file is the embedded default for one host: its addresses
 * are fixed and versions live on the replicas alone. With etcd, replicas register their addresses
 * under a lease and a publish flips one key per table that replicas and clients follow.
 */
export interface ClusterSource {
  /** Names the source in messages: `cluster.json`, `etcd http://10.0.0.9:2379 cluster prod`. */
  readonly name: string;
  /**
   * True when replicas follow a current-version key of the source (etcd): a publish flips the key
   * and waits for the replicas; false (file) when the publisher flips every replica itself.
   */
  readonly followsVersions: boolean;
  /** Reads the manifest and the current state, and starts following changes. */
  open(): Promise<Manifest>;
  /** The manifest (after open). */
  readonly manifest: Manifest;
  /** The address of replica `replica` of group `group`; undefined while it is not registered. */
  address(group: number, replica: number): string | undefined;
  /** A table's current version as last seen (undefined: the source holds none). */
  currentVersion(table: string): number | undefined;
  /** Every table's current version as last seen. */
  currentVersions(): ReadonlyMap<string, number>;
  /** Calls `listener` on every change; returns the function that stops it. */
  subscribe(listener: (e: SourceEvent) => void): () => void;
  /** Rejects with KV_UNAVAILABLE naming the source when it does not answer now. */
  ensureAvailable(): Promise<void>;
  /** Reads a table's current version from the source itself (not the last seen). */
  readCurrent(table: string): Promise<CurrentVersion>;
  /**
   * Makes `version` current in one compare-and-set against `expected.revision`: refused with
   * KV_LOAD_CONFLICT when another publish changed it since it was read. A file source holds no versions.
   */
  setCurrent(table: string, version: number, expected: CurrentVersion): Promise<void>;
  /**
   * Registers a replica's address under a lease kept alive (and granted again after a loss) until
   * close(); `onChange` hears of a lost registration and of each one restored.
   */
  register(group: number, replica: number, address: string, onChange?: (e: RegistrationEvent) => void): Promise<Registration>;
  close(): Promise<void>;
}

/** The manifest file (or object): fixed addresses, no shared versions. */
export class FileSource implements ClusterSource {
  readonly followsVersions = false;
  readonly name: string;
  private loaded: Manifest | undefined;

  constructor(private readonly config: string | object | Manifest) {
    this.name = typeof config === 'string' ? config : 'the manifest object';
  }

  /** A source over a manifest already read and validated. */
  static of(manifest: Manifest): FileSource {
    const s = new FileSource(manifest);
    s.loaded = manifest;
    return s;
  }

  async open(): Promise<Manifest> {
    this.loaded ??= resolveManifest(this.config);
    return this.loaded;
  }

  get manifest(): Manifest {
    if (this.loaded === undefined) throw new KvError(KvErrorCode.CLOSED, `${this.name} is not read yet`);
    return this.loaded;
  }

  address(group: number, replica: number): string | undefined {
    return this.manifest.groups[group]?.replicas[replica];
  }

  currentVersion(): number | undefined {
    return undefined;
  }

  currentVersions(): ReadonlyMap<string, number> {
    return new Map();
  }

  subscribe(): () => void {
    return () => {};
  }

  async ensureAvailable(): Promise<void> {}

  async readCurrent(): Promise<CurrentVersion> {
    return { version: undefined, revision: '0' };
  }

  async setCurrent(): Promise<void> {}

  async register(): Promise<Registration> {
    return { close: async () => {} };
  }

  async close(): Promise<void> {}
}

const CLUSTER_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const ENDPOINT = /^(https?:\/\/)?([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):\d{1,5}$/;

/** EtcdSourceOptions checked: endpoints as URLs, the cluster name, the TTL. */
export function parseEtcdOptions(raw: unknown, where = 'etcd'): Required<EtcdSourceOptions> & { endpoints: string[] } {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw invalidArgument(`${where} must be { endpoints, cluster }`);
  const o = raw as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!['endpoints', 'cluster', 'leaseTtlS', 'callTimeoutMs'].includes(k)) {
      throw invalidArgument(`${where}: unknown option "${k}" (known: endpoints, cluster, leaseTtlS, callTimeoutMs)`);
    }
  }
  const list = typeof o['endpoints'] === 'string' ? (o['endpoints'] as string).split(',') : o['endpoints'];
  if (!Array.isArray(list) || list.length === 0 || list.length > 32) throw invalidArgument(`${where}.endpoints must name 1 to 32 etcd endpoints (http://host:port)`);
  const endpoints = list.map((e: unknown) => {
    if (typeof e !== 'string' || !ENDPOINT.test(e.trim())) throw invalidArgument(`${where}.endpoints: ${JSON.stringify(e)} is not an etcd endpoint (http://host:port)`);
    const t = e.trim();
    return t.startsWith('http') ? t : `http://${t}`;
  });
  const cluster = o['cluster'];
  if (typeof cluster !== 'string' || !CLUSTER_NAME.test(cluster)) {
    throw invalidArgument(`${where}.cluster must be a name of 1 to 128 letters, digits, '.', '_' or '-', got ${JSON.stringify(cluster)}`);
  }
  const ttl = o['leaseTtlS'] ?? DEFAULT_LEASE_TTL_S;
  if (typeof ttl !== 'number' || !Number.isInteger(ttl) || ttl < 2 || ttl > 3600) throw invalidArgument(`${where}.leaseTtlS must be an integer in [2, 3600]`);
  const callTimeoutMs = o['callTimeoutMs'] ?? DEFAULT_ETCD_CALL_TIMEOUT_MS;
  if (typeof callTimeoutMs !== 'number' || !Number.isInteger(callTimeoutMs) || callTimeoutMs < 100 || callTimeoutMs > 600_000) {
    throw invalidArgument(`${where}.callTimeoutMs must be an integer in [100, 600000]`);
  }
  return { endpoints, cluster, leaseTtlS: ttl, callTimeoutMs };
}

/**
 * The source `options` name, not opened: etcd (whose client loads only then) or the manifest
 * (default ./cluster.json). Giving both is refused.
 */
export async function clusterSource(options: ClusterSourceOptions): Promise<ClusterSource> {
  if (options.etcd !== undefined) {
    if (options.config !== undefined) throw invalidArgument('give the cluster as either a manifest (config) or etcd, not both');
    const etcd = parseEtcdOptions(options.etcd);
    const { EtcdSource } = await import('./etcd-source.js');
    return new EtcdSource(etcd);
  }
  return new FileSource(options.config ?? DEFAULT_CONFIG_PATH);
}
