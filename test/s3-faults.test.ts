/**
 * Object storage that misbehaves, buckets addressed as virtual hosts, credentials from a profile:
 * loads go through a fault-injecting proxy (helpers/s3-proxy.ts) in front of the real s3rver. The
 * proxy answers chosen requests with 503 SlowDown, 500 InternalError, a reset connection or a body
 * cut in half, and records every request's Host header and path.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EmbeddingClient } from '../src/index.js';
import { KvError } from '../src/common/errors.js';
import { runLoad } from '../src/loader/loader.js';
import { statusAll } from '../src/loader/cluster-ops.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { TestCluster } from './helpers/cluster.js';
import { LOCALHOST_DNS_IMPORT } from './helpers/localhost-dns.js';
import { expected, makeModel, makeRequest, sameBits, writeModelPart, type Model } from './helpers/model.js';
import { CUT, INTERNAL_ERROR, RESET, S3Proxy, SLOW_DOWN, type S3Fault } from './helpers/s3-proxy.js';
import { S3RVER_CREDENTIALS, S3RVER_ENV, TestS3 } from './helpers/s3.js';

const DIM = 8;

describe('object storage that fails now and then (a fault-injecting proxy before s3rver)', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let s3: TestS3;
  let proxy: S3Proxy;
  let local: string;
  /** What the table serves now. */
  let served: { m: Model; version: number } | undefined;

  async function upload(prefix: string, m: Model, parts: number): Promise<void> {
    const d = join(local, prefix.replace(/\//g, '_'));
    mkdirSync(d);
    const per = Math.ceil(m.keys.length / parts);
    for (let i = 0; i < parts; i++) await writeModelPart(join(d, `part-${i}`), m, i * per, Math.min(m.keys.length, (i + 1) * per));
    writeFileSync(join(d, '_SUCCESS'), '');
    await s3.putDir(d, prefix);
  }

  async function assertServes(m: Model, version: number): Promise<void> {
    const req = makeRequest(m, 2_000);
    const r = await client.getEmbeddings(req, { table: 'emb' });
    assert.equal(r.version, version);
    const want = expected(m, req);
    assert.deepEqual(r.found, want.found);
    assert.ok(sameBits(r.values, want.values), 'vectors differ');
  }

  /** Every version any replica holds of the table, and the current one of each. */
  async function held(): Promise<{ current: number[]; versions: number[] }> {
    const conns = new ClusterConnections(cluster.manifest);
    try {
      const all = await statusAll(conns);
      const tables = all.map((s) => s.status!.tables.find((t) => t.name === 'emb'));
      return { current: tables.map((t) => t?.currentVersion ?? 0), versions: [...new Set(tables.flatMap((t) => t?.versions.map((v) => v.version) ?? []))].sort() };
    } finally {
      conns.close();
    }
  }

  before(async () => {
    cluster = await TestCluster.start(2, 1, { partitions: 8, kvctlEnv: { ...S3RVER_ENV } });
    client = new EmbeddingClient({ config: cluster.configPath });
    local = join(cluster.dir, 'dumps');
    mkdirSync(local);
    s3 = await TestS3.start(join(cluster.dir, 's3'));
    proxy = await S3Proxy.start(s3.port);
  });

  after(async () => {
    await client?.close();
    await proxy?.close();
    await s3?.close();
    await cluster?.close();
  });

  test('kvctl load retries 503 SlowDown, 500, resets and cut bodies, completes and serves bit-exact', async () => {
    const m = makeModel(30_000, DIM, 1, 1);
    await upload('full/1/', m, 3);
    // The first two tries of every request fail, each with another fault; the third is forwarded.
    const faults: S3Fault[] = [SLOW_DOWN, INTERNAL_ERROR, RESET, CUT];
    const tries = new Map<string, number>();
    let n = 0;
    proxy.rule = (r) => {
      const k = `${r.method} ${r.url} ${r.range ?? ''}`;
      const t = tries.get(k) ?? 0;
      tries.set(k, t + 1);
      if (t >= 2) return undefined;
      const f = faults[n++ % faults.length]!;
      // A listing has no body worth cutting: a reset instead.
      return f.kind === 'cut' && r.method !== 'GET' ? RESET : f.kind === 'cut' && r.range === undefined ? RESET : f;
    };
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', s3.url('full/1/'), '--s3-endpoint', proxy.endpoint, '--publish']);
    proxy.rule = () => undefined;
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /loaded emb v1: 30000 keys of dim 8/);
    const kinds = new Set(proxy.requests.map((q) => q.fault).filter((f) => f !== undefined));
    assert.deepEqual([...kinds].sort(), ['cut', 'reset', 'status']);
    // Every request got through in the end: each values object's data was read by a forwarded GET.
    for (let i = 0; i < 3; i++) {
      assert.ok(proxy.requests.some((q) => q.method === 'GET' && q.path.endsWith(`full/1/part-${i}.values.npy`) && q.fault === undefined));
    }
    await assertServes(m, 1);
    served = { m, version: 1 };
  });

  test('faults beyond the retry budget fail the load with KV_UNAVAILABLE naming s3, the endpoint and bucket/key; nothing served changes', async () => {
    const m = makeModel(30_000, DIM, 2, 2);
    await upload('full/2/', m, 3);
    // Once rows have been sent (a write version is being loaded), every GET of part-2's rows is
    // throttled. Small blocks, little read-ahead: most of part-2 is still to be read then.
    const target = '/dumps/full/2/part-2.values.npy';
    let rowsSent = 0;
    proxy.rule = (r) => (rowsSent > 0 && r.method === 'GET' && r.path === target ? SLOW_DOWN : undefined);
    const before = proxy.requests.length;
    const loading = runLoad({
      manifest: cluster.manifest, table: 'emb', version: 2, path: s3.url('full/2/'), publish: true, staging: false, batchRows: 1024,
      s3: { endpoint: proxy.endpoint, credentials: S3RVER_CREDENTIALS, retryBaseMs: 5, blockBytes: 16 * 1024, readAhead: 1 },
      onProgress: (rows) => {
        rowsSent = rows;
      },
    });
    await assert.rejects(loading, (err: unknown) => {
      assert.ok(err instanceof KvError, String(err));
      assert.equal(err.code, 'KV_UNAVAILABLE');
      assert.ok(err.message.startsWith(`s3 ${proxy.endpoint} dumps/full/2/part-2.values.npy: SlowDown`), err.message);
      assert.match(err.message, /\(gave up after 5 tries\)$/);
      return true;
    });
    proxy.rule = () => undefined;
    assert.ok(rowsSent > 0, 'the load had begun: rows of part-0 were sent');
    const throttled = proxy.requests.slice(before).filter((q) => q.path === target && q.fault === 'status');
    assert.ok(throttled.length >= 5, `${throttled.length} throttled GETs`);
    const h = await held();
    assert.deepEqual(h.current, [1, 1]);
    assert.ok(!h.versions.includes(2), `the failed version was dropped (${h.versions.join(', ')})`);
    await assertServes(served!.m, served!.version);
    const r = await client.getEmbeddings(m.keys.slice(0, 100), { table: 'emb' });
    assert.ok(r.found.every((f) => f === 0), 'no row of the failed load serves');
  });

  test('kvctl load --s3-virtual-host sends virtual-host requests (Host: BUCKET.host) and loads', async () => {
    const m = makeModel(5_000, DIM, 3, 3);
    await upload('full/3/', m, 2);
    // *.localhost resolves to loopback in the kvctl child (helpers/localhost-dns.ts); s3rver takes
    // BUCKET.s3.localhost as a virtual-host request for BUCKET.
    const env = { NODE_OPTIONS: `--import=${LOCALHOST_DNS_IMPORT}`, EMBKV_TEST_LOCALHOST_DNS: '1' };
    const endpoint = `http://s3.localhost:${proxy.port}`;
    const from = proxy.requests.length;
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '3', '--full', s3.url('full/3/'), '--s3-endpoint', endpoint, '--s3-virtual-host', '--publish'], undefined, env);
    assert.equal(r.code, 0, r.stderr);
    const sent = proxy.requests.slice(from);
    assert.ok(sent.length > 0);
    for (const q of sent) {
      assert.equal(q.host, `dumps.s3.localhost:${proxy.port}`, `${q.method} ${q.url}`);
      assert.doesNotMatch(q.path, /^\/dumps\//, `${q.method} ${q.url}`);
    }
    assert.ok(sent.some((q) => q.method === 'GET' && q.path === '/full/3/part-1.values.npy'));
    await assertServes(m, 3);

    // Without the flag, the same endpoint is addressed by path.
    const m4 = makeModel(1_000, DIM, 4, 4);
    await upload('full/4/', m4, 1);
    const from4 = proxy.requests.length;
    const r4 = await cluster.kvctl(['load', '--table', 'emb', '--version', '4', '--full', s3.url('full/4/'), '--s3-endpoint', endpoint, '--publish'], undefined, env);
    assert.equal(r4.code, 0, r4.stderr);
    const sent4 = proxy.requests.slice(from4);
    assert.ok(sent4.length > 0 && sent4.every((q) => q.host === `s3.localhost:${proxy.port}` && q.path.startsWith('/dumps/')));
    await assertServes(m4, 4);
  });

  test('credentials from a profile (AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE), the endpoint from AWS_ENDPOINT_URL; an unknown key fails at once', async () => {
    const m = makeModel(2_000, DIM, 5, 5);
    await upload('full/5/', m, 1);
    const aws = join(cluster.dir, 'aws');
    mkdirSync(aws);
    writeFileSync(join(aws, 'credentials'), '[loader]\naws_access_key_id = S3RVER\naws_secret_access_key = S3RVER\n[wrong]\naws_access_key_id = NOTAKEY\naws_secret_access_key = S3RVER\n');
    writeFileSync(join(aws, 'config'), '[profile loader]\nregion = us-east-1\n[profile wrong]\nregion = us-east-1\n');
    // No credentials or region in the environment: only the profile has them.
    const env = {
      AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '', AWS_REGION: '',
      AWS_SHARED_CREDENTIALS_FILE: join(aws, 'credentials'), AWS_CONFIG_FILE: join(aws, 'config'), AWS_ENDPOINT_URL: proxy.endpoint,
    };
    const from = proxy.requests.length;
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '5', '--full', s3.url('full/5/'), '--publish'], undefined, { ...env, AWS_PROFILE: 'loader' });
    assert.equal(r.code, 0, r.stderr);
    assert.ok(proxy.requests.length > from, 'the requests went to AWS_ENDPOINT_URL');
    await assertServes(m, 5);
    served = { m, version: 5 };

    const refused = await cluster.kvctl(['load', '--table', 'emb', '--version', '6', '--full', s3.url('full/5/'), '--publish'], undefined, { ...env, AWS_PROFILE: 'wrong' });
    assert.equal(refused.code, 1);
    // 403 is not retried: one line, without "gave up after".
    assert.match(refused.stderr, new RegExp(`^kvctl: error: s3 ${proxy.endpoint} dumps/full/5/: list: InvalidAccessKeyId: .*\\(HTTP 403\\)\n$`));
    await assertServes(m, 5);
  });
});
