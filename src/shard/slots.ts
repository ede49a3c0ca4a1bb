/**
 * The open-addressing slot arrays that VersionData, Overlay and KeySet index keys with:
 *
 *   [ keyLo | keyHi | row+1 ] [ keyLo | keyHi | row+1 ] ...      row+1 = 0: empty slot
 *
 * linear probing from a home slot scaled to the slot count (homeSlot), at a load of at most MAX_LOAD.
 */
export const MIN_SLOTS = 1024;
export const MAX_LOAD = 0.7;

export function slotHash(lo: number, hi: number): number {
  let h = Math.imul(lo, 0x9e3779b1) ^ Math.imul(hi ^ 0x7f4a7c15, 0x85ebca77);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  h ^= h >>> 12;
  return h >>> 0;
}

/** 2^-32: scales a 32-bit hash to [0, 1). */
export const HASH_SCALE = 2 ** -32;

/**
 * Where key (lo, hi)'s probe starts among `cap` slots: its 32-bit hash times cap / 2^32, so any slot
 * count works (a multiply where a power of two would take a mask). The product is below 2^32 * cap
 * by at least cap and rounds below it, so the slot is always < cap.
 */
export function homeSlot(lo: number, hi: number, cap: number): number {
  return (slotHash(lo, hi) * cap * HASH_SCALE) | 0;
}

/**
 * The slot of key (lo, hi) in an open-addressing array of `cap` slots (3 words a slot: lo, hi,
 * row + 1; 0 = empty) with linear probing: the slot holding the key, or the empty slot that ends its
 * chain, where it would be inserted. `slots[3 * s + 2] === 0` tells which.
 */
export function probeSlot(slots: Uint32Array, cap: number, lo: number, hi: number): number {
  let s = homeSlot(lo, hi, cap);
  while (slots[3 * s + 2] !== 0 && (slots[3 * s] !== lo || slots[3 * s + 1] !== hi)) if (++s === cap) s = 0;
  return s;
}

/** A slot array of `cap` slots (3 words each, third word 0 = empty) holding the entries of `old`. */
export function rehashSlots(old: Uint32Array, cap: number): Uint32Array {
  const slots = new Uint32Array(cap * 3);
  for (let o = 0; o < old.length; o += 3) {
    if (old[o + 2] === 0) continue;
    let s = homeSlot(old[o]!, old[o + 1]!, cap);
    while (slots[3 * s + 2] !== 0) if (++s === cap) s = 0;
    slots[3 * s] = old[o]!;
    slots[3 * s + 1] = old[o + 1]!;
    slots[3 * s + 2] = old[o + 2]!;
  }
  return slots;
}

/** A set of keys (open addressing on the halves), for refusing a key repeated within one delta. */
export class KeySet {
  private slots: Uint32Array = new Uint32Array(MIN_SLOTS * 3);
  private cap = MIN_SLOTS;
  size = 0;

  /** Adds a key; false if it was there already. */
  add(lo: number, hi: number): boolean {
    if (this.size + 1 > this.cap * MAX_LOAD) this.grow();
    const slots = this.slots;
    const s = probeSlot(slots, this.cap, lo, hi);
    if (slots[3 * s + 2] !== 0) return false;
    slots[3 * s] = lo;
    slots[3 * s + 1] = hi;
    slots[3 * s + 2] = 1;
    this.size++;
    return true;
  }

  private grow(): void {
    this.cap *= 2;
    this.slots = rehashSlots(this.slots, this.cap);
  }
}

