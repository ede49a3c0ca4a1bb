import { KvError, KvErrorCode } from '../common/errors.js';
import { MAX_LOAD, MIN_SLOTS, homeSlot, probeSlot, rehashSlots } from './slots.js';
import { LookupArena } from './wasm-kernel.js';

/**
 * One version of one table on one replica: keys and vectors in packed typed arrays.
 *
 *   slots (open addressing, linear probing, 3 words a slot, load ≤ 0.7):
 *     [ keyLo | keyHi | row+1 ] [ keyLo | keyHi | row+1 ] ...      row+1 = 0: empty slot
 *     A key's probe starts at its hash scaled to the slot count (see homeSlot), so a table sized
 *     for a load's rows holds them at a load near 0.7 instead of 0.35-0.7 with a power of two.
 *   slabs:   Float32Array[SLAB_ROWS * dim] per slab; row r lives in slabs[r >> SLAB_SHIFT]
 *
 * A version is written only while it is the write version (`sealed === false`); once sealed it is
 * read-only for as long as it is kept, so lookups never take a lock. A delta version is derived from
 * a sealed one: it copies the slots and shares the sealed slabs, appending its own rows to new slabs,
 * so the base keeps serving unchanged while the delta is applied.
 *
 * A full version (not derived) of a dim that is a multiple of 4 keeps its slabs in WebAssembly
 * memory (LookupArena), and once sealed its slots too: its lookups then run in the WebAssembly
 * kernel. A derived version's rows span its base's memory and its own, so it looks up in JavaScript.
 */
export const SLAB_SHIFT = 14;
export const SLAB_ROWS = 1 << SLAB_SHIFT;
const SLAB_MASK = SLAB_ROWS - 1;
const BLOCK = 16;
/** slots.ts's HASH_SCALE, a module constant here as before: lookup64 inlines homeSlot. */
const HASH_SCALE = 2 ** -32;

/** Slots for `rows` rows at a load of at most MAX_LOAD. */
function slotsFor(rows: number): number {
  return Math.max(MIN_SLOTS, Math.ceil(rows / MAX_LOAD));
}

export interface VersionDataOptions {
  /** 'js': rows in JavaScript arrays and lookups in the JavaScript kernel even where WebAssembly would serve (tests run each kernel). */
  kernel?: 'auto' | 'js';
}

export class VersionData {
  readonly dim: number;
  /** Live keys. */
  count = 0;
  sealed = false;
  /** Rows allocated in the slabs (a derived version starts at its base's slab boundary). */
  private rows = 0;
  /** The first row this version owns; rows below it are shared with the base, read-only. */
  private ownFrom = 0;
  private slots: Uint32Array;
  /** Slots in `slots`. */
  private cap: number;
  private slabs: Float32Array[] = [];
  /** For an even dim, once sealed: the slabs as Float64 pairs, copied two floats at a time. */
  private slabs64: Float64Array[] | undefined;
  /** Where a full version's slabs live (undefined: in JavaScript arrays); sealed, its lookups run there. */
  private arena: LookupArena | undefined;
  /** No arena for this version: derived, a dim the kernel does not take, or one outgrown. */
  private noArena = false;
  /** The arena's buffer the slab views were taken from. */
  private arenaBuffer: ArrayBuffer | undefined;
  /** The rows this version was sized for (its arena starts that large). */
  private readonly expectedRows: number;
  /** Where slab 0 starts in the arena (slab i follows at i slab lengths). */
  private rowsOff = 0;
  /** Where the slot table starts in the arena, while it lives there (a detached view forgets it). */
  private slotsOff: number | undefined;
  // Rows found in the current block of the lookup kernel, reused across calls.
  private readonly blockRows = new Int32Array(BLOCK);
  /** Where the kernels store what they read to touch rows. */
  sink = 0;

  constructor(dim: number, expectedRows = 0, options: VersionDataOptions = {}) {
    this.dim = dim;
    this.noArena = options.kernel === 'js';
    const cap = slotsFor(expectedRows);
    this.cap = cap;
    this.expectedRows = expectedRows;
    // Sized for a load: the slot table goes into the arena now, ahead of the rows (no copy at seal).
    this.slotsOff = expectedRows > 0 ? this.openArena()?.alloc(cap * 12) : undefined;
    this.slots = this.slotsOff !== undefined ? new Uint32Array(this.arena!.buffer, this.slotsOff, cap * 3) : new Uint32Array(cap * 3);
  }

  /** A writable version holding the same entries, sharing this sealed version's vectors. */
  derive(): VersionData {
    if (!this.sealed) throw new KvError(KvErrorCode.INTERNAL, 'derive from an unsealed version');
    const d = new VersionData(this.dim);
    d.slots = this.slots.slice();
    d.cap = this.cap;
    d.slabs = this.slabs.slice();
    d.count = this.count;
    d.rows = this.slabs.length << SLAB_SHIFT;
    d.ownFrom = d.rows;
    d.noArena = true;
    return d;
  }

  /** Bytes held by this version's arrays (shared slabs included). */
  get bytes(): number {
    let b = this.slots.byteLength;
    for (const s of this.slabs) b += s.byteLength;
    return b;
  }

  /** Bytes of the slabs this version does not share with its base. */
  get ownBytes(): number {
    let b = this.slots.byteLength;
    for (let s = this.ownFrom >>> SLAB_SHIFT; s < this.slabs.length; s++) b += this.slabs[s]!.byteLength;
    return b;
  }

  /** Which kernel answers this version's lookups: WebAssembly once a full version is sealed in its arena. */
  get kernel(): 'wasm' | 'js' {
    return this.sealed && this.arena !== undefined ? 'wasm' : 'js';
  }

  /** The row of a key, or -1. */
  find(lo: number, hi: number): number {
    return this.slots[3 * probeSlot(this.slots, this.cap, lo, hi) + 2]! - 1;
  }

  /**
   * Appends rows `keys[2i], keys[2i+1]` -> `values[i*dim ...]` for i in [0, n). Returns -1, or the
   * index of the first key that this version already holds (nothing from that index on is added).
   */
  append(keys: Uint32Array, values: Float32Array, n: number): number {
    return this.write(keys, values, n, false);
  }

  /** Inserts or replaces rows (a delta's upserts). A replaced key gets a new row; the old one is left to its base. */
  upsert(keys: Uint32Array, values: Float32Array, n: number): void {
    this.write(keys, values, n, true);
  }

  private write(keys: Uint32Array, values: Float32Array, n: number, replace: boolean): number {
    if (this.sealed) throw new KvError(KvErrorCode.INTERNAL, 'write to a sealed version');
    // Every written key takes the next row, so the batch's rows are contiguous: index the keys
    // first, then copy the vectors in one run per slab (a memcpy, not a loop per row).
    const row0 = this.rows;
    let stop = -1;
    for (let i = 0; i < n; i++) {
      if (this.count + 1 > this.cap * MAX_LOAD) this.grow();
      const lo = keys[2 * i]!;
      const hi = keys[2 * i + 1]!;
      const slots = this.slots;
      const s = probeSlot(slots, this.cap, lo, hi);
      const existed = slots[3 * s + 2] !== 0;
      if (existed && !replace) {
        stop = i;
        break;
      }
      const row = this.rows++;
      slots[3 * s] = lo;
      slots[3 * s + 1] = hi;
      slots[3 * s + 2] = row + 1;
      if (!existed) this.count++;
    }
    this.copyRows(values, this.rows - row0, row0);
    return stop;
  }

  /** Copies `count` vectors from the start of `values` into rows `row0 ...`, adding slabs as needed. */
  private copyRows(values: Float32Array, count: number, row0: number): void {
    const dim = this.dim;
    let i = 0;
    while (i < count) {
      const row = row0 + i;
      const slabIdx = row >>> SLAB_SHIFT;
      if (slabIdx === this.slabs.length) {
        // newSlab() may replace this.slabs (moving out of the arena): push to the array it leaves.
        const slab = this.newSlab();
        this.slabs.push(slab);
      }
      const m = Math.min(count - i, SLAB_ROWS - (row & SLAB_MASK));
      this.slabs[slabIdx]!.set(values.subarray(i * dim, (i + m) * dim), (row & SLAB_MASK) * dim);
      i += m;
    }
  }

  /** Removes keys; returns how many were present. Backward-shift deletion keeps probe chains whole. */
  delete(keys: Uint32Array, n: number): number {
    if (this.sealed) throw new KvError(KvErrorCode.INTERNAL, 'delete from a sealed version');
    let removed = 0;
    const slots = this.slots;
    const cap = this.cap;
    for (let i = 0; i < n; i++) {
      const s = probeSlot(slots, cap, keys[2 * i]!, keys[2 * i + 1]!);
      if (slots[3 * s + 2] === 0) continue;
      this.removeSlot(s);
      removed++;
      this.count--;
    }
    return removed;
  }

  private removeSlot(hole: number): void {
    const slots = this.slots;
    const cap = this.cap;
    let s = hole + 1 === cap ? 0 : hole + 1;
    while (slots[3 * s + 2] !== 0) {
      const home = homeSlot(slots[3 * s]!, slots[3 * s + 1]!, cap);
      // Move the entry back into the hole if its home is not cyclically within (hole, s].
      const movable = hole <= s ? home <= hole || home > s : home <= hole && home > s;
      if (movable) {
        slots[3 * hole] = slots[3 * s]!;
        slots[3 * hole + 1] = slots[3 * s + 1]!;
        slots[3 * hole + 2] = slots[3 * s + 2]!;
        hole = s;
      }
      if (++s === cap) s = 0;
    }
    slots[3 * hole] = 0;
    slots[3 * hole + 1] = 0;
    slots[3 * hole + 2] = 0;
  }

  /** Ends writing: trims the last slab this version owns to what is used. */
  seal(): void {
    if (this.sealed) return;
    const last = this.slabs.length - 1;
    if (this.arena !== undefined) {
      // Slots and the kernel's scratch go into the arena after the slabs; it never grows again.
      const slots = this.arena.seal(this.slots, this.cap, this.rowsOff);
      if (slots === undefined) this.leaveArena();
      else {
        this.slots = slots;
        this.slotsOff = undefined; // sealed: the arena never grows again, the view stays
        this.viewSlabs();
        // The last slab's view ends at its last row; the pages past it were never written.
        if (last >= 0) this.slabs[last] = this.slabs[last]!.subarray(0, (this.rows - (last << SLAB_SHIFT)) * this.dim);
      }
    }
    if (this.arena === undefined && last >= 0 && last >= this.ownFrom >>> SLAB_SHIFT) {
      const used = (this.rows - (last << SLAB_SHIFT)) * this.dim;
      this.slabs[last] = this.slabs[last]!.slice(0, used);
    }
    if ((this.dim & 1) === 0) this.slabs64 = this.slabs.map((f) => new Float64Array(f.buffer, f.byteOffset, f.length / 2));
    this.sealed = true;
  }

  /** A slab for the next rows: in the arena for a full version, else a JavaScript array. */
  private newSlab(): Float32Array {
    const floats = SLAB_ROWS * this.dim;
    if (!this.noArena) {
      const arena = this.openArena();
      const off = arena?.alloc(floats * 4);
      if (off !== undefined) {
        if (this.slabs.length === 0) this.rowsOff = off;
        this.viewSlabs();
        return new Float32Array(arena!.buffer, off, floats);
      }
      // No kernel for this dim, or past what one arena holds: JavaScript arrays from here on.
      if (this.arena !== undefined) this.leaveArena();
      this.noArena = true;
    }
    return new Float32Array(floats);
  }

  /** This version's arena, made at first use (whole slabs for the rows expected: unwritten pages cost address space only). */
  private openArena(): LookupArena | undefined {
    if (this.arena === undefined && !this.noArena) {
      this.arena = LookupArena.create(this.dim, Math.ceil(this.expectedRows / SLAB_ROWS) * SLAB_ROWS, this.cap);
      if (this.arena === undefined) this.noArena = true;
      else this.arenaBuffer = this.arena.buffer;
    }
    return this.arena;
  }

  /** Takes the views into the arena again after its memory grew (slab i is at rowsOff + i slab lengths). */
  private viewSlabs(): void {
    const buffer = this.arena!.buffer;
    if (buffer === this.arenaBuffer) return;
    this.arenaBuffer = buffer;
    const floats = SLAB_ROWS * this.dim;
    for (let i = 0; i < this.slabs.length; i++) this.slabs[i] = new Float32Array(buffer, this.rowsOff + i * floats * 4, floats);
    if (this.slotsOff !== undefined) this.slots = new Uint32Array(buffer, this.slotsOff, this.cap * 3);
  }

  /** Moves the slabs out of the arena into JavaScript arrays and drops it. */
  private leaveArena(): void {
    this.viewSlabs();
    this.slabs = this.slabs.map((f) => f.slice());
    if (this.slotsOff !== undefined) this.slots = this.slots.slice();
    this.slotsOff = undefined;
    this.arena = undefined;
    this.arenaBuffer = undefined;
    this.noArena = true;
  }

  private grow(): void {
    this.cap *= 2;
    this.slots = rehashSlots(this.slots, this.cap);
    // The new table lives in JavaScript until seal() copies it into the arena.
    this.slotsOff = undefined;
  }

  /**
   * Looks up n packed keys, writing each vector to `out[i*dim ...]` and 1/0 to `found[i]`; rows of
   * absent keys are written as zeros, so `out` and `found` may hold anything before. Blocks of 16: find the rows of the whole
   * block first, touching each row, then copy, so the CPU overlaps the cache misses.
   */
  lookup(keys: Uint32Array, n: number, out: Float32Array, found: Uint8Array): number {
    if (this.sealed && this.arena !== undefined) return this.arena.lookup(keys, n, out, found);
    if (this.slabs64 !== undefined && (out.byteOffset & 7) === 0) {
      return this.lookup64(keys, n, new Float64Array(out.buffer, out.byteOffset, out.length / 2), found, this.slabs64);
    }
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
        if (r < 0) {
          found[i] = 0;
          out.fill(0, i * dim, (i + 1) * dim);
          continue;
        }
        const slab = slabs[r >>> SLAB_SHIFT]!;
        let src = (r & SLAB_MASK) * dim;
        let dst = i * dim;
        const stop = src + dim;
        while (src < stop) out[dst++] = slab[src++]!;
        found[i] = 1;
        hits++;
      }
      // Keeps the touching loads from being optimised away. Inside the loop on purpose: code
      // reached only after the loops has no type feedback when V8 compiles the hot loop (OSR), and
      // a compare or store there deoptimised the kernel at the end of every call.
      this.sink = touch;
    }
    return hits;
  }

  /** The kernel above with rows moved as Float64 pairs (finite float32 pairs are never a NaN double). */
  private lookup64(keys: Uint32Array, n: number, out: Float64Array, found: Uint8Array, slabs: Float64Array[]): number {
    const half = this.dim >>> 1;
    const rows = this.blockRows;
    const slots = this.slots;
    const cap = this.cap;
    let hits = 0;
    let touch = 0;
    for (let base = 0; base < n; base += BLOCK) {
      const end = Math.min(n, base + BLOCK);
      for (let i = base; i < end; i++) {
        // probeSlot(), inlined: calling it measured ~10% slower in this kernel (bench/RESULTS.md).
        const lo = keys[2 * i]!;
        const hi = keys[2 * i + 1]!;
        let h = Math.imul(lo, 0x9e3779b1) ^ Math.imul(hi ^ 0x7f4a7c15, 0x85ebca77);
        h ^= h >>> 15;
        h = Math.imul(h, 0x2c1b3c6d);
        h ^= h >>> 12;
        let sl = ((h >>> 0) * cap * HASH_SCALE) | 0; // homeSlot()
        let r = -1;
        for (;;) {
          const row1 = slots[3 * sl + 2]!;
          if (row1 === 0) break;
          if (slots[3 * sl] === lo && slots[3 * sl + 1] === hi) {
            r = row1 - 1;
            break;
          }
          if (++sl === cap) sl = 0;
        }
        rows[i - base] = r;
        if (r >= 0) touch += slabs[r >>> SLAB_SHIFT]![(r & SLAB_MASK) * half]!;
      }
      for (let i = base; i < end; i++) {
        const r = rows[i - base]!;
        if (r < 0) {
          found[i] = 0;
          out.fill(0, i * half, (i + 1) * half);
          continue;
        }
        const slab = slabs[r >>> SLAB_SHIFT]!;
        let src = (r & SLAB_MASK) * half;
        let dst = i * half;
        const stop = src + half;
        while (src < stop) out[dst++] = slab[src++]!;
        found[i] = 1;
        hits++;
      }
      this.sink = touch;
    }
    return hits;
  }

  /** Calls `fn` for every live entry with its key halves and a view of its vector. */
  forEach(fn: (lo: number, hi: number, vector: Float32Array) => void): void {
    const slots = this.slots;
    for (let o = 0; o < slots.length; o += 3) {
      const row1 = slots[o + 2]!;
      if (row1 === 0) continue;
      const r = row1 - 1;
      const off = (r & SLAB_MASK) * this.dim;
      fn(slots[o]!, slots[o + 1]!, this.slabs[r >>> SLAB_SHIFT]!.subarray(off, off + this.dim));
    }
  }
}
