import { ClassicLevel } from 'classic-level';
import { pack, unpack } from 'msgpackr';
import { floatsFromBytes, keysFromBytes } from '../common/keys.js';

/**
 * A replica's disk: one classic-level (LevelDB) database under --data.
 *
 *   t!<table>                                  -> msgpack TableMeta (versions, current)
 *   r!<table>!<version:16 digits>!<block:10>   -> [n u32][dim u32][n*8 key bytes][n*dim*4 float bytes]
 *                                                 (dim 0: a delta's deletes, keys only)
 *   p!<seq:16 digits>                          -> a real-time put batch (see encodePut)
 *
 * Rows are stored in blocks (one per loader batch): FEASIBILITY measured one entry per key at ~10x
 * slower to load and to rebuild.
 */
export interface VersionMeta {
  version: number;
  dim: number;
  rows: number;
  /** 'retained': no longer served, kept on disk because a kept delta version is built on it. */
  state: 'loading' | 'sealed' | 'retained';
  loadId: string;
  blocks: number;
  /** A delta: the version it applies to (0 for a full version). */
  base: number;
  upserts: number;
  deletes: number;
  createdAtMs: number;
}

/** A real-time put batch as logged. */
export interface PutRecord {
  seq: number;
  table: string;
  order: number;
  writer: string;
  keys: Uint32Array;
  values: Float32Array;
}

export interface TableMeta {
  name: string;
  current: number;
  versions: VersionMeta[];
  /** Real-time puts with a lower write order predate the current full version and are not applied. */
  putsFrom: number;
}

const pad = (n: number, width: number): string => String(n).padStart(width, '0');
const versionPrefix = (table: string, version: number): string => `r!${table}!${pad(version, 16)}!`;

export class ShardStore {
  private readonly db: ClassicLevel<string, Uint8Array>;

  constructor(readonly dir: string) {
    // Vectors do not compress: Snappy would only spend CPU on them. Blocks are read once, at
    // restore, in order: a block cache would only hold memory.
    this.db = new ClassicLevel<string, Uint8Array>(dir, { keyEncoding: 'utf8', valueEncoding: 'view', compression: false, cacheSize: 1 << 20 });
  }

  async open(): Promise<void> {
    try {
      await this.db.open();
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause;
      if (cause?.code === 'LEVEL_LOCKED') {
        throw new Error(`data directory ${this.dir} is in use by another process (is this replica already running?)`, { cause: err });
      }
      throw new Error(`cannot open data directory ${this.dir}: ${(err as Error).message}`, { cause: err });
    }
  }

  async close(): Promise<void> {
    await this.db.close();
  }

  async readTables(): Promise<TableMeta[]> {
    const out: TableMeta[] = [];
    for await (const [, value] of this.db.iterator({ gte: 't!', lt: 't"' })) {
      out.push(unpack(value) as TableMeta);
    }
    return out;
  }

  /** Writes a table's metadata; `sync` makes it durable against a machine crash, not just a process crash. */
  async putTable(meta: TableMeta, sync: boolean): Promise<void> {
    await this.db.put(`t!${meta.name}`, pack(meta), { sync });
  }

  async appendBlock(table: string, version: number, block: number, keys: Uint32Array, values: Float32Array, n: number, dim: number): Promise<void> {
    const buf = new Uint8Array(8 + n * 8 + n * dim * 4);
    const head = new Uint32Array(buf.buffer, 0, 2);
    head[0] = n;
    head[1] = dim;
    buf.set(new Uint8Array(keys.buffer, keys.byteOffset, n * 8), 8);
    buf.set(new Uint8Array(values.buffer, values.byteOffset, n * dim * 4), 8 + n * 8);
    await this.db.put(`${versionPrefix(table, version)}${pad(block, 10)}`, buf);
  }

  /** The blocks of one version, in storage order. */
  async *readBlocks(table: string, version: number): AsyncGenerator<{ keys: Uint32Array; values: Float32Array; n: number; dim: number }> {
    const prefix = versionPrefix(table, version);
    for await (const value of this.db.values({ gte: prefix, lt: `${prefix}~` })) {
      const head = keysFromBytes(value.subarray(0, 8));
      const n = head[0]!;
      const dim = head[1]!;
      if (value.byteLength !== 8 + n * 8 + n * dim * 4) {
        throw new Error(`corrupt block in ${this.dir} for ${table} v${version}: ${value.byteLength} bytes for ${n} rows of dim ${dim}`);
      }
      yield { keys: keysFromBytes(value.subarray(8, 8 + n * 8)), values: floatsFromBytes(value.subarray(8 + n * 8)), n, dim };
    }
  }

  /** Appends a put batch to the log, synced to disk before it resolves. */
  async appendPut(rec: PutRecord): Promise<void> {
    // The high-water seq is written with the batch, so a seq is never handed out twice, even after
    // pruning emptied the tail of the log.
    await this.db.batch([
      { type: 'put', key: `p!${pad(rec.seq, 16)}`, value: encodePut(rec) },
      { type: 'put', key: 'm!putseq', value: new TextEncoder().encode(String(rec.seq)) },
    ], { sync: true });
  }

  /** The highest put seq ever handed out (0 for a new store). */
  async putSeqHighWater(): Promise<number> {
    const v = await this.db.get('m!putseq');
    return v === undefined ? 0 : Number(new TextDecoder().decode(v));
  }

  /** Put batches with seq > after, oldest first, at most `limit`. */
  /** Put batches with after < seq <= upTo, oldest first, at most `limit` batches and about `maxBytes` (at least one). */
  async readPuts(after: number, upTo: number, limit: number, maxBytes = Infinity): Promise<PutRecord[]> {
    const out: PutRecord[] = [];
    let bytes = 0;
    for await (const value of this.db.values({ gt: `p!${pad(after, 16)}`, lte: `p!${pad(upTo, 16)}`, limit })) {
      if (out.length > 0 && bytes + value.byteLength > maxBytes) break;
      out.push(decodePut(value));
      bytes += value.byteLength;
    }
    return out;
  }

  /**
   * Deletes the logged put batches of `table` written before `minOrder` (a newer full version holds
   * them); returns their `${order}:${writer}` ids.
   */
  async prunePuts(table: string, minOrder: number): Promise<string[]> {
    const removed: string[] = [];
    let batch = this.db.batch();
    for await (const [key, value] of this.db.iterator({ gte: 'p!', lt: 'p"' })) {
      const rec = decodePut(value);
      if (rec.table !== table || rec.order >= minOrder) continue;
      batch.del(key);
      removed.push(`${rec.order}:${rec.writer}`);
      if (batch.length >= 1000) {
        await batch.write();
        batch = this.db.batch();
      }
    }
    if (batch.length > 0) await batch.write();
    else await batch.close();
    return removed;
  }

  async dropVersionRows(table: string, version: number): Promise<void> {
    const prefix = versionPrefix(table, version);
    await this.db.clear({ gte: prefix, lt: `${prefix}~` });
  }
}

/** [header length u32][msgpack {seq, table, order, writer, n}][pad to 8][keys][values] */
function encodePut(rec: PutRecord): Uint8Array {
  const head = pack({ seq: rec.seq, table: rec.table, order: rec.order, writer: rec.writer, n: rec.keys.length / 2 });
  const body = 4 + head.length;
  const off = Math.ceil(body / 8) * 8;
  const buf = new Uint8Array(off + rec.keys.byteLength + rec.values.byteLength);
  new DataView(buf.buffer).setUint32(0, head.length, true);
  buf.set(head, 4);
  buf.set(new Uint8Array(rec.keys.buffer, rec.keys.byteOffset, rec.keys.byteLength), off);
  buf.set(new Uint8Array(rec.values.buffer, rec.values.byteOffset, rec.values.byteLength), off + rec.keys.byteLength);
  return buf;
}

function decodePut(value: Uint8Array): PutRecord {
  const len = new DataView(value.buffer, value.byteOffset, 4).getUint32(0, true);
  const head = unpack(value.subarray(4, 4 + len)) as { seq: number; table: string; order: number; writer: string; n: number };
  const off = Math.ceil((4 + len) / 8) * 8;
  const keys = keysFromBytes(value.subarray(off, off + head.n * 8));
  const values = floatsFromBytes(value.subarray(off + head.n * 8));
  return { seq: head.seq, table: head.table, order: head.order, writer: head.writer, keys, values };
}
