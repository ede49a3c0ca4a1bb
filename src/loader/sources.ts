/**
 * Streaming, validating readers of the dump formats `kvctl load` reads (SPEC: "Files that kvctl load reads").
 *
 * planDump() lists the parts of a PATH and checks every header, file size and dim before a single row is
 * sent; readDump() then streams the rows in chunks of bounded size, checking values (NaN/Inf) and text
 * syntax as it goes. Every refusal is a KvError with code KV_INVALID_DATA whose message names the file and,
 * where there is one, the row (0-based for NumPy) or line (1-based for text).
 */
import { constants as fsConstants, type Stats } from 'node:fs';
import { lstat, open as openFile, readdir, readlink, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { readFully } from '../common/files.js';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { firstNonFinite } from '../common/keys.js';
import { MAX_DIM } from '../common/limits.js';

export type LoadMode = 'full' | 'incremental';

export interface PartInfo {
  kind: 'npy' | 'text';
  /** NAME for a NumPy pair, the file name for a text part. */
  name: string;
  keysPath?: string;
  valuesPath?: string;
  deletesPath?: string;
  textPath?: string;
  /** Upsert rows, -1 if unknown (text). */
  rows: number;
  /** Deletes, -1 if unknown (text). */
  deletes: number;
}

export interface DumpPlan {
  path: string;
  mode: LoadMode;
  /** The dim of every upsert row; 0 only for an incremental load that holds deletes alone (and no expectedDim). */
  dim: number;
  parts: PartInfo[];
  /** Sum of known upsert rows, -1 if any part is text. */
  totalRows: number;
}

export interface RowChunk {
  /** The file to name in messages about these rows: the keys file of a NumPy pair, or the text file. */
  file: string;
  /** 0-based row (npy) or 1-based line (text) of the chunk's first row, for messages. */
  firstRow: number;
  n: number;
  /** 2n words packed [lo0, hi0, lo1, hi1, ...]. */
  keys: Uint32Array;
  /** n*dim floats, row-major. */
  values: Float32Array;
  /** Text only: the 1-based line number of each row. */
  rowNumbers?: Int32Array;
}

export interface DeleteChunk {
  file: string;
  firstRow: number;
  n: number;
  keys: Uint32Array;
  rowNumbers?: Int32Array;
}

export type DumpItem = { type: 'rows'; chunk: RowChunk } | { type: 'deletes'; chunk: DeleteChunk };

export interface ReadDumpOptions {
  /** Most rows in one chunk (default DEFAULT_CHUNK_ROWS). */
  chunkRows?: number;
  signal?: AbortSignal;
  /**
   * NumPy rows are read into two buffer pairs used in turn, instead of fresh arrays per chunk: a
   * chunk's arrays are then valid only until the consumer asks for the next item. For consumers that
   * copy the rows out at once (the loader): fresh memory is what reading costs most on a VM.
   */
  reuseBuffers?: boolean;
}

/**
 * Rows read per chunk. The reader's buffers are fresh memory once per load, and fresh pages are
 * dear on some VMs: 16384 rows took 4.5k page faults off a 2M-key load against 65536 (same speed
 * otherwise, bench/RESULTS.md).
 */
export const DEFAULT_CHUNK_ROWS = 16384;
/** Chunks are also cut so their values stay under this many bytes, which bounds memory at large dims. */
export const MAX_CHUNK_BYTES = 64 * 1024 * 1024;
/** Largest dim a dump may have. */
/** A replica accepts no larger dim; the loader refuses it before sending a row. */
export const MAX_LOAD_DIM = MAX_DIM;
const MAX_CHUNK_ROWS = 1 << 24;
/** numpy itself refuses headers over 10,000 bytes by default; anything near this is not a real header. */
const MAX_NPY_HEADER_BYTES = 1 << 20;
/** A text line longer than this is refused rather than buffered without bound. */
const MAX_TEXT_LINE_BYTES = 16 * 1024 * 1024;
const TEXT_READ_BYTES = 1 << 20;
const TWO_32 = 4294967296;
const U64_LIMIT = 1n << 64n;

const dataError = (message: string): KvError => new KvError(KvErrorCode.INVALID_DATA, message);
const fmt = (n: number): string => n.toLocaleString('en-US');

// ---------------------------------------------------------------------------------------------------------
// NumPy .npy headers
//
//   offset 0      6       7       8              10 (v1) / 12 (v2, v3)
//          \x93NUMPY major  minor  header length  {'descr': '<f4', 'fortran_order': False, 'shape': (n, d), }   \n
//                                 u16 LE (v1)    latin1 (v1, v2) / utf8 (v3), padded with spaces; data follows
//                                 u32 LE (v2,v3)
// ---------------------------------------------------------------------------------------------------------

const NPY_MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // \x93NUMPY

type NpyRole = 'keys' | 'values' | 'deletes';

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

/** Reads and checks the header of one .npy file, including that the file size matches it exactly. */
export async function readNpyHeader(path: string, role: NpyRole): Promise<NpyHeader> {
  let fh: FileHandle;
  try {
    fh = await openDumpFile(path);
  } catch (err) {
    throw err instanceof KvError ? err : dataError(`${path}: cannot open: ${(err as Error).message}`);
  }
  try {
    const fileBytes = (await fh.stat()).size;
    const pre = Buffer.alloc(12);
    const got = (await fh.read(pre, 0, 12, 0)).bytesRead;
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
    const hgot = (await fh.read(hbuf, 0, headerLen, headerStart)).bytesRead;
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

// ---------------------------------------------------------------------------------------------------------
// Text parts: key<TAB>v1,v2,...,vdim
// ---------------------------------------------------------------------------------------------------------

/** Result of one text line parse: a blank/comment line, an upsert or a delete (a key alone). */
const LINE_BLANK = 0;
const LINE_ROW = 1;
const LINE_DELETE = 2;

/**
 * Parses text lines into caller-provided slots. Key: decimal in [0, 2^64); the line is the text before '#'
 * with CR and surrounding whitespace removed.
 */
class TextLineParser {
  /** Parsed key words of the last line. */
  lo = 0;
  hi = 0;
  /** `dim` 0 means not known yet: the first upsert line sets it. `dimSource` says where a known dim came from. */
  constructor(
    private readonly file: string,
    private readonly mode: LoadMode,
    public dim: number,
    private readonly dimSource: string,
  ) {}

  private fail(lineNo: number, what: string): never {
    throw dataError(`${this.file}: line ${lineNo}: ${what}`);
  }

  /**
   * Parses one line; for an upsert the values go to out[off .. off+dim). When `this.dim` is 0 the first
   * upsert line sets it (out must then be large enough or null to only count).
   */
  parse(raw: string, lineNo: number, out: Float32Array | null, off: number): number {
    let s = raw;
    const hash = s.indexOf('#');
    if (hash >= 0) s = s.slice(0, hash);
    s = s.trim(); // also drops the CR of a CRLF line
    if (s.length === 0) return LINE_BLANK;
    const tab = s.indexOf('\t');
    const keyStr = tab < 0 ? s : s.slice(0, tab).trimEnd();
    this.parseKey(keyStr, lineNo);
    const rest = tab < 0 ? '' : s.slice(tab + 1).trim();
    if (rest.length === 0) {
      if (this.mode !== 'incremental') {
        this.fail(lineNo, `key ${keyStr} has no values (a key alone deletes it, which only an incremental load allows)`);
      }
      return LINE_DELETE;
    }
    this.parseValues(rest, lineNo, out, off);
    return LINE_ROW;
  }

  private parseKey(k: string, lineNo: number): void {
    const len = k.length;
    let digits = len > 0;
    for (let i = 0; i < len; i++) {
      const c = k.charCodeAt(i);
      if (c < 48 || c > 57) {
        digits = false;
        break;
      }
    }
    if (!digits) {
      if (/^-\d+$/.test(k)) this.fail(lineNo, `key ${k} is negative; keys are unsigned 64-bit integers`);
      this.fail(lineNo, `bad key ${shown(k)}: expected a decimal unsigned 64-bit integer, then a tab and the values`);
    }
    if (len <= 15) {
      const n = Number(k);
      this.lo = n % TWO_32;
      this.hi = Math.floor(n / TWO_32);
      return;
    }
    const b = BigInt(k);
    if (b >= U64_LIMIT) this.fail(lineNo, `key ${k} is out of range [0, 2^64)`);
    this.lo = Number(b & 0xffffffffn);
    this.hi = Number(b >> 32n);
  }

  private parseValues(rest: string, lineNo: number, out: Float32Array | null, off: number): void {
    const dim = this.dim;
    let count = 0;
    let start = 0;
    const len = rest.length;
    for (;;) {
      let end = rest.indexOf(',', start);
      if (end < 0) end = len;
      count++;
      if (dim > 0 && count > dim) {
        let total = count;
        for (let i = rest.indexOf(',', start); i >= 0; i = rest.indexOf(',', i + 1)) total++;
        this.fail(lineNo, `${total} values; expected ${dim} (${this.dimSource})`);
      }
      const v = this.parseValue(rest, start, end, count, lineNo);
      if (out !== null) out[off + count - 1] = v;
      if (end === len) break;
      start = end + 1;
    }
    if (dim === 0) {
      if (count > MAX_LOAD_DIM) this.fail(lineNo, `${count} values; the dim must be at most ${MAX_LOAD_DIM}`);
      this.dim = count;
    } else if (count !== dim) {
      this.fail(lineNo, `${count} values; expected ${dim} (${this.dimSource})`);
    }
  }

  private parseValue(s: string, start: number, end: number, col: number, lineNo: number): number {
    const d = Number(start === 0 && end === s.length ? s : s.slice(start, end));
    // Number() also takes "", "0x1f", "0b1", "0o7" and "Infinity": a finite, non-zero result without a radix
    // prefix is a decimal number; anything else goes the slow way to be refused (or accepted as a zero).
    if (d - d === 0 && d !== 0 && !hasRadixPrefix(s, start, end)) {
      const v = Math.fround(d);
      if (v - v === 0) return v;
    }
    return this.parseValueSlow(s.slice(start, end).trim(), col, lineNo);
  }

  private parseValueSlow(tok: string, col: number, lineNo: number): number {
    if (tok.length === 0) this.fail(lineNo, `value ${col} is empty`);
    // Only [0-9 . + - e E] and inner blanks are decimal syntax.
    if (!/^[-+]?[0-9.]/.test(tok) || /[^0-9.eE+\- \t]/.test(tok)) {
      const low = tok.toLowerCase().replace(/^[+-]/, '');
      if (low === 'nan') this.fail(lineNo, `value ${col} is NaN`);
      if (low === 'inf' || low === 'infinity') this.fail(lineNo, `value ${col} is ${tok.startsWith('-') ? '-Inf' : 'Inf'}`);
      this.fail(lineNo, `value ${col} ${shown(tok)} is not a number`);
    }
    const v = Math.fround(Number(tok));
    if (v - v !== 0) {
      if (Number.isNaN(v)) this.fail(lineNo, `value ${col} ${shown(tok)} is not a number`);
      this.fail(lineNo, `value ${col} ${tok} overflows float32 to ${v > 0 ? 'Inf' : '-Inf'}`);
    }
    return v;
  }
}

/** True when the token, after leading blanks, starts with 0x, 0b or 0o (which Number() reads as hex, binary, octal). */
function hasRadixPrefix(s: string, start: number, end: number): boolean {
  let i = start;
  while (i < end && (s.charCodeAt(i) === 32 || s.charCodeAt(i) === 9)) i++;
  if (i + 1 >= end || s.charCodeAt(i) !== 48) return false;
  const c = s.charCodeAt(i + 1) | 0x20;
  return c === 120 || c === 98 || c === 111;
}

/**
 * Yields the complete lines of a text file block by block, in bounded memory, with the first line's number.
 * Lines are decoded as latin1, one char per byte: the syntax is ASCII, and since no byte of a multi-byte UTF-8
 * sequence is '#' or '\n', UTF-8 comments are cut off intact (shown() re-decodes text quoted in messages).
 */
async function* textLineBlocks(path: string): AsyncGenerator<{ lines: string[]; firstLine: number }> {
  let fh: FileHandle;
  try {
    fh = await openDumpFile(path);
  } catch (err) {
    throw err instanceof KvError ? err : dataError(`${path}: cannot open: ${(err as Error).message}`);
  }
  try {
    let buf = Buffer.allocUnsafe(TEXT_READ_BYTES);
    let have = 0; // bytes in buf; [0, have) starts at the beginning of a line
    let lineNo = 1;
    let eof = false;
    let bomChecked = false;
    while (!eof) {
      if (have === buf.length) {
        // One line fills the whole buffer: grow it, up to the line limit.
        if (buf.length >= MAX_TEXT_LINE_BYTES) {
          throw dataError(`${path}: line ${lineNo} is longer than ${fmt(MAX_TEXT_LINE_BYTES)} bytes`);
        }
        const bigger = Buffer.allocUnsafe(buf.length * 2);
        buf.copy(bigger, 0, 0, have);
        buf = bigger;
      }
      const { bytesRead } = await fh.read(buf, have, buf.length - have, null);
      if (bytesRead === 0) eof = true;
      have += bytesRead;
      const view = buf.subarray(0, have);
      const lines: string[] = [];
      let pos = 0;
      if (!bomChecked && (have >= 3 || eof)) {
        bomChecked = true;
        if (have >= 3 && view[0] === 0xef && view[1] === 0xbb && view[2] === 0xbf) pos = 3; // a UTF-8 BOM
      }
      for (let nl = view.indexOf(10, 0); nl >= 0; nl = view.indexOf(10, pos)) {
        lines.push(view.toString('latin1', pos, nl));
        pos = nl + 1;
      }
      if (eof && pos < have) {
        lines.push(view.toString('latin1', pos, have));
        pos = have;
      }
      buf.copy(buf, 0, pos, have);
      have -= pos;
      if (lines.length > 0) {
        yield { lines, firstLine: lineNo };
        lineNo += lines.length;
      }
    }
  } finally {
    await fh.close();
  }
}

/** Text from a latin1-decoded line, as the UTF-8 it was, quoted and shortened for a message. */
function shown(latin1: string): string {
  const s = Buffer.from(latin1, 'latin1').toString('utf8');
  return JSON.stringify(s.length > 40 ? s.slice(0, 40) + '…' : s);
}

/** Finds the dim of a text part from its first upsert line (checking the lines before it). 0 if it has none. */
async function textPartDim(path: string, mode: LoadMode, dim: number, dimSource: string): Promise<number> {
  const parser = new TextLineParser(path, mode, dim, dimSource);
  const scratch = dim > 0 ? new Float32Array(dim) : null;
  for await (const { lines, firstLine } of textLineBlocks(path)) {
    for (let i = 0; i < lines.length; i++) {
      const kind = parser.parse(lines[i]!, firstLine + i, scratch, 0);
      if (kind === LINE_ROW) return parser.dim;
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------
// planDump
// ---------------------------------------------------------------------------------------------------------

const NPY_SUFFIX: Record<string, NpyRole> = { '.keys.npy': 'keys', '.values.npy': 'values', '.deletes.npy': 'deletes' };

function npyRoleOf(name: string): { prefix: string; role: NpyRole } | undefined {
  for (const suffix of Object.keys(NPY_SUFFIX)) {
    if (name.endsWith(suffix) && name.length > suffix.length) return { prefix: name.slice(0, -suffix.length), role: NPY_SUFFIX[suffix]! };
  }
  return undefined;
}

/** What a path is that is not a regular file, for messages ("a FIFO"). */
function kindOf(s: Stats): string {
  if (s.isDirectory()) return 'a directory';
  if (s.isFIFO()) return 'a FIFO';
  if (s.isSocket()) return 'a socket';
  if (s.isCharacterDevice()) return 'a character device';
  if (s.isBlockDevice()) return 'a block device';
  if (s.isSymbolicLink()) return 'a symbolic link';
  return 'not a regular file';
}

const notRegular = (p: string, s: Stats): KvError =>
  dataError(s.isDirectory() ? `${p} is a directory, not a regular file` : `${p} is ${kindOf(s)}, not a regular file`);

/**
 * What `p` leads to (following links), or undefined when nothing is there. A link that leads
 * nowhere, a link loop, or a path that cannot be read is refused with what it is: "no values file"
 * would send the user looking for a file that is there.
 */
async function statOrUndefined(p: string): Promise<Stats | undefined> {
  try {
    return await stat(p);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw dataError(`${p} is a symbolic link loop (ELOOP)`);
    if (code === 'ENOENT') {
      const link = await lstat(p).catch(() => undefined);
      if (link?.isSymbolicLink()) {
        const target = await readlink(p).catch(() => '?');
        throw dataError(`${p} is a dangling symbolic link (to ${target}, which does not exist)`);
      }
      return undefined;
    }
    if (code === 'ENOTDIR') return undefined;
    throw dataError(`${p}: cannot stat: ${(err as Error).message}`);
  }
}

/**
 * Opens a dump file for reading, refusing anything but a regular file. O_NONBLOCK: opening a FIFO
 * for reading would otherwise wait for a writer forever (it has no effect on a regular file's reads).
 */
async function openDumpFile(path: string): Promise<FileHandle> {
  const fh = await openFile(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  try {
    const s = await fh.stat();
    if (!s.isFile()) throw notRegular(path, s);
  } catch (err) {
    await fh.close();
    throw err;
  }
  return fh;
}

/** Where each plan's dim came from, for messages about rows read later. */
const planDimDesc = new WeakMap<DumpPlan, string>();

interface NpyGroup {
  name: string;
  keysPath?: string;
  valuesPath?: string;
  deletesPath?: string;
}

/**
 * Lists the parts and validates every header, size and dim before a single row is sent. For text parts,
 * reads the first data line to learn dim. `expectedDim` (optional) must match.
 */
export async function planDump(path: string, mode: LoadMode, expectedDim?: number, expectedDimWhat = 'the expected dim'): Promise<DumpPlan> {
  if (typeof path !== 'string' || path.length === 0) throw invalidArgument('path must be a non-empty string');
  if (mode !== 'full' && mode !== 'incremental') throw invalidArgument(`mode must be 'full' or 'incremental', not ${String(mode)}`);
  if (expectedDim !== undefined && (!Number.isSafeInteger(expectedDim) || expectedDim < 1 || expectedDim > MAX_LOAD_DIM)) {
    throw invalidArgument(`expectedDim must be an integer in [1, ${MAX_LOAD_DIM}], not ${String(expectedDim)}`);
  }

  const groups: (NpyGroup | { text: string; name: string })[] = [];
  const st = await statOrUndefined(path);
  if (st?.isDirectory()) {
    const entries = (await readdir(path)).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const byPrefix = new Map<string, NpyGroup>();
    for (const name of entries) {
      // Hidden files and markers such as _SUCCESS are not data.
      if (name.startsWith('.') || name.startsWith('_')) continue;
      const full = join(path, name);
      const est = await statOrUndefined(full);
      if (est === undefined) throw dataError(`${full}: removed while the directory was read`);
      if (est.isDirectory()) throw dataError(`${full}: subdirectories are not read; a dump directory holds part files only`);
      if (!est.isFile()) throw notRegular(full, est);
      const npy = npyRoleOf(name);
      if (npy !== undefined) {
        let g = byPrefix.get(npy.prefix);
        if (g === undefined) {
          g = { name: npy.prefix };
          byPrefix.set(npy.prefix, g);
          groups.push(g);
        }
        g[`${npy.role}Path`] = full;
      } else if (name.endsWith('.txt') || name.endsWith('.tsv')) {
        groups.push({ text: full, name });
      } else {
        throw dataError(
          `${full}: unexpected file in a dump directory; parts are NAME.keys.npy + NAME.values.npy` +
            `${mode === 'incremental' ? ' (+ NAME.deletes.npy)' : ''}, *.txt or *.tsv (names starting with '.' or '_' are ignored)`,
        );
      }
    }
    if (groups.length === 0) throw dataError(`${path}: the directory holds no data parts`);
  } else if (st?.isFile() && npyRoleOf(basename(path)) !== undefined) {
    const { prefix } = npyRoleOf(basename(path))!;
    groups.push(await npyGroupAt(join(dirname(path), prefix), prefix));
  } else if (st?.isFile() && path.endsWith('.npy')) {
    throw dataError(`${path}: a NumPy part must be named NAME.keys.npy, NAME.values.npy or NAME.deletes.npy`);
  } else if (st?.isFile()) {
    groups.push({ text: path, name: basename(path) });
  } else if (st !== undefined) {
    throw dataError(`${path} is ${kindOf(st)}, not a regular file or directory`);
  } else if ((await statOrUndefined(`${path}.keys.npy`)) !== undefined || (await statOrUndefined(`${path}.deletes.npy`)) !== undefined) {
    groups.push(await npyGroupAt(path, basename(path)));
  } else {
    throw invalidArgument(`${path}: no such file or directory (nor ${path}.keys.npy)`);
  }

  let dim = expectedDim ?? 0;
  // Where the dim came from, for messages: "the expected dim", "the dim of data/a.values.npy".
  let dimDesc = expectedDim !== undefined ? expectedDimWhat : '';
  const parts: PartInfo[] = [];
  let totalRows = 0;
  for (const g of groups) {
    if ('text' in g) {
      const d = await textPartDim(g.text, mode, dim, dimDesc);
      if (d > 0 && dim === 0) {
        dim = d;
        dimDesc = `the dim of the first data line of ${g.text}`;
      }
      parts.push({ kind: 'text', name: g.name, textPath: g.text, rows: -1, deletes: -1 });
      totalRows = -1;
      continue;
    }
    if (g.deletesPath !== undefined && mode !== 'incremental') {
      throw dataError(`${g.deletesPath}: deletes are only allowed in an incremental load`);
    }
    if (g.keysPath !== undefined && g.valuesPath === undefined) {
      throw dataError(`${g.keysPath}: keys file without its values file ${g.name}.values.npy`);
    }
    if (g.valuesPath !== undefined && g.keysPath === undefined) {
      throw dataError(`${g.valuesPath}: values file without its keys file ${g.name}.keys.npy`);
    }
    const part: PartInfo = { kind: 'npy', name: g.name, rows: 0, deletes: 0 };
    if (g.keysPath !== undefined && g.valuesPath !== undefined) {
      const kh = await readNpyHeader(g.keysPath, 'keys');
      const vh = await readNpyHeader(g.valuesPath, 'values');
      if (kh.shape[0] !== vh.shape[0]) {
        throw dataError(`${g.valuesPath}: holds ${fmt(vh.shape[0]!)} rows but ${g.keysPath} holds ${fmt(kh.shape[0]!)} keys`);
      }
      const d = vh.shape[1]!;
      if (dim === 0) {
        dim = d;
        dimDesc = `the dim of ${g.valuesPath}`;
      } else if (d !== dim) {
        throw dataError(`${g.valuesPath}: dim ${d} differs from ${dim} (${dimDesc})`);
      }
      part.keysPath = g.keysPath;
      part.valuesPath = g.valuesPath;
      part.rows = kh.shape[0]!;
      if (totalRows >= 0) totalRows += part.rows;
    }
    if (g.deletesPath !== undefined) {
      const dh = await readNpyHeader(g.deletesPath, 'deletes');
      part.deletesPath = g.deletesPath;
      part.deletes = dh.shape[0]!;
    }
    parts.push(part);
  }
  if (mode === 'full' && dim === 0) {
    throw dataError(`${path}: no part holds a data row, so the dim is unknown`);
  }
  const plan: DumpPlan = { path, mode, dim, parts, totalRows };
  planDimDesc.set(plan, dimDesc);
  return plan;
}

async function npyGroupAt(prefixPath: string, name: string): Promise<NpyGroup> {
  const g: NpyGroup = { name };
  for (const [suffix, role] of Object.entries(NPY_SUFFIX)) {
    const p = prefixPath + suffix;
    const s = await statOrUndefined(p);
    if (s === undefined) continue;
    if (!s.isFile()) throw notRegular(p, s);
    g[`${role}Path`] = p;
  }
  return g;
}

// ---------------------------------------------------------------------------------------------------------
// readDump
// ---------------------------------------------------------------------------------------------------------

function abortError(signal: AbortSignal): KvError {
  return new KvError(KvErrorCode.ABORTED, 'load aborted', { cause: signal.reason });
}

/**
 * Streams the rows in bounded memory: chunks of at most `chunkRows` rows (default 65536, and fewer when a
 * chunk's values would pass MAX_CHUNK_BYTES), validating values (NaN/Inf) and text syntax as it goes.
 * Yields upserts as {type:'rows', chunk} and deletes as {type:'deletes', chunk}; a NumPy part yields its
 * deletes after its rows. Each chunk owns fresh arrays, so the consumer may keep them (unless
 * `reuseBuffers`). Stops early with a
 * KV_ABORTED KvError if `signal` aborts.
 */
export async function* readDump(plan: DumpPlan, options: ReadDumpOptions = {}): AsyncGenerator<DumpItem> {
  const chunkRows = options.chunkRows ?? DEFAULT_CHUNK_ROWS;
  if (!Number.isSafeInteger(chunkRows) || chunkRows < 1 || chunkRows > MAX_CHUNK_ROWS) {
    throw invalidArgument(`chunkRows must be an integer in [1, ${MAX_CHUNK_ROWS}], not ${String(chunkRows)}`);
  }
  const signal = options.signal;
  const rowsPerChunk = plan.dim > 0 ? Math.max(1, Math.min(chunkRows, Math.floor(MAX_CHUNK_BYTES / (plan.dim * 4)))) : chunkRows;
  for (const part of plan.parts) {
    if (signal?.aborted) throw abortError(signal);
    if (part.kind === 'text') {
      yield* readTextPart(part.textPath!, plan, rowsPerChunk, signal);
      continue;
    }
    if (part.keysPath !== undefined && part.valuesPath !== undefined) {
      yield* readNpyRows(part, plan.dim, rowsPerChunk, signal, options.reuseBuffers ?? false);
    }
    if (part.deletesPath !== undefined) {
      yield* readNpyDeletes(part, chunkRows, signal);
    }
  }
}

/**
 * Reads exactly `len` bytes at `pos` into the start of `into`, or of a fresh ArrayBuffer (offset 0, so
 * any typed view is aligned).
 */
async function readExact(fh: FileHandle, file: string, len: number, pos: number, into?: ArrayBuffer): Promise<ArrayBuffer> {
  const ab = into ?? new ArrayBuffer(len);
  if ((await readFully(fh, new Uint8Array(ab, 0, len), pos)) < len) {
    throw dataError(`${file}: truncated while reading (the file shrank after it was checked)`);
  }
  return ab;
}

async function reopenChecked(path: string, role: NpyRole, rows: number, dim: number): Promise<NpyHeader> {
  const h = await readNpyHeader(path, role);
  if (h.shape[0] !== rows || (role === 'values' && h.shape[1] !== dim)) {
    throw dataError(`${path}: changed since the load was planned (shape now (${h.shape.join(', ')}))`);
  }
  return h;
}

async function* readNpyRows(part: PartInfo, dim: number, chunkRows: number, signal: AbortSignal | undefined, reuse: boolean): AsyncGenerator<DumpItem> {
  const keysPath = part.keysPath!;
  const valuesPath = part.valuesPath!;
  const rows = part.rows;
  const kh = await reopenChecked(keysPath, 'keys', rows, dim);
  const vh = await reopenChecked(valuesPath, 'values', rows, dim);
  const kf = await openDumpFile(keysPath);
  let vf: FileHandle | undefined;
  let pending: Promise<DumpItem> | undefined;
  try {
    vf = await openDumpFile(valuesPath);
    const valuesFile = vf;
    const rowBytes = dim * 4;
    // With reuse: chunk k is read into pair k % 2. Pair k % 2 is refilled for chunk k + 2, which is
    // read only once the consumer has asked for the item after chunk k.
    const pairs = reuse ? [0, 1].map(() => ({ keys: new ArrayBuffer(chunkRows * 8), values: new ArrayBuffer(chunkRows * rowBytes) })) : [];
    let chunkNo = 0;
    const readChunk = async (first: number): Promise<DumpItem> => {
      const n = Math.min(chunkRows, rows - first);
      const pair = pairs[chunkNo++ % 2];
      // `<i8` keys are taken as the same 64 bits (two's complement), so -1 is key 2^64-1: no conversion needed.
      const [kab, vab] = await Promise.all([
        readExact(kf, keysPath, n * 8, kh.dataOffset + first * 8, pair?.keys),
        readExact(valuesFile, valuesPath, n * rowBytes, vh.dataOffset + first * rowBytes, pair?.values),
      ]);
      const values = new Float32Array(vab, 0, n * dim);
      const i = firstNonFinite(values);
      if (i >= 0) {
        const v = values[i]!;
        const what = Number.isNaN(v) ? 'NaN' : v > 0 ? 'Inf' : '-Inf';
        throw dataError(`${valuesPath}: row ${first + Math.floor(i / dim)} column ${i % dim} is ${what}`);
      }
      return { type: 'rows', chunk: { file: keysPath, firstRow: first, n, keys: new Uint32Array(kab, 0, 2 * n), values } };
    };
    // Read one chunk ahead so disk reads overlap the consumer's work on the chunk just yielded.
    let first = 0;
    if (rows > 0) pending = readChunk(0);
    while (pending !== undefined) {
      const item = await pending;
      pending = undefined;
      first += item.chunk.n;
      if (first < rows) {
        pending = readChunk(first);
        pending.catch(() => undefined); // awaited next turn, or dropped if the consumer stops
      }
      if (signal?.aborted) throw abortError(signal);
      yield item;
    }
  } finally {
    if (pending !== undefined) await pending.catch(() => undefined);
    await kf.close();
    await vf?.close();
  }
}

async function* readNpyDeletes(part: PartInfo, chunkRows: number, signal: AbortSignal | undefined): AsyncGenerator<DumpItem> {
  const path = part.deletesPath!;
  const h = await reopenChecked(path, 'deletes', part.deletes, 0);
  const fh = await openDumpFile(path);
  try {
    for (let first = 0; first < part.deletes; first += chunkRows) {
      if (signal?.aborted) throw abortError(signal);
      const n = Math.min(chunkRows, part.deletes - first);
      const ab = await readExact(fh, path, n * 8, h.dataOffset + first * 8);
      if (signal?.aborted) throw abortError(signal);
      yield { type: 'deletes', chunk: { file: path, firstRow: first, n, keys: new Uint32Array(ab) } };
    }
  } finally {
    await fh.close();
  }
}

/** A full chunk keeps its arrays; a short one (end of file) is copied so it does not pin a chunk-sized buffer. */
function fit<T extends Uint32Array | Int32Array | Float32Array>(a: T, len: number): T {
  return (len === a.length ? a : a.slice(0, len)) as T;
}

/** Text rows accumulate in fresh arrays; upserts and deletes go to separate chunks, each in file order. */
async function* readTextPart(path: string, plan: DumpPlan, chunkRows: number, signal: AbortSignal | undefined): AsyncGenerator<DumpItem> {
  const dim = plan.dim;
  const parser = new TextLineParser(path, plan.mode, dim, planDimDesc.get(plan) ?? 'the dim of the load');
  // dim 0 means planning found no upsert line anywhere; parse into a scratch row so such a line is refused.
  const noRows = dim === 0 ? new Float32Array(MAX_LOAD_DIM) : null;
  let rowKeys: Uint32Array | undefined;
  let rowValues: Float32Array | undefined;
  let rowLines: Int32Array | undefined;
  let nRows = 0;
  let delKeys: Uint32Array | undefined;
  let delLines: Int32Array | undefined;
  let nDel = 0;
  const ready: DumpItem[] = [];

  const flushRows = (): void => {
    if (nRows === 0) return;
    const n = nRows;
    ready.push({
      type: 'rows',
      chunk: {
        file: path,
        firstRow: rowLines![0]!,
        n,
        keys: fit(rowKeys!, 2 * n),
        values: fit(rowValues!, n * dim),
        rowNumbers: fit(rowLines!, n),
      },
    });
    rowKeys = rowValues = rowLines = undefined;
    nRows = 0;
  };
  const flushDeletes = (): void => {
    if (nDel === 0) return;
    const n = nDel;
    ready.push({ type: 'deletes', chunk: { file: path, firstRow: delLines![0]!, n, keys: fit(delKeys!, 2 * n), rowNumbers: fit(delLines!, n) } });
    delKeys = delLines = undefined;
    nDel = 0;
  };

  for await (const { lines, firstLine } of textLineBlocks(path)) {
    if (signal?.aborted) throw abortError(signal);
    for (let i = 0; i < lines.length; i++) {
      const lineNo = firstLine + i;
      if (noRows === null && rowValues === undefined) {
        rowKeys = new Uint32Array(2 * chunkRows);
        rowValues = new Float32Array(chunkRows * dim);
        rowLines = new Int32Array(chunkRows);
      }
      const kind = parser.parse(lines[i]!, lineNo, noRows ?? rowValues!, noRows === null ? nRows * dim : 0);
      if (kind === LINE_BLANK) continue;
      if (kind === LINE_ROW) {
        if (noRows !== null) throw dataError(`${path}: line ${lineNo}: has values, but the file held none when the load was planned (it changed)`);
        rowKeys![2 * nRows] = parser.lo;
        rowKeys![2 * nRows + 1] = parser.hi;
        rowLines![nRows] = lineNo;
        nRows++;
        if (nRows === chunkRows) flushRows();
        continue;
      }
      if (delKeys === undefined) {
        delKeys = new Uint32Array(2 * chunkRows);
        delLines = new Int32Array(chunkRows);
      }
      delKeys[2 * nDel] = parser.lo;
      delKeys[2 * nDel + 1] = parser.hi;
      delLines![nDel] = lineNo;
      nDel++;
      if (nDel === chunkRows) flushDeletes();
    }
    for (let j = 0; j < ready.length; j++) {
      if (signal?.aborted) throw abortError(signal);
      yield ready[j]!;
    }
    ready.length = 0;
  }
  flushRows();
  flushDeletes();
  for (const item of ready) {
    if (signal?.aborted) throw abortError(signal);
    yield item;
  }
}
