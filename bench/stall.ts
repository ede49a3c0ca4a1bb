import { Worker } from 'node:worker_threads';

/** `--stall`: how long each freeze lasts and what fraction of the time the replicas are frozen. */
export const STALL_FREEZE_MS = 60;
export const STALL_FRACTION = 0.2;

export interface StallReport {
  freezes: number;
  /** Time frozen over time running (about STALL_FRACTION). */
  frozenFraction: number;
  /** Longest freeze as measured by the freezing thread (SIGSTOP to SIGCONT). */
  longestFreezeMs: number;
}

// Runs in a worker thread, so the freezes keep their length while the client's own event loop is busy
// placing rows. Gaps between freezes are exponential (random moments) with the mean that gives the fraction.
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const { pids, freezeMs, meanGapMs } = workerData;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let stopping = false;
parentPort.on('message', () => { stopping = true; });
const signal = (sig) => { for (const pid of pids) { try { process.kill(pid, sig); } catch {} } };
(async () => {
  const started = performance.now();
  let freezes = 0, frozen = 0, longest = 0;
  try {
    while (!stopping) {
      await sleep(-Math.log(1 - Math.random()) * meanGapMs);
      if (stopping) break;
      signal('SIGSTOP');
      const t0 = performance.now();
      await sleep(freezeMs);
      signal('SIGCONT');
      const ms = performance.now() - t0;
      frozen += ms;
      longest = Math.max(longest, ms);
      freezes++;
    }
  } finally {
    signal('SIGCONT');
  }
  parentPort.postMessage({ freezes, frozenFraction: frozen / (performance.now() - started), longestFreezeMs: longest });
})();
`;

/**
 * Freezes processes with SIGSTOP for `freezeMs` at random moments, `fraction` of the time, until
 * stop(); they get no say in it (a GC pause, a swapped-out page or a noisy neighbour, made harsh).
 */
export class Staller {
  private worker: Worker | undefined;

  constructor(private readonly pids: readonly number[], private readonly freezeMs = STALL_FREEZE_MS, private readonly fraction = STALL_FRACTION) {}

  start(): void {
    const meanGapMs = (this.freezeMs * (1 - this.fraction)) / this.fraction;
    this.worker = new Worker(WORKER, { eval: true, workerData: { pids: this.pids, freezeMs: this.freezeMs, meanGapMs } });
  }

  /** Stops freezing; every process is left running (SIGCONT) whatever happens. */
  async stop(): Promise<StallReport> {
    const w = this.worker;
    this.worker = undefined;
    try {
      if (w === undefined) return { freezes: 0, frozenFraction: 0, longestFreezeMs: 0 };
      const report = new Promise<StallReport>((resolve, reject) => {
        w.once('message', resolve);
        w.once('error', reject);
      });
      w.postMessage('stop');
      return await report;
    } finally {
      for (const pid of this.pids) {
        try {
          process.kill(pid, 'SIGCONT');
        } catch {
          // already gone
        }
      }
      await w?.terminate();
    }
  }
}
