import type { LatencyBuckets, TableCounters } from '../common/request-counters.js';
import type { Labels, MetricSet, Sample } from './registry.js';

/** A version as a replica's Status tells it (see src/shard/status.ts). */
export interface VersionGaugeInfo {
  version: number;
  keys: number;
  bytes: number;
  state: 'loading' | 'sealed';
}

export interface TableGaugeInfo {
  name: string;
  currentVersion: number;
  versions: VersionGaugeInfo[];
  realtimeKeys: number;
  realtimeBatches: number;
  lastPutAtMs: number;
  realtimeLagMs: number;
}

/** What a replica's series are read from (a ReplicaServer). */
export interface ReplicaMetricsSource {
  /** Lookups answered, per table (tables that exist only: a refused name is not a label). */
  readonly lookups: TableCounters;
  /** Lookups refused, by KvError code. */
  readonly lookupErrors: Map<string, number>;
  /** True while grpc.health.v1 says SERVING. */
  serving(): boolean;
  tables(): TableGaugeInfo[];
  /** Bytes of answers handed to gRPC and not yet sent. */
  answerBytesInFlight(): number;
}

/**
 * A replica's series (`kvctl serve --metrics-port`). Its process registry carries `group` and
 * `replica` as default labels, so these need no labels of their own beyond the table's.
 */
export function registerReplicaMetrics(set: MetricSet, source: ReplicaMetricsSource): void {
  let snap: TableGaugeInfo[] | undefined;
  let snapAt = 0;
  const tables = (): TableGaugeInfo[] => {
    const now = Date.now();
    if (snap === undefined || now - snapAt > 100) {
      snap = source.tables();
      snapAt = now;
    }
    return snap;
  };
  const perTable = (f: (t: TableGaugeInfo) => number | undefined) => function* (): Iterable<Sample> {
    for (const t of tables()) {
      const v = f(t);
      if (v !== undefined) yield [{ table: t.name }, v];
    }
  };
  const perVersion = (f: (v: VersionGaugeInfo) => number) => function* (): Iterable<Sample> {
    for (const t of tables()) for (const v of t.versions) yield [{ table: t.name, version: v.version, state: v.state }, f(v)];
  };

  set.gauge('embkv_replica_serving', '1 while the replica answers lookups (grpc.health.v1 SERVING), 0 while it restores, catches up or stops.', [],
    () => [[{}, source.serving() ? 1 : 0]]);
  set.counter('embkv_replica_lookups_total', 'Lookup sub-requests this replica answered, per table.', ['table'],
    function* () {
      for (const [table, c] of source.lookups.entries()) yield [{ table }, c.requests];
    });
  set.counter('embkv_replica_lookup_keys_total', 'Keys in the lookup sub-requests this replica answered, per table.', ['table'],
    function* () {
      for (const [table, c] of source.lookups.entries()) yield [{ table }, c.keys];
    });
  set.histogram('embkv_replica_lookup_duration_seconds', 'Time this replica took to look up a sub-request\'s keys, per table.',
    function* (): Iterable<readonly [Labels, LatencyBuckets]> {
      for (const [table, c] of source.lookups.entries()) yield [{ table }, c.seconds];
    });
  set.counter('embkv_replica_lookup_errors_total', 'Lookup sub-requests this replica refused, by KvError code.', ['code'],
    function* () {
      for (const [code, n] of source.lookupErrors) yield [{ code }, n];
    });
  set.gauge('embkv_replica_answer_bytes_in_flight', 'Bytes of lookup answers handed to gRPC and not yet sent.', [], () => [[{}, source.answerBytesInFlight()]]);
  set.gauge('embkv_table_current_version', 'The version of the table this replica serves by default (0: none published).', ['table'], perTable((t) => t.currentVersion));
  set.gauge('embkv_version_keys', 'Keys a version holds (a version being loaded: rows received so far).', ['table', 'version', 'state'], perVersion((v) => v.keys));
  set.gauge('embkv_version_memory_bytes', 'Memory a version holds of its own: index and vectors.', ['table', 'version', 'state'], perVersion((v) => v.bytes));
  set.gauge('embkv_load_rows', 'Rows a load under way has brought to this replica so far (load progress).', ['table', 'version'],
    function* () {
      for (const t of tables()) for (const v of t.versions) if (v.state === 'loading') yield [{ table: t.name, version: v.version }, v.keys];
    });
  set.gauge('embkv_realtime_keys', 'Keys real-time puts have written over the current version.', ['table'], perTable((t) => t.realtimeKeys));
  set.gauge('embkv_realtime_batches', 'Real-time put batches applied over the current version.', ['table'], perTable((t) => t.realtimeBatches));
  set.gauge('embkv_realtime_lag_seconds', 'How long the latest real-time put took from its writer to this replica.', ['table'], perTable((t) => t.realtimeLagMs / 1000));
  set.gauge('embkv_last_put_timestamp_seconds', 'Writer\'s time of the latest real-time put applied (0: none).', ['table'], perTable((t) => t.lastPutAtMs / 1000));
}
