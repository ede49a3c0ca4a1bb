import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { parseClientOptions } from '../src/client/options.js';
import { localManifest } from '../src/cluster/manifest.js';
import { EmbeddingClient, KvError } from '../src/index.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { Fanout } from '../src/fanout/fanout.js';
import { DEFAULT_HEDGE_MAX_TOKENS, DEFAULT_HEDGE_TOKEN_RATIO, parseReplicaPolicy } from '../src/cluster/policy.js';
import { ReplicaTracker } from '../src/fanout/replica-health.js';
import { LatencyWindow, type FanoutStats } from '../src/fanout/stats.js';
import { HedgeThrottle } from '../src/fanout/throttle.js';
import { startRouter, TestCluster } from './helpers/cluster.js';
import { expected, makeModel, makeRequest, sameBits, writeModelPart, type Model } from './helpers/model.js';
import { codeOf } from './helpers/util.js';

const DIM = 16;
const DELAY = 'embkv-test-delay-ms';


const packed = (req: BigUint64Array): Uint32Array => new Uint32Array(req.buffer, req.byteOffset, req.length * 2);

const sum = (s: FanoutStats, f: (g: FanoutStats['groups'][number]) => number): number => s.groups.reduce((a, g) => a + f(g), 0);

describe('replica policy options', () => {
  test('defaults are the exported constants, and every field is validated', () => {
    const o = parseClientOptions({ config: 'x.json' });
    assert.equal(o.policy.hedging, true);
    assert.equal(o.policy.hedgeDelayMs, undefined, 'adaptive by default');
    assert.equal(o.policy.hedgeMaxTokens, DEFAULT_HEDGE_MAX_TOKENS);
    assert.equal(o.policy.hedgeTokenRatio, DEFAULT_HEDGE_TOKEN_RATIO);
    const bad = (opts: object, re: RegExp): void =>
      assert.throws(() => parseClientOptions(opts), (e: unknown) => e instanceof KvError && e.code === 'KV_INVALID_ARGUMENT' && re.test(e.message));
    bad({ hedgeDelay: 10 }, /unsupported option hedgeDelay, use hedgeDelayMs/);
    bad({ maxTokens: 10 }, /use hedgeMaxTokens/);
    bad({ healthCheckIntervalMs: 10 }, /use healthProbeIntervalMs/);
    bad({ hedgeDelayMs: -1 }, /hedgeDelayMs/);
    bad({ hedgeDelayMs: 10, hedgePercentile: 90 }, /hedgePercentile.*fixed hedgeDelayMs/);
    bad({ hedging: false, hedgeDelayMs: 10 }, /hedging: false/);
    bad({ hedgePercentile: 20 }, /hedgePercentile/);
    bad({ hedgeTokenRatio: 0 }, /hedgeTokenRatio/);
    bad({ hedgeMinDelayMs: 50, hedgeMaxDelayMs: 10 }, /must not exceed/);
    bad({ hedging: 'yes' }, /hedging must be true or false/);
    assert.equal(parseClientOptions({ hedgeDelayMs: 0 }).policy.hedgeDelayMs, 0);
  });

  test('the hedge token bucket follows grpc-js RetryThrottler', () => {
    const t = new HedgeThrottle(4, 0.5);
    assert.ok(t.canHedge());
    t.onCost();
    assert.ok(t.canHedge()); // 3 > 2
    t.onCost();
    assert.ok(!t.canHedge()); // 2 is not > 2
    t.onAnswer();
    assert.ok(t.canHedge());
    for (let i = 0; i < 20; i++) t.onAnswer();
    assert.equal(t.level, 4, 'capped at maxTokens');
    for (let i = 0; i < 20; i++) t.onCost();
    assert.equal(t.level, 0);
  });

  test('a replica that keeps losing to hedges is passed over twice as long each time, until it answers first', () => {
    // Real connections to a port nothing listens on; they are never dialled here.
    const conns = new ClusterConnections(localManifest(1, 1, 1));
    const t = new ReplicaTracker(conns.groups[0]![0]!, 250);
    try {
      const now = 1_000_000;
      const passedOver = (held: number): number => {
        t.avoid(now, held);
        return t.avoidUntil - now;
      };
      assert.equal(passedOver(5), 20, 'at least 20 ms');
      assert.equal(passedOver(5), 40);
      assert.equal(passedOver(5), 80);
      for (let i = 0; i < 12; i++) passedOver(5);
      assert.equal(t.avoidUntil - now, 5000, 'at most 5 s');
      t.onAnswer(3);
      t.avoidUntil = 0;
      assert.equal(passedOver(30), 60, 'a win resets the streak: twice the time it held the call');
    } finally {
      t.close();
      conns.close();
    }
  });

  test('latency window percentiles are nearest-rank over the last samples', () => {
    const w = new LatencyWindow(100);
    assert.ok(Number.isNaN(w.percentiles([50])[0]!));
    for (let i = 1; i <= 250; i++) w.add(i); // keeps 151..250
    assert.deepEqual(w.percentiles([50, 95, 99, 100]), [200, 245, 249, 250]);
  });
});

describe('hedging, health and failing well on real replica processes (2 groups x 2 replicas)', () => {
  let cluster: TestCluster;
  let model: Model;
  const fanouts: Fanout[] = [];
  const clients: EmbeddingClient[] = [];

  const newFanout = (policy: Record<string, unknown> = {}): Fanout => {
    const f = new Fanout(cluster.manifest, undefined, parseReplicaPolicy(policy));
    fanouts.push(f);
    return f;
  };
  const newClient = (options: Record<string, unknown> = {}): EmbeddingClient => {
    const c = new EmbeddingClient({ config: cluster.configPath, ...options });
    clients.push(c);
    return c;
  };
  const check = (r: { values: Float32Array; found: Uint8Array }, req: BigUint64Array): void => {
    const want = expected(model, req);
    assert.deepEqual(r.found, want.found);
    assert.ok(sameBits(r.values, want.values), 'vectors differ');
  };
  /** A lookup through a bare Fanout, with the replicas' test fault switch in its metadata. */
  const lookup = (f: Fanout, req: BigUint64Array, delay?: string, deadlineMs = 5000) => {
    let metadata: grpc.Metadata | undefined;
    if (delay !== undefined) {
      metadata = new grpc.Metadata();
      metadata.set(DELAY, delay);
    }
    return f.lookup({ table: 'emb', version: 0, keys: packed(req), deadline: Date.now() + deadlineMs, metadata });
  };
  /** Sequential requests of `n` keys so that each group has enough samples for the adaptive delay. */
  const warm = async (f: Fanout | EmbeddingClient, n: number, count = 24): Promise<void> => {
    const req = makeRequest(model, n);
    for (let i = 0; i < count; i++) {
      if (f instanceof Fanout) await lookup(f, req);
      else await f.getEmbeddings(req, { table: 'emb' });
    }
  };

  before(async () => {
    cluster = await TestCluster.start(2, 2, { partitions: 16, env: { EMBKV_TEST_FAULTS: '1' } });
    model = makeModel(20_000, DIM, 5, 1);
    const dir = join(cluster.dir, 'model');
    mkdirSync(dir);
    await writeModelPart(join(dir, 'part-0'), model, 0, model.keys.length);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', dir, '--publish']);
    assert.equal(r.code, 0, r.stderr);
  });

  after(async () => {
    for (const f of fanouts) f.close();
    await Promise.all(clients.map((c) => c.close()));
    await cluster?.close();
  });

  // A fault test that fails leaves no replica down or frozen for the tests after it.
  afterEach(() => cluster.ensureAllUp());

  test('a slow replica (test switch): hedges fire and win, answers stay exact, the slow one is passed over', async () => {
    const f = newFanout();
    await warm(f, 2000);
    const before = f.stats();
    assert.equal(sum(before, (g) => g.failures), 0);
    // Replica 0 of each group answers 3 s late; the adaptive delay (p95 of a few ms, at least 5) hedges.
    for (let i = 0; i < 12; i++) {
      const req = makeRequest(model, 2000);
      const t0 = Date.now();
      const r = await lookup(f, req, 'g0r0=3000,g1r0=3000');
      check(r, req);
      assert.ok(Date.now() - t0 < 3000, `request ${i} waited for the slow replica: ${Date.now() - t0} ms`);
    }
    const s = f.stats();
    assert.equal(s.requests, 24 + 12);
    assert.equal(s.failures, 0);
    for (const g of s.groups) {
      assert.ok(g.hedgesWon > 0, `group ${g.group}: a hedge won (${JSON.stringify(g)})`);
      assert.ok(g.hedgesWon <= g.hedgesSent);
      assert.equal(g.replicas[0]!.answers, before.groups[g.group]!.replicas[0]!.answers, 'the slow replica never answered first');
      assert.ok(Number.isFinite(g.latencyMs.p99) && g.latencyMs.samples === 36);
    }
    // After losing, replica 0 is passed over: most sub-requests went to replica 1 first, without a hedge.
    assert.ok(sum(s, (g) => g.hedgesSent) < 2 * 12, `hedges ${sum(s, (g) => g.hedgesSent)}`);
  });

  test('when every replica of a group is slow, the token bucket bounds the hedges', async () => {
    const maxTokens = 4;
    const ratio = 0.1;
    const f = newFanout({ hedgeDelayMs: 5, hedgeMaxTokens: maxTokens, hedgeTokenRatio: ratio });
    const n = 30;
    for (let i = 0; i < n; i++) {
      const req = makeRequest(model, 500);
      check(await lookup(f, req, 'g0r0=40,g0r1=40'), req);
    }
    const g0 = f.stats().groups[0]!;
    // Every sub-request of group 0 wanted a hedge; the bucket allowed its upper half, then one per 1/ratio answers.
    assert.ok(g0.hedgesSent <= maxTokens / 2 + ratio * n + 1, `hedges sent ${g0.hedgesSent}`);
    assert.ok(g0.hedgesSent >= 1);
    assert.ok(g0.hedgesThrottled >= n - g0.hedgesSent - 2, `throttled ${g0.hedgesThrottled}`);
    assert.equal(g0.failures, 0);
  });

  test('a passed deadline rejects with KV_DEADLINE_EXCEEDED naming the group', async () => {
    const f = newFanout();
    const req = makeRequest(model, 300);
    const t0 = Date.now();
    const err = await lookup(f, req, '3000', 150).then(() => undefined, (e: unknown) => e);
    assert.ok(err instanceof KvError, String(err));
    assert.equal(err.code, 'KV_DEADLINE_EXCEEDED');
    assert.match(err.message, /group \d/);
    assert.ok(Date.now() - t0 < 3000, 'rejected at the deadline, not after the slow answers');
    assert.ok(sum(f.stats(), (g) => g.failures) >= 1);
    // Through the SDK too: a deadline too short for any answer.
    const c = newClient();
    assert.equal(await codeOf(c.getEmbeddings(makeRequest(model, 20_000), { table: 'emb', deadlineMs: 1 })), 'KV_DEADLINE_EXCEEDED');
  });

  /** 40 requests of 3000 keys; replica 0 of group 0 is frozen from the 5th to the 30th. */
  const runFrozen = async (c: EmbeddingClient): Promise<number[]> => {
    await warm(c, 3000);
    const latencies: number[] = [];
    try {
      for (let i = 0; i < 40; i++) {
        if (i === 5) cluster.signalReplica(0, 0, 'SIGSTOP');
        if (i === 30) cluster.signalReplica(0, 0, 'SIGCONT');
        const req = makeRequest(model, 3000);
        const t0 = Date.now();
        check(await c.getEmbeddings(req, { table: 'emb' }), req);
        latencies.push(Date.now() - t0);
      }
    } finally {
      cluster.signalReplica(0, 0, 'SIGCONT');
    }
    return latencies;
  };

  test('a replica frozen with SIGSTOP while requests run: no errors, hedges win', async () => {
    const c = newClient();
    const latencies = await runFrozen(c);
    const s = c.stats();
    assert.equal(s.failures, 0);
    const g0 = s.groups[0]!;
    assert.ok(g0.hedgesWon >= 1, `group 0: ${JSON.stringify(g0)}`);
    // Generous: nothing waited for the frozen process or anywhere near the 5 s deadline.
    assert.ok(Math.max(...latencies) < 2500, `latencies ${latencies.join(',')}`);
    // Losing again and again, it is passed over for longer each time.
    assert.ok(g0.hedgesSent <= 12, `hedges ${g0.hedgesSent}`);
  });

  test('a frozen replica is hedged away from even when the hedge budget is spent', async () => {
    // Two hedges' worth of budget (hedging stops at 1.5 tokens of 3), refilled by one token per 100
    // answers: once the frozen replica is visited a third time, the bucket refuses the hedge.
    const c = newClient({ hedgeMaxTokens: 3, hedgeTokenRatio: 0.01 });
    const latencies = await runFrozen(c);
    const s = c.stats();
    const g0 = s.groups[0]!;
    // A refused hedge on the frozen replica would have waited out the 5 s deadline and failed.
    assert.ok(g0.hedgesThrottled >= 1, `the budget ran out: ${JSON.stringify(g0)}`);
    assert.equal(s.failures, 0);
    assert.ok(g0.hedgesSent >= 3, `rescued past the budget: ${JSON.stringify(g0)}`);
    assert.ok(Math.max(...latencies) < 2500, `latencies ${latencies.join(',')}`);
  });

  test('a replica killed with kill -9 during a run: no request fails; restarted, it serves again', async () => {
    const c = newClient();
    await warm(c, 2000, 4);
    const run = async (count: number, at?: () => Promise<void>): Promise<void> => {
      for (let i = 0; i < count; i++) {
        if (i === 3 && at) await at();
        // Two requests at once so that one is in flight when the process dies.
        const reqs = [makeRequest(model, 2000), makeRequest(model, 2000)];
        const rs = await Promise.all(reqs.map((r) => c.getEmbeddings(r, { table: 'emb' })));
        rs.forEach((r, k) => check(r, reqs[k]!));
      }
    };
    await run(20, async () => {
      const killed = cluster.stopReplica(1, 0, 'SIGKILL');
      // Keep requests running while the process dies.
      await Promise.all([killed, c.getEmbeddings(makeRequest(model, 2000), { table: 'emb' })]);
    });
    const s = c.stats();
    assert.equal(s.failures, 0);
    const g1 = s.groups[1]!;
    assert.equal(g1.replicas[0]!.health, 'down');
    assert.ok(g1.retries >= 1 && g1.replicas[0]!.failures >= 1, JSON.stringify(g1));
    const answersBefore = g1.replicas[0]!.answers;

    cluster.startReplica(1, 0);
    await cluster.waitReady();
    // The health probe (with backoff) brings it back; then it takes its share again.
    const until = Date.now() + 15_000;
    while (c.stats().groups[1]!.replicas[0]!.answers === answersBefore) {
      assert.ok(Date.now() < until, `restarted replica never used again: ${JSON.stringify(c.stats().groups[1])}`);
      await run(1);
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(c.stats().groups[1]!.replicas[0]!.health, 'up');
  });

  test('the router serves its stats to kvctl status --router', async () => {
    const { proc: router, port } = await startRouter(cluster.configPath);
    try {
      // Two lookups through the router, as any gRPC client would send them.
      const { EmbkvClient } = await import('../src/wire/services.js');
      const stub = new EmbkvClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': -1 });
      try {
        for (let i = 0; i < 2; i++) {
          const req = makeRequest(model, 1000);
          await new Promise<void>((resolve, reject) =>
            (stub as unknown as { lookup: Function }).lookup({ table: 'emb', version: 0, keys: new Uint8Array(req.buffer) }, (e: Error | null) => (e ? reject(e) : resolve())),
          );
        }
      } finally {
        stub.close();
      }
      const st = await cluster.kvctl(['status', '--router', `127.0.0.1:${port}`]);
      assert.equal(st.code, 0, st.stderr);
      assert.match(st.stdout, new RegExp(`router 127\\.0\\.0\\.1:${port}`));
      assert.match(st.stdout, /requests 2 {2}failures 0/);
      assert.match(st.stdout, /group 1 {2}requests 2 {2}hedges \d+ \(won \d+, throttled \d+\) {2}retries \d+/);
      const js = await cluster.kvctl(['status', '--json', '--router', `127.0.0.1:${port}`]);
      const parsed = JSON.parse(js.stdout) as { replicas: unknown[]; router: { stats: FanoutStats } };
      assert.equal(parsed.replicas.length, 4);
      assert.equal(parsed.router.stats.requests, 2);
      assert.equal(parsed.router.stats.groups.length, 2);
    } finally {
      router.kill('SIGTERM');
    }
    const gone = await cluster.kvctl(['status', '--router', `127.0.0.1:${port}`]);
    assert.equal(gone.code, 1);
    assert.match(gone.stdout, /router .* DOWN/);
  });

  test('a whole group down rejects fast with KV_UNAVAILABLE naming the group', async () => {
    const c = newClient();
    await warm(c, 1000, 4);
    await Promise.all([cluster.stopReplica(1, 0, 'SIGKILL'), cluster.stopReplica(1, 1, 'SIGKILL')]);
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now();
      const err = await c.getEmbeddings(makeRequest(model, 1000), { table: 'emb' }).then(() => undefined, (e: unknown) => e);
      const ms = Date.now() - t0;
      assert.ok(err instanceof KvError, String(err));
      assert.equal(err.code, 'KV_UNAVAILABLE');
      assert.match(err.message, /group 1/);
      assert.equal(err.detail?.['group'], 1);
      // Before the 5 s deadline: calls to a dead replica fail at once (no waitForReady).
      assert.ok(ms < 5000, `took ${ms} ms`);
    }
    const s = c.stats();
    assert.equal(s.groups[1]!.replicas.every((r) => r.health === 'down'), true);
    assert.ok(s.groups[1]!.failures >= 3);
    cluster.startReplica(1, 0);
    cluster.startReplica(1, 1);
    await cluster.waitReady();
    const until = Date.now() + 15_000;
    for (;;) {
      const req = makeRequest(model, 1000);
      const r = await c.getEmbeddings(req, { table: 'emb' }).catch((e: unknown) => e as Error);
      if (!(r instanceof Error)) {
        check(r, req);
        break;
      }
      assert.ok(Date.now() < until, `group 1 never came back: ${String(r)}`);
      await new Promise((res) => setTimeout(res, 100));
    }
  });
});
