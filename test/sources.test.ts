import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { appendFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvError } from '../src/common/errors.js';
import { planDump, readDump, type DeleteChunk, type DumpPlan, type LoadMode, type RowChunk } from '../src/loader/sources.js';
import { npyHeader, writeNpy, writePair } from './helpers/npy.js';

let root = '';
let seq = 0;
/** A fresh directory for one case. */
const fresh = (): string => {
  const d = join(root, `case-${seq++}`);
  mkdirSync(d);
  return d;
};

before(() => {
  root = mkdtempSync(join(tmpdir(), 'embkv-sources-'));
});
after(() => {
  rmSync(root, { recursive: true, force: true });
});

interface Collected {
  rowChunks: RowChunk[];
  deleteChunks: DeleteChunk[];
  keys: bigint[];
  values: number[];
  deletes: bigint[];
}

function keysOf(packed: Uint32Array): bigint[] {
  return Array.from(new BigUint64Array(packed.buffer, packed.byteOffset, packed.length / 2));
}

async function collect(plan: DumpPlan, options?: { chunkRows?: number; signal?: AbortSignal }): Promise<Collected> {
  const out: Collected = { rowChunks: [], deleteChunks: [], keys: [], values: [], deletes: [] };
  for await (const item of readDump(plan, options)) {
    if (item.type === 'rows') {
      const c = item.chunk;
      assert.equal(c.keys.length, 2 * c.n);
      assert.equal(c.values.length, c.n * plan.dim);
      out.rowChunks.push(c);
      out.keys.push(...keysOf(c.keys));
      out.values.push(...c.values);
    } else {
      const c = item.chunk;
      assert.equal(c.keys.length, 2 * c.n);
      out.deleteChunks.push(c);
      out.deletes.push(...keysOf(c.keys));
    }
  }
  return out;
}

/** Asserts a KV_INVALID_DATA refusal whose message holds every needle (file name, row or line...). */
async function refuses(work: () => Promise<unknown>, ...needles: string[]): Promise<void> {
  await assert.rejects(work, (err: unknown) => {
    assert.ok(err instanceof KvError, `not a KvError: ${String(err)}`);
    assert.equal(err.code, 'KV_INVALID_DATA', err.message);
    for (const n of needles) assert.ok(err.message.includes(n), `message ${JSON.stringify(err.message)} lacks ${JSON.stringify(n)}`);
    return true;
  });
}

/** Plans and reads the whole dump (refusals may come from either step). */
async function planAndRead(path: string, mode: LoadMode = 'full', expectedDim?: number): Promise<Collected> {
  return collect(await planDump(path, mode, { expectedDim }));
}

/** A v1.0 .npy file with a hand-written header dict. */
function rawNpy(dict: string, data: ArrayBufferView): Buffer {
  const body = Buffer.from(dict + ' '.repeat(63 - ((10 + dict.length) % 64)) + '\n', 'latin1');
  const head = Buffer.alloc(10);
  head.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  head.writeUInt16LE(body.length, 8);
  return Buffer.concat([head, body, new Uint8Array(data.buffer, data.byteOffset, data.byteLength)]);
}

function sample(n: number, dim: number, keyBase = 1n): { keys: BigUint64Array; values: Float32Array } {
  const keys = new BigUint64Array(n);
  const values = new Float32Array(n * dim);
  for (let i = 0; i < n; i++) {
    keys[i] = keyBase + BigInt(i) * 0x9e3779b97f4a7c15n;
    for (let j = 0; j < dim; j++) values[i * dim + j] = Math.fround(i * 0.5 - j / 3);
  }
  return { keys, values };
}

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

describe('chunking', () => {
  it('cuts 10 npy rows with chunkRows 3 into 3,3,3,1 with firstRow 0,3,6,9', async () => {
    const dir = fresh();
    const { keys, values } = sample(10, 3);
    const plan = await planDump(writePair(join(dir, 'c'), keys, values, 3), 'full');
    const got = await collect(plan, { chunkRows: 3 });
    assert.deepEqual(got.rowChunks.map((c) => c.n), [3, 3, 3, 1]);
    assert.deepEqual(got.rowChunks.map((c) => c.firstRow), [0, 3, 6, 9]);
    assert.ok(got.rowChunks.every((c) => c.file.endsWith('c.keys.npy')));
    assert.deepEqual(got.keys, Array.from(keys));
    assert.deepEqual(new Float32Array(got.values), values);
    // Every chunk owns its arrays, each aligned at offset 0.
    assert.ok(got.rowChunks.every((c) => c.keys.byteOffset === 0 && c.values.byteOffset === 0));
    assert.notEqual(got.rowChunks[0]!.values.buffer, got.rowChunks[1]!.values.buffer);
  });

  it('cuts text rows into chunks whose firstRow and rowNumbers are line numbers', async () => {
    const dir = fresh();
    const lines = ['# header'];
    for (let i = 0; i < 10; i++) lines.push(`${i + 1}\t${i},${-i}`);
    writeFileSync(join(dir, 't.txt'), lines.join('\n') + '\n');
    const got = await collect(await planDump(join(dir, 't.txt'), 'full'), { chunkRows: 3 });
    assert.deepEqual(got.rowChunks.map((c) => c.n), [3, 3, 3, 1]);
    assert.deepEqual(got.rowChunks.map((c) => c.firstRow), [2, 5, 8, 11]);
    assert.deepEqual(Array.from(got.rowChunks[1]!.rowNumbers!), [5, 6, 7]);
    assert.deepEqual(got.keys, Array.from({ length: 10 }, (_, i) => BigInt(i + 1)));
  });

  it('stops with KV_ABORTED when the signal aborts', async () => {
    const dir = fresh();
    const { keys, values } = sample(10, 2);
    const plan = await planDump(writePair(join(dir, 'a'), keys, values, 2), 'full');
    const ac = new AbortController();
    let chunks = 0;
    await assert.rejects(
      async () => {
        for await (const _item of readDump(plan, { chunkRows: 2, signal: ac.signal })) {
          chunks++;
          ac.abort();
        }
      },
      (err: unknown) => err instanceof KvError && err.code === 'KV_ABORTED',
    );
    assert.equal(chunks, 1);
  });

  it('refuses a bad chunkRows with KV_INVALID_ARGUMENT', async () => {
    const dir = fresh();
    const { keys, values } = sample(1, 2);
    const plan = await planDump(writePair(join(dir, 'a'), keys, values, 2), 'full');
    await assert.rejects(() => collect(plan, { chunkRows: 0 }), (err: unknown) => err instanceof KvError && err.code === 'KV_INVALID_ARGUMENT');
  });
});

describe('text', () => {
  it('reads comments, blank lines, CRLF and a BOM', async () => {
    const dir = fresh();
    const p = join(dir, 'emb.tsv');
    writeFileSync(
      p,
      '\ufeff# a comment line\r\n' +
        '\r\n' +
        '18446744073709551615\t1.5,-2,3e-3\r\n' +
        '   \n' +
        '7\t0.1, 0.2 ,0.3   # trailing comment, in UTF-8: ключ #2 ✓\n' +
        '000123\t-0,1E2,+4.25', // no final newline
    );
    const plan = await planDump(p, 'full');
    assert.equal(plan.dim, 3);
    assert.equal(plan.totalRows, -1);
    assert.equal(plan.parts[0]!.kind, 'text');
    const got = await collect(plan);
    assert.deepEqual(got.keys, [(1n << 64n) - 1n, 7n, 123n]);
    assert.deepEqual(got.values, [1.5, -2, Math.fround(3e-3), Math.fround(0.1), Math.fround(0.2), Math.fround(0.3), -0, 100, 4.25]);
    assert.deepEqual(Array.from(got.rowChunks[0]!.rowNumbers!), [3, 5, 6]);
  });

  it('reads a line longer than the read buffer', async () => {
    const p = join(fresh(), 'long.txt');
    writeFileSync(p, `1\t1,2 # ${'x'.repeat(3 << 20)}\n2\t3,4\n`);
    assert.deepEqual((await planAndRead(p)).values, [1, 2, 3, 4]);
  });

  it('streams a text file larger than one read block', async () => {
    const dir = fresh();
    const p = join(dir, 'big.txt');
    const lines: string[] = [];
    for (let i = 0; i < 60000; i++) lines.push(`${i}\t${i}.5,${i % 7},-${i}e-3`);
    writeFileSync(p, lines.join('\n') + '\n');
    const got = await collect(await planDump(p, 'full'), { chunkRows: 7000 });
    assert.equal(got.keys.length, 60000);
    assert.equal(got.keys[59999], 59999n);
    assert.equal(got.values[3 * 59999], 59999.5);
    assert.equal(got.rowChunks.at(-1)!.rowNumbers!.at(-1), 60000);
  });
});

describe('directories', () => {
  it('reads npy and text parts in name order, ignoring _SUCCESS and dot files', async () => {
    const dir = fresh();
    const a = sample(4, 2, 100n);
    writePair(join(dir, 'part-000'), a.keys, a.values, 2);
    writeFileSync(join(dir, 'part-001.txt'), '5\t1,2\n6\t3,4\n');
    const b = sample(3, 2, 200n);
    writePair(join(dir, 'part-002'), b.keys, b.values, 2, { version: 2 });
    writeFileSync(join(dir, 'part-003.tsv'), '# nothing but a comment\n');
    writeFileSync(join(dir, '_SUCCESS'), '');
    writeFileSync(join(dir, '.crc'), 'junk');
    const plan = await planDump(dir, 'full', { expectedDim: 2 });
    assert.deepEqual(plan.parts.map((p) => `${p.kind}:${p.name}`), ['npy:part-000', 'text:part-001.txt', 'npy:part-002', 'text:part-003.tsv']);
    assert.equal(plan.totalRows, -1);
    const got = await collect(plan);
    assert.deepEqual(got.keys, [...a.keys, 5n, 6n, ...b.keys]);
    assert.deepEqual(got.values, [...a.values, 1, 2, 3, 4, ...b.values]);
  });

  it('sums rows of an all-npy directory', async () => {
    const dir = fresh();
    writePair(join(dir, 'p0'), ...Object.values(sample(4, 2)) as [BigUint64Array, Float32Array], 2);
    writePair(join(dir, 'p1'), ...Object.values(sample(6, 2)) as [BigUint64Array, Float32Array], 2);
    const plan = await planDump(dir, 'full');
    assert.equal(plan.totalRows, 10);
    assert.equal(plan.dim, 2);
  });
});

describe('paths that are not regular files', () => {
  /** A pair whose values file is made by `make` instead of written. */
  function pairWithValues(make: (valuesPath: string) => void): { dir: string; prefix: string } {
    const dir = fresh();
    const prefix = join(dir, 'a');
    const { keys, values } = sample(3, 2);
    writePair(prefix, keys, values, 2);
    rmSync(`${prefix}.values.npy`);
    make(`${prefix}.values.npy`);
    return { dir, prefix };
  }

  it('names a self-referencing symlink and a two-link loop as a symbolic link loop', async () => {
    for (const make of [
      (p: string) => symlinkSync('a.values.npy', p),
      (p: string) => {
        symlinkSync('b.link', p);
        symlinkSync('a.values.npy', join(p, '..', 'b.link'));
      },
    ]) {
      const { dir, prefix } = pairWithValues(make);
      // The pair's prefix, its keys file, and the directory: each names the loop, not a missing file.
      for (const path of [prefix, `${prefix}.keys.npy`]) await refuses(() => planDump(path, 'full'), 'a.values.npy is a symbolic link loop (ELOOP)');
      await refuses(() => planDump(dir, 'full'), 'a.values.npy is a symbolic link loop (ELOOP)');
    }
  });

  it('names a dangling symlink as one, with its target', async () => {
    const { dir, prefix } = pairWithValues((p) => symlinkSync('gone.npy', p));
    await refuses(() => planDump(prefix, 'full'), 'a.values.npy is a dangling symbolic link (to gone.npy');
    await refuses(() => planDump(dir, 'full'), 'a.values.npy is a dangling symbolic link');
  });

  it('refuses a FIFO as a FIFO, without opening it (which would wait for a writer)', async () => {
    const { dir, prefix } = pairWithValues((p) => execFileSync('mkfifo', [p]));
    for (const path of [prefix, `${prefix}.keys.npy`, dir]) await refuses(() => planDump(path, 'full'), 'a.values.npy is a FIFO, not a regular file');
    const text = join(fresh(), 'rows.txt');
    execFileSync('mkfifo', [text]);
    await refuses(() => planDump(text, 'full'), 'rows.txt is a FIFO, not a regular file or directory');
  });
});

describe('deltas', () => {
  it('reads npy deletes, deletes-only parts and text key-alone lines in an incremental load', async () => {
    const dir = fresh();
    const a = sample(3, 2, 10n);
    writePair(join(dir, 'd0'), a.keys, a.values, 2);
    writeNpy(join(dir, 'd0.deletes.npy'), '<u8', [2], new BigUint64Array([77n, 78n]));
    writeNpy(join(dir, 'd1.deletes.npy'), '<i8', [1], new BigInt64Array([-1n]));
    writeFileSync(join(dir, 'd2.txt'), '90\n91\t\n92\t5,6\n93\t  # key alone with a comment\n');
    const plan = await planDump(dir, 'incremental');
    assert.equal(plan.dim, 2);
    assert.deepEqual(plan.parts.map((p) => [p.name, p.rows, p.deletes]), [['d0', 3, 2], ['d1', 0, 1], ['d2.txt', -1, -1]]);
    const got = await collect(plan);
    assert.deepEqual(got.keys, [...a.keys, 92n]);
    assert.deepEqual(got.deletes, [77n, 78n, (1n << 64n) - 1n, 90n, 91n, 93n]);
    assert.equal(got.deleteChunks[0]!.file, join(dir, 'd0.deletes.npy'));
    assert.deepEqual(Array.from(got.deleteChunks.at(-1)!.rowNumbers!), [1, 2, 4]);
  });

  it('plans a deletes-only delta (dim 0 without expectedDim)', async () => {
    const dir = fresh();
    writeFileSync(join(dir, 'gone.txt'), '1\n2\n');
    const plan = await planDump(dir, 'incremental');
    assert.equal(plan.dim, 0);
    assert.deepEqual((await collect(plan)).deletes, [1n, 2n]);
    assert.equal((await planDump(dir, 'incremental', { expectedDim: 8 })).dim, 8);
  });

  it('refuses deletes in a full load', async () => {
    const dir = fresh();
    const a = sample(3, 2);
    writePair(join(dir, 'd0'), a.keys, a.values, 2);
    writeNpy(join(dir, 'd0.deletes.npy'), '<u8', [1], new BigUint64Array([1n]));
    await refuses(() => planAndRead(dir, 'full'), 'd0.deletes.npy', 'incremental');
    const t = join(fresh(), 'f.txt');
    writeFileSync(t, '1\t1,2\n2\t3,4\n3\n');
    await refuses(() => planAndRead(t, 'full'), 'f.txt', 'line 3');
    writeFileSync(t, '# first\n3\t\n');
    await refuses(() => planDump(t, 'full'), 'f.txt', 'line 2');
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

describe('directory refusals', () => {
  it('refuses an unexpected file, naming it', async () => {
    const dir = fresh();
    const s = sample(2, 2);
    writePair(join(dir, 'p0'), s.keys, s.values, 2);
    writeFileSync(join(dir, 'notes.csv'), 'a,b\n');
    await refuses(() => planDump(dir, 'full'), 'notes.csv', 'unexpected file');
  });

  it('refuses a keys file without its values file and vice versa', async () => {
    const dir = fresh();
    writeNpy(join(dir, 'p0.keys.npy'), '<u8', [1], new BigUint64Array(1));
    await refuses(() => planDump(dir, 'full'), 'p0.keys.npy', 'p0.values.npy');
    await refuses(() => planDump(join(dir, 'p0.keys.npy'), 'full'), 'p0.keys.npy', 'p0.values.npy');
    const d2 = fresh();
    writeNpy(join(d2, 'p0.values.npy'), '<f4', [1, 1], new Float32Array(1));
    await refuses(() => planDump(d2, 'incremental'), 'p0.values.npy', 'p0.keys.npy');
  });

  it('refuses an empty directory, one with only markers, and subdirectories', async () => {
    const dir = fresh();
    await refuses(() => planDump(dir, 'full'), dir, 'no data parts');
    writeFileSync(join(dir, '_SUCCESS'), '');
    await refuses(() => planDump(dir, 'full'), dir, 'no data parts');
    mkdirSync(join(dir, 'nested'));
    await refuses(() => planDump(dir, 'full'), 'nested', 'subdirectories');
  });

  it('refuses a missing path with KV_INVALID_ARGUMENT', async () => {
    await assert.rejects(
      () => planDump(join(root, 'does-not-exist'), 'full'),
      (err: unknown) => err instanceof KvError && err.code === 'KV_INVALID_ARGUMENT' && err.message.includes('does-not-exist'),
    );
  });
});

describe('text refusals', () => {
  const cases: [string, string, string[]][] = [
    ['non-decimal key', '1\t1,2\nabc\t1,2\n', ['line 2', 'bad key "abc"']],
    ['hex key', '0x10\t1,2\n', ['line 1', 'bad key']],
    ['negative key', '1\t1,2\n\n-5\t1,2\n', ['line 3', 'negative']],
    ['key of 2^64', '18446744073709551616\t1,2\n', ['line 1', 'out of range']],
    ['space instead of tab', '1 1,2\n', ['line 1', 'bad key']],
    ['non-ASCII key', '1\t1,2\nключ\t1,2\n', ['line 2', 'bad key "ключ"']],
    ['too many values', '1\t1,2\n2\t1,2,3,4\n', ['line 2', '4 values; expected 2', 'first data line']],
    ['too few values', '1\t1,2\n# c\n2\t1\n', ['line 3', '1 values', 'expected 2']],
    ['not a number', '1\t1,abc\n', ['line 1', 'value 2', 'not a number']],
    ['hex value', '1\t1,0x1f\n', ['line 1', 'not a number']],
    ['two dots', '1\t1,1.2.3\n', ['line 1', 'not a number']],
    ['empty value', '1\t1,,2\n', ['line 1', 'value 2 is empty']],
    ['trailing comma', '1\t1,2,\n', ['line 1', 'value 3 is empty']],
    ['nan', '1\t1,2\n2\tnan,2\n', ['line 2', 'value 1 is NaN']],
    ['NaN', '1\t1,NaN\n', ['line 1', 'NaN']],
    ['inf', '1\t1,2\n2\t1,inf\n', ['line 2', 'value 2 is Inf']],
    ['-Infinity', '1\t-Infinity,2\n', ['line 1', '-Inf']],
    ['float32 overflow', '1\t1,2\n2\t1e39,2\n', ['line 2', 'overflows float32']],
  ];
  for (const [name, text, needles] of cases) {
    it(`refuses ${name}`, async () => {
      const p = join(fresh(), 'bad.txt');
      writeFileSync(p, text);
      await refuses(() => planAndRead(p, 'full'), 'bad.txt', ...needles);
    });
  }

  it('refuses a value count that differs from the expected dim', async () => {
    const p = join(fresh(), 'bad.txt');
    writeFileSync(p, '1\t1,2,3\n');
    await refuses(() => planDump(p, 'full', { expectedDim: 4 }), 'bad.txt', 'line 1', '3 values; expected 4', 'expected dim');
  });
});
