import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import { AnswerBufferPool } from '../src/transport/answer-pool.js';
import { answersFramedInPlace, installZeroCopyFraming, installZeroCopyRequests, requestsFramedInPlace } from '../src/transport/grpc-patches.js';
import { LoadRowsMessage, decodeLoadRowsRequest, encodeLoadRowsRequest, type LoadRowsRequest } from '../src/wire/load-rows.js';
import { allocLookupResponse, decodeLookupRequest, decodeLookupResponse, encodeLookupRequest, type LookupRequest } from '../src/wire/lookup.js';
import { PROTO_PATH, EMBKV_SERVER_SERVICE, embkvServerService, shardControlClientConstructor, shardControlService } from '../src/wire/services.js';
import { EmbeddingClient } from '../src/index.js';
import { KvError } from '../src/common/errors.js';
import { VersionData } from '../src/shard/version-data.js';
import { mulberry32 } from './helpers/util.js';

// protobufjs, loading the published .proto, stands in for "any gRPC client generated from it".
const root = protobuf.loadSync(PROTO_PATH);
const PbRequest = root.lookupType('embkv.v1.LookupRequest');
const PbResponse = root.lookupType('embkv.v1.LookupResponse');
const TO_OBJECT: protobuf.IConversionOptions = { longs: String, defaults: true };

interface PbRequestObj { table: string; version: string; keys: Uint8Array }
interface PbResponseObj { version: string; dim: number; found: Uint8Array; pad: Uint8Array; values: Uint8Array }

const pbDecodeRequest = (b: Uint8Array): PbRequestObj =>
  PbRequest.toObject(PbRequest.decode(b), TO_OBJECT) as PbRequestObj;
const pbDecodeResponse = (b: Uint8Array): PbResponseObj =>
  PbResponse.toObject(PbResponse.decode(b), TO_OBJECT) as PbResponseObj;
const pbEncodeRequest = (o: { table?: string; version?: number | string; keys?: Uint8Array }): Uint8Array =>
  PbRequest.encode(PbRequest.fromObject(o)).finish();
const pbEncodeResponse = (o: {
  version?: number | string;
  dim?: number;
  found?: Uint8Array;
  pad?: Uint8Array;
  values?: Uint8Array;
}): Uint8Array => PbResponse.encode(PbResponse.fromObject(o)).finish();

const bytesOf = (a: ArrayBufferView): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);


function randomKeys(n: number, seed: number): Uint8Array {
  const rnd = mulberry32(seed);
  const w = new Uint32Array(2 * n);
  for (let i = 0; i < w.length; i++) w[i] = rnd();
  return new Uint8Array(w.buffer);
}

/** Floats including awkward bit patterns: -0, subnormals, extremes, a NaN payload. */
function randomFloats(n: number, seed: number): Float32Array {
  const rnd = mulberry32(seed);
  const bits = new Uint32Array(n);
  const special = [0x80000000, 0x00000001, 0x7f7fffff, 0xff7fffff, 0x7fc00123, 0x3f800000];
  for (let i = 0; i < n; i++) bits[i] = i < special.length ? special[i]! : rnd() & 0xbfffffff; // no NaN/Inf beyond the listed
  return new Float32Array(bits.buffer);
}

function assertKvInvalid(fn: () => unknown, what: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof KvError, `${what}: expected a KvError, got ${String(err)}`);
    assert.equal(err.code, 'KV_INVALID_ARGUMENT', what);
    return true;
  });
}

/** Byte offsets where each top-level field starts, plus the end; found with protobufjs's own reader. */
function fieldBoundaries(msg: Uint8Array): Set<number> {
  const r = protobuf.Reader.create(msg);
  const out = new Set<number>([0]);
  while (r.pos < r.len) {
    const tag = r.uint32();
    r.skipType(tag & 7);
    out.add(r.pos);
  }
  return out;
}

/** The field numbers of a message, in order. */
function fieldNumbers(msg: Uint8Array): number[] {
  const r = protobuf.Reader.create(msg);
  const out: number[] = [];
  while (r.pos < r.len) {
    const tag = r.uint32();
    out.push(tag >>> 3);
    r.skipType(tag & 7);
  }
  return out;
}

/** The message offset of the payload of field `field` (wire type 2), via protobufjs's reader. */
function payloadOffset(msg: Uint8Array, field: number): number {
  const r = protobuf.Reader.create(msg);
  while (r.pos < r.len) {
    const tag = r.uint32();
    if (tag >>> 3 === field && (tag & 7) === 2) {
      r.uint32();
      return r.pos;
    }
    r.skipType(tag & 7);
  }
  return -1;
}

// ---- LookupRequest -------------------------------------------------------------------------------

test('encodeLookupRequest is decoded by protobufjs to the same table, version and keys', () => {
  const cases = [
    { table: 'user_emb', version: 0, keys: randomKeys(1000, 1) },
    { table: 'user_emb', version: 1, keys: randomKeys(1, 2) },
    { table: 'täble_名前_😀', version: 127, keys: randomKeys(3, 3) },
    { table: 't', version: 128, keys: new Uint8Array(0) },
    { table: '', version: 2 ** 40 + 7, keys: randomKeys(17, 4) },
    { table: 'x'.repeat(300), version: Number.MAX_SAFE_INTEGER, keys: randomKeys(20_000, 5) },
  ];
  for (const c of cases) {
    const enc = encodeLookupRequest(c);
    const got = pbDecodeRequest(enc);
    assert.equal(got.table, c.table);
    assert.equal(got.version, String(c.version));
    assert.deepEqual(bytesOf(got.keys), bytesOf(c.keys), `keys of ${c.keys.byteLength} bytes`);
    // And back through our own decoder.
    const back = decodeLookupRequest(enc);
    assert.equal(back.table, c.table);
    assert.equal(back.version, c.version);
    assert.deepEqual(bytesOf(back.keys), bytesOf(c.keys));
  }
});

test('encodeLookupRequest accepts keys that are a view into a larger buffer', () => {
  const big = randomKeys(10, 6);
  const view = big.subarray(8, 40); // keys 1..4
  const got = pbDecodeRequest(encodeLookupRequest({ table: 'a', version: 3, keys: view }));
  assert.deepEqual(bytesOf(got.keys), Buffer.from(big.slice(8, 40)));
});

test('decodeLookupRequest reads protobufjs-encoded requests', () => {
  const keys = randomKeys(500, 7);
  const cases: { in: { table?: string; version?: number | string; keys?: Uint8Array }; table: string; version: number; keys: Uint8Array }[] = [
    // version 0 set explicitly: protobufjs writes a 0 varint.
    { in: { table: 'user_emb', version: 0, keys }, table: 'user_emb', version: 0, keys },
    // version unset: the field is omitted, and 0 is the proto3 default.
    { in: { table: 'user_emb', keys }, table: 'user_emb', version: 0, keys },
    { in: { table: 'ünï_cødé_表_🙂', version: 5, keys }, table: 'ünï_cødé_表_🙂', version: 5, keys },
    // empty keys: protobufjs omits the field altogether.
    { in: { table: 'x', version: 9, keys: new Uint8Array(0) }, table: 'x', version: 9, keys: new Uint8Array(0) },
    { in: {}, table: '', version: 0, keys: new Uint8Array(0) },
    { in: { table: 't', version: '9007199254740991', keys }, table: 't', version: Number.MAX_SAFE_INTEGER, keys },
  ];
  for (const c of cases) {
    const enc = pbEncodeRequest(c.in);
    if (c.in.version === undefined) {
      assert.ok(!fieldNumbers(enc).includes(2), 'protobufjs omits an unset version');
    }
    const got = decodeLookupRequest(enc);
    assert.equal(got.table, c.table);
    assert.equal(got.version, c.version);
    assert.deepEqual(bytesOf(got.keys), bytesOf(c.keys));
  }
});

test('decodeLookupRequest refuses a version beyond 2^53 instead of rounding it', () => {
  const enc = pbEncodeRequest({ table: 't', version: '18446744073709551615', keys: randomKeys(1, 8) });
  assertKvInvalid(() => decodeLookupRequest(enc), 'version 2^64-1');
});

test('decodeLookupRequest skips unknown fields of every wire type, in any order', () => {
  const keys = randomKeys(4, 9);
  const w = protobuf.Writer.create();
  w.uint32((9 << 3) | 0).uint64(123456789012);          // unknown varint
  w.uint32((3 << 3) | 2).bytes(keys);                    // keys before table
  w.uint32((10 << 3) | 1).fixed64(0xdeadbeef);          // unknown fixed64
  w.uint32((11 << 3) | 2).bytes(new Uint8Array([1, 2, 3, 0x0a, 0x10])); // unknown bytes with tag-like content
  w.uint32((1 << 3) | 2).string('user_emb');
  w.uint32((12 << 3) | 5).fixed32(0xffffffff);          // unknown fixed32
  w.uint32((2 << 3) | 0).uint64(42);
  w.uint32((1000 << 3) | 2).bytes(new Uint8Array(300)); // multi-byte tag, multi-byte length
  const enc = w.finish();
  assert.deepEqual(pbDecodeRequest(enc).table, 'user_emb'); // the message is valid protobuf
  const got = decodeLookupRequest(enc);
  assert.equal(got.table, 'user_emb');
  assert.equal(got.version, 42);
  assert.deepEqual(bytesOf(got.keys), bytesOf(keys));
});

test('decodeLookupRequest refuses every truncation inside a field with KV_INVALID_ARGUMENT', () => {
  const w = protobuf.Writer.create();
  w.uint32((10 << 3) | 1).fixed64(1);
  w.uint32((12 << 3) | 5).fixed32(1);
  const tail = w.finish();
  const base = encodeLookupRequest({ table: 'user_emb', version: 300_000, keys: randomKeys(3, 10) });
  const full = Buffer.concat([base, tail]);
  const boundaries = fieldBoundaries(full);
  let refused = 0;
  for (let cut = 1; cut < full.length; cut++) {
    if (boundaries.has(cut)) continue;
    assertKvInvalid(() => decodeLookupRequest(full.subarray(0, cut)), `request cut at ${cut}/${full.length}`);
    refused++;
  }
  assert.ok(refused > 30, `checked ${refused} cuts`);
});

test('decodeLookupRequest refuses malformed input with KV_INVALID_ARGUMENT', () => {
  // A varint that never ends (11 continuation bytes).
  assertKvInvalid(() => decodeLookupRequest(Buffer.from([0x10, ...new Array(11).fill(0xff)])), 'endless varint');
  // A bytes field claiming 2^50 bytes.
  const w = protobuf.Writer.create();
  w.uint32((3 << 3) | 2).uint64(2 ** 50);
  assertKvInvalid(() => decodeLookupRequest(w.finish()), 'length 2^50');
  // Group wire types (3, 4) and the undefined ones (6, 7).
  for (const wt of [3, 4, 6, 7]) assertKvInvalid(() => decodeLookupRequest(Buffer.from([(9 << 3) | wt, 0])), `wire type ${wt}`);
});

// ---- LookupResponse ------------------------------------------------------------------------------

test('allocLookupResponse: protobufjs reads the filled buffer, values payload at offset ≡ 3 (mod 8)', () => {
  const versions = [0, 1, 127, 128, 16_384, 2 ** 40];
  const dims = [1, 2, 3, 4, 5, 7, 8, 31, 32, 127, 128, 200];
  const counts = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 126, 127, 128, 129, 1000];
  let seed = 100;
  for (const version of versions) {
    for (const dim of dims) {
      for (const n of counts) {
        const what = `version ${version} dim ${dim} n ${n}`;
        const r = allocLookupResponse(version, dim, n);
        assert.equal(r.found.length, n, what);
        assert.equal(r.values.length, n * dim, what);
        assert.ok(r.found.every((f) => f === 0), `${what}: found starts zeroed`);
        // Fill in place, as the shard does.
        const vals = randomFloats(n * dim, seed++);
        r.values.set(vals);
        for (let i = 0; i < n; i++) r.found[i] = i % 3 === 0 ? 1 : 0;

        // found and values are views into buf.
        assert.equal(r.found.buffer, r.buf.buffer, `${what}: found is a view of buf`);
        assert.equal(r.values.buffer, r.buf.buffer, `${what}: values is a view of buf`);
        const valuesAt = r.values.byteOffset - r.buf.byteOffset;
        assert.equal(payloadOffset(r.buf, 5), valuesAt, `${what}: values view sits on the values payload`);
        assert.equal(valuesAt % 8, 3, `${what}: values payload at message offset ${valuesAt}`);
        // The writer's view is aligned too (it is a Float32Array at all).
        assert.equal(r.values.byteOffset % 8, 0);

        const got = pbDecodeResponse(r.buf);
        assert.equal(got.version, String(version), what);
        assert.equal(got.dim, dim, what);
        assert.deepEqual(bytesOf(got.found), bytesOf(r.found), what);
        assert.deepEqual(bytesOf(got.values), bytesOf(vals), what);
        assert.ok(got.pad.length <= 7, `${what}: pad of ${got.pad.length} bytes`);
        assert.ok(got.pad.every((b) => b === 0), `${what}: pad is zeros`);
      }
    }
  }
});

test('allocLookupResponse answers arrive aligned behind the 5-byte gRPC frame header and decode without a copy', () => {
  for (const [version, dim, n] of [[1, 32, 100], [300, 3, 7], [2 ** 33, 64, 1], [5, 128, 4097]] as const) {
    const r = allocLookupResponse(version, dim, n);
    const vals = randomFloats(n * dim, n);
    r.values.set(vals);
    r.found.fill(1);
    // grpc-js: a fresh buffer with the 5-byte length-prefix, message handed on at byte 5.
    const frame = Buffer.alloc(5 + r.buf.length);
    r.buf.copy(frame, 5);
    const msg = frame.subarray(5);
    const d = decodeLookupResponse(msg);
    assert.equal(d.version, version);
    assert.equal(d.dim, dim);
    assert.equal(d.found.length, n);
    assert.ok(d.found.every((f) => f === 1));
    assert.equal(d.values.buffer, frame.buffer, 'values is a view of the frame, not a copy');
    assert.equal(d.values.byteOffset % 4, 0);
    assert.deepEqual(bytesOf(d.values), bytesOf(vals));
  }
});

test('decodeLookupResponse reads protobufjs-encoded answers, with and without pad, at any byte offset', () => {
  let seed = 500;
  for (const [version, dim, n] of [[1, 4, 10], [2 ** 40 + 3, 3, 33], [77, 1, 1], [9, 16, 0], [128, 257, 5]] as const) {
    const found = new Uint8Array(n).map((_, i) => (i % 2 === 0 ? 1 : 0));
    const vals = randomFloats(n * dim, seed++);
    for (let pad = -1; pad <= 3; pad++) {
      const enc = pbEncodeResponse({
        version,
        dim,
        found,
        values: bytesOf(vals),
        ...(pad >= 0 ? { pad: new Uint8Array(pad) } : {}),
      });
      for (let offset = 0; offset < 8; offset++) {
        const what = `version ${version} dim ${dim} n ${n} pad ${pad} at offset ${offset}`;
        const big = Buffer.alloc(offset + enc.length + 13, 0xee);
        big.set(enc, offset);
        const d = decodeLookupResponse(big.subarray(offset, offset + enc.length));
        assert.equal(d.version, version, what);
        assert.equal(d.dim, dim, what);
        assert.deepEqual(Array.from(d.found), Array.from(found), what);
        assert.equal(d.values.length, n * dim, what);
        assert.deepEqual(bytesOf(d.values), bytesOf(vals), what);
        // Float values, not only bytes (NaN payloads excluded from the equality by the byte check above).
        for (let i = 0; i < d.values.length; i++) {
          if (!Number.isNaN(vals[i]!)) assert.equal(Object.is(d.values[i], vals[i]), true, `${what}: value ${i}`);
        }
      }
    }
  }
});

test('decodeLookupResponse reads fields in any order and skips unknown fields', () => {
  const vals = randomFloats(6, 42);
  const w = protobuf.Writer.create();
  w.uint32((5 << 3) | 2).bytes(bytesOf(vals));        // values first
  w.uint32((7 << 3) | 0).uint64(99);                  // unknown varint
  w.uint32((3 << 3) | 2).bytes(new Uint8Array([1, 0, 1]));
  w.uint32((8 << 3) | 1).fixed64(5);                  // unknown fixed64
  w.uint32((2 << 3) | 0).uint32(2);
  w.uint32((9 << 3) | 5).fixed32(5);                  // unknown fixed32
  w.uint32((4 << 3) | 2).bytes(new Uint8Array(2));
  w.uint32((1 << 3) | 0).uint64(12);
  w.uint32((20 << 3) | 2).bytes(new Uint8Array(200)); // unknown bytes
  const d = decodeLookupResponse(w.finish());
  assert.equal(d.version, 12);
  assert.equal(d.dim, 2);
  assert.deepEqual(Array.from(d.found), [1, 0, 1]);
  assert.deepEqual(bytesOf(d.values), bytesOf(vals));
});

test('decodeLookupResponse refuses values whose length is not found.length * dim', () => {
  const found = new Uint8Array([1, 1, 0]);
  const cases: [string, { version?: number; dim?: number; found?: Uint8Array; values?: Uint8Array }][] = [
    ['one float short', { version: 1, dim: 4, found, values: new Uint8Array(4 * 11) }],
    ['one float extra', { version: 1, dim: 4, found, values: new Uint8Array(4 * 13) }],
    ['two bytes extra', { version: 1, dim: 4, found, values: new Uint8Array(4 * 12 + 2) }],
    ['no values at all', { version: 1, dim: 4, found }],
    ['found too short', { version: 1, dim: 4, found: new Uint8Array(2), values: new Uint8Array(48) }],
    ['dim missing', { version: 1, found, values: new Uint8Array(48) }],
    ['values without found', { version: 1, dim: 4, values: new Uint8Array(16) }],
  ];
  for (const [what, o] of cases) assertKvInvalid(() => decodeLookupResponse(pbEncodeResponse(o)), what);
  // Control: the matching length is accepted.
  assert.equal(decodeLookupResponse(pbEncodeResponse({ version: 1, dim: 4, found, values: new Uint8Array(48) })).values.length, 12);
});

test('decodeLookupResponse refuses every truncation inside a field with KV_INVALID_ARGUMENT', () => {
  for (const [version, dim, n] of [[300, 3, 5], [1, 1, 1], [2 ** 35, 130, 2]] as const) {
    const r = allocLookupResponse(version, dim, n);
    r.values.set(randomFloats(n * dim, 7));
    r.found.fill(1);
    const full = Buffer.from(r.buf);
    const boundaries = fieldBoundaries(full);
    for (let cut = 1; cut < full.length; cut++) {
      const prefix = full.subarray(0, cut);
      if (!boundaries.has(cut)) {
        assertKvInvalid(() => decodeLookupResponse(prefix), `response (${version},${dim},${n}) cut at ${cut}/${full.length}`);
      } else if (cut > payloadOffset(full, 3)) {
        // Whole fields dropped from the end: found present but values missing.
        assertKvInvalid(() => decodeLookupResponse(prefix), `response (${version},${dim},${n}) cut at field boundary ${cut}`);
      }
    }
  }
});

test('AnswerBufferPool: a buffer returns once serialized, and a reused answer reads zeros where keys are absent', async () => {
  const pool = new AnswerBufferPool();
  const a = allocLookupResponse(3, 4, 10, pool);
  a.values.fill(7);
  a.found.fill(1);
  const abA = a.buf.buffer;
  // Not serialized yet: the next answer gets another buffer.
  const b = allocLookupResponse(3, 4, 10, pool);
  assert.notEqual(b.buf.buffer, abA);
  pool.onSerialize(a.buf);
  // Released only after the current synchronous work (grpc-js's frame copy) is done.
  const c = allocLookupResponse(3, 4, 10, pool);
  assert.notEqual(c.buf.buffer, abA);
  await Promise.resolve();
  const d = allocLookupResponse(3, 4, 10, pool);
  assert.equal(d.buf.buffer, abA);
  // The reused buffer still holds a's answer; a lookup into it writes absent keys as zeros.
  const held = new VersionData(4);
  held.append(new Uint32Array([1, 0, 2, 0]), new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]), 2);
  held.seal();
  const keys = new Uint32Array(20);
  keys[0] = 1; // positions 0 and 9 ask for present keys, the rest for absent ones
  keys[18] = 2;
  for (let i = 1; i < 9; i++) keys[2 * i] = 100 + i;
  assert.equal(held.lookup(keys, 10, d.values, d.found), 2);
  assert.deepEqual(Array.from(d.found), [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
  assert.deepEqual(Array.from(d.values.subarray(0, 4)), [1, 2, 3, 4]);
  assert.deepEqual(Array.from(d.values.subarray(36)), [5, 6, 7, 8]);
  assert.ok(d.values.subarray(4, 36).every((v) => v === 0));
  // Buffers not from the pool pass through untouched.
  const plain = allocLookupResponse(1, 2, 3);
  assert.equal(pool.onSerialize(plain.buf), plain.buf);
});

test('an answer with fewer rows than the keys asked is refused, not placed as garbage', async () => {
  // A real gRPC server speaking the Lookup wire, answering one row short (a broken replica).
  const server = new grpc.Server();
  server.addService(EMBKV_SERVER_SERVICE, {
    lookup: (call: grpc.ServerUnaryCall<LookupRequest, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      const n = call.request.keys.byteLength / 8;
      cb(null, allocLookupResponse(1, 2, Math.max(0, n - 1)).buf);
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  const client = new EmbeddingClient({ config: { partitions: 4, groups: [{ replicas: [`127.0.0.1:${port}`] }] } });
  try {
    const err = await client.getEmbeddings([1, 2, 3], { table: 't' }).then(() => undefined, (e: unknown) => e);
    assert.ok(err instanceof KvError, `rejected with a KvError (got ${String(err)})`);
    assert.equal(err.code, 'KV_INTERNAL');
    assert.match(err.message, /answered 2 rows for 3 keys/);
  } finally {
    await client.close();
    server.forceShutdown();
  }
});

test('LoadRows: the hand codec is standard protobuf both ways, and rows arrive 8-byte aligned', () => {
  const PbLoadRows = root.lookupType('embkv.v1.LoadRowsRequest');
  const keys = new Uint32Array([1, 2, 3, 4, 5, 6]);
  const values = new Float32Array([0.5, -1.25, 3, 4, 1e-7, 6]);
  const deletes = new Uint32Array([9, 0]);
  for (const version of [0, 1, 300, 2 ** 40]) {
    const enc = encodeLoadRowsRequest({ table: 'user_emb', version, loadId: 'L-1', keys: bytesOf(keys), values: bytesOf(values), deletes: bytesOf(deletes) });
    const pb = PbLoadRows.toObject(PbLoadRows.decode(enc), { longs: String, defaults: true }) as Record<string, unknown>;
    assert.equal(pb['table'], 'user_emb');
    assert.equal(pb['version'], String(version));
    assert.equal(pb['loadId'], 'L-1');
    assert.deepEqual(Buffer.from(pb['keys'] as Uint8Array), bytesOf(keys));
    assert.deepEqual(Buffer.from(pb['values'] as Uint8Array), bytesOf(values));
    assert.deepEqual(Buffer.from(pb['deletes'] as Uint8Array), bytesOf(deletes));
    // As grpc-js hands it to the server: at byte 5 of a fresh buffer.
    const received = Buffer.concat([Buffer.alloc(5), enc]).subarray(5);
    const dec = decodeLoadRowsRequest(received);
    assert.equal(dec.table, 'user_emb');
    assert.equal(dec.version, version);
    assert.equal(dec.loadId, 'L-1');
    for (const [got, want] of [[dec.keys, keys], [dec.values, values], [dec.deletes, deletes]] as const) {
      assert.deepEqual(Buffer.from(got), bytesOf(want));
      assert.equal(got.byteOffset % 8, 0, 'rows start 8-byte aligned');
    }
  }
  // Another client's encoding (protobufjs, no padding) decodes the same.
  const other = PbLoadRows.encode(PbLoadRows.fromObject({ table: 't', version: 7, loadId: 'x', keys: bytesOf(keys), values: bytesOf(values) })).finish();
  const dec = decodeLoadRowsRequest(other);
  assert.deepEqual([dec.table, dec.version, dec.loadId], ['t', 7, 'x']);
  assert.deepEqual(Buffer.from(dec.values), bytesOf(values));
  assert.equal(dec.deletes.byteLength, 0);

  // A message laid out for full batches: rows written in place, read back as views.
  const m = new LoadRowsMessage('t', 3, 'L', 3, 2);
  m.keys.set(keys);
  m.values.set(values);
  const got = decodeLoadRowsRequest(Buffer.concat([Buffer.alloc(5), m.buf]).subarray(5));
  assert.deepEqual(Buffer.from(got.keys), bytesOf(keys));
  assert.deepEqual(Buffer.from(got.values), bytesOf(values));
  assert.equal(got.values.byteOffset % 8, 0);
  assert.equal(PbLoadRows.toObject(PbLoadRows.decode(m.buf), { longs: String })['version'], '3');
});

test('zero-copy framing: answers leave from their pooled buffers, arrive intact, and the buffer is reused once the stream closes', async () => {
  assert.equal(installZeroCopyFraming(), true, 'the installed grpc-js frames messages as expected');
  const pool = new AnswerBufferPool();
  const held = new VersionData(4);
  const n = 5000;
  const rows = new Uint32Array(2 * n);
  const vecs = new Float32Array(4 * n);
  for (let i = 0; i < n; i++) {
    rows[2 * i] = i + 1;
    vecs.fill(i + 0.5, 4 * i, 4 * i + 4);
  }
  held.append(rows, vecs, n);
  held.seal();
  const taken: ArrayBuffer[] = [];
  const server = new grpc.Server();
  server.addService(embkvServerService(pool), {
    lookup: (call: grpc.ServerUnaryCall<LookupRequest, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      const keys = new Uint32Array(call.request.keys.buffer, call.request.keys.byteOffset, call.request.keys.byteLength / 4);
      const res = allocLookupResponse(1, 4, keys.length / 2, pool);
      taken.push(res.buf.buffer as ArrayBuffer);
      held.lookup(keys, keys.length / 2, res.values, res.found);
      cb(null, res.buf);
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  const client = new EmbeddingClient({ config: { partitions: 4, groups: [{ replicas: [`127.0.0.1:${port}`] }] } });
  const framedBefore = answersFramedInPlace();
  try {
    for (let round = 0; round < 3; round++) {
      // Every other key absent; a different set each round, so a stale buffer would show.
      const keys = Array.from({ length: 4000 }, (_, i) => (i % 2 === 0 ? 1 + ((i * 7 + round * 13) % n) : n + 10 + i));
      const r = await client.getEmbeddings(keys, { table: 't' });
      for (let i = 0; i < keys.length; i++) {
        const want = i % 2 === 0 ? keys[i]! - 0.5 : 0;
        assert.equal(r.found[i], i % 2 === 0 ? 1 : 0);
        assert.deepEqual(Array.from(r.values.subarray(4 * i, 4 * i + 4)), [want, want, want, want], `round ${round} key ${i}`);
      }
      // The stream closes after the answer arrives; the buffer goes back to the pool then.
      while (pool.idle === 0) await new Promise((resolve) => setImmediate(resolve));
    }
    assert.equal(taken.length, 3);
    assert.equal(taken[1], taken[0], 'the answer buffer went back to the pool and was used again');
    assert.equal(taken[2], taken[0]);
    // Answers in flight at once: a buffer handed out again before its stream closed would be
    // overwritten while still being sent.
    const batches = Array.from({ length: 8 }, (_, b) => Array.from({ length: 20000 }, (_, i) => 1 + ((i * 31 + b * 977) % n)));
    const answers = await Promise.all(batches.map((keys) => client.getEmbeddings(keys, { table: 't' })));
    answers.forEach((r, b) => {
      for (let i = 0; i < batches[b]!.length; i++) {
        if (r.values[4 * i] !== batches[b]![i]! - 0.5) assert.fail(`concurrent answer ${b}, key ${i}: ${r.values[4 * i]}`);
      }
    });
    assert.equal(answersFramedInPlace() - framedBefore, 11, 'every answer left from its pooled buffer, none was copied');
  } finally {
    await client.close();
    server.forceShutdown();
  }
});

test('zero-copy requests: LoadRows messages leave framed in place, arrive intact at two servers at once, and are reused after both answer', async () => {
  assert.equal(await installZeroCopyRequests(), true, 'the installed grpc-js frames requests as expected');
  const received: { server: number; keys: Uint32Array; first: number; last: number }[] = [];
  const servers: grpc.Server[] = [];
  const ports: number[] = [];
  for (let sv = 0; sv < 2; sv++) {
    const server = new grpc.Server({ 'grpc.max_receive_message_length': -1 });
    server.addService(shardControlService(), {
      LoadRows: (call: grpc.ServerUnaryCall<LoadRowsRequest, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const r = call.request;
        const values = new Float32Array(r.values.buffer, r.values.byteOffset, r.values.byteLength / 4);
        received.push({ server: sv, keys: new Uint32Array(new Uint8Array(r.keys).buffer), first: values[0]!, last: values[values.length - 1]! });
        // Answer late and out of order, so that several messages are in flight at once.
        setTimeout(() => cb(null, { rows: r.keys.byteLength / 8 }), 5 + ((r.keys[0]! * 7) % 20));
      },
    });
    ports.push(await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)))));
    servers.push(server);
  }
  const Client = shardControlClientConstructor();
  const clients = ports.map((port) => new Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': -1 }) as grpc.Client);
  const send = (c: grpc.Client, buf: Buffer): Promise<void> =>
    new Promise((resolve, reject) => c.makeUnaryRequest('/embkv.v1.ShardControl/LoadRows', (b: Buffer) => b, (b: Buffer) => b, buf, (err) => (err ? reject(err) : resolve())));
  const rows = 20_000;
  const dim = 8;
  const spare: LoadRowsMessage[] = [];
  const taken = new Set<LoadRowsMessage>();
  const before = requestsFramedInPlace();
  try {
    const inflight = new Set<Promise<void>>();
    for (let batch = 0; batch < 12; batch++) {
      while (inflight.size >= 3) await Promise.race(inflight);
      const m = spare.pop() ?? new LoadRowsMessage('t', 1, 'L', rows, dim);
      taken.add(m);
      for (let i = 0; i < rows; i++) {
        m.keys[2 * i] = batch;
        m.keys[2 * i + 1] = i;
      }
      m.values.fill(batch + 0.25);
      const p: Promise<void> = Promise.all(clients.map((c) => send(c, m.buf))).then(() => {
        inflight.delete(p);
        spare.push(m);
      });
      inflight.add(p);
    }
    await Promise.all(inflight);
    assert.equal(received.length, 24);
    for (const sv of [0, 1]) {
      const got = received.filter((r) => r.server === sv).map((r) => r.keys[0]!).sort((a, b) => a - b);
      assert.deepEqual(got, Array.from({ length: 12 }, (_, b) => b), `server ${sv} got every batch once`);
    }
    for (const r of received) {
      const batch = r.keys[0]!;
      assert.equal(r.keys.length, 2 * rows);
      for (let i = 0; i < rows; i++) if (r.keys[2 * i] !== batch || r.keys[2 * i + 1] !== i) assert.fail(`batch ${batch} row ${i} arrived as ${r.keys[2 * i]}/${r.keys[2 * i + 1]}`);
      assert.equal(r.first, batch + 0.25);
      assert.equal(r.last, batch + 0.25);
    }
    assert.ok(taken.size <= 4, `messages were reused (${taken.size} made for 12 batches)`);
    assert.equal(requestsFramedInPlace() - before, 24, 'every request left from its own buffer');
    // A buffer that is not a LoadRowsMessage is still copied into a frame of its own, and arrives intact.
    await send(clients[0]!, encodeLoadRowsRequest({ table: 't', version: 1, loadId: 'L', keys: new Uint8Array(8).fill(99), values: new Uint8Array(dim * 4) }));
    assert.equal(requestsFramedInPlace() - before, 24);
    assert.equal(received.at(-1)!.keys[0], 0x63636363);
  } finally {
    for (const c of clients) c.close();
    for (const s of servers) s.forceShutdown();
  }
});
