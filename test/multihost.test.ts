/**
 * Many hosts on one machine: Linux network namespaces on a bridge, each replica, etcd and the client
 * in one of its own, with its own address (no shared loopback; loads go over gRPC, --no-staging, as
 * between hosts). Needs root (ip netns); skipped with the reason otherwise.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { KVCTL, type RunResult } from './helpers/cluster.js';
import { TestEtcd } from './helpers/etcd.js';
import { until } from './helpers/util.js';

const LOOP = fileURLToPath(new URL('./helpers/lookup-loop.js', import.meta.url));
const CLUSTER = 'mh';
const KEYS = 300;
const DIM = 4;
const PORT = 7100;
const ID = process.pid % 10_000;
const SUBNET = `10.${200 + (ID % 50)}.${ID % 250}`;
const BRIDGE = `ekvbr${ID}`;
const HOSTS = ['etcd', 'cli', 'g0r0', 'g0r1', 'g1r0', 'g1r1'] as const;
type Host = (typeof HOSTS)[number];
const ns = (h: Host): string => `ekv${ID}-${h}`;
const veth = (h: Host): string => `ekv${ID}${HOSTS.indexOf(h)}`;
const ipOf = (h: Host, second = false): string => `${SUBNET}.${10 + HOSTS.indexOf(h) + (second ? 100 : 0)}`;

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Why namespaces cannot be made here, or undefined when they can. */
function cannotMakeNamespaces(): string | undefined {
  if (process.platform !== 'linux') return `network namespaces are Linux only (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return 'ip netns needs root (run the suite as root for the multi-host test)';
  try {
    ip('netns', 'add', `ekv${ID}-probe`);
    ip('netns', 'del', `ekv${ID}-probe`);
    ip('link', 'add', `ekvpr${ID}`, 'type', 'bridge');
    ip('link', 'del', `ekvpr${ID}`);
    return undefined;
  } catch (err) {
    return `cannot make network namespaces and bridges here: ${(err as { stderr?: Buffer }).stderr?.toString().trim() || (err as Error).message}`;
  }
}

const skipReason = cannotMakeNamespaces();

function writeVersion(path: string, v: number): void {
  let text = '';
  for (let k = 1; k <= KEYS; k++) text += `${k}\t${Array.from({ length: DIM }, () => v * 1000 + k).join(',')}\n`;
  writeFileSync(path, text);
}

interface LoopState {
  ok: number; failed: number; mixed: number; versions: Record<string, number>; lastError: string; addresses: string[]; hedgesSent: number; hedgesWon: number;
}

describe('many hosts: replicas, etcd and a client in network namespaces of their own', { skip: skipReason ?? false }, () => {
  let dir: string;
  let etcd: TestEtcd | undefined;
  const replicas = new Map<string, ChildProcess>();
  const logs = new Map<string, string>();
  let loop: ChildProcess | undefined;
  let loopState: LoopState | undefined;
  const made: string[] = [];
  const etcdUrl = `http://${ipOf('etcd')}:2379`;
  const source = ['--etcd', etcdUrl, '--cluster', CLUSTER];

  /** kvctl in the client's namespace. */
  const kvctlAt = (args: string[]): Promise<RunResult> => new Promise((resolve) => {
    const p = spawn('ip', ['netns', 'exec', ns('cli'), process.execPath, KVCTL, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('exit', (code) => resolve({ code, stdout, stderr }));
  });

  const startReplica = (h: 'g0r0' | 'g0r1' | 'g1r0' | 'g1r1', address: string): void => {
    const p = spawn('ip', [
      'netns', 'exec', ns(h), process.execPath, KVCTL, 'serve', ...source, '--group', h[1]!, '--replica', h[3]!, '--listen', address,
      '--insecure', '--lease-ttl', '2', '--data', join(dir, h),
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    logs.set(h, '');
    p.stderr!.on('data', (d: Buffer) => logs.set(h, (logs.get(h)! + d.toString()).slice(-20_000)));
    replicas.set(h, p);
  };

  const stopReplica = async (h: string, signal: NodeJS.Signals): Promise<void> => {
    const p = replicas.get(h);
    if (p === undefined || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await exited;
  };

  const registered = async (): Promise<Map<string, string>> => {
    const r = await kvctlAt(['status', '--json', ...source]);
    const all = JSON.parse(r.stdout || '[]') as { group: number; replica: number; address: string; status?: unknown }[];
    return new Map(all.filter((s) => s.status !== undefined).map((s) => [`g${s.group}r${s.replica}`, s.address]));
  };

  /** The client's counters once `ok` has grown by `more` lookups (failures and mixed answers are checked by the caller). */
  const lookupsGoOn = (what: string, more: number): Promise<LoopState> => {
    const from = loopState?.ok ?? 0;
    return until(what, async () => (loopState !== undefined && loopState.ok >= from + more ? loopState : undefined), { timeoutMs: 60_000 });
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'embkv-multihost-'));
    ip('link', 'add', BRIDGE, 'type', 'bridge');
    made.push(BRIDGE);
    ip('link', 'set', BRIDGE, 'up');
    for (const h of HOSTS) {
      ip('netns', 'add', ns(h));
      made.push(`netns:${ns(h)}`);
      ip('link', 'add', veth(h), 'type', 'veth', 'peer', 'name', `${veth(h)}b`);
      ip('link', 'set', `${veth(h)}b`, 'master', BRIDGE);
      ip('link', 'set', `${veth(h)}b`, 'up');
      ip('link', 'set', veth(h), 'netns', ns(h));
      ip('-n', ns(h), 'addr', 'add', `${ipOf(h)}/24`, 'dev', veth(h));
      ip('-n', ns(h), 'link', 'set', veth(h), 'up');
      ip('-n', ns(h), 'link', 'set', 'lo', 'up');
    }
    etcd = await TestEtcd.start({ host: ipOf('etcd'), ports: [2379, 2380], wrap: ['ip', 'netns', 'exec', ns('etcd')] });
    const manifest = {
      partitions: 8,
      groups: [0, 1].map((g) => ({ replicas: [0, 1].map((r) => `${ipOf(`g${g}r${r}` as Host)}:${PORT}`) })),
    };
    writeFileSync(join(dir, 'cluster.json'), JSON.stringify(manifest));
    const init = await kvctlAt(['cluster', 'init', ...source, '--config', join(dir, 'cluster.json')]);
    assert.equal(init.code, 0, init.stderr);
    for (const h of ['g0r0', 'g0r1', 'g1r0', 'g1r1'] as const) startReplica(h, `${ipOf(h)}:${PORT}`);
    await until('every replica registered and serving', async () => ((await registered()).size === 4 ? true : undefined), { everyMs: 200 });
    for (const v of [1, 2, 3]) writeVersion(join(dir, `v${v}.txt`), v);
  });

  after(async () => {
    if (loop !== undefined && loop.exitCode === null && loop.signalCode === null) {
      const exited = new Promise((r) => loop!.once('exit', r));
      loop.kill('SIGKILL');
      await exited;
    }
    await Promise.all([...replicas.keys()].map((h) => stopReplica(h, 'SIGKILL')));
    await etcd?.close();
    for (const m of made.reverse()) {
      try {
        if (m.startsWith('netns:')) ip('netns', 'del', m.slice(6));
        else ip('link', 'del', m);
      } catch {
        // gone already
      }
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('load and publish, a replica moving, etcd stopped and started, a replica cut off: no lookup fails or mixes versions', async () => {
    // A full load and publish from the client's host, over the network.
    const l1 = await kvctlAt(['load', ...source, '--table', 'emb', '--version', '1', '--full', join(dir, 'v1.txt'), '--publish', '--no-staging']);
    assert.equal(l1.code, 0, l1.stderr);
    assert.doesNotMatch(l1.stdout, /staged/);
    loop = spawn('ip', ['netns', 'exec', ns('cli'), process.execPath, LOOP, etcdUrl, CLUSTER, String(KEYS), String(DIM)], { stdio: ['ignore', 'pipe', 'inherit'] });
    createInterface({ input: loop.stdout! }).on('line', (line) => {
      loopState = JSON.parse(line) as LoopState;
    });
    const check = (): void => {
      assert.equal(loopState!.failed, 0, `a lookup failed: ${loopState!.lastError}`);
      assert.equal(loopState!.mixed, 0, 'an answer mixed versions');
    };
    await lookupsGoOn('the client answers v1', 20);
    check();

    const l2 = await kvctlAt(['load', ...source, '--table', 'emb', '--version', '2', '--full', join(dir, 'v2.txt'), '--no-publish', '--no-staging']);
    assert.equal(l2.code, 0, l2.stderr);
    const p2 = await kvctlAt(['publish', ...source, '--table', 'emb', '--version', '2']);
    assert.equal(p2.code, 0, p2.stderr);
    await until('the client answers v2', async () => ((loopState?.versions['2'] ?? 0) > 0 ? true : undefined));
    check();

    // Replica 0 of group 0 moves to another address of its host; then its peer dies: group 0 is served from the new address.
    await stopReplica('g0r0', 'SIGTERM');
    ip('-n', ns('g0r0'), 'addr', 'add', `${ipOf('g0r0', true)}/24`, 'dev', veth('g0r0'));
    const moved = `${ipOf('g0r0', true)}:${PORT}`;
    startReplica('g0r0', moved);
    await until('the client follows g0r0 to its new address', async () => (loopState?.addresses[0] === moved ? true : undefined), { timeoutMs: 30_000 });
    await stopReplica('g0r1', 'SIGKILL');
    await lookupsGoOn('lookups go on with g0r1 dead', 20);
    check();
    startReplica('g0r1', `${ipOf('g0r1')}:${PORT}`);
    await until('g0r1 back', async () => ((await registered()).get('g0r1') !== undefined ? true : undefined), { everyMs: 200 });

    // etcd stopped: lookups go on, a publish fails naming etcd; started again: the publish goes through.
    await etcd!.stop();
    const refused = await kvctlAt(['rollback', ...source, '--table', 'emb', '--version', '1']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, new RegExp(`KV_UNAVAILABLE: etcd ${etcdUrl}`));
    await lookupsGoOn('lookups go on without etcd', 20);
    check();
    await etcd!.restart();
    await until('a rollback works again', async () => ((await kvctlAt(['rollback', ...source, '--table', 'emb', '--version', '1'])).code === 0 ? true : undefined), { everyMs: 500 });
    const seenV1 = loopState!.versions['1'] ?? 0;
    await until('the client answers v1 again', async () => ((loopState?.versions['1'] ?? 0) > seenV1 ? true : undefined));
    check();

    // One replica's link goes down while lookups run: hedging and its expired lease hide it.
    ip('-n', ns('g1r0'), 'link', 'set', veth('g1r0'), 'down');
    try {
      await lookupsGoOn('lookups go on with g1r0 cut off', 100);
      check();
    } finally {
      ip('-n', ns('g1r0'), 'link', 'set', veth('g1r0'), 'up');
    }
    await until('g1r0 registered again', async () => ((await registered()).get('g1r0') !== undefined ? true : undefined), { everyMs: 200, timeoutMs: 60_000 });
    await lookupsGoOn('lookups go on after', 20);
    check();
  });
});
