import { writeFileSync } from 'node:fs';
import { writeNpyPair } from '../../src/loader/npy-write.js';

const M = (1n << 64n) - 1n;

/** A bijection on uint64 (splitmix64's finaliser): distinct inputs give distinct keys. */
export function scramble(i: bigint): bigint {
  let z = (i + 0x9e3779b97f4a7c15n) & M;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M;
  return z ^ (z >> 31n);
}

export interface Model {
  keys: BigUint64Array;
  values: Float32Array;
  dim: number;
}

/**
 * n distinct keys with vectors whose first component is `marker` (a version number, say) and second
 * the row number, so a mixed or misplaced answer is visible.
 */
export function makeModel(n: number, dim: number, seed: number, marker = 1): Model {
  const keys = new BigUint64Array(n);
  const values = new Float32Array(n * dim);
  for (let i = 0; i < n; i++) {
    keys[i] = scramble(BigInt(seed) * 1_000_000_007n + BigInt(i));
    values[i * dim] = marker;
    if (dim > 1) values[i * dim + 1] = i;
    for (let j = 2; j < dim; j++) values[i * dim + j] = Math.fround(Math.sin(i * 31 + j) * 1000);
  }
  return { keys, values, dim };
}

/** Writes rows [from, to) of a model as a NumPy pair PREFIX.keys.npy / PREFIX.values.npy. */
export async function writeModelPart(prefix: string, m: Model, from: number, to: number): Promise<void> {
  await writeNpyPair(prefix, m.keys.slice(from, to), m.values.slice(from * m.dim, to * m.dim), m.dim);
}

/** Writes rows [from, to) as the text format: `key<TAB>v1,...,vdim`. */
export function writeModelText(path: string, m: Model, from: number, to: number): void {
  const lines = ['# embkv text dump'];
  for (let i = from; i < to; i++) {
    lines.push(`${m.keys[i]}\t${Array.from(m.values.subarray(i * m.dim, (i + 1) * m.dim)).join(',')}`);
  }
  writeFileSync(path, lines.join('\n') + '\n');
}

/** The expected answer for `request` (a key absent from the model gets zeros). */
export function expected(m: Model, request: BigUint64Array): { values: Float32Array; found: Uint8Array } {
  const row = new Map<bigint, number>();
  m.keys.forEach((k, i) => row.set(k, i));
  const values = new Float32Array(request.length * m.dim);
  const found = new Uint8Array(request.length);
  request.forEach((k, i) => {
    const r = row.get(k);
    if (r === undefined) return;
    found[i] = 1;
    values.set(m.values.subarray(r * m.dim, (r + 1) * m.dim), i * m.dim);
  });
  return { values, found };
}

/** A request of `n` keys: random model keys, with `absentEvery`-th keys absent and some repeated. */
export function makeRequest(m: Model, n: number, absentEvery = 100): BigUint64Array {
  const req = new BigUint64Array(n);
  for (let i = 0; i < n; i++) {
    if (i % absentEvery === 0) req[i] = scramble(BigInt(i) + (1n << 62n));
    else if (i % 7 === 0 && i > 0) req[i] = req[i - 1]!;
    else req[i] = m.keys[Math.floor(Math.random() * m.keys.length)]!;
  }
  return req;
}

/** Compares floats bit for bit (NaN-safe, -0 vs 0 distinguished). */
export function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}
