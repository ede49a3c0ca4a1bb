// TEMPORARY tuning script (not part of the bench): one cluster, alternating fault-free and stalled passes.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { waitForCluster } from '../src/cli/demo.js';
import { Supervisor } from '../src/cli/supervisor.js';
import { EmbeddingClientImpl } from '../src/client/client.js';
import type { Manifest } from '../src/common/manifest.js';
import { runLoad } from '../src/loader/loader.js';
import { timeRequests } from './measure.js';
import { fillRequest, makeModel, requestBuffer, writeModel } from './model.js';
import { freePorts, Resources } from './resources.js';
import { Staller } from './stall.js';

const res = new Resources();
const G = 8, R = 2, N = Number(process.env['N'] ?? 150), BATCH = 50_000;
const opts = JSON.parse(process.env['OPTS'] ?? '{}');
async function main(): Promise<void> {
  const dir = res.tempDir('probe');
  const ports = await freePorts(G * R);
  const manifest: Manifest = { partitions: 64, keepVersions: 2, groups: Array.from({ length: G }, (_, g) => ({ replicas: Array.from({ length: R }, (_, r) => `127.0.0.1:${ports[g * R + r]}`) })) };
  const configPath = join(dir, 'cluster.json');
  writeFileSync(configPath, JSON.stringify(manifest));
  const sup = new Supervisor({ manifest, configPath, dataDir: join(dir, 'data'), logs: 'files', report: () => {} });
  res.addSupervisor(sup);
  sup.start();
  await waitForCluster(manifest, 60_000);
  const model = makeModel(1_000_000, 32, 1);
  await writeModel(model, join(dir, 'model'), 4);
  await runLoad({ manifest, table: 't', version: 1, path: join(dir, 'model'), publish: true });
  const client = new EmbeddingClientImpl({ config: manifest, deadlineMs: 60_000, ...opts });
  const req = requestBuffer(BATCH);
  const pids = manifest.groups.map((_, g) => sup.pids()[`g${g}r0`]!);
  const sum = (f: (g: ReturnType<typeof client.stats>['groups'][number]) => number): number => client.stats().groups.reduce((a, g) => a + f(g), 0);
  for (const stall of (process.env['PASSES'] ?? '0,1,0,1').split(',').map(Number)) {
    const h0 = sum((g) => g.hedgesSent), w0 = sum((g) => g.hedgesWon);
    const st = new Staller(pids);
    if (stall) st.start();
    const f = await timeRequests({ warmup: 3, requests: N, prepare: (r) => fillRequest(req, model, r, 0.01), call: () => client.getEmbeddings(req.keys, { table: 't' }), check: () => 0 });
    const rep = await st.stop();
    const delays = client.stats().groups.map((g) => g.hedgeDelayMs).join(',');
    const gp95 = client.stats().groups.map((g) => g.latencyMs.p95).join(',');
    console.log(`${stall ? 'STALL' : 'clean'} p50 ${f.p50.toFixed(1)} p90 ${f.p90.toFixed(1)} p99 ${f.p99.toFixed(1)} max ${f.max.toFixed(1)} gc ${f.gcMsPerRequest.toFixed(1)} | hedges ${sum((g) => g.hedgesSent) - h0} won ${sum((g) => g.hedgesWon) - w0} | freezes ${rep.freezes} frac ${rep.frozenFraction.toFixed(2)} longest ${rep.longestFreezeMs.toFixed(0)} | delays ${delays} | grp p95 ${gp95}`);
  }
  await client.close();
}
main().catch((e) => console.error(e)).finally(() => res.shutdown().then(() => process.exit(0)));
