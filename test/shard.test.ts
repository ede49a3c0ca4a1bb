import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pino } from 'pino';
import { Shard } from '../src/shard/shard.js';
import { ShardStore } from '../src/shard/store.js';
import { codeOf } from './helpers/util.js';

const DIM = 4;

async function withShard(fn: (shard: Shard, reopen: () => Promise<Shard>) => Promise<void>): Promise<void> {
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
    await fn(make(), reopen);
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

test('an aborted load that this replica had already sealed is dropped, so the version can be loaded again', async () => {
  await withShard(async (shard, reopen) => {
    const a = rows(100, 1);
    await shard.loadBegin('t', 1, DIM, 'load-a', false, false);
    await shard.loadRows('t', 1, 'load-a', a.keys, a.values, new Uint32Array(0));
    await shard.loadSeal('t', 1, 'load-a', 100);
    await shard.publish('t', 1, false);

    // v2 sealed here, then the loader aborts (another replica failed): v2 must go.
    const b = rows(50, 1000);
    await shard.loadBegin('t', 2, DIM, 'load-b', false, false);
    await shard.loadRows('t', 2, 'load-b', b.keys, b.values, new Uint32Array(0));
    await shard.loadSeal('t', 2, 'load-b', 50);
    await shard.loadAbort('t', 2, 'load-b');
    assert.deepEqual(shard.status()[0]!.versions.map((v) => v.version), [1]);
    // A stray abort with another load id changes nothing, and the current version is never dropped.
    await shard.loadAbort('t', 1, 'load-b');
    await shard.loadAbort('t', 1, 'load-a');
    assert.deepEqual(shard.status()[0]!.versions.map((v) => v.version), [1]);

    // The number can be loaded again, and a restart sees the same.
    await shard.loadBegin('t', 2, DIM, 'load-c', false, false);
    await shard.loadRows('t', 2, 'load-c', b.keys, b.values, new Uint32Array(0));
    await shard.loadSeal('t', 2, 'load-c', 50);
    const again = await reopen();
    assert.deepEqual(again.status()[0]!.versions.map((v) => v.version), [1, 2]);
    assert.equal(again.status()[0]!.currentVersion, 1);
  });
});

test('a refused LoadBegin leaves no table behind', async () => {
  await withShard(async (shard) => {
    assert.equal(await codeOf(shard.loadBegin('t', 1, DIM, 'x', false, true)), 'KV_VERSION_NOT_FOUND');
    assert.deepEqual(shard.status(), []);
  });
});
