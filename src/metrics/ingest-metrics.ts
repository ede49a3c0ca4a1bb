import type { Counter, Gauge } from 'prom-client';
import type { MetricSet } from './registry.js';

/**
 * `kvctl ingest --metrics-port`: the Kafka ingester's series, set by the ingester as it goes.
 * Labels: table, topic, partition (the topic's partitions), code (a KvError code).
 */
export class IngestMetrics {
  private readonly lagMessages: Gauge;
  private readonly lagSeconds: Gauge;
  private readonly batches: Counter;
  private readonly keys: Counter;
  private readonly errors: Counter;

  constructor(set: MetricSet, private readonly table: string) {
    this.lagMessages = set.settableGauge('embkv_ingest_lag_messages', 'Messages of the partition not yet applied: the high watermark less the next offset to apply.', ['table', 'topic', 'partition']);
    this.lagSeconds = set.settableGauge('embkv_ingest_lag_seconds', 'Age of the latest message applied, from its Kafka timestamp.', ['table', 'topic', 'partition']);
    this.batches = set.settableCounter('embkv_ingest_batches_total', 'EKV1 batches applied as real-time puts.', ['table']);
    this.keys = set.settableCounter('embkv_ingest_keys_total', 'Keys applied from Kafka.', ['table']);
    this.errors = set.settableCounter('embkv_ingest_errors_total', 'Messages or puts that failed, by KvError code.', ['table', 'code']);
  }

  /** After each fetch or commit: how far the group is behind on one partition. */
  setLag(topic: string, partition: number, messages: number, seconds?: number): void {
    this.lagMessages.set({ table: this.table, topic, partition }, messages);
    if (seconds !== undefined) this.lagSeconds.set({ table: this.table, topic, partition }, seconds);
  }

  /** A partition no longer assigned to this ingester (a rebalance): its series go. */
  dropPartition(topic: string, partition: number): void {
    this.lagMessages.remove({ table: this.table, topic, partition });
    this.lagSeconds.remove({ table: this.table, topic, partition });
  }

  onBatch(keys: number): void {
    this.batches.inc({ table: this.table });
    this.keys.inc({ table: this.table }, keys);
  }

  onError(code: string): void {
    this.errors.inc({ table: this.table, code });
  }
}
