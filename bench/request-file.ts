import { readFileSync } from 'node:fs';
import type { Answer } from './model.js';

/**
 * The requests of a run and what their answers must hold, in one file, so that Redis's clients run
 * in a process of their own without the model (bench/redis-reader.ts). Per request r, one after
 * another:
 *
 *   keys      batch x 8 bytes   little-endian uint64
 *   rows      batch x 4 bytes   int32: the model row asked for, -1 for an absent key
 *   expected  dim x 4 bytes     the vector bits of every position i with (i + r) % VERIFY_STRIDE == 0
 *             per such position (zeros for an absent key), in position order
 */
export const VERIFY_STRIDE = 97;

/** Positions of request r whose vectors are compared bit for bit. */
export function sampledPositions(batch: number, r: number): number {
  let count = 0;
  for (let i = (VERIFY_STRIDE - (r % VERIFY_STRIDE)) % VERIFY_STRIDE; i < batch; i += VERIFY_STRIDE) count++;
  return count;
}

export function requestBytes(batch: number, dim: number, r: number): number {
  return batch * 12 + sampledPositions(batch, r) * dim * 4;
}

export interface StoredRequest {
  keys: BigUint64Array;
  rows: Int32Array;
  expected: Uint32Array;
}

/** The whole file, read once; request(r) gives views into it. */
export class RequestFile {
  private readonly buf: Buffer;
  private readonly offsets: number[] = [];

  constructor(path: string, private readonly batch: number, private readonly dim: number, count: number) {
    this.buf = readFileSync(path);
    let at = 0;
    for (let r = 0; r < count; r++) {
      this.offsets.push(at);
      at += requestBytes(batch, dim, r);
    }
    if (at !== this.buf.length) throw new Error(`${path}: ${this.buf.length} bytes, expected ${at} for ${count} requests of ${batch} keys`);
  }

  request(r: number): StoredRequest {
    // The buffer from readFileSync may start at any offset of its pool: copy into aligned arrays.
    const at = this.buf.byteOffset + this.offsets[r]!;
    const n = this.batch;
    const sampled = sampledPositions(n, r) * this.dim;
    const src = this.buf.buffer;
    return {
      keys: new BigUint64Array(src.slice(at, at + n * 8)),
      rows: new Int32Array(src.slice(at + n * 8, at + n * 12)),
      expected: new Uint32Array(src.slice(at + n * 12, at + n * 12 + sampled * 4)),
    };
  }
}

/** Checks every found flag and the sampled vectors' bits; throws naming the first mismatch. */
export function checkStoredAnswer(what: string, a: Answer, req: StoredRequest, r: number): number {
  const n = req.rows.length;
  const dim = a.dim;
  if (a.values.length !== n * dim || a.found.length !== n) throw new Error(`${what}: answered ${a.values.length} floats and ${a.found.length} flags for ${n} keys of dim ${dim}`);
  const got = new Uint32Array(a.values.buffer, a.values.byteOffset, a.values.length);
  let checked = 0;
  for (let i = 0; i < n; i++) {
    const present = req.rows[i]! >= 0;
    if (a.found[i] !== (present ? 1 : 0)) throw new Error(`${what}: position ${i} key ${req.keys[i]} found=${a.found[i]}, expected ${present ? 1 : 0}`);
    if ((i + r) % VERIFY_STRIDE !== 0) continue;
    for (let j = 0; j < dim; j++) {
      const w = req.expected[checked * dim + j]!;
      if (got[i * dim + j] !== w) {
        throw new Error(`${what}: position ${i} key ${req.keys[i]} float ${j} has bits 0x${got[i * dim + j]!.toString(16)}, expected 0x${w.toString(16)} (model row ${req.rows[i]})`);
      }
    }
    checked++;
  }
  return checked;
}
