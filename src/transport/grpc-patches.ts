import { createRequire } from 'node:module';

// Every patch of grpc-js internals, behind one door: each is applied only when grpc-js frames a
// probe message exactly as expected, and otherwise leaves grpc-js as it is.

/**
 * The gRPC frame of a message that starts 5 bytes into its buffer: flag 0 (not compressed) and the
 * big-endian length written into those 5 bytes, and the whole returned as a view, without a copy.
 */
function frameInPlace(message: Buffer): Buffer {
  const framed = Buffer.from(message.buffer, message.byteOffset - 5, message.byteLength + 5);
  framed[0] = 0;
  framed.writeUInt32BE(message.byteLength, 1);
  return framed;
}

/** Pooled answer buffers that may be framed in place, with what to do once their stream closes. */
const preframed = new WeakMap<ArrayBuffer, () => void>();
let zeroCopyFraming = false;
let framedInPlace = 0;

/** How many answers this process has sent framed in place (zero-copy framing). */
export function answersFramedInPlace(): number {
  return framedInPlace;
}

interface ServerCallInternals {
  stream: { once(event: 'close', fn: () => void): unknown };
  handler: { serialize(value: unknown): Buffer };
}

/**
 * Lets a replica send each answer from its pooled buffer instead of grpc-js's copy of it. grpc-js's
 * server frames a message by copying it behind a 5-byte header (`serializeMessage` of its server
 * call): 2.4 MB a call for a 19k-key answer, garbage that piled up between GCs and stayed in the
 * malloc heap (about 24 MB of rss per replica, bench/RESULTS.md). Pooled answers keep those 5 bytes
 * free in front of the message, so the header is written there and the buffer itself is sent.
 *
 * Applied only when grpc-js's server call has that method and frames a probe message exactly as
 * expected (flag byte 0, big-endian length, the message); otherwise answers are copied as before.
 * Returns whether it is in effect.
 */
export function installZeroCopyFraming(): boolean {
  if (zeroCopyFraming) return true;
  let proto: { serializeMessage?: (this: ServerCallInternals, value: unknown) => Buffer } | undefined;
  try {
    const mod = createRequire(import.meta.url)('@grpc/grpc-js/build/src/server-interceptors.js') as {
      BaseServerInterceptingCall?: { prototype: typeof proto };
    };
    proto = mod.BaseServerInterceptingCall?.prototype;
  } catch {
    return false;
  }
  const original = proto?.serializeMessage;
  if (proto === undefined || typeof original !== 'function') return false;
  const probe = original.call({ handler: { serialize: (v: unknown) => v as Buffer } } as ServerCallInternals, Buffer.from([7, 8, 9]));
  if (!Buffer.isBuffer(probe) || probe.length !== 8 || probe[0] !== 0 || probe.readUInt32BE(1) !== 3 || probe[5] !== 7 || probe[7] !== 9) return false;
  proto.serializeMessage = function (this: ServerCallInternals, value: unknown): Buffer {
    if (Buffer.isBuffer(value) && value.byteOffset === 5) {
      const ab = value.buffer as ArrayBuffer;
      const sent = preframed.get(ab);
      if (sent !== undefined) {
        preframed.delete(ab);
        this.stream.once('close', sent);
        framedInPlace++;
        return frameInPlace(value);
      }
    }
    return original.call(this, value);
  };
  zeroCopyFraming = true;
  return true;
}

/** LoadRows messages whose 5 leading bytes are kept for the gRPC frame header (LoadRowsMessage). */
const preframedRequests = new WeakSet<ArrayBuffer>();
let zeroCopyRequests = false;
let requestsFramed = 0;

/** How many requests this process has sent framed in place (installZeroCopyRequests). */
export function requestsFramedInPlace(): number {
  return requestsFramed;
}

type FrameWriter = (this: unknown, message: Buffer, compress: boolean) => Promise<Buffer>;

/**
 * Lets the loader send each LoadRows message from its own buffer instead of grpc-js's copy of it.
 * grpc-js's client frames every message by copying it behind a 5-byte header (`writeMessage` of its
 * identity compression handler): during a load that is every row a second time, in fresh memory
 * that waits for a GC. LoadRowsMessage keeps those 5 bytes free in front of the message; the header
 * goes there and the buffer itself is sent. The loader reuses a message only after every replica
 * of its group has answered the call, so the bytes are no longer needed by then.
 *
 * Applied only when grpc-js's handler frames a probe message exactly as expected; otherwise requests
 * are copied as before. Returns whether it is in effect.
 */
export async function installZeroCopyRequests(): Promise<boolean> {
  if (zeroCopyRequests) return true;
  let handler: { writeMessage?: FrameWriter } | undefined;
  try {
    const mod = createRequire(import.meta.url)('@grpc/grpc-js/build/src/compression-filter.js') as {
      CompressionFilter?: new (options: object, shared: object) => { sendCompression?: { writeMessage?: FrameWriter } };
    };
    handler = mod.CompressionFilter === undefined ? undefined : new mod.CompressionFilter({}, {}).sendCompression;
  } catch {
    return false;
  }
  const proto = handler === undefined ? undefined : (Object.getPrototypeOf(handler) as { writeMessage?: FrameWriter });
  const original = proto?.writeMessage;
  if (proto === undefined || typeof original !== 'function') return false;
  let probe: unknown;
  try {
    probe = await original.call(handler, Buffer.from([7, 8, 9]), false);
  } catch {
    return false;
  }
  if (!Buffer.isBuffer(probe) || probe.length !== 8 || probe[0] !== 0 || probe.readUInt32BE(1) !== 3 || probe[5] !== 7 || probe[7] !== 9) return false;
  if (zeroCopyRequests) return true;
  proto.writeMessage = function (this: unknown, message: Buffer, compress: boolean): Promise<Buffer> {
    if (!compress && Buffer.isBuffer(message) && message.byteOffset === 5 && preframedRequests.has(message.buffer as ArrayBuffer)) {
      requestsFramed++;
      return Promise.resolve(frameInPlace(message));
    }
    return original.call(this, message, compress);
  };
  zeroCopyRequests = true;
  return true;
}

/**
 * The HTTP/2 stream under a unary call (grpc-js keeps it on the call's base intercepting call), whose
 * 'close' marks the answer sent; undefined if this grpc-js keeps it elsewhere.
 */
export function streamOf(call: object): { once(event: 'close', fn: () => void): unknown; closed?: boolean } | undefined {
  const stream = (call as { call?: { stream?: { once?: unknown; closed?: boolean } } }).call?.stream;
  return stream !== undefined && typeof stream.once === 'function' && stream.closed !== true ? (stream as ReturnType<typeof streamOf>) : undefined;
}

/** Whether answers from pooled buffers are framed in place (installZeroCopyFraming is in effect). */
export function framingInPlace(): boolean {
  return zeroCopyFraming;
}

/** Lets an answer buffer be framed in place; `onSent` runs once its stream closes. */
export function preframe(ab: ArrayBuffer, onSent: () => void): void {
  preframed.set(ab, onSent);
}

/** An answer buffer that grpc-js framed by copying, or that went back to its pool. */
export function unpreframe(ab: ArrayBuffer): void {
  preframed.delete(ab);
}

/** Lets a request buffer (a LoadRowsMessage's) be framed in place by installZeroCopyRequests. */
export function allowFramingInPlace(ab: ArrayBuffer): void {
  preframedRequests.add(ab);
}
