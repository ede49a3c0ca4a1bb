/**
 * A real etcd for tests: Debian's `etcd` binary (3.4), one member on loopback ports of its own with a
 * data directory under os.tmpdir(), in a process the test starts, stops, starts again and removes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePorts } from './cluster.js';

export const ETCD_BIN = process.env['EMBKV_ETCD_BIN'] ?? 'etcd';

export class TestEtcd {
  private proc: ChildProcess | undefined;
  /** Its log (stderr), the last 50 kB, kept for a failing test. */
  log = '';

  private constructor(readonly dir: string, readonly host: string, readonly clientPort: number, readonly peerPort: number) {}

  /** Starts etcd on free ports of `host` (default 127.0.0.1); resolves once it serves clients. */
  static async start(options: { host?: string; ports?: [number, number]; wrap?: string[] } = {}): Promise<TestEtcd> {
    const dir = mkdtempSync(join(tmpdir(), 'embkv-etcd-'));
    const [clientPort, peerPort] = options.ports ?? ((await freePorts(2)) as [number, number]);
    const e = new TestEtcd(dir, options.host ?? '127.0.0.1', clientPort, peerPort);
    e.wrap = options.wrap ?? [];
    try {
      await e.startProcess();
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
    return e;
  }

  /** A command the etcd process runs under (`ip netns exec NS`), empty for none. */
  private wrap: string[] = [];

  get endpoint(): string {
    return `http://${this.host}:${this.clientPort}`;
  }

  get running(): boolean {
    return this.proc !== undefined;
  }

  private async startProcess(): Promise<void> {
    const peer = `http://${this.host}:${this.peerPort}`;
    const args = [
      '--name', 'embkv-test', '--data-dir', join(this.dir, 'data'),
      '--listen-client-urls', this.endpoint, '--advertise-client-urls', this.endpoint,
      '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer, '--initial-cluster', `embkv-test=${peer}`,
      '--logger', 'zap', '--log-outputs', 'stderr',
    ];
    const [cmd, ...pre] = this.wrap.length > 0 ? [...this.wrap, ETCD_BIN] : [ETCD_BIN];
    const proc = spawn(cmd!, [...pre, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.proc = proc;
    await new Promise<void>((resolve, reject) => {
      const onExit = (code: number | null): void => {
        this.proc = undefined;
        reject(new Error(`etcd exited (${code}) before it served clients; log:\n${this.log}`));
      };
      proc.once('error', (err) => reject(new Error(`cannot run ${ETCD_BIN} (Debian package etcd-server): ${err.message}`)));
      proc.once('exit', onExit);
      proc.stderr!.on('data', (d: Buffer) => {
        this.log = (this.log + d.toString()).slice(-50_000);
        if (/serving client traffic|ready to serve client requests/.test(this.log)) {
          proc.off('exit', onExit);
          resolve();
        }
      });
    });
    proc.once('exit', () => {
      if (this.proc === proc) this.proc = undefined;
    });
  }

  /** Stops etcd (SIGKILL: as if its host died) and waits for it to exit; its data stays for start(). */
  async stop(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = this.proc;
    if (p === undefined || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await exited;
    this.proc = undefined;
  }

  /** Starts it again on the same ports with the same data. */
  async restart(): Promise<void> {
    if (this.proc !== undefined) return;
    this.log = '';
    await this.startProcess();
  }

  async close(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
