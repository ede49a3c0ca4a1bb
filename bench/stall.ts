import { spawn, type ChildProcess } from 'node:child_process';
import { setPriority } from 'node:os';

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

// Runs in its own process at a raised priority, so that the freezes keep their length while the
// client and the replicas keep both cores busy. Gaps between freezes are exponential (random moments)
// with the mean that gives the fraction. SIGTERM stops it; it prints its report as JSON.
const FREEZER = `
const { pids, freezeMs, meanGapMs } = JSON.parse(process.argv[1]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let stopping = false;
process.on('SIGTERM', () => { stopping = true; });
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
  process.stdout.write(JSON.stringify({ freezes, frozenFraction: frozen / (performance.now() - started), longestFreezeMs: longest }));
})();
`;

/**
 * Freezes processes with SIGSTOP for `freezeMs` at random moments, `fraction` of the time, until
 * stop(); they get no say in it (a GC pause, a swapped-out page or a noisy neighbour, made harsh).
 */
export class Staller {
  private proc: ChildProcess | undefined;
  private out = '';

  constructor(private readonly pids: readonly number[], private readonly freezeMs = STALL_FREEZE_MS, private readonly fraction = STALL_FRACTION) {}

  start(): void {
    const meanGapMs = (this.freezeMs * (1 - this.fraction)) / this.fraction;
    const p = spawn(process.execPath, ['-e', FREEZER, JSON.stringify({ pids: this.pids, freezeMs: this.freezeMs, meanGapMs })], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    p.stdout!.on('data', (d) => (this.out += d));
    try {
      setPriority(p.pid!, -15);
    } catch {
      // not allowed here: the freezes may run a little long on a busy machine (the report says how long)
    }
    this.proc = p;
  }

  /** Stops freezing; every process is left running (SIGCONT) whatever happens. */
  async stop(): Promise<StallReport> {
    const p = this.proc;
    this.proc = undefined;
    try {
      if (p === undefined) return { freezes: 0, frozenFraction: 0, longestFreezeMs: 0 };
      const exited = new Promise<void>((resolve) => (p.exitCode !== null ? resolve() : p.once('close', () => resolve())));
      p.kill('SIGTERM');
      await exited;
      return JSON.parse(this.out) as StallReport;
    } finally {
      for (const pid of this.pids) {
        try {
          process.kill(pid, 'SIGCONT');
        } catch {
          // already gone
        }
      }
    }
  }
}
