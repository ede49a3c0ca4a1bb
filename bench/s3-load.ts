/**
 * Load rate from S3-compatible object storage against local files: the same NumPy dump, loaded by
 * `kvctl load --full --publish` from a local directory and from s3rver on loopback, runs alternating.
 *
 *   node dist/bench/s3-load.js [--keys 1M] [--dim 32] [--groups 2] [--parts 4] [--runs 3] [--cpu]
 *
 * A local cluster (bench/local-cluster.ts) of --groups x 1 replica; s3rver in a process of its own
 * (test/helpers/s3.ts) stores under the bench's temp dir. The figure is kvctl's own (rows/s, from
 * the start of the load to every replica sealed and published); the result is the ratio of the
 * medians, S3 / local. With --cpu (Linux), each run also gives the CPU seconds that kvctl, the
 * replicas and s3rver spent on it, and kvctl's peak rss: on few cores the load is CPU-bound, and
 * CPU time is steadier than the rate when other work shares the cores.
 */
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { promisify } from 'node:util';
import { S3RVER_ENV, TestS3 } from '../test/helpers/s3.js';
import { guard, KVCTL, kvctlStatus, startCluster } from './local-cluster.js';
import { makeModel, writeModel } from './model.js';
import { Resources } from './resources.js';

const { values: a } = parseArgs({
  options: {
    keys: { type: 'string', default: '1M' },
    dim: { type: 'string', default: '32' },
    groups: { type: 'string', default: '2' },
    parts: { type: 'string', default: '4' },
    runs: { type: 'string', default: '3' },
    cpu: { type: 'boolean', default: false },
  },
});
const count = (s: string): number => Number(s.replace(/_/g, '').replace(/k$/i, 'e3').replace(/M$/, 'e6'));
const N = count(a.keys!), DIM = count(a.dim!), G = count(a.groups!), PARTS = count(a.parts!), RUNS = count(a.runs!);
const say = (line: string): void => void process.stderr.write(`${line}\n`);
const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
const CPU_REPORT = new URL('./cpu-report.js', import.meta.url).href;
/** CPU seconds a process has used (utime + stime from /proc), 0 once it is gone. */
function cpuSeconds(pid: number | undefined): number {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return 0;
  }
}

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
  const replicaPids: (number | undefined)[] = a.cpu ? (await kvctlStatus(cluster.configPath)).map((r) => r.status?.pid) : [];
  const cpu: Record<'local' | 's3', { kvctl: number; replicas: number; s3rver: number; rss: number }[]> = { local: [], s3: [] };
  let version = 1;
  for (let run = 0; run < RUNS; run++) {
    for (const where of ['local', 's3'] as const) {
      const path = where === 'local' ? dir : s3.url('model/');
      const before = { replicas: replicaPids.reduce((t: number, p) => t + cpuSeconds(p), 0), s3rver: cpuSeconds(s3.pid) };
      const args = [...(a.cpu ? ['--import', CPU_REPORT] : []), KVCTL, 'load', '--config', cluster.configPath, '--table', 'bench_emb', '--version', String(version++), '--full', path, '--publish',
        ...(where === 's3' ? ['--s3-endpoint', s3.endpoint] : [])];
      const { stdout, stderr } = await promisify(execFile)(process.execPath, args, { env, maxBuffer: 1 << 20 });
      const rate = Number(/\((\d+) rows\/s\)/.exec(stdout)?.[1]);
      if (!Number.isFinite(rate)) throw new Error(`no rate in: ${stdout}`);
      rates[where].push(rate);
      let used = '';
      if (a.cpu) {
        const report = JSON.parse(/^cpu-report (.*)$/m.exec(stderr)?.[1] ?? 'null') as { cpuMs: number; maxRssMb: number } | null;
        if (report === null) throw new Error(`no cpu-report in: ${stderr}`);
        const c = {
          kvctl: report.cpuMs / 1000, rss: report.maxRssMb,
          replicas: replicaPids.reduce((t: number, p) => t + cpuSeconds(p), 0) - before.replicas, s3rver: cpuSeconds(s3.pid) - before.s3rver,
        };
        cpu[where].push(c);
        used = ` [CPU-s: kvctl ${c.kvctl.toFixed(2)}, replicas ${c.replicas.toFixed(2)}, s3rver ${c.s3rver.toFixed(2)}; kvctl peak rss ${c.rss} MB]`;
      }
      say(`run ${run + 1} ${where.padEnd(5)} ${stdout.trim()}${used}`);
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
  if (a.cpu) {
    const m = (w: 'local' | 's3', k: 'kvctl' | 'replicas' | 's3rver' | 'rss'): number => median(cpu[w].map((c) => c[k]));
    process.stdout.write(
      `\n| source | kvctl CPU-s | replicas CPU-s | s3rver CPU-s | kvctl peak rss MB |\n|---|---|---|---|---|\n` +
        (['local', 's3'] as const).map((w) => `| ${w === 'local' ? 'local files' : 's3rver on loopback'} | ${m(w, 'kvctl').toFixed(2)} | ${m(w, 'replicas').toFixed(2)} | ${m(w, 's3rver').toFixed(2)} | ${m(w, 'rss')} |`).join('\n') +
        `\n(medians of the runs; load average at the end ${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' / ')})\n`,
    );
  }
  await s3.close();
  s3 = undefined;
  await cluster.stop();
} finally {
  await s3?.close();
  await res.shutdown();
}
