/**
 * Plain counters of requests, kept on the request path by the SDK, the router and the replicas, and
 * read only when something asks (a Prometheus scrape through src/metrics, client.stats()). A request
 * costs a map lookup, a few additions and a scan of 14 bucket bounds: nothing per key, no allocation.
 */

/** Upper bounds (seconds) of the latency buckets every embkv histogram uses. */
export const LATENCY_BUCKETS_SECONDS: readonly number[] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/** A latency histogram: per-bucket counts (not cumulative; the last slot is above every bound), sum and count. */
export class LatencyBuckets {
  readonly counts = new Float64Array(LATENCY_BUCKETS_SECONDS.length + 1);
  sum = 0;
  count = 0;

  observe(seconds: number): void {
    let i = 0;
    while (i < LATENCY_BUCKETS_SECONDS.length && seconds > LATENCY_BUCKETS_SECONDS[i]!) i++;
    this.counts[i]!++;
    this.sum += seconds;
    this.count++;
  }
}

/** One table's requests: calls, keys they named, answered calls' latency, failed calls by KvError code. */
export class RequestCounters {
  requests = 0;
  keys = 0;
  readonly seconds = new LatencyBuckets();
  readonly errors = new Map<string, number>();

  error(code: string): void {
    this.errors.set(code, (this.errors.get(code) ?? 0) + 1);
  }
}

/** Tables beyond the first MAX_TABLE_LABELS are counted together under this name. */
export const OTHER_TABLES = '_other';
/**
 * Metric labels must stay few: table names come from callers (through the router, from any client),
 * so the first 256 names are counted each on its own and the rest together.
 */
export const MAX_TABLE_LABELS = 256;

/** RequestCounters by table name, bounded (see MAX_TABLE_LABELS). */
export class TableCounters {
  private readonly byTable = new Map<string, RequestCounters>();

  of(table: string): RequestCounters {
    const c = this.byTable.get(table);
    if (c !== undefined) return c;
    // Past the bound, new names share one entry, and the map does not grow.
    const name = this.byTable.size < MAX_TABLE_LABELS ? table : OTHER_TABLES;
    let shared = this.byTable.get(name);
    if (shared === undefined) {
      shared = new RequestCounters();
      this.byTable.set(name, shared);
    }
    return shared;
  }

  entries(): IterableIterator<[string, RequestCounters]> {
    return this.byTable.entries();
  }
}
