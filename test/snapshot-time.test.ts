/**
 * A full version's snapshot time (`kvctl load --full ... --snapshot-time`, a dump's `_embkv.json`):
 * real-time puts stamped at or after it stay layered over the new version, on every replica and
 * after restarts; older ones are replaced by its rows. Real replica processes; puts are stamped
 * with write orders chosen around S (through the internal put path, as the Kafka ingester writes)
 * or by the SDK once the test has seen the clock pass S.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { EmbeddingClient } from '../src/index.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { packKeys } from '../src/common/keys.js';
import { ORDER_SCALE } from '../src/common/limits.js';
import { MAX_SNAPSHOT_SKEW_MS, parseSnapshotTime } from '../src/common/snapshot-time.js';
import { putToGroups } from '../src/fanout/put.js';
import { call } from '../src/loader/cluster-ops.js';
import { parseDumpMetadata } from '../src/loader/dump-meta.js';
import { putsFromOf } from '../src/shard/publish.js';
import type { VersionMeta } from '../src/shard/store.js';
import { TestCluster } from './helpers/cluster.js';
import { makeModel, scramble, writeModelPart, type Model } from './helpers/model.js';
import { differsOnReplicas } from './helpers/replica.js';
import { codeOf, until } from './helpers/util.js';

const DIM = 8;
const N = 5000;

/** A vector no model row has: `tag` in every component. */
const vec = (tag: number): Float32Array => new Float32Array(DIM).fill(tag);

/** The rows of `keys` in model `m`, key -> vector. */
function rowsOf(m: Model, keys: BigUint64Array): Map<bigint, Float32Array> {
  const at = new Map<bigint, number>();
  m.keys.forEach((k, i) => at.set(k, i));
  return new Map([...keys].map((k) => [k, m.values.slice(at.get(k)! * DIM, (at.get(k)! + 1) * DIM)]));
}

/** Whether every replica serves `want`: undefined when it does, else the first difference. */
const differs = (cluster: TestCluster, table: string, want: Map<bigint, Float32Array>): Promise<string | undefined> =>
  differsOnReplicas(cluster.manifest, table, want);

async function servesEverywhere(cluster: TestCluster, table: string, want: Map<bigint, Float32Array>): Promise<void> {
  const d = await differs(cluster, table, want);
  assert.equal(d, undefined, d);
}

describe('a full version with a snapshot time keeps the puts stamped at or after it', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let conns: ClusterConnections;
  let dumps: string;
  const v1 = makeModel(N, DIM, 21, 1);
  const v2 = makeModel(N, DIM, 21, 2); // the same keys, marker 2

  before(async () => {
    cluster = await TestCluster.start(2, 2, { partitions: 16 });
    client = new EmbeddingClient({ config: cluster.configPath });
    conns = new ClusterConnections(cluster.manifest);
    dumps = join(cluster.dir, 'dumps');
    mkdirSync(dumps);
    await writeModelPart(join(dumps, 'v1'), v1, 0, N);
    await writeModelPart(join(dumps, 'v2'), v2, 0, N);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', join(dumps, 'v1'), '--publish']);
    assert.equal(r.code, 0, r.stderr);
  });

  after(async () => {
    conns?.close();
    await client?.close();
    await cluster?.close();
  });

  afterEach(() => cluster.ensureAllUp());

  /** A put with an explicit write order, through the path the SDK and the Kafka ingester share. */
  async function putAt(keys: BigUint64Array, tag: number, order: number, writer: string): Promise<void> {
    const values = new Float32Array(keys.length * DIM);
    keys.forEach((_, i) => values.set(vec(tag + i), i * DIM));
    await putToGroups(conns, { table: 'emb', keys: await packKeys(keys), values, dim: DIM, order, writer, deadline: Date.now() + 10_000 });
  }
  const putValues = (keys: BigUint64Array, tag: number): Map<bigint, Float32Array> => new Map([...keys].map((k, i) => [k, vec(tag + i)]));

  test('puts before S are replaced by the new rows; puts at and after S, also those written while it waited unpublished, serve on every replica and after restarts', async () => {
    const k = (from: number): BigUint64Array => v1.keys.slice(from, from + 10);
    const [before1, atS, afterS, during, duringOld] = [k(0), k(10), k(20), k(30), k(40)];
    const fresh = BigUint64Array.from([1n, 2n, 3n].map((i) => scramble((1n << 61n) + i))); // keys no version holds
    // v1's load began before now, so puts stamped from here on are accepted over v1.
    const s = Date.now() + 1;
    await putAt(before1, 100, s * ORDER_SCALE - 1, 'test-before');
    await putAt(atS, 200, s * ORDER_SCALE, 'test-at');
    await until('the clock to pass S', async () => (Date.now() > s ? true : undefined));
    await client.putEmbeddings(afterS, Float32Array.from([...putValues(afterS, 300).values()].flatMap((v) => [...v])), { table: 'emb' });
    await client.putEmbeddings(fresh, Float32Array.from([...putValues(fresh, 400).values()].flatMap((v) => [...v])), { table: 'emb' });
    const puts = new Map([...putValues(before1, 100), ...putValues(atS, 200), ...putValues(afterS, 300), ...putValues(fresh, 400)]);
    await until('the puts on every replica', () => differs(cluster, 'emb', puts).then((d) => (d === undefined ? true : undefined)));

    // v2 is built from a snapshot taken at S; its load begins after S (the clock has passed it).
    const iso = new Date(s).toISOString();
    const load = await cluster.kvctl(['load', '--table', 'emb', '--version', '2', '--full', join(dumps, 'v2'), '--snapshot-time', iso]);
    assert.equal(load.code, 0, load.stderr);
    assert.match(load.stdout, new RegExp(`loaded emb v2: ${N} keys of dim ${DIM} \\(snapshot ${iso}\\)`));

    // Loaded, not published: puts keep arriving, one stamped after S and one (a late writer) before it.
    await client.putEmbeddings(during, Float32Array.from([...putValues(during, 500).values()].flatMap((v) => [...v])), { table: 'emb' });
    await putAt(duringOld, 600, s * ORDER_SCALE - 2, 'test-late');
    const all = new Map([...puts, ...putValues(during, 500), ...putValues(duringOld, 600)]);
    await until('the puts on every replica', () => differs(cluster, 'emb', all).then((d) => (d === undefined ? true : undefined)));

    // A replica restarted between the seal and the publish keeps v2's snapshot time.
    await cluster.restartReplica(1, 0);
    const st = await cluster.kvctl(['status', '--json']);
    assert.equal(st.code, 0, st.stderr);
    for (const rep of JSON.parse(st.stdout) as { address: string; status: { tables: { name: string; versions: { version: number; snapshotAtMs: number }[] }[] } }[]) {
      const versions = rep.status.tables.find((t) => t.name === 'emb')!.versions;
      assert.equal(versions.find((v) => v.version === 2)?.snapshotAtMs, s, `${rep.address} v2`);
      assert.equal(versions.find((v) => v.version === 1)?.snapshotAtMs, 0, `${rep.address} v1 declared none`);
    }
    assert.match((await cluster.kvctl(['status'])).stdout, new RegExp(`v2 [\\d,]+ keys dim ${DIM} [^;]* snapshot ${iso}`));

    const pub = await cluster.kvctl(['publish', '--table', 'emb', '--version', '2']);
    assert.equal(pub.code, 0, pub.stderr);
    const want = new Map([
      ...rowsOf(v2, before1), ...rowsOf(v2, duringOld), // stamped before S: v2's rows hold newer data
      ...putValues(atS, 200), ...putValues(afterS, 300), ...putValues(fresh, 400), ...putValues(during, 500),
      ...rowsOf(v2, v1.keys.slice(50, 60)), // never put
    ]);
    await servesEverywhere(cluster, 'emb', want);
    // The put log forgot the two batches stamped before S.
    assert.ok([...cluster.logs.values()].some((l) => /"batches":2\b.*pruned real-time puts that the new version holds/.test(l)), 'no replica pruned the two batches');

    // After kill -9 a replica rebuilds the same from its rows files and put log.
    await cluster.restartReplica(0, 1);
    await servesEverywhere(cluster, 'emb', want);
    // And a put stamped before S is refused by the new version (it holds newer data), one after is applied.
    await putAt(k(60), 700, s * ORDER_SCALE - 3, 'test-later-still');
    await putAt(k(70), 800, Date.now() * ORDER_SCALE, 'test-now');
    for (const [key, v] of rowsOf(v2, k(60))) want.set(key, v);
    for (const [key, v] of putValues(k(70), 800)) want.set(key, v);
    await until('the last puts on every replica', () => differs(cluster, 'emb', want).then((d) => (d === undefined ? true : undefined)));
  });

  test('without --snapshot-time a full version replaces every put written before its load began, as before', async () => {
    const v3 = makeModel(N, DIM, 21, 3);
    await writeModelPart(join(dumps, 'v3'), v3, 0, N);
    const keys = v1.keys.slice(100, 110);
    await putAt(keys, 900, Date.now() * ORDER_SCALE, 'test-before-v3');
    await until('the put on every replica', () => differs(cluster, 'emb', putValues(keys, 900)).then((d) => (d === undefined ? true : undefined)));
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '3', '--full', join(dumps, 'v3'), '--publish']);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout, /snapshot/);
    await servesEverywhere(cluster, 'emb', rowsOf(v3, keys));
  });

  test('a snapshot time later than the load\'s start counts as the start: puts written since the load began stay', async () => {
    const v4 = makeModel(N, DIM, 21, 4);
    await writeModelPart(join(dumps, 'v4'), v4, 0, N);
    // A trainer clock ahead of the loader's: S within the allowed skew, after the load begins.
    const s = Date.now() + 50_000;
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '4', '--full', join(dumps, 'v4'), '--snapshot-time', new Date(s).toISOString()]);
    assert.equal(r.code, 0, r.stderr);
    const st = JSON.parse((await cluster.kvctl(['status', '--json'])).stdout) as { status: { tables: { name: string; versions: { version: number; createdAtMs: number }[] }[] } }[];
    const started = st[0]!.status.tables.find((t) => t.name === 'emb')!.versions.find((v) => v.version === 4)!.createdAtMs;
    assert.ok(started < s, `the load began at ${started}, after S ${s}`);
    // Written after the load began and before S: the dump cannot hold it.
    const keys = v1.keys.slice(200, 210);
    await putAt(keys, 1000, started * ORDER_SCALE + 1, 'test-between');
    await until('the put on every replica', () => differs(cluster, 'emb', putValues(keys, 1000)).then((d) => (d === undefined ? true : undefined)));
    const pub = await cluster.kvctl(['publish', '--table', 'emb', '--version', '4']);
    assert.equal(pub.code, 0, pub.stderr);
    await servesEverywhere(cluster, 'emb', new Map([...putValues(keys, 1000), ...rowsOf(v4, v1.keys.slice(210, 220))]));
  });

  test('bad snapshot times are refused with one line, and nothing served changes', async () => {
    const v9 = join(dumps, 'v2');
    const refused = async (args: string[], re: RegExp): Promise<void> => {
      const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '9', ...args]);
      assert.notEqual(r.code, 0, r.stdout);
      assert.match(r.stderr, re);
    };
    await refused(['--full', v9, '--snapshot-time', '2026-12-02T17:35:09'], /--snapshot-time must be an ISO 8601 time with a zone.*it has no zone/);
    await refused(['--full', v9, '--snapshot-time', 'yesterday'], /--snapshot-time must be an ISO 8601 time with a zone/);
    await refused(['--full', v9, '--snapshot-time', '2026-02-30T00:00:00Z'], /is not a valid date and time/);
    await refused(['--full', v9, '--snapshot-time', new Date(Date.now() + 10 * 60_000).toISOString()], /s in the future \(more than the 60 s allowed for clock skew\)/);
    await refused(['--incremental', v9, '--snapshot-time', new Date().toISOString()], /--snapshot-time applies to --full only/);
    // A dump directory's _embkv.json is checked like the rest of the dump.
    const bad = (name: string, meta: string): string => {
      const dir = join(dumps, name);
      mkdirSync(dir);
      writeFileSync(join(dir, 'part-0.txt'), `${v1.keys[0]}\t${Array.from(vec(1)).join(',')}\n`);
      writeFileSync(join(dir, '_embkv.json'), meta);
      return dir;
    };
    await refused(['--full', bad('not-json', '{"snapshotTime": ')], /_embkv\.json is not valid JSON/);
    await refused(['--full', bad('no-zone', '{"snapshotTime": "2026-12-02T17:35:09"}')], /_embkv\.json: snapshotTime must be an ISO 8601 time with a zone/);
    await refused(['--full', bad('unknown', '{"snapshot": "2026-12-02T17:35:09Z"}')], /_embkv\.json: unknown field "snapshot" \(known: snapshotTime\)/);
    await refused(['--incremental', bad('delta', `{"snapshotTime": "${new Date().toISOString()}"}`)], /_embkv\.json: snapshotTime applies to a full dump only/);
    const st = await cluster.kvctl(['status', '--json']);
    for (const rep of JSON.parse(st.stdout) as { status: { tables: { name: string; currentVersion: number; versions: { version: number }[] }[] } }[]) {
      const t = rep.status.tables.find((x) => x.name === 'emb')!;
      assert.equal(t.currentVersion, 4);
      assert.ok(!t.versions.some((v) => v.version === 9), 'a refused load left a version behind');
    }
    // A replica refuses a snapshot time on a delta from a loader that bypasses kvctl's checks.
    const conn = conns.all()[0]!;
    const begin = { table: 'emb', version: 9, dim: DIM, loadId: 'snap-delta', force: false, incremental: true, expectedRows: 0, startedAtMs: 0, snapshotAtMs: Date.now() };
    assert.equal(await codeOf(call(conn, 'LoadBegin', begin)), 'KV_INVALID_ARGUMENT');
  });
});

describe('snapshot times: parsing and the rule', () => {
  const now = Date.parse('2026-12-02T17:35:09Z');

  test('ISO 8601 times with a zone, to the millisecond', () => {
    assert.equal(parseSnapshotTime('2026-12-02T17:35:09Z', 't', now), now);
    assert.equal(parseSnapshotTime('2026-12-02T18:35:09.250+01:00', 't', now), now + 250);
    assert.equal(parseSnapshotTime('2026-12-02T12:05:09.2509-0530', 't', now), now + 250);
    assert.equal(parseSnapshotTime('2026-12-02t17:35z', 't', now), now - 9000);
    assert.equal(parseSnapshotTime(new Date(now + MAX_SNAPSHOT_SKEW_MS).toISOString(), 't', now), now + MAX_SNAPSHOT_SKEW_MS);
    for (const bad of ['2026-12-02T17:35:09', '2026-12-02 17:35:09Z', '1764696909000', '', '2026-13-01T00:00:00Z', '2026-12-02T17:60:00Z',
      '2026-12-02T17:35:09+25:00', '0099-01-01T00:00:00Z', new Date(now + MAX_SNAPSHOT_SKEW_MS + 1).toISOString()]) {
      assert.throws(() => parseSnapshotTime(bad, 't', now), { code: 'KV_INVALID_ARGUMENT' }, bad);
    }
    assert.throws(() => parseSnapshotTime(1764696909000, 't', now), { code: 'KV_INVALID_ARGUMENT' });
  });

  test('_embkv.json: an object with an optional snapshotTime', () => {
    assert.deepEqual(parseDumpMetadata('{}', 'm', now), {});
    assert.deepEqual(parseDumpMetadata('{"snapshotTime":"2026-12-02T17:35:09Z"}', 'm', now), { snapshotAtMs: now });
    for (const bad of ['', '[]', 'null', '"2026-12-02T17:35:09Z"', '{"snapshotTime": 5}', '{"snapshotTime":"2026-12-02T17:35:09Z","x":1}']) {
      assert.throws(() => parseDumpMetadata(bad, 'm', now), { code: 'KV_INVALID_DATA' }, bad);
    }
  });

  test('puts stay from the earlier of the snapshot time and the load start', () => {
    const meta = (createdAtMs: number, snapshotAtMs?: number): VersionMeta => ({
      version: 1, dim: 1, rows: 0, state: 'sealed', loadId: 'x', blocks: 0, base: 0, upserts: 0, deletes: 0, createdAtMs, ...(snapshotAtMs ? { snapshotAtMs } : {}),
    });
    assert.equal(putsFromOf(meta(5000)), 5000 * ORDER_SCALE);
    assert.equal(putsFromOf(meta(5000, 3000)), 3000 * ORDER_SCALE);
    // A snapshot "after" the load began is a clock skew: the dump cannot hold puts written after that.
    assert.equal(putsFromOf(meta(5000, 7000)), 5000 * ORDER_SCALE);
  });
});
