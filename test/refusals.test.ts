import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { EmbeddingClient } from '../src/index.js';
import { writeNpyPair } from '../src/loader/npy-write.js';
import { TestCluster } from './helpers/cluster.js';
import { expected, makeModel, sameBits, writeModelPart, type Model } from './helpers/model.js';

const DIM = 4;

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
});
