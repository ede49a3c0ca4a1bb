/**
 * What the version watcher (watch.ts) needs of the place a trainer writes its dumps to:
 *
 *   SOURCE/full/<version>/...          a full dump, complete once SOURCE/full/<version>/_SUCCESS exists
 *   SOURCE/incremental/<version>/...   a delta, likewise
 *
 * One implementation per kind of source: a local directory here; S3 plugs in behind the same
 * interface (parse the URL, list the immediate sub-prefixes of `full/` and `incremental/`, ask
 * whether `<dir>/_SUCCESS` exists, and hand runLoad the URL of `<dir>/`).
 */
import { access, readdir, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { KvError, KvErrorCode, errnoOf, invalidArgument } from '../common/errors.js';
import { isS3Url, listSubdirectories, successMarker, type DumpSource, type S3SourceOptions } from './dump-source.js';
import { parseDumpSource } from './source-url.js';

export type WatchKind = 'full' | 'incremental';

/** The marker a trainer writes last, once every file of a version's directory is in place. */
export const SUCCESS_MARKER = '_SUCCESS';

export interface WatchSource {
  /** The source as the user gave it (a directory or URL), for messages. */
  readonly location: string;
  /**
   * The names of the immediate sub-directories (sub-prefixes) of `SOURCE/<kind>/`, in any order;
   * none when `SOURCE/<kind>/` does not exist. Rejects (naming the source) when the source cannot be read.
   */
  listVersions(kind: WatchKind): Promise<string[]>;
  /**
   * `SOURCE/<kind>/<name>/_SUCCESS`: when it was written (ms since the epoch: a file's mtime, an object's
   * LastModified; NaN where the source does not say), or undefined while it does not exist.
   */
  completedAt(kind: WatchKind, name: string): Promise<number | undefined>;
  /** What runLoad takes as its `path` for `SOURCE/<kind>/<name>/`: a directory or a URL. */
  dumpPath(kind: WatchKind, name: string): string;
  /** What runLoad needs besides the path to read it (how to reach object storage). */
  readonly loadOptions?: { s3?: S3SourceOptions };
  /** Releases connections; idempotent. */
  close?(): void;
}

/** A directory on a local (or mounted) file system. */
export class LocalWatchSource implements WatchSource {
  private readonly root: string;

  constructor(readonly location: string) {
    this.root = resolve(location);
  }

  async listVersions(kind: WatchKind): Promise<string[]> {
    // The root must exist: a missing one is a source that is down (unmounted) or mistyped, not an
    // empty one. A missing full/ or incremental/ is a source the trainer has not written to yet.
    try {
      await access(this.root);
    } catch (err) {
      throw sourceError(err, `source ${this.location} cannot be read`);
    }
    try {
      const entries = await readdir(join(this.root, kind), { withFileTypes: true });
      return entries.filter((e) => e.isDirectory()).map((e) => e.name);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return [];
      throw sourceError(err, `source ${this.location}: ${kind}/ cannot be listed`);
    }
  }

  async completedAt(kind: WatchKind, name: string): Promise<number | undefined> {
    try {
      return (await stat(join(this.root, kind, name, SUCCESS_MARKER))).mtimeMs;
    } catch (err) {
      if (errnoOf(err) === 'ENOENT' || errnoOf(err) === 'ENOTDIR') return undefined;
      throw sourceError(err, `source ${this.location}: ${kind}/${name}/${SUCCESS_MARKER} cannot be checked`);
    }
  }

  dumpPath(kind: WatchKind, name: string): string {
    return join(this.root, kind, name);
  }
}

/**
 * S3-compatible object storage, through the loader's DumpSource: `SOURCE/full/` and
 * `SOURCE/incremental/` are prefixes, each version a sub-prefix, complete once it holds `_SUCCESS`.
 */
export class S3WatchSource implements WatchSource {
  private readonly dumps: DumpSource;

  constructor(readonly location: string, s3: S3SourceOptions) {
    this.dumps = parseDumpSource(location, s3);
    this.loadOptions = { s3 };
  }

  readonly loadOptions: { s3: S3SourceOptions };

  async listVersions(kind: WatchKind): Promise<string[]> {
    try {
      return await listSubdirectories(this.dumps, this.dumps.join(this.location, kind));
    } catch (err) {
      throw asUnavailable(err, `source ${this.location}: ${kind}/ cannot be listed`);
    }
  }

  async completedAt(kind: WatchKind, name: string): Promise<number | undefined> {
    try {
      return (await successMarker(this.dumps, this.dumps.join(this.dumps.join(this.location, kind), name)))?.mtimeMs;
    } catch (err) {
      throw asUnavailable(err, `source ${this.location}: ${kind}/${name}/${SUCCESS_MARKER} cannot be checked`);
    }
  }

  dumpPath(kind: WatchKind, name: string): string {
    return `${this.dumps.join(this.dumps.join(this.location, kind), name)}/`;
  }

  close(): void {
    this.dumps.close();
  }
}

/** A source that cannot be read is down for now (retried on later rounds), whatever the cause. */
function asUnavailable(err: unknown, what: string): KvError {
  if (err instanceof KvError && (err.code === KvErrorCode.UNAVAILABLE || err.code === KvErrorCode.DEADLINE_EXCEEDED)) return err;
  return sourceError(err, what);
}

function sourceError(err: unknown, what: string): KvError {
  return new KvError(KvErrorCode.UNAVAILABLE, `${what}: ${(err as Error).message}`, { cause: err });
}

/** The source for `kvctl watch --source`: a local directory, or s3://BUCKET/PREFIX/. */
export function watchSourceFor(location: string, s3: S3SourceOptions = {}): WatchSource {
  if (location === '') throw invalidArgument('--source must name a directory');
  if (isS3Url(location)) return new S3WatchSource(location, s3);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(location)) {
    throw invalidArgument(`--source ${location}: a local directory or s3://BUCKET/PREFIX/`);
  }
  return new LocalWatchSource(location);
}
