import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadManifest, type Manifest } from '../../src/cluster/manifest.js';
import * as grpc from '@grpc/grpc-js';
import { ClusterConnections } from '../../src/cluster/connections.js';

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
export function kvctl(args: string[], options: { cwd?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [KVCTL, ...args], { cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...options.env } });
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
 * Starts `kvctl router` for `configPath` (or the cluster these flags name: `--etcd E --cluster C`) on a
 * free port with `args`; resolves once it listens.
 */
export async function startRouter(configPath: string | string[], args: string[] = []): Promise<{ proc: ChildProcess; port: number }> {
  const [port] = await freePorts(1);
  const where = typeof configPath === 'string' ? ['--config', configPath] : configPath;
  const proc = spawn(process.execPath, [KVCTL, 'router', ...where, '--port', String(port), ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  await new Promise<void>((resolve, reject) => {
    let err = '';
    proc.stderr!.on('data', (d) => {
      err += d;
      if (err.includes('router listening')) resolve();
    });
    proc.once('exit', (code) => reject(new Error(`router exited ${code}: ${err}`)));
  });
  return { proc, port: port! };
}

/**
 * A cluster of real `kvctl serve` processes on loopback, each replica its own process and data
 * directory under a temporary directory.
 */
export class TestCluster {
  readonly procs = new Map<string, ChildProcess>();
  readonly logs = new Map<string, string>();
  /** Waiters for a line in a replica's log, checked as its stderr arrives. */
  /** Replicas started with an environment of their own (a test switch), to be restarted without it. */
  private readonly switched = new Set<string>();
  private readonly logWaiters = new Map<string, { pattern: RegExp; seen: string; resolve: (line: string) => void }[]>();

  /** Extra environment of every replica process (EMBKV_TEST_FAULTS=1 for the fault switch, say). */
  env: NodeJS.ProcessEnv = {};
  /** Extra `kvctl serve` flags of every replica. */
  serveArgs: string[] = [];
  /** Extra `kvctl serve` flags of one replica (its own metrics port, say), kept across restarts. */
  replicaArgs: (g: number, r: number) => string[] = () => [];
  /** Extra environment of every kvctl command run by kvctl() (EMBKV_TOKEN, say). */
  kvctlEnv: NodeJS.ProcessEnv = {};
  /** With etcd: the cluster in etcd, which replicas and kvctl are given instead of --config. */
  etcd: { endpoint: string; cluster: string } | undefined;
  /** Where each replica listens now (gGrR -> host:port): the manifest's address unless it was moved. */
  readonly listen = new Map<string, string>();

  /** The flags that name the cluster: --config, or --etcd/--cluster. */
  get sourceArgs(): string[] {
    return this.etcd ? ['--etcd', this.etcd.endpoint, '--cluster', this.etcd.cluster] : ['--config', this.configPath];
  }

  private constructor(readonly dir: string, readonly manifest: Manifest, readonly configPath: string) {}

  /**
   * `security`: the manifest's security block (paths relative to the cluster's directory), with
   * `prepare` writing its files (certificates, tokens) into that directory before any replica starts.
   */
  static async start(
    groups: number, replicas: number,
    extra: {
      partitions?: number; keepVersions?: number; env?: NodeJS.ProcessEnv; kvctlEnv?: NodeJS.ProcessEnv;
      security?: object; prepare?: (dir: string) => void | Promise<void>;
      /** Extra `kvctl serve` flags of every replica. */
      serveArgs?: string[];
      /** Extra `kvctl serve` flags of one replica. */
      replicaArgs?: (g: number, r: number) => string[];
      /** The manifest is stored in this etcd (kvctl cluster init) and every process reads it there. */
      etcd?: { endpoint: string; cluster: string };
    } = {},
  ): Promise<TestCluster> {
    const dir = mkdtempSync(join(tmpdir(), 'embkv-test-'));
    try {
      await extra.prepare?.(dir);
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
    const ports = await freePorts(groups * replicas);
    const raw = {
      partitions: extra.partitions ?? 64,
      ...(extra.keepVersions ? { keepVersions: extra.keepVersions } : {}),
      groups: Array.from({ length: groups }, (_, g) => ({
        replicas: Array.from({ length: replicas }, (_, r) => `127.0.0.1:${ports[g * replicas + r]}`),
      })),
      ...(extra.security ? { security: extra.security } : {}),
    };
    const configPath = join(dir, 'cluster.json');
    writeFileSync(configPath, JSON.stringify(raw, null, 2));
    const manifest = loadManifest(configPath);
    const c = new TestCluster(dir, manifest, configPath);
    if (extra.env) c.env = extra.env;
    if (extra.kvctlEnv) c.kvctlEnv = extra.kvctlEnv;
    if (extra.serveArgs) c.serveArgs = extra.serveArgs;
    if (extra.replicaArgs) c.replicaArgs = extra.replicaArgs;
    if (extra.etcd) {
      c.etcd = extra.etcd;
      const init = await kvctl(['cluster', 'init', '--etcd', extra.etcd.endpoint, '--cluster', extra.etcd.cluster, '--config', configPath]);
      if (init.code !== 0) {
        rmSync(dir, { recursive: true, force: true });
        throw new Error(`kvctl cluster init failed: ${init.stderr}`);
      }
    }
    for (let g = 0; g < groups; g++) for (let r = 0; r < replicas; r++) c.startReplica(g, r);
    await c.waitReady();
    return c;
  }

  /**
   * Starts replica gGrR with the cluster's environment and `env` (a test switch for this replica
   * alone, say). The IPC channel ties it to the test process: it stops if the test process dies.
   */
  startReplica(g: number, r: number, env: NodeJS.ProcessEnv = {}, listen?: string): ChildProcess {
    const name = `g${g}r${r}`;
    if (listen !== undefined) this.listen.set(name, listen);
    const at = this.listen.get(name) ?? this.manifest.groups[g]!.replicas[r]!;
    this.listen.set(name, at);
    const where = this.etcd ? [...this.sourceArgs, '--listen', at] : ['--config', this.configPath];
    const p = spawn(process.execPath, [KVCTL, 'serve', ...where, '--group', String(g), '--replica', String(r), '--data', join(this.dir, name), ...this.serveArgs, ...this.replicaArgs(g, r)], {
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      env: { ...process.env, ...this.env, ...env },
    });
    this.logs.set(name, '');
    if (Object.keys(env).length > 0) this.switched.add(name);
    else this.switched.delete(name);
    p.stderr!.on('data', (d: Buffer) => {
      const text = d.toString();
      this.logs.set(name, (this.logs.get(name)! + text).slice(-20_000));
      const waiters = this.logWaiters.get(name) ?? [];
      for (const w of [...waiters]) {
        w.seen += text;
        const line = w.seen.split('\n').find((l) => w.pattern.test(l));
        if (line !== undefined) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    });
    this.procs.set(name, p);
    return p;
  }

  /**
   * Resolves with the first line of replica gGrR's log, from now on, that matches `pattern`; rejects
   * if the replica exits first or after `timeoutMs` (a bound for a broken test, not a synchronisation).
   */
  waitForLog(g: number, r: number, pattern: RegExp, timeoutMs = 60_000): Promise<string> {
    const name = `g${g}r${r}`;
    const p = this.procs.get(name);
    if (p === undefined || p.exitCode !== null || p.signalCode !== null) return Promise.reject(new Error(`replica ${name} is not running`));
    return new Promise<string>((resolve, reject) => {
      const list = this.logWaiters.get(name) ?? [];
      this.logWaiters.set(name, list);
      const done = (): void => {
        clearTimeout(timer);
        p.off('exit', onExit);
        const i = list.indexOf(w);
        if (i >= 0) list.splice(i, 1);
      };
      const w = { pattern, seen: '', resolve: (line: string) => { done(); resolve(line); } };
      const onExit = (): void => { done(); reject(new Error(`replica ${name} exited before logging ${pattern}; log:\n${this.logs.get(name)}`)); };
      const timer = setTimeout(() => { done(); reject(new Error(`replica ${name} did not log ${pattern} in ${timeoutMs} ms; log:\n${this.logs.get(name)}`)); }, timeoutMs);
      list.push(w);
      p.once('exit', onExit);
    });
  }

  /** Stops replica gGrR (SIGKILL) and starts it again with `env`, then waits for the cluster to be ready. */
  async restartReplica(g: number, r: number, env: NodeJS.ProcessEnv = {}): Promise<void> {
    await this.stopReplica(g, r, 'SIGKILL');
    this.startReplica(g, r, env);
    await this.waitReady();
  }

  /**
   * Puts the cluster back as a fault test found it: every replica thawed, running without a test
   * switch of its own, and answering. Fault tests call it in a `finally` (or `afterEach`), so a
   * failure does not take later tests down.
   */
  async ensureAllUp(): Promise<void> {
    for (const [name, p] of this.procs) {
      const [g, r] = name.slice(1).split('r').map(Number) as [number, number];
      if (this.switched.has(name)) await this.stopReplica(g, r, 'SIGKILL');
      if (p.exitCode !== null || p.signalCode !== null || this.switched.has(name)) this.startReplica(g, r);
      else p.kill('SIGCONT');
    }
    await this.waitReady();
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

  /**
   * Waits until every replica reports SERVING on grpc.health.v1 (it has restored its tables and caught
   * up with its peers, so it answers lookups).
   */
  async waitReady(timeoutMs = 60_000): Promise<void> {
    const at = { ...this.manifest, groups: this.manifest.groups.map((grp, g) => ({ replicas: grp.replicas.map((a, r) => this.listen.get(`g${g}r${r}`) ?? a) })) };
    const conns = new ClusterConnections(at);
    const until = Date.now() + timeoutMs;
    try {
      for (;;) {
        const all = await Promise.all(conns.all().map(async (c) => ({ c, err: await healthCheck(c.lookup) })));
        const down = all.filter((s) => s.err !== undefined);
        if (down.length === 0) return;
        if (Date.now() > until) {
          throw new Error(`replicas not ready: ${down.map((s) => `${s.c.address}: ${s.err}\n${this.logs.get(`g${s.c.group}r${s.c.replica}`)}`).join('\n')}`);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    } finally {
      conns.close();
    }
  }

  /** Runs kvctl against this cluster, with the cluster's kvctlEnv and `env`. */
  kvctl(args: string[], timeoutMs?: number, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
    return kvctl([...args, ...this.sourceArgs], { cwd: this.dir, env: { ...this.kvctlEnv, ...env }, ...(timeoutMs ? { timeoutMs } : {}) });
  }

  async close(): Promise<void> {
    await Promise.all([...this.procs.keys()].map((name) => {
      const [g, r] = name.slice(1).split('r').map(Number) as [number, number];
      return this.stopReplica(g, r, 'SIGKILL');
    }));
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** grpc.health.v1 Check of the whole server: undefined when SERVING, else why not. */
function healthCheck(client: grpc.Client): Promise<string | undefined> {
  return new Promise((resolve) => {
    client.makeUnaryRequest<Buffer, Buffer>(
      '/grpc.health.v1.Health/Check', () => Buffer.alloc(0), (b) => b, Buffer.alloc(0), new grpc.Metadata(), { deadline: Date.now() + 2000 },
      // HealthCheckResponse { status = 1 }: SERVING (1) encodes as the bytes 08 01.
      (err, res) => resolve(err ? err.message : res !== undefined && res.length === 2 && res[0] === 0x08 && res[1] === 0x01 ? undefined : 'not serving'),
    );
  });
}
