/**
 * A real Prometheus (Debian's `prometheus` package) for tests: its own process on a free loopback
 * port, a generated config scraping the given targets every 250 ms, storage in a temp directory
 * removed by stop(). Its log is kept for a failing test.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePorts } from './cluster.js';
import { until } from './util.js';

export const PROMETHEUS = '/usr/bin/prometheus';
export const SCRAPE_INTERVAL = '250ms';

/** One series of an instant query: its labels and value. */
export interface PromSample {
  metric: Record<string, string>;
  value: number;
}

export class TestPrometheus {
  log = '';

  private constructor(private readonly proc: ChildProcess, private readonly dir: string, readonly port: number) {
    proc.stderr!.on('data', (d: Buffer) => (this.log = (this.log + d.toString()).slice(-20_000)));
  }

  /** Starts Prometheus scraping `jobs` (job name to host:port targets) and resolves once it is ready. */
  static async start(jobs: Record<string, string[]>): Promise<TestPrometheus> {
    if (!existsSync(PROMETHEUS)) throw new Error(`${PROMETHEUS} is missing: scripts/install-deps.sh installs Debian's prometheus package`);
    const dir = mkdtempSync(join(tmpdir(), 'embkv-prometheus-'));
    const [port] = await freePorts(1);
    const config = [
      'global:',
      `  scrape_interval: ${SCRAPE_INTERVAL}`,
      '  scrape_timeout: 200ms',
      'scrape_configs:',
      ...Object.entries(jobs).flatMap(([job, targets]) => [
        `  - job_name: ${job}`,
        '    static_configs:',
        `      - targets: [${targets.map((t) => `'${t}'`).join(', ')}]`,
      ]),
    ].join('\n');
    writeFileSync(join(dir, 'prometheus.yml'), config + '\n');
    const proc = spawn(PROMETHEUS, [
      `--config.file=${join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${join(dir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`,
      '--log.level=warn',
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    const p = new TestPrometheus(proc, dir, port!);
    try {
      await until('prometheus to be ready', async () => {
        if (proc.exitCode !== null) throw new Error(`prometheus exited ${proc.exitCode}: ${p.log}`);
        return (await fetch(`${p.url}/-/ready`).then((r) => r.ok, () => false)) ? true : undefined;
      }, { everyMs: 50 });
    } catch (err) {
      await p.stop();
      throw err;
    }
    return p;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** An instant query through the HTTP API. */
  async query(expr: string): Promise<PromSample[]> {
    const res = await fetch(`${this.url}/api/v1/query?query=${encodeURIComponent(expr)}`);
    const body = (await res.json()) as { status: string; error?: string; data?: { resultType: string; result: { metric: Record<string, string>; value: [number, string] }[] } };
    if (body.status !== 'success') throw new Error(`query ${expr}: ${body.error}`);
    if (body.data!.resultType !== 'vector') throw new Error(`query ${expr}: a ${body.data!.resultType}, not a vector`);
    return body.data!.result.map((r) => ({ metric: r.metric, value: Number(r.value[1]) }));
  }

  /** The value of a query that gives one series (a sum(...), say), or undefined while it gives none. */
  async scalar(expr: string): Promise<number | undefined> {
    const r = await this.query(expr);
    if (r.length > 1) throw new Error(`query ${expr} gave ${r.length} series`);
    return r[0]?.value;
  }

  /** Waits until the query gives one series whose value passes `ok`; resolves with it. */
  waitFor(expr: string, ok: (v: number) => boolean, timeoutMs = 60_000): Promise<number> {
    let last: number | undefined;
    return until(`${expr} (last: ${last})`, async () => {
      last = await this.scalar(expr);
      return last !== undefined && ok(last) ? last : undefined;
    }, { timeoutMs, everyMs: 100 }).catch((err: Error) => {
      throw new Error(`${err.message}; last value ${last}; prometheus log:\n${this.log}`);
    });
  }

  /** Stops Prometheus and removes its storage. */
  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const exited = new Promise((resolve) => this.proc.once('exit', resolve));
      this.proc.kill('SIGTERM');
      const timer = setTimeout(() => this.proc.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
