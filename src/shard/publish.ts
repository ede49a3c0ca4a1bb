import { KvError, KvErrorCode } from '../common/errors.js';
import { ORDER_SCALE } from '../common/limits.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import type { ShardCore } from './core.js';
import type { VersionMeta } from './store.js';
import { metaOf, type TableState } from './tables.js';

/** Makes a sealed version current. Going back to an older version needs `rollback`. */
export async function publish(core: ShardCore, table: string, version: number, rollback: boolean): Promise<number> {
  checkTableName(table);
  checkVersion(version);
  return core.withTable(table, async () => {
    const t = core.tables.get(table);
    if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
    const held = t.versions.get(version);
    if (held === undefined) {
      throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `table ${table} version ${version} is not held complete by this replica`);
    }
    const previous = t.current;
    if (version < previous && !rollback) {
      throw new KvError(KvErrorCode.VERSION_TOO_OLD, `table ${table}: version ${version} is older than the current ${previous}; use rollback`);
    }
    if (!rollback && held.meta.base !== 0 && held.meta.base !== previous && version !== previous) {
      // A delta applies to the version it was built on; over anything newer it would revert data.
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table}: version ${version} is a delta on v${held.meta.base}, but v${previous} is current; load the delta again on v${previous}`);
    }
    if (version === previous) return previous;
    t.current = version;
    if (!rollback && held.meta.base === 0) {
      // A new full version holds what was written before its snapshot; puts since stay on top.
      t.putsFrom = putsFromOf(held.meta);
      t.overlay = t.overlay?.dim === held.data.dim ? t.overlay.since(t.putsFrom) : undefined;
    }
    const dropped = prune(t, core.keepVersions);
    await core.store.putTable(metaOf(t), true);
    for (const v of dropped) await core.store.dropVersionRows(table, v);
    if (!rollback && held.meta.base === 0) {
      // Puts older than the new full version are never applied again: the log forgets them.
      const gone = await core.puts.prune(table, t.putsFrom);
      if (gone > 0) core.log.info({ table, batches: gone }, 'pruned real-time puts that the new version holds');
    }
    core.log.info({ table, version, previous, dropped }, rollback ? 'rolled back' : 'published');
    return previous;
  });
}

/**
 * The lowest write order of the puts that stay over a newly published full version: those stamped
 * at or after its snapshot time, or, without one, at or after its load began. The earlier of the two
 * counts: a dump is complete before its load begins, so it cannot hold a put written after that,
 * whatever a trainer's clock said.
 */
export function putsFromOf(meta: VersionMeta): number {
  const snapshot = meta.snapshotAtMs ?? 0;
  return (snapshot > 0 ? Math.min(snapshot, meta.createdAtMs) : meta.createdAtMs) * ORDER_SCALE;
}

/**
 * Drops a sealed version that is not current: its memory and its rows file. Refused for the current
 * version, a version being loaded, and a version a kept delta (or the load under way) builds on.
 * Returns false when this replica does not hold the version.
 */
export async function dropVersion(core: ShardCore, table: string, version: number): Promise<boolean> {
  checkTableName(table);
  checkVersion(version);
  return core.withTable(table, async () => {
    const t = core.tables.get(table);
    if (t === undefined) throw new KvError(KvErrorCode.TABLE_NOT_FOUND, `table ${table} is not held by this replica`);
    if (version === t.current) {
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is current; publish or roll back to another version before dropping it`);
    }
    if (t.write?.version === version) {
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is being loaded; a load that fails is dropped by itself, and a forced load takes a stalled one over`);
    }
    const dependents = [...t.versions.values()].filter((v) => v.meta.base === version).map((v) => v.meta.version);
    if (t.write?.meta.base === version) dependents.push(t.write.version);
    if (dependents.length > 0 || t.retained.has(version)) {
      const on = dependents.length > 0 ? dependents.map((v) => `v${v}`).join(', ') : 'a kept delta';
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is the base of ${on}; drop ${dependents.length > 0 ? 'that' : 'it'} first`);
    }
    if (!t.versions.has(version)) return false;
    t.versions.delete(version);
    // Retained bases that only the dropped version needed go too.
    const alsoGone = prune(t, core.keepVersions);
    await core.store.putTable(metaOf(t), true);
    for (const v of [version, ...alsoGone]) await core.store.dropVersionRows(table, v);
    core.log.info({ table, version, alsoDropped: alsoGone }, 'version dropped');
    return true;
  });
}

/**
 * Keeps the current version, every sealed version newer than it, and the newest older ones up to
 * keepVersions. A version left out but still the base of a kept delta stays on disk as 'retained'.
 * Returns the versions whose rows can go.
 */
function prune(t: TableState, keepVersions: number): number[] {
  const older = [...t.versions.keys()].filter((v) => v < t.current).sort((a, b) => b - a);
  for (const v of older.slice(Math.max(0, keepVersions - 1))) {
    const held = t.versions.get(v)!;
    t.versions.delete(v);
    t.retained.set(v, { ...held.meta, state: 'retained' });
  }
  // Retained versions that no kept version builds on any more are dropped.
  const needed = new Set<number>();
  const all = new Map<number, VersionMeta>([...t.retained, ...[...t.versions].map(([v, h]) => [v, h.meta] as const)]);
  const roots = [...t.versions.keys(), ...(t.write ? [t.write.meta.base] : [])];
  for (let v of roots) {
    while (v !== 0 && all.get(v)?.base) {
      v = all.get(v)!.base;
      needed.add(v);
    }
  }
  const dropped: number[] = [];
  for (const v of [...t.retained.keys()]) {
    if (!needed.has(v)) {
      t.retained.delete(v);
      dropped.push(v);
    }
  }
  return dropped;
}
