import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { parseManifest } from '../src/cluster/manifest.js';
import { CHANNEL_OPTIONS } from '../src/transport/options.js';
import { type LookupResponse } from '../src/wire/lookup.js';
import { EmbkvClient } from '../src/wire/services.js';
import { statusAll } from '../src/loader/cluster-ops.js';
import { TEST_DELAY_METADATA } from '../src/replica/server.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { freePorts, KVCTL, TestCluster } from './helpers/cluster.js';
import { alive, until } from './helpers/util.js';
import { makeModel, writeModelPart } from './helpers/model.js';

/** The bar for an idle stop: Redis stops in well under a second; embkv must within 2 s. */
const IDLE_STOP_MS = 2000;
const DIM = 4;

/** A Lookup sent straight to one replica, with the test switch's delay and a deadline of its own. */
function lookupAt(address: string, keys: BigUint64Array, delayMs: number, deadlineMs: number): Promise<LookupResponse> {
  const c = new EmbkvClient(address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  const md = new grpc.Metadata();
  if (delayMs > 0) md.set(TEST_DELAY_METADATA, String(delayMs));
  return new Promise<LookupResponse>((resolve, reject) => {
    (c as unknown as { lookup: Function }).lookup(
      { table: 'emb', version: 0, keys: new Uint8Array(keys.buffer, keys.byteOffset, keys.byteLength) },
      md,
      { deadline: new Date(Date.now() + deadlineMs) },
      (err: Error | null, r: LookupResponse) => {
        c.close();
        if (err) reject(err);
        else resolve(r);
      },
    );
  });
}

/** Stops replica gGrR with `signal`; resolves with its exit code and how long it took. */
async function timedStop(cluster: TestCluster, g: number, r: number, signal: NodeJS.Signals): Promise<{ code: number | null; ms: number }> {
  const p = cluster.procs.get(`g${g}r${r}`)!;
  const exited = once(p, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  const t0 = performance.now();
  p.kill(signal);
  const [code] = await exited;
  return { code, ms: performance.now() - t0 };
}

describe('stopping a replica', () => {
  let cluster: TestCluster;
  const model = makeModel(2000, DIM, 3, 1);

  before(async () => {
    // One group of two, so each replica holds its peer's connections open, as in a real cluster.
    cluster = await TestCluster.start(1, 2, { partitions: 4, env: { EMBKV_TEST_FAULTS: '1' } });
    const dir = join(cluster.dir, 'model');
    mkdirSync(dir);
    await writeModelPart(join(dir, 'part-0'), model, 0, model.keys.length);
    const r = await cluster.kvctl(['load', '--table', 'emb', '--version', '1', '--full', dir, '--publish']);
    assert.equal(r.code, 0, r.stderr);
  });

  after(() => cluster?.close());

  test('an idle replica stops at once on SIGTERM and on SIGINT, with peers connected to it', async () => {
    for (const signal of ['SIGTERM', 'SIGINT'] as const) {
      const stopped = cluster.waitForLog(0, 0, /"msg":"stopped"/);
      const { code, ms } = await timedStop(cluster, 0, 0, signal);
      assert.equal(code, 0, `${signal}: exit code`);
      assert.match(await stopped, /"drained":\d+,"cut":0/);
      assert.ok(ms < IDLE_STOP_MS, `${signal}: stopped in ${ms.toFixed(0)} ms`);
      cluster.startReplica(0, 0);
      await cluster.waitReady();
    }
  });

  test('a replica with a call in flight refuses new calls, finishes that one, then stops', async () => {
    const address = cluster.manifest.groups[0]!.replicas[1]!;
    const keys = model.keys.slice(0, 100);
    const delayed = cluster.waitForLog(0, 1, /test switch: delaying a lookup/);
    const inFlight = lookupAt(address, keys, 3000, 60_000);
    await delayed;
    const draining = cluster.waitForLog(0, 1, /draining calls in flight/);
    const stopped = cluster.waitForLog(0, 1, /"msg":"stopped"/);
    const exited = once(cluster.procs.get('g0r1')!, 'exit');
    cluster.signalReplica(0, 1, 'SIGTERM');
    await draining;
    // A new call while it drains: refused at once with UNAVAILABLE, so a client goes to another replica.
    await assert.rejects(lookupAt(address, keys, 0, 10_000), (err: grpc.ServiceError) => {
      assert.equal(err.code, grpc.status.UNAVAILABLE);
      assert.match(err.details, /shutting down/);
      return true;
    });
    // The call it had taken is answered in full.
    const r = await inFlight;
    assert.equal(r.found.reduce((a, f) => a + f, 0), keys.length);
    assert.equal(r.values[DIM + 1], 1, 'the second key answers its own row');
    // Its peer's sync calls may be in flight too: at least this call was drained, and none was cut.
    assert.match(await stopped, /"drained":[1-9]\d*,"cut":0/);
    assert.deepEqual(await exited, [0, null]);
    cluster.startReplica(0, 1);
    await cluster.waitReady();
  });

  test('a call in flight holds a stop only until its deadline, not until the answer it would give', async () => {
    const address = cluster.manifest.groups[0]!.replicas[1]!;
    const delayed = cluster.waitForLog(0, 1, /test switch: delaying a lookup/);
    // The switch would answer after 10 minutes; the call's deadline is 1 s.
    const inFlight = lookupAt(address, model.keys.slice(0, 10), 600_000, 1000).then(() => 'answered', (err: grpc.ServiceError) => err.code);
    await delayed;
    const stopped = cluster.waitForLog(0, 1, /"msg":"stopped"/);
    const exited = once(cluster.procs.get('g0r1')!, 'exit');
    cluster.signalReplica(0, 1, 'SIGTERM');
    // The call ended at its deadline, and the stop with it: nothing was cut, nothing waited 10 minutes.
    assert.match(await stopped, /"drained":[1-9]\d*,"cut":0/);
    assert.deepEqual(await exited, [0, null]);
    assert.equal(await inFlight, grpc.status.DEADLINE_EXCEEDED);
    cluster.startReplica(0, 1);
    await cluster.waitReady();
  });
});

describe('stopping kvctl cluster up and kvctl demo', () => {
  let dir: string;
  let configPath: string;
  let conns: ClusterConnections;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'embkv-stop-'));
    const ports = await freePorts(4);
    const raw = { partitions: 8, groups: [0, 1].map((g) => ({ replicas: [`127.0.0.1:${ports[2 * g]}`, `127.0.0.1:${ports[2 * g + 1]}`] })) };
    configPath = join(dir, 'cluster.json');
    writeFileSync(configPath, JSON.stringify(raw));
    conns = new ClusterConnections(parseManifest(raw));
  });

  after(() => {
    conns.close();
    rmSync(dir, { recursive: true, force: true });
  });


  /** Starts `kvctl args` in the test dir; resolves once its output has a line matching `ready`. */
  async function startUntil(args: string[], ready: RegExp): Promise<{ proc: ReturnType<typeof spawn>; output: () => string }> {
    const proc = spawn(process.execPath, [KVCTL, ...args], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    await new Promise<void>((resolve, reject) => {
      const onData = (d: Buffer): void => {
        out += d;
        if (ready.test(out)) resolve();
      };
      proc.stdout!.on('data', onData);
      proc.stderr!.on('data', onData);
      proc.once('exit', (code) => reject(new Error(`kvctl ${args.join(' ')} exited (${code}) before ${ready}:\n${out}`)));
    });
    return { proc, output: () => out };
  }

  /** SIGINT, as Ctrl-C sends it; resolves with the exit code and the time until it and every replica were gone. */
  async function interrupt(proc: ReturnType<typeof spawn>, replicas: number[]): Promise<{ code: number | null; ms: number }> {
    const exited = once(proc, 'exit') as Promise<[number | null]>;
    const t0 = performance.now();
    proc.kill('SIGINT');
    const [code] = await exited;
    // The replicas are stopped before the parent exits; none may be left.
    for (const pid of replicas) assert.ok(!alive(pid), `replica ${pid} still running after its parent stopped`);
    return { code, ms: performance.now() - t0 };
  }

  const replicaPids = (): Promise<number[]> => until('every replica to answer Status', async () => {
    const all = await statusAll(conns, 2000);
    return all.every((s) => s.status) ? all.map((s) => s.status!.pid) : undefined;
  });

  test('kvctl cluster up stops every replica within 2 s of Ctrl-C', async () => {
    const { proc } = await startUntil(['cluster', 'up', '--config', configPath, '--data', join(dir, 'up')], /started 4 replicas/);
    const pids = await replicaPids();
    const { code, ms } = await interrupt(proc, pids);
    assert.equal(code, 0);
    assert.ok(ms < IDLE_STOP_MS, `stopped in ${ms.toFixed(0)} ms`);
  });

  test('kvctl demo, serving, stops within 2 s of Ctrl-C', async () => {
    const { proc, output } = await startUntil(['demo', '--config', configPath, '--data', join(dir, 'demo'), '--keys', '20000', '--requests', '1'], /serving demo_emb v\d+ until Ctrl-C/);
    assert.match(output(), /sampled answers checked against the model: all exact/);
    const pids = await replicaPids();
    const { code, ms } = await interrupt(proc, pids);
    assert.equal(code, 0);
    assert.ok(ms < IDLE_STOP_MS, `stopped in ${ms.toFixed(0)} ms`);
  });
});
