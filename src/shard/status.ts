import { ORDER_SCALE } from '../common/limits.js';
import type { VersionMeta } from './store.js';
import type { TableState } from './tables.js';
import type { VersionData } from './version-data.js';

export interface VersionStatusInfo {
  version: number;
  dim: number;
  keys: number;
  state: 'loading' | 'sealed';
  bytes: number;
  baseVersion: number;
  deltaUpserts: number;
  deltaDeletes: number;
  createdAtMs: number;
  /** A full version's declared snapshot time; 0: none. */
  snapshotAtMs: number;
}

export interface TableStatusInfo {
  name: string;
  currentVersion: number;
  versions: VersionStatusInfo[];
  realtimeKeys: number;
  realtimeBatches: number;
  lastPutAtMs: number;
  realtimeLagMs: number;
}

/** Every table's versions (the write version as 'loading') and real-time state, by table name. */
export function status(tables: Iterable<TableState>): TableStatusInfo[] {
  const out: TableStatusInfo[] = [];
  const vs = (meta: VersionMeta, data: VersionData, state: 'loading' | 'sealed', keys: number): VersionStatusInfo => ({
    version: meta.version, dim: data.dim, keys, state, bytes: data.ownBytes, baseVersion: meta.base,
    deltaUpserts: meta.upserts, deltaDeletes: meta.deletes, createdAtMs: meta.createdAtMs,
    snapshotAtMs: meta.snapshotAtMs ?? 0,
  });
  for (const t of [...tables].sort((a, b) => a.name.localeCompare(b.name))) {
    const versions = [...t.versions.values()].sort((a, b) => a.meta.version - b.meta.version).map((v) => vs(v.meta, v.data, 'sealed', v.data.count));
    if (t.write !== undefined) versions.push(vs(t.write.meta, t.write.data, 'loading', t.write.ops));
    out.push({
      name: t.name, currentVersion: t.current, versions,
      realtimeKeys: t.overlay?.count ?? 0, realtimeBatches: t.realtimeBatches,
      lastPutAtMs: Math.floor(t.lastPutOrder / ORDER_SCALE), realtimeLagMs: t.realtimeLagMs,
    });
  }
  return out;
}
