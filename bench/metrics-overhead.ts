/**
 * What Prometheus metrics cost: the accounting a lookup does on its path (per request, never per
 * key: a table's counters found by name, two clock reads, three additions, a latency bucket), and
 * what a scrape costs the process (rendering every series of a router-sized fan-out or a replica).
 *
 *   node dist/bench/metrics-overhead.js [--requests 2000000] [--tables 20] [--groups 8] [--replicas 2] [--scrapes 200]
 *
 * The per-request figure is the median of 7 rounds of --requests iterations of exactly what
 * Fanout.lookup adds (src/fanout/fanout.ts), against a 150k-key request's 45-60 ms.
 */
import { parseArgs } from 'node:util';
import { TableCounters } from '../src/common/request-counters.js';
import { MetricSet, newRegistry } from '../src/metrics/registry.js';
import { registerFanoutMetrics } from '../src/metrics/fanout-metrics.js';
import { registerReplicaMetrics, type TableGaugeInfo } from '../src/metrics/replica-metrics.js';
import type { FanoutStats } from '../src/fanout/stats.js';

const { values: a } = parseArgs({
  options: {
    requests: { type: 'string', default: '2000000' },
    tables: { type: 'string', default: '20' },
    groups: { type: 'string', default: '8' },
    replicas: { type: 'string', default: '2' },
    scrapes: { type: 'string', default: '200' },
  },
});
const requests = Number(a.requests);
const tableCount = Number(a.tables);
const groups = Number(a.groups);
const replicas = Number(a.replicas);
const scrapes = Number(a.scrapes);
const tables = Array.from({ length: tableCount }, (_, i) => `table_${i}`);
const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[xs.length >> 1]!;

// 1. The lookup path's accounting, as Fanout.lookup does it.
const counters = new TableCounters();
let sink = 0;
const perRequestNs: number[] = [];
for (let round = 0; round < 7; round++) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < requests; i++) {
    const t = performance.now();
    const c = counters.of(tables[i % tableCount]!);
    c.requests++;
    c.keys += 150_000;
    c.seconds.observe((performance.now() - t) / 1000 + 0.05);
  }
  perRequestNs.push(Number(process.hrtime.bigint() - t0) / requests);
}
// The same loop without the accounting or its clock reads.
const baseNs: number[] = [];
for (let round = 0; round < 7; round++) {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < requests; i++) {
    sink += tables[i % tableCount]!.length;
  }
  baseNs.push(Number(process.hrtime.bigint() - t0) / requests);
}

// 2. A scrape of a router-sized fan-out (tables x groups x replicas) and of a replica.
const stats: FanoutStats = {
  requests: 1, failures: 0, latencyMs: { p50: 1, p95: 1, p99: 1, samples: 1 },
  groups: Array.from({ length: groups }, (_, g) => ({
    group: g, requests: 1000, hedgesSent: 10, hedgesWon: 5, hedgesThrottled: 1, retries: 1, failures: 0,
    latencyMs: { p50: 1, p95: 1, p99: 1, samples: 1 }, hedgeDelayMs: 12, hedgeTokens: 10,
    replicas: Array.from({ length: replicas }, (_, r) => ({
      replica: r, address: `10.0.${g}.${r}:7100`, health: 'up' as const, avoidedForMs: 0, outstanding: 0, attempts: 500, answers: 500, failures: 0, ewmaMs: 3, lastError: undefined,
    })),
  })),
};
for (const t of tables) counters.of(t).error('KV_DEADLINE_EXCEEDED');
const router = newRegistry({ process: true });
registerFanoutMetrics(new MetricSet(router), { lookups: counters, puts: counters, stats: () => stats });
const tableInfo: TableGaugeInfo[] = tables.map((name) => ({
  name, currentVersion: 3, realtimeKeys: 100, realtimeBatches: 10, lastPutAtMs: Date.now(), realtimeLagMs: 4,
  versions: [2, 3].map((version) => ({ version, keys: 1e6, bytes: 1.5e8, state: 'sealed' as const })),
}));
const replica = newRegistry({ process: true });
registerReplicaMetrics(new MetricSet(replica), {
  lookups: counters, lookupErrors: new Map([['KV_UNAVAILABLE', 3]]), serving: () => true, tables: () => tableInfo, answerBytesInFlight: () => 0,
});
const scrape = async (registry: typeof router): Promise<{ ms: number; bytes: number; series: number }> => {
  const ms: number[] = [];
  let text = '';
  for (let i = 0; i < scrapes; i++) {
    const t0 = performance.now();
    text = await registry.metrics();
    ms.push(performance.now() - t0);
  }
  return { ms: median(ms), bytes: text.length, series: text.split('\n').filter((l) => l !== '' && !l.startsWith('#')).length };
};
const r = await scrape(router);
const p = await scrape(replica);
const acct = median(perRequestNs) - median(baseNs);
process.stdout.write([
  `lookup path: ${median(perRequestNs).toFixed(1)} ns per request with the accounting (its two clock reads included), ${median(baseNs).toFixed(1)} ns for the bare loop: ${acct.toFixed(1)} ns added (${tableCount} tables; ${(acct / 45e6 * 100).toExponential(1)} % of a 45 ms request)`,
  `scrape, fan-out (SDK/router) with ${tableCount} tables, ${groups} groups x ${replicas} replicas: median ${r.ms.toFixed(2)} ms, ${r.series} series, ${(r.bytes / 1024).toFixed(1)} KiB`,
  `scrape, replica with ${tableCount} tables x 2 versions: median ${p.ms.toFixed(2)} ms, ${p.series} series, ${(p.bytes / 1024).toFixed(1)} KiB`,
  `(sink ${sink > 0 ? 'ok' : 'zero'})`,
].join('\n') + '\n');
