import type { FileHandle } from 'node:fs/promises';

/**
 * Reads into all of `into` from `position`, looping over short reads. Returns the bytes read: fewer
 * than `into.byteLength` only when the file ends first (callers say what that means for their file).
 */
export async function readFully(fh: FileHandle, into: Uint8Array, position: number): Promise<number> {
  let got = 0;
  while (got < into.byteLength) {
    const { bytesRead } = await fh.read(into, got, into.byteLength - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}
