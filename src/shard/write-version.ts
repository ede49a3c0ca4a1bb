import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import { firstNonFinite, keyAt } from '../common/keys.js';
import type { TableState, WriteVersion } from './tables.js';

/** The most rows (and deletes) one load batch, or one block of a staged file, may hold. */
export const MAX_LOAD_BATCH_ROWS = 1 << 17;

/** The write version of load `loadId` of `table` v`version`, whatever its state. */
export function writeVersion(tables: Map<string, TableState>, table: string, version: number, loadId: string): WriteVersion {
  const w = tables.get(table)?.write;
  if (w === undefined || w.version !== version || w.loadId !== loadId) {
    throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} has no load ${loadId} of version ${version} in progress (the replica may have restarted)`);
  }
  return w;
}

/** The write version of a load that still takes rows. */
export function acceptingWrite(tables: Map<string, TableState>, table: string, version: number, loadId: string): WriteVersion {
  const w = writeVersion(tables, table, version, loadId);
  if (w.failed !== undefined) throw w.failed;
  if (w.sealing) throw new KvError(KvErrorCode.LOAD_CONFLICT, `table ${table} v${version} is being sealed; no more rows are accepted for load ${loadId}`);
  return w;
}

/** Checks a batch and applies it to the write version's memory (not to disk). */
export function applyRows(w: WriteVersion, table: string, version: number, keys: Uint32Array, values: Float32Array, deletes: Uint32Array): void {
  const n = keys.length / 2;
  const nd = deletes.length / 2;
  const dim = w.data.dim;
  if (n + nd > MAX_LOAD_BATCH_ROWS) throw invalidArgument(`a load batch holds ${n + nd} rows; at most ${MAX_LOAD_BATCH_ROWS}`);
  if (values.length !== n * dim) {
    throw new KvError(KvErrorCode.DIM_MISMATCH, `batch of ${n} keys carries ${values.length} floats; table ${table} v${version} has dim ${dim}`);
  }
  if (nd > 0 && w.touched === undefined) throw invalidArgument('deletes are only accepted in a delta (incremental load)');
  const bad = firstNonFinite(values);
  if (bad >= 0) {
    const row = Math.floor(bad / dim);
    throw new KvError(KvErrorCode.INVALID_DATA, `batch row ${row} (key ${keyAt(keys, row)}) holds ${values[bad]}`, { detail: { row } });
  }
  w.lastActivityMs = Date.now();
  if (w.touched !== undefined) {
    // A delta: refuse a key it touches twice, before changing anything.
    const dupAt = (ks: Uint32Array, m: number, offset: number): void => {
      for (let i = 0; i < m; i++) {
        if (!w.touched!.add(ks[2 * i]!, ks[2 * i + 1]!)) {
          w.failed = new KvError(KvErrorCode.DUPLICATE_KEY, `key ${keyAt(ks, i)} is repeated within this delta`, { detail: { row: offset + i } });
          throw w.failed;
        }
      }
    };
    dupAt(keys, n, 0);
    dupAt(deletes, nd, n);
    w.data.upsert(keys, values, n);
    w.data.delete(deletes, nd);
    w.meta.upserts += n;
    w.meta.deletes += nd;
  } else {
    const dup = w.data.append(keys, values, n);
    if (dup >= 0) {
      // The version is now partly appended: the load cannot go on, the loader must abort it.
      w.failed = new KvError(KvErrorCode.DUPLICATE_KEY, `key ${keyAt(keys, dup)} is repeated within this load`, { detail: { row: dup } });
      throw w.failed;
    }
  }
  w.ops += n + nd;
}

/** Drops a write version's staged file, if it has one, and closes the handle on it. */
export async function letGoStage(w: WriteVersion): Promise<void> {
  const st = w.staged;
  w.staged = undefined;
  await st?.fh.close().catch(() => undefined);
}
