/**
 * Load rate from S3-compatible object storage against local files: the same NumPy dump, loaded by
 * `kvctl load --full --publish` from a local directory and from s3rver on loopback, runs alternating.
 *
 *   node dist/bench/s3-load.js [--keys 1M] [--dim 32] [--groups 2] [--parts 4] [--runs 3]
 *
 * A local cluster (bench/local-cluster.ts) of --groups x 1 replica; s3rver in a process of its own
 * (test/helpers/s3.ts) stores under the bench's temp dir. The figure is kvctl's own (rows/s, from
 * the start of the load to every replica sealed and published); the result is the ratio of the
 * medians, S3 / local.
 */
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { promisify } from 'node:util';
import { S3RVER_ENV, TestS3 } from '../test/helpers/s3.js';
import { guard, KVCTL, startCluster } from './local-cluster.js';
import { makeModel, writeModel } from './model.js';
import { Resources } from './resources.js';

const { values: a } = parseArgs({
  options: {
    keys: { type: 'string', default: '1M' },
    dim: { type: 'string', default: '32' },
    groups: { type: 'string', default: '2' },
    parts: { type: 'string', default: '4' },
    runs: { type: 'string', default: '3' },
  },
});
const count = (s: string): number => Number(s.replace(/_/g, '').replace(/k$/i, 'e3').replace(/M$/, 'e6'));
const N = count(a.keys!), DIM = count(a.dim!), G = count(a.groups!), PARTS = count(a.parts!), RUNS = count(a.runs!);
const say = (line: string): void => void process.stderr.write(`${line}\n`);
const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;

const res = new Resources();
guard(res);
let s3: TestS3 | undefined;
try {
  const cluster = await startCluster(G, 1, res, 's3load');
  const dir = join(cluster.dir, 'model');
  await writeModel(makeModel(N, DIM, 1), dir, PARTS);
  writeFileSync(join(dir, '_SUCCESS'), '');
  s3 = await TestS3.start(join(cluster.dir, 's3'));
  await s3.putDir(dir, 'model/');
  say(`${N} keys of dim ${DIM} in ${PARTS} NumPy pairs (${((N * (DIM * 4 + 8)) / 1e6).toFixed(0)} MB), ${G} groups x 1 replica; s3rver at ${s3.endpoint}`);
  const env = { ...process.env, ...S3RVER_ENV };
  const rates: Record<'local' | 's3', number[]> = { local: [], s3: [] };
  let version = 1;
  for (let run = 0; run < RUNS; run++) {
    for (const where of ['local', 's3'] as const) {
      const path = where === 'local' ? dir : s3.url('model/');
      const args = [KVCTL, 'load', '--config', cluster.configPath, '--table', 'bench_emb', '--version', String(version++), '--full', path, '--publish',
        ...(where === 's3' ? ['--s3-endpoint', s3.endpoint] : [])];
      const { stdout } = await promisify(execFile)(process.execPath, args, { env, maxBuffer: 1 << 20 });
      const rate = Number(/\((\d+) rows\/s\)/.exec(stdout)?.[1]);
      if (!Number.isFinite(rate)) throw new Error(`no rate in: ${stdout}`);
      rates[where].push(rate);
      say(`run ${run + 1} ${where.padEnd(5)} ${stdout.trim()}`);
      cluster.check();
    }
  }
  const fmt = (xs: number[]): string => xs.map((x) => `${(x / 1e6).toFixed(2)}M`).join(', ');
  const ratio = median(rates.s3) / median(rates.local);
  process.stdout.write(
    `| source | rows/s per run | median |\n|---|---|---|\n` +
      `| local files | ${fmt(rates.local)} | ${(median(rates.local) / 1e6).toFixed(2)}M |\n` +
      `| s3rver on loopback | ${fmt(rates.s3)} | ${(median(rates.s3) / 1e6).toFixed(2)}M |\n` +
      `\nS3 / local (medians): ${ratio.toFixed(2)}x\n`,
  );
  await s3.close();
  s3 = undefined;
  await cluster.stop();
} finally {
  await s3?.close();
  await res.shutdown();
}
