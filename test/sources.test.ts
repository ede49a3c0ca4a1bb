import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { KvError } from '../src/common/errors.js';
import { planDump, readDump } from '../src/loader/sources.js';
import { caseDirs, collect, planAndRead, refuses, sample } from './helpers/dump.js';
import { writeNpy, writePair } from './helpers/npy.js';

const fresh = caseDirs('embkv-sources-');

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

  it('a directory with a Hadoop marker (_temporary, _started_*) loads only with _SUCCESS; one without markers loads as ever', async () => {
    const { keys, values } = sample(4, 2);
    const plain = fresh();
    writePair(join(plain, 'p'), keys, values, 2);
    assert.equal((await planDump(plain, 'full')).totalRows, 4);
    for (const marker of ['_temporary', '_started_123', '_committed_123']) {
      const dir = fresh();
      writePair(join(dir, 'p'), keys, values, 2);
      if (marker === '_temporary') mkdirSync(join(dir, marker));
      else writeFileSync(join(dir, marker), '');
      await refuses(() => planDump(dir, 'full'), join(dir, '_SUCCESS'), 'is missing', 'requireSuccessMarker: false');
      assert.equal((await planDump(dir, 'full', { requireSuccessMarker: false })).totalRows, 4);
      writeFileSync(join(dir, '_SUCCESS'), '');
      assert.equal((await planDump(dir, 'full')).totalRows, 4);
    }
  });

  it('refuses a missing path with KV_INVALID_ARGUMENT', async () => {
    await assert.rejects(
      () => planDump(join(fresh(), 'does-not-exist'), 'full'),
      (err: unknown) => err instanceof KvError && err.code === 'KV_INVALID_ARGUMENT' && err.message.includes('does-not-exist'),
    );
  });
});

