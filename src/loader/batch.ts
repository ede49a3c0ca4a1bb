/**
 * A group's batch of rows under construction, where each of its rows came from (for messages), the copy
 * of a chunk's rows into their groups' batches, and a replica's refusal of a batch row told as its file
 * and row.
 */
import { KvError, KvErrorCode } from '../common/errors.js';
import { keyAt } from '../common/keys.js';
import { LoadRowsMessage } from '../wire/load-rows.js';
import type { DeleteChunk, RowChunk } from './sources.js';

/** Where a run of batch rows came from, for messages: a file, and its row numbering. */
interface RowSource {
  file: string;
  firstRow: number;
  rowNumbers: Int32Array | undefined;
}

/**
 * Where each row of a batch came from, for messages. A staged batch's buffers are reused once its
 * block is written; its origins stay until the replicas have taken the block.
 */
export class RowOrigins {
  /** Source of row i (upserts first, then deletes at size + j): an index into `sources` and the index within it. */
  private readonly sourceOf: Uint32Array;
  private readonly indexIn: Int32Array;
  private sources: RowSource[] = [];

  constructor(size: number, deletes: boolean) {
    this.sourceOf = new Uint32Array(deletes ? 2 * size : size);
    this.indexIn = new Int32Array(deletes ? 2 * size : size);
  }

  /** Records that batch row `at` is row `i` of `chunk`. */
  from(at: number, chunk: RowChunk | DeleteChunk, i: number): void {
    // Compared by file and first row, not by identity: holding the chunk would hold its rows.
    const last = this.sources[this.sources.length - 1];
    if (last === undefined || last.firstRow !== chunk.firstRow || last.file !== chunk.file) {
      this.sources.push({ file: chunk.file, firstRow: chunk.firstRow, rowNumbers: chunk.rowNumbers });
    }
    this.sourceOf[at] = this.sources.length - 1;
    this.indexIn[at] = i;
  }

  /** "file: row N" (or line N) of batch row `at`. */
  where(at: number): string {
    const src = this.sources[this.sourceOf[at]!]!;
    const i = this.indexIn[at]!;
    const row = src.rowNumbers ? src.rowNumbers[i]! : src.firstRow + i;
    return `${src.file}: ${src.file.endsWith('.npy') ? 'row' : 'line'} ${row}`;
  }

  reset(): void {
    this.sources = [];
  }
}

export interface BatchShape {
  /** Rows (and, for a delta, deletes) a batch holds. */
  size: number;
  dim: number;
  table: string;
  version: number;
  loadId: string;
  /** A delta's batch also holds deletes. */
  withDeletes: boolean;
}

/**
 * One group's batch under construction. Upserts are written straight into a LoadRows message laid
 * out for a full batch, which is sent as is when full; batches are reused once every replica of the
 * group has acknowledged them (or, staged, once their block is written), so a load allocates its
 * buffers once.
 */
export class Batch {
  n = 0;
  nd = 0;
  readonly msg: LoadRowsMessage;
  readonly keys: Uint32Array;
  readonly values: Float32Array;
  readonly values64: Float64Array;
  /** A delta's deletes (allocated for deltas only). */
  readonly deletes: Uint32Array;
  origins: RowOrigins;

  readonly size: number;
  readonly dim: number;
  readonly withDeletes: boolean;

  constructor(shape: BatchShape) {
    const { size, dim, withDeletes } = shape;
    this.size = size;
    this.dim = dim;
    this.withDeletes = withDeletes;
    this.msg = new LoadRowsMessage(shape.table, shape.version, shape.loadId, size, dim);
    this.keys = this.msg.keys;
    this.values = this.msg.values;
    // 8-byte aligned by construction (LoadRowsMessage); used for even dims only.
    this.values64 = new Float64Array(this.values.buffer, this.values.byteOffset, this.values.length >>> 1);
    this.deletes = new Uint32Array(withDeletes ? 2 * size : 0);
    this.origins = new RowOrigins(size, withDeletes);
  }

  get full(): boolean {
    return this.n === this.size || this.nd === this.size;
  }

  /** The upserts' keys and values as bytes. */
  keyBytes(): Uint8Array {
    return new Uint8Array(this.keys.buffer, this.keys.byteOffset, this.n * 8);
  }

  valueBytes(): Uint8Array {
    return new Uint8Array(this.values.buffer, this.values.byteOffset, this.n * this.dim * 4);
  }

  reset(): void {
    this.n = 0;
    this.nd = 0;
    this.origins.reset();
  }
}

/**
 * Copies rows from `from` on into their groups' batches until one fills (it is the batch of the last
 * row placed) or the chunk ends; returns the index after the last row placed. Rows move as Float64
 * pairs when dim is even and both sides are 8-byte aligned (the reader's buffers and the batch
 * messages are): the values were checked finite, and finite float32 pairs never form a NaN double,
 * so the copy is bit-exact. Plain loops: set(subarray()) would allocate a view per row.
 */
export function placeRows(chunk: RowChunk, from: number, groupOf: Uint16Array, batches: Batch[], dim: number): number {
  const ck = chunk.keys;
  const cv = chunk.values;
  const wide = (dim & 1) === 0 && (cv.byteOffset & 7) === 0;
  const cv64 = wide ? new Float64Array(cv.buffer, cv.byteOffset, cv.length >>> 1) : undefined;
  const half = dim >>> 1;
  for (let i = from; i < chunk.n; i++) {
    const b = batches[groupOf[i]!]!;
    const at = b.n;
    b.keys[2 * at] = ck[2 * i]!;
    b.keys[2 * at + 1] = ck[2 * i + 1]!;
    if (cv64 !== undefined) {
      const bv = b.values64;
      let src = i * half;
      let dst = at * half;
      const stop = src + half;
      while (src < stop) bv[dst++] = cv64[src++]!;
    } else {
      const bv = b.values;
      let src = i * dim;
      let dst = at * dim;
      const stop = src + dim;
      while (src < stop) bv[dst++] = cv[src++]!;
    }
    b.origins.from(at, chunk, i);
    b.n = at + 1;
    if (at + 1 === b.size) return i + 1;
  }
  return chunk.n;
}

/** A refusal of one row, told by where it came from (a repeated key is the data's fault, not a replica's). */
export function rowError(err: KvError, where: string, key: string, what: 'delta' | 'load'): KvError {
  if (err.code === KvErrorCode.DUPLICATE_KEY && key !== '') {
    return new KvError(KvErrorCode.DUPLICATE_KEY, `${where}: key ${key} is repeated within this ${what}`, { cause: err });
  }
  return new KvError(err.code, `${where}: ${err.message}`, { cause: err });
}

/** A replica's refusal of a batch row, told as the file and row the row came from. */
export function explainRowError(err: unknown, b: Batch, what: 'delta' | 'load'): unknown {
  if (!(err instanceof KvError) || err.detail === undefined || typeof err.detail['row'] !== 'number') return err;
  // The replica numbers upserts first, then deletes.
  const r = err.detail['row'];
  if (r < 0 || r >= b.n + b.nd) return err;
  const at = r < b.n ? r : b.size + (r - b.n);
  const key = r < b.n ? keyAt(b.keys, r) : keyAt(b.deletes, r - b.n);
  return rowError(err, b.origins.where(at), String(key), what);
}
