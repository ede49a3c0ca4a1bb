import { test } from 'node:test';
import assert from 'node:assert/strict';
import { homeSlot } from '../src/shard/slots.js';
import { SLAB_ROWS, VersionData } from '../src/shard/version-data.js';
import { mulberry32 } from './helpers/util.js';
import { appendInBatches, checkAnswer, halfSharingKeys, keyOf, makeDataset, makeRequest } from './suites/fixtures.js';


test('200k keys in batches of varying size: lookups are bit-exact before and after seal', () => {
  const d = makeDataset(200_000, 8, 1);
  const v = new VersionData(d.dim); // no size hint: the slot table grows many times
  const bytesBefore = v.bytes;
  const batches = appendInBatches(v, d, [1, 7, 1000, 33_333, 3, 16_384, 250, 70_001]);
  assert.ok(batches > 10);
  assert.equal(v.count, 200_000);
  assert.ok(200_000 > 2 * SLAB_ROWS, 'more than one slab');
  // The slot table grew from 1024 slots to at least 200k / 0.7.
  assert.ok(v.bytes > bytesBefore + (200_000 / 0.7) * 12, `bytes ${v.bytes}`);

  const m = 60_000;
  const req = makeRequest(d, m, 2);
  const expectHits = req.rowOf.reduce((s, r) => s + (r >= 0 ? 1 : 0), 0);
  assert.ok(expectHits > m / 3 && expectHits < m, 'a real mix of present and absent keys');

  for (const phase of ['write version', 'sealed']) {
    if (phase === 'sealed') v.seal();
    // Arrays holding an earlier answer (a reused answer buffer): every row and flag is written,
    // absent ones as zeros.
    const out = new Float32Array(m * d.dim).fill(7.5);
    const found = new Uint8Array(m).fill(1);
    const hits = v.lookup(req.keys, m, out, found);
    assert.equal(hits, expectHits, phase);
    checkAnswer(d, req.rowOf, out, found, phase);
    // find() agrees, key by key.
    for (let i = 0; i < 2000; i++) assert.equal(v.find(req.keys[2 * i]!, req.keys[2 * i + 1]!), req.rowOf[i], `${phase} find ${i}`);
  }
  // Every stored key, one by one.
  for (let r = 0; r < d.n; r++) {
    if (v.find(d.keys[2 * r]!, d.keys[2 * r + 1]!) !== r) assert.fail(`find of row ${r}`);
  }
});

// lookup honours n: test/suites/lookup-suite.ts, for every kernel.

test('append returns the index of a key already present, within a batch and across batches', () => {
  const dim = 3;
  const v = new VersionData(dim);
  const vec = (x: number): number[] => [x, x + 0.25, -x];
  // Within one batch: [10, 11, 10, 12] -> 2; rows 10 and 11 are added, 12 is not.
  const r1 = v.append(new Uint32Array([10, 0, 11, 0, 10, 0, 12, 0]), new Float32Array([...vec(1), ...vec(2), ...vec(3), ...vec(4)]), 4);
  assert.equal(r1, 2);
  assert.equal(v.count, 2);
  assert.equal(v.find(10, 0), 0);
  assert.equal(v.find(11, 0), 1);
  assert.equal(v.find(12, 0), -1, 'nothing from the duplicate on is added');

  // Across batches: [13, 11, 14] -> 1; 13 is added, 14 is not.
  const r2 = v.append(new Uint32Array([13, 0, 11, 0, 14, 0]), new Float32Array([...vec(5), ...vec(6), ...vec(7)]), 3);
  assert.equal(r2, 1);
  assert.equal(v.count, 3);
  assert.equal(v.find(13, 0), 2);
  assert.equal(v.find(14, 0), -1);

  // First key of a batch already present -> 0, nothing added.
  assert.equal(v.append(new Uint32Array([10, 0, 15, 0]), new Float32Array([...vec(8), ...vec(9)]), 2), 0);
  assert.equal(v.count, 3);

  // The stored vectors are the first ones written, not the duplicates'.
  const out = new Float32Array(4 * dim);
  const found = new Uint8Array(4);
  assert.equal(v.lookup(new Uint32Array([10, 0, 11, 0, 13, 0, 12, 0]), 4, out, found), 3);
  assert.deepEqual(Array.from(found), [1, 1, 1, 0]);
  assert.deepEqual(Array.from(out), [...vec(1), ...vec(2), ...vec(5), 0, 0, 0]);

  // A later clean batch still works.
  assert.equal(v.append(new Uint32Array([12, 0, 14, 0]), new Float32Array([...vec(10), ...vec(11)]), 2), -1);
  assert.equal(v.count, 5);
  assert.equal(v.find(14, 0), 4);
});

test('a duplicate is detected across a grow() of the slot table', () => {
  const dim = 1;
  const v = new VersionData(dim);
  const n = 5000; // more than 1024 * 0.7: grows while this batch is appended
  const keys = new Uint32Array(2 * (n + 1));
  for (let i = 0; i < n; i++) {
    keys[2 * i] = i * 2654435761;
    keys[2 * i + 1] = i;
  }
  keys[2 * n] = keys[2 * 3]!;
  keys[2 * n + 1] = keys[2 * 3 + 1]!;
  assert.equal(v.append(keys, new Float32Array(n + 1).map((_, i) => i), n + 1), n);
  assert.equal(v.count, n);
});

test('seal() ends writing: append throws, lookups and count unchanged, seal is idempotent', () => {
  const d = makeDataset(SLAB_ROWS + 10, 2, 4);
  const v = new VersionData(d.dim, d.n);
  appendInBatches(v, d, [5000]);
  v.seal();
  assert.equal(v.sealed, true);
  assert.throws(() => v.append(new Uint32Array([1, 2]), new Float32Array([1, 2]), 1));
  assert.throws(() => v.append(new Uint32Array(0), new Float32Array(0), 0), 'even an empty append');
  assert.equal(v.count, d.n);
  assert.equal(v.find(1, 2), -1);
  v.seal();
  assert.equal(v.count, d.n);
  const req = makeRequest(d, 3000, 5);
  const out = new Float32Array(3000 * d.dim);
  const found = new Uint8Array(3000);
  v.lookup(req.keys, 3000, out, found);
  checkAnswer(d, req.rowOf, out, found, 'after seal');
});

test('keys that share one half are distinct keys', () => {
  const dim = 2;
  const v = new VersionData(dim);
  // (lo, hi): same lo with different hi, same hi with different lo, and the all-zero key.
  const pairs: [number, number][] = [
    [7, 1], [7, 2], [7, 0xffffffff], [7, 0],
    [8, 1], [0xffffffff, 1], [0, 1],
    [0, 0], [0xffffffff, 0xffffffff], [1, 0], [0, 0xffffffff],
  ];
  const keys = new Uint32Array(pairs.flat());
  const values = new Float32Array(pairs.length * dim).map((_, i) => i + 0.5);
  assert.equal(v.append(keys, values, pairs.length), -1);
  assert.equal(v.count, pairs.length);
  pairs.forEach(([lo, hi], r) => assert.equal(v.find(lo, hi), r, `find(${lo}, ${hi})`));
  // Absent keys sharing one half with stored ones.
  for (const [lo, hi] of [[7, 3], [8, 2], [2, 1], [0xffffffff, 2], [1, 1], [2, 0]] as const) {
    assert.equal(v.find(lo, hi), -1, `absent (${lo}, ${hi})`);
  }
  // Their lookups, for every kernel: test/suites/lookup-suite.ts.
});

test('many keys with one half in common stay distinct (probe chains full of half-matches)', () => {
  // 600 keys sharing the low half and 600 sharing the high half fill most of a 1024-slot table, so
  // a probe for one of them passes slots whose key matches in one half only.
  const dim = 1;
  const v = new VersionData(dim);
  const n = 600;
  const keys = halfSharingKeys(n);
  assert.equal(v.append(keys, new Float32Array(2 * n).map((_, i) => i), 2 * n), -1);
  assert.equal(v.count, 2 * n);
  for (let r = 0; r < 2 * n; r++) {
    if (v.find(keys[2 * r]!, keys[2 * r + 1]!) !== r) assert.fail(`row ${r} (lo ${keys[2 * r]}, hi ${keys[2 * r + 1]})`);
  }
  for (let i = 0; i < n; i++) {
    const hiAbsent = (i * 7919 + 1) >>> 0; // not a multiple of 7919 below 600 * 7919
    if (v.find(0xdeadbeef, hiAbsent) !== -1) assert.fail(`absent (lo 0xdeadbeef, hi ${hiAbsent}) found`);
    const loAbsent = (i * 104729 + 2) >>> 0;
    if (v.find(loAbsent, 0x12345678) !== -1) assert.fail(`absent (lo ${loAbsent}, hi 0x12345678) found`);
  }
  // And through every lookup kernel: test/suites/lookup-suite.ts.
});

test('forEach visits every live entry once with its key and vector', () => {
  const d = makeDataset(3 * SLAB_ROWS + 123, 5, 6);
  const rowOfKey = new Map<bigint, number>();
  for (let r = 0; r < d.n; r++) rowOfKey.set(keyOf(d.keys[2 * r]!, d.keys[2 * r + 1]!), r);
  for (const sealed of [false, true]) {
    const v = new VersionData(d.dim);
    appendInBatches(v, d, [999, 20_000, 1]);
    if (sealed) v.seal();
    const seen = new Uint8Array(d.n);
    let visits = 0;
    v.forEach((lo, hi, vector) => {
      visits++;
      const r = rowOfKey.get(keyOf(lo, hi));
      if (r === undefined) assert.fail(`forEach gave unknown key (lo ${lo}, hi ${hi})`);
      if (seen[r]) assert.fail(`row ${r} visited twice`);
      seen[r] = 1;
      if (vector.length !== d.dim) assert.fail(`row ${r}: vector of ${vector.length}`);
      for (let j = 0; j < d.dim; j++) {
        if (!Object.is(vector[j], d.values[r * d.dim + j])) assert.fail(`row ${r} component ${j}`);
      }
    });
    assert.equal(visits, d.n, `sealed=${sealed}`);
    assert.ok(seen.every((s) => s === 1), `sealed=${sealed}: every row visited`);
  }
  // An empty version visits nothing.
  let calls = 0;
  new VersionData(4).forEach(() => calls++);
  assert.equal(calls, 0);
});

test('a sealed version of 100k keys of dim 32 holds less than 300 bytes a key', () => {
  const d = makeDataset(100_000, 32, 7);
  const v = new VersionData(d.dim);
  appendInBatches(v, d, [4096, 10_000, 777]);
  v.seal();
  const perKey = v.bytes / d.n;
  const payload = d.dim * 4;
  assert.ok(perKey >= payload, `${perKey.toFixed(1)} bytes a key cannot be below the vectors' ${payload}`);
  assert.ok(perKey < 300, `${perKey.toFixed(1)} bytes a key`);
  // The same with a size hint.
  const w = new VersionData(d.dim, d.n);
  appendInBatches(w, d, [100_000]);
  w.seal();
  assert.ok(w.bytes / d.n < 300, `presized: ${(w.bytes / d.n).toFixed(1)} bytes a key`);
});

test('homeSlot spreads keys over any slot count, never past its end', () => {
  const rnd = mulberry32(11);
  const extremes: [number, number][] = [[0, 0], [0xffffffff, 0xffffffff], [0xffffffff, 0], [0, 0xffffffff]];
  for (const cap of [1, 3, 1000, 1429, 2 ** 21 + 1, 1_431_655_765]) {
    for (const [lo, hi] of extremes) assert.ok(homeSlot(lo, hi, cap) < cap);
    for (let i = 0; i < 20_000; i++) {
      const s = homeSlot(rnd(), rnd(), cap);
      assert.ok(Number.isInteger(s) && s >= 0 && s < cap, `slot ${s} of ${cap}`);
    }
  }
  // 100k keys over 1000 slots: about 100 each.
  const counts = new Uint32Array(1000);
  for (let i = 0; i < 100_000; i++) counts[homeSlot(i, 7, 1000)]!++;
  assert.ok(Math.min(...counts) > 50 && Math.max(...counts) < 160, `${Math.min(...counts)}..${Math.max(...counts)} keys a slot`);
});

test('a version presized for its rows holds them in about 17 bytes of index a key', () => {
  const d = makeDataset(250_000, 32, 5);
  const v = new VersionData(d.dim, d.n);
  appendInBatches(v, d, [8192]);
  v.seal();
  const index = v.bytes - d.n * d.dim * 4;
  assert.ok(index / d.n < 18, `${(index / d.n).toFixed(1)} bytes of index a key`);
});

test('probe chains that wrap past the last slot survive deletes on both sides of the wrap', () => {
  const dim = 2;
  const v = new VersionData(dim, 700); // 1000 slots
  const rnd = mulberry32(3);
  // Keys whose probes start in the last three slots or the first two, so chains run over the end.
  const keys: [number, number][] = [];
  while (keys.length < 60) {
    const lo = rnd();
    const hi = rnd();
    const s = homeSlot(lo, hi, 1000);
    if (s >= 997 || s <= 1) keys.push([lo, hi]);
  }
  const packed = new Uint32Array(keys.flat());
  const values = new Float32Array(keys.length * dim).map((_, i) => i);
  assert.equal(v.append(packed, values, keys.length), -1);
  const gone = new Set([0, 1, 5, 17, 30, 31, 44, 59]);
  const del = new Uint32Array([...gone].flatMap((i) => keys[i]!));
  assert.equal(v.delete(del, gone.size), gone.size);
  const out = new Float32Array(keys.length * dim);
  const found = new Uint8Array(keys.length);
  v.lookup(packed, keys.length, out, found);
  for (let i = 0; i < keys.length; i++) {
    assert.equal(found[i], gone.has(i) ? 0 : 1, `key ${i}`);
    if (!gone.has(i)) assert.deepEqual([...out.subarray(i * dim, i * dim + dim)], [i * dim, i * dim + 1], `key ${i}`);
  }
  assert.equal(v.count, keys.length - gone.size);
});
