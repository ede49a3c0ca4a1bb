import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { Redis as Redis6 } from 'ioredis';

/**
 * The Node clients a ranking service would read Redis with, each over one connection or several:
 * the peer is timed with every one of them and compared at its fastest (bench/README.md).
 */
export const REDIS_CLIENTS = ['ioredis5', 'ioredis6', 'node-redis5'] as const;
export type RedisClientName = (typeof REDIS_CLIENTS)[number];

/** The npm package each client is installed as (devDependencies: npm aliases for the older majors). */
const PACKAGES: Record<RedisClientName, string> = { ioredis5: 'ioredis5', ioredis6: 'ioredis', 'node-redis5': 'redis5' };
const SHOWN: Record<RedisClientName, string> = { ioredis5: 'ioredis', ioredis6: 'ioredis', 'node-redis5': 'node-redis' };

export interface RedisClientSpec {
  client: RedisClientName;
  /** Connections the request's MGETs are spread over, round-robin (1: all pipelined on one). */
  connections: number;
}

/** One way of sending MGETs: a client and its connections. */
export interface MgetClient {
  /** `ioredis 5.11.1 ×8`, say. */
  readonly label: string;
  /** MGET number `i` of a request, over connection i mod connections; null for an absent key. */
  mget(i: number, keys: Buffer[]): Promise<(Buffer | null)[]>;
  close(): Promise<void>;
}

/** `ioredis5:8,node-redis5` -> specs; a client without `:N` gets 1 and `concurrency` connections. */
export function parseRedisClients(text: string, concurrency: number): RedisClientSpec[] {
  const specs: RedisClientSpec[] = [];
  for (const part of text.split(',').map((s) => s.trim()).filter((s) => s !== '')) {
    const [name, conns] = part.split(':');
    if (!(REDIS_CLIENTS as readonly string[]).includes(name!)) {
      throw new Error(`--redis-clients: unknown client ${JSON.stringify(name)}; use ${REDIS_CLIENTS.join(', ')}, each optionally with :CONNECTIONS`);
    }
    const client = name as RedisClientName;
    if (conns === undefined) {
      specs.push({ client, connections: 1 });
      if (concurrency > 1) specs.push({ client, connections: concurrency });
      continue;
    }
    const n = Number(conns);
    if (!Number.isInteger(n) || n < 1 || n > 1024) throw new Error(`--redis-clients: connections must be 1-1024, got ${JSON.stringify(conns)} for ${name}`);
    specs.push({ client, connections: n });
  }
  if (specs.length === 0) throw new Error('--redis-clients: name at least one client');
  return specs;
}

/** Every client with 1 connection and with one per concurrent MGET. */
export function defaultRedisClients(concurrency: number): RedisClientSpec[] {
  return parseRedisClients(REDIS_CLIENTS.join(','), concurrency);
}

export function clientVersion(client: RedisClientName): string {
  const require = createRequire(import.meta.url);
  return (JSON.parse(readFileSync(require.resolve(`${PACKAGES[client]}/package.json`), 'utf8')) as { version: string }).version;
}

export function clientLabel(spec: RedisClientSpec): string {
  return `${SHOWN[spec.client]} ${clientVersion(spec.client)} ×${spec.connections}`;
}

/** Opens `spec.connections` connections to 127.0.0.1:`port` and waits until each answers PING. */
export async function openClient(spec: RedisClientSpec, port: number): Promise<MgetClient> {
  const label = clientLabel(spec);
  const n = spec.connections;
  if (spec.client === 'node-redis5') {
    const { createClient, RESP_TYPES } = await import('redis5');
    const raw = Array.from({ length: n }, () => createClient({ socket: { host: '127.0.0.1', port, reconnectStrategy: false } }));
    for (const c of raw) c.on('error', () => undefined); // errors surface through the commands
    await Promise.all(raw.map((c) => c.connect()));
    // Values as Buffers, as ioredis's mgetBuffer gives them.
    const conns = raw.map((c) => c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }));
    await Promise.all(conns.map((c) => c.ping()));
    return {
      label,
      mget: (i, keys) => conns[i % n]!.mGet(keys) as Promise<(Buffer | null)[]>,
      close: async () => void (await Promise.allSettled(raw.map((c) => c.close()))),
    };
  }
  // Both majors of ioredis share one API; auto-pipelining off (it queued a request's MGETs behind
  // one another: p50 ~1.5x), Nagle off (its default).
  const opts = { host: '127.0.0.1', port, lazyConnect: true, enableAutoPipelining: false, maxRetriesPerRequest: 0, retryStrategy: () => null };
  // Typed as ioredis 6: the calls used here are the same in 5.
  const Redis = spec.client === 'ioredis5' ? ((await import('ioredis5')).Redis as unknown as typeof Redis6) : (await import('ioredis')).Redis;
  const conns = Array.from({ length: n }, () => new Redis(opts));
  for (const c of conns) c.on('error', () => undefined);
  await Promise.all(conns.map((c) => c.connect()));
  await Promise.all(conns.map((c) => c.ping()));
  return {
    label,
    mget: (i, keys) => conns[i % n]!.mgetBuffer(keys),
    close: async () => {
      for (const c of conns) c.disconnect();
    },
  };
}
