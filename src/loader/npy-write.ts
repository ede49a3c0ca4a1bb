import { open } from 'node:fs/promises';
import { invalidArgument } from '../common/errors.js';

/**
 * Writes a NumPy .npy file (format 1.0): magic, header dict padded so the data starts at a multiple
 * of 64 bytes, then the raw little-endian data. Used by `kvctl demo` and the tests.
 */
export async function writeNpy(path: string, descr: string, shape: readonly number[], data: ArrayBufferView): Promise<void> {
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shapeText}, }`;
  const total = Math.ceil((10 + header.length + 1) / 64) * 64;
  header = header.padEnd(total - 10 - 1, ' ') + '\n';
  const pre = Buffer.alloc(10);
  pre.write('\x93NUMPY', 0, 'latin1');
  pre[6] = 1;
  pre[7] = 0;
  pre.writeUInt16LE(header.length, 8);
  const fh = await open(path, 'w');
  try {
    await fh.write(Buffer.concat([pre, Buffer.from(header, 'latin1')]));
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    // Written in slices so a multi-GB array needs no second copy.
    const step = 64 * 1024 * 1024;
    for (let off = 0; off < bytes.length; off += step) await fh.write(bytes.subarray(off, Math.min(bytes.length, off + step)));
  } finally {
    await fh.close();
  }
}

/** Writes PREFIX.keys.npy (<u8) and PREFIX.values.npy (<f4, [n, dim]). */
export async function writeNpyPair(prefix: string, keys: BigUint64Array, values: Float32Array, dim: number): Promise<void> {
  if (values.length !== keys.length * dim) throw invalidArgument(`values hold ${values.length} floats for ${keys.length} keys of dim ${dim}`);
  await writeNpy(`${prefix}.keys.npy`, '<u8', [keys.length], keys);
  await writeNpy(`${prefix}.values.npy`, '<f4', [keys.length, dim], values);
}
