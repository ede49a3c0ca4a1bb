/**
 * Staged full loads: the files a group's replicas read their rows from when they all run on this host,
 * written as rows-file blocks (src/common/rows-file.ts) and written back to disk as they grow.
 */
import { randomBytes } from 'node:crypto';
import { open, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { KvError } from '../common/errors.js';
import { blockBytes, writeBlock } from '../common/rows-file.js';
import type { ClusterConnections, ReplicaConn } from '../cluster/connections.js';
import { rowError, type Batch, type RowOrigins } from './batch.js';
import { call } from './cluster-ops.js';

/** A group's staged file as the loader writes it. */
export interface Stage {
  path: string;
  fh: FileHandle;
  /** Where the next block goes. */
  end: number;
  /** Bytes up to which a background fdatasync has started; the one in flight; its failure. */
  syncedTo: number;
  syncing: Promise<void> | undefined;
  syncError: Error | undefined;
}

/** A block written to a staged file: where, how many rows, and where they came from. */
export interface WrittenBlock {
  at: number;
  bytes: number;
  n: number;
  origins: RowOrigins;
  written: Promise<void>;
}

/**
 * Blocks are named to the replicas this many bytes at a time (one LoadRowsFrom for several blocks;
 * replicas read a range block by block): a call costs the loader ~1 ms of CPU.
 */
export const DEFAULT_STAGE_RANGE_BYTES = 4 * 1024 * 1024;

/**
 * A staged file is written back to disk as it grows, by an fdatasync every this many bytes, so that
 * the replicas' fsync at the seal finds little left to write (2M keys on 8 groups, ~34 MB a file:
 * from the last rows to the publish took 240-330 ms with a sync every 32 MiB, which came too late
 * to write anything back early, and 65-190 ms with one every 4 MiB).
 */
const STAGE_SYNC_BYTES = 4 * 1024 * 1024;

export function syncInBackground(st: Stage): void {
  if (st.syncing !== undefined || st.end - st.syncedTo < STAGE_SYNC_BYTES) return;
  st.syncedTo = st.end;
  // A failed write-back fails the load: once reported, the kernel may call the pages clean.
  st.syncing = st.fh.datasync().catch((err: Error) => void (st.syncError ??= err)).then(() => {
    st.syncing = undefined;
  });
}


/**
 * Appends a batch's rows to the staged file as one block, returning where it goes and its write; the
 * batch's buffers may be reused once the write is done.
 */
export function appendBlock(st: Stage, b: Batch): { at: number; bytes: number; written: Promise<void> } {
  const at = st.end;
  const bytes = blockBytes(b.n, b.dim);
  st.end += bytes;
  return { at, bytes, written: writeBlock(st.fh, st.path, at, b.keyBytes(), b.valueBytes(), b.n, b.dim) };
}

export interface StageRequest {
  conns: ClusterConnections;
  /** Each replica's stage directory, as its LoadBegin answered. */
  stageDirs: Map<ReplicaConn, string>;
  table: string;
  version: number;
  loadId: string;
  log: Logger | undefined;
}

/**
 * Staged full loads: for each group, the loader creates a file in the stage directory of the
 * group's first replica and asks every replica of the group whether it sees that file (a probe
 * file with a random token). Where all do, the group's rows are written to the file as rows-file
 * blocks and the replicas read them from there (LoadRowsFrom), and keep the file as their rows file
 * at the seal: on one host, rows need not cross a socket, be reassembled by gRPC and be written
 * again by each replica. Other groups (replicas on other hosts, or a stage directory this process
 * cannot write) get their rows over gRPC, as with staging off.
 */
export async function stageGroups(req: StageRequest): Promise<(Stage | undefined)[]> {
  const { conns, stageDirs, table, version, loadId, log } = req;
  // Every group settles (a group that cannot be staged gets its rows over gRPC), so no file made
  // for another group is left open when one fails.
  return Promise.all(conns.groups.map(async (replicas, g) => {
    const dir = stageDirs.get(replicas[0]!);
    if (!dir) return undefined;
    const path = join(dir, `${loadId}-g${g}.rows`);
    const probePath = join(dir, `${loadId}-g${g}.probe`);
    let fh: FileHandle;
    try {
      fh = await open(path, 'wx');
    } catch (err) {
      log?.debug({ group: g, path, err: (err as Error).message }, 'rows go over gRPC: the stage directory is not writable here');
      return undefined;
    }
    let refused: string | undefined;
    try {
      const token = randomBytes(32);
      await writeFile(probePath, token);
      // A replica that refuses the call (an older release, a conflict) gets the rows over gRPC,
      // where a real conflict shows again; replicas that took the stage give it up at the first rows.
      const answers = await Promise.allSettled(replicas.map((c) => call<{ readable: boolean; reason: string }>(c, 'LoadStage', { table, version, loadId, path, probePath, token })));
      for (const a of answers) {
        if (a.status === 'rejected') refused ??= (a.reason as Error).message;
        else if (!a.value.readable) refused ??= a.value.reason;
      }
    } catch (err) {
      refused = (err as Error).message;
    } finally {
      await unlink(probePath).catch(() => undefined);
    }
    if (refused !== undefined) {
      log?.info({ group: g, path, reason: refused }, 'rows go over gRPC: a replica does not read the staged file');
      await fh.close();
      await unlink(path).catch(() => undefined);
      return undefined;
    }
    return { path, fh, end: 0, syncedTo: 0, syncing: undefined, syncError: undefined };
  }));
}

/** A replica's refusal of a row of a staged range, told as the file and row the row came from. */
export function explainStagedError(err: unknown, blocks: WrittenBlock[]): unknown {
  if (!(err instanceof KvError) || typeof err.detail?.['row'] !== 'number' || typeof err.detail['block'] !== 'number') return err;
  const r = err.detail['row'];
  const x = blocks.find((b) => b.at === err.detail!['block']);
  if (x === undefined || r < 0 || r >= x.n) return err;
  return rowError(err, x.origins.where(r), String(err.detail['key'] ?? ''), 'load');
}
