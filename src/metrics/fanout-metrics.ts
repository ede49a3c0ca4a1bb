import type { RequestCounters, TableCounters } from '../common/request-counters.js';
import type { FanoutStats } from '../fanout/stats.js';
import type { Labels, MetricSet, Sample } from './registry.js';

/** What the SDK's and the router's series are read from (a Fanout). */
export interface FanoutMetricsSource {
  readonly lookups: TableCounters;
  readonly puts: TableCounters;
  stats(): FanoutStats;
}

/** Snapshots are taken once per scrape (every collector of a scrape runs within this). */
const SNAPSHOT_REUSE_MS = 100;

/**
 * The fan-out's series, the same in the SDK and `kvctl router`: per table lookups, keys, latency and
 * errors (and puts, in the SDK), per shard group hedges and retries, per replica the health this
 * client sees. Labels: table (at most MAX_TABLE_LABELS), code (a KvError code), group, replica.
 */
export function registerFanoutMetrics(set: MetricSet, source: FanoutMetricsSource): void {
  let snap: FanoutStats | undefined;
  let snapAt = 0;
  const stats = (): FanoutStats => {
    const now = Date.now();
    if (snap === undefined || now - snapAt > SNAPSHOT_REUSE_MS) {
      snap = source.stats();
      snapAt = now;
    }
    return snap;
  };
  const perTable = (counters: TableCounters, f: (c: RequestCounters) => number) => function* (): Iterable<Sample> {
    for (const [table, c] of counters.entries()) yield [{ table }, f(c)];
  };
  const errors = (counters: TableCounters) => function* (): Iterable<Sample> {
    for (const [table, c] of counters.entries()) for (const [code, n] of c.errors) yield [{ table, code }, n];
  };
  const buckets = (counters: TableCounters) => function* (): Iterable<readonly [Labels, RequestCounters['seconds']]> {
    for (const [table, c] of counters.entries()) yield [{ table }, c.seconds];
  };
  const perGroup = (f: (g: FanoutStats['groups'][number]) => number) => function* (): Iterable<Sample> {
    for (const g of stats().groups) yield [{ group: g.group }, f(g)];
  };
  const perReplica = (f: (r: FanoutStats['groups'][number]['replicas'][number]) => number) => function* (): Iterable<Sample> {
    for (const g of stats().groups) for (const r of g.replicas) yield [{ group: g.group, replica: r.replica }, f(r)];
  };

  set.counter('embkv_lookups_total', 'Lookup requests (getEmbeddings calls, or router calls), per table.', ['table'], perTable(source.lookups, (c) => c.requests));
  set.counter('embkv_lookup_keys_total', 'Keys named by lookup requests, per table.', ['table'], perTable(source.lookups, (c) => c.keys));
  set.counter('embkv_lookup_errors_total', 'Lookup requests that failed, per table and KvError code.', ['table', 'code'], errors(source.lookups));
  set.histogram('embkv_lookup_duration_seconds', 'Latency of answered lookup requests, every shard group together, per table.', buckets(source.lookups));
  set.counter('embkv_puts_total', 'Real-time put calls (putEmbeddings), per table.', ['table'], perTable(source.puts, (c) => c.requests));
  set.counter('embkv_put_keys_total', 'Keys written by real-time puts, per table.', ['table'], perTable(source.puts, (c) => c.keys));
  set.counter('embkv_put_errors_total', 'Real-time puts that failed, per table and KvError code.', ['table', 'code'], errors(source.puts));
  set.histogram('embkv_put_duration_seconds', 'Latency of acknowledged real-time puts, per table.', buckets(source.puts));

  set.counter('embkv_group_requests_total', 'Sub-requests sent to a shard group (one per request that has keys of the group).', ['group'], perGroup((g) => g.requests));
  set.counter('embkv_group_failures_total', 'Sub-requests that failed (no replica could answer, deadline, refused).', ['group'], perGroup((g) => g.failures));
  set.counter('embkv_hedges_sent_total', 'Backup requests sent to another replica after the hedge delay.', ['group'], perGroup((g) => g.hedgesSent));
  set.counter('embkv_hedges_won_total', 'Backup requests that answered first.', ['group'], perGroup((g) => g.hedgesWon));
  set.counter('embkv_hedges_throttled_total', 'Backup requests wanted but refused by the group\'s hedge token bucket.', ['group'], perGroup((g) => g.hedgesThrottled));
  set.counter('embkv_retries_total', 'Attempts sent at once to another replica after an attempt failed.', ['group'], perGroup((g) => g.retries));
  set.gauge('embkv_hedge_delay_seconds', 'The hedge delay the group\'s latest sub-request used (its recent p95 for that size).', ['group'],
    function* () {
      for (const g of stats().groups) if (Number.isFinite(g.hedgeDelayMs)) yield [{ group: g.group }, g.hedgeDelayMs / 1000];
    });
  set.gauge('embkv_hedge_tokens', 'Tokens in the group\'s hedge bucket now.', ['group'], perGroup((g) => g.hedgeTokens));
  set.gauge('embkv_replica_up', '1 while this client takes the replica as healthy, 0 after a failure until it answers a health probe.', ['group', 'replica'],
    perReplica((r) => (r.health === 'up' ? 1 : 0)));
  set.gauge('embkv_replica_avoided', '1 while the replica is passed over after losing to a hedge (stalled or slow).', ['group', 'replica'], perReplica((r) => (r.avoidedForMs > 0 ? 1 : 0)));
  set.gauge('embkv_replica_outstanding', 'Attempts in flight to the replica now.', ['group', 'replica'], perReplica((r) => r.outstanding));
  set.counter('embkv_replica_attempts_total', 'Attempts sent to the replica (first tries, hedges and retries).', ['group', 'replica'], perReplica((r) => r.attempts));
  set.counter('embkv_replica_failures_total', 'Attempts to the replica that failed.', ['group', 'replica'], perReplica((r) => r.failures));
}
