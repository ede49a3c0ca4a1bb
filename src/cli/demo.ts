import { randomFillSync } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { EmbeddingClientImpl } from '../client/client.js';
import { KvError, KvErrorCode } from '../common/errors.js';
import type { Manifest } from '../cluster/manifest.js';
import { statusAll } from '../loader/cluster-ops.js';
import { runLoad } from '../loader/loader.js';
import { writeNpyPair } from '../loader/npy-write.js';
import { ClusterConnections } from '../cluster/connections.js';
import { Progress } from './output.js';
import { Supervisor } from './supervisor.js';

export interface DemoOptions {
  manifest: Manifest;
  configPath: string;
  dataDir: string;
  keys: number;
  dim: number;
  requests: number;
  serve: boolean;
  untilSignal: () => Promise<string>;
}

const REQUEST_KEYS = 150_000;
const TABLE = 'demo_emb';

/** Waits until every replica answers Status, up to `timeoutMs`. */
export async function waitForCluster(manifest: Manifest, timeoutMs: number): Promise<void> {
  const conns = new ClusterConnections(manifest, { token: process.env['EMBKV_TOKEN'] || undefined });
  const until = Date.now() + timeoutMs;
  try {
    for (;;) {
      const all = await statusAll(conns, 1000);
      const down = all.filter((s) => s.error);
      if (down.length === 0) return;
      if (Date.now() > until) {
        throw new KvError(KvErrorCode.UNAVAILABLE, `replicas not up after ${timeoutMs} ms: ${down.map((d) => d.conn.address).join(', ')}`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    conns.close();
  }
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** `kvctl demo`: a local cluster serving a demo model, with the time of 150k-key requests printed. */
export async function runDemo(o: DemoOptions): Promise<void> {
  const say = (line: string): void => void process.stdout.write(`${line}\n`);
  const sup = new Supervisor({ manifest: o.manifest, configPath: o.configPath, dataDir: o.dataDir, logs: 'files', report: (l) => say(`kvctl: ${l}`) });
  const stopOnSignal = o.untilSignal().then(async (sig) => {
    say(`${sig}: stopping`);
    await sup.stop();
    process.exit(0);
  });
  void stopOnSignal;
  sup.start();
  process.once('exit', () => sup.killAll());
  const replicas = o.manifest.groups.reduce((a, g) => a + g.replicas.length, 0);
  say(`started ${o.manifest.groups.length} shard groups x ${o.manifest.groups[0]!.replicas.length} replicas (${replicas} processes, logs in ${o.dataDir}/gGrR.log)`);
  await waitForCluster(o.manifest, 60_000);

  // The demo model: random 64-bit keys; the first component of every vector is its row number.
  const modelDir = join(o.dataDir, 'demo-model');
  mkdirSync(modelDir, { recursive: true });
  const keys = new BigUint64Array(o.keys);
  const words = new Uint32Array(keys.buffer);
  randomFillSync(words);
  const values = new Float32Array(o.keys * o.dim);
  for (let i = 0; i < o.keys; i++) {
    values[i * o.dim] = i;
    for (let j = 1; j < o.dim; j++) values[i * o.dim + j] = Math.fround(Math.sin(i + j));
  }
  await writeNpyPair(join(modelDir, 'part-0'), keys, values, o.dim);
  say(`wrote a demo model: ${o.keys.toLocaleString('en-US')} keys, dim ${o.dim}, as NumPy files in ${modelDir}`);

  const client = new EmbeddingClientImpl({ config: o.manifest, ...(process.env['EMBKV_TOKEN'] ? { token: process.env['EMBKV_TOKEN'] } : {}) });
  let version = 1;
  try {
    const current = await client.getEmbeddings([0], { table: TABLE });
    version = current.version + 1;
  } catch (err) {
    if (!(err instanceof KvError) || (err.code !== KvErrorCode.TABLE_NOT_FOUND && err.code !== KvErrorCode.VERSION_NOT_FOUND)) throw err;
  }
  const progress = new Progress(`loading ${TABLE} v${version}`);
  const load = await runLoad({
    manifest: o.manifest, table: TABLE, version, path: join(modelDir, 'part-0'), publish: true,
    onProgress: (rows, total) => progress.update(rows, total),
  }).finally(() => progress.done());
  say(`loaded and published ${TABLE} v${version}: ${load.rows.toLocaleString('en-US')} keys in ${(load.ms / 1000).toFixed(1)} s (${Math.round(load.rows / (load.ms / 1000)).toLocaleString('en-US')} keys/s)`);

  // 150k-key requests: 1% absent keys, the rest drawn at random from the model.
  const n = REQUEST_KEYS;
  const req = new BigUint64Array(n);
  const times: number[] = [];
  let wrong = 0;
  for (let r = 0; r < o.requests + 2; r++) {
    for (let i = 0; i < n; i++) req[i] = i % 100 === 0 ? BigInt(r) * 1_000_003n + BigInt(i) + (1n << 63n) : keys[Math.floor(Math.random() * o.keys)]!;
    const t0 = performance.now();
    const res = await client.getEmbeddings(req, { table: TABLE });
    const ms = performance.now() - t0;
    if (r >= 2) times.push(ms); // the first two warm the connections and the JIT
    for (let i = 0; i < n; i += 997) {
      const absent = i % 100 === 0;
      if (absent ? res.found[i] !== 0 : res.found[i] !== 1 || keys[res.values[i * res.dim]!] !== req[i]) wrong++;
    }
  }
  times.sort((a, b) => a - b);
  say(`${o.requests} requests of ${n.toLocaleString('en-US')} keys (dim ${o.dim}): p50 ${percentile(times, 50).toFixed(1)} ms, p90 ${percentile(times, 90).toFixed(1)} ms, best ${times[0]!.toFixed(1)} ms`);
  if (wrong > 0) throw new KvError(KvErrorCode.INTERNAL, `${wrong} sampled answers were wrong`);
  say('sampled answers checked against the model: all exact');
  await client.close();
  if (!o.serve) {
    await sup.stop();
    return;
  }
  say(`serving ${TABLE} v${version} until Ctrl-C. Try: node dist/src/cli/kvctl.js status --config ${o.configPath}`);
  say(`   or: node dist/src/cli/kvctl.js get --config ${o.configPath} --table ${TABLE} ${keys[0]}`);
  await new Promise(() => undefined);
}
