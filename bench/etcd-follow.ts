/**
 * etcd as the cluster's source of truth: how soon a running SDK client sends to a replica that came
 * back on a new address, and what a publish (or rollback) costs through the etcd key against the
 * file manifest, where kvctl flips every replica itself.
 *
 *   node dist/bench/etcd-follow.js [--moves 10] [--publishes 20]
 *
 * Two local clusters of 2 groups x 2 replica processes (the test helpers' TestCluster), one reading
 * etcd (a real etcd on loopback), one the manifest file, each holding v1 and v2 of a small table.
 * Move: replica 0 of group 0 stops (SIGTERM) and starts on another port; timed from the moment its
 * new registration reaches a watcher of etcd in this process until the client's stats show the new
 * address (polled every turn of the event loop). Publish: publishVersion in this process, v2 then a
 * rollback to v1, alternating: the status check of every replica, then the flip (etcd: the key, and
 * the wait for every replica to follow; file: a Publish call to every replica).
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Etcd3 } from 'etcd3';
import { EmbeddingClient } from '../src/index.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { clusterSource } from '../src/cluster/source.js';
import { publishVersion } from '../src/loader/cluster-ops.js';
import { freePorts, TestCluster } from '../test/helpers/cluster.js';
import { TestEtcd } from '../test/helpers/etcd.js';

const { values: a } = parseArgs({ options: { moves: { type: 'string', default: '10' }, publishes: { type: 'string', default: '20' } } });
const MOVES = Number(a.moves);
const PUBLISHES = Number(a.publishes);

const pct = (xs: number[], p: number): number => {
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
};
const summary = (xs: number[]): string => `p50 ${pct(xs, 50).toFixed(1)} / p90 ${pct(xs, 90).toFixed(1)} / max ${Math.max(...xs).toFixed(1)} ms (n=${xs.length})`;

const etcd = await TestEtcd.start();
const clusters: TestCluster[] = [];
try {
  const ce = await TestCluster.start(2, 2, { partitions: 8, etcd: { endpoint: etcd.endpoint, cluster: 'bench' } });
  clusters.push(ce);
  const cf = await TestCluster.start(2, 2, { partitions: 8 });
  clusters.push(cf);
  for (const c of [ce, cf]) {
    for (const v of [1, 2]) {
      const path = join(c.dir, `v${v}.txt`);
      writeFileSync(path, Array.from({ length: 200 }, (_, k) => `${k + 1}\t${v},${v},${v},${v}`).join('\n') + '\n');
      const r = await c.kvctl(['load', '--table', 'emb', '--version', String(v), '--full', path, v === 1 ? '--publish' : '--no-publish']);
      if (r.code !== 0) throw new Error(r.stderr);
    }
  }

  // Moves.
  const client = new EmbeddingClient({ etcd: { endpoints: [etcd.endpoint], cluster: 'bench' } });
  const keys = Array.from({ length: 200 }, (_, k) => BigInt(k + 1));
  for (let i = 0; i < 20; i++) await client.getEmbeddings(keys, { table: 'emb' });
  const kv = new Etcd3({ hosts: etcd.endpoint });
  const watcher = await kv.watch().key('/embkv/bench/members/0/0').create();
  let registered: { address: string; at: number } | undefined;
  watcher.on('put', (e) => {
    registered = { address: (JSON.parse(e.value.toString()) as { address: string }).address, at: performance.now() };
  });
  const follow: number[] = [];
  for (let i = 0; i < MOVES; i++) {
    await ce.stopReplica(0, 0, 'SIGTERM');
    const [port] = await freePorts(1);
    const address = `127.0.0.1:${port}`;
    registered = undefined;
    ce.startReplica(0, 0, {}, address);
    const seen = (): { address: string; at: number } | undefined => registered;
    while (seen()?.address !== address) await new Promise((r) => setTimeout(r, 1));
    const from = seen()!.at;
    while (client.stats().groups[0]!.replicas[0]!.address !== address) await new Promise((r) => setImmediate(r));
    follow.push(performance.now() - from);
    await ce.waitReady();
  }
  await watcher.cancel();
  kv.close();
  await client.close();

  // Publishes.
  const publishes = async (conns: ClusterConnections): Promise<number[]> => {
    const ms: number[] = [];
    for (let i = 0; i < PUBLISHES; i++) {
      const rollback = i % 2 === 1;
      const t = performance.now();
      await publishVersion(conns, { table: 'emb', version: rollback ? 1 : 2, rollback });
      ms.push(performance.now() - t);
    }
    return ms;
  };
  const source = await clusterSource({ etcd: { endpoints: [etcd.endpoint], cluster: 'bench' } });
  await source.open();
  const ec = ClusterConnections.of(source);
  const viaEtcd = await publishes(ec);
  ec.close();
  await source.close();
  const fc = new ClusterConnections(cf.manifest);
  const viaFile = await publishes(fc);
  fc.close();

  process.stdout.write([
    `etcd-follow: 2 groups x 2 replicas, etcd ${etcd.endpoint}, Node ${process.version}`,
    `- a moved replica's registration in etcd -> a running client's connection at the new address: ${summary(follow)}`,
    `- publish/rollback through the etcd key (check, flip, every replica followed): ${summary(viaEtcd)}`,
    `- publish/rollback with the file manifest (check, Publish to every replica): ${summary(viaFile)}`,
  ].join('\n') + '\n');
} finally {
  for (const c of clusters) await c.close();
  await etcd.close();
}
process.exit(0);
