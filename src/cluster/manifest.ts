import { readFileSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { KvError, KvErrorCode } from '../common/errors.js';

/** The cluster manifest (`cluster.json`, SPEC: Cluster manifest). */
export interface Manifest {
  partitions: number;
  groups: { replicas: string[] }[];
  /** How many sealed versions of a table a replica keeps (the current one included). */
  keepVersions: number;
  /** TLS and tokens (README: Security); absent: plain text, no authentication, loopback only. */
  security?: SecurityConfig;
}

/** The manifest's `security` block, with its paths resolved against the manifest file's directory. */
export interface SecurityConfig {
  tls?: TlsConfig;
  /** A JSON array of { token, role } (see common/security.ts). */
  tokens?: string;
}

export interface TlsConfig {
  /** PEM certificate chain and key: a replica's or router's server certificate, and a client's certificate under mTLS. */
  cert?: string;
  key?: string;
  /** PEM CA bundle: the root clients verify servers with, and servers verify client certificates with. */
  ca?: string;
  /** Servers require a client certificate signed by `ca` (mTLS); clients then present cert/key. Default false. */
  requireClientCert?: boolean;
}

export const DEFAULT_KEEP_VERSIONS = 2;
export const DEFAULT_CONFIG_PATH = 'cluster.json';
const MAX_GROUPS = 4096;
const MAX_REPLICAS = 64;

const configError = (where: string, message: string): KvError =>
  new KvError(KvErrorCode.INVALID_CONFIG, `${where}: ${message}`);

/** Validates a manifest object; unknown fields are refused so that a typo never passes silently. */
export function parseManifest(raw: unknown, where = 'cluster manifest', baseDir = '.'): Manifest {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw configError(where, 'must be a JSON object');
  const obj = raw as Record<string, unknown>;
  for (const k of Object.keys(obj)) {
    if (k !== 'partitions' && k !== 'groups' && k !== 'keepVersions' && k !== 'security') {
      throw configError(where, `unknown field "${k}" (known: partitions, groups, keepVersions, security)`);
    }
  }
  const partitions = obj['partitions'];
  if (typeof partitions !== 'number' || !Number.isInteger(partitions) || partitions < 1 || partitions > 65536) {
    throw configError(where, `"partitions" must be an integer in [1, 65536], got ${JSON.stringify(partitions)}`);
  }
  const groups = obj['groups'];
  if (!Array.isArray(groups) || groups.length === 0 || groups.length > MAX_GROUPS) {
    throw configError(where, `"groups" must be a non-empty array of at most ${MAX_GROUPS} groups`);
  }
  if (groups.length > partitions) {
    throw configError(where, `${groups.length} groups but only ${partitions} partitions: every group needs a partition`);
  }
  const seen = new Set<string>();
  const parsed = groups.map((g: unknown, gi: number) => {
    if (typeof g !== 'object' || g === null || Array.isArray(g)) throw configError(where, `groups[${gi}] must be an object`);
    const go = g as Record<string, unknown>;
    for (const k of Object.keys(go)) {
      if (k !== 'replicas') throw configError(where, `groups[${gi}]: unknown field "${k}" (known: replicas)`);
    }
    const replicas = go['replicas'];
    if (!Array.isArray(replicas) || replicas.length === 0 || replicas.length > MAX_REPLICAS) {
      throw configError(where, `groups[${gi}].replicas must be a non-empty array of "host:port" addresses`);
    }
    return {
      replicas: replicas.map((a: unknown, ri: number) => {
        if (typeof a !== 'string' || !/^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(a)) {
          throw configError(where, `groups[${gi}].replicas[${ri}] must be "host:port", got ${JSON.stringify(a)}`);
        }
        const port = Number(a.slice(a.lastIndexOf(':') + 1));
        if (port < 1 || port > 65535) throw configError(where, `groups[${gi}].replicas[${ri}] has port ${port} out of range`);
        const canonical = `${a.slice(0, a.lastIndexOf(':')).toLowerCase()}:${port}`;
        if (seen.has(canonical)) throw configError(where, `address ${a} appears twice`);
        seen.add(canonical);
        return a;
      }),
    };
  });
  const keep = obj['keepVersions'] === undefined ? DEFAULT_KEEP_VERSIONS : obj['keepVersions'];
  if (typeof keep !== 'number' || !Number.isInteger(keep) || keep < 1 || keep > 100) {
    throw configError(where, `"keepVersions" must be an integer in [1, 100], got ${JSON.stringify(keep)}`);
  }
  const security = obj['security'] === undefined ? undefined : parseSecurity(obj['security'], where, baseDir);
  return { partitions, groups: parsed, keepVersions: keep, ...(security ? { security } : {}) };
}

/** `security`: every field optional, unknown ones refused; paths resolved against `baseDir`. */
function parseSecurity(raw: unknown, where: string, baseDir: string): SecurityConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw configError(where, '"security" must be an object { tls?, tokens? }');
  const obj = raw as Record<string, unknown>;
  for (const k of Object.keys(obj)) {
    if (k !== 'tls' && k !== 'tokens') throw configError(where, `security: unknown field "${k}" (known: tls, tokens)`);
  }
  const path = (v: unknown, name: string): string => {
    if (typeof v !== 'string' || v === '' || v.length > 4096) throw configError(where, `security.${name} must be a non-empty file path, got ${JSON.stringify(v)}`);
    return isAbsolute(v) ? v : resolve(baseDir, v);
  };
  const out: SecurityConfig = {};
  if (obj['tls'] !== undefined) {
    const t = obj['tls'];
    if (typeof t !== 'object' || t === null || Array.isArray(t)) throw configError(where, '"security.tls" must be an object { cert?, key?, ca?, requireClientCert? }');
    const tls: TlsConfig = {};
    for (const [k, v] of Object.entries(t as Record<string, unknown>)) {
      if (k === 'cert' || k === 'key' || k === 'ca') tls[k] = path(v, `tls.${k}`);
      else if (k === 'requireClientCert') {
        if (typeof v !== 'boolean') throw configError(where, `security.tls.requireClientCert must be true or false, got ${JSON.stringify(v)}`);
        tls.requireClientCert = v;
      } else throw configError(where, `security.tls: unknown field "${k}" (known: cert, key, ca, requireClientCert)`);
    }
    if ((tls.cert === undefined) !== (tls.key === undefined)) throw configError(where, 'security.tls: give both cert and key, or neither');
    if (tls.requireClientCert && (tls.ca === undefined || tls.cert === undefined)) {
      throw configError(where, 'security.tls.requireClientCert needs ca (to verify client certificates) and cert/key (which clients present)');
    }
    out.tls = tls;
  }
  if (obj['tokens'] !== undefined) out.tokens = path(obj['tokens'], 'tokens');
  return out;
}

/** Reads and validates a manifest file. */
export function loadManifest(path: string): Manifest {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new KvError(KvErrorCode.INVALID_CONFIG, `cannot read cluster manifest ${path}: ${(err as Error).message}`, { cause: err });
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new KvError(KvErrorCode.INVALID_CONFIG, `${path} is not valid JSON: ${(err as Error).message}`, { cause: err });
  }
  return parseManifest(raw, path, dirname(resolve(path)));
}

/** A manifest given as a path or an object (whose security paths are relative to the working directory). */
export function resolveManifest(config: string | unknown): Manifest {
  return typeof config === 'string' ? loadManifest(config) : parseManifest(config);
}

/** A manifest with `groups` x `replicas` on consecutive loopback ports from `basePort`. */
export function localManifest(groups: number, replicas: number, basePort: number, partitions = 64): Manifest {
  return {
    partitions,
    keepVersions: DEFAULT_KEEP_VERSIONS,
    groups: Array.from({ length: groups }, (_, g) => ({
      replicas: Array.from({ length: replicas }, (_, r) => `127.0.0.1:${basePort + g * replicas + r}`),
    })),
  };
}
