import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { SLAB_ROWS, VersionData } from '../src/shard/version-data.js';
import { LOOKUP_KERNEL_WASM } from '../src/shard/wasm-kernel-bytes.js';
import { LookupArena } from '../src/shard/wasm-kernel.js';
import { checkLookups, randomRows as dataset } from './suites/fixtures.js';

test('the embedded kernel is src/shard/lookup-kernel.wat compiled (npm run build:kernel)', async () => {
  const { compileKernel } = (await import('../../scripts/build-kernel.mjs' as string)) as { compileKernel: (p: string) => Promise<Buffer> };
  const bytes = await compileKernel('src/shard/lookup-kernel.wat');
  assert.equal(bytes.toString('base64'), LOOKUP_KERNEL_WASM, 'run npm run build:kernel');
  assert.ok(readFileSync('src/shard/lookup-kernel.wat', 'utf8').includes('(func (export "lookup")'));
});

test('a sealed full version answers from the WebAssembly kernel (its answers: test/suites/lookup-suite.ts)', () => {
  for (const [dim, n] of [[32, 3 * SLAB_ROWS + 1234], [4, 40_000], [12, 5000]] as const) {
    const d = dataset(n, dim, dim);
    const v = new VersionData(dim, n);
    assert.equal(v.append(d.keys, d.values, n), -1);
    assert.equal(v.kernel, 'js', 'a write version looks up in JavaScript');
    v.seal();
    assert.equal(v.kernel, 'wasm', `dim ${dim}`);
    // Its answers, bit-exact over several slabs and in chunks: test/suites/lookup-suite.ts.
    assert.equal(v.bytes, v.count * dim * 4 + Math.ceil(Math.ceil(n * 1) / 0.7) * 12, `dim ${dim}: bytes are the rows and the slots`);
  }
});

test('dims the kernel does not take, and versions derived from a sealed one, look up in JavaScript, bit-exact', () => {
  const odd = new VersionData(6, 100);
  const d6 = dataset(100, 6, 1);
  odd.append(d6.keys, d6.values, 100);
  odd.seal();
  assert.equal(odd.kernel, 'js');

  const dim = 8;
  const n = SLAB_ROWS + 100;
  const d = dataset(n, dim, 2);
  const base = new VersionData(dim, n);
  base.append(d.keys, d.values, n);
  base.seal();
  assert.equal(base.kernel, 'wasm');
  // A delta replaces the first 10 rows and adds 5.
  const delta = base.derive();
  const extra = dataset(15, dim, 3);
  const upKeys = new Uint32Array([...d.keys.subarray(0, 20), ...extra.keys.subarray(0, 10)]);
  delta.upsert(upKeys, extra.values, 15);
  delta.seal();
  assert.equal(delta.kernel, 'js');
  const keys = new Uint32Array([...d.keys.subarray(0, 20), ...extra.keys.subarray(0, 10), ...d.keys.subarray(40, 60)]);
  const vals = new Float32Array([...extra.values, ...d.values.subarray(20 * dim, 30 * dim)]);
  checkLookups(delta, keys, vals, dim, 2000, 5, 'delta:');
  // The base still answers its own rows, unchanged.
  checkLookups(base, d.keys, d.values, dim, 3000, 6, 'base:');
});

test('a version that outgrows the rows it was sized for moves its slots out, grows its arena, and still answers bit-exact', () => {
  const dim = 16;
  const n = 60_000;
  const d = dataset(n, dim, 8);
  const v = new VersionData(dim, 20_000); // sized for a third of what comes
  for (let at = 0; at < n; at += 7000) {
    const m = Math.min(7000, n - at);
    assert.equal(v.append(d.keys.subarray(2 * at, 2 * (at + m)), d.values.subarray(at * dim, (at + m) * dim), m), -1);
  }
  v.seal();
  assert.equal(v.kernel, 'wasm');
  assert.equal(v.count, n);
  checkLookups(v, d.keys, d.values, dim, 9000, 4);
  // forEach sees every row through the arena's views.
  let seen = 0;
  v.forEach(() => seen++);
  assert.equal(seen, n);
});

test('a version expected past what one WebAssembly memory holds stays in JavaScript arrays', () => {
  // 300M rows of dim 4 are 4.8 GB: more than one memory takes (nothing is allocated to find out).
  assert.equal(LookupArena.create(4, 300_000_000, 0), undefined);
  assert.notEqual(LookupArena.create(4, 1000, 2000), undefined);
  assert.equal(LookupArena.create(6, 1000, 2000), undefined, 'dim 6: rows are not whole 16-byte moves');
});

test('a probe starts where JavaScript starts it, also where the hash times the slot count rounds (past 2^53)', () => {
  // Sized for 2M rows: 2,857,143 slots. This key's hash (3992533753) times that count rounds up to
  // the next multiple of 2^32 in doubles, so an exact multiply would start its probe a slot early.
  const v = new VersionData(4, 2_000_000);
  const key = new Uint32Array([460979979, 0]);
  assert.equal(v.append(key, new Float32Array([1, 2, 3, 4]), 1), -1);
  v.seal();
  assert.equal(v.kernel, 'wasm');
  const out = new Float32Array(4);
  const found = new Uint8Array(1);
  assert.equal(v.lookup(key, 1, out, found), 1);
  assert.deepEqual([...out], [1, 2, 3, 4]);
});

test('a growth the system refuses mid-load moves the rows to JavaScript arrays and the load goes on', () => {
  const dim = 4;
  const n = 2 * SLAB_ROWS + 10;
  const d = dataset(n, dim, 12);
  const v = new VersionData(dim, SLAB_ROWS); // sized for one slab: the second needs a growth
  const grow = WebAssembly.Memory.prototype.grow;
  WebAssembly.Memory.prototype.grow = (): number => {
    throw new RangeError('refused');
  };
  try {
    assert.equal(v.append(d.keys, d.values, n), -1);
  } finally {
    WebAssembly.Memory.prototype.grow = grow;
  }
  v.seal();
  assert.equal(v.kernel, 'js');
  checkLookups(v, d.keys, d.values, dim, 5000, 13);
});
