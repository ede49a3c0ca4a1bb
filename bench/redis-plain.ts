/**
 * A plain check of the bench's Redis figures, sharing none of its timing code: one process, one
 * client, its own redis-server, the bench's model and requests (bench/model.ts, same seed), timed
 * with a bare loop. `node dist/bench/redis-plain.js --client ioredis5 --connections 1` prints the
 * p50 that `npm run bench -- --redis` should come within 1.25x of for the same client in the same
 * hour (bench/README.md, "Checking the peer").
 *
 *   --keys N (2M)  --dim D (32)  --batch B (150k)  --requests K (30)  --warmup W (3)
 *   --concurrency C (8 MGETs a request)  --client ioredis5|ioredis6|node-redis5  --connections N (1)
 *   --seed S (1)  --absent F (0.01)
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fillRequest, makeModel, requestBuffer, type RequestBuffer } from './model.js';

const { values: a } = parseArgs({
  options: {
    keys: { type: 'string', default: '2000000' },
    dim: { type: 'string', default: '32' },
    batch: { type: 'string', default: '150000' },
    requests: { type: 'string', default: '30' },
    warmup: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '8' },
    client: { type: 'string', default: 'ioredis5' },
    connections: { type: 'string', default: '1' },
    seed: { type: 'string', default: '1' },
    absent: { type: 'string', default: '0.01' },
  },
});
const count = (s: string): number => Number(s.replace(/_/g, '').replace(/k$/i, 'e3').replace(/M$/, 'e6'));
const N = count(a.keys!), DIM = count(a.dim!), BATCH = count(a.batch!), REQUESTS = count(a.requests!), WARMUP = count(a.warmup!);
const C = count(a.concurrency!), CONNS = count(a.connections!), SEED = count(a.seed!), ABSENT = Number(a.absent);
const CLIENT = a.client!;
if (!['ioredis5', 'ioredis6', 'node-redis5'].includes(CLIENT)) throw new Error(`--client: ioredis5, ioredis6 or node-redis5, not ${CLIENT}`);

type Mget = (i: number, keys: Buffer[]) => Promise<(Buffer | null)[]>;

const dir = mkdtempSync(join(tmpdir(), 'embkv-bench-plain-'));
const port = await new Promise<number>((resolve) => {
  const s = createServer().listen(0, '127.0.0.1', () => {
    const p = (s.address() as { port: number }).port;
    s.close(() => resolve(p));
  });
});
const server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' });
const serverExited = new Promise<void>((resolve) => server.once('exit', () => resolve()));
// Stops the server and waits for it (so that it is reaped, not left a zombie), removes the dir.
const finish = async (code: number): Promise<never> => {
  server.kill('SIGKILL');
  await serverExited;
  rmSync(dir, { recursive: true, force: true });
  process.exit(code);
};
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => void finish(1));

try {
  // The model is needed to load Redis and to build the requests, then dropped: only the requests stay.
  let model: ReturnType<typeof makeModel> | undefined = makeModel(N, DIM, SEED);
  const requests: RequestBuffer[] = [];
  for (let r = 0; r < WARMUP + REQUESTS; r++) {
    const req = requestBuffer(BATCH);
    fillRequest(req, model, r, ABSENT);
    requests.push(req);
  }
  // A few vectors per request to check the answers by.
  const samples = requests.map((req) => [0, 1, 2, 3].map((k) => Math.floor((k * req.rows.length) / 4)).filter((i) => req.rows[i]! >= 0)
    .map((i) => ({ i, bits: new Uint32Array(model!.values.buffer, req.rows[i]! * DIM * 4, DIM).slice() })));

  // The load goes through ioredis 6 (the project's own devDependency), whatever the client timed.
  const { Redis } = await import('ioredis');
  const loader = new Redis({ host: '127.0.0.1', port, lazyConnect: true, retryStrategy: (n) => (n > 50 ? null : 100) });
  for (let tries = 0; ; tries++) {
    try {
      await loader.connect();
      break;
    } catch (err) {
      if (tries > 50) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const keyBuf = Buffer.from(model.keys.buffer);
  const valBuf = Buffer.from(model.values.buffer);
  const inflight = new Set<Promise<unknown>>();
  for (let from = 0; from < N; from += 1000) {
    const args: Buffer[] = [];
    for (let i = from; i < Math.min(N, from + 1000); i++) args.push(keyBuf.subarray(i * 8, i * 8 + 8), valBuf.subarray(i * DIM * 4, (i + 1) * DIM * 4));
    const p: Promise<unknown> = loader.mset(...args).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= 16) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  if ((await loader.dbsize()) !== N) throw new Error('redis did not take every key');
  loader.disconnect();
  model = undefined;

  let mget: Mget;
  let close: () => Promise<unknown>;
  if (CLIENT === 'node-redis5') {
    const { createClient, RESP_TYPES } = await import('redis5');
    const raw = Array.from({ length: CONNS }, () => createClient({ socket: { host: '127.0.0.1', port } }));
    await Promise.all(raw.map((c) => c.connect()));
    const cs = raw.map((c) => c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }));
    mget = (i, keys) => cs[i % CONNS]!.mGet(keys) as Promise<(Buffer | null)[]>;
    close = () => Promise.all(raw.map((c) => c.close()));
  } else {
    const R = CLIENT === 'ioredis5' ? ((await import('ioredis5')).Redis as unknown as typeof Redis) : Redis;
    const cs = Array.from({ length: CONNS }, () => new R({ host: '127.0.0.1', port }));
    await Promise.all(cs.map((c) => c.ping()));
    mget = (i, keys) => cs[i % CONNS]!.mgetBuffer(keys);
    close = async () => cs.forEach((c) => c.disconnect());
  }

  const latencies: number[] = [];
  let cpuMicros = 0;
  for (let r = 0; r < WARMUP + REQUESTS; r++) {
    const req = requests[r]!;
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    // The request: C MGETs over consecutive slices, sent together, rows placed in request order.
    const n = req.keys.length;
    const kb = Buffer.from(req.keys.buffer);
    const values = new Float32Array(n * DIM);
    const out = new Uint8Array(values.buffer);
    const found = new Uint8Array(n);
    const per = Math.ceil(n / C);
    const calls: Promise<void>[] = [];
    for (let from = 0, k = 0; from < n; from += per, k++) {
      const args: Buffer[] = [];
      for (let i = from; i < Math.min(n, from + per); i++) args.push(kb.subarray(i * 8, i * 8 + 8));
      calls.push(mget(k, args).then((replies) => {
        for (let j = 0; j < replies.length; j++) {
          const v = replies[j];
          if (v == null) continue;
          out.set(v, (from + j) * DIM * 4);
          found[from + j] = 1;
        }
      }));
    }
    await Promise.all(calls);
    const ms = performance.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    if (r >= WARMUP) {
      latencies.push(ms);
      cpuMicros += cpu.user + cpu.system;
    }
    for (let i = 0; i < n; i++) if (found[i] !== (req.rows[i]! >= 0 ? 1 : 0)) throw new Error(`request ${r} position ${i}: found ${found[i]}`);
    const got = new Uint32Array(values.buffer);
    for (const s of samples[r]!) for (let j = 0; j < DIM; j++) if (got[s.i * DIM + j] !== s.bits[j]) throw new Error(`request ${r} position ${s.i}: wrong vector`);
  }
  await close();
  latencies.sort((x, y) => x - y);
  const pct = (p: number): number => latencies[Math.min(latencies.length - 1, Math.ceil((p / 100) * latencies.length) - 1)]!;
  process.stdout.write(`redis-plain ${CLIENT} x${CONNS}, ${N} keys dim ${DIM}, ${REQUESTS} requests of ${BATCH} keys as ${C} MGETs: ` +
    `p50 ${pct(50).toFixed(1)} / p90 ${pct(90).toFixed(1)} / max ${pct(100).toFixed(1)} ms, client CPU ${(cpuMicros / 1000 / REQUESTS).toFixed(1)} ms/req\n`);
  await finish(0);
} catch (err) {
  process.stderr.write(`redis-plain: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  await finish(1);
}
