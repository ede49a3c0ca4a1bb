import { Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';

/** Stable error codes. Tests and callers branch on `code`, never on messages. */
export const KvErrorCode = {
  INVALID_ARGUMENT: 'KV_INVALID_ARGUMENT',
  INVALID_CONFIG: 'KV_INVALID_CONFIG',
  INVALID_DATA: 'KV_INVALID_DATA',
  UNAVAILABLE: 'KV_UNAVAILABLE',
  DEADLINE_EXCEEDED: 'KV_DEADLINE_EXCEEDED',
  ABORTED: 'KV_ABORTED',
  TABLE_NOT_FOUND: 'KV_TABLE_NOT_FOUND',
  VERSION_NOT_FOUND: 'KV_VERSION_NOT_FOUND',
  VERSION_EXISTS: 'KV_VERSION_EXISTS',
  VERSION_TOO_OLD: 'KV_VERSION_TOO_OLD',
  LOAD_CONFLICT: 'KV_LOAD_CONFLICT',
  DIM_MISMATCH: 'KV_DIM_MISMATCH',
  DUPLICATE_KEY: 'KV_DUPLICATE_KEY',
  CLOSED: 'KV_CLOSED',
  RESOURCE_EXHAUSTED: 'KV_RESOURCE_EXHAUSTED',
  INTERNAL: 'KV_INTERNAL',
  /** What a replica's disk holds does not match what it recorded (checksum, length, a repeated key). */
  DATA_CORRUPT: 'KV_DATA_CORRUPT',
  /** The data directory is held by another process (another replica on the same --data). */
  DATA_DIR_LOCKED: 'KV_DATA_DIR_LOCKED',
  /** No token, or one the server does not know (gRPC UNAUTHENTICATED). */
  UNAUTHENTICATED: 'KV_UNAUTHENTICATED',
  /** A known token whose role may not call this method (gRPC PERMISSION_DENIED). */
  PERMISSION_DENIED: 'KV_PERMISSION_DENIED',
} as const;
export type KvErrorCodeName = (typeof KvErrorCode)[keyof typeof KvErrorCode];

export interface KvErrorOptions {
  cause?: unknown;
  /** Extra machine-readable detail (a row index within a batch, a group number...). */
  detail?: Record<string, string | number>;
}

export class KvError extends Error {
  readonly code: KvErrorCodeName;
  readonly detail: Record<string, string | number> | undefined;
  constructor(code: KvErrorCodeName, message: string, options: KvErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'KvError';
    this.code = code;
    this.detail = options.detail;
  }
}

export const invalidArgument = (message: string, options?: KvErrorOptions): KvError =>
  new KvError(KvErrorCode.INVALID_ARGUMENT, message, options);

const CODE_TO_STATUS: Record<KvErrorCodeName, GrpcStatus> = {
  KV_INVALID_ARGUMENT: GrpcStatus.INVALID_ARGUMENT,
  KV_INVALID_CONFIG: GrpcStatus.INVALID_ARGUMENT,
  KV_INVALID_DATA: GrpcStatus.INVALID_ARGUMENT,
  KV_DIM_MISMATCH: GrpcStatus.INVALID_ARGUMENT,
  KV_DUPLICATE_KEY: GrpcStatus.INVALID_ARGUMENT,
  KV_UNAVAILABLE: GrpcStatus.UNAVAILABLE,
  KV_DEADLINE_EXCEEDED: GrpcStatus.DEADLINE_EXCEEDED,
  KV_ABORTED: GrpcStatus.CANCELLED,
  KV_TABLE_NOT_FOUND: GrpcStatus.NOT_FOUND,
  KV_VERSION_NOT_FOUND: GrpcStatus.NOT_FOUND,
  KV_VERSION_EXISTS: GrpcStatus.ALREADY_EXISTS,
  KV_VERSION_TOO_OLD: GrpcStatus.FAILED_PRECONDITION,
  KV_LOAD_CONFLICT: GrpcStatus.FAILED_PRECONDITION,
  KV_CLOSED: GrpcStatus.UNAVAILABLE,
  KV_RESOURCE_EXHAUSTED: GrpcStatus.RESOURCE_EXHAUSTED,
  KV_INTERNAL: GrpcStatus.INTERNAL,
  KV_DATA_CORRUPT: GrpcStatus.DATA_LOSS,
  KV_DATA_DIR_LOCKED: GrpcStatus.FAILED_PRECONDITION,
  KV_UNAUTHENTICATED: GrpcStatus.UNAUTHENTICATED,
  KV_PERMISSION_DENIED: GrpcStatus.PERMISSION_DENIED,
};

const STATUS_TO_CODE: Partial<Record<GrpcStatus, KvErrorCodeName>> = {
  [GrpcStatus.INVALID_ARGUMENT]: KvErrorCode.INVALID_ARGUMENT,
  [GrpcStatus.UNAVAILABLE]: KvErrorCode.UNAVAILABLE,
  [GrpcStatus.DEADLINE_EXCEEDED]: KvErrorCode.DEADLINE_EXCEEDED,
  [GrpcStatus.CANCELLED]: KvErrorCode.ABORTED,
  [GrpcStatus.NOT_FOUND]: KvErrorCode.TABLE_NOT_FOUND,
  [GrpcStatus.ALREADY_EXISTS]: KvErrorCode.VERSION_EXISTS,
  [GrpcStatus.FAILED_PRECONDITION]: KvErrorCode.LOAD_CONFLICT,
  [GrpcStatus.RESOURCE_EXHAUSTED]: KvErrorCode.RESOURCE_EXHAUSTED,
  [GrpcStatus.UNAUTHENTICATED]: KvErrorCode.UNAUTHENTICATED,
  [GrpcStatus.PERMISSION_DENIED]: KvErrorCode.PERMISSION_DENIED,
  [GrpcStatus.DATA_LOSS]: KvErrorCode.DATA_CORRUPT,
};

/** The most of a caller's input an error message repeats back (echo), in UTF-16 units. */
export const MAX_ECHO_CHARS = 200;
/** The most an error's details (and each metadata value) may carry on the wire, in bytes. */
export const MAX_WIRE_DETAIL_BYTES = 1024;

/**
 * `value` as an error message shows it: JSON-like (bigints as `123n`), at most MAX_ECHO_CHARS, with
 * the length of what was cut. A 64 MiB table name must not come back in a message, or in the
 * grpc-message trailer, whose size the client's metadata limit refuses.
 */
export function echo(value: unknown, max = MAX_ECHO_CHARS): string {
  let text: string;
  if (typeof value === 'string' && value.length > max) {
    return `${JSON.stringify(value.slice(0, max))}... (${value.length} characters)`;
  }
  try {
    text = typeof value === 'bigint' ? `${value}n` : value === undefined ? 'undefined' : (JSON.stringify(value) ?? String(value));
  } catch {
    text = String(value);
  }
  return text.length > max ? `${text.slice(0, max)}... (${text.length} characters)` : text;
}

/** `text` cut to at most `maxBytes` bytes of UTF-8 (on a character boundary), marked when cut. */
export function truncateBytes(text: string, maxBytes = MAX_WIRE_DETAIL_BYTES): string {
  if (text.length * 3 <= maxBytes || Buffer.byteLength(text) <= maxBytes) return text;
  const mark = ` ... (${Buffer.byteLength(text)} bytes, truncated)`;
  let cut = Buffer.from(text).subarray(0, maxBytes - mark.length).toString('utf8');
  // A character split at the cut decodes as U+FFFD: drop it.
  if (cut.endsWith('\uFFFD')) cut = cut.slice(0, -1);
  return cut + mark;
}

/** What errno codes mean, for messages that name both ("no space left on device (ENOSPC)"). */
const ERRNO_TEXT: Record<string, string> = {
  ENOSPC: 'no space left on device',
  EDQUOT: 'disk quota exceeded',
  EROFS: 'read-only file system',
  EIO: 'input/output error',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EMFILE: 'too many open files',
};

/** The first errno code (ENOSPC...) in an error's cause chain. */
export function errnoOf(err: unknown): string | undefined {
  for (let e = err, depth = 0; e !== undefined && e !== null && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
    // LevelDB's own errors carry the reason as text only ("IO error: ...: No space left on device").
    const m = typeof (e as Error).message === 'string' ? /no space left on device/i.exec((e as Error).message) : null;
    if (m !== null) return 'ENOSPC';
  }
  return undefined;
}

/**
 * A failed file operation as a KvError naming the cause and the path: `no space left on device
 * (ENOSPC) writing /data/g0r0/rows/emb.v3.rows: 1068688 of 1114128 bytes written`. A full disk is
 * KV_RESOURCE_EXHAUSTED, anything else KV_INTERNAL.
 */
export function ioError(err: unknown, doing: string, after = ''): KvError {
  const errno = errnoOf(err);
  const why = errno !== undefined ? `${ERRNO_TEXT[errno] ?? (err as Error).message} (${errno})` : err instanceof Error ? err.message : String(err);
  const code = errno === 'ENOSPC' || errno === 'EDQUOT' ? KvErrorCode.RESOURCE_EXHAUSTED : KvErrorCode.INTERNAL;
  return new KvError(code, `${why} ${doing}${after}`, { cause: err });
}

const KNOWN_CODES = new Set<string>(Object.values(KvErrorCode));
const CODE_KEY = 'kv-code';
const DETAIL_KEY = 'kv-detail';

export interface GrpcErrorShape {
  code: GrpcStatus;
  details: string;
  metadata: Metadata;
}

/**
 * KvError (or anything thrown by a handler) to a gRPC status; no stack traces on the wire. Details
 * and metadata are bounded (truncateBytes), so no handler can echo a caller's input back whole.
 */
export function toGrpcError(err: unknown): GrpcErrorShape {
  const metadata = new Metadata();
  if (err instanceof KvError) {
    metadata.set(CODE_KEY, err.code);
    if (err.detail !== undefined) {
      const detail = JSON.stringify(err.detail);
      if (Buffer.byteLength(detail) <= MAX_WIRE_DETAIL_BYTES) metadata.set(DETAIL_KEY, detail);
    }
    return { code: CODE_TO_STATUS[err.code], details: truncateBytes(err.message), metadata };
  }
  metadata.set(CODE_KEY, KvErrorCode.INTERNAL);
  const message = err instanceof Error ? err.message : String(err);
  return { code: GrpcStatus.INTERNAL, details: truncateBytes(`internal error: ${message}`), metadata };
}

/** A gRPC call error back to a KvError, keeping the server's code when it sent one. */
export function fromGrpcError(err: ServiceError | Error, context: string): KvError {
  if (err instanceof KvError) return err;
  const se = err as Partial<ServiceError>;
  const status = typeof se.code === 'number' ? se.code : GrpcStatus.UNKNOWN;
  let code: KvErrorCodeName = STATUS_TO_CODE[status] ?? KvErrorCode.INTERNAL;
  let detail: Record<string, string | number> | undefined;
  if (se.metadata instanceof Metadata) {
    const sent = se.metadata.get(CODE_KEY)[0];
    if (typeof sent === 'string' && KNOWN_CODES.has(sent)) code = sent as KvErrorCodeName;
    const d = se.metadata.get(DETAIL_KEY)[0];
    if (typeof d === 'string') {
      try {
        detail = JSON.parse(d) as Record<string, string | number>;
      } catch {
        detail = undefined;
      }
    }
  }
  const raw = se.details !== undefined && se.details !== '' ? se.details : err.message;
  // grpc-js appends an empty "Resolution note: " to connection errors.
  const text = raw.replace(/\.? *Resolution note: *$/, '');
  return new KvError(code, `${context}: ${text}`, { cause: err, ...(detail ? { detail } : {}) });
}
