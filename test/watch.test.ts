/**
 * The version watcher (`kvctl watch`): real replicas, the watcher as a real child process polling a
 * local source every 200 ms, a "trainer" writing versions the way one should (files into a temporary
 * directory, renamed into place, _SUCCESS last). Synchronised on the watcher's lines and the
 * cluster's Status, never on sleeps.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EmbeddingClient } from '../src/index.js';
import { writeNpy, writeNpyPair } from '../src/loader/npy-write.js';
import { nextStep, type ClusterView, type SourceVersion } from '../src/loader/watch.js';
import { KVCTL, TestCluster } from './helpers/cluster.js';
import { differsOnReplicas } from './helpers/replica.js';
import { until } from './helpers/util.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { packKeys } from '../src/common/keys.js';
import { ORDER_SCALE } from '../src/common/limits.js';
import { putToGroups } from '../src/fanout/put.js';
import { S3RVER_ENV, TestS3 } from './helpers/s3.js';
import { S3Proxy, SLOW_DOWN } from './helpers/s3-proxy.js';
import { makeModel, sameBits, scramble } from './helpers/model.js';

const DIM = 8;
const N = 2000;

/** A `kvctl watch` child process whose stdout lines are kept and can be waited for. */
class WatchProcess {
  readonly lines: string[] = [];
  stderr = '';
  private readonly waiters: { re: RegExp; resolve: (l: string) => void }[] = [];
  readonly proc: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  constructor(cluster: TestCluster, table: string, source: string, extra: string[] = []) {
    this.proc = spawn(process.execPath, [KVCTL, 'watch', '--config', cluster.configPath, '--table', table, '--source', source, '--interval', '200ms', ...extra], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let partial = '';
    this.proc.stdout!.on('data', (d: Buffer) => {
      partial += d.toString();
      const parts = partial.split('\n');
      partial = parts.pop()!;
      for (const l of parts) {
        this.lines.push(l);
        for (const w of [...this.waiters]) {
          if (w.re.test(l)) {
            this.waiters.splice(this.waiters.indexOf(w), 1);
            w.resolve(l);
          }
        }
      }
    });
    this.proc.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
  }

  /** The first line, printed so far or later, that matches; the bound is for a broken test only. */
  waitFor(re: RegExp, timeoutMs = 60_000): Promise<string> {
    const seen = this.lines.find((l) => re.test(l));
    if (seen !== undefined) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`watcher did not print ${re} in ${timeoutMs} ms; it printed:\n${this.lines.join('\n')}\n${this.stderr}`)), timeoutMs);
      // The loser of a race between two watchers' lines must not hold the test process.
      timer.unref();
      const exited = (): void => reject(new Error(`watcher exited before printing ${re}:\n${this.lines.join('\n')}\n${this.stderr}`));
      this.proc.once('exit', exited);
      this.waiters.push({ re, resolve: (l) => { clearTimeout(timer); this.proc.off('exit', exited); resolve(l); } });
    });
  }

  count(re: RegExp): number {
    return this.lines.filter((l) => re.test(l)).length;
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
    await this.exited;
  }
}

/** What the table should serve: key -> vector. */
type Expected = Map<bigint, Float32Array>;

/** A trainer's source directory: each version written aside, renamed into place, _SUCCESS last. */
class Trainer {
  private seq = 0;
  constructor(readonly root: string) {}

  /** Writes SOURCE/<kind>/<version>/ with `fill`, and its _SUCCESS unless `success` is false. */
  async write(kind: 'full' | 'incremental', version: number, fill: (dir: string) => Promise<void>, success = true): Promise<string> {
    const tmp = join(this.root, `.tmp-${this.seq++}`);
    mkdirSync(tmp, { recursive: true });
    await fill(tmp);
    mkdirSync(join(this.root, kind), { recursive: true });
    const dir = join(this.root, kind, String(version));
    renameSync(tmp, dir);
    if (success) this.markDone(dir);
    return dir;
  }

  markDone(dir: string): void {
    writeFileSync(join(dir, '_SUCCESS'), '');
  }

  /** A full version of N keys (seed `version`), whose rows replace `want`. */
  full(version: number, want: Expected): Promise<string> {
    const m = makeModel(N, DIM, version, version);
    want.clear();
    m.keys.forEach((k, i) => want.set(k, m.values.slice(i * DIM, (i + 1) * DIM)));
    return this.write('full', version, (d) => writeNpyPair(join(d, 'part-0'), m.keys, m.values, DIM));
  }

  /** A delta: 100 upserts (50 existing keys, 50 new) and 20 deletes of existing keys, applied to `want`. */
  delta(version: number, want: Expected, success = true): Promise<string> {
    const existing = [...want.keys()];
    const upKeys = new BigUint64Array(100);
    const values = new Float32Array(100 * DIM);
    for (let i = 0; i < 100; i++) {
      upKeys[i] = i < 50 ? existing[(i * 7 + version) % existing.length]! : scramble(BigInt(version) * 1_000_003n + BigInt(i) + (1n << 60n));
      for (let j = 0; j < DIM; j++) values[i * DIM + j] = version * 1000 + i + j / 10;
    }
    const upSet = new Set(upKeys);
    const deletes = BigUint64Array.from(existing.filter((k) => !upSet.has(k)).slice(version * 20, version * 20 + 20));
    upKeys.forEach((k, i) => want.set(k, values.slice(i * DIM, (i + 1) * DIM)));
    deletes.forEach((k) => want.delete(k));
    return this.write('incremental', version, async (d) => {
      await writeNpyPair(join(d, 'part-0'), upKeys, values, DIM);
      await writeNpy(join(d, 'part-0.deletes.npy'), '<u8', [deletes.length], deletes);
    }, success);
  }

  /** A delta with a NaN in its values: refused by the loader. */
  badDelta(version: number): Promise<string> {
    const keys = BigUint64Array.from([scramble(1n << 61n), scramble((1n << 61n) + 1n)]);
    const values = new Float32Array(2 * DIM).fill(1);
    values[DIM + 3] = NaN;
    return this.write('incremental', version, (d) => writeNpyPair(join(d, 'part-0'), keys, values, DIM));
  }
}

describe('kvctl watch', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let sources: string;
  const watchers: WatchProcess[] = [];
  let seq = 0;

  before(async () => {
    cluster = await TestCluster.start(2, 2, { keepVersions: 2 });
    client = new EmbeddingClient({ config: cluster.configPath });
    sources = mkdtempSync(join(tmpdir(), 'embkv-watch-'));
  });
  after(async () => {
    await Promise.all(watchers.map((w) => w.kill()));
    await client?.close();
    await cluster?.close();
    rmSync(sources, { recursive: true, force: true });
  });

  const watch = (table: string, source: string, extra: string[] = []): WatchProcess => {
    const w = new WatchProcess(cluster, table, source, extra);
    watchers.push(w);
    return w;
  };
  const newSource = (): Trainer => new Trainer(join(sources, `src-${seq++}`));

  /** Every key ever written (and some never) is served as `want` says, bit for bit, at `version`. */
  async function assertServes(table: string, version: number, want: Expected, alsoAbsent: bigint[] = []): Promise<void> {
    const keys = BigUint64Array.from([...want.keys(), ...alsoAbsent, scramble(1n << 62n)]);
    const r = await client.getEmbeddings(keys, { table });
    assert.equal(r.version, version);
    keys.forEach((k, i) => {
      const v = want.get(k);
      if (v === undefined) {
        assert.equal(r.found[i], 0, `key ${k} should be absent at v${version}`);
      } else {
        assert.equal(r.found[i], 1, `key ${k} should be present at v${version}`);
        assert.ok(sameBits(r.values.subarray(i * DIM, (i + 1) * DIM), v), `key ${k} at v${version}`);
      }
    });
  }

  async function statusJson(): Promise<{ status?: { tables: { name: string; currentVersion: number }[]; watchers?: { table: string; action: string; error: string }[] } }[]> {
    const r = await cluster.kvctl(['status', '--json']);
    assert.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout);
  }

  async function currentOf(table: string): Promise<number> {
    const all = await statusJson();
    const cur = new Set(all.map((s) => s.status!.tables.find((t) => t.name === table)?.currentVersion ?? 0));
    assert.equal(cur.size, 1, `replicas disagree on ${table}'s current version`);
    return [...cur][0]!;
  }

  test('two full versions and three deltas, appearing one after another, are loaded, published and served bit-exact', async () => {
    const src = newSource();
    const want: Expected = new Map();
    const everKeys: bigint[] = [];
    const w = watch('t1', src.root);
    await w.waitFor(/^watch t1: started/);
    const steps: ['full' | 'incremental', number][] = [['full', 1], ['incremental', 2], ['incremental', 3], ['full', 4], ['incremental', 5]];
    for (const [kind, v] of steps) {
      const t0 = Date.now();
      await (kind === 'full' ? src.full(v, want) : src.delta(v, want));
      everKeys.push(...want.keys());
      const line = await w.waitFor(new RegExp(`^watch t1: published ${kind}/${v}: v${v} is current, (\\d+\\.\\d) s after its _SUCCESS$`));
      // The delay it reports is from the marker's mtime, written after t0, to the publish, before now.
      const since = Number(/, (\d+\.\d) s after/.exec(line)![1]);
      assert.ok(since <= (Date.now() - t0) / 1000 + 0.05, `${line} (${Date.now() - t0} ms since the dump was begun)`);
      await assertServes('t1', v, want, everKeys);
    }
    for (const [kind, v] of steps) {
      assert.equal(w.count(new RegExp(`^watch t1: found ${kind}/${v}$`)), 1, w.lines.join('\n'));
      assert.equal(w.count(new RegExp(`^watch t1: loaded ${kind}/${v} `)), 1, w.lines.join('\n'));
    }
    // kvctl status shows the watcher's last action, from the replicas.
    const text = await cluster.kvctl(['status']);
    assert.match(text.stdout, /^watcher t1 {2}\S+:\d+ {2}source /m);
    assert.match(text.stdout, /last action \d+ s ago: published incremental\/5: v5 is current, \d+\.\d s after its _SUCCESS/);
    const json = await statusJson();
    for (const s of json) assert.match(s.status!.watchers!.find((n) => n.table === 't1')!.action, /published incremental\/5/);
    // SIGTERM stops an idle watcher within 2 s.
    const t0 = Date.now();
    w.proc.kill('SIGTERM');
    const { code } = await w.exited;
    assert.equal(code, 0, w.stderr);
    assert.ok(Date.now() - t0 < 2000, `stopped in ${Date.now() - t0} ms`);
    assert.match(w.lines.at(-1)!, /^watch t1: stopped$/);
  });

  test('a version without _SUCCESS is not loaded until its marker appears', async () => {
    const src = newSource();
    const want: Expected = new Map();
    const w = watch('t2', src.root);
    await src.full(1, want);
    await w.waitFor(/^watch t2: published full\/1/);
    const before = new Map(want);
    const dir = await src.delta(2, want, false);
    await w.waitFor(/^watch t2: waiting: incremental\/2 has no _SUCCESS yet$/);
    assert.equal(await currentOf('t2'), 1);
    await assertServes('t2', 1, before);
    assert.equal(w.count(/loading incremental\/2/), 0);
    src.markDone(dir);
    await w.waitFor(/^watch t2: published incremental\/2/);
    await assertServes('t2', 2, want);
  });

  test('a bad delta is refused and skipped; the cluster keeps serving; the watcher moves on at a newer full version', async () => {
    const src = newSource();
    const want: Expected = new Map();
    const w = watch('t3', src.root);
    await src.full(1, want);
    await w.waitFor(/^watch t3: published full\/1/);
    await src.badDelta(2);
    const refused = await w.waitFor(/^watch t3: refused incremental\/2: /);
    assert.match(refused, /NaN/);
    await assertServes('t3', 1, want);
    // A good delta after the bad one waits: it was built on the refused delta's version.
    const lost = new Map(want);
    await src.delta(3, lost);
    await w.waitFor(/^watch t3: skipped incremental\/3: incremental\/2 was refused; waiting for a newer complete full version$/);
    assert.equal(await currentOf('t3'), 1);
    await assertServes('t3', 1, want);
    // kvctl status shows the refusal.
    const text = await cluster.kvctl(['status']);
    assert.match(text.stdout, /last error \d+ s ago: refused incremental\/2: /);
    // A newer full version, and a delta above it, load; the refused delta is never tried again.
    await src.full(4, want);
    await w.waitFor(/^watch t3: published full\/4/);
    await src.delta(5, want);
    await w.waitFor(/^watch t3: published incremental\/5/);
    await assertServes('t3', 5, want);
    assert.equal(w.count(/loading incremental\/2 /), 1, w.lines.join('\n'));
    assert.equal(w.count(/loading incremental\/3 /), 0, w.lines.join('\n'));
  });

  test('a watcher killed with kill -9 and started again resumes from what the cluster holds', async () => {
    const src = newSource();
    const want: Expected = new Map();
    const w1 = watch('t4', src.root);
    await src.full(1, want);
    await src.delta(2, want);
    await w1.waitFor(/^watch t4: published incremental\/2/);
    await w1.kill('SIGKILL');
    await src.delta(3, want);
    await src.delta(4, want);
    const w2 = watch('t4', src.root);
    await w2.waitFor(/^watch t4: published incremental\/4/);
    await assertServes('t4', 4, want);
    assert.equal(w2.count(/loading (full\/1|incremental\/2) /), 0, w2.lines.join('\n'));
    assert.equal(w2.count(/loaded incremental\/3 /), 1, w2.lines.join('\n'));
  });

  test('two watchers on one table load each version once', async (t) => {
    const src = newSource();
    const want: Expected = new Map();
    const a = watch('t5', src.root);
    const b = watch('t5', src.root);
    await Promise.all([a.waitFor(/started/), b.waitFor(/started/)]);
    const steps: ['full' | 'incremental', number][] = [['full', 1], ['incremental', 2], ['incremental', 3]];
    for (const [kind, v] of steps) {
      await (kind === 'full' ? src.full(v, want) : src.delta(v, want));
      await Promise.race([a.waitFor(new RegExp(`published ${kind}/${v}:`)), b.waitFor(new RegExp(`published ${kind}/${v}:`))]);
      await assertServes('t5', v, want);
    }
    for (const [kind, v] of steps) {
      const loaded = a.count(new RegExp(`loaded ${kind}/${v} `)) + b.count(new RegExp(`loaded ${kind}/${v} `));
      assert.equal(loaded, 1, `${kind}/${v} loaded ${loaded} times:\n${a.lines.join('\n')}\n--\n${b.lines.join('\n')}`);
    }
    const deferred = [...a.lines, ...b.lines].filter((l) => /another loader/.test(l)).length;
    t.diagnostic(`${deferred} times a watcher found the other at work on a version (waiting, or skipped as loaded)`);
  });

  test('--no-publish stages a version and waits for it to be published before the next', async () => {
    const src = newSource();
    const want: Expected = new Map();
    const w = watch('t6', src.root, ['--no-publish']);
    await src.full(1, want);
    await w.waitFor(/^watch t6: loaded full\/1 /);
    await w.waitFor(/^watch t6: waiting: v1 is loaded but not published/);
    assert.equal(await currentOf('t6'), 0);
    const pub = await cluster.kvctl(['publish', '--table', 't6', '--version', '1']);
    assert.equal(pub.code, 0, pub.stderr);
    await src.delta(2, want);
    await w.waitFor(/^watch t6: loaded incremental\/2 /);
    assert.equal(await currentOf('t6'), 1);
  });

  test('a full version\'s _embkv.json snapshotTime keeps the puts stamped at or after it on every replica; bad metadata is refused and the cluster keeps serving', async () => {
    const src = newSource();
    const m1 = makeModel(N, DIM, 31, 1);
    const m2 = makeModel(N, DIM, 31, 2); // the same keys, marker 2
    const w = watch('t7', src.root);
    await src.write('full', 1, (d) => writeNpyPair(join(d, 'part-0'), m1.keys, m1.values, DIM));
    await w.waitFor(/^watch t7: published full\/1: v1 is current/);
    // Puts stamped just before S and at S, through the path the SDK and the Kafka ingester share.
    const s = Date.now() + 1;
    const older = m1.keys.slice(0, 10);
    const kept = m1.keys.slice(10, 20);
    const conns = new ClusterConnections(cluster.manifest);
    try {
      for (const [keys, order, writer] of [[older, s * ORDER_SCALE - 1, 'w-older'], [kept, s * ORDER_SCALE, 'w-kept']] as const) {
        const values = new Float32Array(keys.length * DIM).fill(order === s * ORDER_SCALE ? 7 : 6);
        await putToGroups(conns, { table: 't7', keys: await packKeys(keys), values, dim: DIM, order, writer, deadline: Date.now() + 10_000 });
      }
    } finally {
      conns.close();
    }
    const put = (keys: BigUint64Array, x: number): [bigint, Float32Array][] => [...keys].map((k) => [k, new Float32Array(DIM).fill(x)]);
    const puts = new Map([...put(older, 6), ...put(kept, 7)]);
    await until('the puts on every replica', async () => ((await differsOnReplicas(cluster.manifest, 't7', puts)) === undefined ? true : undefined));
    await until('the clock to pass S', async () => (Date.now() > s ? true : undefined));
    // The trainer declares the snapshot v2 was built from; its load begins after S.
    const iso = new Date(s).toISOString();
    await src.write('full', 2, async (d) => {
      await writeNpyPair(join(d, 'part-0'), m2.keys, m2.values, DIM);
      writeFileSync(join(d, '_embkv.json'), JSON.stringify({ snapshotTime: iso }));
    });
    await w.waitFor(/^watch t7: published full\/2: v2 is current/);
    assert.match(w.lines.join('\n'), new RegExp(`^watch t7: loaded full/2 as v2: ${N} keys of dim ${DIM} in [\\d.]+ s; snapshot ${iso}$`, 'm'));
    const at = new Map<bigint, number>();
    m2.keys.forEach((k, i) => at.set(k, i));
    const want = new Map([...[...older].map((k): [bigint, Float32Array] => [k, m2.values.slice(at.get(k)! * DIM, (at.get(k)! + 1) * DIM)]), ...put(kept, 7)]);
    const d = await differsOnReplicas(cluster.manifest, 't7', want);
    assert.equal(d, undefined, d);
    // Bad metadata refuses the dump like any bad dump; v2 and the puts over it keep serving.
    await src.write('full', 3, async (dir) => {
      await writeNpyPair(join(dir, 'part-0'), m1.keys, m1.values, DIM);
      writeFileSync(join(dir, '_embkv.json'), '{"snapshotTime": ');
    });
    assert.match(await w.waitFor(/^watch t7: refused full\/3: /), /full\/3\/_embkv\.json is not valid JSON/);
    await src.write('full', 4, async (dir) => {
      await writeNpyPair(join(dir, 'part-0'), m1.keys, m1.values, DIM);
      writeFileSync(join(dir, '_embkv.json'), JSON.stringify({ snapshotTime: '2026-12-02 17:35:09' }));
    });
    assert.match(await w.waitFor(/^watch t7: refused full\/4: /), /_embkv\.json: snapshotTime must be an ISO 8601 time with a zone/);
    assert.equal(await currentOf('t7'), 2);
    const still = await differsOnReplicas(cluster.manifest, 't7', want);
    assert.equal(still, undefined, still);
  });

  test('--interval takes a unit and is checked', async () => {
    const r = await cluster.kvctl(['watch', '--table', 'x', '--source', sources, '--interval', '30']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /--interval must be a number with a unit, such as 500ms, 30s or 2m/);
  });
});

describe('nextStep', () => {
  const sv = (kind: 'full' | 'incremental', version: number, complete = true): SourceVersion => ({ kind, version, dir: `${kind}/${version}`, name: String(version), complete });
  const view = (current: number, sealed: [number, number][] = []): ClusterView => ({ current, sealed: new Map(sealed.map(([v, base]) => [v, { base }])) });
  const step = (v: ClusterView, fulls: SourceVersion[], deltas: SourceVersion[], refused: string[] = [], publish = true) => {
    const skipped: string[] = [];
    const s = nextStep(v, fulls, deltas, new Set(refused), publish, (x) => skipped.push(x.dir));
    return { s, skipped };
  };

  test('the newest complete full version first; older ones and deltas up to it are skipped', () => {
    const { s, skipped } = step(view(0), [sv('full', 1), sv('full', 3), sv('full', 5, false)], [sv('incremental', 2), sv('incremental', 4)]);
    assert.deepEqual(s, { kind: 'load', v: sv('full', 3) });
    assert.deepEqual(skipped, ['full/1', 'incremental/2']);
  });

  test('deltas in order on the current version; an incomplete one waits; a refused one blocks the rest', () => {
    assert.deepEqual(step(view(3), [sv('full', 3)], [sv('incremental', 4), sv('incremental', 5)]).s, { kind: 'load', v: sv('incremental', 4) });
    assert.equal(step(view(3), [], [sv('incremental', 4, false), sv('incremental', 5)]).s.kind, 'wait');
    const r = step(view(3), [], [sv('incremental', 4), sv('incremental', 5)], ['incremental/4']);
    assert.deepEqual(r.s, { kind: 'idle' });
    assert.deepEqual(r.skipped, ['incremental/5']);
  });

  test('a refused or incomplete full version blocks the deltas above it, not those below', () => {
    assert.deepEqual(step(view(3), [sv('full', 6, false)], [sv('incremental', 4), sv('incremental', 7)]).s, { kind: 'load', v: sv('incremental', 4) });
    const r = step(view(4), [sv('full', 6)], [sv('incremental', 7)], ['full/6']);
    assert.deepEqual(r.s, { kind: 'idle' });
    assert.deepEqual(r.skipped, ['incremental/7']);
  });

  test('a version sealed everywhere but not current is published; with --no-publish it stops everything', () => {
    assert.deepEqual(step(view(3, [[4, 3]]), [], [sv('incremental', 4)]).s, { kind: 'publish', v: sv('incremental', 4) });
    assert.equal(step(view(3, [[4, 3]]), [sv('full', 9)], [sv('incremental', 4)], [], false).s.kind, 'wait');
  });
});

describe('kvctl watch on S3-compatible object storage (s3rver)', () => {
  let cluster: TestCluster;
  let client: EmbeddingClient;
  let s3: TestS3;
  let w: WatchProcess | undefined;
  const saved: Record<string, string | undefined> = {};

  before(async () => {
    // The watcher finds credentials and region in the standard AWS chain, as in production.
    for (const [k, v] of Object.entries(S3RVER_ENV)) {
      saved[k] = process.env[k];
      process.env[k] = v;
    }
    cluster = await TestCluster.start(2, 1, { partitions: 8 });
    client = new EmbeddingClient({ config: cluster.configPath });
    s3 = await TestS3.start(join(cluster.dir, 's3'));
  });
  after(async () => {
    await w?.kill();
    await client?.close();
    await s3?.close();
    await cluster?.close();
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });

  test('a full version and a delta uploaded under s3://BUCKET/models/ are loaded in turn, published and served bit-exact', async () => {
    const local = new Trainer(join(cluster.dir, 'trainer'));
    const want: Expected = new Map();
    /** Uploads a version written locally without its marker, then its _SUCCESS last, as a job would. */
    const upload = async (kind: 'full' | 'incremental', version: number, dir: string): Promise<void> => {
      await s3.putDir(dir, `models/${kind}/${version}/`);
      await s3.put(`models/${kind}/${version}/_SUCCESS`, '');
    };
    w = new WatchProcess(cluster, 's3t', s3.url('models/'), ['--s3-endpoint', s3.endpoint]);
    await w.waitFor(/^watch s3t: started/);
    // The data is in place before the marker: the watcher must wait for the marker, not load early.
    // The dump declares its snapshot time in _embkv.json, read from the prefix like the parts.
    const snapshot = new Date(Date.now() - 3_600_000).toISOString();
    const full = await local.write('full', 1, async (d) => {
      const m = makeModel(N, DIM, 11, 1);
      m.keys.forEach((k, i) => want.set(k, m.values.slice(i * DIM, (i + 1) * DIM)));
      await writeNpyPair(join(d, 'part-0'), m.keys, m.values, DIM);
      writeFileSync(join(d, '_embkv.json'), JSON.stringify({ snapshotTime: snapshot }));
    }, false);
    await upload('full', 1, full);
    await w.waitFor(/^watch s3t: published full\/1: v1 is current/);
    const before = BigUint64Array.from(want.keys());
    const delta = await local.delta(2, want, false);
    await upload('incremental', 2, delta);
    // The delay is from the marker's LastModified (whole seconds in a HEAD answer).
    await w.waitFor(/^watch s3t: published incremental\/2: v2 is current, \d+\.\d s after its _SUCCESS$/);
    const keys = BigUint64Array.from(new Set([...before, ...want.keys()]));
    const r = await client.getEmbeddings(keys, { table: 's3t' });
    assert.equal(r.version, 2);
    keys.forEach((k, i) => {
      const v = want.get(k);
      assert.equal(r.found[i], v === undefined ? 0 : 1, `key ${k}`);
      if (v !== undefined) assert.ok(sameBits(r.values.subarray(i * DIM, (i + 1) * DIM), v), `key ${k}`);
    });
    assert.match(w.lines.join('\n'), new RegExp(`loaded full/1 as v1: 2000 keys of dim ${DIM} in [\\d.]+ s; snapshot ${snapshot}$`, 'm'));
  });

  test('object storage failing during a load: reported and tried again with backoff, never refused; loaded once it is back', async () => {
    await w?.kill();
    const proxy = await S3Proxy.start(s3.port);
    try {
      const local = new Trainer(join(cluster.dir, 'trainer-outage'));
      const want: Expected = new Map();
      const upload = async (kind: 'full' | 'incremental', version: number, dir: string): Promise<void> => {
        await s3.putDir(dir, `outage/${kind}/${version}/`);
        await s3.put(`outage/${kind}/${version}/_SUCCESS`, '');
      };
      w = new WatchProcess(cluster, 's3o', s3.url('outage/'), ['--s3-endpoint', proxy.endpoint]);
      await upload('full', 1, await local.full(1, want));
      await w.waitFor(/^watch s3o: published full\/1: /);
      // Every read of the delta's objects is throttled: each load fails after the source's retries.
      proxy.rule = (r) => (r.method === 'GET' && r.path.startsWith('/dumps/outage/incremental/2/') ? SLOW_DOWN : undefined);
      await upload('incremental', 2, await local.delta(2, want, false));
      // Three failed loads: a failure of the dump's own would be refused at the third.
      await until('three failed loads of incremental/2', async () =>
        (w!.count(/^watch s3o: error: incremental\/2: s3 .*SlowDown.*\(gave up after 5 tries\); looking again in /) >= 3 ? true : undefined));
      proxy.rule = () => undefined;
      await w.waitFor(/^watch s3o: published incremental\/2: v2 is current/);
      assert.equal(w.count(/refused/), 0, w.lines.join('\n'));
      const keys = BigUint64Array.from(want.keys());
      const r = await client.getEmbeddings(keys, { table: 's3o' });
      assert.equal(r.version, 2);
      keys.forEach((k, i) => assert.ok(sameBits(r.values.subarray(i * DIM, (i + 1) * DIM), want.get(k)!), `key ${k}`));
    } finally {
      await w?.kill();
      await proxy.close();
    }
  });
});
