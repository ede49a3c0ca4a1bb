/**
 * Where a dump's files come from: a DumpSource lists a location's entries and opens a file for
 * positioned reads. Two implementations: local files (LocalDumpSource, over node:fs) and S3-compatible
 * object storage (S3DumpSource in s3-source.ts, the only file that imports the AWS SDK, loaded by
 * source-url.ts only for an s3:// location).
 *
 * A location is a string that messages name as it is: a local path, or `s3://bucket/key` (a key
 * ending in '/' is a prefix, a "directory").
 *
 * The API `kvctl watch` uses: parseDumpSource(url, options) (source-url.ts), listSubdirectories(source,
 * loc) and hasSuccessMarker(source, loc).
 */
import { lstat, readdir } from 'node:fs/promises';
import { basename as pathBasename, dirname as pathDirname, join as pathJoin } from 'node:path';
import { invalidArgument } from '../common/errors.js';
import { dataError, kindOf, openDumpFile, statOrUndefined } from './dump-files.js';

/** What a location holds. 'other': a local FIFO, socket or device (`what` says which). */
export interface DumpStat {
  type: 'file' | 'dir' | 'other';
  /** Bytes of a file; 0 otherwise. */
  size: number;
  /** An object's ETag (S3 only), as listed. */
  etag?: string;
  /** When a file was last written (local mtime, S3 LastModified), ms since the epoch, where known. */
  mtimeMs?: number;
  /** For 'other': what it is, for messages ("a FIFO"). */
  what?: string;
}

/** One entry of a listed location: its name under that location (no '/'), and what it is. */
export interface DumpEntry extends DumpStat {
  name: string;
}

/**
 * A file opened for positioned reads, the shape of FileHandle.read: reads up to `len` bytes at `pos`
 * into `buf` at `off`, and resolves to the bytes read (fewer only at the end of the file).
 */
export interface RandomAccessReader {
  /** The file's length when it was opened (or listed). */
  readonly size: number;
  read(buf: Uint8Array, off: number, len: number, pos: number): Promise<number>;
  close(): Promise<void>;
}

export interface DumpSource {
  readonly kind: 'local' | 's3';
  /** What the location holds, or undefined when nothing is there. */
  stat(loc: string): Promise<DumpStat | undefined>;
  /** The entries directly under a directory (or prefix), in name order (byte order of the names). */
  list(loc: string): Promise<DumpEntry[]>;
  /** Opens a file for reading; a missing file or one that is not a regular file is refused (KV_INVALID_DATA). */
  open(loc: string): Promise<RandomAccessReader>;
  /** The location of `name` in directory `dir`. */
  join(dir: string, name: string): string;
  /** The directory (or prefix) holding a location, and its name in there. */
  dirname(loc: string): string;
  basename(loc: string): string;
  /** Releases connections (S3); idempotent. */
  close(): void;
}

/** How to reach S3-compatible object storage (`kvctl load --s3-endpoint`, `--s3-virtual-host`). */
export interface S3SourceOptions {
  /** e.g. http://127.0.0.1:9000; default AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, then AWS's own. */
  endpoint?: string;
  /** With a custom endpoint, address buckets as virtual hosts (bucket.host) instead of paths (host/bucket). */
  virtualHost?: boolean;
  /** Default: the AWS chain (AWS_REGION, the profile); us-east-1 with a custom endpoint when none is set. */
  region?: string;
  /** Default: the AWS chain (environment, profile, ...). */
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** Tries of one request before the load fails with KV_UNAVAILABLE (default DEFAULT_S3_MAX_ATTEMPTS). */
  maxAttempts?: number;
  /** The first retry's delay; doubled each retry, up to 8x (default DEFAULT_S3_RETRY_BASE_MS). */
  retryBaseMs?: number;
  /** Bytes of one ranged GET (default DEFAULT_S3_BLOCK_BYTES). */
  blockBytes?: number;
  /** Ranged GETs read ahead of the reader, per open object (default DEFAULT_S3_READ_AHEAD). */
  readAhead?: number;
  /** Bytes of the buffer each connection reads into, reused for every read (default DEFAULT_S3_READ_BUFFER_BYTES). */
  readBufferBytes?: number;
}

export const DEFAULT_S3_MAX_ATTEMPTS = 5;
export const DEFAULT_S3_RETRY_BASE_MS = 200;
export const DEFAULT_S3_BLOCK_BYTES = 8 * 1024 * 1024;
export const DEFAULT_S3_READ_AHEAD = 4;
export const DEFAULT_S3_READ_BUFFER_BYTES = 1024 * 1024;

/** The Hadoop/Spark marker of a complete output directory. */
export const SUCCESS_MARKER = '_SUCCESS';

/**
 * Names the Hadoop output committers leave in a directory: one of them makes a local directory follow
 * the convention, so it is complete only once it holds _SUCCESS.
 */
export function isHadoopMarker(name: string): boolean {
  return name === SUCCESS_MARKER || name === '_temporary' || name.startsWith('_started_') || name.startsWith('_committed_');
}

export function isS3Url(loc: string): boolean {
  return loc.startsWith('s3://');
}

/** Local files. Locations are paths; a link is followed, and what it leads to is named when it leads nowhere. */
export class LocalDumpSource implements DumpSource {
  readonly kind = 'local' as const;

  async stat(loc: string): Promise<DumpStat | undefined> {
    const s = await statOrUndefined(loc);
    if (s === undefined) return undefined;
    if (s.isFile()) return { type: 'file', size: s.size, mtimeMs: s.mtimeMs };
    if (s.isDirectory()) return { type: 'dir', size: 0 };
    return { type: 'other', size: 0, what: kindOf(s) };
  }

  async list(loc: string): Promise<DumpEntry[]> {
    const names = (await readdir(loc)).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const out: DumpEntry[] = [];
    for (const name of names) {
      const full = pathJoin(loc, name);
      if (name.startsWith('.') || name.startsWith('_')) {
        // Not data: what it is matters only for _temporary, and a dangling link here is no error.
        const l = await lstat(full).catch(() => undefined);
        out.push({ name, type: l?.isDirectory() ? 'dir' : 'file', size: 0 });
        continue;
      }
      const s = await this.stat(full);
      if (s === undefined) throw dataError(`${full}: removed while the directory was read`);
      out.push({ name, ...s });
    }
    return out;
  }

  async open(loc: string): Promise<RandomAccessReader> {
    const fh = await openDumpFile(loc);
    const size = (await fh.stat()).size;
    return {
      size,
      read: async (buf, off, len, pos) => (await fh.read(buf, off, len, pos)).bytesRead,
      close: () => fh.close(),
    };
  }

  join(dir: string, name: string): string {
    return pathJoin(dir, name);
  }

  dirname(loc: string): string {
    return pathDirname(loc);
  }

  basename(loc: string): string {
    return pathBasename(loc);
  }

  close(): void {}
}

/** The one local source: it holds no state. */
export const LOCAL_SOURCE: DumpSource = new LocalDumpSource();

/** `s3://bucket/key` as bucket and key (key '' for the bucket's root); refuses a malformed URL. */
export function parseS3Url(url: string): { bucket: string; key: string } {
  const m = /^s3:\/\/([^/]+)(?:\/(.*))?$/.exec(url);
  if (m === null || !/^[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}$/.test(m[1]!)) {
    throw invalidArgument(`${url}: not an S3 location; write s3://BUCKET/PREFIX/`);
  }
  return { bucket: m[1]!, key: m[2] ?? '' };
}

/** The location of `name` under an s3:// prefix. */
export function s3Join(dir: string, name: string): string {
  return `${dir.endsWith('/') ? dir : `${dir}/`}${name}`;
}

/** The prefix holding an s3:// location (ending in '/'). */
export function s3Dirname(loc: string): string {
  const { bucket, key } = parseS3Url(loc);
  const k = key.endsWith('/') ? key.slice(0, -1) : key;
  const i = k.lastIndexOf('/');
  return `s3://${bucket}/${i >= 0 ? k.slice(0, i + 1) : ''}`;
}

/** The last name of an s3:// location. */
export function s3Basename(loc: string): string {
  const k = parseS3Url(loc).key.replace(/\/$/, '');
  return k.slice(k.lastIndexOf('/') + 1);
}

/** The immediate subdirectories (S3: common prefixes) of a directory or prefix, by name, in name order. */
export async function listSubdirectories(source: DumpSource, loc: string): Promise<string[]> {
  return (await source.list(loc)).filter((e) => e.type === 'dir').map((e) => e.name);
}

/** Whether a directory or prefix holds the _SUCCESS marker of a complete dump. */
export async function hasSuccessMarker(source: DumpSource, loc: string): Promise<boolean> {
  return (await successMarker(source, loc)) !== undefined;
}

/** The _SUCCESS marker of a directory or prefix: when it was written (NaN if the source does not say), or undefined if absent. */
export async function successMarker(source: DumpSource, loc: string): Promise<{ mtimeMs: number } | undefined> {
  const s = await source.stat(source.join(loc, SUCCESS_MARKER));
  return s?.type === 'file' ? { mtimeMs: s.mtimeMs ?? NaN } : undefined;
}
