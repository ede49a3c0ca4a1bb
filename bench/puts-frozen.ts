/**
 * Real-time puts while one replica is frozen: the product asks that a put's p99 with replica 0 of
 * group 0 stopped by SIGSTOP stay within 2x of the fault-free p99, with p50 under 100 ms, and that
 * the frozen replica catch up once it runs again.
 *
 *   node dist/bench/puts-frozen.js [--keys 100k] [--dim 32] [--groups 2] [--replicas 2]
 *     [--puts 200] [--put-keys 100] [--warmup 20] [--hold-ms 0] [--seed 1]
 *
 * A local cluster (bench/local-cluster.ts) loads and publishes a model with `kvctl load --publish`;
 * the SDK then makes --warmup untimed puts, --puts timed sequential puts of --put-keys model keys
 * each (new values), replica 0 of group 0 is frozen, --puts more are timed, and it is thawed
 * (after --hold-ms more, to let the puts it was sent expire and leave peer sync to catch it up). The
 * catch-up time is from SIGCONT until that replica, asked directly (a Lookup to its address),
 * answers every group-0 key put while it was frozen with the put's values; Status must then show
 * it with as many real-time batches as its peer.
 */
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { EmbeddingClient } from '../src/index.js';
import { partitionOf } from '../src/cluster/partition.js';
import { type LookupResponse } from '../src/wire/lookup.js';
import { EmbkvClient } from '../src/wire/services.js';
import { guard, kvctlLoadPublish, kvctlStatus, percentiles, startCluster, type LocalCluster } from './local-cluster.js';
import { makeModel, Rng, writeModel } from './model.js';
import { Resources } from './resources.js';

const TABLE = 'bench_emb';
const { values: a } = parseArgs({
  options: {
    keys: { type: 'string', default: '100000' },
    dim: { type: 'string', default: '32' },
    groups: { type: 'string', default: '2' },
    replicas: { type: 'string', default: '2' },
    puts: { type: 'string', default: '200' },
    'put-keys': { type: 'string', default: '100' },
    warmup: { type: 'string', default: '20' },
    'hold-ms': { type: 'string', default: '0' },
    seed: { type: 'string', default: '1' },
  },
});
const count = (s: string): number => Number(s.replace(/_/g, '').replace(/k$/i, 'e3').replace(/M$/, 'e6'));
const N = count(a.keys!), DIM = count(a.dim!), G = count(a.groups!), R = count(a.replicas!);
const HOLD_MS = count(a['hold-ms']!);
const PUTS = count(a.puts!), PUT_KEYS = count(a['put-keys']!), WARMUP = count(a.warmup!), SEED = count(a.seed!);
if (R < 2) throw new Error('--replicas: at least 2 (one is frozen, a peer must take the puts)');
if ((WARMUP + 2 * PUTS) * PUT_KEYS > N) throw new Error(`--keys: the puts touch ${(WARMUP + 2 * PUTS) * PUT_KEYS} distinct keys; the model has ${N}`);

const say = (line: string): void => void process.stderr.write(`${line}\n`);
const res = new Resources();
guard(res);

/** A Lookup sent to one replica's address, bypassing the SDK's choice of replica. */
function lookupAt(stub: grpc.Client, keys: BigUint64Array, deadlineMs: number): Promise<LookupResponse> {
  return new Promise((resolve, reject) =>
    (stub as unknown as { lookup: Function }).lookup(
      { table: TABLE, version: 0, keys: new Uint8Array(keys.buffer, keys.byteOffset, keys.byteLength) },
      { deadline: new Date(Date.now() + deadlineMs) },
      (err: grpc.ServiceError | null, r: LookupResponse) => (err ? reject(err) : resolve(r)),
    ));
}

let cluster: LocalCluster | undefined;
let client: EmbeddingClient | undefined;
let stub: grpc.Client | undefined;
let frozenPid: number | undefined;
try {
  cluster = await startCluster(G, R, res, `puts-g${G}r${R}`);
  const model = makeModel(N, DIM, SEED);
  const modelDir = join(cluster.dir, 'model');
  await writeModel(model, modelDir, 1);
  say(`  ${await kvctlLoadPublish(cluster.configPath, TABLE, modelDir)}`);
  cluster.check();

  client = new EmbeddingClient({ config: cluster.manifest });
  const rng = new Rng(SEED ^ 0x2545f491);
  // Put number p writes rows [p*K, (p+1)*K) of the model with fresh values: distinct keys in a put
  // and across puts, so a later put never hides an earlier one when the catch-up is checked.
  const putKeys = (p: number): BigUint64Array => model.keys.slice(p * PUT_KEYS, (p + 1) * PUT_KEYS);
  const values: Float32Array[] = [];
  const putOnce = async (p: number): Promise<number> => {
    const v = new Float32Array(PUT_KEYS * DIM);
    for (let i = 0; i < v.length; i++) v[i] = rng.float() * 2 - 1;
    values[p] = v;
    const t0 = performance.now();
    await client!.putEmbeddings(putKeys(p), v, { table: TABLE });
    return performance.now() - t0;
  };
  let p = 0;
  for (let i = 0; i < WARMUP; i++) await putOnce(p++);
  const faultFree: number[] = [];
  for (let i = 0; i < PUTS; i++) faultFree.push(await putOnce(p++));
  cluster.check();

  frozenPid = cluster.sup.pids()['g0r0'];
  if (frozenPid === undefined) throw new Error('replica g0r0 is not running');
  const frozenFrom = p;
  process.kill(frozenPid, 'SIGSTOP');
  const frozenStarted = performance.now();
  const frozen: number[] = [];
  for (let i = 0; i < PUTS; i++) frozen.push(await putOnce(p++));
  const frozenMs = performance.now() - frozenStarted;
  // --hold-ms: stay frozen past the SDK's put deadline (5 s), so the puts sent to this replica expire
  // and it can only catch up from its peer (peer sync), not from calls still queued on its socket.
  if (HOLD_MS > 0) await new Promise((r) => setTimeout(r, HOLD_MS));
  process.kill(frozenPid, 'SIGCONT');
  const thawed = performance.now();
  frozenPid = undefined;

  // The keys of group 0 put while g0r0 was frozen, with the values they were given.
  const groupOf = (k: bigint): number => partitionOf(k, cluster!.manifest.partitions) % G;
  const want: { key: bigint; put: number; row: number }[] = [];
  for (let q = frozenFrom; q < p; q++) {
    const ks = putKeys(q);
    for (let i = 0; i < ks.length; i++) if (groupOf(ks[i]!) === 0) want.push({ key: ks[i]!, put: q, row: i });
  }
  const wantKeys = BigUint64Array.from(want.map((w) => w.key));
  stub = new EmbkvClient(cluster.manifest.groups[0]!.replicas[0]!, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': -1 });
  let caughtUpMs = NaN;
  let polls = 0;
  const until = thawed + 60_000;
  for (;;) {
    polls++;
    let ok = false;
    try {
      const r = await lookupAt(stub, wantKeys, 5000);
      ok = want.every((w, i) => {
        if (r.found[i] !== 1) return false;
        const v = values[w.put]!;
        for (let j = 0; j < DIM; j++) if (r.values[i * DIM + j] !== v[w.row * DIM + j]) return false;
        return true;
      });
    } catch {
      // still waking up: ask again
    }
    if (ok) {
      caughtUpMs = performance.now() - thawed;
      break;
    }
    if (performance.now() > until) throw new Error(`g0r0 did not serve the puts made while it was frozen within 60 s of SIGCONT (${polls} reads)`);
    await new Promise((r) => setTimeout(r, 10));
  }
  // Status agrees: the thawed replica has applied as many real-time batches as its peer.
  const statuses = await kvctlStatus(cluster.configPath);
  const batches = statuses.filter((s) => s.group === 0).map((s) => ({
    replica: s.replica, batches: s.status?.tables.find((t) => t.name === TABLE)?.realtimeBatches, lagMs: s.status?.tables.find((t) => t.name === TABLE)?.realtimeLagMs,
  }));
  cluster.check();

  const ff = percentiles(faultFree);
  const fr = percentiles(frozen);
  const f = (x: number): string => x.toFixed(x < 10 ? 2 : 1);
  const line = (name: string, s: typeof ff): string => `${name}: ${s.n} puts, p50 ${f(s.p50)} / p90 ${f(s.p90)} / p99 ${f(s.p99)} / max ${f(s.max)} ms`;
  const report = [
    `puts of ${PUT_KEYS} keys (dim ${DIM}), ${G} groups x ${R} replicas, ${N.toLocaleString('en-US')}-key model; ${WARMUP} untimed puts first`,
    line('fault-free', ff),
    `${line('g0r0 frozen (SIGSTOP)', fr)}; the phase took ${(frozenMs / 1000).toFixed(2)} s${HOLD_MS > 0 ? `, then held frozen ${HOLD_MS} ms more` : ''}`,
    `frozen p99 / fault-free p99 = ${(fr.p99 / ff.p99).toFixed(2)}x (bar: 2x); frozen p50 ${f(fr.p50)} ms (bar: 100 ms)`,
    `caught up: g0r0 served all ${want.length} group-0 keys put while frozen, with their values, ${f(caughtUpMs)} ms after SIGCONT (${polls} reads)`,
    `status realtime batches, group 0: ${batches.map((b) => `r${b.replica} ${b.batches} (lag ${b.lagMs} ms)`).join(', ')}`,
  ];
  if (new Set(batches.map((b) => b.batches)).size !== 1) report.push('WARNING: group 0 replicas report different real-time batch counts');
  process.stdout.write(report.join('\n') + '\n');
} finally {
  if (frozenPid !== undefined) process.kill(frozenPid, 'SIGCONT');
  stub?.close();
  await client?.close();
  await cluster?.stop();
  await res.shutdown();
}
