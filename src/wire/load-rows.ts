import { allowFramingInPlace } from '../transport/grpc-patches.js';
import { ALIGNED_FIELD_OVERHEAD, Reader, varintSize, writeAlignedFieldHead, writeVarint } from './protobuf.js';

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
    allowFramingInPlace(ab);
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
