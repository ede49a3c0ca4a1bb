/**
 * The only file besides src/metrics/*.ts that knows prom-client: metrics whose values are read from
 * embkv's own counters when Prometheus scrapes, so nothing on a request path calls into prom-client.
 */
import { createRequire } from 'node:module';
import type { Counter, Gauge, Metric, Registry } from 'prom-client';
import { echo, invalidArgument } from '../common/errors.js';
import { LATENCY_BUCKETS_SECONDS, type LatencyBuckets } from '../common/request-counters.js';

export type { Registry } from 'prom-client';

// Loaded on first use: an SDK process without metrics does not load prom-client at all.
let promClient: typeof import('prom-client') | undefined;
const prom = (): typeof import('prom-client') => (promClient ??= createRequire(import.meta.url)('prom-client') as typeof import('prom-client'));

export type Labels = Record<string, string | number>;
/** One series: its labels and its value. */
export type Sample = readonly [labels: Labels, value: number];

/** A new registry, with the process's own series (rss, heap, GC, event loop lag) under their standard names when `process`. */
export function newRegistry(options: { process?: boolean } = {}): Registry {
  const registry = new (prom().Registry)();
  if (options.process === true) prom().collectDefaultMetrics({ register: registry });
  return registry;
}

/**
 * The names registered by one embkv component in a registry it may share with its host (the SDK's
 * client), so that it can take them out again when it closes.
 */
export class MetricSet {
  private readonly names: string[] = [];

  constructor(readonly registry: Registry) {}

  /** A counter whose samples `read` gives at each scrape (cumulative values of embkv's own counters). */
  counter(name: string, help: string, labelNames: readonly string[], read: () => Iterable<Sample>): void {
    this.add(name);
    new (prom().Counter)({
      name, help, labelNames, registers: [this.registry],
      collect() {
        this.reset();
        for (const [labels, value] of read()) this.inc(labels, value);
      },
    });
  }

  /** A gauge whose samples `read` gives at each scrape; series not given are gone from that scrape. */
  gauge(name: string, help: string, labelNames: readonly string[], read: () => Iterable<Sample>): void {
    this.add(name);
    new (prom().Gauge)({
      name, help, labelNames, registers: [this.registry],
      collect() {
        this.reset();
        for (const [labels, value] of read()) this.set(labels, value);
      },
    });
  }

  /** A gauge the owner sets itself (the ingester's Kafka lag, say). */
  settableGauge(name: string, help: string, labelNames: readonly string[]): Gauge {
    this.add(name);
    return new (prom().Gauge)({ name, help, labelNames, registers: [this.registry] });
  }

  /** A counter the owner increments itself. */
  settableCounter(name: string, help: string, labelNames: readonly string[]): Counter {
    this.add(name);
    return new (prom().Counter)({ name, help, labelNames, registers: [this.registry] });
  }

  /** A histogram (buckets LATENCY_BUCKETS_SECONDS) read from LatencyBuckets at each scrape. */
  histogram(name: string, help: string, read: () => Iterable<readonly [Labels, LatencyBuckets]>): void {
    this.add(name);
    this.registry.registerMetric(new CollectedHistogram(name, help, read) as unknown as Metric);
  }

  /** Takes every series of this set out of the registry. */
  remove(): void {
    for (const n of this.names) this.registry.removeSingleMetric(n);
    this.names.length = 0;
  }

  private add(name: string): void {
    if (this.registry.getSingleMetric(name) !== undefined) {
      throw invalidArgument(`the metrics registry holds ${name} already (another embkv client or component registered it): give each one a registry of its own, or close the other first`);
    }
    this.names.push(name);
  }
}

interface HistogramValue {
  metricName: string;
  labels: Labels;
  value: number;
}

/**
 * A histogram in prom-client's shape (what Histogram.get() returns), whose buckets are counted by
 * embkv's LatencyBuckets rather than by prom-client's observe().
 */
class CollectedHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  readonly labelNames: string[] = [];

  constructor(readonly name: string, readonly help: string, private readonly read: () => Iterable<readonly [Labels, LatencyBuckets]>) {}

  async get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: HistogramValue[] }> {
    const values: HistogramValue[] = [];
    for (const [labels, b] of this.read()) {
      let cumulative = 0;
      for (let i = 0; i < LATENCY_BUCKETS_SECONDS.length; i++) {
        cumulative += b.counts[i]!;
        values.push({ metricName: `${this.name}_bucket`, labels: { ...labels, le: LATENCY_BUCKETS_SECONDS[i]! }, value: cumulative });
      }
      values.push({ metricName: `${this.name}_bucket`, labels: { ...labels, le: '+Inf' }, value: b.count });
      values.push({ metricName: `${this.name}_sum`, labels, value: b.sum });
      values.push({ metricName: `${this.name}_count`, labels, value: b.count });
    }
    return { name: this.name, help: this.help, type: 'histogram', aggregator: 'sum', values };
  }

  reset(): void {
    // The counts are embkv's; a registry reset does not clear them.
  }
}

/** A prom-client Registry given by a caller, checked by what embkv calls on it. */
export function checkRegistry(value: unknown, name: string): Registry {
  const r = value as Record<string, unknown> | null;
  const methods = ['metrics', 'registerMetric', 'getSingleMetric', 'removeSingleMetric'];
  if (typeof r !== 'object' || r === null || methods.some((m) => typeof r[m] !== 'function')) {
    throw invalidArgument(`${name} must be a prom-client Registry (new Registry(), or prom-client's default register), got ${echo(value)}`);
  }
  return value as Registry;
}

/**
 * A registry for one process (`kvctl serve`, `router`, `watch`, `ingest`): the process's own
 * series, `labels` on every series (a replica's group and replica), and what `register` adds.
 */
export function processRegistry(labels: Labels, register: (set: MetricSet) => void): Registry {
  const registry = newRegistry({ process: true });
  if (Object.keys(labels).length > 0) registry.setDefaultLabels(Object.fromEntries(Object.entries(labels).map(([k, v]) => [k, String(v)])));
  register(new MetricSet(registry));
  return registry;
}
