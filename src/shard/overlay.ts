import { probeSlot, rehashSlots } from './slots.js';

const MIN_SLOTS = 256;
const MAX_LOAD = 0.7;

/**
 * Real-time updates of one table on one replica, layered over whichever version serves:
 *
 *   slots: [ keyLo | keyHi | row+1 ] ...      (open addressing, as in VersionData)
 *   rows:  Float32Array, row r at r*dim;  order: Float64Array, the write order of row r
 *
 * A batch is applied in one synchronous step, so a lookup sees all of it or none of it. A key keeps
 * the value of the highest write order (last writer wins), so replicas that receive the same batches
 * in different orders converge.
 */
export class Overlay {
  count = 0;
  private slots: Uint32Array;
  private cap: number;
  private rows: Float32Array;
  private order: Float64Array;

  constructor(readonly dim: number) {
    this.slots = new Uint32Array(MIN_SLOTS * 3);
    this.cap = MIN_SLOTS;
    this.rows = new Float32Array(64 * dim);
    this.order = new Float64Array(64);
  }

  get bytes(): number {
    return this.slots.byteLength + this.rows.byteLength + this.order.byteLength;
  }

  /** Bytes after adding `n` more keys, for admission control. */
  bytesWith(n: number): number {
    return this.bytes + n * (this.dim * 4 + 8 + 24);
  }

  /** Applies a batch with write order `order`; returns how many keys took the new value. */
  put(keys: Uint32Array, values: Float32Array, n: number, order: number): number {
    const dim = this.dim;
    let applied = 0;
    for (let i = 0; i < n; i++) {
      if (this.count + 1 > this.cap * MAX_LOAD) this.grow();
      const lo = keys[2 * i]!;
      const hi = keys[2 * i + 1]!;
      const slots = this.slots;
      const s = probeSlot(slots, this.cap, lo, hi);
      let row = slots[3 * s + 2]! - 1;
      if (row >= 0) {
        if (this.order[row]! > order) continue;
      } else {
        row = this.count++;
        if (row === this.order.length) this.growRows();
        slots[3 * s] = lo;
        slots[3 * s + 1] = hi;
        slots[3 * s + 2] = row + 1;
      }
      this.order[row] = order;
      this.rows.set(values.subarray(i * dim, i * dim + dim), row * dim);
      applied++;
    }
    return applied;
  }

  /** Overwrites the answer of every key this overlay holds. */
  lookupOver(keys: Uint32Array, n: number, out: Float32Array, found: Uint8Array): void {
    if (this.count === 0) return;
    const dim = this.dim;
    const slots = this.slots;
    const cap = this.cap;
    const rows = this.rows;
    for (let i = 0; i < n; i++) {
      const row1 = slots[3 * probeSlot(slots, cap, keys[2 * i]!, keys[2 * i + 1]!) + 2]!;
      if (row1 === 0) continue;
      let src = (row1 - 1) * dim;
      let dst = i * dim;
      const stop = src + dim;
      while (src < stop) out[dst++] = rows[src++]!;
      found[i] = 1;
    }
  }

  /** A copy holding only the entries written at `minOrder` or later. */
  since(minOrder: number): Overlay | undefined {
    const o = new Overlay(this.dim);
    const key = new Uint32Array(2);
    for (let s = 0; s < this.slots.length; s += 3) {
      const row1 = this.slots[s + 2]!;
      if (row1 === 0 || this.order[row1 - 1]! < minOrder) continue;
      key[0] = this.slots[s]!;
      key[1] = this.slots[s + 1]!;
      o.put(key, this.rows.subarray((row1 - 1) * this.dim, row1 * this.dim), 1, this.order[row1 - 1]!);
    }
    return o.count > 0 ? o : undefined;
  }

  private grow(): void {
    this.cap *= 2;
    this.slots = rehashSlots(this.slots, this.cap);
  }


  private growRows(): void {
    const rows = new Float32Array(this.rows.length * 2);
    rows.set(this.rows);
    this.rows = rows;
    const order = new Float64Array(this.order.length * 2);
    order.set(this.order);
    this.order = order;
  }
}
