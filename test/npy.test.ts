import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { appendFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { planDump, readDump, type RowChunk } from '../src/loader/sources.js';
import { caseDirs, collect, planAndRead, rawNpy, refuses, sample } from './helpers/dump.js';
import { npyHeader, writeNpy, writePair } from './helpers/npy.js';

const fresh = caseDirs('embkv-npy-');

describe('NumPy pairs', () => {
  for (const version of [1, 2, 3] as const) {
    it(`round-trips a pair with a v${version}.0 header`, async () => {
      const dir = fresh();
      const { keys, values } = sample(100, 8);
      keys[0] = (1n << 64n) - 1n;
      keys[1] = 0n;
      const prefix = writePair(join(dir, 'emb'), keys, values, 8, { version });
      const plan = await planDump(prefix, 'full');
      assert.equal(plan.dim, 8);
      assert.equal(plan.totalRows, 100);
      assert.equal(plan.parts.length, 1);
      assert.equal(plan.parts[0]!.kind, 'npy');
      assert.equal(plan.parts[0]!.rows, 100);
      const got = await collect(plan);
      assert.deepEqual(got.keys, Array.from(keys));
      assert.deepEqual(new Float32Array(got.values), values);
    });
  }

  it('accepts the pair as PREFIX, PREFIX.keys.npy or PREFIX.values.npy', async () => {
    const dir = fresh();
    const { keys, values } = sample(5, 4);
    const prefix = writePair(join(dir, 'x'), keys, values, 4);
    for (const p of [prefix, `${prefix}.keys.npy`, `${prefix}.values.npy`]) {
      const plan = await planDump(p, 'full', { expectedDim: 4 });
      assert.equal(plan.parts[0]!.keysPath, `${prefix}.keys.npy`);
      assert.equal(plan.parts[0]!.valuesPath, `${prefix}.values.npy`);
      assert.deepEqual((await collect(plan)).keys, Array.from(keys));
    }
  });

  it('takes <i8 keys as the same 64 bits (two\'s complement)', async () => {
    const dir = fresh();
    const ik = new BigInt64Array([-1n, -(1n << 63n), 0n, 42n, -42n]);
    writeNpy(join(dir, 'a.keys.npy'), '<i8', [5], ik);
    writeNpy(join(dir, 'a.values.npy'), '<f4', [5, 2], new Float32Array(10).fill(0.25));
    const got = await planAndRead(join(dir, 'a'));
    assert.deepEqual(got.keys, [(1n << 64n) - 1n, 1n << 63n, 0n, 42n, (1n << 64n) - 42n]);
  });

  it('reads an empty pair (0 rows)', async () => {
    const dir = fresh();
    writePair(join(dir, 'e'), new BigUint64Array(0), new Float32Array(0), 16);
    const plan = await planDump(join(dir, 'e'), 'full');
    assert.equal(plan.dim, 16);
    assert.equal(plan.totalRows, 0);
    assert.equal((await collect(plan)).rowChunks.length, 0);
  });

  it('parses headers written differently (double quotes, order, no trailing comma, 5L)', async () => {
    const dir = fresh();
    const dicts = [
      `{"shape": (5L,), "fortran_order": False, "descr": "<u8"}`,
      `{ 'descr' : '<u8' ,'shape':( 5 , ),'fortran_order':False,}`,
    ];
    for (const [i, dict] of dicts.entries()) {
      const keys = new BigUint64Array([1n, 2n, 3n, 4n, 5n]);
      writeFileSync(join(dir, `h${i}.keys.npy`), rawNpy(dict, keys));
      writeNpy(join(dir, `h${i}.values.npy`), '<f4', [5, 1], new Float32Array([1, 2, 3, 4, 5]));
      const got = await planAndRead(join(dir, `h${i}`));
      assert.deepEqual(got.keys, Array.from(keys));
      assert.deepEqual(got.values, [1, 2, 3, 4, 5]);
    }
  });

  it('reads files written by real NumPy (np.save, <u8 and <i8 keys) bit-exact', async () => {
    const dir = fresh();
    const script = [
      'import numpy as np, sys',
      'd = sys.argv[1]',
      'rng = np.random.default_rng(7)',
      'k = rng.integers(0, 2**64 - 1, size=257, dtype=np.uint64, endpoint=True); k[0] = 2**64 - 1; k[1] = 0',
      'v = rng.standard_normal((257, 24)).astype(np.float32); v[3, 5] = -0.0',
      'np.save(d + "/u.keys.npy", k); np.save(d + "/u.values.npy", v)',
      'np.save(d + "/i.keys.npy", k.view(np.int64)); np.save(d + "/i.values.npy", v)',
      'k.tofile(d + "/expect.keys.bin"); v.tofile(d + "/expect.values.bin")',
    ].join('\n');
    execFileSync('/usr/bin/python3', ['-c', script, dir]);
    const { readFileSync } = await import('node:fs');
    const expectKeys = new Uint8Array(readFileSync(join(dir, 'expect.keys.bin')));
    const expectValues = new Uint8Array(readFileSync(join(dir, 'expect.values.bin')));
    for (const name of ['u', 'i']) {
      const plan = await planDump(join(dir, `${name}.keys.npy`), 'full', { expectedDim: 24 });
      assert.equal(plan.totalRows, 257);
      const keyBytes: number[] = [];
      const valueBytes: number[] = [];
      for await (const item of readDump(plan, { chunkRows: 100 })) {
        assert.equal(item.type, 'rows');
        const c = item.chunk as RowChunk;
        keyBytes.push(...new Uint8Array(c.keys.buffer, c.keys.byteOffset, c.keys.byteLength));
        valueBytes.push(...new Uint8Array(c.values.buffer, c.values.byteOffset, c.values.byteLength));
      }
      assert.deepEqual(new Uint8Array(keyBytes), expectKeys, `${name} keys`);
      assert.deepEqual(new Uint8Array(valueBytes), expectValues, `${name} values`);
    }
  });
});


describe('NumPy refusals', () => {
  const pair = (dir: string, n = 4, dim = 2): string => {
    const s = sample(n, dim);
    return writePair(join(dir, 'x'), s.keys, s.values, dim);
  };

  it('refuses a bad magic', async () => {
    const dir = fresh();
    const prefix = pair(dir);
    writeFileSync(`${prefix}.values.npy`, Buffer.from('PK\x03\x04 this is a zip, not npy'));
    await refuses(() => planDump(prefix, 'full'), 'x.values.npy', 'magic');
  });

  it('refuses an unsupported format version and a malformed header dict', async () => {
    const dir = fresh();
    const prefix = pair(dir);
    const buf = Buffer.concat([npyHeader('<u8', [4]), Buffer.alloc(32)]);
    buf[6] = 4;
    writeFileSync(`${prefix}.keys.npy`, buf);
    await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', 'version 4.0');
    const bad = Buffer.concat([npyHeader('<u8', [4]), Buffer.alloc(32)]);
    bad.write("{'descr' '<u8'", 10, 'latin1');
    writeFileSync(`${prefix}.keys.npy`, bad);
    await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', 'malformed .npy header');
    writeFileSync(`${prefix}.keys.npy`, rawNpy(`{'descr': [('a', '<u8')], 'fortran_order': False, 'shape': (4,), }`, new BigUint64Array(4)));
    await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', 'structured');
    writeFileSync(`${prefix}.keys.npy`, rawNpy(`{'descr': '<u8', 'shape': (4,), }`, new BigUint64Array(4)));
    await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', "no 'fortran_order'");
  });

  it('refuses unsupported dtypes, naming the dtype and what is expected', async () => {
    const dir = fresh();
    const prefix = pair(dir);
    for (const descr of ['>f4', '<f8', '<f2', '|u1']) {
      writeNpy(`${prefix}.values.npy`, descr, [4, 2], new Uint8Array(4 * 2 * (descr === '<f8' ? 8 : descr === '|u1' ? 1 : descr === '<f2' ? 2 : 4)));
      await refuses(() => planDump(prefix, 'full'), 'x.values.npy', `'${descr}'`, "'<f4'");
    }
    pair(dir);
    for (const descr of ['<u4', '|u1', '>u8', '<f8']) {
      writeNpy(`${prefix}.keys.npy`, descr, [4], new Uint8Array(4 * 8));
      await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', `'${descr}'`, "'<u8'", "'<i8'");
    }
  });

  it('refuses fortran order for values', async () => {
    const dir = fresh();
    const prefix = pair(dir);
    writeNpy(`${prefix}.values.npy`, '<f4', [4, 2], new Float32Array(8), { fortran: true });
    await refuses(() => planDump(prefix, 'full'), 'x.values.npy', 'fortran_order');
  });

  it('refuses the wrong number of dimensions', async () => {
    const dir = fresh();
    const prefix = pair(dir);
    writeNpy(`${prefix}.values.npy`, '<f4', [8], new Float32Array(8));
    await refuses(() => planDump(prefix, 'full'), 'x.values.npy', '2-D');
    pair(dir);
    writeNpy(`${prefix}.keys.npy`, '<u8', [4, 1], new BigUint64Array(4));
    await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', '1-D');
  });

  it('refuses keys and values with different row counts', async () => {
    const dir = fresh();
    const prefix = pair(dir, 4);
    writeNpy(`${prefix}.keys.npy`, '<u8', [5], new BigUint64Array(5));
    await refuses(() => planDump(prefix, 'full'), 'x.values.npy', 'x.keys.npy', '4 rows', '5 keys');
  });

  it('refuses truncated files and trailing bytes', async () => {
    const dir = fresh();
    const prefix = pair(dir, 1000, 32);
    truncateSync(`${prefix}.values.npy`, 128 + 96000);
    await refuses(() => planDump(prefix, 'full'), 'x.values.npy', 'truncated', '1,000 rows of dim 32', '128,000', '96,000');
    pair(dir, 1000, 32);
    appendFileSync(`${prefix}.keys.npy`, Buffer.alloc(3));
    await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', '3 trailing bytes');
    truncateSync(`${prefix}.keys.npy`, 40);
    await refuses(() => planDump(prefix, 'full'), 'x.keys.npy', 'header');
  });

  it('refuses a dim that differs between parts or from the expected dim', async () => {
    const dir = fresh();
    const a = sample(2, 4);
    const b = sample(2, 5);
    writePair(join(dir, 'p0'), a.keys, a.values, 4);
    writePair(join(dir, 'p1'), b.keys, b.values, 5);
    await refuses(() => planDump(dir, 'full'), 'p1.values.npy', 'dim 5', 'p0.values.npy');
    const d2 = fresh();
    writePair(join(d2, 'p0'), a.keys, a.values, 4);
    await refuses(() => planDump(d2, 'full', { expectedDim: 8 }), 'p0.values.npy', 'dim 4 differs from 8', 'expected dim');
    writeFileSync(join(d2, 'p1.txt'), '1\t1,2,3\n');
    await refuses(() => planDump(d2, 'full'), 'p1.txt', 'line 1', '3 values', 'expected 4');
  });

  it('refuses NaN and Inf values naming the row and column', async () => {
    const dir = fresh();
    const s = sample(6000, 8);
    s.values[5012 * 8 + 7] = NaN;
    const prefix = writePair(join(dir, 'x'), s.keys, s.values, 8);
    const plan = await planDump(prefix, 'full');
    await refuses(() => collect(plan, { chunkRows: 1000 }), 'x.values.npy', 'row 5012 column 7 is NaN');
    s.values[5012 * 8 + 7] = 0;
    s.values[3 * 8] = -Infinity;
    writePair(join(dir, 'x'), s.keys, s.values, 8);
    await refuses(() => planAndRead(prefix), 'x.values.npy', 'row 3 column 0 is -Inf');
    s.values[3 * 8] = 0;
    s.values[5999 * 8 + 1] = Infinity;
    writePair(join(dir, 'x'), s.keys, s.values, 8);
    await refuses(() => planAndRead(prefix), 'x.values.npy', 'row 5999 column 1 is Inf');
  });

  it('refuses a .npy file that is not named as a part', async () => {
    const dir = fresh();
    writeNpy(join(dir, 'lonely.npy'), '<u8', [1], new BigUint64Array(1));
    await refuses(() => planDump(join(dir, 'lonely.npy'), 'full'), 'lonely.npy', 'NAME.keys.npy');
  });
});

