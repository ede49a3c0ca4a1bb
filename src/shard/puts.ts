import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { firstNonFinite, keyAt } from '../common/keys.js';
import { MAX_PUT_KEYS } from '../common/limits.js';
import { checkTableName } from '../common/validate.js';
import { Overlay } from './overlay.js';
import type { PutLog, PutRecord } from './put-log.js';
import type { TableState } from './tables.js';

/** Memory that real-time updates of one table may hold on a replica before puts are refused. */
export const DEFAULT_MAX_REALTIME_BYTES = 512 * 1024 * 1024;
/** A catch-up answer carries about this much at most (the wire's message limit is 512 MiB). */
const MAX_PULL_BYTES = 64 * 1024 * 1024;

/** Put: a real-time batch for the table's current version. */
export interface PutRequest {
  table: string;
  keys: Uint32Array;
  values: Float32Array;
  /** The write order (ms since the epoch times ORDER_SCALE); the highest wins a key. */
  order: number;
  writer: string;
  /** For a batch caught up from a peer: how late it arrived. */
  lagMs?: number;
}

/**
 * Real-time puts of one replica: the put log on disk, the batches it holds (so a batch arriving
 * twice is applied once), and each table's overlay they land in.
 */
export class RealtimePuts {
  /** Put batches in the log, by `${order}:${writer}`. */
  private readonly seen = new Set<string>();
  /** Seqs handed out whose log write has not finished. */
  private readonly writing = new Set<number>();
  /** Batches being written, by id, so a second copy waits for the first. */
  private readonly inFlight = new Map<string, Promise<number>>();
  private seq = 0;

  constructor(private readonly log: PutLog, private readonly tables: Map<string, TableState>, private readonly maxRealtimeBytes: number) {}

  /** The newest put log position. */
  get lastSeq(): number {
    return this.seq;
  }

  /** Replays the put log over the restored versions. */
  async replay(): Promise<void> {
    this.seq = await this.log.highWater();
    for (let after = 0; ;) {
      const recs = await this.log.read(after, Number.MAX_SAFE_INTEGER, 1024);
      if (recs.length === 0) break;
      for (const rec of recs) {
        this.seq = Math.max(this.seq, rec.seq);
        this.seen.add(`${rec.order}:${rec.writer}`);
        const t = this.tables.get(rec.table);
        if (t !== undefined) applyPut(t, rec.keys, rec.values, rec.order);
        after = rec.seq;
      }
    }
  }

  /**
   * A real-time batch for the table's current version: validated, appended to the put log with a
   * disk sync, then applied in one step. A batch already logged (same order and writer) is not
   * applied twice.
   */
  async put(req: PutRequest): Promise<number> {
    const { table, keys, values, order, writer, lagMs = 0 } = req;
    checkTableName(table);
    const t = this.tables.get(table);
    if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
    const cur = t.versions.get(t.current);
    if (cur === undefined) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} has no published version to update`);
    const n = keys.length / 2;
    const dim = cur.data.dim;
    if (n === 0) throw invalidArgument('a put needs at least one key');
    if (n > MAX_PUT_KEYS) throw invalidArgument(`a put batch holds ${n} keys; at most ${MAX_PUT_KEYS}`);
    if (values.length !== n * dim) throw invalidArgument(`${n} keys need ${n * dim} floats (dim ${dim} of ${table} v${t.current}), got ${values.length}`);
    if (!Number.isSafeInteger(order) || order <= 0) throw invalidArgument(`order must be a positive integer, got ${order}`);
    if (typeof writer !== 'string' || writer.length === 0 || writer.length > 128) throw invalidArgument('writer must be a non-empty string');
    const bad = firstNonFinite(values);
    if (bad >= 0) throw invalidArgument(`values[${bad}] (key ${keyAt(keys, Math.floor(bad / dim))}) is ${values[bad]}; vectors must be finite`);
    const id = `${order}:${writer}`;
    // The same batch again (a retry, or from a peer): answer when the first copy is on disk.
    const writing = this.inFlight.get(id);
    if (writing !== undefined) return writing;
    if (this.seen.has(id)) return this.seq;
    // Written before the current full version's load began: that version holds newer data.
    if (order < t.putsFrom) return this.seq;
    if ((t.overlay?.bytesWith(n) ?? 0) > this.maxRealtimeBytes) {
      throw new KvError(KvErrorCode.RESOURCE_EXHAUSTED, `table ${table}: real-time updates hold ${t.overlay!.bytes} bytes, the limit is ${this.maxRealtimeBytes}; load a new version`);
    }
    this.seen.add(id);
    const seq = ++this.seq;
    const rec: PutRecord = { seq, table, order, writer, keys, values };
    this.writing.add(seq);
    const write = this.log.append(rec).then(() => seq);
    this.inFlight.set(id, write);
    try {
      await write;
    } catch (err) {
      this.seen.delete(id);
      throw new KvError(KvErrorCode.INTERNAL, `writing the put to disk failed: ${(err as Error).message}`, { cause: err });
    } finally {
      this.writing.delete(seq);
      this.inFlight.delete(id);
    }
    // Re-read: a publish may have changed the current version while the log was written.
    applyPut(t, keys, values, order);
    if (lagMs > 0) t.realtimeLagMs = lagMs;
    return seq;
  }

  /** Logged put batches after `after`, for a peer catching up. */
  async since(after: number, limit: number): Promise<{ batches: PutRecord[]; last: number }> {
    // Only up to the durable watermark: a batch whose write is still under way may end below one
    // already on disk, and a peer that moved its cursor past it would never pull it.
    let durable = this.seq;
    for (const s of this.writing) durable = Math.min(durable, s - 1);
    const batches = await this.log.read(after, durable, Math.min(Math.max(limit, 1), 1024), MAX_PULL_BYTES);
    return { batches, last: durable };
  }

  /** Whether this replica has the batch (order, writer) on disk. */
  has(order: number, writer: string): boolean {
    const id = `${order}:${writer}`;
    return this.seen.has(id) && !this.inFlight.has(id);
  }

  /**
   * Drops the logged batches of `table` written before `minOrder` (a newer full version holds
   * them); returns how many.
   */
  async prune(table: string, minOrder: number): Promise<number> {
    const gone = await this.log.prune(table, minOrder);
    for (const id of gone) this.seen.delete(id);
    return gone.length;
  }
}

/** Applies a logged batch to the table's overlay, unless the current version supersedes it. */
function applyPut(t: TableState, keys: Uint32Array, values: Float32Array, order: number): void {
  if (order < t.putsFrom) return;
  const cur = t.versions.get(t.current);
  if (cur === undefined) return;
  const dim = cur.data.dim;
  if (values.length !== (keys.length / 2) * dim) return; // written for another dim: superseded
  if (t.overlay === undefined || t.overlay.dim !== dim) t.overlay = new Overlay(dim);
  t.overlay.put(keys, values, keys.length / 2, order);
  t.realtimeBatches++;
  if (order > t.lastPutOrder) t.lastPutOrder = order;
}
