import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EtcdSource } from '../src/cluster/etcd-source.js';
import { FileSource, parseEtcdOptions } from '../src/cluster/source.js';
import { TestEtcd } from './helpers/etcd.js';
import { clusterSourceSuite } from './suites/cluster-source-suite.js';

const manifest = { partitions: 8, groups: [{ replicas: ['127.0.0.1:7100', '127.0.0.1:7101'] }, { replicas: ['127.0.0.1:7102', '127.0.0.1:7103'] }] };

clusterSourceSuite('a manifest file', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'embkv-source-'));
  const path = join(dir, 'cluster.json');
  writeFileSync(path, JSON.stringify(manifest));
  return {
    manifest,
    open: async () => new FileSource(path),
    missing: async () => new FileSource(join(dir, 'none.json')),
    close: async () => rmSync(dir, { recursive: true, force: true }),
  };
});

clusterSourceSuite('etcd', async () => {
  const etcd = await TestEtcd.start();
  const at = (cluster: string): EtcdSource => new EtcdSource(parseEtcdOptions({ endpoints: [etcd.endpoint], cluster, leaseTtlS: 2 }));
  const init = at('suite');
  await init.storeManifest(JSON.stringify(manifest), false);
  await init.close();
  return {
    manifest,
    open: async () => at('suite'),
    missing: async () => at('nothing'),
    close: () => etcd.close(),
  };
});
