/**
 * The Redis phase's client: run by bench/redis.ts as a process of its own, so that Redis's clients
 * are timed in a process that holds nothing but them and the requests (not the model, the SDK, or
 * what the embkv phase left in the heap). It reads its job as JSON from argv[2], times every client
 * on the same requests side by side (timeInterleaved), and writes the figures as JSON to stdout.
 */
import { timeInterleaved, type RequestFigures, type Series } from './measure.js';
import type { Answer } from './model.js';
import { openClient, type MgetClient, type RedisClientSpec } from './redis-clients.js';
import { RequestFile, checkStoredAnswer, type StoredRequest } from './request-file.js';

export interface ReaderJob {
  port: number;
  requestsPath: string;
  batch: number;
  dim: number;
  warmup: number;
  requests: number;
  /** MGETs per request, over consecutive slices of its keys, sent together. */
  concurrency: number;
  clients: RedisClientSpec[];
  reuseOutput: boolean;
}

export interface ReaderVariant {
  label: string;
  spec: RedisClientSpec;
  figures: RequestFigures;
}

/**
 * One request through one client: `concurrency` MGETs over consecutive slices of the keys, sent
 * together; each reply copied into one Float32Array in request order (absent keys are zeros, found
 * 0). With `reuse`, into those arrays (absent rows are then zeroed), as embkv's `out` option does.
 */
async function lookup(
  client: MgetClient, keys: BigUint64Array, dim: number, concurrency: number, reuse?: { values: Float32Array; found: Uint8Array },
): Promise<Answer> {
  const n = keys.length;
  const rowBytes = dim * 4;
  const keyBuf = Buffer.from(keys.buffer, keys.byteOffset, keys.byteLength);
  const values = reuse === undefined ? new Float32Array(n * dim) : reuse.values.subarray(0, n * dim);
  const out = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const found = reuse === undefined ? new Uint8Array(n) : reuse.found.subarray(0, n).fill(0);
  const per = Math.ceil(n / concurrency);
  const calls: Promise<void>[] = [];
  for (let from = 0, k = 0; from < n; from += per, k++) {
    const to = Math.min(n, from + per);
    const args: Buffer[] = new Array<Buffer>(to - from);
    for (let i = from; i < to; i++) args[i - from] = keyBuf.subarray(i * 8, i * 8 + 8);
    calls.push(
      client.mget(k, args).then((replies) => {
        for (let j = 0; j < replies.length; j++) {
          const v = replies[j];
          if (v === null || v === undefined) {
            if (reuse !== undefined) out.fill(0, (from + j) * rowBytes, (from + j + 1) * rowBytes);
            continue;
          }
          if (v.length !== rowBytes) throw new Error(`redis answered ${v.length} bytes for a key, expected ${rowBytes}`);
          out.set(v, (from + j) * rowBytes);
          found[from + j] = 1;
        }
      }),
    );
  }
  await Promise.all(calls);
  return { values, found, dim };
}

async function main(job: ReaderJob): Promise<ReaderVariant[]> {
  const file = new RequestFile(job.requestsPath, job.batch, job.dim, job.warmup + job.requests);
  const clients: MgetClient[] = [];
  try {
    for (const spec of job.clients) clients.push(await openClient(spec, job.port));
    let req: StoredRequest | undefined;
    const series: Series<Answer>[] = clients.map((c) => {
      const reuse = job.reuseOutput ? { values: new Float32Array(job.batch * job.dim), found: new Uint8Array(job.batch) } : undefined;
      return {
        call: () => lookup(c, req!.keys, job.dim, job.concurrency, reuse),
        check: (a, r) => checkStoredAnswer(`redis (${c.label}) request ${r}`, a, req!, r),
      };
    });
    const figures = await timeInterleaved<Answer>({ warmup: job.warmup, requests: job.requests, prepare: (r) => (req = file.request(r)), series });
    return clients.map((c, i) => ({ label: c.label, spec: job.clients[i]!, figures: figures[i]! }));
  } finally {
    await Promise.allSettled(clients.map((c) => c.close()));
  }
}

main(JSON.parse(process.argv[2]!) as ReaderJob).then(
  (variants) => {
    process.stdout.write(JSON.stringify(variants));
    process.exit(0);
  },
  (err: unknown) => {
    process.stderr.write(`redis reader: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
