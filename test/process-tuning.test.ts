import assert from 'node:assert/strict';
import { setImmediate as nextTask } from 'node:timers/promises';
import { test } from 'node:test';
import { YoungGcBudget } from '../src/common/process-tuning.js';

test('YoungGcBudget starts a minor GC each time the budget is spent, and counts them', () => {
  const calls: string[] = [];
  const b = new YoungGcBudget(1000, (o) => calls.push(o.type));
  b.spend(400);
  b.spend(599);
  assert.deepEqual(calls, []);
  b.spend(1);
  assert.deepEqual(calls, ['minor']);
  b.spend(5000);
  b.spend(999);
  assert.deepEqual(calls, ['minor', 'minor']);
  assert.equal(b.runs, 2);
});

test('YoungGcBudget uses V8\'s own collector: young ArrayBuffers made before the budget is spent are freed', async () => {
  const b = new YoungGcBudget(1);
  let garbage: Uint8Array[] | undefined = Array.from({ length: 64 }, () => new Uint8Array(1 << 18));
  const before = process.memoryUsage().arrayBuffers;
  assert.ok(garbage.length === 64 && before >= 16 * 2 ** 20, `16 MB of ArrayBuffers held (${before})`);
  garbage = undefined;
  await nextTask();
  b.spend(1);
  assert.equal(b.runs, 1);
  // Their memory is released by the sweeper that follows the GC, on a helper thread unless V8 runs
  // single-threaded (as replicas do).
  const until = Date.now() + 5000;
  while (process.memoryUsage().arrayBuffers > before - 8 * 2 ** 20 && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
  assert.ok(process.memoryUsage().arrayBuffers <= before - 8 * 2 ** 20, `arrayBuffers ${process.memoryUsage().arrayBuffers} of ${before}`);
});
