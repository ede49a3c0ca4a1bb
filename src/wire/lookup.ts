import { invalidArgument } from '../common/errors.js';
import type { AnswerBufferPool } from '../transport/answer-pool.js';
import { ALIGNED_FIELD_OVERHEAD, Reader, varintSize, writeAlignedFieldHead, writeVarint } from './protobuf.js';

/**
 * The Lookup messages are encoded by hand (standard protobuf, see proto/embkv.proto) so that keys and
 * vectors are written straight into the message buffer and read as views: protobufjs would build
 * objects and copy the 20 MB payload twice. The control messages go through @grpc/proto-loader.
 */

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
