import assert from 'node:assert/strict';
import { Overlay } from '../../src/shard/overlay.js';
import { VersionData } from '../../src/shard/version-data.js';
import { keyOf } from './fixtures.js';
import { lookupSuite } from './lookup-suite.js';

/** The rows of `keys`/`values` whose index passes `keep`, packed. */
function pick(dim: number, keys: Uint32Array, values: Float32Array, n: number, keep: (i: number) => boolean): { keys: Uint32Array; values: Float32Array; n: number } {
  const idx = Array.from({ length: n }, (_, i) => i).filter(keep);
  const k = new Uint32Array(2 * idx.length);
  const v = new Float32Array(idx.length * dim);
  idx.forEach((i, j) => {
    k[2 * j] = keys[2 * i]!;
    k[2 * j + 1] = keys[2 * i + 1]!;
    v.set(values.subarray(i * dim, (i + 1) * dim), j * dim);
  });
  return { keys: k, values: v, n: idx.length };
}

function sealedVersion(dim: number, keys: Uint32Array, values: Float32Array, n: number, kernel: 'auto' | 'js' = 'auto'): VersionData {
  const v = new VersionData(dim, n, { kernel });
  assert.equal(v.append(keys, values, n), -1);
  v.seal();
  return v;
}

// A sealed full version: the WebAssembly kernel wherever it takes the dim (a multiple of 4).
lookupSuite('WebAssembly (sealed full version)', (dim, keys, values, n) => {
  const v = sealedVersion(dim, keys, values, n);
  assert.equal(v.kernel, dim % 4 === 0 ? 'wasm' : 'js');
  return v;
});

lookupSuite('JavaScript (sealed full version)', (dim, keys, values, n) => {
  const v = sealedVersion(dim, keys, values, n, 'js');
  assert.equal(v.kernel, 'js');
  return v;
});

// The rows a load is still writing: the JavaScript kernel without the Float64 copies of a sealed version.
lookupSuite('JavaScript (write version)', (dim, keys, values, n) => {
  const v = new VersionData(dim, n);
  assert.equal(v.append(keys, values, n), -1);
  return v;
});

// A delta: a base holding every other row stale and rows to delete; the delta fixes and deletes them.
lookupSuite('delta on a sealed version', (dim, keys, values, n) => {
  const fixed = pick(dim, keys, values, n, (i) => i % 2 === 0);
  const set = new Set<bigint>();
  for (let i = 0; i < n; i++) set.add(keyOf(keys[2 * i]!, keys[2 * i + 1]!));
  const extra: number[] = [];
  for (let i = 0; extra.length < 2 * 50; i++) if (!set.has(keyOf(0x9e3779b9 + i, 0xabcdef01))) extra.push(0x9e3779b9 + i, 0xabcdef01);
  const base = new VersionData(dim, n + 50);
  const stale = values.slice(0, n * dim);
  for (let i = 0; i < n; i += 2) stale.fill(0, i * dim, (i + 1) * dim);
  assert.equal(base.append(keys, stale, n), -1);
  assert.equal(base.append(new Uint32Array(extra), new Float32Array(50 * dim).fill(3), 50), -1);
  base.seal();
  const delta = base.derive();
  delta.upsert(fixed.keys, fixed.values, fixed.n);
  assert.equal(delta.delete(new Uint32Array(extra), 50), 50);
  delta.seal();
  assert.equal(delta.kernel, 'js');
  return delta;
});

// The real-time overlay over a sealed version: a third of the rows stale below it, a third only in it.
lookupSuite('overlay over a sealed version', (dim, keys, values, n) => {
  const below = pick(dim, keys, values, n, (i) => i % 3 !== 2);
  for (let j = 0; j < below.n; j++) if (j % 2 === 0) below.values.fill(0, j * dim, (j + 1) * dim); // rows i % 3 === 0
  const base = sealedVersion(dim, below.keys, below.values, below.n);
  const over = pick(dim, keys, values, n, (i) => i % 3 !== 1);
  const overlay = new Overlay(dim);
  overlay.put(over.keys, over.values, over.n, 1);
  return {
    lookup(req: Uint32Array, m: number, out: Float32Array, found: Uint8Array): number {
      base.lookup(req, m, out, found);
      overlay.lookupOver(req, m, out, found);
      let hits = 0;
      for (let i = 0; i < m; i++) hits += found[i]!;
      return hits;
    },
  };
});
