import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { planDump } from '../src/loader/sources.js';
import { caseDirs, collect, planAndRead, refuses } from './helpers/dump.js';

const fresh = caseDirs('embkv-text-');

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
