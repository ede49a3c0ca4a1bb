import type { PackedKeys } from '../common/keys.js';

/**
 * Key -> partition: the MurmurHash3 64-bit finalizer (fmix64) of the key, modulo the partition count.
 *
 *   k ^= k >> 33; k *= 0xff51afd7ed558ccd; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33
 *   partition = k mod partitions            (all arithmetic on unsigned 64-bit, wrapping)
 *
 * Partition -> shard group: partition mod groups. Computed here on 32-bit halves, without BigInt.
 */
export const MAX_PARTITIONS = 65536;

const C1_LO = 0xed558ccd;
const C1_HI = 0xff51afd7;
const C2_LO = 0x1a85ec53;
const C2_HI = 0xc4ceb9fe;

/** High 32 bits of the 64-bit product of two uint32 (Hacker's Delight mulhu). */
function mulhi32(a: number, b: number): number {
  const a0 = a & 0xffff;
  const a1 = a >>> 16;
  const b0 = b & 0xffff;
  const b1 = b >>> 16;
  const t = a1 * b0 + ((a0 * b0) >>> 16);
  const w1 = (t & 0xffff) + a0 * b1;
  return (a1 * b1 + (t >>> 16) + (w1 >>> 16)) >>> 0;
}

/** fmix64 of (hi, lo); returns the high word and writes the low word to `lowOut[0]`. */
function fmix64(lo: number, hi: number, lowOut: Uint32Array): number {
  lo = (lo ^ (hi >>> 1)) >>> 0;
  let nlo = Math.imul(lo, C1_LO) >>> 0;
  let nhi = (mulhi32(lo, C1_LO) + Math.imul(lo, C1_HI) + Math.imul(hi, C1_LO)) >>> 0;
  lo = (nlo ^ (nhi >>> 1)) >>> 0;
  hi = nhi;
  nlo = Math.imul(lo, C2_LO) >>> 0;
  nhi = (mulhi32(lo, C2_LO) + Math.imul(lo, C2_HI) + Math.imul(hi, C2_LO)) >>> 0;
  lowOut[0] = (nlo ^ (nhi >>> 1)) >>> 0;
  return nhi;
}

const scratch = new Uint32Array(1);

/**
 * (mhi * 2^32 + mlo) mod p, with every intermediate below 2^53; `base` = 2^32 mod p. For a power of
 * two p (<= 2^32) that is the low word masked.
 */
function reduce(mhi: number, mlo: number, partitions: number, base: number): number {
  if ((partitions & (partitions - 1)) === 0) return mlo & (partitions - 1);
  return ((mhi % partitions) * base + (mlo % partitions)) % partitions;
}

/** The partition of one key given as its 32-bit halves. */
export function partitionOfHalves(lo: number, hi: number, partitions: number): number {
  const mhi = fmix64(lo, hi, scratch);
  return reduce(mhi, scratch[0]!, partitions, 4294967296 % partitions);
}

/** The partition of one key (for tools and reference tables; BigInt only at this boundary). */
export function partitionOf(key: bigint, partitions: number): number {
  return partitionOfHalves(Number(key & 0xffffffffn), Number((key >> 32n) & 0xffffffffn), partitions);
}

/** Reference implementation on BigInt, as another language would write it. */
export function partitionOfReference(key: bigint, partitions: number): number {
  const M = (1n << 64n) - 1n;
  let k = key & M;
  k ^= k >> 33n;
  k = (k * 0xff51afd7ed558ccdn) & M;
  k ^= k >> 33n;
  k = (k * 0xc4ceb9fe1a85ec53n) & M;
  k ^= k >> 33n;
  return Number(k % BigInt(partitions));
}

/** The partition -> group table of a manifest: partition p belongs to group p mod groups. */
export function groupTable(partitions: number, groups: number): Uint16Array {
  const t = new Uint16Array(partitions);
  for (let p = 0; p < partitions; p++) t[p] = p % groups;
  return t;
}

/**
 * One pass over packed keys: writes each key's group to `groupOut` and counts keys per group into
 * `counts` (length = groups, zeroed here). With a power-of-two partition count the modulo is a mask
 * of the low word.
 */
export function assignGroups(
  keys: PackedKeys,
  n: number,
  partitions: number,
  groupOfPartition: Uint16Array,
  groupOut: Uint16Array,
  counts: Uint32Array,
): void {
  counts.fill(0);
  const base = 4294967296 % partitions;
  for (let i = 0; i < n; i++) {
    const mhi = fmix64(keys[2 * i]!, keys[2 * i + 1]!, scratch);
    const p = reduce(mhi, scratch[0]!, partitions, base);
    const g = groupOfPartition[p]!;
    groupOut[i] = g;
    counts[g]!++;
  }
}

/**
 * A stable counting sort of packed keys by group (after assignGroups): the keys of group g, in
 * request order, go to `outKeys` from key index start[g]; with `values`, their rows of `dim` floats go
 * to `outValues` the same way. Returns start (G + 1 entries).
 */
export function sortByGroup(
  keys: PackedKeys,
  n: number,
  groupOf: Uint16Array,
  counts: Uint32Array,
  outKeys: Uint32Array,
  values?: Float32Array,
  dim = 0,
  outValues?: Float32Array,
): Uint32Array {
  const G = counts.length;
  const start = new Uint32Array(G + 1);
  for (let g = 0; g < G; g++) start[g + 1] = start[g]! + counts[g]!;
  const fill = start.slice(0, G);
  for (let i = 0; i < n; i++) {
    const at = fill[groupOf[i]!]!++;
    outKeys[2 * at] = keys[2 * i]!;
    outKeys[2 * at + 1] = keys[2 * i + 1]!;
    if (values !== undefined) {
      let s = i * dim;
      let d = at * dim;
      const stop = s + dim;
      while (s < stop) outValues![d++] = values[s++]!;
    }
  }
  return start;
}
