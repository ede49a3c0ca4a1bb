/**
 * One version of one table on one replica: keys and vectors in packed typed arrays.
 *
 *   slots (open addressing, linear probing, 3 words a slot, load ≤ 0.7):
 *     [ keyLo | keyHi | row+1 ] [ keyLo | keyHi | row+1 ] ...      row+1 = 0: empty slot
 *   rowKeys: [ lo0 | hi0 | lo1 | hi1 | ... ]                           the key of every row
 *   slabs:   Float32Array[SLAB_ROWS * dim] per slab; row r lives in slabs[r >> SLAB_SHIFT]
 *
 * A version is written only while it is the write version (`sealed === false`); once sealed it is
 * read-only for as long as it is kept, so lookups never take a lock.
 */
export const SLAB_SHIFT = 14;
export const SLAB_ROWS = 1 << SLAB_SHIFT;
const SLAB_MASK = SLAB_ROWS - 1;
const MIN_SLOTS = 1024;
const BLOCK = 16;

function slotHash(lo: number, hi: number): number {
  let h = Math.imul(lo, 0x9e3779b1) ^ Math.imul(hi ^ 0x7f4a7c15, 0x85ebca77);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  h ^= h >>> 12;
  return h >>> 0;
}

export class VersionData {
  readonly dim: number;
  count = 0;
  sealed = false;
  private slots: Uint32Array;
  private mask: number;
  private rowKeys: Uint32Array;
  private slabs: Float32Array[] = [];
  // Rows found in the current block of the lookup kernel, reused across calls.
  private readonly blockRows = new Int32Array(BLOCK);

  constructor(dim: number, expectedRows = 0) {
    this.dim = dim;
    let cap = MIN_SLOTS;
    while (cap * 0.7 < expectedRows) cap *= 2;
    this.slots = new Uint32Array(cap * 3);
    this.mask = cap - 1;
    this.rowKeys = new Uint32Array(Math.max(2 * expectedRows, 2 * 1024));
  }

  /** Bytes held by this version's arrays. */
  get bytes(): number {
    let b = this.slots.byteLength + this.rowKeys.byteLength;
    for (const s of this.slabs) b += s.byteLength;
    return b;
  }

  /** The row of a key, or -1. */
  find(lo: number, hi: number): number {
    const slots = this.slots;
    const mask = this.mask;
    let s = slotHash(lo, hi) & mask;
    for (;;) {
      const row1 = slots[3 * s + 2]!;
      if (row1 === 0) return -1;
      if (slots[3 * s] === lo && slots[3 * s + 1] === hi) return row1 - 1;
      s = (s + 1) & mask;
    }
  }

  /**
   * Appends rows `keys[2i], keys[2i+1]` -> `values[i*dim ...]` for i in [0, n). Returns -1, or the
   * index of the first key that this version already holds (nothing from that index on is added).
   */
  append(keys: Uint32Array, values: Float32Array, n: number): number {
    if (this.sealed) throw new Error('append to a sealed version');
    const dim = this.dim;
    for (let i = 0; i < n; i++) {
      if ((this.count + 1) > (this.mask + 1) * 0.7) this.grow();
      const lo = keys[2 * i]!;
      const hi = keys[2 * i + 1]!;
      const slots = this.slots;
      const mask = this.mask;
      let s = slotHash(lo, hi) & mask;
      for (;;) {
        const row1 = slots[3 * s + 2]!;
        if (row1 === 0) break;
        if (slots[3 * s] === lo && slots[3 * s + 1] === hi) return i;
        s = (s + 1) & mask;
      }
      const row = this.count;
      slots[3 * s] = lo;
      slots[3 * s + 1] = hi;
      slots[3 * s + 2] = row + 1;
      if (2 * row + 2 > this.rowKeys.length) {
        const rk = new Uint32Array(this.rowKeys.length * 2);
        rk.set(this.rowKeys);
        this.rowKeys = rk;
      }
      this.rowKeys[2 * row] = lo;
      this.rowKeys[2 * row + 1] = hi;
      const slabIdx = row >>> SLAB_SHIFT;
      if (slabIdx === this.slabs.length) this.slabs.push(new Float32Array(SLAB_ROWS * dim));
      this.slabs[slabIdx]!.set(values.subarray(i * dim, i * dim + dim), (row & SLAB_MASK) * dim);
      this.count = row + 1;
    }
    return -1;
  }

  /** Ends writing: trims the last slab and the key array to what is used. */
  seal(): void {
    if (this.sealed) return;
    const last = this.slabs.length - 1;
    if (last >= 0) {
      const used = (this.count - (last << SLAB_SHIFT)) * this.dim;
      this.slabs[last] = this.slabs[last]!.slice(0, used);
    }
    this.rowKeys = this.rowKeys.slice(0, 2 * this.count);
    this.sealed = true;
  }

  private grow(): void {
    const cap = (this.mask + 1) * 2;
    const slots = new Uint32Array(cap * 3);
    const mask = cap - 1;
    const rk = this.rowKeys;
    for (let row = 0; row < this.count; row++) {
      const lo = rk[2 * row]!;
      const hi = rk[2 * row + 1]!;
      let s = slotHash(lo, hi) & mask;
      while (slots[3 * s + 2] !== 0) s = (s + 1) & mask;
      slots[3 * s] = lo;
      slots[3 * s + 1] = hi;
      slots[3 * s + 2] = row + 1;
    }
    this.slots = slots;
    this.mask = mask;
  }

  /**
   * Looks up n packed keys, writing each vector to `out[i*dim ...]` and 1/0 to `found[i]`. `out` must
   * be zeroed where keys are absent (a fresh buffer is). Blocks of 16: find the rows of the whole
   * block first, touching each row, then copy, so the CPU overlaps the cache misses.
   */
  lookup(keys: Uint32Array, n: number, out: Float32Array, found: Uint8Array): number {
    const dim = this.dim;
    const rows = this.blockRows;
    const slabs = this.slabs;
    let hits = 0;
    let touch = 0;
    for (let base = 0; base < n; base += BLOCK) {
      const end = Math.min(n, base + BLOCK);
      for (let i = base; i < end; i++) {
        const r = this.find(keys[2 * i]!, keys[2 * i + 1]!);
        rows[i - base] = r;
        if (r >= 0) touch += slabs[r >>> SLAB_SHIFT]![(r & SLAB_MASK) * dim]!;
      }
      for (let i = base; i < end; i++) {
        const r = rows[i - base]!;
        if (r < 0) continue;
        const slab = slabs[r >>> SLAB_SHIFT]!;
        let src = (r & SLAB_MASK) * dim;
        let dst = i * dim;
        const stop = src + dim;
        while (src < stop) out[dst++] = slab[src++]!;
        found[i] = 1;
        hits++;
      }
    }
    // Keeps the touching loads from being optimised away.
    if (touch === 0.5) this.count += 0;
    return hits;
  }

  /** Calls `fn` with consecutive runs of rows (keys and vectors as views), for persistence. */
  forEachRun(fn: (keys: Uint32Array, values: Float32Array, n: number) => void): void {
    for (let s = 0; s < this.slabs.length; s++) {
      const first = s << SLAB_SHIFT;
      const n = Math.min(SLAB_ROWS, this.count - first);
      fn(this.rowKeys.subarray(2 * first, 2 * (first + n)), this.slabs[s]!.subarray(0, n * this.dim), n);
    }
  }
}
