import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { KvError, KvErrorCode } from '../common/errors.js';
import type { Manifest, SecurityConfig } from './manifest.js';

/**
 * Authentication and transport security (README: Security).
 *
 * A tokens file is a JSON array of { token, role }. A call carries `authorization: Bearer <token>`;
 * the server compares the SHA-256 of what was sent with the SHA-256 of every known token, each
 * with crypto.timingSafeEqual and without stopping at a match, so the time taken says nothing of
 * how much of a token was right, nor which one matched.
 */

export type Role = 'read' | 'write' | 'admin';
const ROLE_RANK: Record<Role, number> = { read: 1, write: 2, admin: 3 };

/**
 * The least role that may call each method. Anything not listed (loads, publish, rollback, drops,
 * PutsSince, which is peer sync) needs admin.
 */
const METHOD_ROLE: Record<string, Role> = {
  Lookup: 'read',
  Status: 'read',
  Stats: 'read',
  Put: 'write',
};

export const requiredRole = (method: string): Role => METHOD_ROLE[method] ?? 'admin';

export const MIN_TOKEN_CHARS = 16;
export const MAX_TOKEN_CHARS = 512;
const MAX_TOKENS = 10_000;
export const AUTHORIZATION = 'authorization';

const sha256 = (s: string): Buffer => createHash('sha256').update(s, 'utf8').digest();

/** Constant-time string equality: fixed-length digests of both, compared with timingSafeEqual. */
export function tokensEqual(a: string, b: string): boolean {
  return timingSafeEqual(sha256(a), sha256(b));
}

export interface TokenEntry {
  token: string;
  role: Role;
}

const tokensError = (path: string, message: string): KvError => new KvError(KvErrorCode.INVALID_CONFIG, `tokens file ${path}: ${message}`);

/** Validates the contents of a tokens file; every error names the file and the entry. */
export function parseTokens(raw: unknown, path: string): TokenEntry[] {
  if (!Array.isArray(raw)) throw tokensError(path, 'must be a JSON array of { "token": "...", "role": "read" | "write" | "admin" }');
  if (raw.length === 0) throw tokensError(path, 'holds no tokens: every call would be refused');
  if (raw.length > MAX_TOKENS) throw tokensError(path, `holds ${raw.length} tokens; at most ${MAX_TOKENS}`);
  const seen = new Set<string>();
  return raw.map((e: unknown, i: number) => {
    if (typeof e !== 'object' || e === null || Array.isArray(e)) throw tokensError(path, `entry ${i} must be an object { token, role }`);
    for (const k of Object.keys(e)) if (k !== 'token' && k !== 'role') throw tokensError(path, `entry ${i}: unknown field "${k}" (known: token, role)`);
    const { token, role } = e as { token?: unknown; role?: unknown };
    if (typeof token !== 'string' || token.length < MIN_TOKEN_CHARS || token.length > MAX_TOKEN_CHARS || !/^[\x21-\x7e]+$/.test(token)) {
      throw tokensError(path, `entry ${i}: "token" must be ${MIN_TOKEN_CHARS}-${MAX_TOKEN_CHARS} printable ASCII characters without spaces (openssl rand -hex 32 makes one)`);
    }
    if (role !== 'read' && role !== 'write' && role !== 'admin') throw tokensError(path, `entry ${i}: "role" must be "read", "write" or "admin", got ${JSON.stringify(role)}`);
    if (seen.has(token)) throw tokensError(path, `entry ${i}: the token of an earlier entry appears again`);
    seen.add(token);
    return { token, role };
  });
}

export function loadTokens(path: string): TokenEntry[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw tokensError(path, `cannot be read: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw tokensError(path, `is not valid JSON: ${(err as Error).message}`);
  }
  return parseTokens(raw, path);
}

/**
 * The server side: who may call what. Holds the digests of the tokens file's tokens; reload()
 * re-reads the file (on SIGHUP) and keeps the old tokens if the new file is invalid.
 */
export class TokenAuth {
  private entries: { digest: Buffer; role: Role }[] = [];
  private admin: string[] = [];

  constructor(readonly path: string) {
    this.set(loadTokens(path));
  }

  /**
   * Re-reads the file; throws (keeping the tokens in force) if it is invalid, after logging either
   * outcome to `log`. Returns the token count.
   */
  reload(log?: Logger): number {
    let tokens: TokenEntry[];
    try {
      tokens = loadTokens(this.path);
    } catch (err) {
      log?.error({ err: (err as Error).message }, 'tokens file refused; the tokens in force stay');
      throw err;
    }
    this.set(tokens);
    log?.info({ tokens: tokens.length, file: this.path }, 'tokens reloaded');
    return tokens.length;
  }

  /** The admin tokens, in file order: the credentials a replica pulls its peers' put logs with. */
  adminTokens(): readonly string[] {
    return this.admin;
  }

  private set(tokens: TokenEntry[]): void {
    this.entries = tokens.map((t) => ({ digest: sha256(t.token), role: t.role }));
    this.admin = tokens.filter((t) => t.role === 'admin').map((t) => t.token);
  }

  /** The role of the call's bearer token; throws KV_UNAUTHENTICATED if there is none or it is unknown. */
  roleOf(metadata: grpc.Metadata): Role {
    const values = metadata.get(AUTHORIZATION);
    const header = values.length === 1 ? values[0] : undefined;
    if (typeof header !== 'string' || !header.startsWith('Bearer ')) {
      throw new KvError(KvErrorCode.UNAUTHENTICATED, 'KV_UNAUTHENTICATED: this server needs a token (authorization: Bearer <token>; kvctl: EMBKV_TOKEN or --token-file, SDK: { token })');
    }
    const sent = sha256(header.slice(7));
    let role: Role | undefined;
    // Every entry is compared, match or not.
    for (const e of this.entries) if (timingSafeEqual(sent, e.digest) && role === undefined) role = e.role;
    if (role === undefined) throw new KvError(KvErrorCode.UNAUTHENTICATED, 'KV_UNAUTHENTICATED: unknown token');
    return role;
  }

  /** Throws KV_UNAUTHENTICATED or KV_PERMISSION_DENIED unless the call's token may call `method`. */
  check(metadata: grpc.Metadata, method: string): Role {
    const role = this.roleOf(metadata);
    const need = requiredRole(method);
    if (ROLE_RANK[role] < ROLE_RANK[need]) throw new KvError(KvErrorCode.PERMISSION_DENIED, `KV_PERMISSION_DENIED: role ${role} may not call ${method}`);
    return role;
  }
}

function readPem(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new KvError(KvErrorCode.INVALID_CONFIG, `security.tls.${what} ${path} cannot be read: ${(err as Error).message}`, { cause: err });
  }
}

/** A server's credentials: TLS from security.tls (mTLS with requireClientCert), else plain text. */
export function serverCredentials(security: SecurityConfig | undefined): grpc.ServerCredentials {
  const tls = security?.tls;
  if (tls === undefined) return grpc.ServerCredentials.createInsecure();
  if (tls.cert === undefined || tls.key === undefined) {
    throw new KvError(KvErrorCode.INVALID_CONFIG, 'security.tls needs cert and key to serve TLS');
  }
  const ca = tls.ca === undefined ? null : readPem(tls.ca, 'ca');
  return grpc.ServerCredentials.createSsl(ca, [{ cert_chain: readPem(tls.cert, 'cert'), private_key: readPem(tls.key, 'key') }], tls.requireClientCert === true);
}

/**
 * A client's channel credentials: TLS with `ca` as the root (the system roots without it), presenting
 * cert/key when the servers require client certificates; plain text without security.tls.
 */
export function channelCredentials(security: SecurityConfig | undefined): grpc.ChannelCredentials {
  const tls = security?.tls;
  if (tls === undefined) return grpc.credentials.createInsecure();
  const ca = tls.ca === undefined ? null : readPem(tls.ca, 'ca');
  if (tls.requireClientCert && tls.cert !== undefined && tls.key !== undefined) {
    return grpc.credentials.createSsl(ca, readPem(tls.key, 'key'), readPem(tls.cert, 'cert'));
  }
  return grpc.credentials.createSsl(ca);
}

/** The server side's token checks, or undefined when the manifest names no tokens file. */
export function tokenAuthOf(manifest: Manifest): TokenAuth | undefined {
  const path = manifest.security?.tokens;
  return path === undefined ? undefined : new TokenAuth(path);
}

/** Validates a client's token (SDK option, EMBKV_TOKEN, --token-file contents). */
export function checkClientToken(token: unknown, where: string): string {
  if (typeof token !== 'string' || token.length < 1 || token.length > MAX_TOKEN_CHARS || !/^[\x21-\x7e]+$/.test(token)) {
    throw new KvError(KvErrorCode.INVALID_ARGUMENT, `${where} must be a token of 1-${MAX_TOKEN_CHARS} printable ASCII characters without spaces`);
  }
  return token;
}

/** Metadata carrying `token`, for one call. */
export function authMetadata(token: string | undefined): grpc.Metadata {
  const md = new grpc.Metadata();
  if (token !== undefined) md.set(AUTHORIZATION, `Bearer ${token}`);
  return md;
}

/** 127.0.0.0/8, ::1 and localhost: where a server without security may listen (protected mode). */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  if (/^::ffff:127\.\d+\.\d+\.\d+$/.test(h)) return true;
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** The host part of "host:port" or "[v6]:port". */
export const hostOf = (address: string): string => address.slice(0, address.lastIndexOf(':'));

/**
 * Protected mode: a server with neither TLS nor tokens refuses a non-loopback address unless the
 * operator said --insecure. Throws the one-line reason.
 */
export function checkProtectedMode(security: SecurityConfig | undefined, address: string, insecure: boolean, what: string): void {
  if (insecure || security?.tls !== undefined || security?.tokens !== undefined) return;
  if (isLoopbackHost(hostOf(address))) return;
  throw new KvError(KvErrorCode.INVALID_CONFIG,
    `${what} would listen on ${address}, which is not loopback, with no security (anyone who reaches it could replace or drop tables): ` +
    'configure "security" (tls, tokens) in the manifest, or pass --insecure');
}
