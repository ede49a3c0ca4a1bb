import type { FileHandle } from 'node:fs/promises';
import type { KvError } from '../common/errors.js';
import type { Overlay } from './overlay.js';
import type { TableMeta, VersionMeta } from './store.js';
import type { KeySet } from './slots.js';
import type { VersionData } from './version-data.js';

/**
 * What a replica holds of each table, in memory: the sealed versions that serve, the retained bases
 * of kept deltas, the one write version of a load under way, and the real-time overlay.
 */

/** A full load whose rows a loader on this host writes to a file for this replica to read. */
export interface StagedFile {
  path: string;
  fh: FileHandle;
  /** [at, bytes] of every range read so far; at the seal they must tile the file from byte 0. */
  ranges: [number, number][];
  /** Read buffers, reused. */
  scratch: ArrayBuffer[];
  /** Ranges being read now. */
  reading: number;
}

export interface Held {
  data: VersionData;
  meta: VersionMeta;
}

export interface WriteVersion {
  version: number;
  loadId: string;
  data: VersionData;
  meta: VersionMeta;
  /** Keys a delta has touched, to refuse one repeated. */
  touched: KeySet | undefined;
  ops: number;
  lastActivityMs: number;
  failed: KvError | undefined;
  /** LoadSeal has begun: rows arriving now would not be in what it seals. */
  sealing: boolean;
  pending: Set<Promise<void>>;
  /** Set by loadStage: the rows come from the loader's staged file, which becomes the rows file. */
  staged: StagedFile | undefined;
}

export interface TableState {
  name: string;
  current: number;
  /** Sealed, read-only versions that serve. */
  versions: Map<number, Held>;
  /** Versions no longer served but kept on disk as the base of a kept delta version. */
  retained: Map<number, VersionMeta>;
  write: WriteVersion | undefined;
  overlay: Overlay | undefined;
  putsFrom: number;
  realtimeBatches: number;
  lastPutOrder: number;
  realtimeLagMs: number;
}

export function newTableState(name: string): TableState {
  return {
    name, current: 0, versions: new Map(), retained: new Map(), write: undefined, overlay: undefined,
    putsFrom: 0, realtimeBatches: 0, lastPutOrder: 0, realtimeLagMs: 0,
  };
}

/** A table's metadata as the store keeps it. */
export function metaOf(t: TableState): TableMeta {
  const versions = [...t.versions.values()].map((v) => v.meta);
  versions.push(...t.retained.values());
  if (t.write !== undefined) versions.push(t.write.meta);
  return { name: t.name, current: t.current, versions, putsFrom: t.putsFrom };
}
