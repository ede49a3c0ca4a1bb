import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { writeNpyPair } from '../src/loader/npy-write.js';
import { planDump, readDump } from '../src/loader/sources.js';

/**
 * The benchmark's model and requests, reproducible from a seed.
 *
 * Keys are a 4-round Feistel permutation of 64-bit inputs, so they look random and are distinct by
 * construction: present row i is perm(seedWord, i), absent key j is perm(seedWord ^ 2^31, j), and no
 * absent key can equal a present one.
 */
export interface Model {
  n: number;
  dim: number;
  keys: BigUint64Array;
  /** The same keys as [lo, hi] uint32 halves. */
  keyWords: Uint32Array;
  values: Float32Array;
  seed: number;
}

/** murmur3's 32-bit finaliser. */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

const ROUND_KEYS = [0x9e3779b9, 0x7f4a7c15, 0x6a09e667, 0xbb67ae85];

/** Writes perm(hi, lo) as [lo, hi] into out[at], out[at + 1]. */
function permute(hi: number, lo: number, out: Uint32Array, at: number): void {
  let l = hi >>> 0;
  let r = lo >>> 0;
  for (const k of ROUND_KEYS) {
    const t = r;
    r = (l ^ fmix32(r ^ k)) >>> 0;
    l = t;
  }
  out[at] = r;
  out[at + 1] = l;
}

/** mulberry32: a small seeded generator of uint32s. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  u32(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** In [0, 1). */
  float(): number {
    return this.u32() / 0x1_0000_0000;
  }
  below(n: number): number {
    return Math.floor(this.float() * n);
  }
}

export function makeModel(n: number, dim: number, seed: number): Model {
  const keys = new BigUint64Array(n);
  const keyWords = new Uint32Array(keys.buffer);
  const seedWord = fmix32(seed) & 0x7fffffff;
  for (let i = 0; i < n; i++) permute(seedWord, i, keyWords, 2 * i);
  // Values in [-1, 1): finite by construction, so every load is accepted.
  const values = new Float32Array(n * dim);
  const rng = new Rng(seed ^ 0x5bd1e995);
  for (let i = 0; i < values.length; i++) values[i] = rng.float() * 2 - 1;
  return { n, dim, keys, keyWords, values, seed };
}

/** Writes the model as `parts` NumPy pairs part-K.keys.npy / part-K.values.npy in `dir`. */
export async function writeModel(model: Model, dir: string, parts: number): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const per = Math.ceil(model.n / parts);
  for (let p = 0, from = 0; from < model.n; p++, from += per) {
    const to = Math.min(model.n, from + per);
    await writeNpyPair(join(dir, `part-${p}`), model.keys.subarray(from, to), model.values.subarray(from * model.dim, to * model.dim), model.dim);
  }
}

/** One request's keys, and the model row each position asks for (-1: a key the model lacks). */
export interface RequestBuffer {
  keys: BigUint64Array;
  keyWords: Uint32Array;
  rows: Int32Array;
}

export function requestBuffer(batch: number): RequestBuffer {
  const keys = new BigUint64Array(batch);
  return { keys, keyWords: new Uint32Array(keys.buffer), rows: new Int32Array(batch) };
}

/**
 * Fills request number `r`: each position is an absent key with probability `absent`, otherwise a
 * random row of the model (repeats allowed). The same (model, r) always gives the same request, so
 * embkv and Redis answer identical requests.
 */
export function fillRequest(req: RequestBuffer, model: Model, r: number, absent: number): void {
  const rng = new Rng(fmix32(model.seed * 7919 + r + 1));
  const absentSeed = (fmix32(model.seed) & 0x7fffffff) ^ 0x80000000;
  const n = req.rows.length;
  const mw = model.keyWords;
  const kw = req.keyWords;
  for (let i = 0; i < n; i++) {
    if (rng.float() < absent) {
      req.rows[i] = -1;
      permute(absentSeed, r * n + i, kw, 2 * i);
    } else {
      const row = rng.below(model.n);
      req.rows[i] = row;
      kw[2 * i] = mw[2 * row]!;
      kw[2 * i + 1] = mw[2 * row + 1]!;
    }
  }
}

export interface Answer {
  values: Float32Array;
  found: Uint8Array;
  dim: number;
}

/**
 * Checks an answer against the model: every found flag, and the vector bits of every `stride`-th
 * position (offset by `r` so successive requests check different positions). Throws on the first
 * mismatch, naming the position, the key and the floats.
 */
export function verifyAnswer(what: string, a: Answer, req: RequestBuffer, model: Model, r: number, stride = 97): number {
  const n = req.rows.length;
  const dim = model.dim;
  if (a.dim !== dim) throw new Error(`${what}: answered dim ${a.dim}, the model has dim ${dim}`);
  if (a.values.length !== n * dim || a.found.length !== n) {
    throw new Error(`${what}: answered ${a.values.length} floats and ${a.found.length} flags for ${n} keys of dim ${dim}`);
  }
  const got = new Uint32Array(a.values.buffer, a.values.byteOffset, a.values.length);
  const want = new Uint32Array(model.values.buffer, model.values.byteOffset, model.values.length);
  let checked = 0;
  for (let i = 0; i < n; i++) {
    const row = req.rows[i]!;
    const present = row >= 0;
    if (a.found[i] !== (present ? 1 : 0)) {
      throw new Error(`${what}: position ${i} key ${req.keys[i]} found=${a.found[i]}, expected ${present ? 1 : 0}`);
    }
    if ((i + r) % stride !== 0) continue;
    checked++;
    for (let j = 0; j < dim; j++) {
      const w = present ? want[row * dim + j]! : 0;
      if (got[i * dim + j] !== w) {
        throw new Error(
          `${what}: position ${i} key ${req.keys[i]} float ${j} is ${a.values[i * dim + j]} (bits 0x${got[i * dim + j]!.toString(16)}), ` +
            `expected ${present ? model.values[row * dim + j] : 0} (bits 0x${w.toString(16)}) from model row ${row}`,
        );
      }
    }
  }
  return checked;
}

/**
 * The model in NumPy files that a running cluster's table was loaded from (--cluster): read whole, as
 * `kvctl load` reads them (any number of parts, validated the same way). `seed` drives the requests.
 */
export async function readModel(path: string, seed: number): Promise<Model> {
  const plan = await planDump(path, 'full');
  if (plan.totalRows < 0) throw new Error(`${path}: --model takes NumPy pairs (a text part has no row count to size the model by)`);
  const n = plan.totalRows;
  const dim = plan.dim;
  const keys = new BigUint64Array(n);
  const keyWords = new Uint32Array(keys.buffer);
  const values = new Float32Array(n * dim);
  let at = 0;
  for await (const item of readDump(plan, { reuseBuffers: true })) {
    if (item.type !== 'rows') continue;
    const c = item.chunk;
    keyWords.set(c.keys.subarray(0, 2 * c.n), 2 * at);
    values.set(c.values.subarray(0, c.n * dim), at * dim);
    at += c.n;
  }
  if (at !== n) throw new Error(`${path}: read ${at} rows, its headers promised ${n}`);
  return { n, dim, keys, keyWords, values, seed };
}
