import assert from 'node:assert/strict';
import type { VersionData } from '../../src/shard/version-data.js';
import { mulberry32 } from '../helpers/util.js';

/** The lookup fixtures that every kernel's tests share (test/suites/lookup-suite.ts and the kernels' own tests). */

export const keyOf = (lo: number, hi: number): bigint => (BigInt(hi) << 32n) | BigInt(lo);

/** n distinct random keys (every 5th with a zero high half) and rows of random finite floats. */
export function randomRows(n: number, dim: number, seed: number): { keys: Uint32Array; values: Float32Array } {
  const rnd = mulberry32(seed);
  const keys = new Uint32Array(2 * n);
  const seen = new Set<bigint>();
  for (let i = 0; i < n;) {
    const lo = rnd();
    const hi = i % 5 === 0 ? 0 : rnd();
    const k = (BigInt(hi) << 32n) | BigInt(lo);
    if (seen.has(k)) continue;
    seen.add(k);
    keys[2 * i] = lo;
    keys[2 * i + 1] = hi;
    i++;
  }
  const values = new Float32Array(n * dim);
  const bits = new Uint32Array(values.buffer);
  for (let i = 0; i < bits.length; i++) bits[i] = rnd() & 0xbf7fffff; // exponent never all ones: finite
  return { keys, values };
}

/** A request of `q` keys drawn from `keys`, every 7th one absent. */
export function request(keys: Uint32Array, q: number, seed: number): Uint32Array {
  const rnd = mulberry32(seed);
  const n = keys.length / 2;
  const req = new Uint32Array(2 * q);
  for (let i = 0; i < q; i++) {
    const r = rnd() % n;
    req[2 * i] = keys[2 * r]!;
    req[2 * i + 1] = keys[2 * r + 1]! ^ (i % 7 === 3 ? 0x80000000 : 0);
  }
  return req;
}

function expected(keys: Uint32Array, values: Float32Array, dim: number, req: Uint32Array): { out: Float32Array; found: Uint8Array } {
  const at = new Map<string, number>();
  for (let i = 0; i < keys.length / 2; i++) at.set(`${keys[2 * i]}:${keys[2 * i + 1]}`, i);
  const q = req.length / 2;
  const out = new Float32Array(q * dim);
  const found = new Uint8Array(q);
  for (let i = 0; i < q; i++) {
    const r = at.get(`${req[2 * i]}:${req[2 * i + 1]}`);
    if (r === undefined) continue;
    found[i] = 1;
    out.set(values.subarray(r * dim, (r + 1) * dim), i * dim);
  }
  return { out, found };
}

const bitsOf = (f: Float32Array): Uint32Array => new Uint32Array(f.buffer, f.byteOffset, f.length);

/** What a lookup kernel answers: a sealed version, or a version with an overlay over it. */
export interface LookupTable {
  lookup(keys: Uint32Array, n: number, out: Float32Array, found: Uint8Array): number;
}

/**
 * Looks up q keys drawn from `keys` (every 7th absent) into arrays holding garbage, and checks
 * every found flag and every vector's bits against the dataset; returns the hits lookup counted.
 */
export function checkLookups(v: LookupTable, keys: Uint32Array, values: Float32Array, dim: number, q: number, seed: number, label = ''): number {
  const req = request(keys, q, seed);
  const want = expected(keys, values, dim, req);
  const out = new Float32Array(q * dim).fill(7);
  const found = new Uint8Array(q).fill(9);
  const hits = v.lookup(req, q, out, found);
  assert.deepEqual(found, want.found, `${label} found flags`);
  assert.deepEqual(bitsOf(out), bitsOf(want.out), `${label} vectors`);
  assert.equal(hits, want.found.reduce((a, b) => a + b, 0), `${label} hits`);
  return hits;
}

export interface Dataset {
  n: number;
  dim: number;
  /** Packed keys [lo, hi, ...]. */
  keys: Uint32Array;
  /** Row i's vector at values[i*dim ...]; bit patterns are random (finite). */
  values: Float32Array;
  set: Set<bigint>;
}

/**
 * n distinct random keys; every 4th shares its low half with the previous key and every 7th its high
 * half, so half-collisions are common; a few small and extreme keys are included.
 */
export function makeDataset(n: number, dim: number, seed: number): Dataset {
  const rnd = mulberry32(seed);
  const keys = new Uint32Array(2 * n);
  const set = new Set<bigint>();
  const fixed: [number, number][] = [[0, 0], [1, 0], [0, 1], [0xffffffff, 0xffffffff], [0xffffffff, 0], [0, 0xffffffff]];
  let i = 0;
  let prevLo = 0;
  let prevHi = 0;
  while (i < n) {
    let lo: number;
    let hi: number;
    if (i < fixed.length) [lo, hi] = fixed[i]!;
    else {
      lo = rnd();
      hi = rnd();
      if (i % 4 === 1) lo = prevLo;
      else if (i % 7 === 3) hi = prevHi;
      else if (i % 13 === 5) hi = 0;
    }
    const k = keyOf(lo, hi);
    if (set.has(k)) continue;
    set.add(k);
    keys[2 * i] = lo;
    keys[2 * i + 1] = hi;
    prevLo = lo;
    prevHi = hi;
    i++;
  }
  const bits = new Uint32Array(n * dim);
  for (let j = 0; j < bits.length; j++) bits[j] = rnd() & 0xbfffffff; // exponent never all ones: finite
  return { n, dim, keys, values: new Float32Array(bits.buffer), set };
}

/** Appends rows [0, n) in batches whose sizes cycle through `sizes`; returns the number of batches. */
export function appendInBatches(v: VersionData, d: Dataset, sizes: readonly number[]): number {
  let start = 0;
  let b = 0;
  while (start < d.n) {
    const size = Math.min(sizes[b % sizes.length]!, d.n - start);
    const r = v.append(d.keys.subarray(2 * start, 2 * (start + size)), d.values.subarray(start * d.dim, (start + size) * d.dim), size);
    assert.equal(r, -1, `batch ${b} (rows ${start}..${start + size})`);
    start += size;
    assert.equal(v.count, start);
    b++;
  }
  return b;
}

/** Checks a lookup answer bit for bit against the dataset; `rowOf[i]` is the expected row or -1. */
export function checkAnswer(d: Dataset, rowOf: Int32Array, out: Float32Array, found: Uint8Array, what: string): void {
  const outBits = new Uint32Array(out.buffer, out.byteOffset, out.length);
  const expBits = new Uint32Array(d.values.buffer, d.values.byteOffset, d.values.length);
  const dim = d.dim;
  for (let i = 0; i < rowOf.length; i++) {
    const r = rowOf[i]!;
    if (found[i] !== (r >= 0 ? 1 : 0)) assert.fail(`${what}: found[${i}] = ${found[i]}, expected ${r >= 0 ? 1 : 0}`);
    for (let j = 0; j < dim; j++) {
      const got = outBits[i * dim + j]!;
      const exp = r >= 0 ? expBits[r * dim + j]! : 0;
      if (got !== exp) assert.fail(`${what}: position ${i} (row ${r}) component ${j}: bits ${got.toString(16)}, expected ${exp.toString(16)}`);
    }
  }
}

/** A request of present keys, absent keys (random and half-colliding) and duplicates, in shuffled order. */
export function makeRequest(d: Dataset, m: number, seed: number): { keys: Uint32Array; rowOf: Int32Array } {
  const rnd = mulberry32(seed);
  const keys = new Uint32Array(2 * m);
  const rowOf = new Int32Array(m);
  for (let i = 0; i < m; i++) {
    const kind = rnd() % 10;
    let lo: number;
    let hi: number;
    let row: number;
    if (kind < 5 || i === 0) {
      // present
      row = rnd() % d.n;
      lo = d.keys[2 * row]!;
      hi = d.keys[2 * row + 1]!;
    } else if (kind < 7) {
      // a duplicate of an earlier position of the request
      const j = rnd() % i;
      lo = keys[2 * j]!;
      hi = keys[2 * j + 1]!;
      row = rowOf[j]!;
    } else {
      // absent: random, or sharing one half with a present key
      const src = rnd() % d.n;
      lo = kind === 7 ? d.keys[2 * src]! : rnd();
      hi = kind === 8 ? d.keys[2 * src + 1]! : rnd();
      if (kind === 7) hi = (hi + 1 + (rnd() % 1000)) >>> 0;
      if (kind === 8) lo = (lo + 1 + (rnd() % 1000)) >>> 0;
      if (d.set.has(keyOf(lo, hi))) {
        i--;
        continue;
      }
      row = -1;
    }
    keys[2 * i] = lo;
    keys[2 * i + 1] = hi;
    rowOf[i] = row;
  }
  return { keys, rowOf };
}

/**
 * n keys sharing the low half and n sharing the high half: in a small table, a probe for one passes
 * slots whose key matches in one half only.
 */
export function halfSharingKeys(n: number): Uint32Array {
  const keys = new Uint32Array(4 * n);
  for (let i = 0; i < n; i++) {
    keys[2 * i] = 0xdeadbeef;
    keys[2 * i + 1] = (i * 7919) >>> 0;
    keys[2 * (n + i)] = (i * 104729 + 1) >>> 0;
    keys[2 * (n + i) + 1] = 0x12345678;
  }
  return keys;
}
