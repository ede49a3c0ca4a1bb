import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { POOLED_MESSAGE_BYTES, UPFRONT_MESSAGE_BYTES, installPooledReceive, receivePoolStats } from '../src/transport/pooled-receive.js';
import { AnswerBufferPool } from '../src/transport/answer-pool.js';
import { allocLookupResponse, type LookupRequest } from '../src/wire/lookup.js';
import { embkvServerService } from '../src/wire/services.js';
import { EmbeddingClient } from '../src/index.js';
import { VersionData } from '../src/shard/version-data.js';
import { mulberry32 } from './helpers/util.js';

// grpc-js's decoder, the one its client and server calls construct: after install it runs the pooled
// state machine. Each test file runs in a process of its own, so nothing installed it before this file.
const { StreamDecoder } = createRequire(import.meta.url)('@grpc/grpc-js/build/src/stream-decoder.js') as {
  StreamDecoder: new (max: number) => { write(data: Buffer): Buffer[] };
};

/** A message as gRPC frames it: flag 0, big-endian length, the bytes. */
function framed(bytes: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head.writeUInt32BE(bytes.length, 1);
  return Buffer.concat([head, bytes]);
}

function message(size: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(size);
  const rnd = mulberry32(seed);
  for (let i = 0; i < size; i++) b[i] = rnd() & 255;
  return b;
}

test('a call part-way through a message at install finishes with grpc-js\'s own decoder; decoders made later are pooled', () => {
  const big = framed(message(POOLED_MESSAGE_BYTES + 100, 1));
  const before = new StreamDecoder(-1);
  assert.deepEqual(before.write(big.subarray(0, 1000)), []);
  assert.equal(installPooledReceive(), true, 'the installed grpc-js decodes messages as expected');
  const allocated = receivePoolStats().allocated;
  const out = [...before.write(big.subarray(1000, 5000)), ...before.write(big.subarray(5000)), ...before.write(big)];
  assert.equal(out.length, 2);
  assert.ok(out[0]!.equals(big) && out[1]!.equals(big), 'both messages whole');
  assert.equal(receivePoolStats().allocated, allocated, 'the decoder that was mid-message kept grpc-js\'s own buffers');

  const after = new StreamDecoder(-1);
  const got = after.write(big);
  assert.equal(got.length, 1);
  assert.ok(got[0]!.equals(big));
  assert.equal(got[0]!.byteOffset, 0);
  assert.equal(receivePoolStats().allocated, allocated + 1, 'a new decoder receives large messages into a pooled buffer');
});

test('pooled receive: messages split at any byte (inside the flag, the length or the body) come out whole and in order', () => {
  assert.equal(installPooledReceive(), true);
  const sizes = [0, 1, 4, 5, 100, 4096, 70_000, POOLED_MESSAGE_BYTES - 1, POOLED_MESSAGE_BYTES, POOLED_MESSAGE_BYTES + 7, 600_000, 0, 3];
  const messages = sizes.map((s, i) => message(s, 100 + i));
  const stream = Buffer.concat(messages.map(framed));
  for (let seed = 1; seed <= 12; seed++) {
    const rnd = mulberry32(seed);
    const d = new StreamDecoder(-1);
    const got: Buffer[] = [];
    // Chunks from 1 byte up to 96 KiB: every boundary kind comes up across the seeds.
    for (let at = 0; at < stream.length;) {
      const n = seed % 3 === 0 ? 1 + (rnd() % 9) : 1 + (rnd() % (96 * 1024));
      got.push(...d.write(stream.subarray(at, at + n)));
      at += n;
      if (seed % 3 === 0 && at > 20_000) {
        got.push(...d.write(stream.subarray(at)));
        break;
      }
    }
    assert.equal(got.length, messages.length, `seed ${seed}: every message once`);
    got.forEach((m, i) => assert.ok(m.equals(framed(messages[i]!)), `seed ${seed}: message ${i} (${sizes[i]} bytes) intact`));
  }
});

test('a message above 32 MiB is collected as it arrives: its header alone takes no memory for it, and it comes out whole', () => {
  assert.equal(installPooledReceive(), true);
  const size = UPFRONT_MESSAGE_BYTES + 3;
  const body = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i += 4096) body[i] = (i >>> 12) & 255;
  body[size - 1] = 77;
  const whole = framed(body);
  const allocated = receivePoolStats().allocated;
  const d = new StreamDecoder(-1);
  assert.deepEqual(d.write(whole.subarray(0, 5)), []);
  assert.equal(receivePoolStats().allocated, allocated, 'no buffer taken for the announced size');
  const got: Buffer[] = [];
  for (let at = 5; at < whole.length; at += 1 << 20) got.push(...d.write(whole.subarray(at, Math.min(whole.length, at + (1 << 20)))));
  // A small message right behind it still comes out on its own.
  got.push(...d.write(framed(Buffer.from([1, 2, 3]))));
  assert.equal(got.length, 2);
  assert.ok(got[0]!.equals(whole), 'the large message intact');
  assert.ok(got[1]!.equals(framed(Buffer.from([1, 2, 3]))));
  assert.equal(receivePoolStats().allocated, allocated);
});

test('pooled receive refuses a message above the receive limit as grpc-js does, before taking any memory for it', () => {
  assert.equal(installPooledReceive(), true);
  const d = new StreamDecoder(1000);
  const head = Buffer.from([0, 0, 0, 0x10, 0]); // 4096 bytes
  const allocated = receivePoolStats().allocated;
  assert.throws(() => d.write(head), /Received message larger than max \(4096 vs 1000\)/);
  assert.equal(receivePoolStats().allocated, allocated);
  // At the limit it is accepted.
  const ok = framed(message(1000, 7));
  assert.ok(new StreamDecoder(1000).write(ok)[0]!.equals(ok));
});

test('the SDK receives answers into pooled buffers and reuses them once placed: sequential and concurrent answers stay intact', async () => {
  const dim = 4;
  const n = 60_000;
  const held = new VersionData(dim);
  const rows = new Uint32Array(2 * n);
  const vecs = new Float32Array(dim * n);
  for (let i = 0; i < n; i++) {
    rows[2 * i] = i + 1;
    vecs.fill(i + 0.5, dim * i, dim * i + dim);
  }
  held.append(rows, vecs, n);
  held.seal();
  const pool = new AnswerBufferPool();
  const server = new grpc.Server();
  server.addService(embkvServerService(pool), {
    lookup: (call: grpc.ServerUnaryCall<LookupRequest, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      const keys = new Uint32Array(call.request.keys.buffer, call.request.keys.byteOffset, call.request.keys.byteLength / 4);
      const res = allocLookupResponse(1, dim, keys.length / 2, pool);
      held.lookup(keys, keys.length / 2, res.values, res.found);
      cb(null, res.buf);
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  const client = new EmbeddingClient({ config: { partitions: 4, groups: [{ replicas: [`127.0.0.1:${port}`] }] } });
  // Answers of 20-26k keys at dim 4 (340-440 KB): above the pooled size.
  const check = (keys: number[], r: { values: Float32Array; found: Uint8Array }, what: string): void => {
    for (let i = 0; i < keys.length; i++) {
      const present = keys[i]! <= n;
      if (r.found[i] !== (present ? 1 : 0) || r.values[dim * i] !== (present ? keys[i]! - 0.5 : 0)) {
        assert.fail(`${what}, key ${i} (${keys[i]}): found ${r.found[i]}, value ${r.values[dim * i]}`);
      }
    }
  };
  const batch = (b: number, size: number): number[] => Array.from({ length: size }, (_, i) => (i % 5 === 4 ? n + 1 + i : 1 + ((i * 31 + b * 977) % n)));
  try {
    const start = receivePoolStats();
    for (let round = 0; round < 4; round++) {
      const keys = batch(round, 25_000 + round * 200);
      check(keys, await client.getEmbeddings(keys, { table: 't' }), `round ${round}`);
    }
    const sequential = receivePoolStats();
    assert.equal(sequential.allocated - start.allocated, 1, 'one buffer served four answers one after another');
    assert.equal(sequential.reused - start.reused, 3);
    // In flight at once: each answer needs a buffer of its own until it is placed.
    for (let round = 0; round < 2; round++) {
      const batches = Array.from({ length: 6 }, (_, b) => batch(10 * round + b, 20_000 + b * 1000));
      const answers = await Promise.all(batches.map((keys) => client.getEmbeddings(keys, { table: 't' })));
      answers.forEach((r, b) => check(batches[b]!, r, `concurrent round ${round}, answer ${b}`));
    }
    const concurrent = receivePoolStats();
    assert.ok(concurrent.allocated - sequential.allocated <= 6, `at most one new buffer per answer in flight (${concurrent.allocated - sequential.allocated})`);
    assert.ok(concurrent.reused - sequential.reused >= 6, 'the second concurrent round reused the first one\'s buffers');
    assert.ok(concurrent.free >= 1 && concurrent.freeBytes <= 96 * 1024 * 1024);
  } finally {
    await client.close();
    server.forceShutdown();
  }
});

test('an SDK process that only looks up never loads proto-loader (its heap, walked by every mark-compact, stays smaller)', async () => {
  // A process of its own: this one has loaded the control service already.
  const sdk = new URL('../src/index.js', import.meta.url).href;
  const script = `
    import { createRequire } from 'node:module';
    const { EmbeddingClient } = await import(${JSON.stringify(sdk)});
    const client = new EmbeddingClient({ config: { partitions: 4, groups: [{ replicas: ['127.0.0.1:1'] }] }, deadlineMs: 300 });
    const code = await client.getEmbeddings([1n, 2n], { table: 't' }).then(() => 'answered', (e) => e.code);
    await client.close();
    const loaded = Object.keys(createRequire(import.meta.url).cache).filter((f) => f.includes('proto-loader') || f.includes('protobufjs'));
    console.log(JSON.stringify({ code, loaded }));
  `;
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script]);
  const r = JSON.parse(stdout) as { code: string; loaded: string[] };
  assert.ok(r.code === 'KV_UNAVAILABLE' || r.code === 'KV_DEADLINE_EXCEEDED', `the lookup failed as expected (${r.code})`);
  assert.deepEqual(r.loaded, []);
});
