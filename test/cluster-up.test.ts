import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseManifest } from '../src/cluster/manifest.js';
import { REPLICA_MALLOC_ENV, REPLICA_NODE_FLAGS } from '../src/common/process-tuning.js';
import { statusAll } from '../src/loader/cluster-ops.js';
import { ClusterConnections } from '../src/cluster/connections.js';
import { freePorts, KVCTL } from './helpers/cluster.js';
import { alive, until } from './helpers/util.js';


describe('kvctl cluster up', () => {
  let dir: string;
  let configPath: string;
  let conns: ClusterConnections;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'embkv-up-'));
    const ports = await freePorts(2);
    const raw = { partitions: 8, groups: [{ replicas: [`127.0.0.1:${ports[0]}`] }, { replicas: [`127.0.0.1:${ports[1]}`] }] };
    configPath = join(dir, 'cluster.json');
    writeFileSync(configPath, JSON.stringify(raw));
    conns = new ClusterConnections(parseManifest(raw));
  });

  after(() => {
    conns.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const start = (): { proc: ChildProcess; stderr: () => string } => {
    const proc = spawn(process.execPath, [KVCTL, 'cluster', 'up', '--config', configPath, '--data', join(dir, 'data')], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    proc.stderr!.on('data', (d) => (err += d));
    return { proc, stderr: () => err };
  };
  const pids = async (): Promise<number[] | undefined> => {
    const all = await statusAll(conns, 1000);
    return all.every((s) => s.status) ? all.map((s) => s.status!.pid) : undefined;
  };

  test('restarts a replica killed with kill -9, and SIGTERM stops every replica cleanly', async () => {
    const { proc, stderr } = start();
    const first = await until('every replica up', pids);
    process.kill(first[0]!, 'SIGKILL');
    const second = await until('the killed replica restarted', async () => {
      const p = await pids();
      return p && p[0] !== first[0] ? p : undefined;
    });
    assert.equal(second[1], first[1], 'the other replica was left alone');
    assert.match(stderr(), /replica g0r0 exited \(SIGKILL\); restarting/);
    // The restarted replica runs with the runtime settings cluster up gives every replica.
    const cmdline = readFileSync(`/proc/${second[0]}/cmdline`, 'utf8').split('\0');
    for (const flag of REPLICA_NODE_FLAGS) assert.ok(cmdline.includes(flag), `started with ${flag}: ${cmdline.join(' ')}`);
    const environ = readFileSync(`/proc/${second[0]}/environ`, 'utf8').split('\0');
    for (const [k, v] of Object.entries(REPLICA_MALLOC_ENV)) assert.ok(environ.includes(`${k}=${process.env[k] ?? v}`), `${k} set`);

    const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
    proc.kill('SIGTERM');
    assert.equal(await exited, 0);
    for (const pid of second) assert.ok(!alive(pid), `replica ${pid} still running after cluster up stopped`);
  });

  test('replicas exit when the cluster process itself is killed with kill -9', async () => {
    const { proc } = start();
    const running = await until('every replica up', pids);
    proc.kill('SIGKILL');
    await until('replicas gone', async () => (running.some(alive) ? undefined : true));
  });
});
