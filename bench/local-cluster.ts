import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Supervisor } from '../src/cli/supervisor.js';
import type { Manifest } from '../src/cluster/manifest.js';
import { percentile } from './measure.js';
import { freePorts, type Resources } from './resources.js';

/**
 * A local cluster of `kvctl serve` processes for the fault benches (bench/puts-frozen.ts,
 * bench/router-burst.ts), started as bench/embkv.ts starts its own: a Supervisor with logs in files,
 * a temp dir from Resources, control calls through `kvctl` in processes of their own.
 */
export const KVCTL = fileURLToPath(new URL('../src/cli/kvctl.js', import.meta.url));

export interface LocalCluster {
  dir: string;
  configPath: string;
  manifest: Manifest;
  sup: Supervisor;
  /** Throws if a replica exited since the start (its figures would be wrong), with its log's tail. */
  check(): void;
  /** Stops every replica and removes the temp dir. */
  stop(): Promise<void>;
}

/** One replica's `kvctl status --json` entry (the fields these benches read). */
export interface ReplicaEntry {
  group: number;
  replica: number;
  address: string;
  error?: string;
  status?: {
    pid: number;
    rssBytes: number;
    tables: { name: string; currentVersion: number; realtimeKeys: number; realtimeBatches: number; realtimeLagMs: number }[];
  };
}

/**
 * Every replica's status, asked by `kvctl status --json` in a process of its own, so the bench process
 * (the SDK client) never loads the control service. `T` is the part of the JSON the caller reads.
 */
export async function kvctlStatus<T = ReplicaEntry>(configPath: string): Promise<T[]> {
  let stdout: string;
  try {
    ({ stdout } = await promisify(execFile)(process.execPath, [KVCTL, 'status', '--config', configPath, '--json'], { maxBuffer: 16 << 20 }));
  } catch (err) {
    // Exit 1 when a replica does not answer; the JSON still lists every replica.
    stdout = (err as { stdout?: string }).stdout ?? '';
    if (stdout === '') throw err;
  }
  return JSON.parse(stdout) as T[];
}

export async function startCluster(groups: number, replicas: number, res: Resources, prefix: string): Promise<LocalCluster> {
  const dir = res.tempDir(prefix);
  const ports = await freePorts(groups * replicas);
  const manifest: Manifest = {
    partitions: Math.max(64, groups),
    keepVersions: 2,
    groups: Array.from({ length: groups }, (_, g) => ({
      replicas: Array.from({ length: replicas }, (_, r) => `127.0.0.1:${ports[g * replicas + r]}`),
    })),
  };
  const configPath = join(dir, 'cluster.json');
  writeFileSync(configPath, JSON.stringify(manifest, null, 2) + '\n');
  const dataDir = join(dir, 'data');
  const exits: string[] = [];
  const sup = new Supervisor({ manifest, configPath, dataDir, logs: 'files', report: (l) => exits.push(l) });
  res.addSupervisor(sup);
  const cluster: LocalCluster = {
    dir, configPath, manifest, sup,
    check: () => {
      if (exits.length === 0) return;
      const name = /replica (g\d+r\d+)/.exec(exits[0]!)?.[1];
      let tail = '';
      try {
        if (name !== undefined) tail = readFileSync(join(dataDir, `${name}.log`), 'utf8').split('\n').slice(-15).join('\n');
      } catch {
        // no log to show
      }
      throw new Error(`a replica exited during the benchmark: ${exits.join('; ')}${tail ? `\nlast lines of its log:\n${tail}` : ''}`);
    },
    stop: async () => {
      await res.stopSupervisor(sup);
      res.removeDir(dir);
    },
  };
  sup.start();
  // Waiting on state: every replica answers Status.
  const until = Date.now() + 60_000;
  for (;;) {
    const down = (await kvctlStatus(configPath)).filter((s) => s.status === undefined);
    if (down.length === 0) break;
    cluster.check();
    if (Date.now() > until) throw new Error(`replicas not up after 60 s: ${down.map((d) => d.address).join(', ')}`);
    await new Promise((r) => setTimeout(r, 200));
  }
  return cluster;
}

/** `kvctl load --full DIR --publish` in a process of its own, as a user runs it. */
export async function kvctlLoadPublish(configPath: string, table: string, modelDir: string): Promise<string> {
  const { stdout } = await promisify(execFile)(process.execPath, [KVCTL, 'load', '--config', configPath, '--table', table, '--version', '1', '--full', modelDir, '--publish'], { maxBuffer: 1 << 20 });
  return stdout.trim();
}

/** p50/p90/p99 (nearest rank, as the bench's table) and max of some latencies. */
export function percentiles(ms: readonly number[]): { p50: number; p90: number; p99: number; max: number; n: number } {
  const s = [...ms].sort((a, b) => a - b);
  return { p50: percentile(s, 50), p90: percentile(s, 90), p99: percentile(s, 99), max: s[s.length - 1]!, n: s.length };
}

/** Installs the exit paths every bench script needs: Ctrl-C, SIGTERM and exit end what `res` holds. */
export function guard(res: Resources): void {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      process.stderr.write(`\n${sig}: stopping every process and removing temp dirs\n`);
      void res.shutdown().finally(() => process.exit(130));
    });
  }
  process.on('exit', () => res.shutdownSync());
}
