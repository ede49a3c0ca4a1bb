/**
 * What every dump reader shares: the load mode, the dim bound, the KV_INVALID_DATA refusal, and opening
 * or stat-ing a dump path so that a FIFO, a link loop or a dangling link is named rather than waited on.
 */
import { constants as fsConstants, type Stats } from 'node:fs';
import { lstat, open as openFile, readlink, stat, type FileHandle } from 'node:fs/promises';
import { KvError, KvErrorCode } from '../common/errors.js';
import { MAX_DIM } from '../common/limits.js';

export type LoadMode = 'full' | 'incremental';

/** A replica accepts no larger dim; the loader refuses it before sending a row. */
export const MAX_LOAD_DIM = MAX_DIM;

export const dataError = (message: string): KvError => new KvError(KvErrorCode.INVALID_DATA, message);
export const fmt = (n: number): string => n.toLocaleString('en-US');

/** What a path is that is not a regular file, for messages ("a FIFO"). */
export function kindOf(s: Stats): string {
  if (s.isDirectory()) return 'a directory';
  if (s.isFIFO()) return 'a FIFO';
  if (s.isSocket()) return 'a socket';
  if (s.isCharacterDevice()) return 'a character device';
  if (s.isBlockDevice()) return 'a block device';
  if (s.isSymbolicLink()) return 'a symbolic link';
  return 'not a regular file';
}

export const notRegular = (p: string, s: Stats): KvError =>
  dataError(s.isDirectory() ? `${p} is a directory, not a regular file` : `${p} is ${kindOf(s)}, not a regular file`);

/**
 * What `p` leads to (following links), or undefined when nothing is there. A link that leads
 * nowhere, a link loop, or a path that cannot be read is refused with what it is: "no values file"
 * would send the user looking for a file that is there.
 */
export async function statOrUndefined(p: string): Promise<Stats | undefined> {
  try {
    return await stat(p);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw dataError(`${p} is a symbolic link loop (ELOOP)`);
    if (code === 'ENOENT') {
      const link = await lstat(p).catch(() => undefined);
      if (link?.isSymbolicLink()) {
        const target = await readlink(p).catch(() => '?');
        throw dataError(`${p} is a dangling symbolic link (to ${target}, which does not exist)`);
      }
      return undefined;
    }
    if (code === 'ENOTDIR') return undefined;
    throw dataError(`${p}: cannot stat: ${(err as Error).message}`);
  }
}

/**
 * Opens a dump file for reading, refusing anything but a regular file. O_NONBLOCK: opening a FIFO
 * for reading would otherwise wait for a writer forever (it has no effect on a regular file's reads).
 */
export async function openDumpFile(path: string): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await openFile(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  } catch (err) {
    throw dataError(`${path}: cannot open: ${(err as Error).message}`);
  }
  try {
    const s = await fh.stat();
    if (!s.isFile()) throw notRegular(path, s);
  } catch (err) {
    await fh.close();
    throw err;
  }
  return fh;
}

