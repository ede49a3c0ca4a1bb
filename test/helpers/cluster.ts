import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseManifest, type Manifest } from '../../src/common/manifest.js';
import { statusAll } from '../../src/loader/cluster-ops.js';
import { ClusterConnections } from '../../src/router/connections.js';

export const KVCTL = fileURLToPath(new URL('../../src/cli/kvctl.js', import.meta.url));

/** Ports the OS hands out for port 0, released again for the replicas to bind. */
export async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, () =>
      new Promise<import('node:net').Server>((resolve, reject) => {
        const s = createServer();
        s.once('error', reject);
        s.listen(0, '127.0.0.1', () => resolve(s));
      }),
    ),
  );
  const ports = servers.map((s) => (s.address() as import('node:net').AddressInfo).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `node kvctl.js ...args` to completion. */
export function kvctl(args: string[], options: { cwd?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [KVCTL, ...args], { cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`kvctl ${args.join(' ')} timed out; stderr: ${stderr}`));
    }, options.timeoutMs ?? 120_000);
    p.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/**
 * A cluster of real `kvctl serve` processes on loopback, each replica its own process and data
 * directory under a temporary directory.
 */
export class TestCluster {
  readonly procs = new Map<string, ChildProcess>();
  readonly logs = new Map<string, string>();

  /** Extra environment of every replica process (EMBKV_TEST_FAULTS=1 for the fault switch, say). */
  env: NodeJS.ProcessEnv = {};

  private constructor(readonly dir: string, readonly manifest: Manifest, readonly configPath: string) {}

  static async start(groups: number, replicas: number, extra: { partitions?: number; keepVersions?: number; env?: NodeJS.ProcessEnv } = {}): Promise<TestCluster> {
    const dir = mkdtempSync(join(tmpdir(), 'embkv-test-'));
    const ports = await freePorts(groups * replicas);
    const raw = {
      partitions: extra.partitions ?? 64,
      ...(extra.keepVersions ? { keepVersions: extra.keepVersions } : {}),
      groups: Array.from({ length: groups }, (_, g) => ({
        replicas: Array.from({ length: replicas }, (_, r) => `127.0.0.1:${ports[g * replicas + r]}`),
      })),
    };
    const manifest = parseManifest(raw);
    const configPath = join(dir, 'cluster.json');
    writeFileSync(configPath, JSON.stringify(raw, null, 2));
    const c = new TestCluster(dir, manifest, configPath);
    if (extra.env) c.env = extra.env;
    for (let g = 0; g < groups; g++) for (let r = 0; r < replicas; r++) c.startReplica(g, r);
    await c.waitReady();
    return c;
  }

  startReplica(g: number, r: number): ChildProcess {
    const name = `g${g}r${r}`;
    const p = spawn(process.execPath, [KVCTL, 'serve', '--config', this.configPath, '--group', String(g), '--replica', String(r), '--data', join(this.dir, name)], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, ...this.env },
    });
    this.logs.set(name, '');
    p.stderr!.on('data', (d) => this.logs.set(name, (this.logs.get(name)! + d).slice(-20_000)));
    this.procs.set(name, p);
    return p;
  }

  /** Stops a replica with `signal` and waits for it to exit. */
  async stopReplica(g: number, r: number, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const p = this.procs.get(`g${g}r${r}`);
    if (p === undefined || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((resolve) => p.once('exit', resolve));
    p.kill(signal);
    await exited;
  }

  /** Sends `signal` to a running replica: SIGSTOP freezes it (it gives no cooperation), SIGCONT thaws it. */
  signalReplica(g: number, r: number, signal: NodeJS.Signals): void {
    const p = this.procs.get(`g${g}r${r}`);
    if (p === undefined || p.exitCode !== null || p.signalCode !== null) throw new Error(`replica g${g}r${r} is not running`);
    p.kill(signal);
  }

  /** Waits until every replica answers Status. */
  async waitReady(timeoutMs = 30_000): Promise<void> {
    const conns = new ClusterConnections(this.manifest);
    const until = Date.now() + timeoutMs;
    try {
      for (;;) {
        const all = await statusAll(conns, 1000);
        if (all.every((s) => s.status)) return;
        if (Date.now() > until) {
          const down = all.filter((s) => s.error).map((s) => `${s.conn.address}: ${s.error!.message}\n${this.logs.get(`g${s.conn.group}r${s.conn.replica}`)}`);
          throw new Error(`replicas not ready: ${down.join('\n')}`);
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      conns.close();
    }
  }

  kvctl(args: string[], timeoutMs?: number): Promise<RunResult> {
    return kvctl([...args, '--config', this.configPath], { cwd: this.dir, ...(timeoutMs ? { timeoutMs } : {}) });
  }

  async close(): Promise<void> {
    await Promise.all([...this.procs.keys()].map((name) => {
      const [g, r] = name.slice(1).split('r').map(Number) as [number, number];
      return this.stopReplica(g, r, 'SIGKILL');
    }));
    rmSync(this.dir, { recursive: true, force: true });
  }
}
