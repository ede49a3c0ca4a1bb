/**
 * The NumPy .npy header reader: checks magic, version, the header dict, dtype and shape for a file's
 * role, and that the file size matches the header exactly. Refusals are KV_INVALID_DATA naming the file.
 */
import { MAX_LOAD_DIM, dataError, fmt } from './dump-files.js';
import { LOCAL_SOURCE, type DumpSource } from './dump-source.js';

/** numpy itself refuses headers over 10,000 bytes by default; anything near this is not a real header. */
const MAX_NPY_HEADER_BYTES = 1 << 20;

// The .npy layout:
//
//   offset 0      6       7       8              10 (v1) / 12 (v2, v3)
//          \x93NUMPY major  minor  header length  {'descr': '<f4', 'fortran_order': False, 'shape': (n, d), }   \n
//                                 u16 LE (v1)    latin1 (v1, v2) / utf8 (v3), padded with spaces; data follows
//                                 u32 LE (v2,v3)

const NPY_MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // \x93NUMPY

export type NpyRole = 'keys' | 'values' | 'deletes';

export interface NpyHeader {
  path: string;
  descr: string;
  shape: number[];
  dataOffset: number;
  fileBytes: number;
}

type PyValue =
  | { t: 'str'; v: string }
  | { t: 'int'; v: number }
  | { t: 'bool'; v: boolean }
  | { t: 'none' }
  | { t: 'seq'; list: boolean; v: PyValue[] }
  | { t: 'dict'; v: Map<string, PyValue> };

/** A recursive-descent reader for the Python literal subset numpy writes in a header. */
class PyLiteralParser {
  private pos = 0;
  constructor(
    private readonly src: string,
    private readonly file: string,
  ) {}

  parseTop(): PyValue {
    const v = this.value();
    this.ws();
    if (this.pos < this.src.length) this.fail('unexpected text after the header dict');
    return v;
  }

  private fail(what: string): never {
    const head = this.src.length > 200 ? this.src.slice(0, 200) + '…' : this.src;
    throw dataError(`${this.file}: malformed .npy header: ${what} at character ${this.pos} of ${JSON.stringify(head.trimEnd())}`);
  }

  private ws(): void {
    while (this.pos < this.src.length && /\s/.test(this.src[this.pos]!)) this.pos++;
  }

  private value(): PyValue {
    this.ws();
    const c = this.src[this.pos];
    if (c === undefined) this.fail('unexpected end');
    if (c === '{') return this.dict();
    if (c === '(' || c === '[') return this.seq(c === '[');
    if (c === "'" || c === '"') return { t: 'str', v: this.str() };
    if (c === '-' || c === '+' || (c >= '0' && c <= '9')) return this.int();
    const m = /^[A-Za-z_]\w*/.exec(this.src.slice(this.pos));
    if (m !== null) {
      this.pos += m[0].length;
      if (m[0] === 'True') return { t: 'bool', v: true };
      if (m[0] === 'False') return { t: 'bool', v: false };
      if (m[0] === 'None') return { t: 'none' };
      this.pos -= m[0].length;
      this.fail(`unexpected name ${m[0]}`);
    }
    return this.fail(`unexpected ${JSON.stringify(c)}`);
  }

  private dict(): PyValue {
    this.pos++; // {
    const out = new Map<string, PyValue>();
    for (;;) {
      this.ws();
      if (this.src[this.pos] === '}') {
        this.pos++;
        return { t: 'dict', v: out };
      }
      const c = this.src[this.pos];
      if (c !== "'" && c !== '"') this.fail('expected a quoted key');
      const key = this.str();
      this.ws();
      if (this.src[this.pos] !== ':') this.fail("expected ':'");
      this.pos++;
      const v = this.value();
      if (out.has(key)) this.fail(`key '${key}' repeated`);
      out.set(key, v);
      this.ws();
      if (this.src[this.pos] === ',') this.pos++;
      else if (this.src[this.pos] !== '}') this.fail("expected ',' or '}'");
    }
  }

  private seq(list: boolean): PyValue {
    const close = list ? ']' : ')';
    this.pos++;
    const out: PyValue[] = [];
    for (;;) {
      this.ws();
      if (this.src[this.pos] === close) {
        this.pos++;
        return { t: 'seq', list, v: out };
      }
      out.push(this.value());
      this.ws();
      if (this.src[this.pos] === ',') this.pos++;
      else if (this.src[this.pos] !== close) this.fail(`expected ',' or '${close}'`);
    }
  }

  private str(): string {
    const q = this.src[this.pos]!;
    this.pos++;
    let out = '';
    while (this.pos < this.src.length) {
      const c = this.src[this.pos]!;
      if (c === q) {
        this.pos++;
        return out;
      }
      if (c === '\\' && this.pos + 1 < this.src.length) {
        out += this.src[this.pos + 1]!;
        this.pos += 2;
        continue;
      }
      if (c === '\n') break;
      out += c;
      this.pos++;
    }
    return this.fail('unterminated string');
  }

  private int(): PyValue {
    // Python 2 era numpy wrote shapes as (1000L, 32L); the L is accepted.
    const m = /^[+-]?\d+L?/.exec(this.src.slice(this.pos));
    if (m === null) return this.fail('expected an integer');
    this.pos += m[0].length;
    const v = Number(m[0].replace('L', ''));
    if (!Number.isSafeInteger(v)) this.fail(`integer ${m[0]} out of range`);
    return { t: 'int', v };
  }
}

const ROLE_DTYPES: Record<NpyRole, readonly string[]> = { keys: ['<u8', '<i8'], deletes: ['<u8', '<i8'], values: ['<f4'] };
const ROLE_EXPECT: Record<NpyRole, string> = {
  keys: "keys must be 64-bit integers, '<u8' (uint64) or '<i8' (int64); convert with arr.astype('<u8')",
  deletes: "deleted keys must be 64-bit integers, '<u8' (uint64) or '<i8' (int64); convert with arr.astype('<u8')",
  values: "values must be little-endian float32 ('<f4'); convert with arr.astype('<f4')",
};

/**
 * Reads and checks the header of one .npy file (of `source`, local files by default), including that the
 * file size matches it exactly.
 */
export async function readNpyHeader(path: string, role: NpyRole, source: DumpSource = LOCAL_SOURCE): Promise<NpyHeader> {
  const fh = await source.open(path);
  try {
    const fileBytes = fh.size;
    const pre = Buffer.alloc(12);
    const got = await fh.read(pre, 0, Math.min(12, fileBytes), 0);
    if (got < 10 || !pre.subarray(0, 6).equals(NPY_MAGIC)) {
      if (got >= 6 && !pre.subarray(0, 6).equals(NPY_MAGIC)) {
        throw dataError(`${path}: not a .npy file (the first bytes are not the magic \\x93NUMPY)`);
      }
      throw dataError(`${path}: not a .npy file (only ${fileBytes} bytes, shorter than a .npy preamble)`);
    }
    const major = pre[6]!;
    const minor = pre[7]!;
    if ((major !== 1 && major !== 2 && major !== 3) || minor !== 0) {
      throw dataError(`${path}: unsupported .npy format version ${major}.${minor} (versions 1.0, 2.0 and 3.0 are read)`);
    }
    let headerLen: number;
    let headerStart: number;
    if (major === 1) {
      headerLen = pre.readUInt16LE(8);
      headerStart = 10;
    } else {
      if (got < 12) throw dataError(`${path}: truncated .npy preamble (${fileBytes} bytes)`);
      headerLen = pre.readUInt32LE(8);
      headerStart = 12;
    }
    if (headerLen > MAX_NPY_HEADER_BYTES) {
      throw dataError(`${path}: .npy header length ${fmt(headerLen)} is implausibly large (over ${fmt(MAX_NPY_HEADER_BYTES)} bytes)`);
    }
    const dataOffset = headerStart + headerLen;
    if (dataOffset > fileBytes) {
      throw dataError(`${path}: truncated in the .npy header: the header needs ${fmt(dataOffset)} bytes but the file holds ${fmt(fileBytes)}`);
    }
    const hbuf = Buffer.alloc(headerLen);
    const hgot = await fh.read(hbuf, 0, headerLen, headerStart);
    if (hgot !== headerLen) throw dataError(`${path}: truncated in the .npy header`);
    const text = hbuf.toString(major === 3 ? 'utf8' : 'latin1');
    const header = parseNpyDict(text, path, role);
    const shape = header.shape;
    const itemsize = 8 / (role === 'values' ? 2 : 1);
    const elems = shape.reduce((a, b) => a * b, 1);
    const dataBytes = elems * itemsize;
    if (!Number.isSafeInteger(dataBytes)) throw dataError(`${path}: shape (${shape.join(', ')}) is too large`);
    if (dataOffset + dataBytes !== fileBytes) {
      const held = fileBytes - dataOffset;
      const says =
        role === 'values'
          ? `header says ${fmt(shape[0]!)} rows of dim ${fmt(shape[1]!)} (${fmt(dataBytes)} bytes of data)`
          : `header says ${fmt(shape[0]!)} ${role === 'keys' ? 'keys' : 'deleted keys'} (${fmt(dataBytes)} bytes of data)`;
      if (held < dataBytes) throw dataError(`${path}: truncated: ${says} but the file holds ${fmt(held)}`);
      throw dataError(`${path}: ${fmt(held - dataBytes)} trailing bytes: ${says} but the file holds ${fmt(held)}`);
    }
    return { path, descr: header.descr, shape, dataOffset, fileBytes };
  } finally {
    await fh.close();
  }
}

function parseNpyDict(text: string, path: string, role: NpyRole): { descr: string; shape: number[] } {
  const top = new PyLiteralParser(text, path).parseTop();
  if (top.t !== 'dict') throw dataError(`${path}: malformed .npy header: not a dict: ${JSON.stringify(text.trimEnd())}`);
  const d = top.v;
  for (const k of ['descr', 'fortran_order', 'shape']) {
    if (!d.has(k)) throw dataError(`${path}: malformed .npy header: no '${k}' in ${JSON.stringify(text.trimEnd())}`);
  }
  const descr = d.get('descr')!;
  if (descr.t !== 'str') {
    throw dataError(`${path}: structured dtypes are not supported; ${ROLE_EXPECT[role]}`);
  }
  if (!ROLE_DTYPES[role].includes(descr.v)) {
    throw dataError(`${path}: dtype '${descr.v}' is not supported; ${ROLE_EXPECT[role]}`);
  }
  const fortran = d.get('fortran_order')!;
  if (fortran.t !== 'bool') throw dataError(`${path}: malformed .npy header: 'fortran_order' is not True or False`);
  const shapeV = d.get('shape')!;
  if (shapeV.t !== 'seq' || shapeV.v.some((x) => x.t !== 'int' || x.v < 0)) {
    throw dataError(`${path}: malformed .npy header: 'shape' is not a tuple of non-negative integers`);
  }
  const shape = shapeV.v.map((x) => (x as { v: number }).v);
  const want = role === 'values' ? 2 : 1;
  if (shape.length !== want) {
    const what = role === 'values' ? 'values must be 2-D, shape (n, dim)' : `${role === 'keys' ? 'keys' : 'deleted keys'} must be 1-D, shape (n,)`;
    throw dataError(`${path}: shape (${shape.join(', ')}) has ${shape.length} dimensions; ${what}`);
  }
  // A 1-D array has the same bytes in either order, so fortran_order only matters for the 2-D values.
  if (fortran.v && role === 'values') {
    throw dataError(`${path}: fortran_order is True; values must be C order (save np.ascontiguousarray(arr))`);
  }
  if (role === 'values' && (shape[1]! < 1 || shape[1]! > MAX_LOAD_DIM)) {
    throw dataError(`${path}: dim ${shape[1]} is out of range [1, ${MAX_LOAD_DIM}]`);
  }
  return { descr: descr.v, shape };
}
