/**
 * The ClusterSource contract, run against every implementation (the manifest file, etcd), as every
 * Level backend runs abstract-level's suite.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { ClusterSource, SourceEvent } from '../../src/cluster/source.js';
import { codeOf, until } from '../helpers/util.js';

export interface ClusterSourceFixture {
  /** A source over a cluster holding `manifest`, not opened. */
  open(): Promise<ClusterSource>;
  /** A source over a cluster that holds no manifest, not opened. */
  missing(): Promise<ClusterSource>;
  manifest: { partitions: number; groups: { replicas: string[] }[] };
  close(): Promise<void>;
}

export function clusterSourceSuite(name: string, make: () => Promise<ClusterSourceFixture>): void {
  describe(`ClusterSource contract: ${name}`, () => {
    let f: ClusterSourceFixture;
    let source: ClusterSource;
    const events: SourceEvent[] = [];
    before(async () => {
      f = await make();
      source = await f.open();
    });
    after(async () => {
      await source?.close();
      await f?.close();
    });

    test('open() gives the manifest, validated; a cluster without one is KV_INVALID_CONFIG', async () => {
      const m = await source.open();
      assert.equal(m.partitions, f.manifest.partitions);
      assert.deepEqual(m.groups, f.manifest.groups);
      assert.equal(m.keepVersions, 2);
      assert.equal(source.manifest, m);
      const none = await f.missing();
      assert.equal(await codeOf(none.open()), 'KV_INVALID_CONFIG');
      await none.close();
    });

    test('a registered replica is found at its address; its registration ends with close()', async () => {
      source.subscribe((e) => events.push(e));
      const address = f.manifest.groups[0]!.replicas[1]!;
      const reg = await source.register(0, 1, address);
      await until('the address is known', async () => (source.address(0, 1) === address ? true : undefined));
      await reg.close();
      // A manifest file's addresses are fixed; a registry forgets a registration that ended.
      await until('the address after close', async () => (source.address(0, 1) === (source.followsVersions ? undefined : address) ? true : undefined));
      if (source.followsVersions) {
        assert.ok(events.some((e) => e.kind === 'member' && e.group === 0 && e.replica === 1 && e.address === address));
        assert.ok(events.some((e) => e.kind === 'member' && e.group === 0 && e.replica === 1 && e.address === undefined));
      }
    });

    test('a current version set by compare-and-set is seen where the source holds versions', async () => {
      await source.ensureAvailable();
      const before = await source.readCurrent('t');
      assert.equal(before.version, undefined);
      await source.setCurrent('t', 3, before);
      if (!source.followsVersions) {
        // The replicas hold the versions: the file source has none to give.
        assert.equal(source.currentVersion('t'), undefined);
        assert.equal(source.currentVersions().size, 0);
        return;
      }
      await until('the version is seen', async () => (source.currentVersion('t') === 3 ? true : undefined));
      assert.equal(source.currentVersions().get('t'), 3);
      assert.equal((await source.readCurrent('t')).version, 3);
      assert.equal(await codeOf(source.setCurrent('t', 4, before)), 'KV_LOAD_CONFLICT');
      assert.ok(events.some((e) => e.kind === 'current' && e.table === 't' && e.version === 3));
    });

    test('close() twice is fine', async () => {
      const s = await f.open();
      await s.close();
      await s.close();
    });
  });
}
