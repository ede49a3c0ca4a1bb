import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { SLAB_ROWS } from '../../src/shard/version-data.js';
import { checkAnswer, checkLookups, halfSharingKeys, makeDataset, makeRequest, randomRows, type LookupTable } from './fixtures.js';

/**
 * One suite for every lookup kernel, as abstract-level's suite is run by every Level backend: each
 * kernel gets the same fixtures and must answer them bit for bit.
 */

/** A table holding rows [0, n) of `keys` -> `values` (n packed keys, n * dim floats), answering through one kernel. */
export type MakeTable = (dim: number, keys: Uint32Array, values: Float32Array, n: number) => LookupTable;

export function lookupSuite(name: string, makeTable: MakeTable): void {
  describe(`lookup kernel: ${name}`, () => {
    test('bit-exact over several slabs and in chunks, absent rows zeroed in arrays holding garbage', () => {
      for (const [dim, n, q] of [[32, 3 * SLAB_ROWS + 1234, 10_000], [4, 40_000, 4096 * 2 + 5], [12, 5000, 3], [6, 100, 2000], [5, 3000, 1000]] as const) {
        const d = randomRows(n, dim, dim);
        checkLookups(makeTable(dim, d.keys, d.values, n), d.keys, d.values, dim, q, 99, `dim ${dim}:`);
      }
    });

    test('present, absent, half-colliding and repeated keys, into arrays holding an earlier answer', () => {
      const d = makeDataset(200_000, 8, 1);
      const t = makeTable(d.dim, d.keys, d.values, d.n);
      const m = 60_000;
      const req = makeRequest(d, m, 2);
      const expectHits = req.rowOf.reduce((s, r) => s + (r >= 0 ? 1 : 0), 0);
      assert.ok(expectHits > m / 3 && expectHits < m, 'a real mix of present and absent keys');
      // Every row and flag is written, absent ones as zeros.
      const out = new Float32Array(m * d.dim).fill(7.5);
      const found = new Uint8Array(m).fill(1);
      assert.equal(t.lookup(req.keys, m, out, found), expectHits);
      checkAnswer(d, req.rowOf, out, found, name);
    });

    test('lookup honours n and answers only the first n positions', () => {
      const d = makeDataset(100, 4, 3);
      const t = makeTable(d.dim, d.keys, d.values, d.n);
      const out = new Float32Array(10 * d.dim);
      const found = new Uint8Array(10);
      const hits = t.lookup(d.keys.subarray(0, 20), 6, out, found);
      assert.equal(hits, 6);
      assert.deepEqual(Array.from(found), [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]);
      assert.deepEqual(out.subarray(0, 6 * d.dim), d.values.subarray(0, 6 * d.dim));
      assert.ok(out.subarray(6 * d.dim).every((x) => x === 0));
    });

    test('keys that share one half are distinct keys', () => {
      const dim = 2;
      const pairs: [number, number][] = [
        [7, 1], [7, 2], [7, 0xffffffff], [7, 0],
        [8, 1], [0xffffffff, 1], [0, 1],
        [0, 0], [0xffffffff, 0xffffffff], [1, 0], [0, 0xffffffff],
      ];
      const t = makeTable(dim, new Uint32Array(pairs.flat()), new Float32Array(pairs.length * dim).map((_, i) => i + 0.5), pairs.length);
      const out = new Float32Array(4 * dim);
      const found = new Uint8Array(4);
      assert.equal(t.lookup(new Uint32Array([7, 2, 7, 3, 0, 0, 8, 1]), 4, out, found), 3);
      assert.deepEqual(Array.from(found), [1, 0, 1, 1]);
      assert.deepEqual(Array.from(out), [2.5, 3.5, 0, 0, 14.5, 15.5, 8.5, 9.5]);
    });

    test('many keys with one half in common stay distinct (probe chains full of half-matches)', () => {
      const n = 600;
      const keys = halfSharingKeys(n);
      const t = makeTable(1, keys, new Float32Array(2 * n).map((_, i) => i), 2 * n);
      const out = new Float32Array(2 * n);
      const found = new Uint8Array(2 * n);
      assert.equal(t.lookup(keys, 2 * n, out, found), 2 * n);
      assert.deepEqual(Array.from(out), Array.from({ length: 2 * n }, (_, i) => i));
    });
  });
}
