import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { KvError, invalidArgument } from './errors.js';

/**
 * The Lookup messages are encoded by hand (standard protobuf, see proto/embkv.proto) so that keys and
 * vectors are written straight into the message buffer and read as views: protobufjs would build
 * objects and copy the 20 MB payload twice. The control messages go through @grpc/proto-loader.
 */

export const PROTO_PATH = fileURLToPath(new URL('../../../proto/embkv.proto', import.meta.url));

/** grpc-js options for 20 MB answers (FEASIBILITY: the 4 MiB default refuses them, and the default
 * flow-control window halves throughput). */
export const MAX_MESSAGE_BYTES = 512 * 1024 * 1024;
/**
 * The largest request a server takes. Requests are small next to answers: a LoadRows batch is at
 * most 32 MiB, a router's Lookup of MAX_ROUTER_KEYS keys 32 MB, a 150k-key Lookup 1.2 MB. Anything
 * larger is refused by grpc-js with RESOURCE_EXHAUSTED before it is buffered whole, where 512 MiB
 * let a 64 MiB garbage request be taken in and go unanswered.
 */
export const MAX_REQUEST_BYTES = 48 * 1024 * 1024;
export const FLOW_CONTROL_WINDOW_BYTES = 16 * 1024 * 1024;
export const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW_BYTES,
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
  // Every replica address gets its own channel even when two share a host.
  'grpc.use_local_subchannel_pool': 1,
  // A restarted replica is reconnected within seconds, not after grpc-js's default 120 s backoff.
  'grpc.initial_reconnect_backoff_ms': 250,
  'grpc.max_reconnect_backoff_ms': 5000,
};
export const SERVER_OPTIONS: grpc.ServerOptions = {
  'grpc.max_receive_message_length': MAX_REQUEST_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW_BYTES,
};

export interface LookupRequest {
  table: string;
  /** 0 = current. */
  version: number;
  /** Packed little-endian uint64. */
  keys: Uint8Array;
}

export interface LookupResponse {
  version: number;
  dim: number;
  found: Uint8Array;
  values: Float32Array;
}

// ---- varints ---------------------------------------------------------------------------------

function varintSize(v: number): number {
  let n = 1;
  while (v >= 128) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

function writeVarint(buf: Uint8Array, pos: number, v: number): number {
  while (v >= 128) {
    buf[pos++] = (v % 128) | 128;
    v = Math.floor(v / 128);
  }
  buf[pos++] = v;
  return pos;
}

class Reader {
  pos = 0;
  constructor(readonly buf: Uint8Array) {}
  /** A varint; `field` names it in the refusal of a value above 2^53-1 (a tag or length when absent). */
  varint(field?: string): number {
    const start = this.pos;
    let result = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) throw invalidArgument('message truncated inside a varint');
      const b = this.buf[this.pos++]!;
      result += (b & 127) * mul;
      if (b < 128) {
        if (result > Number.MAX_SAFE_INTEGER) throw tooLarge(this.buf, start, this.pos, field);
        return result;
      }
      mul *= 128;
    }
    throw invalidArgument('malformed varint (longer than 10 bytes)');
  }
  /** An unknown field's varint: any uint64, unchecked. */
  skipVarint(): void {
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) throw invalidArgument('message truncated inside a varint');
      if (this.buf[this.pos++]! < 128) return;
    }
    throw invalidArgument('malformed varint (longer than 10 bytes)');
  }
  bytes(): Uint8Array {
    const len = this.varint();
    if (this.pos + len > this.buf.length) throw invalidArgument('message truncated inside a bytes field');
    const out = this.buf.subarray(this.pos, this.pos + len);
    this.pos += len;
    return out;
  }
  skip(wireType: number): void {
    if (wireType === 0) this.skipVarint();
    else if (wireType === 1) this.pos += 8;
    else if (wireType === 2) this.bytes();
    else if (wireType === 5) this.pos += 4;
    else throw invalidArgument(`unsupported protobuf wire type ${wireType}`);
    if (this.pos > this.buf.length) throw invalidArgument('message truncated');
  }
}

/** The refusal of a varint above 2^53-1, with its exact value (numbers lose it). */
function tooLarge(buf: Uint8Array, start: number, end: number, field: string | undefined): KvError {
  let v = 0n;
  for (let i = end - 1; i >= start; i--) v = (v << 7n) | BigInt(buf[i]! & 127);
  if (v >= 1n << 64n) return invalidArgument('malformed varint (above 2^64-1)');
  return field === undefined
    ? invalidArgument(`malformed message: a tag or length of ${v}`)
    : invalidArgument(`${field} ${v} is above 2^53-1, the largest ${field} embkv takes`);
}

/**
 * Every integer field of a flat message (every request is one) within 2^53-1: protobufjs would turn
 * a larger uint64 into the nearest double, a different number, without a word. `names` maps field
 * numbers to the names a refusal gives.
 */
export function checkVarintFields(buf: Uint8Array, names: ReadonlyMap<number, string>): void {
  const r = new Reader(buf);
  while (r.pos < buf.length) {
    const tag = r.varint();
    const field = Math.floor(tag / 8);
    const wt = tag & 7;
    if (wt === 0) r.varint(names.get(field) ?? `field ${field}`);
    else r.skip(wt);
  }
}

/** The first occurrence of `field` in a protobuf message: a varint's value, or a length-delimited field's bytes. */
export function readField(buf: Uint8Array, field: number): number | Uint8Array | undefined {
  const r = new Reader(buf);
  while (r.pos < buf.length) {
    const tag = r.varint();
    const wt = tag & 7;
    if (Math.floor(tag / 8) === field && wt === 0) return r.varint();
    if (Math.floor(tag / 8) === field && wt === 2) return r.bytes();
    r.skip(wt);
  }
  return undefined;
}

// ---- LookupRequest -------------------------------------------------------------------------------

export function encodeLookupRequest(req: LookupRequest): Buffer {
  const table = Buffer.from(req.table, 'utf8');
  const size =
    1 + varintSize(table.length) + table.length +
    (req.version > 0 ? 1 + varintSize(req.version) : 0) +
    1 + varintSize(req.keys.byteLength) + req.keys.byteLength;
  const buf = Buffer.allocUnsafe(size);
  let pos = 0;
  buf[pos++] = 0x0a;
  pos = writeVarint(buf, pos, table.length);
  table.copy(buf, pos);
  pos += table.length;
  if (req.version > 0) {
    buf[pos++] = 0x10;
    pos = writeVarint(buf, pos, req.version);
  }
  buf[pos++] = 0x1a;
  pos = writeVarint(buf, pos, req.keys.byteLength);
  buf.set(req.keys, pos);
  return buf;
}

export function decodeLookupRequest(buf: Uint8Array): LookupRequest {
  const r = new Reader(buf);
  let table = '';
  let version = 0;
  let keys: Uint8Array = new Uint8Array(0);
  while (r.pos < buf.length) {
    const tag = r.varint();
    const field = Math.floor(tag / 8);
    const wt = tag & 7;
    if (field === 1 && wt === 2) table = Buffer.from(r.bytes()).toString('utf8');
    else if (field === 2 && wt === 0) version = r.varint('version');
    else if (field === 3 && wt === 2) keys = r.bytes();
    else r.skip(wt);
  }
  return { table, version, keys };
}

// ---- aligned bytes fields -------------------------------------------------------------------------

/** Most bytes a padded bytes field adds besides its data: pad field (2-9) + tag + a 10-byte varint. */
const ALIGNED_FIELD_OVERHEAD = 9 + 1 + 10;

/**
 * Writes `[padTag p pad...][tag len]` at pos, with the pad chosen so the field's data starts at a
 * message offset ≡ 3 (mod 8): 8-byte aligned once grpc-js hands the message over at byte 5 of its
 * buffer, so the receiver reads the rows as views (or Float64 pairs). Returns where the data goes.
 */
function writeAlignedFieldHead(buf: Uint8Array, pos: number, padTag: number, tag: number, len: number): number {
  const head = 1 + varintSize(len);
  let pad = 0;
  while ((pos + 2 + pad + head) % 8 !== 3) pad++;
  buf[pos++] = padTag;
  buf[pos++] = pad;
  buf.fill(0, pos, pos + pad);
  pos += pad;
  buf[pos++] = tag;
  return writeVarint(buf, pos, len);
}

// ---- LookupResponse ------------------------------------------------------------------------------

/** A response buffer laid out for in-place filling: `found` and `values` are views into `buf`. */
export interface LookupResponseBuffer {
  buf: Buffer;
  found: Uint8Array;
  values: Float32Array;
}

/**
 * Lays out a LookupResponse of n keys so the answer can be written in place:
 *
 *   [08 version][10 dim][1a n found...][22 p pad...][2a n*dim*4 values...]
 *                                                         ^ message offset ≡ 3 (mod 8)
 *
 * grpc-js hands a received message at byte 5 of a fresh buffer, so values at offset ≡ 3 arrive 8-byte
 * aligned and are read as a Float32Array (or Float64 pairs) without a copy. Here the Buffer starts at byte 5 of its
 * ArrayBuffer, as a received one does, so the writer's view is aligned the same way.
 */
export function allocLookupResponse(version: number, dim: number, n: number, pool?: AnswerBufferPool): LookupResponseBuffer {
  const valuesLen = n * dim * 4;
  const head = (version > 0 ? 1 + varintSize(version) : 0) + (dim > 0 ? 1 + varintSize(dim) : 0) + 1 + varintSize(n) + n;
  const room = head + ALIGNED_FIELD_OVERHEAD + valuesLen;
  const ab = pool !== undefined ? pool.take(room + 5) : new ArrayBuffer(room + 5);
  const buf = Buffer.from(ab, 5, room);
  let pos = 0;
  if (version > 0) {
    buf[pos++] = 0x08;
    pos = writeVarint(buf, pos, version);
  }
  if (dim > 0) {
    buf[pos++] = 0x10;
    pos = writeVarint(buf, pos, dim);
  }
  buf[pos++] = 0x1a;
  pos = writeVarint(buf, pos, n);
  const found = buf.subarray(pos, pos + n);
  pos += n;
  pos = writeAlignedFieldHead(buf, pos, 0x22, 0x2a, valuesLen);
  // A pooled buffer holds an earlier answer: the lookup writes every row and flag, absent ones as zeros.
  const values = new Float32Array(ab, 5 + pos, n * dim);
  return { buf: buf.subarray(0, pos + valuesLen), found, values };
}

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
    if (zeroCopyFraming) preframed.set(ab, () => this.giveBack(ab));
    return ab;
  }

  private giveBack(ab: ArrayBuffer): void {
    if (!this.owned.has(ab)) return;
    this.owned.delete(ab);
    preframed.delete(ab);
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
      preframed.delete(ab);
      queueMicrotask(() => this.giveBack(ab));
    }
    return b;
  };
}

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

/** The server side of Embkv with answers from `pool` returned to it once framed. */
export function embkvServerService(pool: AnswerBufferPool): grpc.ServiceDefinition {
  return { lookup: { ...EMBKV_SERVER_SERVICE.lookup, responseSerialize: pool.onSerialize } };
}

export function decodeLookupResponse(buf: Uint8Array): LookupResponse {
  const r = new Reader(buf);
  let version = 0;
  let dim = 0;
  let found: Uint8Array = new Uint8Array(0);
  let valuesBytes: Uint8Array = new Uint8Array(0);
  while (r.pos < buf.length) {
    const tag = r.varint();
    const field = Math.floor(tag / 8);
    const wt = tag & 7;
    if (field === 1 && wt === 0) version = r.varint('version');
    else if (field === 2 && wt === 0) dim = r.varint('dim');
    else if (field === 3 && wt === 2) found = r.bytes();
    else if (field === 5 && wt === 2) valuesBytes = r.bytes();
    else r.skip(wt);
  }
  if (valuesBytes.byteLength !== found.length * dim * 4) {
    throw invalidArgument(`lookup answer carries ${valuesBytes.byteLength} value bytes for ${found.length} keys of dim ${dim}`);
  }
  let values: Float32Array;
  if (valuesBytes.byteOffset % 4 === 0) {
    values = new Float32Array(valuesBytes.buffer, valuesBytes.byteOffset, valuesBytes.byteLength / 4);
  } else {
    values = new Float32Array(valuesBytes.byteLength / 4);
    new Uint8Array(values.buffer).set(valuesBytes);
  }
  return { version, dim, found, values };
}

// ---- LoadRowsRequest -----------------------------------------------------------------------------

export interface LoadRowsRequest {
  table: string;
  version: number;
  loadId: string;
  /** Packed little-endian uint64. */
  keys: Uint8Array;
  /** Packed little-endian float32, keys * dim. */
  values: Uint8Array;
  /** A delta's keys to remove, packed little-endian uint64. */
  deletes: Uint8Array;
}

/** Bytes of a LoadRows message before its row fields: table, version, load id. */
function loadRowsHeadSize(table: Buffer, version: number, loadId: Buffer): number {
  return 1 + varintSize(table.length) + table.length + (version > 0 ? 1 + varintSize(version) : 0) + 1 + varintSize(loadId.length) + loadId.length;
}

function writeLoadRowsHead(buf: Buffer, table: Buffer, version: number, loadId: Buffer): number {
  let pos = 0;
  buf[pos++] = 0x0a;
  pos = writeVarint(buf, pos, table.length);
  pos += table.copy(buf, pos);
  if (version > 0) {
    buf[pos++] = 0x10;
    pos = writeVarint(buf, pos, version);
  }
  buf[pos++] = 0x1a;
  pos = writeVarint(buf, pos, loadId.length);
  pos += loadId.copy(buf, pos);
  return pos;
}

/** Encodes a LoadRows request (one copy of the rows; see LoadRowsMessage for none). */
export function encodeLoadRowsRequest(req: Partial<LoadRowsRequest>): Buffer {
  const table = Buffer.from(req.table ?? '', 'utf8');
  const loadId = Buffer.from(req.loadId ?? '', 'utf8');
  const version = req.version ?? 0;
  const parts: [number, Uint8Array | undefined][] = [[0x22, req.keys], [0x2a, req.values], [0x32, req.deletes]];
  let size = loadRowsHeadSize(table, version, loadId);
  for (const [, b] of parts) if (b !== undefined && b.byteLength > 0) size += ALIGNED_FIELD_OVERHEAD + b.byteLength;
  const buf = Buffer.allocUnsafe(size);
  let pos = writeLoadRowsHead(buf, table, version, loadId);
  for (const [tag, b] of parts) {
    if (b === undefined || b.byteLength === 0) continue;
    pos = writeAlignedFieldHead(buf, pos, 0x3a, tag, b.byteLength);
    buf.set(b, pos);
    pos += b.byteLength;
  }
  return buf.subarray(0, pos);
}

/**
 * A LoadRows message of exactly `rows` rows of `dim`, laid out once so that the loader writes keys
 * and values straight into it: `keys` and `values` are views into `buf`. Reused batch after batch.
 * The 5 bytes in front of `buf` take the gRPC frame header when installZeroCopyRequests is in effect.
 */
export class LoadRowsMessage {
  readonly buf: Buffer;
  readonly keys: Uint32Array;
  readonly values: Float32Array;

  constructor(table: string, version: number, loadId: string, readonly rows: number, readonly dim: number) {
    const t = Buffer.from(table, 'utf8');
    const id = Buffer.from(loadId, 'utf8');
    const size = loadRowsHeadSize(t, version, id) + 2 * ALIGNED_FIELD_OVERHEAD + rows * 8 + rows * dim * 4;
    // Starts 5 bytes into an 8-byte aligned ArrayBuffer: the data offsets ≡ 3 (mod 8) make views
    // possible here and, behind grpc-js's 5-byte frame header, on the replica too.
    const ab = new ArrayBuffer(size + 5);
    const buf = Buffer.from(ab, 5, size);
    let pos = writeLoadRowsHead(buf, t, version, id);
    pos = writeAlignedFieldHead(buf, pos, 0x3a, 0x22, rows * 8);
    this.keys = new Uint32Array(ab, 5 + pos, rows * 2);
    pos += rows * 8;
    pos = writeAlignedFieldHead(buf, pos, 0x3a, 0x2a, rows * dim * 4);
    this.values = new Float32Array(ab, 5 + pos, rows * dim);
    pos += rows * dim * 4;
    this.buf = buf.subarray(0, pos);
    preframedRequests.add(ab);
  }
}

export function decodeLoadRowsRequest(buf: Uint8Array): LoadRowsRequest {
  const r = new Reader(buf);
  const empty = new Uint8Array(0);
  const req: LoadRowsRequest = { table: '', version: 0, loadId: '', keys: empty, values: empty, deletes: empty };
  while (r.pos < buf.length) {
    const tag = r.varint();
    const field = Math.floor(tag / 8);
    const wt = tag & 7;
    if (field === 1 && wt === 2) req.table = Buffer.from(r.bytes()).toString('utf8');
    else if (field === 2 && wt === 0) req.version = r.varint('version');
    else if (field === 3 && wt === 2) req.loadId = Buffer.from(r.bytes()).toString('utf8');
    else if (field === 4 && wt === 2) req.keys = r.bytes();
    else if (field === 5 && wt === 2) req.values = r.bytes();
    else if (field === 6 && wt === 2) req.deletes = r.bytes();
    else r.skip(wt);
  }
  return req;
}

// ---- service definitions ---------------------------------------------------------------------------

/**
 * What a server's request deserializer hands on for a message it cannot decode. grpc-js answers a
 * deserializer that throws with INTERNAL "Error deserializing request", which tells the caller
 * nothing; the handler throws this error instead (see decoded), so the caller gets
 * INVALID_ARGUMENT with the decoder's reason.
 */
export class UndecodableRequest {
  constructor(readonly error: KvError) {}
}

/** A server handler's request, or the decoder's refusal of it thrown. Every handler calls it first. */
export function decoded<T>(request: T | UndecodableRequest): T {
  if (request instanceof UndecodableRequest) throw request.error;
  return request;
}

/** `decode` with its failure handed on as an UndecodableRequest instead of thrown to grpc-js. */
function tolerant<T>(decode: (b: Buffer) => T, method: string): (b: Buffer) => T | UndecodableRequest {
  return (b) => {
    try {
      return decode(b);
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      return new UndecodableRequest(err instanceof KvError ? err : invalidArgument(`malformed ${method} request: ${reason}`, { cause: err }));
    }
  };
}

const identity = (b: Buffer): Buffer => b;

/** The Embkv service with hand codecs: the server receives decoded requests and sends prebuilt buffers. */
export const EMBKV_SERVER_SERVICE = {
  lookup: {
    path: '/embkv.v1.Embkv/Lookup',
    requestStream: false,
    responseStream: false,
    requestSerialize: encodeLookupRequest,
    requestDeserialize: tolerant(decodeLookupRequest, 'Lookup'),
    responseSerialize: identity,
    responseDeserialize: identity,
    originalName: 'Lookup',
  },
} satisfies grpc.ServiceDefinition;

export const EMBKV_CLIENT_SERVICE = {
  lookup: {
    path: '/embkv.v1.Embkv/Lookup',
    requestStream: false,
    responseStream: false,
    requestSerialize: encodeLookupRequest,
    requestDeserialize: (b: Buffer): LookupRequest => decodeLookupRequest(b),
    responseSerialize: identity,
    responseDeserialize: (b: Buffer): LookupResponse => decodeLookupResponse(b),
    originalName: 'Lookup',
  },
} satisfies grpc.ServiceDefinition;

let controlPackage: grpc.GrpcObject | undefined;
/**
 * The control package, parsed from the .proto on first use. proto-loader (and protobufjs under it) is
 * loaded only then: an SDK process that only looks up never loads it, and its heap, which every
 * mark-compact walks, stays ~2 MB smaller.
 */
function protoPackage(): grpc.GrpcObject {
  if (controlPackage === undefined) {
    const protoLoader = createRequire(import.meta.url)('@grpc/proto-loader') as typeof import('@grpc/proto-loader');
    controlPackage = grpc.loadPackageDefinition(
      protoLoader.loadSync(PROTO_PATH, { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true }),
    );
  }
  return controlPackage;
}

let controlService: grpc.ServiceDefinition | undefined;

/** Field numbers to names of a proto-loader method's request (its descriptor rides along). */
function fieldNames(method: object): Map<number, string> {
  const fields = (method as { requestType?: { type?: { field?: { name: string; number: number }[] } } }).requestType?.type?.field ?? [];
  return new Map(fields.map((f) => [f.number, f.name]));
}
let controlClient: grpc.ServiceClientConstructor | undefined;

/**
 * The ShardControl service definition: control messages through proto-loader, except LoadRows, whose
 * megabytes of rows go through the hand codec above (views on receipt; a LoadRowsMessage is sent as is).
 */
export function shardControlService(): grpc.ServiceDefinition {
  if (controlService === undefined) {
    const v1 = (protoPackage()['embkv'] as grpc.GrpcObject)['v1'] as grpc.GrpcObject;
    const generated = (v1['ShardControl'] as grpc.ServiceClientConstructor).service;
    const methods: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
    // Integer fields are checked before protobufjs rounds them, and a refusal reaches the handler.
    for (const [name, m] of Object.entries(generated)) {
      const names = fieldNames(m);
      const deserialize = m.requestDeserialize;
      methods[name] = {
        ...m,
        requestDeserialize: tolerant((b: Buffer): unknown => {
          checkVarintFields(b, names);
          return deserialize(b);
        }, name),
      };
    }
    methods['LoadRows'] = {
      ...generated['LoadRows']!,
      requestSerialize: (r: Buffer | Partial<LoadRowsRequest>): Buffer => (Buffer.isBuffer(r) ? r : encodeLoadRowsRequest(r)),
      requestDeserialize: tolerant(decodeLoadRowsRequest, 'LoadRows'),
    } as grpc.MethodDefinition<unknown, unknown>;
    controlService = methods;
  }
  return controlService;
}

export function shardControlClientConstructor(): grpc.ServiceClientConstructor {
  controlClient ??= grpc.makeGenericClientConstructor(shardControlService(), 'ShardControl');
  return controlClient;
}

export const EmbkvClient = grpc.makeGenericClientConstructor(EMBKV_CLIENT_SERVICE, 'Embkv');

/**
 * The HTTP/2 stream under a unary call (grpc-js keeps it on the call's base intercepting call), whose
 * 'close' marks the answer sent; undefined if this grpc-js keeps it elsewhere.
 */
export function streamOf(call: object): { once(event: 'close', fn: () => void): unknown; closed?: boolean } | undefined {
  const stream = (call as { call?: { stream?: { once?: unknown; closed?: boolean } } }).call?.stream;
  return stream !== undefined && typeof stream.once === 'function' && stream.closed !== true ? (stream as ReturnType<typeof streamOf>) : undefined;
}
