import { parseArgs } from 'node:util';
import { REDIS_CLIENTS, defaultRedisClients, parseRedisClients, type RedisClientSpec } from './redis-clients.js';

/** What one `npm run bench -- ...` asks for, validated. */
export interface BenchOptions {
  keys: number;
  dim: number;
  groups: number;
  replicas: number;
  requests: number;
  warmup: number;
  batch: number;
  /** Fraction of each request's keys that the model does not hold. */
  absent: number;
  parts: number;
  seed: number;
  redis: boolean;
  /** Which stores run: both (with --redis), or one of them. */
  only: 'embkv' | 'redis' | undefined;
  redisConcurrency: number;
  redisBatch: number;
  /** The Redis clients timed side by side (--redis-clients); the fastest is the one compared. */
  redisClients: RedisClientSpec[];
  sweep: boolean;
  big: boolean;
  appendResults: boolean;
  note: string | undefined;
  /** After the timed requests, time them again while replica 0 of every group is frozen now and then. */
  stall: boolean;
  /** --during-load: time requests again while a second version loads into a write version. */
  duringLoad: boolean;
  /** --default-gc: replicas with V8's default GC settings (parallel, concurrent GC threads; young generation). */
  defaultGc: boolean;
  /** --reuse-output: embkv's requests write into one reused pair of result arrays (the SDK's `out`). */
  reuseOutput: boolean;
  /** --default-malloc: every process with glibc's default malloc settings instead of CLIENT_MALLOC_ENV and REPLICA_MALLOC_ENV. */
  defaultMalloc: boolean;
  /**
   * --cluster FILE --table NAME --model PATH: time requests against a running cluster (a `kvctl
   * cluster up`, say) whose table NAME holds the NumPy model at PATH, instead of starting replicas
   * and writing a model; Redis gets the same model.
   */
  cluster: { config: string; table: string; model: string } | undefined;
  help: boolean;
}

export const DEFAULTS = {
  keys: 1_000_000,
  dim: 32,
  groups: 4,
  replicas: 1,
  requests: 30,
  warmup: 3,
  batch: 150_000,
  absent: 0.01,
  parts: 4,
  seed: 1,
  redisConcurrency: 8,
  redisBatch: 1000,
} as const;

/** The matrix that `--sweep` runs (10M keys only with `--big`). */
export const SWEEP_KEYS = [1_000_000, 2_000_000] as const;
export const SWEEP_BIG_KEYS = 10_000_000;
export const SWEEP_GROUPS = [1, 4, 8, 16] as const;

export const USAGE = `usage: npm run bench -- [flags]

  --keys N             keys in the model (default ${DEFAULTS.keys}; 2M, 1e6, 1_000_000 are accepted)
  --dim D              floats per vector (default ${DEFAULTS.dim})
  --groups G           shard groups (default ${DEFAULTS.groups}); partitions = max(64, G)
  --replicas R         replicas per group (default ${DEFAULTS.replicas})
  --requests K         timed requests (default ${DEFAULTS.requests}), after --warmup W (default ${DEFAULTS.warmup})
  --batch B            keys per request (default ${DEFAULTS.batch})
  --absent F           fraction of absent keys per request (default ${DEFAULTS.absent})
  --parts P            NumPy part files the model is written as (default ${DEFAULTS.parts})
  --seed S             seed of the model and the requests (default ${DEFAULTS.seed})
  --redis              also run the same load and requests against a local redis-server
  --only embkv|redis   run only one of the two stores (--only redis implies --redis)
  --redis-concurrency C  concurrent MGETs per request (default ${DEFAULTS.redisConcurrency})
  --redis-batch M      pairs per MSET while loading Redis (default ${DEFAULTS.redisBatch})
  --redis-clients LIST the Node clients Redis is read with, timed side by side on the same requests;
                       the fastest is the one embkv is compared with. Comma-separated, from
                       ${REDIS_CLIENTS.join(', ')}; CLIENT:N for N connections, CLIENT alone for 1
                       and --redis-concurrency connections (default: all three, both ways)
  --sweep              run keys 1M, 2M x groups 1, 4, 8, 16 (ignores --keys and --groups)
  --big                with --sweep, also 10M keys (needs several GB of RAM)
  --during-load        then time requests again while version 2 of the model loads (reads stay on v1)
  --stall              then time the same requests again while replica 0 of every group is frozen
                       (SIGSTOP) for 60 ms at random moments, a fifth of the time; needs --replicas 2+
  --reuse-output       every request writes into one reused pair of result arrays (getEmbeddings'
                       out option for embkv; the same arrays for Redis's MGET replies)
  --default-gc         run the replicas with V8's default GC settings instead of the
                       --single-threaded-gc --max-semi-space-size=2 that cluster up gives them (the
                       bench itself always runs with V8's defaults, since Redis's client shares
                       its process)
  --default-malloc     run the bench and the replicas with glibc's default malloc settings instead
                       of the ones cluster up sets (and the README recommends for SDK processes)
  --cluster FILE --table NAME --model PATH
                       time requests against a running cluster (e.g. one kvctl cluster up started)
                       whose table NAME is loaded from the NumPy files at PATH (a directory or a
                       prefix, as kvctl load takes them), instead of starting replicas and writing a
                       random model: the requests draw their keys from those files, every answer is
                       checked against them, and Redis (--redis) loads the same pairs. No load is
                       timed; --keys, --dim, --groups, --replicas, --parts, --sweep, --stall and
                       --during-load do not apply
  --append-results     append the table to bench/RESULTS.md under a dated heading
  --note TEXT          a line to put under that heading (what else ran on the machine, say)
  --help               this text`;

const INT_FLAGS = ['keys', 'dim', 'groups', 'replicas', 'requests', 'warmup', 'batch', 'parts', 'seed', 'redis-concurrency', 'redis-batch'] as const;

/** Parses `1000000`, `1_000_000`, `1e6`, `150k`, `2M`. */
export function parseCount(text: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?(?:e\d+)?)([kKmM]?)$/.exec(text.replace(/_/g, ''));
  const n = m ? Number(m[1]) * (m[2] === '' ? 1 : /k/i.test(m[2]!) ? 1e3 : 1e6) : NaN;
  if (!Number.isSafeInteger(n)) throw new Error(`--${flag} must be a whole number (like 150000, 150k or 2M), got ${JSON.stringify(text)}`);
  return n;
}

function bounded(n: number, flag: string, min: number, max: number): number {
  if (n < min || n > max) throw new Error(`--${flag} must be in [${min}, ${max}], got ${n}`);
  return n;
}

export function parseBenchArgs(argv: string[]): BenchOptions {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      ...Object.fromEntries(INT_FLAGS.map((f) => [f, { type: 'string' as const }])),
      absent: { type: 'string' },
      redis: { type: 'boolean', default: false },
      only: { type: 'string' },
      sweep: { type: 'boolean', default: false },
      big: { type: 'boolean', default: false },
      'append-results': { type: 'boolean', default: false },
      stall: { type: 'boolean', default: false },
      'during-load': { type: 'boolean', default: false },
      'default-malloc': { type: 'boolean', default: false },
      'reuse-output': { type: 'boolean', default: false },
      'default-gc': { type: 'boolean', default: false },
      note: { type: 'string' },
      'redis-clients': { type: 'string' },
      cluster: { type: 'string' },
      table: { type: 'string' },
      model: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const v = values as Record<string, string | boolean | undefined>;
  const int = (flag: (typeof INT_FLAGS)[number], def: number, min: number, max: number): number =>
    bounded(typeof v[flag] === 'string' ? parseCount(v[flag] as string, flag) : def, flag, min, max);
  const only = v['only'];
  if (only !== undefined && only !== 'embkv' && only !== 'redis') throw new Error(`--only must be embkv or redis, got ${JSON.stringify(only)}`);
  const absent = v['absent'] === undefined ? DEFAULTS.absent : Number(v['absent']);
  if (!(absent >= 0 && absent < 1)) throw new Error(`--absent must be a fraction in [0, 1), got ${JSON.stringify(v['absent'])}`);
  const o: BenchOptions = {
    keys: int('keys', DEFAULTS.keys, 1, 100_000_000),
    dim: int('dim', DEFAULTS.dim, 1, 4096),
    groups: int('groups', DEFAULTS.groups, 1, 4096),
    replicas: int('replicas', DEFAULTS.replicas, 1, 64),
    requests: int('requests', DEFAULTS.requests, 1, 100_000),
    warmup: int('warmup', DEFAULTS.warmup, 0, 1000),
    batch: int('batch', DEFAULTS.batch, 1, 2_000_000),
    absent,
    parts: int('parts', DEFAULTS.parts, 1, 1000),
    seed: int('seed', DEFAULTS.seed, 0, 0xffffffff),
    redis: v['redis'] === true || only === 'redis',
    only,
    redisConcurrency: int('redis-concurrency', DEFAULTS.redisConcurrency, 1, 1024),
    redisBatch: int('redis-batch', DEFAULTS.redisBatch, 1, 100_000),
    redisClients: [],
    sweep: v['sweep'] === true,
    big: v['big'] === true,
    appendResults: v['append-results'] === true,
    stall: v['stall'] === true,
    defaultMalloc: v['default-malloc'] === true,
    reuseOutput: v['reuse-output'] === true,
    defaultGc: v['default-gc'] === true,
    duringLoad: v['during-load'] === true,
    note: typeof v['note'] === 'string' ? v['note'] : undefined,
    cluster: undefined,
    help: v['help'] === true,
  };
  o.redisClients = typeof v['redis-clients'] === 'string' ? parseRedisClients(v['redis-clients'], o.redisConcurrency) : defaultRedisClients(o.redisConcurrency);
  const clusterFlags = (['cluster', 'table', 'model'] as const).filter((f) => typeof v[f] === 'string');
  if (clusterFlags.length > 0) {
    if (clusterFlags.length < 3) throw new Error('--cluster, --table and --model go together: the running cluster, the table to ask, and the NumPy files it was loaded from');
    const clash = ['keys', 'dim', 'groups', 'replicas', 'parts', 'sweep', 'big', 'stall', 'during-load', 'default-gc', 'default-malloc'].filter((f) => v[f] !== undefined && v[f] !== false);
    if (clash.length > 0) throw new Error(`--cluster times a running cluster with its own model: ${clash.map((f) => `--${f}`).join(', ')} do not apply`);
    o.cluster = { config: v['cluster'] as string, table: v['table'] as string, model: v['model'] as string };
  }
  if (o.stall && o.replicas < 2) throw new Error('--stall freezes replica 0 of every group: give --replicas 2 or more');
  if (o.big && !o.sweep) throw new Error('--big only adds 10M keys to --sweep; for one big run give --keys 10M');
  if (typeof v['redis-clients'] === 'string' && !o.redis) throw new Error('--redis-clients chooses the clients of the Redis phase: give --redis too');
  if (o.only === 'embkv' && v['redis'] === true) throw new Error('--only embkv and --redis contradict each other');
  return o;
}
