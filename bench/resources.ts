import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Supervisor } from '../src/cli/supervisor.js';

/**
 * Everything the benchmark starts or creates, so that every exit path (done, error, Ctrl-C, SIGTERM)
 * ends every process and removes every temp dir. Normal paths release what they took themselves;
 * this is the net under them.
 */
export class Resources {
  private readonly supervisors = new Set<Supervisor>();
  private readonly procs = new Set<ChildProcess>();
  private readonly dirs = new Set<string>();
  private shuttingDown = false;

  tempDir(prefix: string): string {
    const dir = mkdtempSync(join(tmpdir(), `embkv-bench-${prefix}-`));
    this.dirs.add(dir);
    return dir;
  }

  removeDir(dir: string): void {
    rmDir(dir);
    this.dirs.delete(dir);
  }

  addSupervisor(s: Supervisor): void {
    this.supervisors.add(s);
  }

  async stopSupervisor(s: Supervisor): Promise<void> {
    try {
      await s.stop(5000);
    } finally {
      s.killAll();
      this.supervisors.delete(s);
    }
  }

  addProcess(p: ChildProcess): void {
    this.procs.add(p);
    p.once('exit', () => this.procs.delete(p));
  }

  /** SIGKILLs everything still running, waits (briefly) for it to be gone, then removes the temp dirs. */
  async shutdown(): Promise<void> {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    const pids: number[] = [];
    for (const s of this.supervisors) {
      for (const pid of Object.values(s.pids())) if (pid !== undefined) pids.push(pid);
      s.killAll();
    }
    for (const p of this.procs) {
      if (p.pid !== undefined) pids.push(p.pid);
      p.kill('SIGKILL');
    }
    const until = Date.now() + 3000;
    while (pids.some(alive) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    for (const d of this.dirs) rmDir(d);
    this.dirs.clear();
    this.supervisors.clear();
    this.procs.clear();
  }

  /** The last resort inside process.on('exit'): synchronous only. */
  shutdownSync(): void {
    for (const s of this.supervisors) s.killAll();
    for (const p of this.procs) p.kill('SIGKILL');
    for (const d of this.dirs) rmDir(d);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function rmDir(dir: string): void {
  // A replica that was just killed may still be closing files in it: retry a few times.
  rmSync(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
}

/** `count` distinct free loopback ports: all bound to port 0 at once, then released. */
export async function freePorts(count: number): Promise<number[]> {
  const servers: Server[] = [];
  try {
    const ports: number[] = [];
    for (let i = 0; i < count; i++) {
      const s = createServer();
      servers.push(s);
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.listen(0, '127.0.0.1', () => resolve());
      });
      const addr = s.address();
      if (addr === null || typeof addr === 'string') throw new Error('cannot read a bound port');
      ports.push(addr.port);
    }
    return ports;
  } finally {
    await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  }
}
