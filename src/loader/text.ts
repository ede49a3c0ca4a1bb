/**
 * Text parts, `key<TAB>v1,v2,...,vdim` a line (a key alone deletes it in an incremental load): the line
 * reader, in bounded memory, and the line parser, which writes into caller-provided slots.
 */
import { MAX_LOAD_DIM, dataError, fmt, type LoadMode } from './dump-files.js';
import { LOCAL_SOURCE, type DumpSource } from './dump-source.js';

/** A text line longer than this is refused rather than buffered without bound. */
const MAX_TEXT_LINE_BYTES = 16 * 1024 * 1024;
const TEXT_READ_BYTES = 1 << 20;
const TWO_32 = 4294967296;
const U64_LIMIT = 1n << 64n;

/** Result of one text line parse: a blank/comment line, an upsert or a delete (a key alone). */
export const LINE_BLANK = 0;
export const LINE_ROW = 1;
export const LINE_DELETE = 2;

/** What a text part is read against. */
export interface TextPartSpec {
  file: string;
  mode: LoadMode;
  /** The dim of every upsert line; 0 when not known yet. */
  dim: number;
  /** Where a known dim came from, for messages ("the dim of data/a.values.npy"). */
  dimSource: string;
}

/**
 * Parses text lines into caller-provided slots. Key: decimal in [0, 2^64); the line is the text before '#'
 * with CR and surrounding whitespace removed.
 */
export class TextLineParser {
  /** Parsed key words of the last line. */
  lo = 0;
  hi = 0;
  /** 0 means not known yet: the first upsert line sets it. */
  dim: number;
  private readonly file: string;
  private readonly mode: LoadMode;
  private readonly dimSource: string;

  constructor(part: TextPartSpec) {
    this.file = part.file;
    this.mode = part.mode;
    this.dim = part.dim;
    this.dimSource = part.dimSource;
  }

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
export async function* textLineBlocks(path: string, source: DumpSource = LOCAL_SOURCE): AsyncGenerator<{ lines: string[]; firstLine: number }> {
  const fh = await source.open(path);
  try {
    let buf = Buffer.allocUnsafe(TEXT_READ_BYTES);
    let have = 0; // bytes in buf; [0, have) starts at the beginning of a line
    let lineNo = 1;
    let eof = false;
    let bomChecked = false;
    let filePos = 0;
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
      const bytesRead = await fh.read(buf, have, buf.length - have, filePos);
      filePos += bytesRead;
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
export async function textPartDim(part: TextPartSpec, source: DumpSource = LOCAL_SOURCE): Promise<number> {
  const parser = new TextLineParser(part);
  const scratch = part.dim > 0 ? new Float32Array(part.dim) : null;
  for await (const { lines, firstLine } of textLineBlocks(part.file, source)) {
    for (let i = 0; i < lines.length; i++) {
      const kind = parser.parse(lines[i]!, firstLine + i, scratch, 0);
      if (kind === LINE_ROW) return parser.dim;
    }
  }
  return 0;
}
