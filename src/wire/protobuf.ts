import { KvError, invalidArgument } from '../common/errors.js';

// Protobuf primitives for the hand codecs: varints, a bounds-checked reader, aligned bytes fields.

export function varintSize(v: number): number {
  let n = 1;
  while (v >= 128) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

export function writeVarint(buf: Uint8Array, pos: number, v: number): number {
  while (v >= 128) {
    buf[pos++] = (v % 128) | 128;
    v = Math.floor(v / 128);
  }
  buf[pos++] = v;
  return pos;
}

export class Reader {
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

/** Most bytes a padded bytes field adds besides its data: pad field (2-9) + tag + a 10-byte varint. */
export const ALIGNED_FIELD_OVERHEAD = 9 + 1 + 10;

/**
 * Writes `[padTag p pad...][tag len]` at pos, with the pad chosen so the field's data starts at a
 * message offset ≡ 3 (mod 8): 8-byte aligned once grpc-js hands the message over at byte 5 of its
 * buffer, so the receiver reads the rows as views (or Float64 pairs). Returns where the data goes.
 */
export function writeAlignedFieldHead(buf: Uint8Array, pos: number, padTag: number, tag: number, len: number): number {
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
