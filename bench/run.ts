/**
 * `npm run bench -- [flags]`: starts real local clusters, loads a random model from NumPy files,
 * times 150k-key lookups through the SDK (and, with --redis, the same against redis-server), and
 * prints one markdown table row per configuration. See bench/README.md.
 */
import { spawn } from 'node:child_process';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEFAULTS, SWEEP_BIG_KEYS, SWEEP_GROUPS, SWEEP_KEYS, USAGE, parseBenchArgs, type BenchOptions } from './args.js';
import { CLIENT_MALLOC_ENV, REPLICA_MALLOC_ENV, REPLICA_NODE_FLAGS, describeMallocEnv, mallocEnvSet, withMallocEnv } from '../src/common/process-tuning.js';
import { ADDED_MALLOC_VARS, replicaBaseEnv, runEmbkv, runEmbkvOnCluster } from './embkv.js';
import { makeModel, readModel, writeModel, type Model } from './model.js';
import { REDIS_INSTALL_HINT, findRedisServer, runRedis, type RedisFigures } from './redis.js';
import { appendResults, loadLine, machineLine, rowLine, table, type Row } from './report.js';
import { Resources } from './resources.js';

const RESULTS_PATH = fileURLToPath(new URL('../../bench/RESULTS.md', import.meta.url));
const say = (line: string): void => void process.stderr.write(`${line}\n`);
const mb = (b: number): string => `${(b / 2 ** 20).toFixed(0)} MB`;

interface Config {
  keys: number;
  groups: number;
}

function configs(o: BenchOptions): Config[] {
  if (!o.sweep) return [{ keys: o.keys, groups: o.groups }];
  const keys: number[] = [...SWEEP_KEYS, ...(o.big ? [SWEEP_BIG_KEYS] : [])];
  return keys.flatMap((k) => SWEEP_GROUPS.map((g) => ({ keys: k, groups: g })));
}

async function main(o: BenchOptions, argv: string[], res: Resources): Promise<void> {
  const runEmbkvToo = o.only !== 'redis';
  const runRedisToo = o.redis && o.only !== 'embkv';
  if (runRedisToo && findRedisServer() === undefined) {
    throw new Error(`--redis needs redis-server, which is not installed here; install it with: ${REDIS_INSTALL_HINT}`);
  }
  const date = new Date().toISOString().slice(0, 10);
  const all = configs(o);
  const loadAtStart = loadLine();
  say(`embkv bench on ${machineLine()}; load average ${loadAtStart}`);
  const inherited = Object.keys(process.env).filter((k) => k.startsWith('MALLOC_')).map((k) => `${k}=${process.env[k]}`).join(' ');
  // With --cluster the replicas are not the bench's (and --default-malloc and --default-gc are refused).
  const replicasAs = o.cluster !== undefined ? 'the replicas as their cluster started them' : undefined;
  const malloc = o.defaultMalloc ? `glibc defaults${inherited ? ` except ${inherited} from the environment` : ''} in every process` :
    `${describeMallocEnv(CLIENT_MALLOC_ENV)} in the bench (the client), ${replicasAs ?? `${describeMallocEnv(REPLICA_MALLOC_ENV, replicaBaseEnv())} in the replicas`}`;
  say(`malloc: ${malloc}`);
  const clientFlags = process.execArgv.filter((f) => f.includes('gc')).join(' ');
  const gc = `${clientFlags === '' ? 'V8 default GC threads' : clientFlags} in the bench (the client), ` +
    (replicasAs ?? `${o.defaultGc ? 'V8 default GC settings' : REPLICA_NODE_FLAGS.join(' ')} in the replicas`);
  say(`gc: ${gc}`);
  if (o.cluster === undefined) say(`${all.length} configuration(s); requests: ${o.requests} timed (+${o.warmup} warm-up) of ${o.batch.toLocaleString('en-US')} keys, ${(o.absent * 100).toFixed(1)}% absent, dim ${o.dim}`);
  if (o.sweep && runRedisToo) say('redis runs once per key count; its figures repeat on every row of that key count');

  const rows: Row[] = [];
  const extra: string[] = [];
  if (o.cluster !== undefined) await onCluster(o, o.cluster, res, date, rows, extra, runEmbkvToo, runRedisToo);
  const keyCounts = o.cluster !== undefined ? [] : [...new Set(all.map((c) => c.keys))];
  for (const keys of keyCounts) {
    const t0 = performance.now();
    let model: Model | undefined = makeModel(keys, o.dim, o.seed);
    const modelRoot = res.tempDir('model');
    const modelDir = join(modelRoot, 'model');
    if (runEmbkvToo) await writeModel(model, modelDir, o.parts);
    say(`\nmodel: ${keys.toLocaleString('en-US')} random keys, dim ${o.dim} (${mb(keys * o.dim * 4)} of vectors)` +
      `${runEmbkvToo ? `, written as ${o.parts} NumPy parts` : ''} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    let redis: RedisFigures | undefined;
    const these = all.filter((c) => c.keys === keys);
    const rowsHere: Row[] = [];
    for (const c of these) {
      const row: Row = { date, keys, dim: o.dim, batch: o.batch, groups: c.groups, replicas: o.replicas };
      if (runEmbkvToo) {
        say(`\nembkv: ${keys.toLocaleString('en-US')} keys, ${c.groups} groups x ${o.replicas} replicas`);
        const e = await runEmbkv(
          { groups: c.groups, replicas: o.replicas, requests: o.requests, warmup: o.warmup, batch: o.batch, absent: o.absent, stall: o.stall, duringLoad: o.duringLoad, defaultMalloc: o.defaultMalloc, defaultGc: o.defaultGc, reuseOutput: o.reuseOutput },
          model,
          modelDir,
          res,
        );
        row.embkv = e;
        say(`  ${o.requests} requests: p50 ${e.p50.toFixed(1)} / p90 ${e.p90.toFixed(1)} / p99 ${e.p99.toFixed(1)} / max ${e.max.toFixed(1)} ms; ` +
          `client CPU ${e.cpuMsPerRequest.toFixed(1)} ms/req, GC ${e.gcMsPerRequest.toFixed(1)} ms/req (${e.gcCount} pauses, ${e.gcMajorCount} major: ${e.gcMajorMsPerRequest.toFixed(1)} ms/req); ` +
          `replicas' CPU ${e.replicaCpuMsPerRequest.toFixed(0)} ms/req in all; ` +
          `${e.verified.toLocaleString('en-US')} vectors checked bit-exact, every found flag checked`);
        say(`  memory: rss ${mb(e.rssBytes)} over ${c.groups * o.replicas} replicas (${e.rssBytesPerKey.toFixed(0)} B/key), ` +
          `index+vectors ${mb(e.versionBytes)} (${e.versionBytesPerKey.toFixed(0)} B/key; raw vectors ${o.dim * 4} B/key)`);
        if (e.stalled) {
          const st = e.stalled;
          const line = `stalled (replica 0 of every group frozen ${st.freezes} times for 60 ms, ${(st.frozenFraction * 100).toFixed(0)}% of the time, ` +
            `longest ${st.longestFreezeMs.toFixed(0)} ms): p50 ${st.p50.toFixed(1)} / p90 ${st.p90.toFixed(1)} / p99 ${st.p99.toFixed(1)} / max ${st.max.toFixed(1)} ms ` +
            `against p50 ${e.p50.toFixed(1)} / p99 ${e.p99.toFixed(1)} ms without: p99 ${(st.p99 / e.p99).toFixed(2)}× the fault-free p99; ` +
            `hedges sent ${st.hedgesSent}, won ${st.hedgesWon}, throttled ${st.hedgesThrottled}; retries ${st.retries}; ${st.requests} requests, no errors`;
          say(`  ${line}`);
          extra.push(`embkv ${keys.toLocaleString('en-US')} keys ${c.groups}×${o.replicas} ${line}`);
        }
        if (e.duringLoad) {
          const d = e.duringLoad;
          const line = `during a load of v2 (${(d.loadMs / 1000).toFixed(1)} s, into the write version, reads answered by v1): ${d.requests} requests, ` +
            `p50 ${d.p50.toFixed(1)} / p99 ${d.p99.toFixed(1)} / max ${d.max.toFixed(1)} ms against p50 ${e.p50.toFixed(1)} / p99 ${e.p99.toFixed(1)} ms idle`;
          say(`  ${line}`);
          extra.push(`embkv ${keys.toLocaleString('en-US')} keys ${c.groups}×${o.replicas} ${line}`);
        }
        extra.push(`embkv ${keys.toLocaleString('en-US')} keys ${c.groups}×${o.replicas}: load ${(e.loadMs / 1000).toFixed(2)} s; ` +
          `rss ${mb(e.rssBytes)}, index+vectors ${mb(e.versionBytes)} in total; ${e.gcCount} GC pauses in the timed requests (${e.gcMajorCount} major, ${e.gcMajorMsPerRequest.toFixed(1)} ms/req); replicas' CPU ${e.replicaCpuMsPerRequest.toFixed(0)} ms/req in all; ` +
          `${e.verified.toLocaleString('en-US')} vectors checked bit-exact`);
      }
      rowsHere.push(row);
    }
    if (runRedisToo) {
      redis = await timeRedis(o, model, res, extra);
      for (const r of rowsHere) r.redis = redis;
    }
    for (const r of rowsHere) {
      rows.push(r);
      say(`row: ${rowLine(r, runRedisToo)}`);
    }
    model = undefined;
    res.removeDir(modelRoot);
  }

  process.stdout.write(`\n${table(rows)}\n`);
  if (o.appendResults) {
    const modelLine = o.cluster !== undefined ? `model: the NumPy files at ${o.cluster.model}, table ${o.cluster.table} of the running cluster ${o.cluster.config}` : `model written as ${o.parts} NumPy parts`;
    extra.unshift(`${o.requests} timed requests (+${o.warmup} warm-up) of ${o.batch.toLocaleString('en-US')} keys, ` +
      `${(o.absent * 100).toFixed(1)}% absent, seed ${o.seed}; ${modelLine}`, `malloc: ${malloc}`, `gc: ${gc}`);
    appendResults(RESULTS_PATH, rows, argv, o.note, extra, loadAtStart);
    say(`appended to ${RESULTS_PATH}`);
  }
}

/** --cluster: one row, timed against a running cluster's table and its model's NumPy files. */
async function onCluster(
  o: BenchOptions, c: NonNullable<BenchOptions['cluster']>, res: Resources, date: string, rows: Row[], extra: string[], runEmbkvToo: boolean, runRedisToo: boolean,
): Promise<void> {
  const t0 = performance.now();
  const model = await readModel(c.model, o.seed);
  say(`\nmodel: ${model.n.toLocaleString('en-US')} keys of dim ${model.dim} read from ${c.model} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  say(`requests: ${o.requests} timed (+${o.warmup} warm-up) of ${o.batch.toLocaleString('en-US')} keys, ${(o.absent * 100).toFixed(1)}% absent`);
  const row: Row = { date, keys: model.n, dim: model.dim, batch: o.batch, groups: 0, replicas: 0 };
  if (runEmbkvToo) {
    say(`\nembkv: table ${c.table} of the cluster in ${c.config}`);
    const e = await runEmbkvOnCluster({ groups: 0, replicas: 0, requests: o.requests, warmup: o.warmup, batch: o.batch, absent: o.absent, reuseOutput: o.reuseOutput }, model, c.config, c.table);
    row.embkv = e.figures;
    row.groups = e.groups;
    row.replicas = e.replicas;
    const f = e.figures;
    const replicaCpu = Number.isNaN(f.replicaCpuMsPerRequest) ? 'not measured' : `${f.replicaCpuMsPerRequest.toFixed(0)} ms/req in all`;
    say(`  ${c.table} v${e.version} on ${e.groups} groups x ${e.replicas} replicas; ${o.requests} requests: p50 ${f.p50.toFixed(1)} / p90 ${f.p90.toFixed(1)} / p99 ${f.p99.toFixed(1)} / max ${f.max.toFixed(1)} ms; ` +
      `client CPU ${f.cpuMsPerRequest.toFixed(1)} ms/req, GC ${f.gcMsPerRequest.toFixed(1)} ms/req; replicas' CPU ${replicaCpu}; ` +
      `${f.verified.toLocaleString('en-US')} vectors checked bit-exact, every found flag checked`);
    say(`  memory: rss ${mb(f.rssBytes)} over the replicas, index+vectors ${mb(f.versionBytes)}`);
    extra.push(`embkv ${c.table} v${e.version}, ${model.n.toLocaleString('en-US')} keys ${e.groups}×${e.replicas} (running cluster): rss ${mb(f.rssBytes)}, index+vectors ${mb(f.versionBytes)}; ` +
      `replicas' CPU ${replicaCpu}; ${f.verified.toLocaleString('en-US')} vectors checked bit-exact`);
  }
  if (runRedisToo) row.redis = await timeRedis(o, model, res, extra);
  rows.push(row);
  say(`row: ${rowLine(row, runRedisToo)}`);
}

/** The same load and requests against a local redis-server, with its lines said and its detail kept for RESULTS. */
async function timeRedis(o: BenchOptions, model: Model, res: Resources, extra: string[]): Promise<RedisFigures> {
  const keys = model.n;
  say(`\nredis: ${keys.toLocaleString('en-US')} keys, ${o.redisConcurrency} concurrent MGETs per request, ${o.redisClients.length} clients side by side`);
  const redis = await runRedis(
    { requests: o.requests, warmup: o.warmup, batch: o.batch, absent: o.absent, concurrency: o.redisConcurrency, loadBatch: o.redisBatch, clients: o.redisClients, reuseOutput: o.reuseOutput },
    model,
    res,
  );
  const lines = redis.variants.map((v) => {
    const f = v.figures;
    return `${v.label}: p50 ${f.p50.toFixed(1)} / p90 ${f.p90.toFixed(1)} / p99 ${f.p99.toFixed(1)} / max ${f.max.toFixed(1)} ms; ` +
      `client CPU ${f.cpuMsPerRequest.toFixed(1)} ms/req, GC ${f.gcMsPerRequest.toFixed(1)} ms/req (${f.gcCount} pauses, ${f.gcMajorCount} major)` +
      `${v.label === redis.client ? ' <- fastest' : ''}`;
  });
  for (const l of lines) say(`  ${l}`);
  say(`  memory: used_memory ${mb(redis.usedMemoryBytes)} (${redis.usedBytesPerKey.toFixed(0)} B/key), rss ${mb(redis.rssBytes)} (${redis.rssBytesPerKey.toFixed(0)} B/key)`);
  extra.push(`redis ${redis.version} ${keys.toLocaleString('en-US')} keys: load ${(redis.loadMs / 1000).toFixed(2)} s (MSET of ${o.redisBatch} pairs, 16 in flight); ` +
    `requests as ${o.redisConcurrency} concurrent MGETs, timed in a process of their own with every client side by side (request by request, in turn); ` +
    `used_memory ${mb(redis.usedMemoryBytes)}, rss ${mb(redis.rssBytes)}`);
  for (const l of lines) extra.push(`redis ${l}`);
  return redis;
}

const argv = process.argv.slice(2);
let options: BenchOptions;
try {
  options = parseBenchArgs(argv);
} catch (err) {
  process.stderr.write(`bench: ${(err as Error).message}\n\n${USAGE}\n`);
  process.exit(2);
}
if (options.help) {
  process.stdout.write(`${USAGE}\n\ndefaults: ${JSON.stringify(DEFAULTS)}\n`);
  process.exit(0);
}
// The client runs with the malloc settings the README recommends for SDK processes (and that cluster up
// gives the replicas); they are read at process start, so the bench starts itself again with them.
// Redis's client runs in this same process, so nothing is set here that would slow it down: V8's GC
// threads stay as they are (one GC thread made the Redis client's GC twice as long).
const needMalloc = !options.defaultMalloc && !mallocEnvSet(CLIENT_MALLOC_ENV);
if (needMalloc) runAgainTuned(needMalloc, []);
else runHere(options);

/** Runs the bench in a child with the client's settings, passing signals on and exiting as it exits. */
function runAgainTuned(malloc: boolean, flags: readonly string[]): void {
  // The replicas get their own settings: the ones added here are named so that they are not passed on.
  const added = malloc ? Object.keys(CLIENT_MALLOC_ENV).filter((k) => process.env[k] === undefined) : [];
  const env = malloc ? { ...withMallocEnv(CLIENT_MALLOC_ENV), [ADDED_MALLOC_VARS]: added.join(',') } : process.env;
  const child = spawn(process.execPath, [...flags, ...process.execArgv, process.argv[1]!, ...argv], { stdio: 'inherit', env });
  // The child cleans up its replicas and temp dirs on these; this process waits for it to finish.
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => child.kill(sig));
  child.once('error', (err) => {
    say(`bench: could not start itself again with ${describeMallocEnv(CLIENT_MALLOC_ENV)} ${flags.join(' ')}: ${err.message}`);
    process.exit(1);
  });
  child.once('exit', (code, signal) => process.exit(code ?? 128 + (signal === null ? 0 : osConstants.signals[signal])));
}

function runHere(o: BenchOptions): void {
  const resources = new Resources();
  process.once('exit', () => resources.shutdownSync());
  // Ctrl-C reaches this process twice when it runs under runAgainTuned (from the terminal
  // and passed on by the parent): a second signal must not cut the cleanup short.
  let stopping = false;
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      if (stopping) return;
      stopping = true;
      say(`\nbench: ${sig}: stopping every process and removing the temp dirs`);
      void resources.shutdown().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
    });
  }
  const fail = (err: unknown): void => {
    // Stopping on a signal fails whatever was under way; the signal's exit code stands.
    if (stopping) return;
    say(`\nbench: FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    void resources.shutdown().finally(() => process.exit(1));
  };
  process.on('uncaughtException', fail);
  process.on('unhandledRejection', fail);

  main(o, argv, resources).then(
    async () => {
      await resources.shutdown();
      process.exit(0);
    },
    fail,
  );
}
