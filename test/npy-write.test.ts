import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvError } from '../src/common/errors.js';
import { writeNpyPair } from '../src/loader/npy-write.js';
import { planDump } from '../src/loader/sources.js';

let root = '';
before(() => {
  root = mkdtempSync(join(tmpdir(), 'embkv-npy-write-'));
});
after(() => {
  rmSync(root, { recursive: true, force: true });
});

describe('writeNpyPair', () => {
  it('writes a pair that planDump reads back', async () => {
    await writeNpyPair(join(root, 'a'), new BigUint64Array([1n, 2n]), new Float32Array([1, 2, 3, 4, 5, 6]), 3);
    const plan = await planDump(join(root, 'a'), 'full');
    assert.equal(plan.dim, 3);
    assert.equal(plan.totalRows, 2);
  });

  it('refuses values that do not fit the keys with a KvError code', async () => {
    await assert.rejects(writeNpyPair(join(root, 'b'), new BigUint64Array([1n, 2n]), new Float32Array(5), 3), (err: unknown) => {
      assert.ok(err instanceof KvError);
      assert.equal(err.code, 'KV_INVALID_ARGUMENT');
      return true;
    });
  });
});
