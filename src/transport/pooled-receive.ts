import { createRequire } from 'node:module';

/**
 * Received answers in reused buffers.
 *
 * grpc-js assembles every received message from its HTTP/2 chunks with a Buffer.concat into fresh
 * memory: 19.2 MB per 150k-key request at dim 32, on top of the 19.2 MB of socket reads and the
 * caller's 19.2 MB result. That external memory is what sets the pace of the client's garbage
 * collections (V8 starts a mark-compact after about 64 MB of it). Installed, large messages are
 * copied chunk by chunk into a buffer taken from a pool instead, and the fan-out gives each answer's
 * buffer back once its rows are placed (releaseReceived). A buffer nobody gives back is collected
 * as before.
 *
 * The decoder is the same state machine as grpc-js's StreamDecoder (a 1-byte flag, a 4-byte
 * big-endian length, the message; the flag and length stay in front of the message), writing into
 * the message's buffer as chunks arrive instead of collecting them (up to UPFRONT_MESSAGE_BYTES).
 * Installed only when grpc-js's own decoder frames a probe exactly that way.
 */

/** Messages at least this large are received into pooled buffers; smaller ones as grpc-js does. */
export const POOLED_MESSAGE_BYTES = 256 * 1024;

/**
 * Messages above this are collected as received and joined at the end, as grpc-js does, instead of
 * taking their whole announced size when their 5-byte header arrives: a peer that announces a large
 * message and sends nothing more holds no more memory than it sent.
 */
export const UPFRONT_MESSAGE_BYTES = 32 * 1024 * 1024;

/** The pool keeps at most this many free buffers, and this many bytes of them. */
const KEEP_BUFFERS = 32;
const KEEP_BYTES = 96 * 1024 * 1024;

/** New buffers get 1/16 headroom (rounded to 64 KiB), so that next request's slightly larger answer fits. */
const capacityFor = (bytes: number): number => Math.ceil((bytes + (bytes >>> 4)) / 65536) * 65536;

export interface ReceivePoolStats {
  /** Messages received into a buffer from the pool, and into a new one. */
  reused: number;
  allocated: number;
  /** Buffers given back and kept, and their bytes. */
  free: number;
  freeBytes: number;
}

class ReceivePool {
  private readonly free: ArrayBuffer[] = [];
  private freeBytes = 0;
  private readonly lent = new WeakSet<ArrayBuffer>();
  reused = 0;
  allocated = 0;

  /** A buffer of exactly `bytes`, at offset 0 of an ArrayBuffer this pool lent. */
  take(bytes: number): Buffer {
    // The smallest free buffer that fits and is not more than twice the size asked.
    let best = -1;
    for (let i = 0; i < this.free.length; i++) {
      const size = this.free[i]!.byteLength;
      if (size >= bytes && size <= 2 * bytes && (best < 0 || size < this.free[best]!.byteLength)) best = i;
    }
    let ab: ArrayBuffer;
    if (best >= 0) {
      ab = this.free[best]!;
      this.free[best] = this.free[this.free.length - 1]!;
      this.free.pop();
      this.freeBytes -= ab.byteLength;
      this.reused++;
    } else {
      ab = Buffer.allocUnsafeSlow(capacityFor(bytes)).buffer as ArrayBuffer;
      this.allocated++;
    }
    this.lent.add(ab);
    return Buffer.from(ab, 0, bytes);
  }

  give(ab: ArrayBufferLike): void {
    if (!this.lent.has(ab as ArrayBuffer)) return;
    this.lent.delete(ab as ArrayBuffer);
    if (this.free.length >= KEEP_BUFFERS || this.freeBytes + ab.byteLength > KEEP_BYTES) return;
    this.free.push(ab as ArrayBuffer);
    this.freeBytes += ab.byteLength;
  }

  stats(): ReceivePoolStats {
    return { reused: this.reused, allocated: this.allocated, free: this.free.length, freeBytes: this.freeBytes };
  }
}

const pool = new ReceivePool();
let installed = false;

/**
 * Gives back the buffer of a message received while pooled receive is in effect, once nothing reads
 * it any more (any view of the message: its ArrayBuffer is what is pooled). Buffers the pool did not
 * lend, or gave back already, are ignored.
 */
export function releaseReceived(buffer: ArrayBufferLike): void {
  pool.give(buffer);
}

export function receivePoolStats(): ReceivePoolStats {
  return pool.stats();
}

/** Fields the pooled decoder keeps on each grpc-js StreamDecoder it runs for. */
interface DecoderState {
  maxReadMessageLength: number;
  /** grpc-js's own state: 0 (NO_DATA) between messages. */
  readState?: number;
  /** Whether this decoder runs the pooled state machine: decided at its first write after install. */
  embkvPooled?: boolean;
  embkvHead?: Buffer;
  embkvHeadFill?: number;
  embkvMessage?: Buffer | undefined;
  embkvFill?: number;
  /** A message above UPFRONT_MESSAGE_BYTES: its header and the parts received so far, and the bytes still to come. */
  embkvParts?: Buffer[] | undefined;
  embkvRemaining?: number;
}

type Write = (this: DecoderState, data: Buffer) => Buffer[];

/** The state machine of grpc-js's StreamDecoder.write, with each message written into its buffer as it arrives. */
const pooledWrite = (original: Write): Write => function (data) {
  if (this.embkvPooled !== true) {
    // A call that was part-way through a message when this was installed finishes with grpc-js's own
    // decoder (its state is in grpc-js's fields); every decoder made later starts here.
    if (this.embkvPooled === false || this.readState !== 0) {
      this.embkvPooled = false;
      return original.call(this, data);
    }
    this.embkvPooled = true;
  }
  const out: Buffer[] = [];
  let at = 0;
  while (at < data.length) {
    const parts = this.embkvParts;
    if (parts !== undefined) {
      const n = Math.min(this.embkvRemaining!, data.length - at);
      parts.push(data.subarray(at, at + n));
      at += n;
      this.embkvRemaining! -= n;
      if (this.embkvRemaining === 0) {
        out.push(Buffer.concat(parts));
        this.embkvParts = undefined;
      }
      continue;
    }
    const message = this.embkvMessage;
    if (message === undefined) {
      // The 1-byte flag and 4-byte length, possibly split across chunks.
      const head = (this.embkvHead ??= Buffer.alloc(5));
      const filled = this.embkvHeadFill ?? 0;
      const n = Math.min(5 - filled, data.length - at);
      data.copy(head, filled, at, at + n);
      at += n;
      if (filled + n < 5) {
        this.embkvHeadFill = filled + n;
        break;
      }
      this.embkvHeadFill = 0;
      const size = head.readUInt32BE(1);
      if (this.maxReadMessageLength !== -1 && size > this.maxReadMessageLength) {
        throw new Error(`Received message larger than max (${size} vs ${this.maxReadMessageLength})`);
      }
      if (size > UPFRONT_MESSAGE_BYTES) {
        this.embkvParts = [Buffer.from(head)];
        this.embkvRemaining = size;
        continue;
      }
      const framed = size >= POOLED_MESSAGE_BYTES ? pool.take(size + 5) : Buffer.allocUnsafe(size + 5);
      head.copy(framed, 0, 0, 5);
      if (size === 0) {
        out.push(framed);
        continue;
      }
      this.embkvMessage = framed;
      this.embkvFill = 5;
    } else {
      const filled = this.embkvFill!;
      const n = Math.min(message.length - filled, data.length - at);
      data.copy(message, filled, at, at + n);
      at += n;
      if (filled + n === message.length) {
        out.push(message);
        this.embkvMessage = undefined;
      } else {
        this.embkvFill = filled + n;
      }
    }
  }
  return out;
};

/**
 * Has this process receive large gRPC messages into pooled buffers (see above); the SDK and the
 * router install it when they start fanning out. Returns whether it is in effect: false when the
 * installed grpc-js decodes differently, and then messages are received as grpc-js does.
 */
export function installPooledReceive(): boolean {
  if (installed) return true;
  let proto: { write?: Write } | undefined;
  let Decoder: (new (max: number) => { write: Write }) | undefined;
  try {
    const mod = createRequire(import.meta.url)('@grpc/grpc-js/build/src/stream-decoder.js') as { StreamDecoder?: new (max: number) => { write: Write } };
    Decoder = mod.StreamDecoder;
    proto = Decoder?.prototype as { write?: Write } | undefined;
  } catch {
    return false;
  }
  if (Decoder === undefined || proto === undefined || typeof proto.write !== 'function') return false;
  // grpc-js's decoder must frame as expected: two messages split mid-header and mid-body come out
  // whole, each with its flag and length in front.
  try {
    const d = new Decoder(-1) as unknown as DecoderState & { write: Write };
    if (d.readState !== 0) return false;
    const got = [...d.write(Buffer.from([0, 0, 0])), ...d.write(Buffer.from([0, 2, 7, 8, 0, 0])), ...d.write(Buffer.from([0, 0, 1, 9]))];
    if (got.length !== 2 || !got[0]!.equals(Buffer.from([0, 0, 0, 0, 2, 7, 8])) || !got[1]!.equals(Buffer.from([0, 0, 0, 0, 1, 9]))) return false;
  } catch {
    return false;
  }
  proto.write = pooledWrite(proto.write);
  installed = true;
  return true;
}
