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
import { access, readdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { KvError, KvErrorCode, errnoOf, invalidArgument } from '../common/errors.js';

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
  /** Whether `SOURCE/<kind>/<name>/_SUCCESS` exists. */
  isComplete(kind: WatchKind, name: string): Promise<boolean>;
  /** What runLoad takes as its `path` for `SOURCE/<kind>/<name>/`: a directory or a URL. */
  dumpPath(kind: WatchKind, name: string): string;
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

  async isComplete(kind: WatchKind, name: string): Promise<boolean> {
    try {
      await access(join(this.root, kind, name, SUCCESS_MARKER));
      return true;
    } catch (err) {
      if (errnoOf(err) === 'ENOENT' || errnoOf(err) === 'ENOTDIR') return false;
      throw sourceError(err, `source ${this.location}: ${kind}/${name}/${SUCCESS_MARKER} cannot be checked`);
    }
  }

  dumpPath(kind: WatchKind, name: string): string {
    return join(this.root, kind, name);
  }
}

function sourceError(err: unknown, what: string): KvError {
  return new KvError(KvErrorCode.UNAVAILABLE, `${what}: ${(err as Error).message}`, { cause: err });
}

/** The source for `kvctl watch --source`: a local directory (S3 URLs once the S3 dump source is in). */
export function watchSourceFor(location: string): WatchSource {
  if (location === '') throw invalidArgument('--source must name a directory');
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(location)) {
    throw invalidArgument(`--source ${location}: only local directories can be watched in this build`);
  }
  return new LocalWatchSource(location);
}
