/**
 * How soon `kvctl watch` serves a version after its _SUCCESS marker appears in object storage:
 * versions uploaded to s3rver on loopback one after another while `kvctl watch --interval I` runs,
 * each marker at a random point of the watcher's cycle.
 *
 *   node dist/bench/watch-latency.js [--interval 2s] [--versions 12] [--full-keys 200k] [--delta-keys 20k] [--big-full-keys 1M] [--dim 32]
 *
 * A local cluster (bench/local-cluster.ts) of 2 groups x 1 replica; s3rver (test/helpers/s3.ts).
 * Versions 1..V: a full version every 4th, deltas between; each uploaded (parts, then _SUCCESS last)
 * a random fraction of the interval after the one before was published. Then a long load: a full
 * version of --big-full-keys, and while the watcher loads it, two deltas complete on top of it: they
 * must follow it at once, not an interval later.
 *
 * marker -> served is measured by this process, from its PUT of _SUCCESS answered to the watcher's
 * `published` line read; the watcher's own figure (from the marker's LastModified, whole seconds in
 * a HEAD answer) is shown beside it.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { S3RVER_ENV, TestS3 } from '../test/helpers/s3.js';
import { guard, KVCTL, kvctlStatus, startCluster } from './local-cluster.js';
import { makeModel, Rng, writeModel } from './model.js';
import { Resources } from './resources.js';

const { values: a } = parseArgs({
  options: {
    interval: { type: 'string', default: '2s' },
    versions: { type: 'string', default: '12' },
    'full-keys': { type: 'string', default: '200k' },
    'delta-keys': { type: 'string', default: '20k' },
    'big-full-keys': { type: 'string', default: '1M' },
    dim: { type: 'string', default: '32' },
  },
});
const count = (s: string): number => Number(s.replace(/_/g, '').replace(/k$/i, 'e3').replace(/M$/, 'e6'));
const INTERVAL_MS = /^(\d+)(ms|s)$/.exec(a.interval!) ? Number(a.interval!.replace(/ms|s/, '')) * (a.interval!.endsWith('ms') ? 1 : 1000) : NaN;
if (!Number.isFinite(INTERVAL_MS)) throw new Error('--interval: 500ms, 2s');
const V = count(a.versions!), FULL = count(a['full-keys']!), DELTA = count(a['delta-keys']!), BIG = count(a['big-full-keys']!), DIM = count(a.dim!);
const say = (line: string): void => void process.stderr.write(`${line}\n`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Row {
  dir: string;
  keys: number;
  /** ms from the marker's PUT answered to the published line read. */
  delayMs: number;
  /** The watcher's own figure, s. */
  watcherS: number;
  note: string;
}

const res = new Resources();
guard(res);
let s3: TestS3 | undefined;
try {
  const cluster = await startCluster(2, 1, res, 'watchlat');
  s3 = await TestS3.start(join(cluster.dir, 's3'));
  const store = s3;
  const env = { ...process.env, ...S3RVER_ENV };
  const watcher = spawn(process.execPath, [
    KVCTL, 'watch', '--config', cluster.configPath, '--table', 'bench_emb', '--source', s3.url('src/'), '--interval', a.interval!, '--s3-endpoint', s3.endpoint,
  ], { env, stdio: ['ignore', 'pipe', 'inherit'] });
  res.addProcess(watcher);
  /** Lines the watcher printed, with when this process read them. */
  const lines: { at: number; line: string }[] = [];
  const waiters: { re: RegExp; resolve: (l: { at: number; line: string }) => void; reject: (e: Error) => void }[] = [];
  watcher.once('exit', () => {
    for (const w of waiters.splice(0)) w.reject(new Error(`the watcher exited; it printed:\n${lines.map((l) => l.line).join('\n')}`));
  });
  createInterface({ input: watcher.stdout! }).on('line', (line) => {
    const l = { at: Date.now(), line };
    lines.push(l);
    for (const w of [...waiters]) {
      if (w.re.test(line)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(l);
      }
    }
  });
  const waitFor = (re: RegExp): Promise<{ at: number; line: string }> => {
    const seen = lines.find((l) => re.test(l.line));
    if (seen !== undefined) return Promise.resolve(seen);
    return new Promise((resolve, reject) => waiters.push({ re, resolve, reject }));
  };
  await waitFor(/: started/);

  /** Writes a version's parts, uploads them, then _SUCCESS; resolves when the marker's PUT is answered. */
  const upload = async (kind: 'full' | 'incremental', v: number, keys: number): Promise<number> => {
    const dir = join(cluster.dir, `${kind}-${v}`);
    await writeModel(makeModel(keys, DIM, v), dir, kind === 'full' ? 4 : 1);
    await store.putDir(dir, `src/${kind}/${v}/`);
    await store.put(`src/${kind}/${v}/_SUCCESS`, '');
    return Date.now();
  };
  const rows: Row[] = [];
  const served = async (kind: string, v: number, keys: number, marked: number, note: string): Promise<void> => {
    const p = await waitFor(new RegExp(`: published ${kind}/${v}: `));
    const watcherS = Number(/, (\d+\.\d) s after its _SUCCESS/.exec(p.line)?.[1]);
    rows.push({ dir: `${kind}/${v}`, keys, delayMs: p.at - marked, watcherS, note });
    say(`${kind}/${v}: served ${((p.at - marked) / 1000).toFixed(2)} s after its marker (${((p.at - marked) / INTERVAL_MS).toFixed(2)} intervals); ${p.line}`);
  };

  const rng = new Rng(7);
  for (let v = 1; v <= V; v++) {
    const kind = v % 4 === 1 ? 'full' : 'incremental';
    const keys = kind === 'full' ? FULL : DELTA;
    // A random point of the watcher's cycle.
    await sleep(rng.float() * INTERVAL_MS);
    const marked = await upload(kind, v, keys);
    await served(kind, v, keys, marked, '');
  }

  // A long load, with newer versions completing during it.
  const big = V + 1;
  const bigMarked = await upload('full', big, BIG);
  await waitFor(new RegExp(`: loading full/${big} `));
  const d1 = await upload('incremental', big + 1, DELTA);
  const d2 = await upload('incremental', big + 2, DELTA);
  const bigLoaded = await waitFor(new RegExp(`: published full/${big}: `));
  const during = lines.find((l) => l.line.includes(`loading full/${big} `))!.at;
  if (d2 > bigLoaded.at) say(`note: incremental/${big + 2} completed only after full/${big} was published`);
  await served('full', big, BIG, bigMarked, `a long load (${((bigLoaded.at - during) / 1000).toFixed(1)} s)`);
  await served('incremental', big + 1, DELTA, d1, `completed during full/${big}'s load`);
  await served('incremental', big + 2, DELTA, d2, `completed during full/${big}'s load`);

  const status = await kvctlStatus(cluster.configPath);
  const current = status.map((s) => s.status?.tables.find((t) => t.name === 'bench_emb')?.currentVersion);
  if (!current.every((c) => c === big + 2)) throw new Error(`the cluster serves ${current.join(', ')}, not v${big + 2}`);
  watcher.kill('SIGTERM');
  await new Promise((r) => watcher.once('exit', r));

  const x = (ms: number): string => (ms / INTERVAL_MS).toFixed(2);
  const regular = rows.filter((r) => r.note === '');
  const sorted = regular.map((r) => r.delayMs).sort((p, q) => p - q);
  process.stdout.write(
    `| version | keys | marker -> served (s) | in intervals of ${a.interval} | watcher's own figure (s) | note |\n|---|---|---|---|---|---|\n` +
      rows.map((r) => `| ${r.dir} | ${r.keys.toLocaleString('en-US')} | ${(r.delayMs / 1000).toFixed(2)} | ${x(r.delayMs)} | ${Number.isFinite(r.watcherS) ? r.watcherS.toFixed(1) : '-'} | ${r.note} |`).join('\n') +
      `\n\nMarker -> served, versions 1-${V}: median ${x(sorted[Math.floor(sorted.length / 2)]!)}, max ${x(sorted.at(-1)!)} intervals; ` +
      `after the long load: max ${x(Math.max(...rows.filter((r) => r.note !== '').slice(1).map((r) => r.delayMs)))} intervals. The cluster serves v${big + 2}.\n`,
  );
  writeFileSync(join(cluster.dir, 'watcher.log'), lines.map((l) => l.line).join('\n'));
  await s3.close();
  s3 = undefined;
  await cluster.stop();
} finally {
  await s3?.close();
  await res.shutdown();
}
