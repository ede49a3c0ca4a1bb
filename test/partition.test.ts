import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  assignGroups,
  groupTable,
  partitionOf,
  partitionOfHalves,
  partitionOfReference,
  sortByGroup,
} from '../src/cluster/partition.js';
import { stringKey } from '../src/common/keys.js';
import { mulberry32 } from './helpers/util.js';

// ---- independent reference implementations (written from the published algorithms, not from src) ----

const M64 = (1n << 64n) - 1n;

/** MurmurHash3 fmix64 on BigInt. */
function fmix64(key: bigint): bigint {
  let k = key & M64;
  k ^= k >> 33n;
  k = (k * 0xff51afd7ed558ccdn) & M64;
  k ^= k >> 33n;
  k = (k * 0xc4ceb9fe1a85ec53n) & M64;
  k ^= k >> 33n;
  return k;
}

const P1 = 0x9e3779b185ebca87n;
const P2 = 0xc2b2ae3d27d4eb4fn;
const P3 = 0x165667b19e3779f9n;
const P4 = 0x85ebca77c2b2ae63n;
const P5 = 0x27d4eb2f165667c5n;
const rotl = (x: bigint, r: number): bigint => ((x << BigInt(r)) | (x >> BigInt(64 - r))) & M64;
const xxRound = (acc: bigint, input: bigint): bigint => (rotl((acc + input * P2) & M64, 31) * P1) & M64;
const xxMerge = (acc: bigint, v: bigint): bigint => ((acc ^ xxRound(0n, v)) * P1 + P4) & M64;

/** XXH64 on BigInt, straight from the xxHash spec. */
function xxh64(bytes: Uint8Array, seed = 0n): bigint {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const len = bytes.length;
  let p = 0;
  let h: bigint;
  if (len >= 32) {
    let v1 = (seed + P1 + P2) & M64;
    let v2 = (seed + P2) & M64;
    let v3 = seed & M64;
    let v4 = (seed - P1) & M64;
    for (; p + 32 <= len; p += 32) {
      v1 = xxRound(v1, dv.getBigUint64(p, true));
      v2 = xxRound(v2, dv.getBigUint64(p + 8, true));
      v3 = xxRound(v3, dv.getBigUint64(p + 16, true));
      v4 = xxRound(v4, dv.getBigUint64(p + 24, true));
    }
    h = (rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18)) & M64;
    h = xxMerge(h, v1);
    h = xxMerge(h, v2);
    h = xxMerge(h, v3);
    h = xxMerge(h, v4);
  } else {
    h = (seed + P5) & M64;
  }
  h = (h + BigInt(len)) & M64;
  for (; p + 8 <= len; p += 8) {
    h ^= xxRound(0n, dv.getBigUint64(p, true));
    h = (rotl(h, 27) * P1 + P4) & M64;
  }
  if (p + 4 <= len) {
    h ^= (BigInt(dv.getUint32(p, true)) * P1) & M64;
    h = (rotl(h, 23) * P2 + P3) & M64;
    p += 4;
  }
  for (; p < len; p++) {
    h ^= (BigInt(bytes[p]!) * P5) & M64;
    h = (rotl(h, 11) * P1) & M64;
  }
  h ^= h >> 33n;
  h = (h * P2) & M64;
  h ^= h >> 29n;
  h = (h * P3) & M64;
  h ^= h >> 32n;
  return h;
}

const utf8 = (s: string): Uint8Array => new TextEncoder().encode(s);


const EDGE_KEYS = [0n, 1n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 63n, M64];
const PARTITION_COUNTS = [1, 7, 64, 1000, 65536];
const RANDOM_KEYS = 100_000;

/** Packed keys: edge keys first, then random words, with a few structured patterns mixed in. */
function makeKeys(): { packed: Uint32Array; big: BigUint64Array; n: number } {
  const n = EDGE_KEYS.length + RANDOM_KEYS;
  const big = new BigUint64Array(n);
  EDGE_KEYS.forEach((k, i) => (big[i] = k));
  const words = new Uint32Array(big.buffer);
  const rnd = mulberry32(0x5eed);
  for (let i = EDGE_KEYS.length; i < n; i++) {
    let lo = rnd();
    let hi = rnd();
    // Every 8th key has one all-zero or all-one half: small ids and ids near 2^64 are common.
    switch (i & 7) {
      case 0: hi = 0; break;
      case 1: lo = 0; break;
      case 2: hi = 0xffffffff; break;
      case 3: hi &= 0x1fffff; break; // below 2^53, where callers pass numbers
      default: break;
    }
    words[2 * i] = lo;
    words[2 * i + 1] = hi;
  }
  return { packed: words, big, n };
}

const KEYS = makeKeys();

test('independent xxh64 matches the published XXH64 test vectors', () => {
  assert.equal(xxh64(utf8('')), 0xef46db3751d8e999n);
  assert.equal(xxh64(utf8('a')), 0xd24ec4f1a98c6e5bn);
  assert.equal(xxh64(utf8('abc')), 0x44bc2cf5ad770999n);
});

test('stringKey is xxh64 seed 0 of the UTF-8 bytes (published vectors and the independent xxh64)', async () => {
  assert.equal(await stringKey(''), 0xef46db3751d8e999n);
  assert.equal(await stringKey('a'), 0xd24ec4f1a98c6e5bn);
  // Lengths 0..80 cover the 1-byte, 4-byte, 8-byte tails and the 32-byte stripe loop; non-ASCII checks UTF-8.
  const alphabet = 'aé✓😀Z0:';
  for (let len = 0; len <= 80; len++) {
    let s = '';
    for (let i = 0; i < len; i++) s += alphabet[(i * 7 + len) % alphabet.length];
    assert.equal(await stringKey(s), xxh64(utf8(s)), `string of ${len} code points: ${JSON.stringify(s)}`);
  }
});

test('partitionOfReference agrees with the independent fmix64', () => {
  for (let i = 0; i < 5_000; i++) {
    const k = KEYS.big[i]!;
    for (const p of PARTITION_COUNTS) {
      assert.equal(partitionOfReference(k, p), Number(fmix64(k) % BigInt(p)), `key ${k} P=${p}`);
    }
  }
  // fmix64 fixes 0 and is the published value at 1.
  assert.equal(fmix64(0n), 0n);
  assert.equal(fmix64(1n), 0xb456bcfc34c2cb2cn);
});

for (const p of PARTITION_COUNTS) {
  test(`partitionOfHalves, partitionOf and assignGroups equal partitionOfReference (P=${p}, ${KEYS.n} keys)`, () => {
    const { packed, big, n } = KEYS;
    const expected = new Uint32Array(n);
    for (let i = 0; i < n; i++) expected[i] = partitionOfReference(big[i]!, p);

    for (let i = 0; i < n; i++) {
      const e = expected[i]!;
      const h = partitionOfHalves(packed[2 * i]!, packed[2 * i + 1]!, p);
      if (h !== e) assert.fail(`partitionOfHalves(key ${big[i]}, ${p}) = ${h}, reference ${e}`);
      const b = partitionOf(big[i]!, p);
      if (b !== e) assert.fail(`partitionOf(key ${big[i]}, ${p}) = ${b}, reference ${e}`);
    }

    // With one group per partition, assignGroups writes the partition itself.
    const groupOut = new Uint16Array(n);
    const counts = new Uint32Array(p).fill(12345); // must be zeroed by assignGroups
    assignGroups(packed, n, p, groupTable(p, p), groupOut, counts);
    const expectCounts = new Uint32Array(p);
    for (let i = 0; i < n; i++) {
      if (groupOut[i] !== expected[i]) assert.fail(`assignGroups key ${big[i]} P=${p}: ${groupOut[i]}, reference ${expected[i]}`);
      expectCounts[expected[i]!]!++;
    }
    assert.deepEqual(counts, expectCounts);

    // Edge keys, by name so a failure reads well.
    for (const k of EDGE_KEYS) assert.equal(partitionOf(k, p), Number(fmix64(k) % BigInt(p)), `edge key ${k}`);
  });
}

test('assignGroups maps partitions to groups p mod groups and counts per group', () => {
  const { packed, big } = KEYS;
  const n = 10_000;
  const partitions = 64;
  const groups = 3;
  const table = groupTable(partitions, groups);
  assert.equal(table.length, partitions);
  for (let q = 0; q < partitions; q++) assert.equal(table[q], q % groups);
  const groupOut = new Uint16Array(n + 5).fill(999); // entries past n stay untouched
  const counts = new Uint32Array(groups);
  assignGroups(packed, n, partitions, table, groupOut, counts);
  const expectCounts = [0, 0, 0];
  for (let i = 0; i < n; i++) {
    const g = partitionOfReference(big[i]!, partitions) % groups;
    assert.equal(groupOut[i], g);
    expectCounts[g]!++;
  }
  assert.deepEqual(Array.from(counts), expectCounts);
  assert.deepEqual(Array.from(groupOut.subarray(n)), [999, 999, 999, 999, 999]);
});

/**
 * The reference table of the docs (test/partition-reference.md), P = 64. Values were computed once with the
 * independent fmix64/xxh64 above and pinned here, so a change to the mix or the string hash fails loudly.
 */
const REFERENCE_P64: readonly (readonly [bigint | string, bigint, number])[] = [
  [0n, 0x0000000000000000n, 0],
  [1n, 0xb456bcfc34c2cb2cn, 44],
  [2n, 0x3abf2a20650683e7n, 39],
  [3n, 0x0b5181c509f8d8cen, 14],
  [42n, 0x810879608e4259ccn, 12],
  [1000000n, 0x443b192cac3fa823n, 35],
  [2n ** 32n, 0xba3a9e160a5f1419n, 25],
  [2n ** 63n, 0x8f780810af31a493n, 19],
  [M64, 0x64b5720b4b825f21n, 33],
  ['user:1', 0x846d7634feed030dn, 13],
  ['item:42', 0x8b89ee63545c2ce1n, 33],
];
const STRING_KEY_IDS: Record<string, bigint> = {
  'user:1': 0xd9c7c4609e6080f3n, // 15692727345848811763
  'item:42': 0x8d6bfb2a9459a500n, // 10190514742151980288
};

test('pinned reference table for 64 partitions', async () => {
  for (const [raw, mixed, partition] of REFERENCE_P64) {
    let key: bigint;
    if (typeof raw === 'string') {
      key = await stringKey(raw);
      assert.equal(key, STRING_KEY_IDS[raw], `stringKey(${JSON.stringify(raw)})`);
      assert.equal(xxh64(utf8(raw)), STRING_KEY_IDS[raw], `independent xxh64(${JSON.stringify(raw)})`);
    } else {
      key = raw;
    }
    const name = typeof raw === 'string' ? JSON.stringify(raw) : String(raw);
    assert.equal(fmix64(key), mixed, `independent fmix64(${name})`);
    assert.equal(Number(mixed % 64n), partition, `pinned table row ${name} is self-consistent`);
    assert.equal(partitionOf(key, 64), partition, `partitionOf(${name}, 64)`);
    assert.equal(partitionOfReference(key, 64), partition, `partitionOfReference(${name}, 64)`);
    assert.equal(
      partitionOfHalves(Number(key & 0xffffffffn), Number(key >> 32n), 64),
      partition,
      `partitionOfHalves(${name}, 64)`,
    );
  }
});

test('sortByGroup keeps request order within each group and moves value rows with their keys', () => {
  const n = 1000;
  const dim = 3;
  const keys = new Uint32Array(2 * n);
  const values = new Float32Array(n * dim);
  for (let i = 0; i < n; i++) {
    keys[2 * i] = i * 7919;
    keys[2 * i + 1] = i;
    values.fill(i, i * dim, (i + 1) * dim);
  }
  const G = 5;
  const groupOf = new Uint16Array(n);
  const counts = new Uint32Array(G);
  assignGroups(keys, n, 64, groupTable(64, G), groupOf, counts);
  const outKeys = new Uint32Array(2 * n);
  const outValues = new Float32Array(n * dim);
  const start = sortByGroup(keys, n, groupOf, counts, outKeys, values, dim, outValues);
  assert.equal(start[G], n);
  for (let g = 0; g < G; g++) {
    let last = -1;
    for (let at = start[g]!; at < start[g + 1]!; at++) {
      const i = outKeys[2 * at + 1]!; // the high word is the request position
      assert.equal(groupOf[i], g);
      assert.ok(i > last, 'request order kept within the group');
      last = i;
      assert.equal(outKeys[2 * at], i * 7919);
      assert.deepEqual(Array.from(outValues.subarray(at * dim, (at + 1) * dim)), [i, i, i]);
    }
  }
});
