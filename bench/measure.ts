import { PerformanceObserver, constants as perfConstants, performance } from 'node:perf_hooks';

/** What a series of timed requests cost this (client) process. */
export interface RequestFigures {
  requests: number;
  latenciesMs: number[];
  p50: number;
  p90: number;
  p99: number;
  max: number;
  /** user + system CPU of this process inside the timed calls, per request. */
  cpuMsPerRequest: number;
  /** Summed durations of GC pauses that started inside the timed calls, per request. */
  gcMsPerRequest: number;
  gcCount: number;
  /** Of those, the major (mark-sweep-compact) collections. */
  gcMajorCount: number;
  gcMajorMsPerRequest: number;
  /** Positions whose vectors were compared bit for bit, over all requests. */
  verified: number;
}

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}

// GC entries arrive asynchronously; they are kept with their start time and matched to the timed
// windows afterwards, so GC that falls in request building or verification is not counted.
const gcEntries: { start: number; ms: number; major: boolean }[] = [];
let observer: PerformanceObserver | undefined;

function observeGc(): void {
  if (observer !== undefined) return;
  observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      const kind = (e as unknown as { detail?: { kind?: number } }).detail?.kind;
      gcEntries.push({ start: e.startTime, ms: e.duration, major: kind === perfConstants.NODE_PERFORMANCE_GC_MAJOR });
    }
  });
  observer.observe({ entryTypes: ['gc'] });
}

export interface TimedRun<R> {
  warmup: number;
  requests: number;
  /** Prepares request r (outside the timed window). */
  prepare: (r: number) => void;
  /** The request itself: the only timed part. */
  call: () => Promise<R>;
  /** Checks the answer of request r (outside the timed window); returns how many positions it compared. */
  check: (answer: R, r: number) => number;
}

/** Runs warm-up then timed requests one after another. Request numbers run 0 .. warmup + requests - 1. */
export async function timeRequests<R>(t: TimedRun<R>): Promise<RequestFigures> {
  const [figures] = await timeInterleaved({ warmup: t.warmup, requests: t.requests, prepare: t.prepare, series: [{ call: t.call, check: t.check }] });
  return figures!;
}

/** One of several ways of making the same requests, timed side by side by timeInterleaved. */
export interface Series<R> {
  call: () => Promise<R>;
  check: (answer: R, r: number) => number;
}

export interface InterleavedRun<R> {
  warmup: number;
  requests: number;
  /** Prepares request r (outside the timed windows); every series then makes that request. */
  prepare: (r: number) => void;
  series: readonly Series<R>[];
}

/**
 * Every series makes request r, one after another, before any makes request r + 1; the series that
 * goes first moves on by one each request. A machine that gets slower or faster during the run then
 * weighs on every series alike, so their figures compare within the run.
 */
export async function timeInterleaved<R>(t: InterleavedRun<R>): Promise<RequestFigures[]> {
  observeGc();
  gcEntries.length = 0;
  const k = t.series.length;
  const windows: [number, number][][] = t.series.map(() => []);
  const latencies: number[][] = t.series.map(() => []);
  const cpuMicros: number[] = t.series.map(() => 0);
  const verified: number[] = t.series.map(() => 0);
  for (let r = 0; r < t.warmup + t.requests; r++) {
    t.prepare(r);
    const timed = r >= t.warmup;
    for (let j = 0; j < k; j++) {
      const s = (r + j) % k;
      const series = t.series[s]!;
      const cpu0 = process.cpuUsage();
      const t0 = performance.now();
      const answer = await series.call();
      const t1 = performance.now();
      const cpu = process.cpuUsage(cpu0);
      if (timed) {
        latencies[s]!.push(t1 - t0);
        windows[s]!.push([t0, t1]);
        cpuMicros[s]! += cpu.user + cpu.system;
      }
      verified[s]! += series.check(answer, r);
    }
  }
  // Let the observer deliver the last entries.
  await new Promise((r) => setTimeout(r, 50));
  const figures = t.series.map((_, s) => {
    let gcMs = 0;
    let gcCount = 0;
    let majorMs = 0;
    let majorCount = 0;
    for (const e of gcEntries) {
      if (windows[s]!.some(([a, b]) => e.start >= a && e.start <= b)) {
        gcMs += e.ms;
        gcCount++;
        if (e.major) {
          majorMs += e.ms;
          majorCount++;
        }
      }
    }
    const sorted = [...latencies[s]!].sort((a, b) => a - b);
    return {
      requests: t.requests,
      latenciesMs: latencies[s]!,
      p50: percentile(sorted, 50),
      p90: percentile(sorted, 90),
      p99: percentile(sorted, 99),
      max: sorted[sorted.length - 1]!,
      cpuMsPerRequest: cpuMicros[s]! / 1000 / t.requests,
      gcMsPerRequest: gcMs / t.requests,
      gcCount,
      gcMajorCount: majorCount,
      gcMajorMsPerRequest: majorMs / t.requests,
      verified: verified[s]!,
    };
  });
  gcEntries.length = 0;
  return figures;
}
