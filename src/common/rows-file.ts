import { ioError } from './errors.js';
import type { FileHandle } from 'node:fs/promises';
import { crc32 } from 'node:zlib';

/**
 * The block format of rows files (a replica's `rows/<table>@<version>.rows`, and the staged files a
 * loader writes for replicas on its host to read):
 *
 *   [magic "EKB1"][n u32][dim u32][crc32 u32][n*8 key bytes][n*dim*4 float bytes]
 *
 * little-endian; the crc32 covers magic, n, dim and the body; dim 0: a delta's deletes (keys only).
 */
export const BLOCK_MAGIC = 0x31424b45; // "EKB1"
export const BLOCK_HEAD = 16;

/** Bytes of a block of n rows of dim. */
export const blockBytes = (n: number, dim: number): number => BLOCK_HEAD + n * 8 + n * dim * 4;

/** The checksum of a block: its header's magic, n and dim, then the body. */
export function blockChecksum(head: Uint32Array, parts: Uint8Array[]): number {
  let c = crc32(new Uint8Array(head.buffer, head.byteOffset, 12));
  // zlib's crc32 answers 0 for a buffer without memory behind it (a zero-length ArrayBuffer): empty
  // parts are left out of the chain.
  for (const p of parts) if (p.byteLength > 0) c = crc32(p, c);
  return c;
}

/** The 16-byte header of a block holding `keys` (n packed uint64) and `floats` (n * dim float32). */
export function blockHead(keys: Uint8Array, floats: Uint8Array, n: number, dim: number): Uint32Array {
  const head = new Uint32Array(BLOCK_HEAD / 4);
  head[0] = BLOCK_MAGIC;
  head[1] = n;
  head[2] = dim;
  head[3] = blockChecksum(head, [keys, floats]);
  return head;
}

/** Writes a block of n rows at byte `at` of a file (one writev); `path` names the file in errors. */
export async function writeBlock(fh: FileHandle, path: string, at: number, keys: Uint8Array, floats: Uint8Array, n: number, dim: number): Promise<void> {
  const bytes = blockBytes(n, dim);
  const parts = [new Uint8Array(blockHead(keys, floats, n, dim).buffer), keys, floats];
  let written = 0;
  try {
    written = (await fh.writev(parts, at)).bytesWritten;
    // A short write (a disk filling up): the rest is written, and that write fails with the reason.
    while (written < bytes) {
      const rest = Buffer.concat(parts).subarray(written);
      const { bytesWritten } = await fh.write(rest, 0, rest.length, at + written);
      if (bytesWritten === 0) throw new Error('the file system wrote nothing');
      written += bytesWritten;
    }
  } catch (err) {
    throw ioError(err, `writing ${path}`, `: ${written} of ${bytes} bytes written`);
  }
}
