import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, closeSync, constants, createWriteStream, openSync, readFileSync, writeSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { delimiter, join } from 'node:path';
import type { Redis } from 'ioredis';
import { fileURLToPath } from 'node:url';
import type { RequestFigures } from './measure.js';
import { fillRequest, requestBuffer, type Model } from './model.js';
import type { RedisClientSpec } from './redis-clients.js';
import type { ReaderJob, ReaderVariant } from './redis-reader.js';
import { VERIFY_STRIDE } from './request-file.js';
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
  /** The clients (and connections) the requests are timed with, side by side. */
  clients: RedisClientSpec[];
  /** --reuse-output: every request is assembled into the same arrays, as embkv's are then. */
  reuseOutput?: boolean;
}

/** The figures of the fastest client (lowest p50), with every client's. */
export interface RedisFigures extends RequestFigures {
  /** The fastest client, `ioredis 5.11.1 ×8` say. */
  client: string;
  variants: ReaderVariant[];
  version: string;
  loadMs: number;
  loadKeysPerSec: number;
  usedMemoryBytes: number;
  rssBytes: number;
  usedBytesPerKey: number;
  rssBytesPerKey: number;
}

const say = (line: string): void => void process.stderr.write(`${line}\n`);

const READER = fileURLToPath(new URL('./redis-reader.js', import.meta.url));

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
  // only what a ranking service using the SDK would. It only loads the pairs: the requests are
  // timed by bench/redis-reader.ts.
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

    // The requests are timed in a process of their own (bench/redis-reader.ts) that holds only
    // Redis's clients and the requests, written to a file here with what each answer must hold.
    const requestsPath = join(dir, 'requests.bin');
    writeRequests(requestsPath, model, cfg);
    const variants = await runReader(
      { port: port!, requestsPath, batch: cfg.batch, dim: model.dim, warmup: cfg.warmup, requests: cfg.requests, concurrency: cfg.concurrency, clients: cfg.clients, reuseOutput: cfg.reuseOutput === true },
      res,
    );
    const best = variants.reduce((a, b) => (b.figures.p50 < a.figures.p50 ? b : a));

    const mem = await redis.info('memory');
    const usedMemoryBytes = Number(/used_memory:(\d+)/.exec(mem)?.[1] ?? NaN);
    const rssBytes = rssOf(proc.pid) ?? Number(/used_memory_rss:(\d+)/.exec(mem)?.[1] ?? NaN);
    return {
      ...best.figures,
      client: best.label,
      variants,
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

/** Requests 0 .. warmup + requests - 1 in the layout of bench/request-file.ts. */
function writeRequests(path: string, model: Model, cfg: RedisConfig): void {
  const req = requestBuffer(cfg.batch);
  const rowWords = model.dim;
  const want = new Uint32Array(model.values.buffer, model.values.byteOffset, model.values.length);
  const fd = openSync(path, 'w');
  try {
    for (let r = 0; r < cfg.warmup + cfg.requests; r++) {
      fillRequest(req, model, r, cfg.absent);
      writeSync(fd, new Uint8Array(req.keys.buffer, req.keys.byteOffset, req.keys.byteLength));
      writeSync(fd, new Uint8Array(req.rows.buffer, req.rows.byteOffset, req.rows.byteLength));
      const first = (VERIFY_STRIDE - (r % VERIFY_STRIDE)) % VERIFY_STRIDE;
      const expected = new Uint32Array(Math.ceil(Math.max(0, cfg.batch - first) / VERIFY_STRIDE) * rowWords);
      for (let i = first, k = 0; i < cfg.batch; i += VERIFY_STRIDE, k++) {
        const row = req.rows[i]!;
        if (row >= 0) expected.set(want.subarray(row * rowWords, (row + 1) * rowWords), k * rowWords);
      }
      writeSync(fd, new Uint8Array(expected.buffer));
    }
  } finally {
    closeSync(fd);
  }
}

/** Runs bench/redis-reader.js on `job`; its progress and errors go to this process's stderr. */
async function runReader(job: ReaderJob, res: Resources): Promise<ReaderVariant[]> {
  const child = spawn(process.execPath, [READER, JSON.stringify(job)], { stdio: ['ignore', 'pipe', 'inherit'] });
  res.addProcess(child);
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const code = await new Promise<number | string>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (c, sig) => resolve(sig ?? c ?? -1));
  });
  if (code !== 0) throw new Error(`the redis reader process failed (${typeof code === 'string' ? code : `exit ${code}`})`);
  return JSON.parse(out) as ReaderVariant[];
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
