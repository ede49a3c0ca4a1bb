/**
 * S3-compatible object storage as a DumpSource: the only file that imports the AWS SDK, and loaded
 * (by dump-source.ts) only for an s3:// location.
 *
 * Listing pages through ListObjectsV2 (1,000 keys a page) with '/' as delimiter, so a prefix lists like
 * a directory: its objects, and its sub-prefixes as directories. A listed object's length and ETag are
 * kept; every ranged GET of it must answer the same ETag (and is sent with If-Match), or the load fails:
 * the object changed under it.
 *
 * An open object is read through a window of ranged GETs (blocks of blockBytes):
 *
 *   object  [ block 0 | block 1 | block 2 | block 3 | block 4 | block 5 | ... ]
 *                        ^ read here   \______ readAhead blocks in flight ______/
 *
 * Blocks behind the read are dropped (their buffers kept for the next GETs, at most readAhead + 1 of
 * them), so an open object holds at most (blocks of one read + readAhead) blocks whatever its length.
 *
 * A read that does not continue the previous one (a header, a first chunk) is one GET of exactly its
 * range: planning reads headers without fetching blocks it will not use. Plain-HTTP connections read
 * into one buffer each, reused (ReusedReadBufferAgent), not a fresh one per socket read.
 *
 * Every request is retried on 5xx, 429/SlowDown and network errors, with doubling delays, at most
 * maxAttempts tries; then the load fails with KV_UNAVAILABLE naming s3, the endpoint and bucket/key.
 */
import type * as S3 from '@aws-sdk/client-s3';
import { setMaxListeners } from 'node:events';
import { Agent, type AgentOptions } from 'node:http';
import { createRequire } from 'node:module';
import { createConnection, type NetConnectOpts, type Socket } from 'node:net';
import type { Readable } from 'node:stream';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { dataError } from './dump-files.js';
import {
  DEFAULT_S3_BLOCK_BYTES, DEFAULT_S3_MAX_ATTEMPTS, DEFAULT_S3_READ_AHEAD, DEFAULT_S3_READ_BUFFER_BYTES, DEFAULT_S3_RETRY_BASE_MS,
  parseS3Url, s3Basename, s3Dirname, s3Join, type DumpEntry, type DumpSource, type DumpStat, type RandomAccessReader, type S3SourceOptions,
} from './dump-source.js';

// Through require: an ESM import of the SDK's CommonJS bundle makes Node scan it, and every module it
// re-exports, for export names, which doubled the SDK's load time (~155 against ~85 ms of CPU per load).
const { GetObjectCommand, HeadObjectCommand, ListObjectsV2Command, S3Client } = createRequire(import.meta.url)('@aws-sdk/client-s3') as typeof S3;

interface ObjectInfo {
  size: number;
  etag: string;
  mtimeMs?: number;
}

/** Errors worth another try: the server's (5xx), throttling, and the connection's (no HTTP status at all). */
function retryable(err: unknown): boolean {
  if (err instanceof KvError) return false;
  const e = err as { name?: string; $metadata?: { httpStatusCode?: number }; $retryable?: unknown };
  const status = e.$metadata?.httpStatusCode;
  if (e.name === 'SlowDown' || e.name === 'Throttling' || e.name === 'ThrottlingException' || e.name === 'RequestTimeout') return true;
  // No credentials or no region: trying again finds none either.
  if (e.name === 'CredentialsProviderError' || /region is missing/i.test((err as Error).message ?? '')) return false;
  if (status === undefined) return true;
  return status >= 500 || status === 429 || e.$retryable !== undefined;
}

const statusOf = (err: unknown): number | undefined => (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;

function describe(err: unknown): string {
  const e = err as { name?: string; message?: string; code?: string };
  const status = statusOf(err);
  const msg = (e.message ?? String(err)).split('\n')[0];
  const name = e.name && e.name !== 'Error' && !msg?.startsWith(e.name) ? `${e.name}: ` : '';
  return `${name}${msg}${status !== undefined ? ` (HTTP ${status})` : ''}`;
}

/**
 * Plain-HTTP connections that read into one buffer each, reused for every read (net's `onread`),
 * instead of a fresh buffer per read: the HTTP parser copies what it keeps (headers, body chunks) out
 * of each read at once, so the buffer is free again when the 'data' listeners return. A load receives
 * its whole dump through these: half its allocations, and the collections they set off, go.
 */
class ReusedReadBufferAgent extends Agent {
  constructor(private readonly readBytes: number, options: AgentOptions) {
    super(options);
  }

  /** The socket is returned at once (the agent then waits for it to connect), so no callback is used. */
  override createConnection(options: NetConnectOpts): Socket {
    const buffer = Buffer.allocUnsafe(this.readBytes);
    const socket: Socket = createConnection({
      ...options,
      onread: {
        buffer,
        // With onread, net emits no 'data' of its own: the HTTP client's parser listens for it.
        callback: (n: number, buf: Uint8Array): boolean => socket.emit('data', (buf as Buffer).subarray(0, n)) || true,
      },
    } as NetConnectOpts);
    return socket;
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export class S3DumpSource implements DumpSource {
  readonly kind = 's3' as const;
  /** How messages name the endpoint: its URL, or "aws" for AWS's own. */
  readonly endpointName: string;
  private readonly client: S3.S3Client;
  private readonly maxAttempts: number;
  private readonly retryBaseMs: number;
  private readonly blockBytes: number;
  private readonly readAhead: number;
  /** Length and ETag of every object listed or stat-ed, by s3:// URL: reads are checked against them. */
  private readonly known = new Map<string, ObjectInfo>();
  /** Block buffers that reads have passed, for the next GETs of any object (see takeBlock). */
  private readonly spareBlocks: Buffer[] = [];
  private closed = false;

  constructor(o: S3SourceOptions = {}) {
    const env = process.env;
    const endpoint = o.endpoint ?? (env['AWS_ENDPOINT_URL_S3'] || undefined) ?? (env['AWS_ENDPOINT_URL'] || undefined);
    if (endpoint !== undefined) {
      let u: URL | undefined;
      try {
        u = new URL(endpoint);
      } catch {
        u = undefined;
      }
      if (u === undefined || (u.protocol !== 'http:' && u.protocol !== 'https:')) {
        throw invalidArgument(`S3 endpoint ${endpoint} is not an http:// or https:// URL`);
      }
    }
    const posInt = (v: number | undefined, d: number, name: string, max: number): number => {
      if (v === undefined) return d;
      if (!Number.isSafeInteger(v) || v < 1 || v > max) throw invalidArgument(`s3.${name} must be an integer in [1, ${max}], not ${String(v)}`);
      return v;
    };
    this.maxAttempts = posInt(o.maxAttempts, DEFAULT_S3_MAX_ATTEMPTS, 'maxAttempts', 100);
    this.retryBaseMs = o.retryBaseMs === 0 ? 0 : posInt(o.retryBaseMs, DEFAULT_S3_RETRY_BASE_MS, 'retryBaseMs', 60_000);
    this.blockBytes = posInt(o.blockBytes, DEFAULT_S3_BLOCK_BYTES, 'blockBytes', 256 * 1024 * 1024);
    this.readAhead = o.readAhead === 0 ? 0 : posInt(o.readAhead, DEFAULT_S3_READ_AHEAD, 'readAhead', 64);
    const readBufferBytes = posInt(o.readBufferBytes, DEFAULT_S3_READ_BUFFER_BYTES, 'readBufferBytes', 64 * 1024 * 1024);
    this.endpointName = endpoint ?? 'aws';
    // A custom endpoint (MinIO, Ceph, s3rver) has no region of its own; AWS's needs one from the chain.
    const region = o.region ?? (endpoint !== undefined && !env['AWS_REGION'] && !env['AWS_DEFAULT_REGION'] ? 'us-east-1' : undefined);
    const config: S3.S3ClientConfig = {
      // Retries are counted here, around whole reads (a body cut off mid-way included).
      maxAttempts: 1,
      forcePathStyle: endpoint !== undefined && o.virtualHost !== true,
      // Whole-object checksums do not apply to ranged GETs; lengths and ETags are checked here.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: {
        connectionTimeout: 5_000, requestTimeout: 60_000,
        httpAgent: new ReusedReadBufferAgent(readBufferBytes, { keepAlive: true, maxSockets: 50 }),
      },
      ...(endpoint !== undefined ? { endpoint } : {}),
      ...(region !== undefined ? { region } : {}),
      ...(o.credentials !== undefined ? { credentials: o.credentials } : {}),
    };
    this.client = new S3Client(config);
  }

  /**
   * A block buffer to receive the next GET into, if one is spare. Blocks are reused across the
   * objects of a load, so a load writes into fresh memory only for its first few blocks: fresh
   * pages cost more than the copying on some VMs.
   */
  takeBlock(): Buffer | undefined {
    return this.spareBlocks.pop();
  }

  /** Hands back a block the reads have passed (a whole block buffer, or the start of one). */
  releaseBlock(b: Buffer): void {
    if (b.byteOffset !== 0 || b.buffer.byteLength !== this.blockBytes || this.spareBlocks.length > this.readAhead) return;
    this.spareBlocks.push(Buffer.from(b.buffer, 0, this.blockBytes));
  }

  /** Runs one request, retrying what is transient; then fails naming s3, the endpoint and bucket/key. */
  async attempt<T>(what: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    for (let tries = 1; ; tries++) {
      if (this.closed) throw new KvError(KvErrorCode.CLOSED, `s3 ${this.endpointName} ${what}: the source is closed`);
      try {
        return await fn();
      } catch (err) {
        if (err instanceof KvError || signal?.aborted) throw err;
        if (!retryable(err) || tries >= this.maxAttempts) {
          throw new KvError(
            KvErrorCode.UNAVAILABLE,
            `s3 ${this.endpointName} ${what}: ${describe(err)}${tries > 1 ? ` (gave up after ${tries} tries)` : ''}`,
            // The storage failed, not the dump: the watcher tries such a version again later.
            { cause: err, detail: { system: 's3' } },
          );
        }
        // Doubling, up to 8x the base, with jitter so parallel readers do not retry in step.
        const delay = this.retryBaseMs * 2 ** Math.min(tries - 1, 3);
        await sleep(delay * (0.75 + Math.random() * 0.5));
      }
    }
  }

  private prefixOf(loc: string): { bucket: string; prefix: string } {
    const { bucket, key } = parseS3Url(loc);
    return { bucket, prefix: key === '' || key.endsWith('/') ? key : `${key}/` };
  }

  async list(loc: string): Promise<DumpEntry[]> {
    const { bucket, prefix } = this.prefixOf(loc);
    const out: DumpEntry[] = [];
    let token: string | undefined;
    do {
      const page = await this.attempt(`${bucket}/${prefix}: list`, () =>
        this.client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, Delimiter: '/', ...(token !== undefined ? { ContinuationToken: token } : {}) })));
      for (const o of page.Contents ?? []) {
        const name = o.Key!.slice(prefix.length);
        // A zero-length "folder" object some tools write for the prefix itself.
        if (name === '') continue;
        const info = { size: o.Size ?? 0, etag: o.ETag ?? '', ...(o.LastModified !== undefined ? { mtimeMs: o.LastModified.getTime() } : {}) };
        this.known.set(`s3://${bucket}/${o.Key!}`, info);
        out.push({ name, type: 'file', ...info });
      }
      for (const p of page.CommonPrefixes ?? []) {
        const name = p.Prefix!.slice(prefix.length).replace(/\/$/, '');
        if (name !== '') out.push({ name, type: 'dir', size: 0 });
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token !== undefined);
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** Whether anything is stored under the prefix. */
  private async anyUnder(bucket: string, prefix: string): Promise<boolean> {
    const page = await this.attempt(`${bucket}/${prefix}: list`, () =>
      this.client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, MaxKeys: 1 })));
    return (page.KeyCount ?? page.Contents?.length ?? 0) > 0;
  }

  async stat(loc: string): Promise<DumpStat | undefined> {
    const { bucket, key } = parseS3Url(loc);
    if (key === '' || key.endsWith('/')) return (await this.anyUnder(bucket, key)) ? { type: 'dir', size: 0 } : undefined;
    const known = this.known.get(loc);
    if (known !== undefined) return { type: 'file', ...known };
    const head = await this.attempt(`${bucket}/${key}: head`, async () => {
      try {
        return await this.client.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
      } catch (err) {
        if (statusOf(err) === 404 || (err as Error).name === 'NotFound') return undefined;
        throw err;
      }
    });
    if (head === undefined) return (await this.anyUnder(bucket, `${key}/`)) ? { type: 'dir', size: 0 } : undefined;
    const info = { size: head.ContentLength ?? 0, etag: head.ETag ?? '', ...(head.LastModified !== undefined ? { mtimeMs: head.LastModified.getTime() } : {}) };
    this.known.set(loc, info);
    return { type: 'file', ...info };
  }

  async open(loc: string): Promise<RandomAccessReader> {
    const s = await this.stat(loc);
    if (s === undefined) throw dataError(`${loc}: no such object`);
    if (s.type !== 'file') throw dataError(`${loc} is a prefix (a directory), not an object`);
    const { bucket, key } = parseS3Url(loc);
    return new S3ObjectReader(this, loc, bucket, key, { size: s.size, etag: s.etag ?? '' }, this.blockBytes, this.readAhead);
  }

  /** One ranged GET of [start, start + len), checked against the listed ETag and the length asked for. */
  async getRange(
    loc: string, bucket: string, key: string, info: ObjectInfo, start: number, len: number, signal: AbortSignal, into?: Buffer,
  ): Promise<Buffer> {
    return this.attempt(`${bucket}/${key}`, async () => {
      let res;
      try {
        res = await this.client.send(
          new GetObjectCommand({ Bucket: bucket, Key: key, Range: `bytes=${start}-${start + len - 1}`, ...(info.etag ? { IfMatch: info.etag } : {}) }),
          { abortSignal: signal },
        );
      } catch (err) {
        if (statusOf(err) === 412) throw dataError(`${loc}: changed during the load (its ETag is no longer ${info.etag})`);
        if (statusOf(err) === 404) throw dataError(`${loc}: removed during the load`);
        if (statusOf(err) === 416) throw dataError(`${loc}: shrank during the load (listed with ${info.size} bytes)`);
        throw err;
      }
      if (info.etag && res.ETag !== undefined && res.ETag !== info.etag) {
        (res.Body as Readable | undefined)?.destroy();
        throw dataError(`${loc}: changed during the load (ETag ${res.ETag}, listed as ${info.etag})`);
      }
      const total = /\/(\d+)$/.exec(res.ContentRange ?? '')?.[1];
      if (total !== undefined && Number(total) !== info.size) {
        (res.Body as Readable | undefined)?.destroy();
        throw dataError(`${loc}: changed during the load (${total} bytes, listed with ${info.size})`);
      }
      const buf = into !== undefined && into.length >= len ? into.subarray(0, len) : Buffer.allocUnsafe(len);
      let got = 0;
      for await (const chunk of res.Body as Readable) {
        const c = chunk as Buffer;
        if (got + c.length > len) {
          (res.Body as Readable).destroy();
          throw dataError(`${loc}: answered more than the ${len} bytes asked for at ${start}`);
        }
        c.copy(buf, got);
        got += c.length;
      }
      // A body cut short is a connection's failure: retried like one.
      if (got < len) throw Object.assign(new Error(`the body ended after ${got} of ${len} bytes`), { name: 'ShortBody' });
      return buf;
    }, signal);
  }

  join(dir: string, name: string): string {
    return s3Join(dir, name);
  }

  dirname(loc: string): string {
    return s3Dirname(loc);
  }

  basename(loc: string): string {
    return s3Basename(loc);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.client.destroy();
    this.spareBlocks.length = 0;
  }
}

/**
 * One open object: reads served from a window of ranged GETs (see the diagram at the top). Reads are
 * served one at a time, in call order, so a block behind the read is no longer in use and its buffer
 * goes back to the source for a block ahead (of this object or the next): a load allocates its block
 * buffers once, not once per GET (fresh 8 MiB buffers cost more in garbage collection and first-touch
 * page faults than the copying).
 */
class S3ObjectReader implements RandomAccessReader {
  readonly size: number;
  private readonly blocks = new Map<number, Promise<Buffer>>();
  /** The blocks whose GET has answered, by index: their buffers are reused once the reads pass them. */
  private readonly done = new Map<number, Buffer>();
  private readonly abort = new AbortController();
  /** Where the previous read ended: a read starting there is sequential, and reads ahead. */
  private nextPos = -1;
  /** The read in progress; the next waits for it. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly src: S3DumpSource,
    private readonly loc: string,
    private readonly bucket: string,
    private readonly key: string,
    private readonly info: ObjectInfo,
    private readonly blockBytes: number,
    private readonly readAhead: number,
  ) {
    this.size = info.size;
    // Every GET in flight listens on it (readAhead + the blocks of one read).
    setMaxListeners(0, this.abort.signal);
  }

  private get(start: number, len: number): Promise<Buffer> {
    return this.src.getRange(this.loc, this.bucket, this.key, this.info, start, len, this.abort.signal);
  }

  read(buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
    const r = this.queue.then(() => this.readNow(buf, off, len, pos));
    this.queue = r.catch(() => undefined);
    return r;
  }

  private async readNow(buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
    if (this.abort.signal.aborted) throw dataError(`${this.loc}: read after close`);
    if (len <= 0 || pos >= this.size) return 0;
    const n = Math.min(len, this.size - pos);
    const sequential = pos === this.nextPos;
    this.nextPos = pos + n;
    if (!sequential) {
      buf.set(await this.get(pos, n), off);
      return n;
    }
    const B = this.blockBytes;
    const first = Math.floor(pos / B);
    const last = Math.floor((pos + n - 1) / B);
    const lastBlock = Math.floor((this.size - 1) / B);
    for (const i of this.blocks.keys()) {
      if (i >= first) continue;
      this.blocks.delete(i);
      const b = this.done.get(i);
      this.done.delete(i);
      if (b !== undefined) this.src.releaseBlock(b);
    }
    for (let i = first; i <= Math.min(lastBlock, last + this.readAhead); i++) {
      if (this.blocks.has(i)) continue;
      const p = this.src.getRange(this.loc, this.bucket, this.key, this.info, i * B, Math.min(B, this.size - i * B), this.abort.signal, this.src.takeBlock());
      p.then((b) => this.blocks.has(i) && this.done.set(i, b), () => undefined); // a failure is awaited by the read that needs it
      this.blocks.set(i, p);
    }
    let copied = 0;
    for (let i = first; i <= last; i++) {
      const b = await this.blocks.get(i)!;
      const start = i * B;
      const from = Math.max(pos, start) - start;
      const to = Math.min(pos + n, start + b.length) - start;
      buf.set(b.subarray(from, to), off + copied);
      copied += to - from;
    }
    return copied;
  }

  async close(): Promise<void> {
    this.blocks.clear();
    // Blocks fetched but never read are not handed back: a GET may still be writing into one.
    this.done.clear();
    this.abort.abort();
  }
}
