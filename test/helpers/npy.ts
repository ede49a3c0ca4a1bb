/** Writes NumPy .npy files for tests (format versions 1.0, 2.0 and 3.0), laid out as numpy.save lays them out. */
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface WriteNpyOptions {
  version?: 1 | 2 | 3;
  fortran?: boolean;
}

/** The header bytes (magic, version, length, dict padded with spaces and '\n' so the data starts at a multiple of 64). */
export function npyHeader(descr: string, shape: readonly number[], opts: WriteNpyOptions = {}): Buffer {
  const version = opts.version ?? 1;
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  const dict = `{'descr': '${descr}', 'fortran_order': ${opts.fortran === true ? 'True' : 'False'}, 'shape': ${shapeText}, }`;
  const pre = version === 1 ? 10 : 12;
  const body = Buffer.from(dict, version === 3 ? 'utf8' : 'latin1');
  const total = Math.ceil((pre + body.length + 1) / 64) * 64;
  const headerLen = total - pre;
  const out = Buffer.alloc(total, 0x20);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, version, 0], 0);
  if (version === 1) out.writeUInt16LE(headerLen, 8);
  else out.writeUInt32LE(headerLen, 8);
  body.copy(out, pre);
  out[total - 1] = 0x0a;
  return out;
}

/** Writes `data` (raw little-endian bytes) as a .npy file of the given dtype and shape. */
export function writeNpy(path: string, descr: '<u8' | '<i8' | '<f4' | string, shape: number[], data: ArrayBufferView, opts: WriteNpyOptions = {}): void {
  const header = npyHeader(descr, shape, opts);
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  writeFileSync(path, Buffer.concat([header, bytes]));
}

/**
 * Writes PREFIX.keys.npy (<u8) and PREFIX.values.npy (<f4, shape [n, dim]). When `dirOrPrefix` is an existing
 * directory the pair is written inside it as `part-00000`. Returns the prefix written.
 */
export function writePair(dirOrPrefix: string, keys: BigUint64Array, values: Float32Array, dim: number, opts: WriteNpyOptions = {}): string {
  if (values.length !== keys.length * dim) throw new Error(`writePair: ${values.length} values for ${keys.length} keys of dim ${dim}`);
  let prefix = dirOrPrefix;
  try {
    if (statSync(dirOrPrefix).isDirectory()) prefix = join(dirOrPrefix, 'part-00000');
  } catch {
    // not there: a prefix
  }
  writeNpy(`${prefix}.keys.npy`, '<u8', [keys.length], keys, opts);
  writeNpy(`${prefix}.values.npy`, '<f4', [keys.length, dim], values, opts);
  return prefix;
}
