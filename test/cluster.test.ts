import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { EmbeddingClient, stringKey } from '../src/index.js';
import { loadManifest } from '../src/cluster/manifest.js';
import { CHANNEL_OPTIONS } from '../src/transport/options.js';
import { decodeLookupResponse, encodeLookupRequest, type LookupRequest, type LookupResponse } from '../src/wire/lookup.js';
import { EMBKV_CLIENT_SERVICE, EmbkvClient } from '../src/wire/services.js';
import { runLoad } from '../src/loader/loader.js';
import { writeNpy } from '../src/loader/npy-write.js';
import { startRouter, TestCluster } from './helpers/cluster.js';
import { expected, makeModel, makeRequest, sameBits, writeModelPart, writeModelText, type Model } from './helpers/model.js';
import { codeOf } from './helpers/util.js';

const DIM = 32;
const PROTO_DIR = fileURLToPath(new URL('../../proto', import.meta.url));
const PY_CLIENT = fileURLToPath(new URL('../../test/python/router_lookup.py', import.meta.url));

/** Asserts a lookup of `req` answers exactly what model `m` holds. */
async function assertServes(client: EmbeddingClient, m: Model, req: BigUint64Array, version?: number): Promise<void> {
  const r = await client.getEmbeddings(req, { table: 'emb', ...(version ? { version } : {}) });
  const want = expected(m, req);
  assert.equal(r.dim, m.dim);
  // The caller owns a buffer of exactly the answer: nothing else lives in it.
  assert.equal(r.values.byteOffset, 0);
  assert.equal(r.values.buffer.byteLength, r.values.byteLength);
  assert.deepEqual(r.found, want.found);
  assert.ok(sameBits(r.values, want.values), 'vectors differ');
}

describe('a cluster of 2 groups x 2 replica processes', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let v1: Model;
  let dumps: string;

  before(async () => {
    cluster = await TestCluster.start(2, 2, { partitions: 16 });
    client = new EmbeddingClient({ config: cluster.configPath });
    dumps = join(cluster.dir, 'dumps');
    mkdirSync(dumps);
    v1 = makeModel(30_000, DIM, 1, 1);
    // Small keys and string keys too, so every key form of the SDK finds something.
    for (let i = 0; i < 50; i++) v1.keys[i] = BigInt(i);
    v1.keys[50] = await stringKey('user:7');
    const dir = join(dumps, 'v1');
    mkdirSync(dir);
    await writeModelPart(join(dir, 'part-0'), v1, 0, 10_000);
    await writeModelPart(join(dir, 'part-1'), v1, 10_000, 25_000);
    writeModelText(join(dir, 'part-2.txt'), v1, 25_000, 30_000);
    writeFileSync(join(dir, '_SUCCESS'), '');
  });

  after(async () => {
    await client?.close();
    await cluster?.close();
  });

  // A fault test that fails leaves no replica down or frozen for the tests after it.
  afterEach(() => cluster.ensureAllUp());

  test('kvctl load --publish loads NumPy and text parts, and lookups are bit-exact', async () => {
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', join(dumps, 'v1'), '--publish']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /loaded emb v1: 30000 keys of dim 32/);
    const req = makeRequest(v1, 20_000);
    await assertServes(client, v1, req);
    const res = await client.getEmbeddings(req, { table: 'emb' });
    assert.equal(res.version, 1);
    assert.ok(res.found.includes(0) && res.found.includes(1));
  });

  test('every key form of the SDK reads the same rows, duplicates included', async () => {
    const asBig = [0n, 7n, 49n, 7n, 123456789n];
    const a = await client.getEmbeddings(asBig, { table: 'emb' });
    const b = await client.getEmbeddings([0, 7, 49, 7, 123456789], { table: 'emb' });
    const c = await client.getEmbeddings(new BigUint64Array(asBig), { table: 'emb' });
    assert.deepEqual(Array.from(a.found), [1, 1, 1, 1, 0]);
    assert.ok(sameBits(a.values, b.values) && sameBits(a.values, c.values));
    assert.equal(a.values[1 * DIM + 1], 7); // row 7's second component is its row number
    assert.ok(a.values.subarray(4 * DIM).every((v) => v === 0), 'absent keys get zeros');
    const s = await client.getEmbeddings(['user:7', 'nobody'], { table: 'emb' });
    assert.deepEqual(Array.from(s.found), [1, 0]);
    assert.equal(s.values[1], 50);
    const empty = await client.getEmbeddings([], { table: 'emb' });
    assert.equal(empty.values.length, 0);
    assert.equal(empty.dim, DIM);
  });

  test('getEmbeddings into reused out arrays: exact answers, absent rows zeroed, sizes checked', async () => {
    const n = 3000;
    const out = { values: new Float32Array((n + 50) * DIM), found: new Uint8Array(n + 50) };
    // Fill with an answer that has every key present, then read one with absent keys into the same arrays.
    const full = new BigUint64Array(n).map(() => v1.keys[Math.floor(Math.random() * v1.keys.length)]!);
    const first = await client.getEmbeddings(full, { table: 'emb', out });
    assert.equal(first.values.buffer, out.values.buffer, 'written in place');
    out.values.fill(7, n * DIM); // past the answer: must stay untouched
    for (const req of [makeRequest(v1, n, 3), makeRequest(v1, 100, 2)]) {
      const r = await client.getEmbeddings(req, { table: 'emb', out });
      const want = expected(v1, req);
      assert.equal(r.values.length, req.length * DIM);
      assert.equal(r.found.length, req.length);
      assert.deepEqual(r.found, want.found);
      assert.ok(sameBits(r.values, want.values), 'vectors differ (absent rows must read zeros)');
    }
    assert.equal(out.values[n * DIM + 1], 7);
    // Arrays 4 bytes off an 8-byte boundary take the float-at-a-time placement; it clears too.
    const odd = { values: new Float32Array(new ArrayBuffer((n * DIM + 1) * 4), 4, n * DIM), found: new Uint8Array(n) };
    await client.getEmbeddings(full, { table: 'emb', out: odd });
    const holes = makeRequest(v1, n, 3);
    const r = await client.getEmbeddings(holes, { table: 'emb', out: odd });
    assert.equal(r.values.byteOffset, 4);
    assert.ok(sameBits(r.values, expected(v1, holes).values), 'unaligned: absent rows must read zeros');
    const code = codeOf;
    const req = makeRequest(v1, 10);
    assert.equal(await code(client.getEmbeddings(req, { table: 'emb', out: { values: new Float32Array(10 * DIM - 1), found: new Uint8Array(10) } })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.getEmbeddings(req, { table: 'emb', out: { values: new Float32Array(10 * DIM), found: new Uint8Array(9) } })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.getEmbeddings(req, { table: 'emb', out: { values: new Float64Array(10 * DIM), found: new Uint8Array(10) } as never })), 'KV_INVALID_ARGUMENT');
    const shared = new ArrayBuffer(10 * DIM * 4);
    assert.equal(await code(client.getEmbeddings(req, { table: 'emb', out: { values: new Float32Array(shared), found: new Uint8Array(shared, 0, 10) } })), 'KV_INVALID_ARGUMENT');
  });

  test('the SDK rejects with stable codes', async () => {
    const code = codeOf;
    assert.equal(await code(client.getEmbeddings([1], { table: 'nope' })), 'KV_TABLE_NOT_FOUND');
    assert.equal(await code(client.getEmbeddings([1], { table: 'emb', version: 99 })), 'KV_VERSION_NOT_FOUND');
    assert.equal(await code(client.getEmbeddings([-1], { table: 'emb' })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.getEmbeddings([1n, 'a'] as never, { table: 'emb' })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.getEmbeddings([1], { table: 'bad name!' })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.getEmbeddings([1], { table: 'emb', deadlineMs: 0 })), 'KV_INVALID_ARGUMENT');
    assert.equal(await code(client.getEmbeddings([1], { table: 'emb', bogus: 1 } as never)), 'KV_INVALID_ARGUMENT');
    const ctl = new AbortController();
    ctl.abort();
    assert.equal(await code(client.getEmbeddings([1], { table: 'emb', signal: ctl.signal })), 'KV_ABORTED');
    assert.throws(() => new EmbeddingClient({ config: cluster.configPath, timeout: 5 } as never), /use deadlineMs/);
    const closed = new EmbeddingClient({ config: cluster.configPath });
    await closed.close();
    await closed.close();
    assert.equal(await code(closed.getEmbeddings([1], { table: 'emb' })), 'KV_CLOSED');
  });

  test('bad dumps are refused naming the file and row, and version 1 keeps serving unchanged', async () => {
    const bad = (name: string): string => {
      const d = join(dumps, name);
      mkdirSync(d);
      return d;
    };
    const m = makeModel(2000, DIM, 7, 2);
    const cases: { name: string; make: (d: string) => Promise<void>; expect: RegExp; flags?: string[] }[] = [
      {
        name: 'nan',
        make: async (d) => {
          const mm = makeModel(2000, DIM, 8, 2);
          mm.values[1234 * DIM + 5] = NaN;
          await writeModelPart(join(d, 'p'), mm, 0, 2000);
        },
        expect: /p\.values\.npy.*row 1234|row 1234.*p\.values\.npy/,
      },
      {
        name: 'inf',
        make: async (d) => {
          const mm = makeModel(100, DIM, 9, 2);
          mm.values[17 * DIM] = -Infinity;
          await writeModelPart(join(d, 'p'), mm, 0, 100);
        },
        expect: /row 17/,
      },
      {
        name: 'duplicate',
        make: async (d) => {
          await writeModelPart(join(d, 'a'), m, 0, 1000);
          const dup = makeModel(1000, DIM, 10, 2);
          dup.keys[321] = m.keys[5]!;
          await writeModelPart(join(d, 'b'), dup, 0, 1000);
        },
        expect: /b\.keys\.npy: row 321: key \d+ is repeated|a\.keys\.npy: row 5: key \d+ is repeated/,
      },
      {
        name: 'truncated',
        make: async (d) => {
          await writeModelPart(join(d, 'p'), m, 0, 2000);
          truncateSync(join(d, 'p.values.npy'), 128 + 1000 * DIM * 4 + 10);
        },
        expect: /p\.values\.npy.*truncated/,
      },
      {
        name: 'wrongdim',
        make: async (d) => {
          await writeModelPart(join(d, 'a'), m, 0, 1000);
          const other = makeModel(100, 16, 11, 2);
          await writeModelPart(join(d, 'b'), other, 0, 100);
        },
        expect: /b\.values\.npy.*dim|dim.*b\.values\.npy/,
      },
      {
        name: 'newdim',
        make: async (d) => {
          await writeModelPart(join(d, 'p'), makeModel(100, 16, 12, 2), 0, 100);
        },
        expect: /p\.values\.npy: dim 16 differs from 32 \(the dim of emb v1; pass --dim/,
      },
      {
        name: 'rowcount',
        make: async (d) => {
          await writeNpy(join(d, 'p.keys.npy'), '<u8', [1000], m.keys.slice(0, 1000));
          await writeNpy(join(d, 'p.values.npy'), '<f4', [999, DIM], m.values.slice(0, 999 * DIM));
        },
        expect: /p\.(keys|values)\.npy.*(1000|999)/,
      },
      {
        name: 'text-malformed',
        make: async (d) => {
          writeFileSync(join(d, 'p.txt'), `1\t${'1,'.repeat(DIM - 1)}1\n2\t${'1,'.repeat(DIM - 1)}x\n`);
        },
        expect: /p\.txt.*line 2/,
      },
    ];
    // A duplicate is found by the replicas: once from a staged file, once over gRPC.
    cases.push({ ...cases.find((c) => c.name === 'duplicate')!, name: 'duplicate-over-grpc', flags: ['--no-staging'] });
    const probe = makeRequest(v1, 5000);
    for (const c of cases) {
      const d = bad(c.name);
      await c.make(d);
      const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '2', '--full', d, '--publish', ...(c.flags ?? [])]);
      assert.equal(r.code, 1, `${c.name}: exit code; stdout ${r.stdout}`);
      assert.match(r.stderr, c.expect, `${c.name}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split('\n').length, 1, `${c.name}: one clear line: ${r.stderr}`);
      await assertServes(client, v1, probe);
    }
    // No replica kept a write version of a refused load.
    const st = await cluster.kvctl(['status', '--json']);
    assert.equal(st.code, 0, st.stderr);
    for (const rep of JSON.parse(st.stdout) as { status: { tables: { versions: { version: number; state: string }[] }[] } }[]) {
      const versions = rep.status.tables.flatMap((t) => t.versions.map((v) => `${v.version}:${v.state}`));
      assert.deepEqual(versions, ['1:sealed']);
    }
  });

  test('an existing or older version number is refused', async () => {
    const again = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', join(dumps, 'v1')]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /version 1 exists/);

    const v3 = makeModel(3000, DIM, 3, 3);
    await writeModelPart(join(dumps, 'v3'), v3, 0, 3000);
    const ok = await cluster.kvctl(['load', '--table', 'emb', '--version', '3', '--full', join(dumps, 'v3')]);
    assert.equal(ok.code, 0, ok.stderr);
    // Loaded but not published: current is still 1, and 3 is readable only when asked for.
    await assertServes(client, v1, makeRequest(v1, 2000));
    await assertServes(client, v3, makeRequest(v3, 2000), 3);
    const pub = await cluster.kvctl(['publish', '--table', 'emb', '--version', '3']);
    assert.equal(pub.code, 0, pub.stderr);
    await assertServes(client, v3, makeRequest(v3, 2000));
    await assertServes(client, v1, makeRequest(v1, 2000), 1);

    const older = await cluster.kvctl(['load', '--table', 'emb', '--version', '2', '--full', join(dumps, 'v3')]);
    assert.equal(older.code, 1);
    assert.match(older.stderr, /older than the current version 3/);

    const back = await cluster.kvctl(['rollback', '--table', 'emb', '--version', '1']);
    assert.equal(back.code, 0, back.stderr);
    await assertServes(client, v1, makeRequest(v1, 2000));

    // A retrain that changes the dimension says so with --dim. (50: rows of 25 float pairs, so the
    // SDK's placement runs both its four-pair steps and its one-pair tail.)
    const wide = makeModel(500, 50, 13, 9);
    await writeModelPart(join(dumps, 'v9'), wide, 0, 500);
    const v9 = await cluster.kvctl(['load', '--table', 'emb', '--version', '9', '--full', join(dumps, 'v9'), '--dim', '50']);
    assert.equal(v9.code, 0, v9.stderr);
    await assertServes(client, wide, makeRequest(wide, 300), 9);
    await assertServes(client, v1, makeRequest(v1, 2000));
  });

  test('kvctl get and kvctl status', async () => {
    const g = await cluster.kvctl(['get', '--table', 'emb', '7', '18446744073709551615']);
    assert.equal(g.code, 0, g.stderr);
    const lines = g.stdout.trim().split('\n');
    assert.equal(lines.length, 2);
    const [k, vec] = lines[0]!.split('\t');
    assert.equal(k, '7');
    assert.deepEqual(vec!.split(',').map(Number), Array.from(v1.values.subarray(7 * DIM, 8 * DIM)));
    assert.equal(lines[1], '18446744073709551615\t(absent)');
    const badKey = await cluster.kvctl(['get', '--table', 'emb', '18446744073709551616']);
    assert.equal(badKey.code, 1);
    assert.match(badKey.stderr, /not a decimal uint64/);

    const s = await cluster.kvctl(['status']);
    assert.equal(s.code, 0, s.stderr);
    assert.match(s.stdout, /group 1/);
    assert.match(s.stdout, /emb\s+current v1/);
    assert.match(s.stdout, /rss/);
  });

  test('a Python client generated by protoc reads bit-exact vectors through the router, and answers in a row stay exact', async () => {
    const { proc: router, port } = await startRouter(cluster.configPath);
    try {
      const req = makeRequest(v1, 5000);
      const out = execFileSync('/usr/bin/python3', [PY_CLIENT, PROTO_DIR, `127.0.0.1:${port}`, 'emb'], {
        input: Buffer.from(req.buffer).toString('hex'),
        maxBuffer: 64 * 1024 * 1024,
      }).toString();
      const r = JSON.parse(out) as { version: number; dim: number; found: string; values: string };
      const want = expected(v1, req);
      assert.equal(r.version, 1);
      assert.equal(r.dim, DIM);
      assert.deepEqual(new Uint8Array(Buffer.from(r.found, 'hex')), want.found);
      assert.ok(Buffer.from(r.values, 'hex').equals(Buffer.from(want.values.buffer)), 'router vectors differ');

      // The router answers from reused buffers and receives large requests into reused buffers: answers
      // in a row, with absent keys where the one before had rows, come back exact (absent rows zero).
      const stub = new EmbkvClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
      try {
        for (const [round, absentEvery] of [3, 7, 2, 100, 5].entries()) {
          const keys = makeRequest(v1, 40_000 + round * 100, absentEvery);
          const a = await new Promise<LookupResponse>((resolve, reject) =>
            stub.makeUnaryRequest<LookupRequest, LookupResponse>(EMBKV_CLIENT_SERVICE.lookup.path, encodeLookupRequest, decodeLookupResponse,
              { table: 'emb', version: 0, keys: new Uint8Array(keys.buffer) }, (err, res) => (err ? reject(err) : resolve(res!))));
          const w = expected(v1, keys);
          assert.ok(Buffer.from(a.found.buffer, a.found.byteOffset, a.found.length).equals(Buffer.from(w.found)), `round ${round}: found flags`);
          assert.ok(sameBits(a.values, w.values), `round ${round}: vectors differ`);
        }
      } finally {
        stub.close();
      }
    } finally {
      router.kill('SIGTERM');
    }
  });

  test('full loads reach replicas on this host through staged files; --no-staging and groups that cannot see the file get rows over gRPC', async () => {
    const rowsFile = (g: number, r: number, version: number): string => join(cluster.dir, `g${g}r${r}`, 'rows', `stg@${String(version).padStart(16, '0')}.rows`);
    const incoming = (g: number, r: number): string => join(cluster.dir, `g${g}r${r}`, 'incoming');
    const load = async (version: number, m: Model, extra: string[] = []): Promise<string> => {
      const dir = join(dumps, `stg${version}`);
      await writeModelPart(dir, m, 0, m.keys.length);
      const r = await cluster.kvctl(['load', '--table', 'stg', '--version', String(version), '--full', dir, '--publish', ...extra]);
      assert.equal(r.code, 0, r.stderr);
      const req = makeRequest(m, 4000);
      const got = await client.getEmbeddings(req, { table: 'stg' });
      assert.equal(got.version, version);
      const want = expected(m, req);
      assert.deepEqual(got.found, want.found);
      assert.ok(sameBits(got.values, want.values), `stg v${version}: vectors differ`);
      return r.stdout;
    };

    const s1 = makeModel(20_000, DIM, 21, 5);
    assert.match(await load(1, s1), /loaded stg v1: 20000 keys of dim 32 .* on 2 groups \(all through staged files\); published/);
    for (const g of [0, 1]) {
      // Both replicas of a group keep the one file the loader wrote (a hard link each), and the
      // loader's own name for it is gone.
      const a = statSync(rowsFile(g, 0, 1));
      const b = statSync(rowsFile(g, 1, 1));
      assert.equal(a.ino, b.ino, `group ${g}: one file`);
      assert.equal(a.nlink, 2);
      assert.ok(a.size > 20_000 / 2 * DIM * 4 * 0.8, `group ${g}: ${a.size} bytes`);
      for (const r of [0, 1]) assert.deepEqual(readdirSync(incoming(g, r)), [], `g${g}r${r}: nothing left staged`);
    }

    const s2 = makeModel(15_000, DIM, 22, 5);
    const out2 = await load(2, s2, ['--no-staging']);
    assert.doesNotMatch(out2, /staged/);
    // Each replica wrote its own rows file from what it received.
    assert.notEqual(statSync(rowsFile(0, 0, 2)).ino, statSync(rowsFile(0, 1, 2)).ino);

    // Group 1's first replica has no stage directory the loader can write to: only group 0 is staged.
    rmSync(incoming(1, 0), { recursive: true });
    try {
      const s3 = makeModel(12_000, DIM, 23, 5);
      assert.match(await load(3, s3), /on 2 groups \(1 through staged files\)/);
      assert.equal(statSync(rowsFile(0, 0, 3)).ino, statSync(rowsFile(0, 1, 3)).ino);
      assert.notEqual(statSync(rowsFile(1, 0, 3)).ino, statSync(rowsFile(1, 1, 3)).ino);
    } finally {
      mkdirSync(incoming(1, 0), { recursive: true });
    }
  });

  test('a staged load names its blocks to the replicas a few at a time; a key repeated in a later block is told by its file and row', async () => {
    const manifest = loadManifest(cluster.configPath);
    const m = makeModel(9000, DIM, 24, 5);
    mkdirSync(join(dumps, 'rng1'));
    await writeModelPart(join(dumps, 'rng1', 'a'), m, 0, 9000);
    // Blocks of 300 rows (~40 KB) named ~100 KB at a time: each group's file is ~15 blocks in ~6 ranges.
    const small = { manifest, table: 'rng', batchRows: 300, stageRangeBytes: 100_000, publish: true };
    const r = await runLoad({ ...small, version: 1, path: join(dumps, 'rng1') });
    assert.equal(r.stagedGroups, 2);
    assert.equal(r.rows, 9000);
    const req = makeRequest(m, 3000);
    const got = await client.getEmbeddings(req, { table: 'rng' });
    assert.equal(got.version, 1);
    assert.deepEqual(got.found, expected(m, req).found);
    assert.ok(sameBits(got.values, expected(m, req).values), 'vectors differ');

    const dup = makeModel(9000, DIM, 25, 5);
    dup.keys[8000] = dup.keys[10]!;
    mkdirSync(join(dumps, 'rng2'));
    await writeModelPart(join(dumps, 'rng2', 'b'), dup, 0, 9000);
    await assert.rejects(runLoad({ ...small, version: 2, path: join(dumps, 'rng2') }), /b\.keys\.npy: row (8000|10): key \d+ is repeated within this load/);
    assert.equal((await client.getEmbeddings(req, { table: 'rng' })).version, 1, 'the refused load changed nothing served');
    await assert.rejects(runLoad({ ...small, version: 2, path: join(dumps, 'rng1'), stageRangeBytes: 0 }), /stageRangeBytes must be an integer/);
  });

  test('replicas killed with kill -9 serve their tables again from their own disk', async () => {
    await cluster.stopReplica(0, 0, 'SIGKILL');
    await cluster.stopReplica(0, 1, 'SIGKILL');
    const down = await cluster.kvctl(['status']);
    assert.equal(down.code, 1, 'status exits non-zero while replicas are down');
    assert.match(down.stdout, /DOWN/);
    cluster.startReplica(0, 0);
    cluster.startReplica(0, 1);
    await cluster.waitReady();
    // Both replicas of group 0 restarted: every answer for its keys comes from their disks.
    await assertServes(client, v1, makeRequest(v1, 10_000));
  });
});
