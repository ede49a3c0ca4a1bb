import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { EmbeddingClient, KvError } from '../src/index.js';
import { KvErrorCode, fromGrpcError } from '../src/common/errors.js';
import { parseManifest, type Manifest } from '../src/cluster/manifest.js';
import {
  TokenAuth, authMetadata, checkProtectedMode, isLoopbackHost, loadTokens, parseTokens, requiredRole, tokensEqual,
} from '../src/cluster/security.js';
import { call, type ReplicaStatus } from '../src/loader/cluster-ops.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { RouterServer } from '../src/router/server.js';
import { type LookupRequest, type LookupResponse } from '../src/wire/lookup.js';
import { EMBKV_CLIENT_SERVICE, EmbkvClient } from '../src/wire/services.js';
import { rootLogger } from '../src/common/log.js';
import { KVCTL, TestCluster, freePorts } from './helpers/cluster.js';
import { expected, makeModel, makeRequest, sameBits, writeModelPart, type Model } from './helpers/model.js';
import { codeOf, until } from './helpers/util.js';

const DIM = 8;
const TOKENS = {
  read: 'read-0123456789abcdef0123456789abcdef',
  write: 'write-0123456789abcdef0123456789abcdef',
  admin: 'admin-0123456789abcdef0123456789abcdef',
};

/** A throwaway CA and a certificate for 127.0.0.1 / localhost signed by it (server and client use). */
function makeCerts(dir: string): void {
  const ossl = (...args: string[]): void => {
    execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  };
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  ossl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '1', '-subj', '/CN=embkv test CA');
  ossl('req', ...ec, '-keyout', 'node.key', '-out', 'node.csr', '-subj', '/CN=127.0.0.1');
  writeFileSync(join(dir, 'node.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n');
  ossl('x509', '-req', '-in', 'node.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'node.pem', '-days', '1', '-extfile', 'node.ext');
}

const SECURITY = { tls: { cert: 'node.pem', key: 'node.key', ca: 'ca.pem' }, tokens: 'tokens.json' };

function writeTokens(dir: string): void {
  writeFileSync(join(dir, 'tokens.json'), JSON.stringify(Object.entries(TOKENS).map(([role, token]) => ({ token, role }))));
}

/** One raw Lookup on a replica or router: what a plain gRPC client generated from the proto would do. */
function rawLookup(address: string, creds: grpc.ChannelCredentials, md: grpc.Metadata, req: LookupRequest): Promise<LookupResponse> {
  const client = new EmbkvClient(address, creds);
  const m = EMBKV_CLIENT_SERVICE.lookup;
  return new Promise<LookupResponse>((resolve, reject) => {
    client.makeUnaryRequest<LookupRequest, LookupResponse>(m.path, m.requestSerialize, m.responseDeserialize, req, md, { deadline: Date.now() + 5000 },
      (err, res) => (err ? reject(fromGrpcError(err, address)) : resolve(res!)));
  }).finally(() => client.close());
}

/** The current version of `table` on every replica, as Status reports it (asked with the admin token). */
async function currentVersions(manifest: Manifest, table: string): Promise<number[]> {
  const conns = new ClusterConnections(manifest, { token: TOKENS.admin });
  try {
    return await Promise.all(conns.all().map(async (c) => (await call<ReplicaStatus>(c, 'Status', {})).tables.find((t) => t.name === table)?.currentVersion ?? 0));
  } finally {
    conns.close();
  }
}

/** Calls a control method on every replica with `token`; the KvError code of the first refusal, or 'resolved'. */
async function controlAs(manifest: Manifest, token: string | undefined, method: string, request: object): Promise<string> {
  const conns = new ClusterConnections(manifest, { token });
  try {
    return await codeOf(Promise.all(conns.all().map((c) => call(c, method, request, 5000))));
  } finally {
    conns.close();
  }
}

const LOAD_BEGIN = { table: 'emb', version: 9, dim: 1, loadId: 'intruder', force: true, incremental: false, expectedRows: 1, startedAtMs: 0 };

describe('a 1 x 2 cluster with TLS and tokens', () => {
  let cluster: TestCluster;
  let v1: Model;
  let dumps: string;

  before(async () => {
    cluster = await TestCluster.start(1, 2, {
      partitions: 4,
      security: SECURITY,
      prepare: (dir) => {
        makeCerts(dir);
        writeTokens(dir);
      },
    });
    dumps = join(cluster.dir, 'dumps');
    mkdirSync(dumps);
    v1 = makeModel(2000, DIM, 1, 1);
    await writeModelPart(join(dumps, 'v1'), v1, 0, v1.keys.length);
    // An admin token in EMBKV_TOKEN loads and publishes.
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', join(dumps, 'v1'), '--publish'], undefined, { EMBKV_TOKEN: TOKENS.admin });
    assert.equal(r.code, 0, r.stderr);
  });

  after(async () => {
    await cluster?.close();
  });

  test('a plain-text client and a client without a token are refused, and the current version stays', async () => {
    const [addr] = cluster.manifest.groups[0]!.replicas;
    const req = { table: 'emb', version: 0, keys: Buffer.alloc(8) };
    // Plain text to a TLS port: no gRPC conversation at all.
    const plain = await codeOf(rawLookup(addr!, grpc.credentials.createInsecure(), authMetadata(TOKENS.admin), req));
    assert.equal(plain, KvErrorCode.UNAVAILABLE);
    // TLS without a token: UNAUTHENTICATED, for lookups and for every control method.
    assert.equal(await codeOf(rawLookup(addr!, grpc.credentials.createSsl(readFileSync(join(cluster.dir, 'ca.pem'))), new grpc.Metadata(), req)), KvErrorCode.UNAUTHENTICATED);
    for (const [method, body] of [['LoadBegin', LOAD_BEGIN], ['Publish', { table: 'emb', version: 9, rollback: false }], ['Status', {}], ['PutsSince', { afterSeq: 0, maxBatches: 1 }]] as const) {
      assert.equal(await controlAs(cluster.manifest, undefined, method, body), KvErrorCode.UNAUTHENTICATED, method);
    }
    const client = new EmbeddingClient({ config: cluster.configPath });
    try {
      assert.equal(await codeOf(client.getEmbeddings([1n], { table: 'emb' })), KvErrorCode.UNAUTHENTICATED);
    } finally {
      await client.close();
    }
    const r = await cluster.kvctl(['status']);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr + r.stdout, /KV_UNAUTHENTICATED/);
    assert.deepEqual(await currentVersions(cluster.manifest, 'emb'), [1, 1]);
  });

  test('a wrong token is refused with KV_UNAUTHENTICATED', async () => {
    assert.equal(await controlAs(cluster.manifest, TOKENS.admin + 'x', 'Status', {}), KvErrorCode.UNAUTHENTICATED);
    assert.equal(await controlAs(cluster.manifest, TOKENS.admin.slice(0, -1), 'LoadBegin', LOAD_BEGIN), KvErrorCode.UNAUTHENTICATED);
    const r = await cluster.kvctl(['publish', '--table', 'emb', '--version', '1'], undefined, { EMBKV_TOKEN: 'not-a-known-token-at-all' });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^kvctl: error: .*KV_UNAUTHENTICATED: unknown token\n$/);
  });

  test('a read token looks up and asks Status, but may not load, publish or put', async () => {
    const client = new EmbeddingClient({ config: cluster.configPath, token: TOKENS.read });
    try {
      const req = makeRequest(v1, 500);
      const r = await client.getEmbeddings(req, { table: 'emb' });
      assert.ok(sameBits(r.values, expected(v1, req).values));
      assert.equal(await codeOf(client.putEmbeddings([1n], new Float32Array(DIM), { table: 'emb' })), KvErrorCode.PERMISSION_DENIED);
    } finally {
      await client.close();
    }
    const st = await cluster.kvctl(['status', '--json'], undefined, { EMBKV_TOKEN: TOKENS.read });
    assert.equal(st.code, 0, st.stderr);
    assert.equal(JSON.parse(st.stdout).length, 2);
    assert.equal(await controlAs(cluster.manifest, TOKENS.read, 'LoadBegin', LOAD_BEGIN), KvErrorCode.PERMISSION_DENIED);
    assert.equal(await controlAs(cluster.manifest, TOKENS.read, 'Publish', { table: 'emb', version: 1, rollback: false }), KvErrorCode.PERMISSION_DENIED);
    assert.equal(await controlAs(cluster.manifest, TOKENS.read, 'PutsSince', { afterSeq: 0, maxBatches: 1 }), KvErrorCode.PERMISSION_DENIED);
    const load = await cluster.kvctl(['load', '--table', 'emb', '--version', '5', '--full', join(dumps, 'v1'), '--publish'], undefined, { EMBKV_TOKEN: TOKENS.read });
    assert.equal(load.code, 1);
    assert.match(load.stderr, /^kvctl: error: .*KV_PERMISSION_DENIED: role read may not call LoadBegin\n$/);
    assert.deepEqual(await currentVersions(cluster.manifest, 'emb'), [1, 1]);
  });

  test('a write token puts but may not load; an admin token loads and publishes with --token-file', async () => {
    const client = new EmbeddingClient({ config: cluster.configPath, token: TOKENS.write });
    try {
      await client.putEmbeddings([v1.keys[0]!], new Float32Array(DIM).fill(7), { table: 'emb' });
      // Logged by at least one replica when it resolves; every replica serves it within a second.
      const r = await until('the put to be served', async () => {
        const got = await client.getEmbeddings([v1.keys[0]!], { table: 'emb' });
        return got.values[0] === 7 ? got : undefined;
      });
      assert.deepEqual(Array.from(r.values), new Array(DIM).fill(7));
    } finally {
      await client.close();
    }
    assert.equal(await controlAs(cluster.manifest, TOKENS.write, 'LoadBegin', LOAD_BEGIN), KvErrorCode.PERMISSION_DENIED);
    const v2 = makeModel(1000, DIM, 2, 2);
    await writeModelPart(join(dumps, 'v2'), v2, 0, v2.keys.length);
    const tokenFile = join(cluster.dir, 'admin.token');
    writeFileSync(tokenFile, TOKENS.admin + '\n');
    const denied = await cluster.kvctl(['load', '--table', 'emb', '--version', '2', '--full', join(dumps, 'v2')], undefined, { EMBKV_TOKEN: TOKENS.write });
    assert.equal(denied.code, 1);
    assert.match(denied.stderr, /KV_PERMISSION_DENIED: role write may not call LoadBegin/);
    // --token-file wins over EMBKV_TOKEN.
    const load = await cluster.kvctl(['load', '--table', 'emb', '--version', '2', '--full', join(dumps, 'v2'), '--no-publish', '--token-file', tokenFile], undefined, { EMBKV_TOKEN: TOKENS.write });
    assert.equal(load.code, 0, load.stderr);
    const pub = await cluster.kvctl(['publish', '--table', 'emb', '--version', '2', '--token-file', tokenFile]);
    assert.equal(pub.code, 0, pub.stderr);
    assert.deepEqual(await currentVersions(cluster.manifest, 'emb'), [2, 2]);
    const back = await cluster.kvctl(['rollback', '--table', 'emb', '--version', '1'], undefined, { EMBKV_TOKEN: TOKENS.admin });
    assert.equal(back.code, 0, back.stderr);
    assert.deepEqual(await currentVersions(cluster.manifest, 'emb'), [1, 1]);
  });

  test('peer sync works under TLS and tokens: a put reaches a replica that was down, after its restart', async () => {
    await cluster.stopReplica(0, 1, 'SIGKILL');
    const key = v1.keys[10]!;
    const vec = new Float32Array(DIM).fill(42.5);
    const client = new EmbeddingClient({ config: cluster.configPath, token: TOKENS.write });
    try {
      await client.putEmbeddings([key], vec, { table: 'emb' });
    } finally {
      await client.close();
    }
    cluster.startReplica(0, 1);
    const caughtUp = cluster.waitForLog(0, 1, /caught up on real-time puts/);
    await cluster.waitReady();
    await caughtUp;
    // Ask replica 1 alone.
    const only1 = { ...cluster.manifest, groups: [{ replicas: [cluster.manifest.groups[0]!.replicas[1]!] }] };
    const c1 = new EmbeddingClient({ config: only1, token: TOKENS.read, hedging: false });
    try {
      const r = await c1.getEmbeddings([key], { table: 'emb' });
      assert.ok(sameBits(r.values, vec));
    } finally {
      await c1.close();
    }
  });

  test('the SDK with { token } over TLS looks up bit-exact', async () => {
    const client = new EmbeddingClient({ config: cluster.configPath, token: TOKENS.read });
    try {
      const req = makeRequest(v1, 3000).filter((k) => k !== v1.keys[0] && k !== v1.keys[10]);
      const r = await client.getEmbeddings(req, { table: 'emb' });
      const want = expected(v1, req);
      assert.deepEqual(r.found, want.found);
      assert.ok(sameBits(r.values, want.values), 'vectors differ');
    } finally {
      await client.close();
    }
  });

  test('the router checks its callers\' tokens over TLS and forwards them', async () => {
    const router = new RouterServer({ manifest: cluster.manifest, host: '127.0.0.1', port: 0, logger: rootLogger('embkv', 'silent') });
    await router.start();
    try {
      const addr = `127.0.0.1:${router.port}`;
      const tls = grpc.credentials.createSsl(readFileSync(join(cluster.dir, 'ca.pem')));
      const key = v1.keys[5]!;
      const req = { table: 'emb', version: 0, keys: Buffer.from(new BigUint64Array([key]).buffer) };
      assert.equal(await codeOf(rawLookup(addr, tls, new grpc.Metadata(), req)), KvErrorCode.UNAUTHENTICATED);
      const r = await rawLookup(addr, tls, authMetadata(TOKENS.read), req);
      assert.ok(sameBits(r.values.subarray(0, DIM), v1.values.subarray(5 * DIM, 6 * DIM)));
    } finally {
      await router.close();
    }
  });

  test('SIGHUP re-reads the tokens file: a removed token is refused, an added one let in', async () => {
    const added = 'rotated-0123456789abcdef0123456789abcdef';
    writeFileSync(join(cluster.dir, 'tokens.json'), JSON.stringify([
      { token: TOKENS.admin, role: 'admin' }, { token: TOKENS.write, role: 'write' }, { token: added, role: 'read' },
    ]));
    const reloaded = [0, 1].map((r) => cluster.waitForLog(0, r, /tokens reloaded/));
    for (const r of [0, 1]) cluster.signalReplica(0, r, 'SIGHUP');
    await Promise.all(reloaded);
    assert.equal(await controlAs(cluster.manifest, TOKENS.read, 'Status', {}), KvErrorCode.UNAUTHENTICATED);
    assert.equal(await controlAs(cluster.manifest, added, 'Status', {}), 'resolved');
    // An invalid file is refused and the tokens in force stay.
    writeFileSync(join(cluster.dir, 'tokens.json'), '[{"token":"short","role":"read"}]');
    const refused = cluster.waitForLog(0, 0, /tokens file refused/);
    cluster.signalReplica(0, 0, 'SIGHUP');
    await refused;
    assert.equal(await controlAs(cluster.manifest, added, 'Status', {}), 'resolved');
    writeTokens(cluster.dir);
    const back = [0, 1].map((r) => cluster.waitForLog(0, r, /tokens reloaded/));
    for (const r of [0, 1]) cluster.signalReplica(0, r, 'SIGHUP');
    await Promise.all(back);
  });
});

describe('tokens without TLS', () => {
  let cluster: TestCluster;

  before(async () => {
    cluster = await TestCluster.start(1, 1, { partitions: 1, security: { tokens: 'tokens.json' }, prepare: writeTokens });
  });

  after(async () => {
    await cluster?.close();
  });

  test('a plain-text gRPC client without a token is refused with UNAUTHENTICATED, with a token let in', async () => {
    const [addr] = cluster.manifest.groups[0]!.replicas;
    const req = { table: 'emb', version: 0, keys: Buffer.alloc(8) };
    assert.equal(await codeOf(rawLookup(addr!, grpc.credentials.createInsecure(), new grpc.Metadata(), req)), KvErrorCode.UNAUTHENTICATED);
    assert.equal(await controlAs(cluster.manifest, undefined, 'LoadBegin', LOAD_BEGIN), KvErrorCode.UNAUTHENTICATED);
    // Let in, then refused for what it asks: no such table.
    assert.equal(await codeOf(rawLookup(addr!, grpc.credentials.createInsecure(), authMetadata(TOKENS.read), req)), KvErrorCode.TABLE_NOT_FOUND);
  });
});

describe('mutual TLS (requireClientCert)', () => {
  let cluster: TestCluster;

  before(async () => {
    cluster = await TestCluster.start(1, 2, {
      partitions: 2,
      security: { ...SECURITY, tls: { ...SECURITY.tls, requireClientCert: true } },
      prepare: (dir) => {
        makeCerts(dir);
        writeTokens(dir);
      },
    });
  });

  after(async () => {
    await cluster?.close();
  });

  test('a TLS client without a certificate is refused; one with the cluster\'s certificate is let in, and kvctl presents it', async () => {
    const [addr] = cluster.manifest.groups[0]!.replicas;
    const req = { table: 'emb', version: 0, keys: Buffer.alloc(8) };
    const ca = readFileSync(join(cluster.dir, 'ca.pem'));
    // The server asks for a client certificate; a client with none fails the handshake.
    assert.equal(await codeOf(rawLookup(addr!, grpc.credentials.createSsl(ca), authMetadata(TOKENS.admin), req)), KvErrorCode.UNAVAILABLE);
    const withCert = grpc.credentials.createSsl(ca, readFileSync(join(cluster.dir, 'node.key')), readFileSync(join(cluster.dir, 'node.pem')));
    assert.equal(await codeOf(rawLookup(addr!, withCert, authMetadata(TOKENS.read), req)), KvErrorCode.TABLE_NOT_FOUND);
    // kvctl presents the manifest's certificate: a load and a lookup go through, on both replicas.
    const dumps = join(cluster.dir, 'dumps');
    mkdirSync(dumps);
    const m = makeModel(500, DIM, 7, 1);
    await writeModelPart(join(dumps, 'v1'), m, 0, m.keys.length);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', join(dumps, 'v1'), '--publish'], undefined, { EMBKV_TOKEN: TOKENS.admin });
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(await currentVersions(cluster.manifest, 'emb'), [1, 1]);
  });
});

describe('protected mode', () => {
  let dir: string;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'embkv-protected-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** Runs kvctl serve on 0.0.0.0:PORT; resolves with its exit code and stderr, stopping it once it serves. */
  function serveAll(extra: string[]): Promise<{ code: number | null; stderr: string; served: boolean }> {
    return freePorts(1).then(([port]) => new Promise((resolve, reject) => {
      const config = join(dir, `c${port}.json`);
      writeFileSync(config, JSON.stringify({ partitions: 1, groups: [{ replicas: [`0.0.0.0:${port}`] }] }));
      const p = spawn(process.execPath, [KVCTL, 'serve', '--config', config, '--group', '0', '--replica', '0', '--data', join(dir, `d${port}`), ...extra], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      let served = false;
      const timer = setTimeout(() => { p.kill('SIGKILL'); reject(new Error(`kvctl serve hung: ${stderr}`)); }, 60_000);
      p.stderr.on('data', (d) => {
        stderr += d;
        if (!served && /"msg":"serving"/.test(stderr)) {
          served = true;
          p.kill('SIGTERM');
        }
      });
      p.on('exit', (code) => {
        clearTimeout(timer);
        resolve({ code, stderr, served });
      });
    }));
  }

  test('kvctl serve refuses a non-loopback address without security, and says why', async () => {
    const r = await serveAll([]);
    assert.equal(r.code, 1);
    assert.equal(r.served, false);
    assert.match(r.stderr, /^kvctl: error: replica 0\/0 would listen on 0\.0\.0\.0:\d+, which is not loopback, with no security .*--insecure\n$/);
  });

  test('kvctl serve --insecure listens on a non-loopback address', async () => {
    const r = await serveAll(['--insecure']);
    assert.equal(r.served, true, r.stderr);
    assert.equal(r.code, 0);
  });

  test('loopback addresses and configured security pass the check', () => {
    for (const h of ['127.0.0.1', '127.1.2.3', 'localhost', '::1', '[::1]', 'LOCALHOST']) assert.ok(isLoopbackHost(h), h);
    for (const h of ['0.0.0.0', '10.0.0.1', '::', '128.0.0.1', 'example.com', '127.0.0.1.example.com']) assert.ok(!isLoopbackHost(h), h);
    assert.throws(() => checkProtectedMode(undefined, '0.0.0.0:1', false, 'x'), (e: unknown) => e instanceof KvError && e.code === KvErrorCode.INVALID_CONFIG);
    checkProtectedMode(undefined, '[::1]:1', false, 'x');
    checkProtectedMode({ tokens: '/t.json' }, '0.0.0.0:1', false, 'x');
    checkProtectedMode({ tls: { cert: '/c', key: '/k' } }, '10.0.0.1:1', false, 'x');
    checkProtectedMode(undefined, '0.0.0.0:1', true, 'x');
  });
});

describe('tokens and security configuration', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'embkv-tokens-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const configError = (fn: () => unknown, pattern: RegExp): void => {
    assert.throws(fn, (e: unknown) => e instanceof KvError && e.code === KvErrorCode.INVALID_CONFIG && pattern.test(e.message));
  };

  test('token compare: equal only for the same string, digests of fixed length whatever the input', () => {
    assert.equal(tokensEqual('abc', 'abc'), true);
    assert.equal(tokensEqual('abc', 'abd'), false);
    assert.equal(tokensEqual('abc', 'abcd'), false);
    assert.equal(tokensEqual('', ''), true);
    // Different lengths never throw (timingSafeEqual on the raw strings would).
    assert.equal(tokensEqual('a', 'a'.repeat(10_000)), false);
  });

  test('TokenAuth: role per method, unknown and missing tokens refused', () => {
    const path = join(dir, 'auth.json');
    writeFileSync(path, JSON.stringify([{ token: TOKENS.read, role: 'read' }, { token: TOKENS.admin, role: 'admin' }]));
    const auth = new TokenAuth(path);
    const md = (v?: string): grpc.Metadata => {
      const m = new grpc.Metadata();
      if (v !== undefined) m.set('authorization', v);
      return m;
    };
    assert.equal(auth.check(md(`Bearer ${TOKENS.read}`), 'Lookup'), 'read');
    assert.equal(auth.check(md(`Bearer ${TOKENS.admin}`), 'LoadBegin'), 'admin');
    const code = (fn: () => unknown): string => {
      try {
        fn();
        return 'ok';
      } catch (e) {
        return (e as KvError).code;
      }
    };
    assert.equal(code(() => auth.check(md(`Bearer ${TOKENS.read}`), 'Put')), KvErrorCode.PERMISSION_DENIED);
    assert.equal(code(() => auth.check(md(), 'Lookup')), KvErrorCode.UNAUTHENTICATED);
    assert.equal(code(() => auth.check(md(TOKENS.read), 'Lookup')), KvErrorCode.UNAUTHENTICATED);
    assert.equal(code(() => auth.check(md('Bearer '), 'Lookup')), KvErrorCode.UNAUTHENTICATED);
    assert.equal(code(() => auth.check(md(`Bearer ${TOKENS.write}`), 'Lookup')), KvErrorCode.UNAUTHENTICATED);
    assert.deepEqual(auth.adminTokens(), [TOKENS.admin]);
    assert.equal(requiredRole('Status'), 'read');
    assert.equal(requiredRole('Put'), 'write');
    for (const m of ['LoadBegin', 'LoadRows', 'LoadStage', 'LoadRowsFrom', 'LoadSeal', 'LoadAbort', 'Publish', 'PutsSince', 'Drop']) assert.equal(requiredRole(m), 'admin', m);
  });

  test('a tokens file is refused with the file and the entry named', () => {
    const p = '/etc/embkv/tokens.json';
    configError(() => parseTokens({}, p), /tokens file \/etc\/embkv\/tokens\.json: must be a JSON array/);
    configError(() => parseTokens([], p), /holds no tokens/);
    configError(() => parseTokens([{ token: 'short', role: 'read' }], p), /entry 0: "token" must be 16-512/);
    configError(() => parseTokens([{ token: 'x'.repeat(513), role: 'read' }], p), /entry 0: "token"/);
    configError(() => parseTokens([{ token: 'has a space in it ok', role: 'read' }], p), /entry 0: "token"/);
    configError(() => parseTokens([{ token: TOKENS.read, role: 'root' }], p), /entry 0: "role" must be "read", "write" or "admin", got "root"/);
    configError(() => parseTokens([{ token: TOKENS.read, role: 'read' }, { token: TOKENS.read, role: 'admin' }], p), /entry 1: the token of an earlier entry appears again/);
    configError(() => parseTokens([{ token: TOKENS.read, role: 'read', name: 'x' }], p), /entry 0: unknown field "name"/);
    configError(() => parseTokens(['x'], p), /entry 0 must be an object/);
    const bad = join(dir, 'bad.json');
    writeFileSync(bad, '[{"token": ');
    configError(() => loadTokens(bad), new RegExp(`tokens file ${bad}: is not valid JSON`));
    configError(() => loadTokens(join(dir, 'missing.json')), /missing\.json: cannot be read/);
  });

  test('the manifest\'s security block: paths relative to the manifest, unknown fields refused', () => {
    const base = { partitions: 1, groups: [{ replicas: ['h:1'] }] };
    const m = parseManifest({ ...base, security: { tls: { cert: 'c.pem', key: '/abs/k.pem', ca: 'ca.pem', requireClientCert: true }, tokens: 'sub/t.json' } }, 'm', '/etc/embkv');
    assert.deepEqual(m.security, { tls: { cert: '/etc/embkv/c.pem', key: '/abs/k.pem', ca: '/etc/embkv/ca.pem', requireClientCert: true }, tokens: '/etc/embkv/sub/t.json' });
    // A parsed manifest parses again to itself (the SDK takes manifest objects).
    assert.deepEqual(parseManifest(m), m);
    assert.deepEqual(parseManifest({ ...base, security: {} }).security, {});
    configError(() => parseManifest({ ...base, security: { tls: {}, token: 'x' } }), /security: unknown field "token" \(known: tls, tokens\)/);
    configError(() => parseManifest({ ...base, security: { tls: { cert: 'a', key: 'b', crt: 'c' } } }), /security\.tls: unknown field "crt"/);
    configError(() => parseManifest({ ...base, security: { tls: { cert: 'a' } } }), /give both cert and key/);
    configError(() => parseManifest({ ...base, security: { tls: { cert: 'a', key: 'b', requireClientCert: true } } }), /requireClientCert needs ca/);
    configError(() => parseManifest({ ...base, security: { tls: { cert: 'a', key: 'b', ca: 'c', requireClientCert: 'yes' } } }), /requireClientCert must be true or false/);
    configError(() => parseManifest({ ...base, security: { tokens: '' } }), /security\.tokens must be a non-empty file path/);
    configError(() => parseManifest({ ...base, security: [] }), /"security" must be an object/);
  });

  test('kvctl serve with an invalid tokens file exits non-zero naming the file', async () => {
    const [port] = await freePorts(1);
    writeFileSync(join(dir, 'tokens.json'), JSON.stringify([{ token: TOKENS.read, role: 'superuser' }]));
    const config = join(dir, 'cluster.json');
    writeFileSync(config, JSON.stringify({ partitions: 1, groups: [{ replicas: [`127.0.0.1:${port}`] }], security: { tokens: 'tokens.json' } }));
    const { kvctl } = await import('./helpers/cluster.js');
    const r = await kvctl(['serve', '--config', config, '--group', '0', '--replica', '0', '--data', join(dir, 'data')]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, `kvctl: error: tokens file ${join(dir, 'tokens.json')}: entry 0: "role" must be "read", "write" or "admin", got "superuser"\n`);
  });

  test('the SDK refuses a malformed token option', () => {
    assert.throws(() => new EmbeddingClient({ config: { partitions: 1, groups: [{ replicas: ['127.0.0.1:1'] }] }, token: '' }), (e: unknown) => e instanceof KvError && e.code === KvErrorCode.INVALID_ARGUMENT);
    assert.throws(() => new EmbeddingClient({ config: { partitions: 1, groups: [{ replicas: ['127.0.0.1:1'] }] }, token: 'a b' }), (e: unknown) => e instanceof KvError && e.code === KvErrorCode.INVALID_ARGUMENT);
  });
});
