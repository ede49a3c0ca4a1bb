import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { EmbeddingClient } from '../src/index.js';
import { ORDER_SCALE } from '../src/common/limits.js';
import { CHANNEL_OPTIONS } from '../src/transport/options.js';
import { type LookupResponse } from '../src/wire/lookup.js';
import { EmbkvClient } from '../src/wire/services.js';
import { partitionOf } from '../src/cluster/partition.js';
import { controlCall, ClusterConnections } from '../src/cluster/connections.js';
import { codeOf, until } from './helpers/util.js';
import { writeNpyPair } from '../src/loader/npy-write.js';
import { TestCluster } from './helpers/cluster.js';
import { expected, makeModel, sameBits, writeModelPart, type Model } from './helpers/model.js';

const DIM = 4;

/** A Lookup sent straight to one replica, to see what that replica itself serves. */
function lookupAt(address: string, table: string, keys: BigUint64Array): Promise<LookupResponse> {
  const c = new EmbkvClient(address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  return new Promise<LookupResponse>((resolve, reject) => {
    (c as unknown as { lookup: Function }).lookup(
      { table, version: 0, keys: new Uint8Array(keys.buffer, keys.byteOffset, keys.byteLength) },
      { deadline: new Date(Date.now() + 10_000) },
      (err: Error | null, r: LookupResponse) => {
        c.close();
        if (err) reject(err);
        else resolve(r);
      },
    );
  });
}

describe('nothing served changes without a valid, explicit action (2 groups x 2 replicas)', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let dumps: string;
  const v1 = makeModel(3000, DIM, 21, 1);

  /** Loads v1 of `table` from `v1` and publishes it. */
  async function loadV1(table: string): Promise<void> {
    const r = await cluster.kvctl(['load', '--table', table, '--version', '1', '--full', join(dumps, 'v1'), '--publish']);
    assert.equal(r.code, 0, r.stderr);
  }

  /** The current version every replica reports for `table` (they must agree). */
  async function current(table: string): Promise<number> {
    const st = await cluster.kvctl(['status', '--json']);
    assert.equal(st.code, 0, st.stderr);
    const seen = new Set((JSON.parse(st.stdout) as { status: { tables: { name: string; currentVersion: number; versions: { state: string }[] }[] } }[]).map((rep) => {
      const t = rep.status.tables.find((x) => x.name === table)!;
      assert.ok(t.versions.every((v) => v.state === 'sealed'), `no write version left behind: ${JSON.stringify(t.versions)}`);
      return t.currentVersion;
    }));
    assert.equal(seen.size, 1, `replicas disagree: ${[...seen].join(', ')}`);
    return [...seen][0]!;
  }

  async function assertServes(table: string, m: Model, keys: BigUint64Array): Promise<void> {
    const r = await client.getEmbeddings(keys, { table });
    const want = expected(m, keys);
    assert.deepEqual(r.found, want.found);
    assert.ok(sameBits(r.values, want.values), 'vectors differ');
  }

  before(async () => {
    cluster = await TestCluster.start(2, 2, { partitions: 16 });
    client = new EmbeddingClient({ config: cluster.configPath });
    dumps = join(cluster.dir, 'dumps');
    mkdirSync(join(dumps, 'v1'), { recursive: true });
    await writeModelPart(join(dumps, 'v1', 'part-0'), v1, 0, v1.keys.length);
  });

  after(async () => {
    await client?.close();
    await cluster?.close();
  });

  afterEach(() => cluster.ensureAllUp());

  test('an empty full dump is refused and the table serves on; --allow-empty loads it on purpose', async () => {
    await loadV1('e');
    const empties: [string, () => Promise<void> | void][] = [
      ['empty.txt', () => writeFileSync(join(dumps, 'empty.txt'), '')],
      ['comments.txt', () => writeFileSync(join(dumps, 'comments.txt'), '# exported by the trainer\n\n# nothing else\n')],
      ['zero', () => writeNpyPair(join(dumps, 'zero'), new BigUint64Array(0), new Float32Array(0), DIM)],
    ];
    for (const [name, make] of empties) {
      await make();
      const r = await cluster.kvctl(['load', '--table', 'e', '--version', '2', '--full', join(dumps, name), '--publish']);
      assert.equal(r.code, 1, `${name}: ${r.stdout}`);
      assert.match(r.stderr, /^kvctl: error: .* holds no rows: a full load of it would leave table e empty; pass --allow-empty/m);
      assert.equal(await current('e'), 1, name);
    }
    await assertServes('e', v1, v1.keys.slice(0, 500));
    // Asked for: the table is emptied, and v1 stays for a rollback.
    const r = await cluster.kvctl(['load', '--table', 'e', '--version', '2', '--full', join(dumps, 'zero'), '--publish', '--allow-empty']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(await current('e'), 2);
    const res = await client.getEmbeddings(v1.keys.slice(0, 100), { table: 'e' });
    assert.equal(res.found.reduce((a, f) => a + f, 0), 0);
    const back = await cluster.kvctl(['rollback', '--table', 'e', '--version', '1']);
    assert.equal(back.code, 0, back.stderr);
    await assertServes('e', v1, v1.keys.slice(0, 500));
  });

  test('an empty delta makes a version that serves what its base serves', async () => {
    await loadV1('d');
    writeFileSync(join(dumps, 'nothing.txt'), '# no changes this interval\n');
    const r = await cluster.kvctl(['load', '--table', 'd', '--version', '2', '--incremental', join(dumps, 'nothing.txt')]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /a delta on v1: 0 upserts and 0 deletes/);
    assert.equal(await current('d'), 2);
    await assertServes('d', v1, v1.keys.slice(0, 500));
  });

  /** A Put sent straight to every replica of `group`, as a writer other than the SDK could send it. */
  async function rawPut(group: number, table: string, keys: bigint[], order: number): Promise<string[]> {
    const conns = new ClusterConnections(cluster.manifest);
    try {
      const body = {
        table, order, writer: 'raw-writer',
        keys: Buffer.from(BigUint64Array.from(keys).buffer),
        values: Buffer.from(new Float32Array(keys.length * DIM).fill(7).buffer),
      };
      return await Promise.all(conns.groups[group]!.map((c) =>
        controlCall(c, 'Put', body, 10_000).then(() => 'ok', (err: grpc.ServiceError) => `${grpc.status[err.code]}: ${err.details}`)));
    } finally {
      conns.close();
    }
  }

  const groupOf = (key: bigint): number => partitionOf(key, cluster.manifest.partitions) % cluster.manifest.groups.length;

  test('a put stamped far in the future is refused, and a later put of the key takes effect', async () => {
    await loadV1('f');
    const key = v1.keys[0]!;
    const g = groupOf(key);
    const now = Date.now();
    for (const order of [(now + 600_000) * ORDER_SCALE, Number.MAX_SAFE_INTEGER]) {
      const answers = await rawPut(g, 'f', [key], order);
      for (const a of answers) assert.match(a, /^INVALID_ARGUMENT: .*ms ahead of this replica's clock; at most 5000 ms of clock skew/);
    }
    // Within the skew a writer's clock may be ahead.
    assert.deepEqual(await rawPut(g, 'f', [key], (now + 1000) * ORDER_SCALE), ['ok', 'ok']);
    // Nothing pins the key: a put made after that stamp wins.
    const stampedAt = now + 1000;
    // The state waited on here is the clock itself: the SDK stamps its put with it.
    while (Date.now() <= stampedAt) await new Promise((r) => setTimeout(r, stampedAt - Date.now() + 1));
    await client.putEmbeddings([key], new Float32Array(DIM).fill(3), { table: 'f' });
    // Acknowledged by one replica of the group; every replica of it serves the put once it has it.
    for (const address of cluster.manifest.groups[g]!.replicas) {
      await until(`${address} to serve the later put`, async () => {
        const r = await lookupAt(address, 'f', BigUint64Array.of(key));
        if (r.values[0] === 3) return true;
        assert.equal(r.values[0], 7, `${address} serves the raw put until it has the later one`);
        return undefined;
      });
    }
  });

  test("a put of keys another group owns, or of one key twice, is refused by every replica and by the SDK", async () => {
    await loadV1('o');
    const key = v1.keys[1]!;
    const other = (groupOf(key) + 1) % cluster.manifest.groups.length;
    for (const a of await rawPut(other, 'o', [key], Date.now() * ORDER_SCALE)) {
      assert.match(a, new RegExp(`^INVALID_ARGUMENT: key ${key} \\(row 0 of the put\\) is in partition \\d+ of shard group ${groupOf(key)}, not of this replica's group ${other}`));
    }
    for (const a of await rawPut(groupOf(key), 'o', [key, key], Date.now() * ORDER_SCALE)) {
      assert.match(a, new RegExp(`^INVALID_ARGUMENT: key ${key} appears twice in one put \\(rows 0 and 1\\)`));
    }
    assert.equal(await codeOf(client.putEmbeddings([v1.keys[2]!, key, v1.keys[3]!, key], new Float32Array(4 * DIM), { table: 'o' })), 'KV_INVALID_ARGUMENT');
    await assert.rejects(client.putEmbeddings([key, key], new Float32Array(2 * DIM), { table: 'o' }), /keys\[0\] and keys\[1\] are the same key/);
    // Nothing was applied: the key still reads v1.
    await assertServes('o', v1, v1.keys.slice(0, 10));
  });

  test('kvctl drop removes a version that is not current, everywhere and for good; the current version and bases are refused', async () => {
    await loadV1('x');
    const v2 = makeModel(2000, DIM, 22, 2);
    mkdirSync(join(dumps, 'x2'));
    await writeModelPart(join(dumps, 'x2', 'part-0'), v2, 0, v2.keys.length);
    const staged = await cluster.kvctl(['load', '--table', 'x', '--version', '2', '--full', join(dumps, 'x2'), '--no-publish']);
    assert.equal(staged.code, 0, staged.stderr);
    const held = async (): Promise<number[][]> => {
      const st = await cluster.kvctl(['status', '--json']);
      return (JSON.parse(st.stdout) as { status: { tables: { name: string; versions: { version: number }[] }[] } }[])
        .map((rep) => rep.status.tables.find((t) => t.name === 'x')!.versions.map((v) => v.version));
    };
    assert.deepEqual(await held(), [[1, 2], [1, 2], [1, 2], [1, 2]]);
    const rowsFiles = (): string[] => cluster.manifest.groups.flatMap((_, g) => [0, 1].flatMap((r) =>
      readdirSync(join(cluster.dir, `g${g}r${r}`), { recursive: true }).map(String).filter((n) => n.endsWith('.rows') && /x/.test(n))));
    const before = rowsFiles().length;

    const isCurrent = await cluster.kvctl(['drop', '--table', 'x', '--version', '1']);
    assert.equal(isCurrent.code, 1);
    assert.match(isCurrent.stderr, /^kvctl: error: cannot drop x v1: x v1 is current on group 0 replica 0/);
    const none = await cluster.kvctl(['drop', '--table', 'x', '--version', '7']);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /no replica holds x v7/);

    const r = await cluster.kvctl(['drop', '--table', 'x', '--version', '2']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /x: version 2 dropped from 4 replicas/);
    assert.deepEqual(await held(), [[1], [1], [1], [1]]);
    assert.equal(rowsFiles().length, before - 4, 'every replica deleted the rows file of v2');
    await assertServes('x', v1, v1.keys.slice(0, 300));
    // For good: a restarted replica does not bring it back, and the number can be loaded again.
    await cluster.restartReplica(1, 0);
    assert.deepEqual(await held(), [[1], [1], [1], [1]]);
    const again = await cluster.kvctl(['load', '--table', 'x', '--version', '2', '--full', join(dumps, 'x2'), '--publish']);
    assert.equal(again.code, 0, again.stderr);
    await assertServes('x', v2, v2.keys.slice(0, 300));

    // A delta on v2, published: v2 is its base and cannot go while it is kept.
    writeFileSync(join(dumps, 'x3.txt'), `${v2.keys[0]}\t${Array(DIM).fill(5).join(',')}\n`);
    const delta = await cluster.kvctl(['load', '--table', 'x', '--version', '3', '--incremental', join(dumps, 'x3.txt')]);
    assert.equal(delta.code, 0, delta.stderr);
    const base = await cluster.kvctl(['drop', '--table', 'x', '--version', '2']);
    assert.equal(base.code, 1);
    assert.match(base.stderr, /x v2 is the base of v3; drop that first/);
    assert.equal(await current('x'), 3);
  });

  // Its timeout fails the test if puts wait for the frozen replica (their deadline is 10 minutes).
  test('one frozen replica holds no put: each is acknowledged by the replica that answers, and the frozen one catches up when thawed', { timeout: 120_000 }, async () => {
    await loadV1('p');
    const keys = v1.keys.slice(0, 50);
    // Deadlines far beyond what the test waits: a put that waited for the frozen replica would not end.
    const deadlineMs = 600_000;
    cluster.signalReplica(0, 0, 'SIGSTOP');
    try {
      for (let i = 0; i < keys.length; i++) {
        await client.putEmbeddings([keys[i]!], new Float32Array(DIM).fill(100 + i), { table: 'p', deadlineMs });
      }
    } finally {
      cluster.signalReplica(0, 0, 'SIGCONT');
    }
    // Thawed, g0r0 pulls what it missed from its peer: read it directly until it serves every put.
    const address = cluster.manifest.groups[0]!.replicas[0]!;
    const mine = keys.filter((k) => groupOf(k) === 0);
    assert.ok(mine.length > 5, `group 0 owns ${mine.length} of the keys`);
    await until('g0r0 to serve every put it missed', async () => {
      const r = await lookupAt(address, 'p', BigUint64Array.from(mine));
      return mine.every((k, j) => r.found[j] === 1 && r.values[j * DIM] === 100 + keys.indexOf(k)) ? true : undefined;
    });
  });
});
