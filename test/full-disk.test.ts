import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { KvError, KvErrorCode } from '../src/common/errors.js';
import { writeBlock } from '../src/common/rows-file.js';
import { ShardStore } from '../src/shard/store.js';
import { freePorts, kvctl } from './helpers/cluster.js';

/** A 2 MiB tmpfs of its own: a real full disk. Skipped where mounting is not allowed. */
let root = '';
let disk = '';
let mounted = false;
try {
  root = mkdtempSync(join(tmpdir(), 'embkv-fulldisk-'));
  disk = join(root, 'disk');
  mkdirSync(disk);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', disk], { stdio: 'ignore' });
  mounted = true;
} catch {
  mounted = false;
}

/** Fills the disk up to its last byte. */
function fill(name: string): void {
  try {
    writeFileSync(join(disk, name), Buffer.alloc(4 * 1024 * 1024));
  } catch (err) {
    assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
  }
}

describe('a full disk is named: ENOSPC and the path', { skip: mounted ? false : 'cannot mount a tmpfs here' }, () => {
  before(() => undefined);
  after(() => {
    if (mounted) execFileSync('umount', [disk]);
    rmSync(root, { recursive: true, force: true });
  });

  test('a rows block that does not fit says no space left on device (ENOSPC), the file, and how far it got', async () => {
    const path = join(disk, 'emb.v3.rows');
    const fh = await open(path, 'w');
    try {
      const n = 1000;
      const dim = 1024;
      const keys = new Uint8Array(n * 8);
      const floats = new Uint8Array(n * dim * 4);
      await assert.rejects(writeBlock(fh, path, 0, keys, floats, n, dim), (err: unknown) => {
        assert.ok(err instanceof KvError, String(err));
        assert.equal(err.code, KvErrorCode.RESOURCE_EXHAUSTED);
        assert.match(err.message, new RegExp(`^no space left on device \\(ENOSPC\\) writing ${path}: \\d+ of ${16 + n * 8 + n * dim * 4} bytes written$`));
        return true;
      });
    } finally {
      await fh.close();
      rmSync(path);
    }
  });

  test('a store that cannot open on a full disk says ENOSPC, the data directory and LevelDB\'s reason', async () => {
    fill('filler-1');
    const dir = join(disk, 'g0r0');
    mkdirSync(dir, { recursive: true });
    const store = new ShardStore(dir);
    await assert.rejects(store.open(), (err: unknown) => {
      assert.ok(err instanceof KvError, String(err));
      assert.equal(err.code, KvErrorCode.RESOURCE_EXHAUSTED);
      assert.match(err.message, new RegExp(`^no space left on device \\(ENOSPC\\) opening data directory ${dir}: Database failed to open: .*No space left on device`));
      return true;
    });
  });

  test('kvctl serve on a full disk exits non-zero with one line naming ENOSPC and the data directory', async () => {
    fill('filler-2');
    const [port] = await freePorts(1);
    const config = join(root, 'cluster.json');
    writeFileSync(config, JSON.stringify({ partitions: 4, groups: [{ replicas: [`127.0.0.1:${port}`] }] }));
    const dir = join(disk, 'serve');
    const r = await kvctl(['serve', '--config', config, '--group', '0', '--replica', '0', '--data', dir], { timeoutMs: 60_000 });
    assert.equal(r.code, 1, r.stderr);
    const last = r.stderr.trim().split('\n').at(-1)!;
    assert.match(last, new RegExp(`^kvctl: error: no space left on device \\(ENOSPC\\) opening data directory ${dir}: `));
  });
});
