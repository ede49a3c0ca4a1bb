import assert from 'node:assert/strict';
import { type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import * as http2 from 'node:http2';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { bytesOf } from '../src/common/keys.js';
import { encodeLookupRequest, type LookupResponse } from '../src/wire/lookup.js';
import { EmbkvClient } from '../src/wire/services.js';
import { fetchRouterStats } from '../src/router/stats-service.js';
import { startRouter, TestCluster } from './helpers/cluster.js';
import { until } from './helpers/util.js';
import { expected, makeModel, makeRequest, writeModelPart } from './helpers/model.js';

/** A Lookup through the router, as any gRPC client sends it: resolves with the answer or the status. */
function lookup(stub: grpc.Client, table: string, keys: BigUint64Array): Promise<LookupResponse | grpc.ServiceError> {
  return new Promise((resolve) =>
    (stub as unknown as { lookup: Function }).lookup(
      { table, version: 0, keys: new Uint8Array(keys.buffer, keys.byteOffset, keys.byteLength) },
      { deadline: new Date(Date.now() + 120_000) },
      (err: grpc.ServiceError | null, r: LookupResponse) => resolve(err ?? r),
    ));
}

const failed = (r: LookupResponse | grpc.ServiceError): r is grpc.ServiceError => r instanceof Error;

describe('the router bounds the work it holds', () => {
  let cluster: TestCluster;
  let router: ChildProcess;
  let stub: grpc.Client;
  let address: string;
  const narrow = makeModel(2000, 4, 31, 1);
  const wide = makeModel(100, 64, 32, 1);

  before(async () => {
    cluster = await TestCluster.start(1, 1, { partitions: 4 });
    for (const [table, m] of [['narrow', narrow], ['wide', wide]] as const) {
      const dir = join(cluster.dir, table);
      mkdirSync(dir);
      await writeModelPart(join(dir, 'part-0'), m, 0, m.keys.length);
      const r = await cluster.kvctl(['load', '--table', table, '--version', '1', '--full', dir, '--publish']);
      assert.equal(r.code, 0, r.stderr);
    }
    // 1 MiB in flight: one 20k-key call of the dim-4 table (~0.8 MB) at a time.
    const started = await startRouter(cluster.configPath, ['--max-inflight-mb', '1']);
    router = started.proc;
    address = `127.0.0.1:${started.port}`;
    stub = new EmbkvClient(address, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': -1, 'grpc.max_send_message_length': -1 });
  });

  after(async () => {
    stub?.close();
    if (router !== undefined && router.exitCode === null) {
      const gone = once(router, 'exit');
      router.kill('SIGTERM');
      await gone;
    }
    await cluster?.close();
  });

  test('a call beyond the bytes in flight is refused at once with RESOURCE_EXHAUSTED, and taken again once they are released', async () => {
    // The router learns the table's dim from a first answer, and prices its calls by it.
    assert.ok(!failed(await lookup(stub, 'narrow', makeRequest(narrow, 10))));
    cluster.signalReplica(0, 0, 'SIGSTOP');
    let held: Promise<LookupResponse | grpc.ServiceError>;
    const heldKeys = makeRequest(narrow, 20_000);
    try {
      held = lookup(stub, 'narrow', heldKeys);
      // The frozen replica keeps it in flight: wait until the router has sent it on.
      await until('the router to send the call on', async () => ((await fetchRouterStats(address, 5000)).groups[0]!.replicas[0]!.outstanding > 0 ? true : undefined));
      const refused = await lookup(stub, 'narrow', makeRequest(narrow, 20_000));
      assert.ok(failed(refused), 'the second call should be refused');
      assert.equal(refused.code, grpc.status.RESOURCE_EXHAUSTED);
      assert.match(refused.details, /the router holds \d+ bytes for calls in flight .* the limit is 1048576 \(maxInflightBytes\)/);
    } finally {
      cluster.signalReplica(0, 0, 'SIGCONT');
    }
    const first = await held;
    assert.ok(!failed(first), `the call in flight is answered: ${failed(first) ? first.details : ''}`);
    assert.deepEqual(Uint8Array.from(first.found), expected(narrow, heldKeys).found);
    const again = await lookup(stub, 'narrow', makeRequest(narrow, 20_000));
    assert.ok(!failed(again), 'released: the next call is taken');
  });

  test('no call may ask more than a replica answers: 2M keys at most, 256 MiB of answer at most', async () => {
    const tooMany = await lookup(stub, 'narrow', new BigUint64Array(2_000_001));
    assert.ok(failed(tooMany));
    assert.equal(tooMany.code, grpc.status.INVALID_ARGUMENT);
    assert.match(tooMany.details, /holds 2000001 keys; at most 2000000/);
    assert.ok(!failed(await lookup(stub, 'wide', makeRequest(wide, 10))));
    // 1.1M keys of dim 64 would be a 282 MB answer: refused before any replica is asked.
    const tooBig = await lookup(stub, 'wide', new BigUint64Array(1_100_000));
    assert.ok(failed(tooBig));
    assert.equal(tooBig.code, grpc.status.RESOURCE_EXHAUSTED);
    assert.match(tooBig.details, /an answer of 1100000 keys of dim 64 would exceed 268435456 bytes; split the request/);
  });
});

describe('a replica bounds the answers it holds', () => {
  let cluster: TestCluster;
  const model = makeModel(20_000, 32, 33, 1);

  before(async () => {
    // 1 MiB of answers not yet sent; one answer of 20k keys at dim 32 is 2.5 MB.
    cluster = await TestCluster.start(1, 1, { partitions: 4, serveArgs: ['--max-inflight-mb', '1'] });
    const dir = join(cluster.dir, 'm');
    mkdirSync(dir);
    await writeModelPart(join(dir, 'part-0'), model, 0, model.keys.length);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', dir, '--publish']);
    assert.equal(r.code, 0, r.stderr);
  });

  after(() => cluster?.close());

  test('a client that does not read holds its answer in flight; lookups beyond the bound are refused until it lets go', async () => {
    const address = cluster.manifest.groups[0]!.replicas[0]!;
    // A plain HTTP/2 client that sends one Lookup and never reads: the answer cannot leave past the
    // 64 KiB flow-control window, so its stream stays open.
    const session = http2.connect(`http://${address}`);
    try {
      const msg = encodeLookupRequest({ table: 'emb', version: 0, keys: bytesOf(model.keys) });
      const framed = Buffer.alloc(5 + msg.length);
      framed.writeUInt32BE(msg.length, 1);
      msg.copy(framed, 5);
      const stream = session.request({ ':method': 'POST', ':path': '/embkv.v1.Embkv/Lookup', 'content-type': 'application/grpc', te: 'trailers' });
      stream.pause();
      const answering = once(stream, 'response');
      stream.end(framed);
      await answering;

      const stub = new EmbkvClient(address, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': -1 });
      try {
        const refused = await lookup(stub, 'emb', makeRequest(model, 1000));
        assert.ok(failed(refused), 'refused while the unread answer is held');
        assert.equal(refused.code, grpc.status.RESOURCE_EXHAUSTED);
        assert.match(refused.details, /this replica holds \d+ bytes of answers not yet sent; the limit is 1048576 \(maxInflightBytes\)/);
        // The reader goes away: its stream closes, and the replica answers again.
        session.destroy();
        await until('the replica to answer again', async () => {
          const r = await lookup(stub, 'emb', makeRequest(model, 1000));
          if (!failed(r)) return true;
          assert.equal(r.code, grpc.status.RESOURCE_EXHAUSTED, r.details);
          return undefined;
        });
      } finally {
        stub.close();
      }
    } finally {
      session.destroy();
    }
  });
});
