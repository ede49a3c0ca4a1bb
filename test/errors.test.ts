import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { EmbeddingClient } from '../src/index.js';
import { KvErrorCode, echo, toGrpcError, invalidArgument, truncateBytes } from '../src/common/errors.js';
import { checkVersion } from '../src/common/validate.js';
import { CHANNEL_OPTIONS } from '../src/transport/options.js';
import { encodeLookupRequest } from '../src/wire/lookup.js';
import { rootLogger } from '../src/common/log.js';
import { RouterServer } from '../src/router/server.js';
import { TestCluster } from './helpers/cluster.js';
import { codeOf } from './helpers/util.js';

interface Answer {
  code: grpc.status;
  details: string;
}

/** One unary call of raw request bytes, as any gRPC client could send them; resolves with the status. */
function rawCall(address: string, path: string, request: Buffer): Promise<Answer> {
  const c = new grpc.Client(address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  return new Promise<Answer>((resolve) => {
    c.makeUnaryRequest<Buffer, Buffer>(path, (b) => b, (b) => b, request, new grpc.Metadata(), { deadline: Date.now() + 60_000 }, (err) => {
      c.close();
      resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' });
    });
  });
}

/** A protobuf varint of any uint64. */
function varint(v: bigint): Buffer {
  const out: number[] = [];
  while (v >= 128n) {
    out.push(Number(v & 127n) | 128);
    v >>= 7n;
  }
  out.push(Number(v));
  return Buffer.from(out);
}

/** `{ table, version }` as a message of any of the requests (table is field 1, version field 2). */
function tableVersion(table: string, version: bigint): Buffer {
  const t = Buffer.from(table);
  return Buffer.concat([Buffer.from([0x0a]), varint(BigInt(t.length)), t, Buffer.from([0x10]), varint(version)]);
}

const LOOKUP = '/embkv.v1.Embkv/Lookup';
const PUBLISH = '/embkv.v1.ShardControl/Publish';
const LOAD_BEGIN = '/embkv.v1.ShardControl/LoadBegin';
const LOAD_ROWS = '/embkv.v1.ShardControl/LoadRows';
const KEYS = Buffer.from(new BigUint64Array([1n, 2n]).buffer);

describe('errors that help: bounded, early, INVALID_ARGUMENT with the reason (1 replica, a router)', () => {
  let cluster: TestCluster;
  let router: RouterServer;
  let replica: string;
  let routerAddr: string;

  before(async () => {
    cluster = await TestCluster.start(1, 1, { partitions: 4 });
    replica = cluster.manifest.groups[0]!.replicas[0]!;
    router = new RouterServer({ manifest: cluster.manifest, host: '127.0.0.1', port: 0, logger: rootLogger('embkv', 'silent') });
    await router.start();
    routerAddr = `127.0.0.1:${router.port}`;
  });

  after(async () => {
    await router?.close();
    await cluster?.close();
  });

  test('a long table name is refused by length, with a bounded message, by every handler and the router', async () => {
    for (const len of [10 * 1024, 12 * 1024 * 1024]) {
      const table = 'x'.repeat(len);
      const calls: [string, string, Buffer][] = [
        [replica, LOOKUP, encodeLookupRequest({ table, version: 0, keys: KEYS })],
        [routerAddr, LOOKUP, encodeLookupRequest({ table, version: 0, keys: KEYS })],
        [replica, PUBLISH, tableVersion(table, 1n)],
        [replica, LOAD_BEGIN, tableVersion(table, 1n)],
        [replica, LOAD_ROWS, tableVersion(table, 1n)],
      ];
      for (const [addr, path, req] of calls) {
        const a = await rawCall(addr, path, req);
        const what = `${path} at ${addr === replica ? 'the replica' : 'the router'}, a ${len}-character name`;
        assert.equal(a.code, grpc.status.INVALID_ARGUMENT, `${what}: ${a.details.slice(0, 300)}`);
        assert.match(a.details, new RegExp(`table must be 1-128 characters .*got ${len} characters`), what);
        assert.ok(Buffer.byteLength(a.details) <= 1024, `${what}: ${a.details.length} characters of details`);
      }
    }
  });

  test('a request above the server\'s receive limit gets RESOURCE_EXHAUSTED, not silence', async () => {
    const garbage = Buffer.alloc(64 * 1024 * 1024, 0x41);
    for (const addr of [replica, routerAddr]) {
      for (const path of [LOOKUP, LOAD_ROWS]) {
        if (addr === routerAddr && path !== LOOKUP) continue;
        const a = await rawCall(addr, path, garbage);
        assert.equal(a.code, grpc.status.RESOURCE_EXHAUSTED, `${path} at ${addr}: ${a.details.slice(0, 300)}`);
        assert.match(a.details, /larger than max/i);
      }
    }
  });

  test('a version above 2^53-1 is INVALID_ARGUMENT naming it, on Lookup, the router and control calls', async () => {
    const big = 2n ** 53n + 1n;
    const lookup = Buffer.concat([tableVersion('emb', big), Buffer.from([0x1a, KEYS.length]), KEYS]);
    for (const [addr, path, req] of [[replica, LOOKUP, lookup], [routerAddr, LOOKUP, lookup], [replica, PUBLISH, tableVersion('emb', big)],
      [replica, LOAD_BEGIN, tableVersion('emb', big)], [replica, LOAD_ROWS, tableVersion('emb', big)]] as [string, string, Buffer][]) {
      const a = await rawCall(addr, path, req);
      assert.equal(a.code, grpc.status.INVALID_ARGUMENT, `${path}: ${a.details}`);
      assert.match(a.details, /version 9007199254740993 is above 2\^53-1, the largest version embkv takes/, path);
    }
    // 2^53 itself, and a 64-bit one, on a field other than the version.
    const a = await rawCall(replica, LOAD_BEGIN, Buffer.concat([tableVersion('emb', 2n ** 53n), Buffer.from([0x38]), varint(2n ** 64n - 1n)]));
    assert.equal(a.code, grpc.status.INVALID_ARGUMENT);
    assert.match(a.details, /version 9007199254740992 is above 2\^53-1/);
    const rows = await rawCall(replica, LOAD_BEGIN, Buffer.concat([tableVersion('emb', 3n), Buffer.from([0x38]), varint(2n ** 64n - 1n)]));
    assert.equal(rows.code, grpc.status.INVALID_ARGUMENT);
    assert.match(rows.details, /expectedRows 18446744073709551615 is above 2\^53-1/);
  });

  test('a malformed message is INVALID_ARGUMENT with the decoder\'s reason, not INTERNAL', async () => {
    // A bytes field announcing 100 bytes of which 2 follow; an unfinished varint; a wire type 7.
    for (const bad of [Buffer.from([0x0a, 100, 0x61, 0x62]), Buffer.from([0x10, 0xff, 0xff]), Buffer.from([0x0f, 1])]) {
      for (const [addr, path] of [[replica, LOOKUP], [routerAddr, LOOKUP], [replica, PUBLISH], [replica, LOAD_ROWS], [replica, LOAD_BEGIN]] as [string, string][]) {
        const a = await rawCall(addr, path, bad);
        assert.equal(a.code, grpc.status.INVALID_ARGUMENT, `${path} ${bad.toString('hex')}: ${a.details}`);
        assert.match(a.details, /truncated|wire type|malformed|index out of range|invalid/i, a.details);
      }
    }
  });

  test('the SDK takes a bigint version up to 2^53-1 and refuses a larger one with KV_INVALID_ARGUMENT', async () => {
    const client = new EmbeddingClient({ config: cluster.configPath });
    try {
      // No table "none": the call reaches the replica and is answered, no TypeError on the way.
      assert.equal(await codeOf(client.getEmbeddings([1n], { table: 'none', version: 1n })), KvErrorCode.TABLE_NOT_FOUND);
      assert.equal(await codeOf(client.getEmbeddings([1n], { table: 'none', version: 2n ** 53n })), KvErrorCode.INVALID_ARGUMENT);
      assert.equal(await codeOf(client.getEmbeddings([1n], { table: 'none', version: 0n })), KvErrorCode.INVALID_ARGUMENT);
      assert.equal(await codeOf(client.getEmbeddings([1n], { table: 'none', deadlineMs: 5n as unknown as number })), KvErrorCode.INVALID_ARGUMENT);
    } finally {
      await client.close();
    }
    assert.equal(checkVersion(2n ** 53n - 1n), Number.MAX_SAFE_INTEGER);
  });
});

describe('echoed input is bounded', () => {
  test('echo cuts long values and names their length; bigints do not throw', () => {
    assert.equal(echo('abc'), '"abc"');
    assert.equal(echo(5n), '5n');
    assert.match(echo('y'.repeat(100_000)), /^"y{200}"\.\.\. \(100000 characters\)$/);
  });

  test('toGrpcError bounds details, whatever a handler put in its message', () => {
    const e = toGrpcError(invalidArgument(`no table ${'z'.repeat(1_000_000)}`));
    assert.ok(Buffer.byteLength(e.details) <= 1024);
    assert.match(e.details, /^no table z+ \.\.\. \(1000009 bytes, truncated\)$/);
    const multi = truncateBytes('é'.repeat(2000), 101);
    assert.ok(Buffer.byteLength(multi) <= 101 && !multi.includes('\uFFFD'));
  });
});
