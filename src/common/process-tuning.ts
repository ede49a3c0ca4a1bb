import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/**
 * Runtime settings for processes that move tens of megabytes per request (replicas, the router, and a
 * ranking service using the SDK): V8's GC threading and glibc's malloc.
 */

/**
 * Node flags `kvctl cluster up` starts replicas with. `cluster up` puts many replicas on few cores,
 * and each V8 runs its own concurrent and parallel GC helper threads, which there only compete with
 * the other replicas for the same cores. With one GC thread per process, the replicas' CPU per
 * 150k-key request (8 groups on 2 cores) fell from 118-126 ms to 92-93 ms, and the client's p50
 * from 91-110 ms to 71-82 ms (bench/RESULTS.md). On a host with cores to spare for one replica,
 * V8's default parallel GC keeps pauses shorter: leave it on there.
 *
 * And a young generation of two 2 MB semi-spaces. V8 grows them to 8 MB each while a replica loads
 * its modules, and shrinks them again only once the process has been idle for a while: a replica
 * loaded and asked at once kept ~16 MB of young generation resident. A replica's own garbage per
 * call is small (its answers come from pooled buffers), so the smaller space costs no measurable
 * CPU: 8 replicas holding 2M keys, after 40 requests, rss 880-885 MB against 918-921 MB, replicas'
 * CPU 68-75 against 68-71 ms a request, within the noise (bench/RESULTS.md).
 */
export const REPLICA_NODE_FLAGS: readonly string[] = ['--single-threaded-gc', '--max-semi-space-size=2'];

/*
 * glibc malloc settings.
 *
 * Every lookup allocates megabyte-sized buffers (grpc-js reassembles each received message into a
 * fresh buffer; a client allocates its result; replicas reuse their answer buffers, see
 * installZeroCopyFraming). glibc's defaults serve these from mmap at first,
 * then from the heap with a dynamic threshold that trims the heap top once 2x the largest freed chunk
 * is free. With a 19 MB answer, the heap is trimmed and grown again most requests, and every page
 * grown back is a fresh page fault. On the VMs measured, a fresh page costs ~10-15 us, more than the
 * lookup that fills it (see bench/RESULTS.md). A fixed mmap threshold of 32 MiB serves these buffers
 * from the heap; the trim threshold says how much freed heap a process keeps for reuse.
 *
 * These settings take effect only at process start, from the environment.
 */

/**
 * For replicas, which `kvctl cluster up` starts with these unless the environment sets them already.
 * Measured at 2M keys x 8 groups (2.4 MB answers). While grpc-js copied every answer into a frame of
 * its own, a 16 MiB trim threshold cost ~1,900 page faults per request across the replicas (32 MiB:
 * 162; glibc's defaults ~3,000). With answers sent from their pooled buffers (zero-copy framing) that
 * churn is gone: 16 MiB gave 113-145 faults per request against 153-176 at 32 MiB, and no more rss.
 * Two arenas instead of one per thread (LevelDB's and libuv's threads each got their own) keep the
 * load's freed buffers from staying resident in arenas that lookups never reuse.
 */
export const REPLICA_MALLOC_ENV: Readonly<Record<string, string>> = {
  MALLOC_MMAP_THRESHOLD_: String(32 * 2 ** 20),
  MALLOC_TRIM_THRESHOLD_: String(16 * 2 ** 20),
  MALLOC_ARENA_MAX: '2',
};

/**
 * For a process that runs the SDK (recommended in the README; the bench runs with it): a 150k-key
 * request at dim 32 allocates ~40 MB (the answers and the result), so 64 MiB of kept heap recycles it.
 */
export const CLIENT_MALLOC_ENV: Readonly<Record<string, string>> = {
  MALLOC_MMAP_THRESHOLD_: String(32 * 2 ** 20),
  MALLOC_TRIM_THRESHOLD_: String(64 * 2 ** 20),
};

/** `env` with `settings` added where `env` does not set those variables itself. */
export function withMallocEnv(settings: Readonly<Record<string, string>>, env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  return { ...settings, ...env };
}

/** Whether `env` sets every variable of `settings` (to any value). */
export function mallocEnvSet(settings: Readonly<Record<string, string>>, env: NodeJS.ProcessEnv = process.env): boolean {
  return Object.keys(settings).every((k) => env[k] !== undefined);
}

/** `settings` as the shell would set them, with the values `env` overrides. */
export function describeMallocEnv(settings: Readonly<Record<string, string>>, env: NodeJS.ProcessEnv = process.env): string {
  return Object.entries(settings).map(([k, v]) => `${k}=${env[k] ?? v}`).join(' ');
}

/**
 * Collects young garbage by a budget of bytes. Every lookup a replica answers leaves about twice its
 * request's bytes as external garbage (grpc-js's reassembled message, HTTP/2 read buffers) that only a
 * GC frees, and V8 starts a GC for external memory only after tens of megabytes: until then each
 * request takes fresh heap, a page fault per 4 KiB. After a staged load (which, unlike a load over
 * gRPC, leaves no freed heap behind) that was ~600 faults a request across 8 replicas for the first
 * ~100 requests, and the heaps kept ~12 MB each for it. A minor GC (about a millisecond for a
 * replica's young generation) every `budget` bytes keeps that garbage small (bench/RESULTS.md).
 *
 * `collect` defaults to V8's own, exposed at run time; without it (a runtime that refuses the flag)
 * `spend` does nothing.
 */
export class YoungGcBudget {
  private spent = 0;
  /** Minor GCs started. */
  runs = 0;
  private readonly collect: ((options: { type: 'minor' }) => void) | undefined;

  constructor(readonly budget: number, collect?: (options: { type: 'minor' }) => void) {
    this.collect = collect ?? exposedGc();
  }

  /** Counts `bytes` of garbage made; starts a minor GC once the budget is spent. */
  spend(bytes: number): void {
    if (this.collect === undefined) return;
    this.spent += bytes;
    if (this.spent < this.budget) return;
    this.spent = 0;
    this.runs++;
    this.collect({ type: 'minor' });
  }
}

function exposedGc(): ((options: { type: 'minor' }) => void) | undefined {
  try {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as unknown;
    return typeof gc === 'function' ? (gc as (options: { type: 'minor' }) => void) : undefined;
  } catch {
    return undefined;
  }
}
