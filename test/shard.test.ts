import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { ClassicLevel } from 'classic-level';
import { pack } from 'msgpackr';
import { pino } from 'pino';
import { blockBytes, blockHead } from '../src/common/rows-file.js';
import { decodeLookupResponse } from '../src/wire/lookup.js';
import { Shard } from '../src/shard/shard.js';
import { ShardStore } from '../src/shard/store.js';
import { codeOf } from './helpers/util.js';

const DIM = 4;

async function withShard(fn: (shard: Shard, reopen: () => Promise<Shard>, dir: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'embkv-shard-'));
  let store = new ShardStore(dir);
  await store.open();
  const make = (): Shard => new Shard(store, { keepVersions: 2, logger: pino({ level: 'silent' }) });
  const reopen = async (): Promise<Shard> => {
    await store.close();
    store = new ShardStore(dir);
    await store.open();
    const s = make();
    await s.restore();
    return s;
  };
  try {
    await fn(make(), reopen, dir);
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const rows = (n: number, base: number): { keys: Uint32Array; values: Float32Array } => {
  const keys = new Uint32Array(2 * n);
  const values = new Float32Array(n * DIM);
  for (let i = 0; i < n; i++) {
    keys[2 * i] = base + i;
    values.fill(base + i, i * DIM, (i + 1) * DIM);
  }
  return { keys, values };
};

/** A full load of `r` into `table` v`version` in one batch, sealed; published unless `publish` is false. */
async function loadFull(shard: Shard, table: string, version: number, r: { keys: Uint32Array; values: Float32Array }, publish = true): Promise<void> {
  const n = r.keys.length / 2;
  await shard.loadBegin({ table, version, dim: DIM, loadId: `load-${version}` });
  await shard.loadRows({ table, version, loadId: `load-${version}`, keys: r.keys, values: r.values, deletes: new Uint32Array(0) });
  await shard.loadSeal({ table, version, loadId: `load-${version}`, expectedOps: n });
  if (publish) await shard.publish(table, version, false);
}

test('an aborted load that this replica had already sealed is dropped, so the version can be loaded again', async () => {
  await withShard(async (shard, reopen) => {
    const a = rows(100, 1);
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'load-a' });
    await shard.loadRows({ table: 't', version: 1, loadId: 'load-a', keys: a.keys, values: a.values, deletes: new Uint32Array(0) });
    await shard.loadSeal({ table: 't', version: 1, loadId: 'load-a', expectedOps: 100 });
    await shard.publish('t', 1, false);

    // v2 sealed here, then the loader aborts (another replica failed): v2 must go.
    const b = rows(50, 1000);
    await shard.loadBegin({ table: 't', version: 2, dim: DIM, loadId: 'load-b' });
    await shard.loadRows({ table: 't', version: 2, loadId: 'load-b', keys: b.keys, values: b.values, deletes: new Uint32Array(0) });
    await shard.loadSeal({ table: 't', version: 2, loadId: 'load-b', expectedOps: 50 });
    await shard.loadAbort('t', 2, 'load-b');
    assert.deepEqual(shard.status()[0]!.versions.map((v) => v.version), [1]);
    // A stray abort with another load id changes nothing, and the current version is never dropped.
    await shard.loadAbort('t', 1, 'load-b');
    await shard.loadAbort('t', 1, 'load-a');
    assert.deepEqual(shard.status()[0]!.versions.map((v) => v.version), [1]);

    // The number can be loaded again, and a restart sees the same.
    await shard.loadBegin({ table: 't', version: 2, dim: DIM, loadId: 'load-c' });
    await shard.loadRows({ table: 't', version: 2, loadId: 'load-c', keys: b.keys, values: b.values, deletes: new Uint32Array(0) });
    await shard.loadSeal({ table: 't', version: 2, loadId: 'load-c', expectedOps: 50 });
    const again = await reopen();
    assert.deepEqual(again.status()[0]!.versions.map((v) => v.version), [1, 2]);
    assert.equal(again.status()[0]!.currentVersion, 1);
  });
});

test('a refused LoadBegin leaves no table behind', async () => {
  await withShard(async (shard) => {
    assert.equal(await codeOf(shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'x', incremental: true })), 'KV_VERSION_NOT_FOUND');
    assert.deepEqual(shard.status(), []);
  });
});

/** The vectors a shard answers for `keys` (key halves), as arrays, with undefined for absent keys. */
function answer(shard: Shard, keys: number[]): (number[] | undefined)[] {
  const packed = new Uint32Array(keys.flatMap((k) => [k, 0]));
  const r = decodeLookupResponse(shard.lookup('t', 0, packed));
  return keys.map((_, i) => (r.found[i] ? Array.from(r.values.subarray(i * r.dim, (i + 1) * r.dim)) : undefined));
}

test('rows files: a full version and a delta on it come back the same after a restart', async () => {
  await withShard(async (shard, reopen, dir) => {
    const a = rows(3000, 1);
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'a', expectedRows: 3000 });
    // Several batches in flight at once, as the loader sends them.
    await Promise.all([0, 1, 2].map((b) => shard.loadRows({ table: 't', version: 1, loadId: 'a', keys: a.keys.subarray(2000 * b, 2000 * (b + 1)), values: a.values.subarray(1000 * b * DIM, 1000 * (b + 1) * DIM), deletes: new Uint32Array(0) })));
    await shard.loadSeal({ table: 't', version: 1, loadId: 'a', expectedOps: 3000 });
    await shard.publish('t', 1, false);
    const up = rows(10, 5000);
    await shard.loadBegin({ table: 't', version: 2, dim: DIM, loadId: 'd', incremental: true });
    await shard.loadRows({ table: 't', version: 2, loadId: 'd', keys: up.keys, values: up.values, deletes: new Uint32Array([1, 0, 2, 0]) });
    await shard.loadSeal({ table: 't', version: 2, loadId: 'd', expectedOps: 12 });
    await shard.publish('t', 2, false);
    const probe = [1, 2, 3, 2999, 3000, 3001, 5000, 5009];
    const before = answer(shard, probe);
    assert.deepEqual(before.map((v) => v?.[0]), [undefined, undefined, 3, 2999, 3000, undefined, 5000, 5009]);
    assert.deepEqual(readdirSync(join(dir, 'rows')).sort(), ['t@0000000000000001.rows', 't@0000000000000002.rows']);
    const again = await reopen();
    assert.deepEqual(answer(again, probe), before);
  });
});

test('rows files: a corrupt block stops the restore with the file and the byte, and an unlisted file is deleted', async () => {
  await withShard(async (shard, reopen, dir) => {
    await loadFull(shard, 't', 1, rows(500, 1));
    // A file no version lists (a crash between dropping a version and deleting its file).
    const stray = join(dir, 'rows', 't@0000000000000007.rows');
    writeFileSync(stray, 'left over');
    await reopen();
    assert.equal(existsSync(stray), false, 'the unlisted rows file is deleted at restore');

    const file = join(dir, 'rows', 't@0000000000000001.rows');
    const bytes = readFileSync(file);
    bytes[16 + 8 * 500 + 40] ^= 1; // one bit of one float
    writeFileSync(file, bytes);
    await assert.rejects(reopen(), /t@0000000000000001\.rows: checksum mismatch in the block at byte 0/);
  });
});

test('rows written to LevelDB by earlier releases are still restored', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'embkv-legacy-'));
  try {
    // The earlier layout: metadata without rowsBytes, rows as r!<table>!<version>!<block> entries.
    const db = new ClassicLevel<string, Uint8Array>(dir, { keyEncoding: 'utf8', valueEncoding: 'view' });
    await db.open();
    const n = 3;
    const block = new Uint8Array(8 + n * 8 + n * DIM * 4);
    const head = new Uint32Array(block.buffer, 0, 2 + 2 * n);
    head[0] = n;
    head[1] = DIM;
    for (let i = 0; i < n; i++) head[2 + 2 * i] = 10 + i;
    new Float32Array(block.buffer, 8 + n * 8).forEach((_, j, f) => (f[j] = 10 + Math.floor(j / DIM)));
    await db.put(`r!t!${'1'.padStart(16, '0')}!${'0'.padStart(10, '0')}`, block);
    const vm = { version: 1, dim: DIM, rows: n, state: 'sealed', loadId: 'old', blocks: 1, base: 0, upserts: 0, deletes: 0, createdAtMs: 1 };
    await db.put('t!t', pack({ name: 't', current: 1, versions: [vm], putsFrom: 0 }));
    await db.close();

    const store = new ShardStore(dir);
    await store.open();
    try {
      const shard = new Shard(store, { keepVersions: 2, logger: pino({ level: 'silent' }) });
      await shard.restore();
      assert.deepEqual(answer(shard, [10, 11, 12, 13]).map((v) => v?.[0]), [10, 11, 12, undefined]);
    } finally {
      await store.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('rows arriving while a load is being sealed are refused, so the sealed count and file are final', async () => {
  await withShard(async (shard) => {
    const a = rows(2000, 1);
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'a' });
    await shard.loadRows({ table: 't', version: 1, loadId: 'a', keys: a.keys.subarray(0, 2000), values: a.values.subarray(0, 1000 * DIM), deletes: new Uint32Array(0) });
    const sealing = shard.loadSeal({ table: 't', version: 1, loadId: 'a', expectedOps: 1000 });
    await new Promise((resolve) => setImmediate(resolve)); // the seal is now syncing the rows file
    const late = shard.loadRows({ table: 't', version: 1, loadId: 'a', keys: a.keys.subarray(2000), values: a.values.subarray(1000 * DIM), deletes: new Uint32Array(0) });
    assert.equal(await codeOf(late), 'KV_LOAD_CONFLICT');
    assert.equal(await sealing, 1000);
  });
});

test('rows files: tables differing only in case get their own files; a group without rows restores from an empty file', async () => {
  await withShard(async (shard, reopen, dir) => {
    for (const [table, base] of [['Emb', 100], ['emb', 200]] as const) await loadFull(shard, table, 1, rows(50, base));
    // A load of which no key fell in this group.
    await shard.loadBegin({ table: 'none', version: 1, dim: DIM, loadId: 'n' });
    await shard.loadSeal({ table: 'none', version: 1, loadId: 'n', expectedOps: 0 });
    await shard.publish('none', 1, false);
    assert.deepEqual(readdirSync(join(dir, 'rows')).sort(), ['emb@0000000000000001.rows', 'emb~1@0000000000000001.rows', 'none@0000000000000001.rows']);
    const again = await reopen();
    const first = (table: string): number => decodeLookupResponse(again.lookup(table, 0, new Uint32Array([100, 0, 200, 0]))).values[0]!;
    assert.equal(first('Emb'), 100);
    assert.equal(decodeLookupResponse(again.lookup('emb', 0, new Uint32Array([200, 0]))).values[0], 200);
    assert.equal(again.status().find((t) => t.name === 'none')?.currentVersion, 1);
  });
});

test('rows files: a block header altered to the same size is caught by the checksum', async () => {
  await withShard(async (shard, reopen, dir) => {
    await loadFull(shard, 't', 1, rows(64, 1), false);
    const file = join(dir, 'rows', 't@0000000000000001.rows');
    const bytes = readFileSync(file);
    // 64 rows of dim 4 and 96 rows of dim 1 are both 1536 body bytes.
    bytes.writeUInt32LE(96, 4);
    bytes.writeUInt32LE(1, 8);
    writeFileSync(file, bytes);
    await assert.rejects(reopen(), /t@0000000000000001\.rows: corrupt block at byte 0 \(96 rows of dim 1; the version has dim 4\)/);
  });
});

test('rows files: the longest table name, all capitals, still makes a valid file name', async () => {
  await withShard(async (shard, reopen) => {
    const table = 'A'.repeat(128);
    await loadFull(shard, table, 1, rows(10, 1));
    const again = await reopen();
    assert.equal(decodeLookupResponse(again.lookup(table, 0, new Uint32Array([5, 0]))).values[0], 5);
  });
});

test('a seal whose sync failed cannot be sealed again as an empty version', async () => {
  await withShard(async (shard, _reopen, dir) => {
    const r = rows(100, 1);
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'a' });
    await shard.loadRows({ table: 't', version: 1, loadId: 'a', keys: r.keys, values: r.values, deletes: new Uint32Array(0) });
    // The rows directory goes away under the seal: syncing it fails.
    rmSync(join(dir, 'rows'), { recursive: true, force: true });
    assert.equal(await codeOf(shard.loadSeal({ table: 't', version: 1, loadId: 'a', expectedOps: 100 })), 'KV_INTERNAL');
    assert.equal(await codeOf(shard.loadSeal({ table: 't', version: 1, loadId: 'a', expectedOps: 100 })), 'KV_INTERNAL', 'a second seal is refused, not sealed with no rows');
    await shard.loadAbort('t', 1, 'a');
    assert.deepEqual(shard.status().find((t) => t.name === 't')?.versions ?? [], []);
  });
});

/** A staged file of `batches` as a loader writes it: one block each; returns the blocks' [at, bytes]. */
function writeStaged(path: string, batches: { keys: Uint32Array; values: Float32Array }[]): [number, number][] {
  const parts: Buffer[] = [];
  const ranges: [number, number][] = [];
  let at = 0;
  for (const b of batches) {
    const n = b.keys.length / 2;
    const keys = new Uint8Array(b.keys.buffer, b.keys.byteOffset, n * 8);
    const floats = new Uint8Array(b.values.buffer, b.values.byteOffset, n * DIM * 4);
    parts.push(Buffer.from(blockHead(keys, floats, n, DIM).buffer), Buffer.from(keys), Buffer.from(floats));
    ranges.push([at, blockBytes(n, DIM)]);
    at += blockBytes(n, DIM);
  }
  writeFileSync(path, Buffer.concat(parts));
  return ranges;
}

async function stage(shard: Shard, _dir: string, version: number, token = Buffer.alloc(32, 7)): Promise<{ path: string; readable: boolean; reason: string }> {
  const path = join(shard.stageDir, `load-${version}-g0.rows`);
  const probePath = join(shard.stageDir, `load-${version}-g0.probe`);
  writeFileSync(path, '');
  writeFileSync(probePath, Buffer.alloc(32, 7));
  return { path, ...(await shard.loadStage({ table: 't', version, loadId: `load-${version}`, path, probePath, token })) };
}

test('staged loads: rows read from the loader\'s file in any order, adopted as the rows file, and restored after a restart', async () => {
  await withShard(async (shard, reopen, dir) => {
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'load-1' });
    const { path, readable } = await stage(shard, dir, 1);
    assert.equal(readable, true);
    const ranges = writeStaged(path, [rows(300, 1), rows(200, 1000), rows(100, 5000)]);
    // Out of order, as concurrent calls may arrive.
    for (const i of [2, 0, 1]) await shard.loadRowsFrom({ table: 't', version: 1, loadId: 'load-1', at: ranges[i]![0], bytes: ranges[i]![1] });
    await assert.rejects(shard.loadRowsFrom({ table: 't', version: 1, loadId: 'load-1', at: ranges[1]![0], bytes: ranges[1]![1] }), /overlap/, 'a range is read once');
    assert.equal(await shard.loadSeal({ table: 't', version: 1, loadId: 'load-1', expectedOps: 600 }), 600);
    await shard.publish('t', 1, false);
    rmSync(path); // the loader's name goes; the replica's link stays
    const check = (s: Shard): void => {
      const r = decodeLookupResponse(s.lookup('t', 0, new Uint32Array([1, 0, 1199, 0, 5099, 0, 9999, 0])));
      assert.deepEqual(Array.from(r.found), [1, 1, 1, 0]);
      assert.deepEqual(Array.from(r.values.subarray(0, 12)), [1, 1, 1, 1, 1199, 1199, 1199, 1199, 5099, 5099, 5099, 5099]);
    };
    check(shard);
    check(await reopen());
  });
});

test('staged loads: a range of several blocks is read block by block; a refused row is told by its block and row', async () => {
  await withShard(async (shard, _reopen, dir) => {
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'load-1' });
    const { path } = await stage(shard, dir, 1);
    const dup = rows(50, 5000);
    dup.keys[2 * 7] = 42; // key 42 is row 41 of the first block
    const ranges = writeStaged(path, [rows(300, 1), rows(200, 1000), dup]);
    // The first two blocks in one range.
    assert.equal(await shard.loadRowsFrom({ table: 't', version: 1, loadId: 'load-1', at: 0, bytes: ranges[1]![0] + ranges[1]![1] }), 500);
    // The third block repeats a key: the refusal names the block and its row.
    const end = ranges[2]![0] + ranges[2]![1];
    await assert.rejects(shard.loadRowsFrom({ table: 't', version: 1, loadId: 'load-1', at: ranges[2]![0], bytes: ranges[2]![1] }), (err: Error & { detail?: unknown }) => {
      assert.match(err.message, new RegExp(`key 42 is repeated within this load`));
      assert.deepEqual(err.detail, { row: 7, block: ranges[2]![0], key: '42' });
      return true;
    });
    await shard.loadAbort('t', 1, 'load-1');

    // A range past the end of the file: the blocks before the end are read, then it is refused.
    await shard.loadBegin({ table: 't', version: 2, dim: DIM, loadId: 'load-2' });
    const s2 = await stage(shard, dir, 2);
    writeStaged(s2.path, [rows(300, 1), rows(200, 1000)]);
    await assert.rejects(shard.loadRowsFrom({ table: 't', version: 2, loadId: 'load-2', at: 0, bytes: end }), new RegExp(`ends at byte ${ranges[2]![0]}; the loader named bytes up to ${end}`));
    await shard.loadAbort('t', 2, 'load-2');
  });
});

test('staged loads: a block that spans two slabs is read into both; a NaN in its second part is told by its row', async () => {
  await withShard(async (shard, _reopen, dir) => {
    // Rows 0-9999, then 10000-19999: the second block crosses the slab boundary at row 16384.
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'load-1' });
    const s1 = await stage(shard, dir, 1);
    const r1 = writeStaged(s1.path, [rows(10_000, 1), rows(10_000, 20_001)]);
    for (const [at, bytes] of r1) await shard.loadRowsFrom({ table: 't', version: 1, loadId: 'load-1', at, bytes });
    assert.equal(await shard.loadSeal({ table: 't', version: 1, loadId: 'load-1', expectedOps: 20_000 }), 20_000);
    await shard.publish('t', 1, false);
    const keys = [1, 10_000, 20_001, 26_384, 26_385, 30_000, 5];
    const q = new Uint32Array(keys.flatMap((k) => [k, 0]));
    const r = decodeLookupResponse(shard.lookup('t', 0, q));
    assert.deepEqual(Array.from(r.found), [1, 1, 1, 1, 1, 1, 1]);
    for (let i = 0; i < keys.length; i++) assert.deepEqual(Array.from(r.values.subarray(i * DIM, (i + 1) * DIM)), Array(DIM).fill(keys[i]), `key ${keys[i]}`);

    // A NaN in row 9000 of a block whose rows 6384 on fall in the next slab.
    await shard.loadBegin({ table: 't', version: 2, dim: DIM, loadId: 'load-2' });
    const s2 = await stage(shard, dir, 2);
    const bad = rows(10_000, 20_001);
    bad.values[9000 * DIM + 1] = NaN;
    const r2 = writeStaged(s2.path, [rows(10_000, 1), bad]);
    await shard.loadRowsFrom({ table: 't', version: 2, loadId: 'load-2', at: r2[0]![0], bytes: r2[0]![1] });
    await assert.rejects(shard.loadRowsFrom({ table: 't', version: 2, loadId: 'load-2', at: r2[1]![0], bytes: r2[1]![1] }), (err: Error & { detail?: unknown }) => {
      assert.match(err.message, /batch row 9000 \(key 29001\) holds NaN/);
      assert.deepEqual(err.detail, { row: 9000, block: r2[1]![0], key: '29001' });
      return true;
    });
    await shard.loadAbort('t', 2, 'load-2');
  });
});

test('staged loads: a corrupt block, a gap and a probe that does not match are refused; LoadRows takes over an unused stage', async () => {
  await withShard(async (shard, _reopen, dir) => {
    // The probe holds another token: this replica does not see the loader's file system.
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'load-1' });
    const other = await stage(shard, dir, 1, Buffer.alloc(32, 9));
    assert.equal(other.readable, false);
    assert.match(other.reason, /another host/);
    await assert.rejects(shard.loadRowsFrom({ table: 't', version: 1, loadId: 'load-1', at: 0, bytes: 100 }), /no staged file/);
    // Seen, but no range read yet: LoadRows (the loader's fallback) gives the stage up.
    assert.equal((await stage(shard, dir, 1)).readable, true);
    await shard.loadRows({ table: 't', version: 1, loadId: 'load-1', keys: rows(10, 1).keys, values: rows(10, 1).values, deletes: new Uint32Array(0) });
    assert.equal(await shard.loadSeal({ table: 't', version: 1, loadId: 'load-1', expectedOps: 10 }), 10);

    // A flipped byte in the second block: the checksum catches it, and the load is failed.
    await shard.loadBegin({ table: 't', version: 2, dim: DIM, loadId: 'load-2' });
    const s2 = await stage(shard, dir, 2);
    const r2 = writeStaged(s2.path, [rows(50, 1), rows(50, 100)]);
    const bytes = readFileSync(s2.path);
    bytes[r2[1]![0] + 40] ^= 1;
    writeFileSync(s2.path, bytes);
    await shard.loadRowsFrom({ table: 't', version: 2, loadId: 'load-2', at: r2[0]![0], bytes: r2[0]![1] });
    const bad = shard.loadRowsFrom({ table: 't', version: 2, loadId: 'load-2', at: r2[1]![0], bytes: r2[1]![1] });
    await assert.rejects(bad, /checksum mismatch in the block at byte/);
    assert.equal(await codeOf(bad), 'KV_INVALID_DATA');
    await assert.rejects(shard.loadSeal({ table: 't', version: 2, loadId: 'load-2', expectedOps: 100 }), /checksum/);
    await shard.loadAbort('t', 2, 'load-2');
    // Once rows came from the file, LoadRows is refused (a load does not mix the two).
    await shard.loadBegin({ table: 't', version: 3, dim: DIM, loadId: 'load-3' });
    const s3 = await stage(shard, dir, 3);
    const r3 = writeStaged(s3.path, [rows(20, 1), rows(20, 100)]);
    await shard.loadRowsFrom({ table: 't', version: 3, loadId: 'load-3', at: r3[1]![0], bytes: r3[1]![1] });
    await assert.rejects(shard.loadRows({ table: 't', version: 3, loadId: 'load-3', keys: rows(5, 900).keys, values: rows(5, 900).values, deletes: new Uint32Array(0) }), /takes its rows from/);
    // A range never read leaves a gap: the seal refuses it.
    await assert.rejects(shard.loadSeal({ table: 't', version: 3, loadId: 'load-3', expectedOps: 20 }), /bytes 0-\d+ were never read/);
    await shard.loadAbort('t', 3, 'load-3');
    // A range that is not whole blocks.
    await shard.loadBegin({ table: 't', version: 4, dim: DIM, loadId: 'load-4' });
    const s4 = await stage(shard, dir, 4);
    const r4 = writeStaged(s4.path, [rows(20, 1)]);
    await assert.rejects(shard.loadRowsFrom({ table: 't', version: 4, loadId: 'load-4', at: 0, bytes: r4[0]![1] - 8 }), /no block of rows/);
    await shard.loadAbort('t', 4, 'load-4');
    // A delta is not staged.
    await shard.publish('t', 1, false);
    await shard.loadBegin({ table: 't', version: 5, dim: DIM, loadId: 'load-5', incremental: true });
    assert.deepEqual(await shard.loadStage({ table: 't', version: 5, loadId: 'load-5', path: s4.path, probePath: join(dir, 'staged-4.probe'), token: Buffer.alloc(32, 7) }), { readable: false, reason: 'a delta takes its rows over gRPC' });
  });
});

test('staged loads: only a loader\'s staged files are read, and only regular ones', async () => {
  await withShard(async (shard, _reopen, dir) => {
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'load-1' });
    const token = Buffer.alloc(32, 7);
    const refusedPath = async (path: string, probePath: string): Promise<void> => {
      await assert.rejects(shard.loadStage({ table: 't', version: 1, loadId: 'load-1', path, probePath, token }), /must be <stage dir>\/load-1-g<group>\.rows/);
    };
    writeFileSync(join(dir, 'secret'), token);
    await refusedPath('/etc/passwd', join(shard.stageDir, 'load-1-g0.probe'));
    await refusedPath(join(shard.stageDir, 'load-2-g0.rows'), join(shard.stageDir, 'load-2-g0.probe'));
    await refusedPath(join(shard.stageDir, 'load-1-g0.rows'), join(dir, 'secret'));
    await refusedPath('incoming/load-1-g0.rows', 'incoming/load-1-g0.probe');
    // A symlink in place of the file is not followed.
    writeFileSync(join(shard.stageDir, 'load-1-g0.probe'), token);
    symlinkSync(join(dir, 'secret'), join(shard.stageDir, 'load-1-g0.rows'));
    const r = await shard.loadStage({ table: 't', version: 1, loadId: 'load-1', path: join(shard.stageDir, 'load-1-g0.rows'), probePath: join(shard.stageDir, 'load-1-g0.probe'), token });
    assert.equal(r.readable, false);
    assert.match(r.reason, /ELOOP|symbolic link/);
  });
});

test('staged files a dead loader left are removed once idle for the load idle time; files of loads in progress stay', async () => {
  await withShard(async (shard) => {
    const stageDir = shard.stageDir;
    const old = Date.now() / 1000 - 3600;
    // Left by loads that are over: one idle for an hour, one written a moment ago (another replica
    // of its group may still be linking it at its seal).
    writeFileSync(join(stageDir, 'dead-load-g0.rows'), 'x');
    utimesSync(join(stageDir, 'dead-load-g0.rows'), old, old);
    writeFileSync(join(stageDir, 'just-sealed-g0.rows'), 'x');
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'live' });
    writeFileSync(join(stageDir, 'live-g0.rows'), 'x');
    utimesSync(join(stageDir, 'live-g0.rows'), old, old);
    assert.deepEqual(readdirSync(stageDir).sort(), ['just-sealed-g0.rows', 'live-g0.rows']);
    // The live load's own files go when it is dropped and idle.
    await shard.loadBegin({ table: 'u', version: 1, dim: DIM, loadId: 'other' });
    assert.ok(existsSync(join(stageDir, 'live-g0.rows')), 'a load in progress keeps its files');
    await shard.loadAbort('t', 1, 'live');
    assert.deepEqual(readdirSync(stageDir).sort(), ['just-sealed-g0.rows']);
  });
});

test('a stalled staged load lets its file go: its handle is closed and the load failed, so the space is freed', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'embkv-shard-'));
  const store = new ShardStore(dir);
  await store.open();
  try {
    const shard = new Shard(store, { keepVersions: 2, logger: pino({ level: 'silent' }), loadIdleMs: 50 });
    await shard.loadBegin({ table: 't', version: 1, dim: DIM, loadId: 'load-1' });
    assert.equal((await stage(shard, dir, 1)).readable, true);
    await new Promise((r) => setTimeout(r, 80));
    // Another table's load looks at the stage directory: load-1 has been idle for longer than 50 ms.
    await shard.loadBegin({ table: 'u', version: 1, dim: DIM, loadId: 'load-u' });
    await assert.rejects(shard.loadRowsFrom({ table: 't', version: 1, loadId: 'load-1', at: 0, bytes: 100 }), /stalled .* staged file was let go/);
    assert.deepEqual(readdirSync(shard.stageDir).filter((n) => n.startsWith('load-1-')), [], 'the idle files are removed');
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
