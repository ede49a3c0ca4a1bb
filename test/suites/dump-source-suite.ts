/**
 * The DumpSource contract, run against every implementation (local files, S3 on s3rver), as every
 * Level backend runs abstract-level's suite.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { KvError } from '../../src/common/errors.js';
import { hasSuccessMarker, listSubdirectories, type DumpSource } from '../../src/loader/sources.js';

export interface SourceFixture {
  source: DumpSource;
  /** A directory (or prefix) location, empty when the suite starts; join names to it with source.join. */
  root: string;
  write(relative: string, bytes: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

const bytesOf = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 255);

export function dumpSourceSuite(name: string, make: () => Promise<SourceFixture>): void {
  describe(`DumpSource contract: ${name}`, () => {
    let f: SourceFixture;
    const big = bytesOf(300_000, 7);
    before(async () => {
      f = await make();
      await f.write('b.bin', big);
      await f.write('a.txt', new TextEncoder().encode('1 0.5\n'));
      await f.write('_SUCCESS', new Uint8Array(0));
      await f.write('sub/x.bin', bytesOf(10, 1));
    });
    after(() => f?.close());

    test('lists entries in name order with sizes, subdirectories as dirs', async () => {
      const entries = await f.source.list(f.root);
      assert.deepEqual(entries.map((e) => [e.name, e.type]), [['_SUCCESS', 'file'], ['a.txt', 'file'], ['b.bin', 'file'], ['sub', 'dir']]);
      assert.equal(entries.find((e) => e.name === 'b.bin')!.size, big.length);
      assert.deepEqual(await listSubdirectories(f.source, f.root), ['sub']);
      assert.equal(await hasSuccessMarker(f.source, f.root), true);
      assert.equal(await hasSuccessMarker(f.source, f.source.join(f.root, 'sub')), false);
    });

    test('stat: a file and its size, a directory, nothing', async () => {
      const s = await f.source.stat(f.source.join(f.root, 'b.bin'));
      assert.equal(s?.type, 'file');
      assert.equal(s?.size, big.length);
      assert.equal((await f.source.stat(f.source.join(f.root, 'sub')))?.type, 'dir');
      assert.equal(await f.source.stat(f.source.join(f.root, 'nothing.bin')), undefined);
    });

    test('positioned reads: scattered, sequential across blocks, and short at the end', async () => {
      const r = await f.source.open(f.source.join(f.root, 'b.bin'));
      try {
        assert.equal(r.size, big.length);
        const buf = new Uint8Array(100_000);
        assert.equal(await r.read(buf, 0, 12, 1000), 12);
        assert.deepEqual(buf.subarray(0, 12), big.subarray(1000, 1012));
        // Sequential reads from 5 on, in pieces that straddle any block size.
        let pos = 5;
        const out = new Uint8Array(big.length);
        while (pos < big.length) {
          const n = await r.read(out, pos, Math.min(77_777, big.length - pos), pos);
          assert.ok(n > 0);
          pos += n;
        }
        assert.deepEqual(out.subarray(5), big.subarray(5));
        assert.equal(await r.read(buf, 10, 500, big.length - 100), 100);
        assert.deepEqual(buf.subarray(10, 110), big.subarray(big.length - 100));
        assert.equal(await r.read(buf, 0, 10, big.length), 0);
      } finally {
        await r.close();
      }
    });

    test('opening a missing file is refused with KV_INVALID_DATA naming it', async () => {
      const missing = f.source.join(f.root, 'gone.keys.npy');
      await assert.rejects(f.source.open(missing), (err: unknown) => {
        assert.ok(err instanceof KvError);
        assert.equal(err.code, 'KV_INVALID_DATA');
        assert.ok(err.message.includes(missing), err.message);
        return true;
      });
    });
  });
}
