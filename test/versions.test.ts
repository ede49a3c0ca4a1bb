import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { EmbeddingClient } from '../src/index.js';
import { codeOf } from './helpers/util.js';
import { writeNpy } from '../src/loader/npy-write.js';
import { KVCTL, TestCluster } from './helpers/cluster.js';
import { lookupAt } from './helpers/replica.js';
import { parseManifest } from '../src/cluster/manifest.js';
import { statusAll, type ReplicaStatus } from '../src/loader/cluster-ops.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { expected, makeModel, sameBits, scramble, writeModelPart, type Model } from './helpers/model.js';

const DIM = 8;
const N = 20_000;

/** Asserts every replica of the cluster serves `m` (plus puts folded into m) for `keys` of its own group. */
async function assertEveryReplica(cluster: TestCluster, m: Model, keys: BigUint64Array): Promise<void> {
  const want = expected(m, keys);
  for (const g of cluster.manifest.groups) {
    for (const address of g.replicas) {
      const r = await lookupAt(address, 'emb', keys);
      // A replica answers only its own partitions; compare the keys it holds.
      for (let i = 0; i < keys.length; i++) {
        if (r.found[i] === 0) continue;
        assert.equal(want.found[i], 1, `${address} serves key ${keys[i]} that should be absent`);
        assert.ok(sameBits(r.values.subarray(i * DIM, (i + 1) * DIM), want.values.subarray(i * DIM, (i + 1) * DIM)), `${address} key ${keys[i]}`);
      }
    }
  }
  // And between them, the replicas of each group hold every key that should be present.
  const seen = new Uint8Array(keys.length);
  for (const g of cluster.manifest.groups) {
    const r = await lookupAt(g.replicas[0]!, 'emb', keys);
    r.found.forEach((f, i) => (seen[i] ||= f));
  }
  assert.deepEqual(seen, want.found);
}

/** The Status of one replica, read directly. */
async function statusOf(address: string): Promise<ReplicaStatus> {
  const conns = new ClusterConnections(parseManifest({ partitions: 1, groups: [{ replicas: [address] }] }));
  try {
    const [s] = await statusAll(conns, 10_000);
    if (s?.status === undefined) throw new Error(`${address}: ${s?.error?.message}`);
    return s.status;
  } finally {
    conns.close();
  }
}

/** The current version of table emb, which every replica must agree on. */
async function currentVersions(cluster: TestCluster): Promise<number> {
  const all = await Promise.all(cluster.manifest.groups.flatMap((g) => g.replicas).map(statusOf));
  const current = new Set(all.map((s) => s.tables.find((t) => t.name === 'emb')?.currentVersion));
  assert.equal(current.size, 1, `replicas disagree on the current version: ${[...current].join(', ')}`);
  return [...current][0]!;
}

describe('versions, deltas and real-time puts on 2 groups x 2 replica processes', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let dumps: string;
  const v1 = makeModel(N, DIM, 5, 1);
  const v2 = makeModel(N, DIM, 5, 2); // the same keys, marker 2

  before(async () => {
    cluster = await TestCluster.start(2, 2, { partitions: 32, keepVersions: 2 });
    client = new EmbeddingClient({ config: cluster.configPath });
    dumps = join(cluster.dir, 'dumps');
    mkdirSync(dumps);
    await writeModelPart(join(dumps, 'v1'), v1, 0, N);
    await writeModelPart(join(dumps, 'v2'), v2, 0, N);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', join(dumps, 'v1'), '--publish']);
    assert.equal(r.code, 0, r.stderr);
  });

  after(async () => {
    await client?.close();
    await cluster?.close();
  });

  // A fault test that fails leaves no replica down, frozen or switched for the tests after it.
  afterEach(() => cluster.ensureAllUp());

  test('readers never see mixed versions through a load, publish, rollback and publish again', async () => {
    let stop = false;
    let reads = 0;
    let mixed = 0;
    const errors: unknown[] = [];
    const versions = new Set<number>();
    const reader = async (): Promise<void> => {
      const req = new BigUint64Array(2000);
      while (!stop) {
        for (let i = 0; i < req.length; i++) req[i] = v1.keys[Math.floor(Math.random() * N)]!;
        try {
          const r = await client.getEmbeddings(req, { table: 'emb' });
          reads++;
          versions.add(r.version);
          for (let i = 0; i < req.length; i++) if (r.found[i] !== 1 || r.values[i * DIM] !== r.version) mixed++;
        } catch (err) {
          errors.push(err);
        }
      }
    };
    const readers = [reader(), reader()];
    // After each step, the readers complete reads that start after it, however fast the machine is.
    const readsPast = async (n: number): Promise<void> => {
      const target = reads + n;
      while (reads < target && errors.length === 0) await new Promise((res) => setImmediate(res));
    };
    const step = async (args: string[]): Promise<void> => {
      const r = await cluster.kvctl(args);
      assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
      await readsPast(6);
    };
    await step(['load', '--table', 'emb', '--version', '2', '--full', join(dumps, 'v2')]);
    await step(['publish', '--table', 'emb', '--version', '2']);
    await step(['rollback', '--table', 'emb', '--version', '1']);
    await step(['publish', '--table', 'emb', '--version', '2']);
    stop = true;
    await Promise.all(readers);
    assert.deepEqual(errors, []);
    assert.equal(mixed, 0);
    assert.ok(reads > 8, `only ${reads} reads`);
    assert.deepEqual([...versions].sort(), [1, 2]);
  });

  test('a delta of upserts and deletes becomes a new version, bit-exact, and refusals change nothing', async () => {
    const dir = join(dumps, 'd3');
    mkdirSync(dir);
    // 300 changed keys, 200 new keys, 100 deletes.
    const upKeys = new BigUint64Array(500);
    const upVals = new Float32Array(500 * DIM);
    for (let i = 0; i < 500; i++) {
      upKeys[i] = i < 300 ? v2.keys[i]! : scramble(BigInt(i) + (1n << 61n));
      for (let j = 0; j < DIM; j++) upVals[i * DIM + j] = j === 0 ? 3 : i * 10 + j;
    }
    const delKeys = v2.keys.slice(1000, 1100);
    await writeNpy(join(dir, 'd.keys.npy'), '<u8', [500], upKeys);
    await writeNpy(join(dir, 'd.values.npy'), '<f4', [500, DIM], upVals);
    await writeNpy(join(dir, 'd.deletes.npy'), '<u8', [100], delKeys);

    // Refused first: a key both upserted and deleted, and a wrong dim.
    const bad = join(dumps, 'bad-delta');
    mkdirSync(bad);
    writeFileSync(join(bad, 'x.txt'), `${v2.keys[5]}\t${Array(DIM).fill(1).join(',')}\n${v2.keys[5]}\n`);
    const r1 = await cluster.kvctl(['load', '--table', 'emb', '--version', '3', '--incremental', bad]);
    assert.equal(r1.code, 1);
    assert.match(r1.stderr, /x\.txt: line 2: key \d+ is repeated within this delta/);
    const bad2 = join(dumps, 'bad-delta-dim');
    mkdirSync(bad2);
    writeFileSync(join(bad2, 'x.txt'), `${v2.keys[5]}\t1,2,3\n`);
    const r2 = await cluster.kvctl(['load', '--table', 'emb', '--version', '3', '--incremental', bad2]);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /dim/);

    const ok = await cluster.kvctl(['load', '--table', 'emb', '--version', '3', '--incremental', dir]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /a delta on v2: 500 upserts and 100 deletes/);

    const v3 = applyDelta(v2, upKeys, upVals, delKeys);
    const probe = new BigUint64Array([...upKeys, ...delKeys, ...v2.keys.slice(2000, 4000)]);
    const res = await client.getEmbeddings(probe, { table: 'emb' });
    assert.equal(res.version, 3);
    const want = expected(v3, probe);
    assert.deepEqual(res.found, want.found);
    assert.ok(sameBits(res.values, want.values));
    // v2 is kept and unchanged underneath.
    const old = await client.getEmbeddings(probe, { table: 'emb', version: 2 });
    assert.ok(sameBits(old.values, expected(v2, probe).values));
    // keepVersions 2: v1 is gone, from memory and disk.
    const st = await cluster.kvctl(['status', '--json']);
    const reps = JSON.parse(st.stdout) as { status: { tables: { currentVersion: number; versions: { version: number; baseVersion: number }[] }[] } }[];
    for (const rep of reps) {
      assert.equal(rep.status.tables[0]!.currentVersion, 3);
      assert.deepEqual(rep.status.tables[0]!.versions.map((v) => `${v.version}<${v.baseVersion}`), ['2<0', '3<2']);
    }
    const back = await cluster.kvctl(['rollback', '--table', 'emb', '--version', '1']);
    assert.equal(back.code, 1);
    state.v3 = v3;
  });

  const state: { v3?: Model; withPuts?: Model } = {};

  test('2,000 real-time puts are visible on every replica within a second', async () => {
    const v3 = state.v3!;
    const keys = new BigUint64Array(2000);
    const values = new Float32Array(2000 * DIM);
    for (let i = 0; i < 2000; i++) {
      keys[i] = i % 2 === 0 ? v3.keys[i]! : scramble(BigInt(i) + (1n << 60n));
      for (let j = 0; j < DIM; j++) values[i * DIM + j] = -(i * 100 + j);
    }
    for (let b = 0; b < 20; b++) {
      await client.putEmbeddings(keys.slice(b * 100, (b + 1) * 100), values.slice(b * 100 * DIM, (b + 1) * 100 * DIM), { table: 'emb' });
    }
    const acked = Date.now();
    const m = foldPuts(v3, keys, values);
    // Every replica, read directly, within a second of the last acknowledgement.
    let lastErr: unknown;
    for (;;) {
      try {
        await assertEveryReplica(cluster, m, keys);
        break;
      } catch (err) {
        lastErr = err;
        if (Date.now() - acked > 1000) throw lastErr;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    state.withPuts = m;
    const st = await cluster.kvctl(['status']);
    assert.equal(st.code, 0, st.stderr);
    assert.match(st.stdout, /v3\* [\d,]+ keys dim 8 .* delta on v2 \+\d+ -\d+/);
    assert.match(st.stdout, /real-time: [\d,]+ keys from 20 batches, last put \d+ s ago/);

    const code = codeOf;
    assert.equal(await code(client.putEmbeddings([1n], new Float32Array(DIM + 1), { table: 'emb' })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.putEmbeddings([1n], new Float32Array(DIM).fill(NaN), { table: 'emb' })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.putEmbeddings(new BigUint64Array(70_000), new Float32Array(70_000 * DIM), { table: 'emb' })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.putEmbeddings([1n], new Float32Array(DIM), { table: 'nope' })), 'KV_TABLE_NOT_FOUND');
  });

  test('a replica that was down catches up on the puts it missed before it serves', async () => {
    await cluster.stopReplica(0, 1, 'SIGKILL');
    const keys = new BigUint64Array(400);
    const values = new Float32Array(400 * DIM);
    for (let i = 0; i < 400; i++) {
      keys[i] = scramble(BigInt(i) + (1n << 59n));
      values.fill(i + 0.5, i * DIM, (i + 1) * DIM);
    }
    await client.putEmbeddings(keys, values, { table: 'emb' });
    state.withPuts = foldPuts(state.withPuts!, keys, values);
    cluster.startReplica(0, 1);
    await cluster.waitReady();
    const r = await lookupAt(cluster.manifest.groups[0]!.replicas[1]!, 'emb', keys);
    const held = r.found.reduce((a, f) => a + f, 0);
    assert.ok(held > 100, `group 0 should own a good share of the keys, got ${held}`);
    const want = expected(state.withPuts, keys);
    for (let i = 0; i < keys.length; i++) {
      if (r.found[i]) assert.ok(sameBits(r.values.subarray(i * DIM, (i + 1) * DIM), want.values.subarray(i * DIM, (i + 1) * DIM)));
    }
  });

  test('after kill -9 of one replica of every group, puts and the delta are served exactly', async () => {
    for (let g = 0; g < 2; g++) await cluster.stopReplica(g, 0, 'SIGKILL');
    for (let g = 0; g < 2; g++) cluster.startReplica(g, 0);
    await cluster.waitReady();
    const m = state.withPuts!;
    const probe = m.keys.slice(0, 6000);
    await assertEveryReplica(cluster, m, probe);
  });

  test('a new full version replaces real-time puts written before its load, also after a restart', async () => {
    const v5 = makeModel(N, DIM, 5, 5); // the same keys as v1/v2, marker 5
    await writeModelPart(join(dumps, 'v5'), v5, 0, N);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '5', '--full', join(dumps, 'v5'), '--publish']);
    assert.equal(r.code, 0, r.stderr);
    // Keys that had puts now answer v5's rows; keys that only puts had are gone.
    const probe = state.withPuts!.keys.slice(0, 4000);
    await assertEveryReplica(cluster, v5, probe);
    // The put log forgot the batches the new version holds (a bounded log, not just a filter).
    assert.ok([...cluster.logs.values()].some((l) => l.includes('pruned real-time puts that the new version holds')), 'no replica pruned its put log');
    await cluster.stopReplica(1, 0, 'SIGKILL');
    cluster.startReplica(1, 0);
    await cluster.waitReady();
    await assertEveryReplica(cluster, v5, probe);
    state.withPuts = v5;
  });

  test('a replica killed during a load: the load fails clearly and the last published version serves', async () => {
    const big = makeModel(200_000, DIM, 9, 6);
    await writeModelPart(join(dumps, 'v6'), big, 0, big.keys.length);
    const before = await currentVersions(cluster);
    // g1r1 stops answering the load once it holds 20,000 of v6's rows: the kill comes mid-load on any machine.
    await cluster.restartReplica(1, 1, { EMBKV_TEST_FAULTS: '1', EMBKV_TEST_HOLD_LOAD: 'emb:6:20000' });
    try {
      const held = cluster.waitForLog(1, 1, /test switch: holding the load/);
      const load = cluster.kvctl(['load', '--table', 'emb', '--version', '6', '--full', join(dumps, 'v6'), '--publish', '--no-staging']);
      await held;
      const part = (await statusOf(cluster.manifest.groups[1]!.replicas[1]!)).tables[0]!.versions.find((v) => v.version === 6);
      assert.ok(part !== undefined && part.state === 'loading' && part.keys >= 20_000 && part.keys < big.keys.length / 2, `v6 part-loaded: ${JSON.stringify(part)}`);
      await cluster.stopReplica(1, 1, 'SIGKILL');
      const r = await load;
      assert.equal(r.code, 1, `the load should fail: ${r.stdout}`);
      assert.match(r.stderr, /group 1 replica 1/);
    } finally {
      await cluster.ensureAllUp();
    }
    const st = await cluster.kvctl(['status', '--json']);
    for (const rep of JSON.parse(st.stdout) as { status: { tables: { currentVersion: number; versions: { state: string }[] }[] } }[]) {
      assert.equal(rep.status.tables[0]!.currentVersion, before);
      assert.ok(rep.status.tables[0]!.versions.every((v) => v.state === 'sealed'), 'no write version left behind');
    }
    await assertEveryReplica(cluster, state.withPuts!, state.withPuts!.keys.slice(0, 3000));
  });

  test('a delta is not published over a newer version than the one it was built on', async () => {
    const dir = join(dumps, 'd9');
    mkdirSync(dir);
    writeFileSync(join(dir, 'd.txt'), `${state.withPuts!.keys[0]}\t${Array(DIM).fill(9).join(',')}\n`);
    const base = await currentVersions(cluster);
    const staged = await cluster.kvctl(['load', '--table', 'emb', '--version', '9', '--incremental', dir, '--no-publish']);
    assert.equal(staged.code, 0, staged.stderr);
    const v8 = makeModel(N, DIM, 5, 8);
    await writeModelPart(join(dumps, 'v8'), v8, 0, N);
    const full = await cluster.kvctl(['load', '--table', 'emb', '--version', '8', '--full', join(dumps, 'v8'), '--publish']);
    assert.equal(full.code, 0, full.stderr);
    const stale = await cluster.kvctl(['publish', '--table', 'emb', '--version', '9']);
    assert.equal(stale.code, 1);
    assert.match(stale.stderr, new RegExp(`version 9 is a delta on v${base}, but v8 is current`));
    await assertEveryReplica(cluster, v8, v8.keys.slice(0, 2000));
    state.withPuts = v8;
  });

  test('the loader killed with kill -9 in a staged load: v8 serves on, --force takes the load over, and a restart drops what it staged', async () => {
    const big = makeModel(400_000, DIM, 12, 10);
    const dir = join(dumps, 'v10');
    await writeModelPart(dir, big, 0, big.keys.length);
    const incoming = join(cluster.dir, 'g0r0', 'incoming');
    // g0r0 holds the first load of v10 once it has read rows from the staged file: the loader is
    // killed mid-load on any machine.
    await cluster.restartReplica(0, 0, { EMBKV_TEST_FAULTS: '1', EMBKV_TEST_HOLD_LOAD: 'emb:10:1' });
    const held = cluster.waitForLog(0, 0, /test switch: holding the load/);
    const loader = spawn(process.execPath, [KVCTL, 'load', '--config', cluster.configPath, '--table', 'emb', '--version', '10', '--full', dir, '--publish'], { stdio: 'ignore' });
    const exited = once(loader, 'exit');
    await held;
    assert.ok(readdirSync(incoming).some((n) => n.endsWith('.rows') && statSync(join(incoming, n)).size > 0), 'the loader staged rows for group 0');
    loader.kill('SIGKILL');
    await exited;
    await assertEveryReplica(cluster, state.withPuts!, state.withPuts!.keys.slice(0, 2000));
    // The write version of the dead load is taken over.
    const plain = await cluster.kvctl(['load', '--table', 'emb', '--version', '10', '--full', dir, '--publish']);
    assert.equal(plain.code, 1);
    assert.match(plain.stderr, /is being loaded .*force takes it over/);
    const forced = await cluster.kvctl(['load', '--table', 'emb', '--version', '10', '--full', dir, '--publish', '--force']);
    assert.equal(forced.code, 0, forced.stderr);
    assert.match(forced.stdout, /all through staged files/);
    await assertEveryReplica(cluster, big, big.keys.slice(0, 3000));
    // The dead loader's file is younger than the load idle time, so it is kept until then, or until
    // the replica restarts.
    assert.ok(readdirSync(incoming).length > 0);
    await cluster.stopReplica(0, 0, 'SIGKILL');
    cluster.startReplica(0, 0);
    await cluster.waitReady();
    assert.deepEqual(readdirSync(incoming), []);
    await assertEveryReplica(cluster, big, big.keys.slice(0, 3000));
  });
});

function applyDelta(m: Model, upKeys: BigUint64Array, upVals: Float32Array, delKeys: BigUint64Array): Model {
  const rows = new Map<bigint, Float32Array>();
  m.keys.forEach((k, i) => rows.set(k, m.values.subarray(i * m.dim, (i + 1) * m.dim)));
  upKeys.forEach((k, i) => rows.set(k, upVals.subarray(i * m.dim, (i + 1) * m.dim)));
  delKeys.forEach((k) => rows.delete(k));
  const keys = new BigUint64Array(rows.size);
  const values = new Float32Array(rows.size * m.dim);
  let i = 0;
  for (const [k, v] of rows) {
    keys[i] = k;
    values.set(v, i * m.dim);
    i++;
  }
  return { keys, values, dim: m.dim };
}

function foldPuts(m: Model, keys: BigUint64Array, values: Float32Array): Model {
  return applyDelta(m, keys, values, new BigUint64Array(0));
}
