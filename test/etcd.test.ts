import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Etcd3 } from 'etcd3';
import { EmbeddingClient, KvError } from '../src/index.js';
import { partitionOf } from '../src/cluster/partition.js';
import * as grpc from '@grpc/grpc-js';
import { spawn } from 'node:child_process';
import { freePorts, KVCTL, kvctl, startRouter, TestCluster } from './helpers/cluster.js';
import { CHANNEL_OPTIONS } from '../src/transport/options.js';
import { decodeLookupResponse, encodeLookupRequest, type LookupRequest, type LookupResponse } from '../src/wire/lookup.js';
import { EMBKV_CLIENT_SERVICE, EmbkvClient } from '../src/wire/services.js';
import { TestEtcd } from './helpers/etcd.js';
import { codeOf, until } from './helpers/util.js';

const CLUSTER = 'test';
const PARTITIONS = 8;
const DIM = 4;
const KEYS = 200;
/** Every value of key k in version v: v * 1000 + k, so a row tells the version it came from. */
const valueOf = (v: number, k: number): number => v * 1000 + k;

function writeVersion(path: string, v: number): void {
  let text = '';
  for (let k = 1; k <= KEYS; k++) text += `${k}\t${Array.from({ length: DIM }, () => valueOf(v, k)).join(',')}\n`;
  writeFileSync(path, text);
}

/** The version every found row of an answer comes from; throws when two rows disagree (a mixed answer). */
function versionOfRows(keys: bigint[], values: Float32Array, found: Uint8Array): number {
  let seen = 0;
  keys.forEach((k, i) => {
    if (!found[i]) throw new Error(`key ${k} absent`);
    const v = (values[i * DIM]! - Number(k)) / 1000;
    if (seen !== 0 && v !== seen) throw new Error(`mixed answer: key ${k} from v${v}, an earlier key from v${seen}`);
    seen = v;
  });
  return seen;
}

/** Settled either way (undefined: resolved), so that a test failing before it awaits one leaves no rejection behind. */
const settled = (p: Promise<string>): Promise<unknown> => p.then(() => undefined, (err: unknown) => err);

const allKeys = Array.from({ length: KEYS }, (_, i) => BigInt(i + 1));
const groupKeys = (g: number): bigint[] => allKeys.filter((k) => partitionOf(k, PARTITIONS) % 2 === g);

describe('etcd as the cluster\'s source of truth', () => {
  let etcd: TestEtcd;
  let cluster: TestCluster;
  let kv: Etcd3;
  let client: EmbeddingClient;
  const prefix = `/embkv/${CLUSTER}/`;

  const member = async (g: number, r: number): Promise<string | undefined> => {
    const v = await kv.get(`${prefix}members/${g}/${r}`).string();
    return v === null ? undefined : (JSON.parse(v) as { address: string }).address;
  };
  const statusAt = async (): Promise<{ address: string; current: number | undefined }[]> => {
    const r = await cluster.kvctl(['status', '--json']);
    return (JSON.parse(r.stdout) as { address: string; status?: { tables: { name: string; currentVersion: number }[] } }[])
      .map((s) => ({ address: s.address, current: s.status?.tables.find((t) => t.name === 'emb')?.currentVersion }));
  };

  before(async () => {
    etcd = await TestEtcd.start();
    kv = new Etcd3({ hosts: etcd.endpoint });
    cluster = await TestCluster.start(2, 2, { partitions: PARTITIONS, etcd: { endpoint: etcd.endpoint, cluster: CLUSTER }, serveArgs: ['--lease-ttl', '2'] });
    for (const v of [1, 2, 3]) writeVersion(join(cluster.dir, `v${v}.txt`), v);
    const load = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', join(cluster.dir, 'v1.txt'), '--publish']);
    assert.equal(load.code, 0, load.stderr);
    client = new EmbeddingClient({ etcd: { endpoints: [etcd.endpoint], cluster: CLUSTER } });
  });

  after(async () => {
    await client?.close();
    kv?.close();
    await cluster?.close();
    await etcd?.close();
  });

  test('cluster init stores the manifest once; a different one only with --force; bad flags are refused', async () => {
    const again = await kvctl(['cluster', 'init', '--etcd', etcd.endpoint, '--cluster', CLUSTER, '--config', cluster.configPath]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /holds this manifest already/);
    const other = join(cluster.dir, 'other.json');
    writeFileSync(other, JSON.stringify({ partitions: 4, groups: [{ replicas: ['127.0.0.1:1'] }] }));
    const refused = await kvctl(['cluster', 'init', '--etcd', etcd.endpoint, '--cluster', CLUSTER, '--config', other]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /already holds a different manifest; give --force/);
    // A new cluster name takes it, and --force replaces it.
    const fresh = await kvctl(['cluster', 'init', '--etcd', etcd.endpoint, '--cluster', 'other', '--config', other]);
    assert.equal(fresh.code, 0, fresh.stderr);
    writeFileSync(other, JSON.stringify({ partitions: 4, groups: [{ replicas: ['127.0.0.1:2'] }] }));
    const forced = await kvctl(['cluster', 'init', '--etcd', etcd.endpoint, '--cluster', 'other', '--config', other, '--force']);
    assert.equal(forced.code, 0, forced.stderr);
    assert.match(forced.stdout, /replaced/);
    assert.equal(JSON.parse((await kv.get('/embkv/other/manifest').string())!).groups[0].replicas[0], '127.0.0.1:2');
    // An invalid manifest never reaches etcd.
    writeFileSync(other, JSON.stringify({ partitions: 4, groups: [], extra: 1 }));
    const bad = await kvctl(['cluster', 'init', '--etcd', etcd.endpoint, '--cluster', 'bad', '--config', other]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /unknown field "extra"/);
    assert.equal(await kv.get('/embkv/bad/manifest').string(), null);
    const noName = await kvctl(['status', '--etcd', etcd.endpoint]);
    assert.match(noName.stderr, /--etcd needs --cluster NAME/);
    const both = await kvctl(['status', '--etcd', etcd.endpoint, '--cluster', CLUSTER, '--config', cluster.configPath]);
    assert.match(both.stderr, /not both/);
    const missing = await kvctl(['status', '--etcd', etcd.endpoint, '--cluster', 'nothing-here']);
    assert.match(missing.stderr, /holds no manifest; store one with kvctl cluster init/);
    await assert.rejects(async () => new EmbeddingClient({ etcd: { endpoints: ['not a url'], cluster: CLUSTER } }), /is not an etcd endpoint/);
    await assert.rejects(async () => new EmbeddingClient({ etcd: { endpoints: [etcd.endpoint], cluster: CLUSTER }, config: cluster.configPath }), /not both/);
  });

  test('replicas register their addresses; one that moves is used by a running client without a restart', async () => {
    for (let g = 0; g < 2; g++) for (let r = 0; r < 2; r++) assert.equal(await member(g, r), cluster.listen.get(`g${g}r${r}`));
    const keys = groupKeys(0);
    assert.equal(versionOfRows(...(await lookup(client, keys))), 1);
    // Replica 0 of group 0 stops (its registration goes with it) and comes back on another port.
    await cluster.stopReplica(0, 0, 'SIGTERM');
    await until('g0r0 unregistered', async () => ((await member(0, 0)) === undefined ? true : undefined));
    const [port] = await freePorts(1);
    const moved = `127.0.0.1:${port}`;
    cluster.startReplica(0, 0, {}, moved);
    await cluster.waitReady();
    await until('g0r0 registered at its new address', async () => ((await member(0, 0)) === moved ? true : undefined));
    // Within 5 s the client knows the new address...
    await until('the client follows g0r0 to its new address', async () =>
      client.stats().groups[0]!.replicas[0]!.address === moved ? true : undefined, { timeoutMs: 5000 });
    // ... and with the other replica of the group gone, it answers from there.
    await cluster.stopReplica(0, 1, 'SIGKILL');
    try {
      for (let i = 0; i < 10; i++) assert.equal(versionOfRows(...(await lookup(client, keys))), 1);
      assert.ok(client.stats().groups[0]!.replicas[0]!.answers > 0);
    } finally {
      cluster.startReplica(0, 1);
      await cluster.waitReady();
    }
  });

  test('cluster up --etcd runs the replicas of the manifest in etcd, each registered at its manifest address', async () => {
    const ports = await freePorts(2);
    const raw = { partitions: 4, groups: [{ replicas: [`127.0.0.1:${ports[0]}`] }, { replicas: [`127.0.0.1:${ports[1]}`] }] };
    const path = join(cluster.dir, 'up.json');
    writeFileSync(path, JSON.stringify(raw));
    assert.equal((await kvctl(['cluster', 'init', '--etcd', etcd.endpoint, '--cluster', 'up', '--config', path])).code, 0);
    const up = spawn(process.execPath, [KVCTL, 'cluster', 'up', '--etcd', etcd.endpoint, '--cluster', 'up', '--data', join(cluster.dir, 'up-data')], { stdio: ['ignore', 'ignore', 'ignore'] });
    const exited = new Promise<number | null>((r) => up.once('exit', (code) => r(code)));
    const upMember = async (g: number): Promise<string | undefined> => {
      const v = await kv.get(`/embkv/up/members/${g}/0`).string();
      return v === null ? undefined : (JSON.parse(v) as { address: string }).address;
    };
    try {
      for (let g = 0; g < 2; g++) await until(`group ${g} registered`, async () => ((await upMember(g)) === raw.groups[g]!.replicas[0] ? true : undefined));
    } finally {
      up.kill('SIGTERM');
    }
    assert.equal(await exited, 0);
    // Stopped cleanly: each revoked its lease on the way out.
    for (let g = 0; g < 2; g++) assert.equal(await upMember(g), undefined);
  });

  test('the router follows a replica to its new address', async () => {
    const { proc: router, port } = await startRouter(cluster.sourceArgs);
    const stub = new EmbkvClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
    const keys = groupKeys(1);
    const viaRouter = async (): Promise<number> => {
      const packed = new BigUint64Array(keys);
      const a = await new Promise<LookupResponse>((resolve, reject) =>
        stub.makeUnaryRequest<LookupRequest, LookupResponse>(EMBKV_CLIENT_SERVICE.lookup.path, encodeLookupRequest, decodeLookupResponse,
          { table: 'emb', version: 0, keys: new Uint8Array(packed.buffer) }, (err, res) => (err ? reject(err) : resolve(res!))));
      return versionOfRows(keys, new Float32Array(a.values), new Uint8Array(a.found));
    };
    try {
      assert.equal(await viaRouter(), 1);
      await cluster.stopReplica(1, 1, 'SIGTERM');
      const [p] = await freePorts(1);
      cluster.startReplica(1, 1, {}, `127.0.0.1:${p}`);
      await cluster.waitReady();
      await until('g1r1 registered at its new address', async () => ((await member(1, 1)) === `127.0.0.1:${p}` ? true : undefined));
      // With the other replica of group 1 gone, only the new address can answer.
      await cluster.stopReplica(1, 0, 'SIGKILL');
      try {
        await until('the router answers group 1 from the new address', async () => viaRouter().catch(() => undefined), { timeoutMs: 5000 });
        for (let i = 0; i < 5; i++) assert.equal(await viaRouter(), 1);
      } finally {
        cluster.startReplica(1, 0);
        await cluster.waitReady();
      }
    } finally {
      stub.close();
      const exited = new Promise((r) => router.once('exit', r));
      router.kill('SIGTERM');
      await exited;
    }
  });

  test('a replica whose lease expired is avoided; it registers again once it runs', async () => {
    const strict = new EmbeddingClient({ etcd: { endpoints: [etcd.endpoint], cluster: CLUSTER }, hedging: false, deadlineMs: 2000 });
    const keys = groupKeys(1);
    try {
      assert.equal(versionOfRows(...(await lookup(strict, keys))), 1);
      const restored = settled(cluster.waitForLog(1, 0, /registration restored/));
      cluster.signalReplica(1, 0, 'SIGSTOP');
      try {
        await until('g1r0 lease expired', async () => ((await member(1, 0)) === undefined ? true : undefined), { timeoutMs: 30_000 });
        const before = strict.stats().groups[1]!.replicas[0]!.attempts;
        // Without hedging, a call sent to the frozen replica would run into its deadline.
        for (let i = 0; i < 20; i++) assert.equal(versionOfRows(...(await lookup(strict, keys))), 1);
        assert.equal(strict.stats().groups[1]!.replicas[0]!.attempts, before, 'the expired replica was asked');
      } finally {
        cluster.signalReplica(1, 0, 'SIGCONT');
      }
      assert.equal(await restored, undefined);
      await until('g1r0 registered again', async () => ((await member(1, 0)) === cluster.listen.get('g1r0') ? true : undefined));
    } finally {
      await strict.close();
    }
  });

  test('publish and rollback flip one key that replicas and a running client follow, never mixing versions', async () => {
    const load = await cluster.kvctl(['load', '--table', 'emb', '--version', '2', '--full', join(cluster.dir, 'v2.txt'), '--no-publish']);
    assert.equal(load.code, 0, load.stderr);
    const seen = new Set<number>();
    let stop = false;
    let failure: unknown;
    const loop = (async () => {
      while (!stop) {
        try {
          seen.add(versionOfRows(...(await lookup(client, allKeys))));
        } catch (err) {
          failure ??= err;
        }
      }
    })();
    try {
      const pub = await cluster.kvctl(['publish', '--table', 'emb', '--version', '2']);
      assert.equal(pub.code, 0, pub.stderr);
      assert.equal(await kv.get(`${prefix}tables/emb/current`).string(), '2');
      await until('the client answers v2', async () => (seen.has(2) ? true : undefined));
      const back = await cluster.kvctl(['rollback', '--table', 'emb', '--version', '1']);
      assert.equal(back.code, 0, back.stderr);
      assert.equal(await kv.get(`${prefix}tables/emb/current`).string(), '1');
      seen.clear();
      await until('the client answers v1 again', async () => (seen.has(1) ? true : undefined));
      // The key is the truth: written by anyone, replicas follow it on their own.
      await kv.put(`${prefix}tables/emb/current`).value('2');
      await until('every replica follows the key to v2', async () => ((await statusAt()).every((s) => s.current === 2) ? true : undefined));
      seen.clear();
      await until('the client answers v2', async () => (seen.has(2) ? true : undefined));
    } finally {
      stop = true;
      await loop;
    }
    assert.equal(failure, undefined, `a lookup failed or mixed versions: ${failure}`);
    // Replicas would refuse to go back without rollback: so is the publish, before the key flips.
    const stale = await cluster.kvctl(['publish', '--table', 'emb', '--version', '1']);
    assert.equal(stale.code, 1);
    assert.match(stale.stderr, /older than the current v2 on group \d replica \d .*; use rollback/);
  });

  test('the current-version key changes only by a compare-and-set on its revision', async () => {
    const { EtcdSource } = await import('../src/cluster/etcd-source.js');
    const { parseEtcdOptions } = await import('../src/cluster/source.js');
    const source = new EtcdSource(parseEtcdOptions({ endpoints: [etcd.endpoint], cluster: 'cas' }));
    try {
      const before = await source.readCurrent('t');
      assert.deepEqual(before, { version: undefined, revision: '0' });
      await source.setCurrent('t', 1, before);
      // Another publish got there first: the stale one changes nothing.
      assert.equal(await codeOf(source.setCurrent('t', 2, before)), 'KV_LOAD_CONFLICT');
      assert.equal((await source.readCurrent('t')).version, 1);
      const now = await source.readCurrent('t');
      await source.setCurrent('t', 2, now);
      assert.equal((await source.readCurrent('t')).version, 2);
    } finally {
      await source.close();
    }
  });

  test('etcd down: lookups and puts go on, publishes and loads fail naming etcd; all resumes when it is back', async () => {
    const load = await cluster.kvctl(['load', '--table', 'emb', '--version', '3', '--full', join(cluster.dir, 'v3.txt'), '--no-publish']);
    assert.equal(load.code, 0, load.stderr);
    const lost = [0, 1].map((g) => settled(cluster.waitForLog(g, 0, /registration lost/)));
    const restored = [0, 1].map((g) => settled(cluster.waitForLog(g, 0, /registration restored/)));
    await etcd.stop();
    try {
      for (let i = 0; i < 5; i++) assert.equal(versionOfRows(...(await lookup(client, allKeys))), 2);
      // A key of no version, so that the rows of the versions stay as they were.
      await client.putEmbeddings([5000n], new Float32Array(DIM).fill(0.5), { table: 'emb' });
      // Resolved once one replica of the group has it; the other has it within a second.
      await until('the put is visible', async () => ((await client.getEmbeddings([5000n], { table: 'emb' })).found[0] === 1 ? true : undefined));
      const pub = await cluster.kvctl(['publish', '--table', 'emb', '--version', '3']);
      assert.equal(pub.code, 1);
      assert.match(pub.stderr, new RegExp(`KV_UNAVAILABLE: etcd ${etcd.endpoint}`));
      const ld = await cluster.kvctl(['load', '--table', 'emb', '--version', '4', '--full', join(cluster.dir, 'v3.txt')]);
      assert.equal(ld.code, 1);
      assert.match(ld.stderr, new RegExp(`KV_UNAVAILABLE: etcd ${etcd.endpoint}`));
      // Longer than the leases: the replicas notice that their registrations are gone.
      assert.deepEqual(await Promise.all(lost), [undefined, undefined]);
      // Lookups still go on, with the addresses last known.
      assert.equal(versionOfRows(...(await lookup(client, allKeys))), 2);
    } finally {
      await etcd.restart();
    }
    assert.deepEqual(await Promise.all(restored), [undefined, undefined]);
    const pub = await until('a publish works again', async () => {
      const r = await cluster.kvctl(['publish', '--table', 'emb', '--version', '3']);
      return r.code === 0 ? r : undefined;
    }, { timeoutMs: 30_000, everyMs: 200 });
    assert.match(pub.stdout, /version 3 is current on every replica/);
    // The running client's watch came back too: it follows the flip.
    await until('the client answers v3', async () => (versionOfRows(...(await lookup(client, allKeys))) === 3 ? true : undefined));
    for (let g = 0; g < 2; g++) for (let r = 0; r < 2; r++) assert.equal(await member(g, r), cluster.listen.get(`g${g}r${r}`));
  });

  test('a client started while etcd is down fails with KV_UNAVAILABLE naming etcd, then works once it is back', async () => {
    await etcd.stop();
    const late = new EmbeddingClient({ etcd: { endpoints: [etcd.endpoint], cluster: CLUSTER } });
    try {
      const err = await lookup(late, allKeys).then(() => undefined, (e: unknown) => e);
      assert.ok(err instanceof KvError);
      assert.equal(err.code, 'KV_UNAVAILABLE');
      assert.match(err.message, new RegExp(`etcd ${etcd.endpoint}`));
      await etcd.restart();
      const r = await until('the late client answers', async () => lookup(late, allKeys).catch(() => undefined), { everyMs: 200 });
      assert.equal(versionOfRows(...r), 3);
    } finally {
      await etcd.restart();
      await late.close();
    }
    assert.equal(await codeOf(late.getEmbeddings([1n], { table: 'emb' })), 'KV_CLOSED');
  });
});

async function lookup(c: EmbeddingClient, keys: bigint[]): Promise<[bigint[], Float32Array, Uint8Array]> {
  const r = await c.getEmbeddings(keys, { table: 'emb' });
  assert.equal(r.dim, DIM);
  return [keys, r.values, r.found];
}
