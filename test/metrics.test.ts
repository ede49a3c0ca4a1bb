import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EmbeddingClient, KvError } from '../src/index.js';
import { parseManifest } from '../src/cluster/manifest.js';
import { Fanout } from '../src/fanout/fanout.js';
import { MetricsServer } from '../src/metrics/server.js';
import { MetricSet, newRegistry } from '../src/metrics/registry.js';
import { IngestMetrics } from '../src/metrics/ingest-metrics.js';
import { WatchMetrics } from '../src/metrics/watch-metrics.js';
import { freePorts, KVCTL, startRouter, TestCluster } from './helpers/cluster.js';
import { expected, makeModel, makeRequest, sameBits, writeModelPart, type Model } from './helpers/model.js';
import { TestPrometheus } from './helpers/prometheus.js';
import { codeOf, until } from './helpers/util.js';

const DIM = 8;
const DASHBOARD = fileURLToPath(new URL('../../deploy/grafana/embkv.json', import.meta.url));
const KEYS = 1000;
const packed = (req: BigUint64Array): Uint32Array => new Uint32Array(req.buffer, req.byteOffset, req.length * 2);

describe('client options: metrics', () => {
  test('metrics takes { registry } of prom-client; anything else is refused naming the option', async () => {
    const config = parseManifest({ partitions: 1, groups: [{ replicas: ['127.0.0.1:1'] }] });
    const bad = (metrics: unknown, re: RegExp): void =>
      assert.throws(() => new EmbeddingClient({ config, metrics: metrics as never }), (e: unknown) => e instanceof KvError && e.code === 'KV_INVALID_ARGUMENT' && re.test(e.message));
    bad(true, /metrics must be an object/);
    bad({ register: newRegistry() }, /unsupported option register, use registry/);
    bad({ registry: {} }, /metrics.registry must be a prom-client Registry/);
    assert.throws(() => new EmbeddingClient({ config, registry: newRegistry() } as never), /use metrics: \{ registry \}/);

    const registry = newRegistry();
    const a = new EmbeddingClient({ config, metrics: { registry } });
    assert.equal(a.metrics, registry);
    // A second client on the same registry would report into the first one's series.
    bad({ registry }, /holds embkv_lookups_total already/);
    await a.close();
    const b = new EmbeddingClient({ config, metrics: { registry } });
    assert.match(await registry.metrics(), /# TYPE embkv_lookup_duration_seconds histogram/);
    await b.close();
    assert.doesNotMatch(await registry.metrics(), /embkv_/, 'a closed client takes its series out');
    const own = new EmbeddingClient({ config, metrics: {} });
    assert.ok(own.metrics !== undefined && own.metrics !== registry, 'a registry of its own');
    await own.close();
    const plain = new EmbeddingClient({ config });
    assert.equal(plain.metrics, undefined, 'off by default');
    await plain.close();
  });
});

describe('metrics scraped by a real Prometheus: replicas, router and SDK (2 groups x 2 replicas)', () => {
  let cluster: TestCluster;
  let model: Model;
  let prom: TestPrometheus | undefined;
  let router: Awaited<ReturnType<typeof startRouter>> | undefined;
  let routerFanout: Fanout | undefined;
  let client: EmbeddingClient | undefined;
  let sdkEndpoint: MetricsServer | undefined;
  let watcher: ChildProcess | undefined;
  /** Metrics ports: replicas g0r0 g0r1 g1r0 g1r1, the router, the SDK, a version watcher. */
  let ports: number[] = [];
  const replicaPort = (g: number, r: number): number => ports[g * 2 + r]!;

  const check = (r: { values: Float32Array; found: Uint8Array }, req: BigUint64Array): void => {
    const want = expected(model, req);
    assert.deepEqual(r.found, want.found);
    assert.ok(sameBits(r.values, want.values), 'vectors differ');
  };
  const sdkLookup = async (): Promise<void> => {
    const req = makeRequest(model, KEYS);
    check(await client!.getEmbeddings(req, { table: 'emb' }), req);
  };
  /** A lookup through the router (a Fanout whose one "replica" is the router). */
  const routerLookup = async (): Promise<void> => {
    const req = makeRequest(model, KEYS);
    check(await routerFanout!.lookup({ table: 'emb', version: 0, keys: packed(req), deadline: Date.now() + 10_000 }), req);
  };

  before(async () => {
    ports = await freePorts(7);
    cluster = await TestCluster.start(2, 2, {
      partitions: 16,
      replicaArgs: (g, r) => ['--metrics-port', String(replicaPort(g, r)), '--metrics-host', '127.0.0.1'],
    });
    model = makeModel(20_000, DIM, 7, 1);
    const dir = join(cluster.dir, 'model');
    mkdirSync(dir);
    await writeModelPart(join(dir, 'part-0'), model, 0, model.keys.length);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', dir, '--publish']);
    assert.equal(r.code, 0, r.stderr);
    router = await startRouter(cluster.configPath, ['--metrics-port', String(ports[4]), '--metrics-host', '127.0.0.1']);
    routerFanout = new Fanout(parseManifest({ partitions: 1, groups: [{ replicas: [`127.0.0.1:${router.port}`] }] }));
    // A small hedge budget, so that a frozen replica also makes the bucket refuse hedges.
    client = new EmbeddingClient({ config: cluster.configPath, metrics: {}, hedgeDelayMs: 10, hedgeMaxTokens: 2, hedgeTokenRatio: 0.1 });
    sdkEndpoint = new MetricsServer({ registry: client.metrics!, port: ports[5]!, host: '127.0.0.1' });
    await sdkEndpoint.start();
    prom = await TestPrometheus.start({
      replica: [0, 1, 2, 3].map((i) => `127.0.0.1:${ports[i]}`),
      router: [`127.0.0.1:${ports[4]}`],
      sdk: [`127.0.0.1:${ports[5]}`],
      // Down until the watcher's test starts it.
      watch: [`127.0.0.1:${ports[6]}`],
    });
  });

  after(async () => {
    if (watcher !== undefined && watcher.exitCode === null && watcher.signalCode === null) {
      const exited = new Promise((r) => watcher!.once('exit', r));
      watcher.kill('SIGKILL');
      await exited;
    }
    await prom?.stop();
    await sdkEndpoint?.close();
    await client?.close();
    routerFanout?.close();
    if (router !== undefined && router.proc.exitCode === null) {
      const exited = new Promise((r) => router!.proc.once('exit', r));
      router.proc.kill('SIGTERM');
      await exited;
    }
    await cluster?.close();
  });

  test('the endpoints serve the Prometheus text format at /metrics only', async () => {
    const res = await fetch(`http://127.0.0.1:${replicaPort(0, 0)}/metrics`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
    const text = await res.text();
    assert.match(text, /^embkv_replica_serving\{group="0",replica="0"\} 1$/m);
    assert.match(text, /^process_resident_memory_bytes\{group="0",replica="0"\} \d+/m, 'the process\'s own series');
    assert.equal((await fetch(`http://127.0.0.1:${replicaPort(0, 0)}/`)).status, 404);
    assert.equal((await fetch(`http://127.0.0.1:${ports[5]}/metrics`, { method: 'POST' })).status, 405);
    // Every target is up for Prometheus.
    await prom!.waitFor('count(up == 1)', (v) => v === 6);
    // A metrics port that is taken, or not a port: one line, exit 1, before the replica opens its data.
    const taken = await cluster.kvctl(['serve', '--group', '0', '--replica', '0', '--data', join(cluster.dir, 'unused'),
      '--metrics-port', String(replicaPort(0, 0)), '--metrics-host', '127.0.0.1']);
    assert.equal(taken.code, 1);
    assert.match(taken.stderr, new RegExp(`^kvctl: error: metrics endpoint 127\\.0\\.0\\.1:${replicaPort(0, 0)}: .*EADDRINUSE`, 'm'));
    const bad = await cluster.kvctl(['router', '--port', '0', '--metrics-port', '70000']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /--metrics-port must be an integer in \[0, 65535\]/);
  });

  test('lookups, keys and latency move on the SDK, the router and the replicas; versions and memory show per replica', async () => {
    for (let i = 0; i < 20; i++) await sdkLookup();
    for (let i = 0; i < 30; i++) await routerLookup();
    assert.equal(await codeOf(client!.getEmbeddings([1n], { table: 'nosuch' })), 'KV_TABLE_NOT_FOUND');
    const p = prom!;
    await p.waitFor('sum(embkv_lookups_total{job="sdk",table="emb"})', (v) => v === 20);
    await p.waitFor('sum(embkv_lookup_keys_total{job="sdk",table="emb"})', (v) => v === 20 * KEYS);
    await p.waitFor('sum(embkv_lookup_duration_seconds_count{job="sdk",table="emb"})', (v) => v === 20);
    await p.waitFor('sum(embkv_lookup_duration_seconds_bucket{job="sdk",table="emb",le="+Inf"})', (v) => v === 20);
    await p.waitFor('sum(embkv_lookup_errors_total{job="sdk",table="nosuch",code="KV_TABLE_NOT_FOUND"})', (v) => v === 1);
    await p.waitFor('sum(embkv_lookups_total{job="router",table="emb"})', (v) => v === 30);
    await p.waitFor('sum(embkv_lookup_keys_total{job="router",table="emb"})', (v) => v === 30 * KEYS);
    await p.waitFor('histogram_quantile(0.99, sum by (le) (embkv_lookup_duration_seconds_bucket{job="router",table="emb"}))', (v) => v > 0 && v < 10);
    // Every key was looked up on one replica of its group at least (and twice when hedged).
    await p.waitFor('sum(embkv_replica_lookup_keys_total{job="replica",table="emb"})', (v) => v >= 50 * KEYS);
    await p.waitFor('sum(embkv_replica_lookup_duration_seconds_count{job="replica",table="emb"})', (v) => v >= 2 * 50);
    await p.waitFor('count(embkv_replica_lookups_total{job="replica",table="emb"} > 0)', (v) => v >= 2);
    await p.waitFor('sum(embkv_replica_lookup_errors_total{job="replica",code="KV_TABLE_NOT_FOUND"})', (v) => v >= 1);
    // A refused table name is not a label on a replica.
    assert.equal((await p.query('embkv_replica_lookups_total{table="nosuch"}')).length, 0);
    await p.waitFor('count(embkv_table_current_version{job="replica",table="emb"} == 1)', (v) => v === 4);
    await p.waitFor('min(embkv_version_memory_bytes{job="replica",table="emb",version="1",state="sealed"})', (v) => v > 0);
    await p.waitFor('sum(embkv_version_keys{job="replica",table="emb",version="1"})', (v) => v === 2 * model.keys.length);
    await p.waitFor('count(embkv_replica_up{job="sdk"} == 1)', (v) => v === 4);
  });

  test('real-time puts move on the SDK and reach the replicas', async () => {
    // Keys the model does not hold, so that the lookups of later tests still answer the model's values.
    const keys = new BigUint64Array([(1n << 63n) + 1n, (1n << 63n) + 2n, (1n << 63n) + 3n]);
    await client!.putEmbeddings(keys, new Float32Array(3 * DIM).fill(0.5), { table: 'emb' });
    const p = prom!;
    await p.waitFor('sum(embkv_puts_total{job="sdk",table="emb"})', (v) => v === 1);
    await p.waitFor('sum(embkv_put_keys_total{job="sdk",table="emb"})', (v) => v === 3);
    await p.waitFor('sum(embkv_put_duration_seconds_count{job="sdk",table="emb"})', (v) => v === 1);
    // Each key on both replicas of its group.
    await p.waitFor('sum(embkv_realtime_keys{job="replica",table="emb"})', (v) => v === 6);
    await p.waitFor('max(embkv_last_put_timestamp_seconds{job="replica",table="emb"})', (v) => v > Date.now() / 1000 - 3600);
  });

  test('a frozen replica: hedges are sent, won and throttled, and Prometheus sees it down', async () => {
    const p = prom!;
    try {
      cluster.signalReplica(0, 0, 'SIGSTOP');
      // Lookups go on until Prometheus has seen what they cause: each round is one SDK and one router lookup.
      await until('hedges won and throttled in Prometheus', async () => {
        await sdkLookup();
        await routerLookup();
        const [won, sent, throttled, routerWon] = await Promise.all([
          p.scalar('sum(embkv_hedges_won_total{job="sdk",group="0"})'), p.scalar('sum(embkv_hedges_sent_total{job="sdk",group="0"})'),
          p.scalar('sum(embkv_hedges_throttled_total{job="sdk",group="0"})'), p.scalar('sum(embkv_hedges_won_total{job="router",group="0"})'),
        ]);
        return (won ?? 0) > 0 && (sent ?? 0) >= (won ?? 0) && (throttled ?? 0) > 0 && (routerWon ?? 0) > 0 ? true : undefined;
      }, { timeoutMs: 120_000 });
      // The frozen process does not answer its scrape.
      await p.waitFor(`up{job="replica",instance="127.0.0.1:${replicaPort(0, 0)}"}`, (v) => v === 0);
      // Group 1 was never slow: nothing hedged there beyond what a busy machine causes, and no failures.
      await p.waitFor('sum(embkv_lookup_errors_total{job="sdk",table="emb"}) or vector(0)', (v) => v === 0);
    } finally {
      await cluster.ensureAllUp();
    }
    await p.waitFor(`up{job="replica",instance="127.0.0.1:${replicaPort(0, 0)}"}`, (v) => v === 1);
  });

  test('a version watcher: its actions and the load it ran show, and the replicas serve what it published', async () => {
    const source = join(cluster.dir, 'source');
    const dir = join(source, 'full', '3');
    mkdirSync(dir, { recursive: true });
    const m = makeModel(5000, DIM, 11, 2);
    await writeModelPart(join(dir, 'part-0'), m, 0, m.keys.length);
    writeFileSync(join(dir, '_SUCCESS'), '');
    watcher = spawn(process.execPath, [KVCTL, 'watch', '--config', cluster.configPath, '--table', 'wt', '--source', source, '--interval', '100ms',
      '--metrics-port', String(ports[6]), '--metrics-host', '127.0.0.1'], { stdio: ['ignore', 'ignore', 'ignore'] });
    const p = prom!;
    await p.waitFor('sum(embkv_watch_actions_total{job="watch",table="wt",action="published"})', (v) => v === 1);
    await p.waitFor('sum(embkv_watch_actions_total{job="watch",table="wt",action="loaded"})', (v) => v === 1);
    await p.waitFor('max(embkv_watch_last_action_timestamp_seconds{job="watch",table="wt",action="published"})', (v) => v > 0);
    await p.waitFor('count(embkv_table_current_version{job="replica",table="wt"} == 3)', (v) => v === 4);
    await p.waitFor('sum(embkv_version_keys{job="replica",table="wt",version="3"})', (v) => v === 2 * m.keys.length);
    const exited = new Promise((r) => watcher!.once('exit', r));
    watcher.kill('SIGTERM');
    assert.equal(await exited, 0);
  });

  test('a killed replica: the SDK retries elsewhere and reports it down, then up once it is back', async () => {
    const p = prom!;
    try {
      await cluster.stopReplica(1, 1, 'SIGKILL');
      await until('the SDK to see g1r1 down in Prometheus', async () => {
        await sdkLookup();
        return (await p.scalar('embkv_replica_up{job="sdk",group="1",replica="1"}')) === 0 ? true : undefined;
      });
      await p.waitFor('sum(embkv_retries_total{job="sdk",group="1"}) + sum(embkv_replica_failures_total{job="sdk",group="1",replica="1"})', (v) => v > 0);
    } finally {
      await cluster.ensureAllUp();
    }
    await p.waitFor('embkv_replica_up{job="sdk",group="1",replica="1"}', (v) => v === 1);
    await p.waitFor(`embkv_replica_serving{job="replica",instance="127.0.0.1:${replicaPort(1, 1)}"}`, (v) => v === 1);
  });

  test('the Grafana dashboard: every query runs on Prometheus, on series that embkv serves', async () => {
    const p = prom!;
    const dash = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as { panels: { title: string; targets?: { expr: string }[] }[] };
    const exprs = dash.panels.flatMap((x) => (x.targets ?? []).map((t) => ({ panel: x.title, expr: t.expr })));
    assert.ok(exprs.length >= 20, `${exprs.length} queries`);
    // Every series the endpoints declare (a gauge such as load progress has samples only during a
    // load), and the watcher's and the ingester's.
    const served = new Set<string>();
    const declare = (text: string): void => {
      for (const m of text.matchAll(/^# TYPE (embkv_\w+) (\w+)$/gm)) {
        served.add(m[1]!);
        if (m[2] === 'histogram') for (const x of ['_bucket', '_sum', '_count']) served.add(m[1]! + x);
      }
    };
    for (const port of [replicaPort(0, 0), ports[4], ports[5]]) declare(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
    const local = newRegistry();
    new IngestMetrics(new MetricSet(local), 't');
    new WatchMetrics(new MetricSet(local), 't');
    declare(await local.metrics());
    for (const { panel, expr } of exprs) {
      for (const name of expr.match(/\bembkv_\w+/g) ?? []) assert.ok(served.has(name), `panel ${panel}: ${name} is not a series embkv serves`);
      const q = expr.replaceAll('$__rate_interval', '1m').replace(/\$\w+/g, '.*');
      await p.query(q); // throws on a query Prometheus refuses
    }
  });
});
