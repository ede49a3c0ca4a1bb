/** Shared by the dump reader tests (sources, npy, text): temp dirs, reading a dump whole, refusals. */
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvError } from '../../src/common/errors.js';
import { planDump, readDump, type DeleteChunk, type DumpPlan, type LoadMode, type RowChunk } from '../../src/loader/sources.js';

/** A temp root for the calling test file (removed after it); returns a function giving a fresh directory per case. */
export function caseDirs(prefix: string): () => string {
  let root = '';
  let seq = 0;
  before(() => {
    root = mkdtempSync(join(tmpdir(), prefix));
  });
  after(() => {
    rmSync(root, { recursive: true, force: true });
  });
  return () => {
    const d = join(root, `case-${seq++}`);
    mkdirSync(d);
    return d;
  };
}

export interface Collected {
  rowChunks: RowChunk[];
  deleteChunks: DeleteChunk[];
  keys: bigint[];
  values: number[];
  deletes: bigint[];
}

function keysOf(packed: Uint32Array): bigint[] {
  return Array.from(new BigUint64Array(packed.buffer, packed.byteOffset, packed.length / 2));
}

export async function collect(plan: DumpPlan, options?: { chunkRows?: number; signal?: AbortSignal }): Promise<Collected> {
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
export async function refuses(work: () => Promise<unknown>, ...needles: string[]): Promise<void> {
  await assert.rejects(work, (err: unknown) => {
    assert.ok(err instanceof KvError, `not a KvError: ${String(err)}`);
    assert.equal(err.code, 'KV_INVALID_DATA', err.message);
    for (const n of needles) assert.ok(err.message.includes(n), `message ${JSON.stringify(err.message)} lacks ${JSON.stringify(n)}`);
    return true;
  });
}

/** Plans and reads the whole dump (refusals may come from either step). */
export async function planAndRead(path: string, mode: LoadMode = 'full', expectedDim?: number): Promise<Collected> {
  return collect(await planDump(path, mode, { expectedDim }));
}

/** A v1.0 .npy file with a hand-written header dict. */
export function rawNpy(dict: string, data: ArrayBufferView): Buffer {
  const body = Buffer.from(dict + ' '.repeat(63 - ((10 + dict.length) % 64)) + '\n', 'latin1');
  const head = Buffer.alloc(10);
  head.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  head.writeUInt16LE(body.length, 8);
  return Buffer.concat([head, body, new Uint8Array(data.buffer, data.byteOffset, data.byteLength)]);
}

export function sample(n: number, dim: number, keyBase = 1n): { keys: BigUint64Array; values: Float32Array } {
  const keys = new BigUint64Array(n);
  const values = new Float32Array(n * dim);
  for (let i = 0; i < n; i++) {
    keys[i] = keyBase + BigInt(i) * 0x9e3779b97f4a7c15n;
    for (let j = 0; j < dim; j++) values[i * dim + j] = Math.fround(i * 0.5 - j / 3);
  }
  return { keys, values };
}
