import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { KvError } from '../src/common/errors.js';
import type { Manifest } from '../src/cluster/manifest.js';
import { runLoad } from '../src/loader/loader.js';

// Refused before any connection is made, so no manifest is needed.
const manifest = {} as Manifest;

async function refusal(work: Promise<unknown>): Promise<KvError> {
  try {
    await work;
  } catch (err) {
    assert.ok(err instanceof KvError, `not a KvError: ${String(err)}`);
    return err;
  }
  assert.fail('not refused');
}

describe('runLoad names its options as its caller does', () => {
  it('by default as the LoadOptions fields, with no CLI flag in the library', async () => {
    const t = await refusal(runLoad({ manifest, table: 'no spaces', version: 1, path: 'x' }));
    assert.equal(t.code, 'KV_INVALID_ARGUMENT');
    assert.match(t.message, /^table must be/);
    const v = await refusal(runLoad({ manifest, table: 't', version: 0, path: 'x' }));
    assert.equal(v.code, 'KV_INVALID_ARGUMENT');
    assert.match(v.message, /^version must be a positive integer/);
  });

  it('as the names the caller passes (kvctl: its flags)', async () => {
    const optionNames = { table: '--table', version: '--version' };
    const t = await refusal(runLoad({ manifest, table: 'no spaces', version: 1, path: 'x', optionNames }));
    assert.match(t.message, /^--table must be/);
    const v = await refusal(runLoad({ manifest, table: 't', version: 0, path: 'x', optionNames }));
    assert.match(v.message, /^--version must be a positive integer/);
  });
});
