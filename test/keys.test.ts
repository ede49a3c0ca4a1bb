import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  bytesOf,
  firstNonFinite,
  floatsFromBytes,
  keyAt,
  keysFromBytes,
  packKeys,
  stringKey,
  type KeyInput,
} from '../src/common/keys.js';
import { KvError } from '../src/common/errors.js';

const U64_MAX = (1n << 64n) - 1n;

/** The packed words of a key: [lo, hi]. */
const words = (k: bigint): [number, number] => [Number(k & 0xffffffffn), Number(k >> 32n)];
const packedOf = (ks: readonly bigint[]): number[] => ks.flatMap(words);

/** Rejects with KV_INVALID_ARGUMENT and a message naming `name` (an argument or `arg[i]`). */
async function rejectsNaming(p: Promise<unknown>, name: string, what: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof KvError, `${what}: expected a KvError, got ${String(err)}`);
    assert.equal(err.code, 'KV_INVALID_ARGUMENT', what);
    assert.ok(err.message.includes(name), `${what}: message ${JSON.stringify(err.message)} should name ${name}`);
    return true;
  });
}

function throwsInvalid(fn: () => unknown, name: string, what: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof KvError, `${what}: expected a KvError, got ${String(err)}`);
    assert.equal(err.code, 'KV_INVALID_ARGUMENT', what);
    assert.ok(err.message.includes(name), `${what}: message ${JSON.stringify(err.message)} should name ${name}`);
    return true;
  });
}

// ---- packKeys -----------------------------------------------------------------------------------

test('packKeys views a BigUint64Array instead of copying it', async () => {
  const ks = [0n, 1n, 0xffffffffn, 1n << 32n, 0x0123456789abcdefn, U64_MAX];
  const arr = new BigUint64Array(ks);
  const packed = await packKeys(arr);
  assert.ok(packed instanceof Uint32Array);
  assert.equal(packed.buffer, arr.buffer, 'same ArrayBuffer');
  assert.equal(packed.byteOffset, arr.byteOffset);
  assert.equal(packed.length, 2 * ks.length);
  assert.deepEqual(Array.from(packed), packedOf(ks));
  // A write through the input shows through the packed view: it really is a view.
  arr[1] = 0xaabbccdd11223344n;
  assert.deepEqual([packed[2], packed[3]], [0x11223344, 0xaabbccdd]);

  // A subarray view at a non-zero offset stays a view of the same bytes.
  const big = new BigUint64Array(ks);
  const sub = big.subarray(2, 5);
  const p2 = await packKeys(sub);
  assert.equal(p2.buffer, big.buffer);
  assert.equal(p2.byteOffset, 16);
  assert.equal(p2.length, 6);
  assert.deepEqual(Array.from(p2), packedOf(ks.slice(2, 5)));

  assert.equal((await packKeys(new BigUint64Array(0))).length, 0);
});

test('packKeys packs bigint[] as little-endian lo/hi words', async () => {
  const ks = [0n, 1n, 0xffffffffn, 1n << 32n, (1n << 63n) + 5n, 0xfedcba9876543210n, U64_MAX];
  const packed = await packKeys(ks);
  assert.deepEqual(Array.from(packed), packedOf(ks));
  for (let i = 0; i < ks.length; i++) assert.equal(keyAt(packed, i), ks[i]);
  // Byte-for-byte what a BigUint64Array holds (little-endian host).
  assert.deepEqual(Buffer.from(bytesOf(packed)), Buffer.from(new BigUint64Array(ks).buffer));
});

test('packKeys packs number[] of safe non-negative integers', async () => {
  const ns = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1, 123_456_789_012, 2 ** 53 - 1, -0];
  const packed = await packKeys(ns);
  assert.deepEqual(Array.from(packed), packedOf(ns.map((n) => BigInt(n))));
  assert.deepEqual(
    [packed[12], packed[13]],
    [0xffffffff, 0x1fffff],
    '2^53-1 is lo 0xffffffff, hi 0x1fffff',
  );
  assert.equal(keyAt(packed, 6), 2n ** 53n - 1n);
});

test('packKeys hashes string[] with xxh64 seed 0 of the UTF-8 bytes', async () => {
  // Published XXH64 vectors, and a value pinned from an independent implementation (test/partition.test.ts).
  const expected: [string, bigint][] = [
    ['', 0xef46db3751d8e999n],
    ['a', 0xd24ec4f1a98c6e5bn],
    ['abc', 0x44bc2cf5ad770999n],
    ['user:1', 0xd9c7c4609e6080f3n],
  ];
  const packed = await packKeys(expected.map(([s]) => s));
  assert.deepEqual(Array.from(packed), packedOf(expected.map(([, k]) => k)));
  // Same id as stringKey, also for non-ASCII (UTF-8, not UTF-16).
  const uni = ['é', '名前', '😀', 'x'.repeat(100)];
  const p2 = await packKeys(uni);
  for (let i = 0; i < uni.length; i++) assert.equal(keyAt(p2, i), await stringKey(uni[i]!));
  // UTF-8 of 'é' is c3 a9; a latin1 or UTF-16 hash would differ from the hash of those two bytes.
  assert.notEqual(keyAt(p2, 0), await stringKey('\u00c3\u00a9'));
});

test('packKeys returns an empty packing for an empty array and allows duplicates', async () => {
  assert.equal((await packKeys([])).length, 0);
  assert.deepEqual(Array.from(await packKeys([7, 7, 7])), [7, 0, 7, 0, 7, 0]);
});

test('packKeys refuses bad number keys, naming the index', async () => {
  const cases: [readonly number[], number][] = [
    [[1, -1], 1],
    [[-5], 0],
    [[0, 1, 1.5], 2],
    [[2 ** 53], 0],
    [[2 ** 53 + 2], 0],
    [[1, 2, 3, 2 ** 64], 3],
    [[0, NaN], 1],
    [[Infinity], 0],
    [[0, -Infinity], 1],
  ];
  for (const [ks, i] of cases) await rejectsNaming(packKeys(ks), `keys[${i}]`, `numbers ${String(ks)}`);
  // The argument name is the caller's.
  await rejectsNaming(packKeys([1, -1], 'featureIds'), 'featureIds[1]', 'custom argName');
});

test('packKeys refuses bigint keys outside [0, 2^64), naming the index', async () => {
  await rejectsNaming(packKeys([0n, 1n << 64n]), 'keys[1]', '2^64');
  await rejectsNaming(packKeys([U64_MAX, U64_MAX + 1n]), 'keys[1]', '2^64 after 2^64-1');
  await rejectsNaming(packKeys([-1n]), 'keys[0]', '-1n');
  await rejectsNaming(packKeys([5n, 6n, -(1n << 70n)]), 'keys[2]', '-2^70');
});

test('packKeys refuses mixed arrays, naming the first offending index', async () => {
  const cases: [readonly unknown[], number][] = [
    [[1, 2n], 1],
    [[1n, 2n, 3], 2],
    [['a', 1], 1],
    [[1, 'a'], 1],
    [['a', 'b', 1n], 2],
    [[1n, 'a'], 1],
    [[1, null], 1],
    [['a', undefined], 1],
  ];
  for (const [ks, i] of cases) await rejectsNaming(packKeys(ks as KeyInput), `keys[${i}]`, `mixed ${String(ks)}`);
});

test('packKeys refuses elements of no accepted kind, and non-arrays', async () => {
  for (const first of [null, undefined, true, {}, [1], Symbol('k')]) {
    await rejectsNaming(packKeys([first] as unknown as KeyInput), 'keys[0]', `first element ${String(first)}`);
  }
  const notArrays: unknown[] = [
    null,
    undefined,
    'abc',
    42,
    42n,
    { length: 1, 0: 1 },
    new Uint32Array([1, 2]),
    new Float64Array([1]),
    new BigInt64Array([1n]),
    new Set([1]),
  ];
  for (const v of notArrays) {
    await rejectsNaming(packKeys(v as KeyInput), 'keys', `non-array ${Object.prototype.toString.call(v)}`);
    await rejectsNaming(packKeys(v as KeyInput, 'ids'), 'ids', `non-array with argName`);
  }
});

// ---- keysFromBytes / floatsFromBytes -------------------------------------------------------------

test('keysFromBytes views aligned bytes and copies unaligned ones', () => {
  const ks = [3n, 0x0123456789abcdefn, U64_MAX, 1n << 32n];
  const src = Buffer.from(new BigUint64Array(ks).buffer);

  // Aligned (offset 8 within its ArrayBuffer): a view.
  const ab = new ArrayBuffer(64);
  const aligned = new Uint8Array(ab, 8, 32);
  aligned.set(src);
  const v = keysFromBytes(aligned);
  assert.equal(v.buffer, ab, 'aligned input is viewed');
  assert.equal(v.byteOffset, 8);
  assert.deepEqual(Array.from(v), packedOf(ks));

  // 4-byte but not 8-byte aligned is still fine for a Uint32Array view.
  const at4 = new Uint8Array(ab, 28, 32);
  at4.set(src);
  const v4 = keysFromBytes(at4);
  assert.equal(v4.buffer, ab);
  assert.deepEqual(Array.from(v4), packedOf(ks));

  // Unaligned offsets: a correct copy.
  for (const off of [1, 2, 3, 5]) {
    const ab2 = new ArrayBuffer(64);
    const un = new Uint8Array(ab2, off, 32);
    un.set(src);
    const c = keysFromBytes(un);
    assert.notEqual(c.buffer, ab2, `offset ${off}: copied`);
    assert.deepEqual(Array.from(c), packedOf(ks), `offset ${off}`);
    for (let i = 0; i < ks.length; i++) assert.equal(keyAt(c, i), ks[i]);
  }

  assert.equal(keysFromBytes(new Uint8Array(0)).length, 0);
});

test('keysFromBytes refuses a length that is not a multiple of 8, naming the argument', () => {
  for (const len of [1, 4, 7, 9, 15]) {
    throwsInvalid(() => keysFromBytes(new Uint8Array(len)), 'keys', `${len} bytes`);
  }
  throwsInvalid(() => keysFromBytes(new Uint8Array(12), 'request.keys'), 'request.keys', 'custom argName');
});

test('floatsFromBytes views aligned bytes and copies unaligned ones', () => {
  const fs = new Float32Array([1.5, -0, 3.4028234663852886e38, 1e-45, -2.25, 0]);
  const src = Buffer.from(fs.buffer);
  const ab = new ArrayBuffer(64);
  const aligned = new Uint8Array(ab, 4, 24);
  aligned.set(src);
  const v = floatsFromBytes(aligned);
  assert.equal(v.buffer, ab);
  assert.equal(v.byteOffset, 4);
  assert.deepEqual(Buffer.from(v.buffer, v.byteOffset, v.byteLength), src);
  for (const off of [1, 2, 3, 7]) {
    const ab2 = new ArrayBuffer(64);
    const un = new Uint8Array(ab2, off, 24);
    un.set(src);
    const c = floatsFromBytes(un);
    assert.notEqual(c.buffer, ab2, `offset ${off}: copied`);
    assert.equal(c.length, 6);
    for (let i = 0; i < fs.length; i++) assert.ok(Object.is(c[i], fs[i]), `offset ${off} value ${i}`);
  }
  assert.equal(floatsFromBytes(new Uint8Array(0)).length, 0);
});

test('floatsFromBytes refuses a length that is not a multiple of 4, naming the argument', () => {
  for (const len of [1, 2, 3, 5, 10]) throwsInvalid(() => floatsFromBytes(new Uint8Array(len)), 'values', `${len} bytes`);
  throwsInvalid(() => floatsFromBytes(new Uint8Array(6), 'vectors'), 'vectors', 'custom argName');
});

test('bytesOf is a view of the same bytes', () => {
  const f = new Float32Array([1, 2, 3, 4]).subarray(1, 3);
  const b = bytesOf(f);
  assert.equal(b.buffer, f.buffer);
  assert.equal(b.byteOffset, 4);
  assert.equal(b.byteLength, 8);
});

// ---- firstNonFinite -----------------------------------------------------------------------------

test('firstNonFinite finds the first NaN or ±Infinity', () => {
  const F32_MAX = 3.4028234663852886e38;
  assert.equal(firstNonFinite(new Float32Array(0)), -1);
  assert.equal(firstNonFinite(new Float32Array([0, -0, 1, -1, F32_MAX, -F32_MAX, 1e-45, -1e-45])), -1);
  assert.equal(firstNonFinite(new Float32Array([NaN])), 0);
  assert.equal(firstNonFinite(new Float32Array([1, 2, Infinity])), 2);
  assert.equal(firstNonFinite(new Float32Array([1, -Infinity, NaN])), 1);
  assert.equal(firstNonFinite(new Float32Array([1, 2, 3, NaN, Infinity])), 3);
  // Every position in the four-at-a-time part and the tail, every kind of non-finite bit pattern,
  // and a view that starts inside its buffer.
  const one = new Uint32Array(1);
  const bad = [0x7fc00000, 0xffc00000, 0x7f800001, 0xff800000, 0x7f800000, 0xffffffff];
  for (const len of [1, 3, 4, 5, 8, 11, 37]) {
    for (let at = 0; at < len; at++) {
      for (const b of bad) {
        const buf = new Float32Array(len + 2).fill(F32_MAX);
        const view = buf.subarray(1, len + 1);
        one[0] = b;
        view[at] = new Float32Array(one.buffer)[0]!;
        if (at + 1 < len) view[at + 1] = NaN;
        assert.equal(firstNonFinite(view), at, `length ${len}, position ${at}, bits ${b.toString(16)}`);
      }
    }
    assert.equal(firstNonFinite(new Float32Array(len).fill(-F32_MAX)), -1);
  }
  // A NaN with a payload, and a value that overflows to Infinity on the way into float32.
  const bits = new Uint32Array([0x3f800000, 0x7fa00001]);
  assert.equal(firstNonFinite(new Float32Array(bits.buffer)), 1);
  assert.equal(firstNonFinite(new Float32Array([0, 1e39])), 1);
  // A long array with the bad value at the end.
  const long = new Float32Array(10_000).fill(0.5);
  long[9_999] = NaN;
  assert.equal(firstNonFinite(long), 9_999);
  // A view: the index is relative to the view.
  assert.equal(firstNonFinite(long.subarray(9_990)), 9);
});
