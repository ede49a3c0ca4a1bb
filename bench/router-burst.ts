/**
 * A burst of large lookups through `kvctl router`: the product asks that the router stay under
 * 1.5 GB rss and that every call be answered or refused (RESOURCE_EXHAUSTED) quickly.
 *
 *   node dist/bench/router-burst.js [--keys 2M] [--dim 32] [--groups 8] [--replicas 1]
 *     [--calls 200] [--batch 150k] [--max-inflight-mb MB] [--warmup 3] [--after-ms 5000] [--seed 1]
 *
 * A local cluster (bench/local-cluster.ts) loads and publishes the bench's model with `kvctl load
 * --publish`; a `kvctl router` child starts (with --max-inflight-mb when given, else its default);
 * --warmup calls one at a time let it learn the table's dim; then --calls Lookups of --batch keys
 * go out at once on one gRPC channel (as test/router-limits.test.ts sends them), deadline 120 s.
 * A sampler process of its own reads the router's VmRSS every 50 ms (the bench process is busy
 * receiving answers) and VmHWM at the end. Every answer's found flags are checked against the model.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { type LookupResponse } from '../src/wire/lookup.js';
import { EmbkvClient } from '../src/wire/services.js';
import { guard, KVCTL, kvctlLoadPublish, percentiles, startCluster, type LocalCluster } from './local-cluster.js';
import { fillRequest, makeModel, requestBuffer, writeModel } from './model.js';
import { freePorts, Resources } from './resources.js';

const TABLE = 'bench_emb';
const { values: a } = parseArgs({
  options: {
    keys: { type: 'string', default: '2000000' },
    dim: { type: 'string', default: '32' },
    groups: { type: 'string', default: '8' },
    replicas: { type: 'string', default: '1' },
    calls: { type: 'string', default: '200' },
    batch: { type: 'string', default: '150000' },
    'max-inflight-mb': { type: 'string' },
    warmup: { type: 'string', default: '3' },
    'after-ms': { type: 'string', default: '5000' },
    seed: { type: 'string', default: '1' },
  },
});
const count = (s: string): number => Number(s.replace(/_/g, '').replace(/k$/i, 'e3').replace(/M$/, 'e6'));
const N = count(a.keys!), DIM = count(a.dim!), G = count(a.groups!), R = count(a.replicas!);
const CALLS = count(a.calls!), BATCH = count(a.batch!), WARMUP = count(a.warmup!), AFTER_MS = count(a['after-ms']!), SEED = count(a.seed!);
const MAX_INFLIGHT = a['max-inflight-mb'];
const ABSENT = 0.01;
const DEADLINE_MS = 120_000;

const say = (line: string): void => void process.stderr.write(`${line}\n`);
const res = new Resources();
guard(res);

type Outcome = { ms: number; answer?: LookupResponse; code?: number; details?: string };

function lookup(stub: grpc.Client, keys: BigUint64Array): Promise<LookupResponse | grpc.ServiceError> {
  return new Promise((resolve) =>
    (stub as unknown as { lookup: Function }).lookup(
      { table: TABLE, version: 0, keys: new Uint8Array(keys.buffer, keys.byteOffset, keys.byteLength) },
      { deadline: new Date(Date.now() + DEADLINE_MS) },
      (err: grpc.ServiceError | null, r: LookupResponse) => resolve(err ?? r),
    ));
}

// Samples VmRSS of a pid every 50 ms, one line `ms kB` each, stamped by its own clock; on SIGTERM it
// prints `hwm kB` (VmHWM, the kernel's peak) and exits.
const SAMPLER = `
const pid = Number(process.argv[1]);
const read = (f) => { try { const m = new RegExp(f + ':\\\\s+(\\\\d+)').exec(require('fs').readFileSync('/proc/' + pid + '/status', 'utf8')); return m ? Number(m[1]) : -1; } catch { return -1; } };
const t = setInterval(() => process.stdout.write(Date.now() + ' ' + read('VmRSS') + '\\n'), 50);
process.on('SIGTERM', () => { clearInterval(t); process.stdout.write('hwm ' + read('VmHWM') + '\\n'); });
`;

let cluster: LocalCluster | undefined;
let router: ChildProcess | undefined;
let sampler: ChildProcess | undefined;
let stub: grpc.Client | undefined;
try {
  cluster = await startCluster(G, R, res, `burst-g${G}r${R}`);
  // The requests are built from the model, then the model is dropped: only keys and found counts stay.
  let model: ReturnType<typeof makeModel> | undefined = makeModel(N, DIM, SEED);
  const modelDir = join(cluster.dir, 'model');
  await writeModel(model, modelDir, 4);
  say(`  ${await kvctlLoadPublish(cluster.configPath, TABLE, modelDir)}`);
  cluster.check();
  const requests: BigUint64Array[] = [];
  const wantFound: number[] = [];
  for (let r = 0; r < WARMUP + CALLS; r++) {
    const req = requestBuffer(BATCH);
    fillRequest(req, model, r, ABSENT);
    requests.push(req.keys);
    wantFound.push(req.rows.reduce((s, row) => s + (row >= 0 ? 1 : 0), 0));
  }
  model = undefined;

  const [port] = await freePorts(1);
  const args = [KVCTL, 'router', '--config', cluster.configPath, '--port', String(port), ...(MAX_INFLIGHT !== undefined ? ['--max-inflight-mb', MAX_INFLIGHT] : [])];
  const r = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  router = r;
  res.addProcess(r);
  let routerErr = '';
  await new Promise<void>((resolve, reject) => {
    r.stderr!.on('data', (d) => {
      routerErr += d;
      if (routerErr.length > 1 << 20) routerErr = routerErr.slice(-65536);
      if (routerErr.includes('router listening')) resolve();
    });
    r.once('exit', (code) => reject(new Error(`router exited ${code}: ${routerErr}`)));
  });
  stub = new EmbkvClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': -1, 'grpc.max_send_message_length': -1 });

  const check = (i: number, x: LookupResponse | grpc.ServiceError): Outcome => {
    if (x instanceof Error) return { ms: 0, code: x.code, details: x.details };
    if (x.dim !== DIM || x.values.length !== BATCH * DIM || x.found.length !== BATCH) throw new Error(`call ${i}: answered dim ${x.dim}, ${x.values.length} floats, ${x.found.length} flags for ${BATCH} keys`);
    let found = 0;
    for (let k = 0; k < BATCH; k++) found += x.found[k]!;
    if (found !== wantFound[i]) throw new Error(`call ${i}: ${found} keys found, the model holds ${wantFound[i]}`);
    return { ms: 0 };
  };
  const warmMs: number[] = [];
  for (let i = 0; i < WARMUP; i++) {
    const t0 = performance.now();
    const x = await lookup(stub, requests[i]!);
    if (x instanceof Error) throw new Error(`warm-up call ${i}: ${x.code} ${x.details}`);
    check(i, x);
    warmMs.push(performance.now() - t0);
  }

  const rssBefore = rssKb(r.pid!);
  const samples: { at: number; kb: number }[] = [];
  let hwmKb = -1;
  const s = spawn(process.execPath, ['-e', SAMPLER, String(r.pid)], { stdio: ['ignore', 'pipe', 'inherit'] });
  sampler = s;
  res.addProcess(s);
  let buf = '';
  s.stdout!.on('data', (d) => {
    buf += d;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      const [x, y] = line.split(' ');
      if (x === 'hwm') hwmKb = Number(y);
      else samples.push({ at: Number(x), kb: Number(y) });
    }
  });

  say(`  router up (pid ${r.pid}, ${MAX_INFLIGHT !== undefined ? `--max-inflight-mb ${MAX_INFLIGHT}` : 'default --max-inflight-mb'}), warm-up calls ${warmMs.map((m) => m.toFixed(0)).join(', ')} ms; sending ${CALLS} calls of ${BATCH} keys at once`);
  const startedAt = Date.now();
  const cpu0 = { router: cpuMs(r.pid!), client: process.cpuUsage() };
  const t0 = performance.now();
  const outcomes = await Promise.all(requests.slice(WARMUP).map(async (keys, j) => {
    const x = await lookup(stub!, keys);
    const ms = performance.now() - t0;
    // Check and drop the answer at once: the client holds only what is still arriving.
    return { ...check(WARMUP + j, x), ms };
  }));
  const allMs = performance.now() - t0;
  const doneAt = Date.now();
  const routerCpuMs = cpuMs(r.pid!) - cpu0.router;
  const c1 = process.cpuUsage(cpu0.client);
  const clientCpuMs = (c1.user + c1.system) / 1000;
  // Memory that returns after the burst: rss AFTER_MS and 3 x AFTER_MS after the last answer, the router idle.
  await new Promise((res2) => setTimeout(res2, AFTER_MS));
  const rssAfter = rssKb(r.pid!);
  await new Promise((res2) => setTimeout(res2, 2 * AFTER_MS));
  const rssLater = rssKb(r.pid!);
  s.kill('SIGTERM');
  const sampled = new Promise<void>((resolve) => s.once('close', () => resolve()));
  await sampled;
  sampler = undefined;

  const answered = outcomes.filter((o) => o.code === undefined);
  const refused = outcomes.filter((o) => o.code === grpc.status.RESOURCE_EXHAUSTED);
  const other = outcomes.filter((o) => o.code !== undefined && o.code !== grpc.status.RESOURCE_EXHAUSTED);
  const during = samples.filter((x) => x.at >= startedAt && x.at <= doneAt + 50);
  const peakKb = Math.max(rssBefore, ...during.map((x) => x.kb));
  const mb = (kb: number): string => `${(kb / 1024).toFixed(0)} MB`;
  const f = (x: number): string => x.toFixed(x < 10 ? 2 : 0);
  const st = (xs: Outcome[]): string => {
    if (xs.length === 0) return '-';
    const p = percentiles(xs.map((o) => o.ms));
    return `min ${f(Math.min(...xs.map((o) => o.ms)))} / p50 ${f(p.p50)} / max ${f(p.max)} ms`;
  };
  const report = [
    `router burst: ${CALLS} concurrent Lookups of ${BATCH.toLocaleString('en-US')} keys (dim ${DIM}), ${G} groups x ${R} replicas, ${N.toLocaleString('en-US')} keys, router ${MAX_INFLIGHT !== undefined ? `--max-inflight-mb ${MAX_INFLIGHT}` : 'default (--max-inflight-mb 1024)'}`,
    `answered ${answered.length}, refused RESOURCE_EXHAUSTED ${refused.length}, other ${other.length}${other.length > 0 ? ` (${[...new Set(other.map((o) => `${grpc.status[o.code!]}: ${o.details}`))].slice(0, 3).join('; ')})` : ''}`,
    `every call had its answer or refusal after ${(allMs / 1000).toFixed(2)} s; answers: ${st(answered)}; refusals: ${st(refused)}`,
    `CPU during the burst: router ${f(routerCpuMs)} ms, this client ${f(clientCpuMs)} ms (${(allMs / 1000).toFixed(2)} s of wall time, 2 cores)`,
    `router rss: ${mb(rssBefore)} before, peak ${mb(peakKb)} sampled every 50 ms (${during.length} samples), VmHWM ${mb(hwmKb)}; ${mb(rssAfter)} ${(AFTER_MS / 1000).toFixed(0)} s and ${mb(rssLater)} ${((3 * AFTER_MS) / 1000).toFixed(0)} s after the last answer`,
    `bar: router rss under 1.5 GB: ${Math.max(peakKb, hwmKb) < 1.5 * 1024 * 1024 ? 'met' : 'NOT MET'}`,
  ];
  if (refused.length > 0) report.push(`a refusal said: ${refused[0]!.details}`);
  process.stdout.write(report.join('\n') + '\n');
  cluster.check();
} finally {
  stub?.close();
  sampler?.kill('SIGKILL');
  if (router !== undefined && router.exitCode === null && router.signalCode === null) {
    const gone = once(router, 'exit');
    router.kill('SIGTERM');
    const t = setTimeout(() => router?.kill('SIGKILL'), 15_000);
    await gone;
    clearTimeout(t);
  }
  await cluster?.stop();
  await res.shutdown();
}

function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : -1;
}

/** CPU time (user + system) of a process from /proc/PID/stat, in ms (USER_HZ 100). */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) * 10;
}
