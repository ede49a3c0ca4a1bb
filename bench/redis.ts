import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, createWriteStream, readFileSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { delimiter, join } from 'node:path';
import type { Redis } from 'ioredis';
import { timeRequests, type RequestFigures } from './measure.js';
import { fillRequest, requestBuffer, verifyAnswer, type Answer, type Model } from './model.js';
import { freePorts, type Resources } from './resources.js';

export const REDIS_INSTALL_HINT = 'apt-get install -y redis-server';

export interface RedisConfig {
  requests: number;
  warmup: number;
  batch: number;
  absent: number;
  /** Concurrent MGETs a request is split into. */
  concurrency: number;
  /** Pairs per MSET while loading. */
  loadBatch: number;
  /** --reuse-output: every request is assembled into the same arrays, as embkv's are then. */
  reuseOutput?: boolean;
}

export interface RedisFigures extends RequestFigures {
  version: string;
  loadMs: number;
  loadKeysPerSec: number;
  usedMemoryBytes: number;
  rssBytes: number;
  usedBytesPerKey: number;
  rssBytesPerKey: number;
}

const say = (line: string): void => void process.stderr.write(`${line}\n`);

/** The redis-server binary on PATH (or /usr/bin), or undefined. */
export function findRedisServer(): string | undefined {
  const dirs = [...(process.env['PATH'] ?? '').split(delimiter), '/usr/bin', '/usr/local/bin'];
  for (const d of dirs) {
    if (d === '') continue;
    const p = join(d, 'redis-server');
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

/**
 * The peer a user would otherwise pick: one redis-server (no persistence) holding the same pairs as
 * 8-byte little-endian key strings -> dim*4-byte value strings, loaded with pipelined MSETs and read
 * with concurrent MGETs whose answers are placed into one Float32Array in request order.
 */
export async function runRedis(cfg: RedisConfig, model: Model, res: Resources): Promise<RedisFigures> {
  const bin = findRedisServer();
  if (bin === undefined) throw new Error(`redis-server is not installed; install it with: ${REDIS_INSTALL_HINT}`);
  const dir = res.tempDir('redis');
  const [port] = await freePorts(1);
  const proc: ChildProcess = spawn(
    bin,
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--protected-mode', 'no', '--daemonize', 'no'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  res.addProcess(proc);
  const log = createWriteStream(join(dir, 'redis.log'));
  proc.stdout!.pipe(log, { end: false });
  proc.stderr!.pipe(log, { end: false });
  let exited: string | undefined;
  proc.once('exit', (code, signal) => void (exited = signal ?? `code ${code}`));
  const spawnError = new Promise<never>((_, reject) => proc.once('error', (err) => reject(new Error(`cannot start ${bin}: ${err.message}`))));
  void spawnError.catch(() => undefined);

  // Imported here, not at the top: the embkv requests run first in this process, which should hold
  // only what a ranking service using the SDK would.
  const { Redis } = await import('ioredis');
  const redis = new Redis({ host: '127.0.0.1', port: port!, lazyConnect: true, enableAutoPipelining: false, maxRetriesPerRequest: 0, retryStrategy: () => null });
  redis.on('error', () => undefined); // connection errors surface through the commands
  try {
    await Promise.race([spawnError, connect(redis, port!, () => exited, join(dir, 'redis.log'))]);
    const version = /redis_version:(\S+)/.exec(await redis.info('server'))?.[1] ?? '?';
    say(`  redis-server ${version} up on 127.0.0.1:${port} (no persistence)`);

    const loadMs = await loadPairs(redis, model, cfg.loadBatch);
    const loadKeysPerSec = model.n / (loadMs / 1000);
    const dbsize = await redis.dbsize();
    if (dbsize !== model.n) throw new Error(`redis holds ${dbsize} keys after the load, expected ${model.n}`);
    say(`  redis loaded ${model.n.toLocaleString('en-US')} keys in ${(loadMs / 1000).toFixed(2)} s: ${Math.round(loadKeysPerSec).toLocaleString('en-US')} keys/s`);

    const req = requestBuffer(cfg.batch);
    const reuse = cfg.reuseOutput === true ? { values: new Float32Array(cfg.batch * model.dim), found: new Uint8Array(cfg.batch) } : undefined;
    const figures = await timeRequests<Answer>({
      warmup: cfg.warmup,
      requests: cfg.requests,
      prepare: (r) => fillRequest(req, model, r, cfg.absent),
      call: () => lookup(redis, req.keys, model.dim, cfg.concurrency, reuse),
      check: (a, r) => verifyAnswer(`redis request ${r}`, a, req, model, r),
    });

    const mem = await redis.info('memory');
    const usedMemoryBytes = Number(/used_memory:(\d+)/.exec(mem)?.[1] ?? NaN);
    const rssBytes = rssOf(proc.pid) ?? Number(/used_memory_rss:(\d+)/.exec(mem)?.[1] ?? NaN);
    return {
      ...figures,
      version,
      loadMs,
      loadKeysPerSec,
      usedMemoryBytes,
      rssBytes,
      usedBytesPerKey: usedMemoryBytes / model.n,
      rssBytesPerKey: rssBytes / model.n,
    };
  } finally {
    redis.disconnect();
    await stop(proc);
    log.end();
    res.removeDir(dir);
  }
}

/** Waits until redis-server accepts TCP connections (ioredis would retry forever), then connects. */
async function connect(redis: Redis, port: number, exited: () => string | undefined, logPath: string): Promise<void> {
  const until = Date.now() + 15_000;
  for (;;) {
    const err = await tryTcp(port);
    if (err === undefined) break;
    const gone = exited();
    if (gone !== undefined || Date.now() > until) {
      let tail = '';
      try {
        tail = readFileSync(logPath, 'utf8').split('\n').slice(-10).join('\n');
      } catch {
        // no log
      }
      throw new Error(`redis-server did not come up (${gone !== undefined ? `exited: ${gone}` : err.message})${tail ? `\n${tail}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  await redis.connect();
  await redis.ping();
}

function tryTcp(port: number): Promise<Error | undefined> {
  return new Promise((resolve) => {
    const s = netConnect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(undefined);
    });
    s.once('error', (err) => resolve(err));
  });
}

/** Pipelined MSETs of `batch` pairs, up to 16 in flight; returns the time from first send to last reply. */
async function loadPairs(redis: Redis, model: Model, batch: number): Promise<number> {
  const keyBuf = Buffer.from(model.keys.buffer, model.keys.byteOffset, model.keys.byteLength);
  const valBuf = Buffer.from(model.values.buffer, model.values.byteOffset, model.values.byteLength);
  const rowBytes = model.dim * 4;
  const inflight = new Set<Promise<unknown>>();
  const t0 = performance.now();
  for (let from = 0; from < model.n; from += batch) {
    const to = Math.min(model.n, from + batch);
    const args: Buffer[] = new Array<Buffer>(2 * (to - from));
    for (let i = from, k = 0; i < to; i++) {
      args[k++] = keyBuf.subarray(i * 8, i * 8 + 8);
      args[k++] = valBuf.subarray(i * rowBytes, (i + 1) * rowBytes);
    }
    const p: Promise<unknown> = redis.mset(...args).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= 16) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  return performance.now() - t0;
}

/**
 * One request: `concurrency` MGETs over consecutive slices of the keys, sent together; each reply is
 * copied into one Float32Array in request order (absent keys are zeros, found 0). With `reuse`, into
 * those arrays (absent rows are then zeroed), as embkv's `out` option does.
 */
async function lookup(
  redis: Redis, keys: BigUint64Array, dim: number, concurrency: number, reuse?: { values: Float32Array; found: Uint8Array },
): Promise<Answer> {
  const n = keys.length;
  const rowBytes = dim * 4;
  const keyBuf = Buffer.from(keys.buffer, keys.byteOffset, keys.byteLength);
  const values = reuse === undefined ? new Float32Array(n * dim) : reuse.values.subarray(0, n * dim);
  const out = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const found = reuse === undefined ? new Uint8Array(n) : reuse.found.subarray(0, n).fill(0);
  const per = Math.ceil(n / concurrency);
  const calls: Promise<void>[] = [];
  for (let from = 0; from < n; from += per) {
    const to = Math.min(n, from + per);
    const args: Buffer[] = new Array<Buffer>(to - from);
    for (let i = from; i < to; i++) args[i - from] = keyBuf.subarray(i * 8, i * 8 + 8);
    calls.push(
      redis.mgetBuffer(args).then((replies) => {
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

function rssOf(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const kb = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    return kb === undefined ? undefined : Number(kb) * 1024;
  } catch {
    return undefined;
  }
}

/** SIGTERM, then SIGKILL after 3 s. */
async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  await new Promise<void>((resolve) => {
    const kill = setTimeout(() => proc.kill('SIGKILL'), 3000);
    proc.once('exit', () => {
      clearTimeout(kill);
      resolve();
    });
    proc.kill('SIGTERM');
  });
}
