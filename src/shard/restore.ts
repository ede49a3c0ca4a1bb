import { KvError, KvErrorCode } from '../common/errors.js';
import { keyAt } from '../common/keys.js';
import type { ShardCore } from './core.js';
import type { VersionMeta } from './store.js';
import { metaOf, newTableState } from './tables.js';
import { VersionData } from './version-data.js';

/** Rebuilds every kept version from disk (deltas on their bases), then replays the put log. */
export async function restore(core: ShardCore): Promise<void> {
  const { store, log, tables } = core;
  const metas = await store.readTables();
  for (const meta of metas) {
    const t = newTableState(meta.name);
    tables.set(meta.name, t);
    t.current = meta.current;
    t.putsFrom = meta.putsFrom ?? 0;
    const byVersion = new Map<number, VersionMeta>();
    for (const vm of meta.versions) {
      if (vm.state === 'loading') {
        log.warn({ table: meta.name, version: vm.version, rows: vm.rows }, 'discarding a load that did not complete before restart');
        await store.dropVersionRows(meta.name, vm.version);
        continue;
      }
      byVersion.set(vm.version, vm);
    }
    const built = new Map<number, VersionData>();
    const build = async (v: number): Promise<VersionData> => {
      const done = built.get(v);
      if (done) return done;
      const vm = byVersion.get(v);
      if (vm === undefined) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${meta.name}: version ${v} is needed but not on disk`);
      const started = Date.now();
      const data = vm.base ? (await build(vm.base)).derive() : new VersionData(vm.dim, vm.rows);
      await replayBlocks(core, meta.name, vm, data);
      data.seal();
      if (data.count !== vm.rows) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${meta.name} v${v}: ${data.count} keys rebuilt, ${vm.rows} recorded`);
      built.set(v, data);
      log.info({ table: meta.name, version: v, base: vm.base, rows: vm.rows, ms: Date.now() - started }, 'restored');
      return data;
    };
    for (const vm of byVersion.values()) {
      if (vm.state === 'retained') {
        t.retained.set(vm.version, vm);
        continue;
      }
      t.versions.set(vm.version, { data: await build(vm.version), meta: vm });
    }
    if (t.current !== 0 && !t.versions.has(t.current)) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${meta.name}: current version ${t.current} is not on disk`);
    if (byVersion.size !== meta.versions.length) await store.putTable(metaOf(t), true);
  }
  // Rows files of versions no table lists: a crash came between dropping a version and deleting its file.
  const listed = [...tables.values()].flatMap((t) => [...t.versions.keys(), ...t.retained.keys()].map((version) => ({ table: t.name, version })));
  const unlisted = await store.dropUnlistedRows(listed);
  if (unlisted.length > 0) log.warn({ files: unlisted }, 'deleted rows files of versions no longer listed');
  await core.puts.replay();
}

async function replayBlocks(core: ShardCore, table: string, vm: VersionMeta, data: VersionData): Promise<void> {
  for await (const block of core.store.readBlocks(table, vm)) {
    if (block.dim === 0) data.delete(block.keys, block.n);
    else if (vm.base) data.upsert(block.keys, block.values, block.n);
    else {
      const dup = data.append(block.keys, block.values, block.n);
      if (dup >= 0) throw new KvError(KvErrorCode.DATA_CORRUPT, `table ${table} v${vm.version} on disk repeats key ${keyAt(block.keys, dup)}`);
    }
  }
}
