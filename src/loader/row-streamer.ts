/**
 * Streams a planned dump's rows to the groups: each row is copied into its group's batch, and a full
 * batch goes to every replica of the group, over gRPC (LoadRows) or, for a staged group, as a block of
 * its staged file that the replicas are then told to read (LoadRowsFrom).
 */
import { KvError, KvErrorCode } from '../common/errors.js';
import type { ClusterConnections } from '../cluster/connections.js';
import { assignGroups, groupTable } from '../cluster/partition.js';
import { encodeLoadRowsRequest } from '../wire/load-rows.js';
import { Batch, RowOrigins, explainRowError, placeRows } from './batch.js';
import { call } from './cluster-ops.js';
import { readDump, type DumpPlan, type RowChunk } from './sources.js';
import { appendBlock, explainStagedError, syncInBackground, type Stage, type WrittenBlock } from './stage.js';

export interface RowStreamerOptions {
  plan: DumpPlan;
  conns: ClusterConnections;
  table: string;
  version: number;
  loadId: string;
  rowsPerBatch: number;
  /** LoadRows calls (or staged writes) in flight per group. */
  inflight: number;
  incremental: boolean;
  /** Bytes of staged blocks named to the replicas in one LoadRowsFrom. */
  stageRangeBytes: number;
  /** Once the write versions are open: per group, its staged file, or undefined for rows over gRPC. */
  opened: Promise<(Stage | undefined)[]>;
  onProgress: ((rows: number, total: number) => void) | undefined;
  signal: AbortSignal | undefined;
}

/** One pass over a dump; run() once. Counts what each group acknowledged. */
export class RowStreamer {
  /** Upserts and deletes each group has acknowledged. */
  readonly rowsPerGroup: number[];
  readonly deletesPerGroup: number[];
  private readonly o: RowStreamerOptions;
  private readonly dim: number;
  /** Per group: the batch being filled. */
  private readonly batches: Batch[];
  /**
   * Per group: batches ready for reuse, acknowledged or staged and written (at most inflight + 1 per
   * group exist).
   */
  private readonly spare: Batch[][];
  /** Per group: its writes and calls in flight. */
  private readonly pending: Set<Promise<void>>[];
  /** Per group: staged blocks not yet named to the replicas. */
  private readonly unnamed: WrittenBlock[][];
  private readonly spareOrigins: RowOrigins[] = [];
  /** The first failure of work in flight; it stops the load. */
  private failure: unknown;
  /** Rows and deletes acknowledged so far, for onProgress. */
  private sent = 0;

  constructor(options: RowStreamerOptions) {
    this.o = options;
    this.dim = options.plan.dim;
    const G = options.conns.manifest.groups.length;
    this.rowsPerGroup = new Array<number>(G).fill(0);
    this.deletesPerGroup = new Array<number>(G).fill(0);
    this.spare = Array.from({ length: G }, () => []);
    this.batches = Array.from({ length: G }, (_, g) => this.newBatch(g));
    this.pending = Array.from({ length: G }, () => new Set());
    this.unnamed = Array.from({ length: G }, () => []);
  }

  async run(): Promise<void> {
    const { plan, conns, incremental } = this.o;
    const { manifest } = conns;
    const G = manifest.groups.length;
    const batches = this.batches;
    const groupOfPartition = groupTable(manifest.partitions, G);
    let groupOf = new Uint16Array(0);
    const counts = new Uint32Array(G);
    // Rows are copied into batches at once, so the reader may reuse its buffers.
    for await (const item of readDump(plan, { signal: this.o.signal, reuseBuffers: true })) {
      if (this.failure !== undefined) break;
      if (item.type === 'deletes') {
        if (!incremental) throw new KvError(KvErrorCode.INVALID_DATA, `${item.chunk.file}: deletes are only allowed in an incremental load`);
        const chunk = item.chunk;
        if (groupOf.length < chunk.n) groupOf = new Uint16Array(chunk.n);
        assignGroups(chunk.keys, chunk.n, manifest.partitions, groupOfPartition, groupOf, counts);
        for (let i = 0; i < chunk.n; i++) {
          const g = groupOf[i]!;
          const b = batches[g]!;
          const at = b.nd;
          b.deletes[2 * at] = chunk.keys[2 * i]!;
          b.deletes[2 * at + 1] = chunk.keys[2 * i + 1]!;
          b.origins.from(b.size + at, chunk, i);
          b.nd = at + 1;
          if (b.full) await this.flush(g);
        }
        continue;
      }
      const chunk: RowChunk = item.chunk;
      if (groupOf.length < chunk.n) groupOf = new Uint16Array(chunk.n);
      assignGroups(chunk.keys, chunk.n, manifest.partitions, groupOfPartition, groupOf, counts);
      // Rows are placed by a plain function that stops when a batch fills: V8 optimises it at once,
      // where this async loop body ran long in baseline code.
      for (let i = 0; i < chunk.n;) {
        i = placeRows(chunk, i, groupOf, batches, this.dim);
        const g = groupOf[i - 1]!;
        if (batches[g]!.full) await this.flush(g);
      }
    }
    for (let g = 0; g < G; g++) {
      if (this.failure === undefined) await this.flush(g);
      this.nameRange(g);
    }
    await Promise.all(this.pending.flatMap((s) => [...s]));
    if (this.failure !== undefined) throw this.failure;
  }

  private newBatch(g: number): Batch {
    const { rowsPerBatch: size, table, version, loadId, incremental: withDeletes } = this.o;
    return this.spare[g]!.pop() ?? new Batch({ size, dim: this.dim, table, version, loadId, withDeletes });
  }

  /** Tracks a group's write or call in flight; its failure stops the load. */
  private track(g: number, work: Promise<void>): void {
    const set = this.pending[g]!;
    const p: Promise<void> = work.then(
      () => void set.delete(p),
      (err: unknown) => {
        set.delete(p);
        this.failure ??= err;
      },
    );
    set.add(p);
  }

  private acknowledged(g: number, rows: number, deletes: number): void {
    this.rowsPerGroup[g]! += rows;
    this.deletesPerGroup[g]! += deletes;
    this.sent += rows + deletes;
    this.o.onProgress?.(this.sent, this.o.plan.totalRows);
  }

  /** Sends the group's full batch (or its last) to every replica of the group, over gRPC. */
  private async send(g: number, b: Batch): Promise<void> {
    const { table, version, loadId } = this.o;
    try {
      // A full batch of upserts goes as laid out; anything else (the last batch of a group, a
      // delta's deletes) is encoded to its size.
      const req = b.n === b.size && b.nd === 0 ? b.msg.buf : encodeLoadRowsRequest({
        table, version, loadId, keys: b.keyBytes(), values: b.valueBytes(),
        deletes: new Uint8Array(b.deletes.buffer, b.deletes.byteOffset, b.nd * 8),
      });
      await Promise.all(this.o.conns.groups[g]!.map((c) => call(c, 'LoadRows', req, 120_000)));
    } catch (err) {
      throw explainRowError(err, b, this.o.incremental ? 'delta' : 'load');
    }
    this.acknowledged(g, b.n, b.nd);
    b.reset();
    this.spare[g]!.push(b);
  }

  /**
   * Staged groups (full loads only, so no deletes): each batch becomes a block of the group's file,
   * and its buffers are reused once written. Written blocks are named to the replicas a range of
   * stageRangeBytes at a time: one call for several blocks.
   */
  private stage(g: number, st: Stage, b: Batch): void {
    const { at, bytes, written: block } = appendBlock(st, b);
    const written = block.then(() => {
      syncInBackground(st);
      b.reset();
      this.spare[g]!.push(b);
    });
    this.unnamed[g]!.push({ at, bytes, n: b.n, origins: b.origins, written });
    b.origins = this.spareOrigins.pop() ?? new RowOrigins(b.size, b.withDeletes);
    this.track(g, written);
    if (at + bytes - this.unnamed[g]![0]!.at >= this.o.stageRangeBytes) this.nameRange(g);
  }

  /** Tells the group's replicas to read the blocks written since the last range. */
  private nameRange(g: number): void {
    const blocks = this.unnamed[g]!;
    if (blocks.length === 0) return;
    this.unnamed[g] = [];
    const { table, version, loadId } = this.o;
    const at = blocks[0]!.at;
    const last = blocks[blocks.length - 1]!;
    const bytes = last.at + last.bytes - at;
    this.track(g, (async () => {
      await Promise.all(blocks.map((x) => x.written));
      try {
        await Promise.all(this.o.conns.groups[g]!.map((c) => call(c, 'LoadRowsFrom', { table, version, loadId, at, bytes }, 120_000)));
      } catch (err) {
        throw explainStagedError(err, blocks);
      }
      let rows = 0;
      for (const x of blocks) {
        rows += x.n;
        x.origins.reset();
        this.spareOrigins.push(x.origins);
      }
      this.acknowledged(g, rows, 0);
    })());
  }

  /** Sends or stages the group's batch, once fewer than `inflight` of its own are in flight. */
  private async flush(g: number): Promise<void> {
    const b = this.batches[g]!;
    if (b.n === 0 && b.nd === 0) return;
    const set = this.pending[g]!;
    while (set.size >= this.o.inflight) await Promise.race(set);
    if (this.failure !== undefined) throw this.failure;
    this.batches[g] = this.newBatch(g);
    const st = (await this.o.opened)[g];
    if (st !== undefined) this.stage(g, st, b);
    else this.track(g, this.send(g, b));
  }
}
