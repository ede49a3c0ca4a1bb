import { framingInPlace, preframe, unpreframe } from './grpc-patches.js';

/**
 * Answer buffers of a replica, reused: on this class of machine, writing into freshly mapped memory
 * costs more than the lookup itself (page faults, ~10 us a page).
 *
 * With zero-copy framing installed (installZeroCopyFraming), an answer is sent from its own buffer:
 * the 5 bytes in front of the message take the gRPC frame header, and the buffer returns to the pool
 * when its HTTP/2 stream closes. Otherwise grpc-js copies the message into a frame of its own right
 * after `responseSerialize` returns, and the buffer returns once that copy is done.
 *
 *   size classes: powers of two from 64 KiB; at most KEEP buffers per class, MAX_BYTES in all
 */
export class AnswerBufferPool {
  private static readonly KEEP = 4;
  private static readonly MAX_BYTES = 128 * 1024 * 1024;
  private pooledBytes = 0;
  private readonly free = new Map<number, ArrayBuffer[]>();
  private readonly owned = new WeakSet<ArrayBuffer>();

  /** Buffers back in the pool, ready to be taken again. */
  get idle(): number {
    let n = 0;
    for (const list of this.free.values()) n += list.length;
    return n;
  }

  take(bytes: number): ArrayBuffer {
    let size = 65536;
    while (size < bytes) size *= 2;
    const reused = this.free.get(size)?.pop();
    if (reused !== undefined) this.pooledBytes -= size;
    const ab = reused ?? new ArrayBuffer(size);
    this.owned.add(ab);
    if (framingInPlace()) preframe(ab, () => this.giveBack(ab));
    return ab;
  }

  private giveBack(ab: ArrayBuffer): void {
    if (!this.owned.has(ab)) return;
    this.owned.delete(ab);
    unpreframe(ab);
    const list = this.free.get(ab.byteLength) ?? [];
    if (list.length < AnswerBufferPool.KEEP && this.pooledBytes + ab.byteLength <= AnswerBufferPool.MAX_BYTES) {
      list.push(ab);
      this.pooledBytes += ab.byteLength;
    }
    this.free.set(ab.byteLength, list);
  }

  /** Called with every answer grpc-js frames by copying; a pooled buffer returns after that copy. */
  readonly onSerialize = (b: Buffer): Buffer => {
    const ab = b.buffer as ArrayBuffer;
    if (this.owned.has(ab)) {
      unpreframe(ab);
      queueMicrotask(() => this.giveBack(ab));
    }
    return b;
  };
}
