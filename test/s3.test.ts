/**
 * Dumps in S3-compatible object storage: a real s3rver on loopback (its directory in the cluster's temp
 * dir), a 2-group cluster, loads through kvctl and runLoad. The DumpSource contract runs against both
 * the local and the S3 implementation.
 */
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EmbeddingClient } from '../src/index.js';
import { KvError } from '../src/common/errors.js';
import { runLoad } from '../src/loader/loader.js';
import { writeNpyPair } from '../src/loader/npy-write.js';
import { parseDumpSource, planDump, type S3SourceOptions } from '../src/loader/sources.js';
import { statusAll } from '../src/loader/cluster-ops.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { TestCluster } from './helpers/cluster.js';
import { writeNpy } from './helpers/npy.js';
import { expected, makeModel, makeRequest, sameBits, writeModelPart, writeModelText, type Model } from './helpers/model.js';
import { S3RVER_CREDENTIALS, S3RVER_ENV, TestS3 } from './helpers/s3.js';
import { dumpSourceSuite } from './suites/dump-source-suite.js';

const DIM = 16;

dumpSourceSuite('local files', async () => {
  const root = mkdtempSync(join(tmpdir(), 'embkv-source-'));
  return {
    source: parseDumpSource(root),
    root,
    write: async (rel, bytes) => {
      mkdirSync(dirname(join(root, rel)), { recursive: true });
      writeFileSync(join(root, rel), bytes);
    },
    close: async () => rmSync(root, { recursive: true, force: true }),
  };
});

dumpSourceSuite('S3 (s3rver)', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'embkv-s3-'));
  const s3 = await TestS3.start(dir);
  // Small blocks, so reads cross several ranged GETs.
  const source = parseDumpSource('s3://dumps/', { endpoint: s3.endpoint, credentials: S3RVER_CREDENTIALS, blockBytes: 64 * 1024, readAhead: 2 });
  return {
    source,
    root: s3.url('contract/'),
    write: (rel, bytes) => s3.put(`contract/${rel}`, bytes),
    close: async () => {
      source.close();
      await s3.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
});

/** Asserts lookups of `req` answer exactly what `m` holds, from `version`. */
async function assertServes(client: EmbeddingClient, m: Model, req: BigUint64Array, version: number): Promise<void> {
  const r = await client.getEmbeddings(req, { table: 'emb' });
  assert.equal(r.version, version);
  const want = expected(m, req);
  assert.deepEqual(r.found, want.found);
  assert.ok(sameBits(r.values, want.values), 'vectors differ');
}

describe('loads from S3-compatible object storage (s3rver)', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let s3: TestS3;
  let local: string;
  let v1: Model;
  let s3opts: S3SourceOptions;

  /** Writes the files of a local directory, then uploads them under `prefix`. */
  async function upload(prefix: string, write: (dir: string) => Promise<void> | void): Promise<void> {
    const d = join(local, prefix.replace(/\//g, '_'));
    mkdirSync(d);
    await write(d);
    await s3.putDir(d, prefix);
  }

  async function currentVersion(): Promise<number[]> {
    const conns = new ClusterConnections(cluster.manifest);
    try {
      const all = await statusAll(conns);
      return all.map((s) => s.status!.tables.find((t) => t.name === 'emb')?.currentVersion ?? 0);
    } finally {
      conns.close();
    }
  }

  before(async () => {
    cluster = await TestCluster.start(2, 1, { partitions: 16, kvctlEnv: { ...S3RVER_ENV } });
    client = new EmbeddingClient({ config: cluster.configPath });
    local = join(cluster.dir, 'dumps');
    mkdirSync(local);
    s3 = await TestS3.start(join(cluster.dir, 's3'));
    s3opts = { endpoint: s3.endpoint, credentials: S3RVER_CREDENTIALS };
    v1 = makeModel(20_000, DIM, 1, 1);
    await upload('full/1/', async (d) => {
      await writeModelPart(join(d, 'part-0'), v1, 0, 8_000);
      await writeModelPart(join(d, 'part-1'), v1, 8_000, 15_000);
      writeModelText(join(d, 'part-2.txt'), v1, 15_000, 20_000);
      writeFileSync(join(d, '_SUCCESS'), '');
    });
  });

  after(async () => {
    await client?.close();
    await s3?.close();
    await cluster?.close();
  });

  test('kvctl load --full s3://BUCKET/PREFIX/ --s3-endpoint: NumPy and text parts, lookups bit-exact', async () => {
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', s3.url('full/1/'), '--s3-endpoint', s3.endpoint, '--publish']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /loaded emb v1: 20000 keys of dim 16/);
    assert.doesNotMatch(r.stderr, /Warning/);
    await assertServes(client, v1, makeRequest(v1, 5_000), 1);
  });

  test('kvctl load --incremental s3://... with the endpoint from AWS_ENDPOINT_URL_S3: upserts and deletes', async () => {
    const up = makeModel(500, DIM, 2, 2);
    const dels = v1.keys.slice(0, 300);
    await upload('incremental/2/', async (d) => {
      await writeModelPart(join(d, 'part-0'), up, 0, 500);
      await writeNpyPair(join(d, 'part-1'), new BigUint64Array(0), new Float32Array(0), DIM);
      writeNpy(join(d, 'part-1.deletes.npy'), '<u8', [dels.length], dels);
      writeFileSync(join(d, '_SUCCESS'), '');
    });
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '2', '--incremental', s3.url('incremental/2/')], undefined, { AWS_ENDPOINT_URL_S3: s3.endpoint });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /500 upserts and 300 deletes/);
    const req = new BigUint64Array([...up.keys.slice(0, 50), ...dels.slice(0, 50), ...v1.keys.slice(1000, 1050)]);
    const res = await client.getEmbeddings(req, { table: 'emb' });
    assert.equal(res.version, 2);
    assert.deepEqual(Array.from(res.found), [...Array(50).fill(1), ...Array(50).fill(0), ...Array(50).fill(1)]);
    assert.ok(sameBits(res.values.subarray(0, 50 * DIM), up.values.subarray(0, 50 * DIM)));
  });

  test('a prefix of 1,100 objects is listed past the first page of 1,000', async () => {
    const m = makeModel(1_100, DIM, 3, 3);
    await upload('many/3/', (d) => {
      for (let i = 0; i < 1_100; i++) writeModelText(join(d, `part-${String(i).padStart(5, '0')}.txt`), m, i, i + 1);
      writeFileSync(join(d, '_SUCCESS'), '');
    });
    const r = await runLoad({ manifest: cluster.manifest, table: 'emb', version: 3, path: s3.url('many/3/'), s3: s3opts, publish: true });
    assert.equal(r.rows, 1_100);
    await assertServes(client, m, m.keys.slice(), 3);
    v1 = m;
  });

  test('a dump without _SUCCESS is refused naming the marker; --no-success-marker loads it', async () => {
    const m = makeModel(2_000, DIM, 4, 4);
    await upload('full/4/', (d) => writeModelPart(join(d, 'part-0'), m, 0, 2_000));
    const refused = await cluster.kvctl(['load', '--table', 'emb', '--version', '4', '--full', s3.url('full/4/'), '--s3-endpoint', s3.endpoint, '--publish']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /^kvctl: error: s3:\/\/dumps\/full\/4\/_SUCCESS is missing: .*--no-success-marker/);
    assert.equal(refused.stderr.trim().split('\n').length, 1, refused.stderr);
    assert.deepEqual(await currentVersion(), [3, 3]);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '4', '--full', s3.url('full/4/'), '--s3-endpoint', s3.endpoint, '--publish', '--no-success-marker']);
    assert.equal(r.code, 0, r.stderr);
    await assertServes(client, m, makeRequest(m, 1_000), 4);
    v1 = m;
  });

  test('a bad dump is refused naming s3://bucket/key and the row; nothing served changes', async () => {
    const m = makeModel(3_000, DIM, 5, 5);
    m.values[2_500 * DIM + 3] = NaN;
    await upload('full/5/', async (d) => {
      await writeModelPart(join(d, 'part-0'), m, 0, 3_000);
      writeFileSync(join(d, '_SUCCESS'), '');
    });
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '5', '--full', s3.url('full/5/'), '--s3-endpoint', s3.endpoint, '--publish']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /s3:\/\/dumps\/full\/5\/part-0\.values\.npy: row 2500 column 3 is NaN/);
    assert.deepEqual(await currentVersion(), [4, 4]);
    await assertServes(client, v1, makeRequest(v1, 500), 4);
  });

  test('a prefix holding more than one version (full/7/, full/8/) is refused naming them', async () => {
    const m = makeModel(10, DIM, 6, 6);
    for (const v of ['7', '8']) {
      await upload(`versions/${v}/`, async (d) => {
        await writeModelPart(join(d, 'part-0'), m, 0, 10);
        writeFileSync(join(d, '_SUCCESS'), '');
      });
    }
    const source = parseDumpSource(s3.url('versions/'), s3opts);
    try {
      await assert.rejects(planDump(s3.url('versions/'), 'full', { source }), (err: unknown) => {
        assert.ok(err instanceof KvError && err.code === 'KV_INVALID_DATA');
        assert.match(err.message, /s3:\/\/dumps\/versions\/7: subdirectories are not read.*7\/, 8\//);
        return true;
      });
      // One pair of a prefix, named by its NAME or a file of it, is a dump too.
      for (const p of ['versions/7/part-0', 'versions/7/part-0.keys.npy']) {
        const plan = await planDump(s3.url(p), 'full', { source });
        assert.equal(plan.totalRows, 10);
      }
    } finally {
      source.close();
    }
  });

  test('an object that changes during the load fails it', async () => {
    const m = makeModel(100, DIM, 7, 7);
    await upload('changing/', async (d) => {
      await writeModelPart(join(d, 'part-0'), m, 0, 100);
      writeFileSync(join(d, '_SUCCESS'), '');
    });
    const source = parseDumpSource(s3.url('changing/'), s3opts);
    try {
      await source.list(s3.url('changing/'));
      const r = await source.open(s3.url('changing/part-0.values.npy'));
      await s3.put('changing/part-0.values.npy', new Uint8Array(r.size).fill(1));
      await assert.rejects(r.read(new Uint8Array(10), 0, 10, 0), (err: unknown) => {
        assert.ok(err instanceof KvError && err.code === 'KV_INVALID_DATA');
        assert.match(err.message, /s3:\/\/dumps\/changing\/part-0\.values\.npy: changed during the load/);
        return true;
      });
      await r.close();
    } finally {
      source.close();
    }
  });

  // Last: it stops the S3 server.
  test('the S3 server stopping mid-load fails the load naming s3 and the endpoint; nothing half-loaded serves', async () => {
    const m = makeModel(200_000, DIM, 9, 9);
    await upload('full/9/', async (d) => {
      await writeModelPart(join(d, 'part-0'), m, 0, 200_000);
      writeFileSync(join(d, '_SUCCESS'), '');
    });
    const endpoint = s3.endpoint;
    let stopping: Promise<void> | undefined;
    // Small blocks and little read-ahead, rows over gRPC (acknowledged batch by batch, not per staged
    // range): most of the dump is still in S3 when the first batch is acknowledged.
    const loading = runLoad({
      manifest: cluster.manifest, table: 'emb', version: 9, path: s3.url('full/9/'), publish: true, batchRows: 1024, staging: false,
      s3: { ...s3opts, blockBytes: 16 * 1024, readAhead: 1, maxAttempts: 3, retryBaseMs: 20 },
      onProgress: (rows) => {
        if (rows > 0 && stopping === undefined) stopping = s3.stop();
      },
    });
    await assert.rejects(loading, (err: unknown) => {
      assert.ok(err instanceof KvError);
      assert.equal(err.code, 'KV_UNAVAILABLE');
      assert.ok(err.message.startsWith(`s3 ${endpoint} dumps/full/9/part-0.`), err.message);
      return true;
    });
    await stopping;
    assert.deepEqual(await currentVersion(), [4, 4]);
    await assertServes(client, v1, makeRequest(v1, 500), 4);
    const r = await client.getEmbeddings(m.keys.slice(0, 100), { table: 'emb' });
    assert.ok(r.found.every((f) => f === 0), 'no row of the failed load serves');
  });
});
