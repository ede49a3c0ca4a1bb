import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, mkdirSync, type WriteStream } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { REPLICA_MALLOC_ENV, REPLICA_NODE_FLAGS, withMallocEnv } from '../common/process-tuning.js';
import type { Manifest } from '../cluster/manifest.js';

const KVCTL = fileURLToPath(new URL('./kvctl.js', import.meta.url));
const MAX_BACKOFF_MS = 10_000;
const HEALTHY_AFTER_MS = 30_000;

export interface SupervisorOptions {
  manifest: Manifest;
  configPath: string;
  dataDir: string;
  /** 'inherit': child logs on our stderr, prefixed; 'files': DATA/gGrR.log. */
  logs: 'inherit' | 'files';
  /** One line per lifecycle event (started, exited, restarting). */
  report: (line: string) => void;
  /** Start the replicas with REPLICA_MALLOC_ENV (default true; the bench turns it off to measure without). */
  mallocEnv?: boolean;
  /** Start the replicas with REPLICA_NODE_FLAGS (default true; the bench turns it off to measure without). */
  nodeFlags?: boolean;
  /** The environment the replicas start from (default process.env); variables set here win over REPLICA_MALLOC_ENV. */
  env?: NodeJS.ProcessEnv;
  /** Start the replicas with --insecure (protected mode, README: Security). */
  insecure?: boolean;
  /**
   * Where the replicas read the cluster: `['--etcd', E, '--cluster', C]`, each replica then listening
   * at (and registering) its manifest address. Default: `--config configPath`.
   */
  sourceArgs?: string[];
}

interface Child {
  name: string;
  group: number;
  replica: number;
  proc: ChildProcess | undefined;
  backoffMs: number;
  startedMs: number;
  restartTimer: NodeJS.Timeout | undefined;
  log: WriteStream | undefined;
}

/**
 * Runs every replica of the manifest as a child `kvctl serve` process on this host. A child that dies
 * is reported and restarted with backoff; stop() ends them all with SIGTERM (SIGKILL after a grace).
 */
export class Supervisor {
  private readonly children: Child[] = [];
  private stopping = false;

  constructor(private readonly options: SupervisorOptions) {
    options.manifest.groups.forEach((g, gi) =>
      g.replicas.forEach((_, ri) =>
        this.children.push({
          name: `g${gi}r${ri}`, group: gi, replica: ri, proc: undefined, backoffMs: 500, startedMs: 0, restartTimer: undefined, log: undefined,
        }),
      ),
    );
  }

  start(): void {
    mkdirSync(this.options.dataDir, { recursive: true });
    for (const c of this.children) this.spawnChild(c);
  }

  /** Sends `signal` to every running child (SIGHUP: re-read the tokens file). */
  signalAll(signal: NodeJS.Signals): void {
    for (const c of this.children) c.proc?.kill(signal);
  }

  /** The pid of each running child, by name (gGrR). */
  pids(): Record<string, number | undefined> {
    return Object.fromEntries(this.children.map((c) => [c.name, c.proc?.pid]));
  }

  private childEnv(): NodeJS.ProcessEnv {
    const base = this.options.env ?? process.env;
    return this.options.mallocEnv === false ? base : withMallocEnv(REPLICA_MALLOC_ENV, base);
  }

  private spawnChild(c: Child): void {
    const dataDir = join(this.options.dataDir, c.name);
    const where = this.options.sourceArgs === undefined
      ? ['--config', this.options.configPath]
      : [...this.options.sourceArgs, '--listen', this.options.manifest.groups[c.group]!.replicas[c.replica]!];
    const args = [...(this.options.nodeFlags === false ? [] : REPLICA_NODE_FLAGS), KVCTL, 'serve', ...where, '--group', String(c.group), '--replica', String(c.replica), '--data', dataDir, ...(this.options.insecure ? ['--insecure'] : [])];
    // The IPC channel ties the child to this process: when it closes, the replica shuts down.
    const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe', 'ipc'], env: this.childEnv() });
    c.proc = proc;
    c.startedMs = Date.now();
    if (this.options.logs === 'files') {
      c.log ??= createWriteStream(join(this.options.dataDir, `${c.name}.log`), { flags: 'a' });
      proc.stdout!.pipe(c.log, { end: false });
      proc.stderr!.pipe(c.log, { end: false });
    } else {
      for (const stream of [proc.stdout!, proc.stderr!]) {
        createInterface({ input: stream }).on('line', (line) => process.stderr.write(`[${c.name}] ${line}\n`));
      }
    }
    proc.on('exit', (code, signal) => {
      c.proc = undefined;
      if (this.stopping) return;
      if (Date.now() - c.startedMs > HEALTHY_AFTER_MS) c.backoffMs = 500;
      this.options.report(`replica ${c.name} exited (${signal ?? `code ${code}`}); restarting in ${c.backoffMs} ms`);
      c.restartTimer = setTimeout(() => {
        c.restartTimer = undefined;
        if (!this.stopping) this.spawnChild(c);
      }, c.backoffMs);
      c.backoffMs = Math.min(MAX_BACKOFF_MS, c.backoffMs * 2);
    });
  }

  /** Last resort when this process exits abruptly: SIGKILL every child, synchronously. */
  killAll(): void {
    this.stopping = true;
    for (const c of this.children) c.proc?.kill('SIGKILL');
  }

  /** Stops every child: SIGTERM, then SIGKILL for those still running after `graceMs` (a replica drains for at most 10 s). */
  async stop(graceMs = 15_000): Promise<void> {
    this.stopping = true;
    const waits: Promise<void>[] = [];
    for (const c of this.children) {
      if (c.restartTimer) clearTimeout(c.restartTimer);
      const proc = c.proc;
      if (proc === undefined) continue;
      waits.push(
        new Promise<void>((resolve) => {
          const kill = setTimeout(() => proc.kill('SIGKILL'), graceMs);
          proc.once('exit', () => {
            clearTimeout(kill);
            resolve();
          });
        }),
      );
      proc.kill('SIGTERM');
    }
    await Promise.all(waits);
    for (const c of this.children) c.log?.end();
  }
}
