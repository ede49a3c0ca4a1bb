import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Supervisor } from '../src/cli/supervisor.js';
import { EmbeddingClientImpl } from '../src/client/client.js';
import type { EmbeddingsResult } from '../src/client/client.js';
import { loadManifest, type Manifest } from '../src/cluster/manifest.js';
import { timeRequests, type RequestFigures } from './measure.js';
import { fillRequest, requestBuffer, verifyAnswer, type Model, type RequestBuffer } from './model.js';
import { kvctlStatus as kvctlStatusOf } from './local-cluster.js';
import { freePorts, type Resources } from './resources.js';
import { Staller, type StallReport } from './stall.js';

export const TABLE = 'bench_emb';

export interface EmbkvConfig {
  groups: number;
  replicas: number;
  requests: number;
  warmup: number;
  batch: number;
  absent: number;
  /** --stall: time the requests again while replica 0 of every group is frozen now and then. */
  stall?: boolean;
  /** --during-load: time requests while a second version loads into the write version. */
  duringLoad?: boolean;
  /** Start the replicas with glibc's default malloc settings instead of REPLICA_MALLOC_ENV. */
  defaultMalloc?: boolean;
  /** Start the replicas with V8's default GC threads instead of REPLICA_NODE_FLAGS. */
  defaultGc?: boolean;
  /** --reuse-output: every request writes into the same `out` arrays (checked before the next one). */
  reuseOutput?: boolean;
}

/** The same requests, timed while replica 0 of every group is frozen now and then (--stall). */
export interface StalledFigures extends RequestFigures, StallReport {
  hedgesSent: number;
  hedgesWon: number;
  hedgesThrottled: number;
  retries: number;
}

export interface EmbkvFigures extends RequestFigures {
  /** CPU time of all replicas together (user + system) per request, warm-up requests included. */
  replicaCpuMsPerRequest: number;
  loadMs: number;
  loadKeysPerSec: number;
  /** Sums over every replica. */
  rssBytes: number;
  versionBytes: number;
  /** Per stored copy of a key: sums divided by keys * replicas. */
  rssBytesPerKey: number;
  /** (rss while serving - rss of the empty replicas) / stored keys. */
  rssGrowthBytesPerKey: number;
  versionBytesPerKey: number;
  stalled?: StalledFigures | undefined;
  /** Requests timed while version 2 loaded (reads answered by v1). */
  duringLoad?: { requests: number; p50: number; p99: number; max: number; loadMs: number } | undefined;
}

const say = (line: string): void => void process.stderr.write(`${line}\n`);

const KVCTL = fileURLToPath(new URL('../src/cli/kvctl.js', import.meta.url));

/** A replica's entry in `kvctl status --json`. */
interface StatusEntry {
  address: string;
  error?: string;
  status?: {
    pid: number;
    rssBytes: number;
    tables: { name: string; currentVersion: number; versions: { version: number; dim: number; keys: number; bytes: number }[] }[];
  };
}

/** Whether `pid` is a `kvctl serve` process of this host. */
function isLocalReplica(pid: number): boolean {
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.some((a) => a.endsWith('kvctl.js') || a.endsWith('kvctl')) && argv.includes('serve');
  } catch {
    return false;
  }
}

type ReplicaStatus = NonNullable<StatusEntry['status']>;

/** Every replica's status; fails naming the first replica that did not answer. */
function answered(statuses: StatusEntry[]): ReplicaStatus[] {
  return statuses.map((s) => {
    if (s.error !== undefined || s.status === undefined) throw new Error(`replica ${s.address} does not answer: ${s.error ?? 'no status'}`);
    return s.status;
  });
}

/** A replica's entry for `table` v`version`, if it holds it. */
function versionOf(status: ReplicaStatus, table: string, version: number): ReplicaStatus['tables'][number]['versions'][number] | undefined {
  return status.tables.find((t) => t.name === table)?.versions.find((x) => Number(x.version) === version);
}

/** Every replica's rss, and the bytes of `table` v`version` on every replica, summed. */
function memoryOf(statuses: StatusEntry[], table: string, version: number): { rssBytes: number; versionBytes: number } {
  let rssBytes = 0;
  let versionBytes = 0;
  for (const [i, s] of answered(statuses).entries()) {
    rssBytes += Number(s.rssBytes);
    const v = versionOf(s, table, version);
    if (v === undefined) throw new Error(`status of ${statuses[i]!.address} lists no ${table} v${version}`);
    versionBytes += Number(v.bytes);
  }
  return { rssBytes, versionBytes };
}

type LookupOptions = { table: string; out?: { values: Float32Array; found: Uint8Array } };

/**
 * The timed requests through the SDK: warm-up, then `requests` of them, every answer checked against
 * the model and required to come from `version`; with the replicas' CPU over all of them.
 */
async function timeLookups(
  c: EmbeddingClientImpl, model: Model, table: string, version: number, cfg: EmbkvConfig, pids: () => readonly (number | undefined)[],
): Promise<{ figures: RequestFigures; replicaCpuMsPerRequest: number; req: RequestBuffer; opts: LookupOptions }> {
  const req = requestBuffer(cfg.batch);
  const opts: LookupOptions = {
    table,
    ...(cfg.reuseOutput === true ? { out: { values: new Float32Array(cfg.batch * model.dim), found: new Uint8Array(cfg.batch) } } : {}),
  };
  const replicaCpu0 = replicasCpuMs(pids());
  const figures = await timeRequests<EmbeddingsResult>({
    warmup: cfg.warmup,
    requests: cfg.requests,
    prepare: (r) => fillRequest(req, model, r, cfg.absent),
    call: () => c.getEmbeddings(req.keys, opts),
    check: (a, r) => {
      if (a.version !== version) throw new Error(`embkv request ${r}: answered version ${a.version}, expected ${version}`);
      return verifyAnswer(`embkv request ${r}`, a, req, model, r);
    },
  });
  return { figures, replicaCpuMsPerRequest: (replicasCpuMs(pids()) - replicaCpu0) / (cfg.warmup + cfg.requests), req, opts };
}

/**
 * --cluster: the timed requests against a running cluster (a `kvctl cluster up`, say) whose `table`
 * holds `model` (read from the NumPy files it was loaded from). Nothing is started or loaded: every
 * replica must answer and serve the table's current version with the model's dim and row count.
 * Replicas' CPU comes from /proc, so they must run on this host for that figure.
 */
export async function runEmbkvOnCluster(
  cfg: EmbkvConfig, model: Model, configPath: string, table: string,
): Promise<{ figures: EmbkvFigures; groups: number; replicas: number; version: number }> {
  const manifest = loadManifest(configPath);
  const statuses = await kvctlStatus(configPath);
  let version = 0;
  for (const [i, s] of answered(statuses).entries()) {
    const t = s.tables.find((x) => x.name === table);
    const address = statuses[i]!.address;
    if (t === undefined || t.currentVersion === 0) throw new Error(`replica ${address} serves no version of table ${table}; load the model first (kvctl load --table ${table} --version 1 --full MODEL --publish)`);
    if (version !== 0 && t.currentVersion !== version) throw new Error(`replicas serve different versions of ${table} (${version} and ${t.currentVersion}): wait for the publish to finish`);
    version = t.currentVersion;
    const dim = versionOf(s, table, version)!.dim;
    if (dim !== model.dim) throw new Error(`${table} v${version} has dim ${dim}; the model files have dim ${model.dim}`);
  }
  // Keys over the groups, each counted once (from its first replica).
  let held = 0;
  for (const g of manifest.groups) {
    const first = statuses.find((s) => s.address === g.replicas[0])!.status!;
    held += Number(versionOf(first, table, version)!.keys);
  }
  if (held !== model.n) throw new Error(`${table} v${version} holds ${held} keys over its groups; the model files have ${model.n} rows (give the files it was loaded from)`);
  // Replicas' CPU is read from /proc here: only when every replica's pid is a kvctl serve process of
  // this host (not a replica on another host, or in a PID namespace of its own).
  const pids = statuses.map((s) => s.status?.pid);
  const local = pids.every((pid) => pid !== undefined && isLocalReplica(pid));
  if (!local) say('  replicas\' CPU: not measured (not every replica is a kvctl serve process of this host)');
  const client = new EmbeddingClientImpl({ config: manifest, deadlineMs: 60_000 });
  try {
    const timed = await timeLookups(client, model, table, version, cfg, () => pids);
    const statusesAfter = await kvctlStatus(configPath);
    if (local && !statusesAfter.every((s, i) => s.status?.pid === pids[i])) throw new Error('a replica restarted during the requests: its CPU and memory figures would be wrong');
    const { rssBytes, versionBytes } = memoryOf(statusesAfter, table, version);
    // Stored copies of keys: every replica's key count of the version (groups may differ in replicas).
    let stored = 0;
    for (const st of answered(statusesAfter)) stored += Number(versionOf(st, table, version)!.keys);
    return {
      figures: {
        ...timed.figures, replicaCpuMsPerRequest: local ? timed.replicaCpuMsPerRequest : NaN, loadMs: NaN, loadKeysPerSec: NaN, rssBytes, versionBytes,
        rssBytesPerKey: rssBytes / stored, rssGrowthBytesPerKey: NaN, versionBytesPerKey: versionBytes / stored,
      },
      groups: manifest.groups.length,
      replicas: Math.round(statuses.length / manifest.groups.length),
      version,
    };
  } finally {
    await client.close();
  }
}

/**
 * Every replica's status, asked by `kvctl status --json` in a process of its own: the bench process
 * is the SDK client, and a ranking service that only looks up never loads the control service (see
 * protoPackage in src/wire/services.ts); status calls from here would load it into the heap that its
 * garbage collections walk.
 */
const kvctlStatus = (configPath: string): Promise<StatusEntry[]> => kvctlStatusOf<StatusEntry>(configPath);

/** Waits until every replica answers `kvctl status`. */
async function waitForReplicas(configPath: string, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const down = (await kvctlStatus(configPath)).filter((s) => s.error !== undefined || s.status === undefined);
    if (down.length === 0) return;
    if (Date.now() > until) throw new Error(`replicas not up after ${timeoutMs} ms: ${down.map((d) => d.address).join(', ')}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/**
 * `kvctl load --publish` in a process of its own, as a user runs it; its own rate (rows / its time
 * from the first call to the publish). A load inside the bench process would leave that process's
 * heap shaped by the loader's buffers, and the bench is the SDK client next: its first requests then
 * cost more or less than a client's would (bench/RESULTS.md, 2026-11-24, staged loads).
 */
async function kvctlLoad(configPath: string, modelDir: string, version = 1, publish = true): Promise<{ rows: number; keysPerSec: number; wallMs: number }> {
  const started = Date.now();
  const args = [KVCTL, 'load', '--config', configPath, '--table', TABLE, '--version', String(version), '--full', modelDir, ...(publish ? ['--publish'] : [])];
  const { stdout } = await promisify(execFile)(process.execPath, args, { maxBuffer: 1 << 20 });
  const m = new RegExp(`loaded \\S+ v${version}: (\\d+) keys of dim \\d+ in [\\d.]+ s \\((\\d+) rows/s\\)`).exec(stdout);
  if (m === null) throw new Error(`kvctl load said: ${stdout}`);
  return { rows: Number(m[1]), keysPerSec: Number(m[2]), wallMs: Date.now() - started };
}

/**
 * One configuration against a fresh local cluster of `kvctl serve` processes: start, load and
 * publish the model from its NumPy files, time the requests, read memory from Status, stop.
 */
/** Set by the bench when it starts itself again with CLIENT_MALLOC_ENV: the variables it added. */
export const ADDED_MALLOC_VARS = 'EMBKV_BENCH_ADDED_MALLOC';

/** The bench's environment without the client malloc settings it added for itself. */
export function replicaBaseEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const k of (env[ADDED_MALLOC_VARS] ?? '').split(',')) if (k !== '') delete env[k];
  delete env[ADDED_MALLOC_VARS];
  return env;
}

/** Linux's USER_HZ: /proc/PID/stat counts CPU time in 1/100 s. */
const TICKS_PER_SECOND = 100;

/** CPU time (user + system) of these replica processes, in ms; 0 for a process already gone. */
function replicasCpuMs(pids: readonly (number | undefined)[]): number {
  let ms = 0;
  for (const pid of pids) {
    if (pid === undefined) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      // Fields after the command name in parentheses: state is the first, utime the 12th, stime the 13th.
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ms += ((Number(f[11]) + Number(f[12])) * 1000) / TICKS_PER_SECOND;
    } catch {
      // not on Linux, or the process is gone
    }
  }
  return ms;
}

export async function runEmbkv(cfg: EmbkvConfig, model: Model, modelDir: string, res: Resources): Promise<EmbkvFigures> {
  const dir = res.tempDir(`g${cfg.groups}r${cfg.replicas}`);
  const ports = await freePorts(cfg.groups * cfg.replicas);
  const manifest: Manifest = {
    partitions: Math.max(64, cfg.groups),
    keepVersions: 2,
    groups: Array.from({ length: cfg.groups }, (_, g) => ({
      replicas: Array.from({ length: cfg.replicas }, (_, r) => `127.0.0.1:${ports[g * cfg.replicas + r]}`),
    })),
  };
  const configPath = join(dir, 'cluster.json');
  writeFileSync(configPath, JSON.stringify(manifest, null, 2) + '\n');
  const dataDir = join(dir, 'data');
  // Any replica exit during a run spoils its figures: remember it and fail the run.
  const exits: string[] = [];
  const sup = new Supervisor({ manifest, configPath, dataDir, logs: 'files', report: (l) => exits.push(l), mallocEnv: cfg.defaultMalloc !== true, nodeFlags: cfg.defaultGc !== true, env: replicaBaseEnv() });
  res.addSupervisor(sup);
  const checkReplicas = (): void => {
    if (exits.length === 0) return;
    let tail = '';
    const name = /replica (g\d+r\d+)/.exec(exits[0]!)?.[1];
    if (name !== undefined) {
      try {
        tail = readFileSync(join(dataDir, `${name}.log`), 'utf8').split('\n').slice(-15).join('\n');
      } catch {
        // no log to show
      }
    }
    throw new Error(`a replica exited during the benchmark: ${exits.join('; ')}${tail ? `\nlast lines of its log:\n${tail}` : ''}`);
  };

  let client: EmbeddingClientImpl | undefined;
  try {
    sup.start();
    await waitForReplicas(configPath, 60_000);
    checkReplicas();
    say(`  cluster up: ${cfg.groups} groups x ${cfg.replicas} replicas, ${manifest.partitions} partitions (logs in ${dataDir})`);

    // The replicas' rss before they hold anything, so the growth per stored key can be reported
    // apart from each process's fixed cost (runtime, gRPC, LevelDB).
    const rssEmpty = await totalRss(configPath);
    const load = await kvctlLoad(configPath, modelDir);
    if (load.rows !== model.n) throw new Error(`kvctl load loaded ${load.rows} rows, the model has ${model.n}`);
    checkReplicas();
    const loadKeysPerSec = load.keysPerSec;
    say(`  loaded and published ${model.n.toLocaleString('en-US')} keys in ${(model.n / loadKeysPerSec).toFixed(2)} s: ${Math.round(loadKeysPerSec).toLocaleString('en-US')} keys/s (kvctl load, ${(load.wallMs / 1000).toFixed(2)} s with its start)`);

    client = new EmbeddingClientImpl({ config: manifest, deadlineMs: 60_000 });
    const c = client;
    const { figures, replicaCpuMsPerRequest, req, opts } = await timeLookups(c, model, TABLE, 1, cfg, () => Object.values(sup.pids()));
    checkReplicas();

    // --stall: the same requests again, replica 0 of every group frozen at random moments.
    let stalled: StalledFigures | undefined;
    if (cfg.stall) {
      const pids = manifest.groups.map((_, g) => sup.pids()[`g${g}r0`]).filter((p): p is number => p !== undefined);
      const before = c.stats();
      const staller = new Staller(pids);
      staller.start();
      let fig: RequestFigures;
      let report: StallReport;
      try {
        fig = await timeRequests<EmbeddingsResult>({
          warmup: cfg.warmup,
          requests: cfg.requests,
          prepare: (r) => fillRequest(req, model, r, cfg.absent),
          call: () => c.getEmbeddings(req.keys, opts),
          check: (a, r) => verifyAnswer(`embkv stalled request ${r}`, a, req, model, r),
        });
      } finally {
        report = await staller.stop();
      }
      const after = c.stats();
      const delta = (f: (g: (typeof after.groups)[number]) => number): number =>
        after.groups.reduce((s, g, i) => s + f(g) - f(before.groups[i]!), 0);
      stalled = {
        ...fig, ...report,
        hedgesSent: delta((g) => g.hedgesSent), hedgesWon: delta((g) => g.hedgesWon), hedgesThrottled: delta((g) => g.hedgesThrottled), retries: delta((g) => g.retries),
      };
      checkReplicas();
    }

    // Memory while serving, after the requests: every replica's rss and the version's arrays.
    const { rssBytes, versionBytes } = memoryOf(await kvctlStatus(configPath), TABLE, 1);
    // --during-load (after memory is read, so v2 does not count): version 2 (the same files) loads into a write version while requests keep
    // coming; they are answered by v1, unchanged, and timed.
    let duringLoad: EmbkvFigures['duringLoad'];
    if (cfg.duringLoad) {
      const latencies: number[] = [];
      let done = false;
      const started = Date.now();
      const loading = kvctlLoad(configPath, modelDir, 2, false).finally(() => (done = true));
      for (let r = 0; !done || latencies.length < 5; r++) {
        fillRequest(req, model, r, cfg.absent);
        const t0 = performance.now();
        const a = await c.getEmbeddings(req.keys, opts);
        latencies.push(performance.now() - t0);
        if (a.version !== 1) throw new Error(`request during the load answered version ${a.version}, expected 1`);
        verifyAnswer(`embkv request during load ${r}`, a, req, model, r);
      }
      await loading;
      latencies.sort((x, y) => x - y);
      const pct = (p: number): number => latencies[Math.min(latencies.length - 1, Math.ceil((p / 100) * latencies.length) - 1)]!;
      duringLoad = { requests: latencies.length, p50: pct(50), p99: pct(99), max: latencies[latencies.length - 1]!, loadMs: Date.now() - started };
      checkReplicas();
    }

    const copies = model.n * cfg.replicas;
    return {
      ...figures,
      replicaCpuMsPerRequest,
      loadMs: (model.n / loadKeysPerSec) * 1000,
      loadKeysPerSec,
      rssBytes,
      versionBytes,
      rssBytesPerKey: rssBytes / copies,
      rssGrowthBytesPerKey: (rssBytes - rssEmpty) / copies,
      versionBytesPerKey: versionBytes / copies,
      stalled,
      duringLoad,
    };
  } finally {
    await client?.close();
    await res.stopSupervisor(sup);
    res.removeDir(dir);
  }
}

async function totalRss(configPath: string): Promise<number> {
  return answered(await kvctlStatus(configPath)).reduce((sum, s) => sum + Number(s.rssBytes), 0);
}
