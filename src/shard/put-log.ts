import type { ClassicLevel } from 'classic-level';
import { pack, unpack } from 'msgpackr';
import { floatsFromBytes, keysFromBytes } from '../common/keys.js';

/** A real-time put batch as logged. */
export interface PutRecord {
  seq: number;
  table: string;
  order: number;
  writer: string;
  keys: Uint32Array;
  values: Float32Array;
}

const pad = (n: number, width: number): string => String(n).padStart(width, '0');

/**
 * The real-time put log, in the replica's LevelDB (store.ts):
 *
 *   p!<seq:16 digits>   -> a put batch (see encodePut)
 *   m!putseq            -> the highest seq ever handed out
 */
export class PutLog {
  constructor(private readonly db: ClassicLevel<string, Uint8Array>) {}

  /** Appends a put batch to the log, synced to disk before it resolves. */
  async append(rec: PutRecord): Promise<void> {
    // The high-water seq is written with the batch, so a seq is never handed out twice, even after
    // pruning emptied the tail of the log.
    await this.db.batch([
      { type: 'put', key: `p!${pad(rec.seq, 16)}`, value: encodePut(rec) },
      { type: 'put', key: 'm!putseq', value: new TextEncoder().encode(String(rec.seq)) },
    ], { sync: true });
  }

  /** The highest put seq ever handed out (0 for a new store). */
  async highWater(): Promise<number> {
    const v = await this.db.get('m!putseq');
    return v === undefined ? 0 : Number(new TextDecoder().decode(v));
  }

  /** Put batches with after < seq <= upTo, oldest first, at most `limit` batches and about `maxBytes` (at least one). */
  async read(after: number, upTo: number, limit: number, maxBytes = Infinity): Promise<PutRecord[]> {
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
  async prune(table: string, minOrder: number): Promise<string[]> {
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
