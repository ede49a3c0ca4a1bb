/**
 * glibc malloc settings for processes that move tens of megabytes per request (replicas, the router,
 * a ranking service using the SDK).
 *
 * Every lookup allocates megabyte-sized buffers (grpc-js frames each answer in a fresh buffer, and
 * reassembles each received message into another). glibc's defaults serve these from mmap at first,
 * then from the heap with a dynamic threshold that trims the heap top once 2x the largest freed chunk
 * is free: with a 19 MB answer the heap is trimmed and grown again most requests, and every page
 * grown back is a fresh page fault. On the VMs measured a fresh page costs ~10-15 us, more than the
 * lookup that fills it (see bench/RESULTS.md). These two settings keep up to 64 MiB of freed heap per
 * process for reuse instead.
 *
 * They only take effect at process start, from the environment. `kvctl cluster up` sets them for
 * the processes it starts, unless the environment sets them already.
 */
export const MALLOC_ENV: Readonly<Record<string, string>> = {
  MALLOC_MMAP_THRESHOLD_: String(32 * 2 ** 20),
  MALLOC_TRIM_THRESHOLD_: String(64 * 2 ** 20),
};

/** `env` with MALLOC_ENV added where `env` does not set those variables itself. */
export function withMallocEnv(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  return { ...MALLOC_ENV, ...env };
}

/** Whether this process started with every MALLOC_ENV variable set (to any value). */
export function mallocEnvSet(env: NodeJS.ProcessEnv = process.env): boolean {
  return Object.keys(MALLOC_ENV).every((k) => env[k] !== undefined);
}
