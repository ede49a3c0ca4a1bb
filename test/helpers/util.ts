import assert from 'node:assert/strict';
import { KvError } from '../../src/common/errors.js';

/** Deterministic PRNG (mulberry32) so a failure reproduces. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/** The KvError code a promise rejects with, or 'resolved'. */
export async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (err) {
    assert.ok(err instanceof KvError, `not a KvError: ${err}`);
    return err.code;
  }
}

/** Whether a process of this pid is running (signal 0 reaches it). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Polls `fn` until it returns a value (not undefined), every `everyMs`: a wait on observable state
 * (a replica's answer, a Status field), never on a fixed time. `timeoutMs` bounds a broken test only.
 */
export async function until<T>(what: string, fn: () => Promise<T | undefined>, opts: { timeoutMs?: number; everyMs?: number } = {}): Promise<T> {
  const end = Date.now() + (opts.timeoutMs ?? 60_000);
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, opts.everyMs ?? 20));
  }
}
