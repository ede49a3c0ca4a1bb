import type * as grpc from '@grpc/grpc-js';
import { KvError, KvErrorCode, fromGrpcError } from '../common/errors.js';
import { controlCall, type ClusterConnections, type ReplicaConn } from '../cluster/connections.js';
import type { WatcherNote } from '../common/watcher-note.js';
import type { CurrentVersion } from '../cluster/source.js';

export const DEFAULT_CONTROL_DEADLINE_MS = 30_000;
/** With etcd, how long a publish waits for every replica to follow the flipped key. */
export const DEFAULT_FOLLOW_WAIT_MS = 30_000;
const FOLLOW_POLL_MS = 100;

export interface ReplicaStatus {
  group: number;
  replica: number;
  address: string;
  uptimeMs: number;
  rssBytes: number;
  heapUsedBytes: number;
  pid: number;
  tables: {
    name: string;
    currentVersion: number;
    versions: {
      version: number; dim: number; keys: number; state: string; bytes: number;
      baseVersion: number; deltaUpserts: number; deltaDeletes: number; createdAtMs: number; snapshotAtMs: number;
    }[];
    realtimeKeys: number;
    realtimeBatches: number;
    lastPutAtMs: number;
    realtimeLagMs: number;
  }[];
  /** Each table's last version-watcher note (kvctl watch). */
  watchers?: WatcherNoteStatus[];
}

/** What a version watcher last did on a table, as a replica keeps it (see SetWatcherNote). */
export type WatcherNoteStatus = WatcherNote;

export const replicaName = (c: ReplicaConn): string => `group ${c.group} replica ${c.replica} (${c.address})`;

/** A control call whose failure becomes a KvError naming the replica. */
export async function call<Res>(conn: ReplicaConn, method: string, request: object, deadlineMs = DEFAULT_CONTROL_DEADLINE_MS): Promise<Res> {
  try {
    return await controlCall<Res>(conn, method, request, deadlineMs);
  } catch (err) {
    throw fromGrpcError(err as grpc.ServiceError, replicaName(conn));
  }
}

/** Asks every replica for its status; a replica that does not answer gets its error instead. */
export async function statusAll(conns: ClusterConnections, deadlineMs = 3000): Promise<{ conn: ReplicaConn; status?: ReplicaStatus; error?: KvError }[]> {
  return Promise.all(
    conns.all().map(async (conn) => {
      try {
        return { conn, status: await call<ReplicaStatus>(conn, 'Status', {}, deadlineMs) };
      } catch (err) {
        return { conn, error: err as KvError };
      }
    }),
  );
}

/** A version to make current: a newer one (publish) or an older one (rollback). */
export interface PublishRequest {
  table: string;
  version: number;
  rollback: boolean;
}

/**
 * Makes `version` current on every replica. First every replica must confirm that it holds the
 * version complete; only then is any replica flipped, so a publish never strands the cluster on a
 * version that some group lacks.
 */
export async function publishVersion(conns: ClusterConnections, req: PublishRequest): Promise<{ previous: number[] }> {
  const { table, version, rollback } = req;
  // Read first: with etcd down the publish fails here, before any replica is asked anything.
  const expected = await conns.source.readCurrent(table);
  const statuses = await statusAll(conns);
  const missing: string[] = [];
  for (const s of statuses) {
    if (s.error) {
      missing.push(`${replicaName(s.conn)} does not answer: ${s.error.message}`);
      continue;
    }
    const t = s.status!.tables.find((x) => x.name === table);
    const v = t?.versions.find((x) => x.version === version && x.state === 'sealed');
    if (v === undefined) missing.push(`${replicaName(s.conn)} does not hold ${table} v${version} complete`);
    else if (conns.source.followsVersions && t !== undefined && version !== t.currentVersion) {
      // Replicas follow the key on their own: what a replica would refuse is refused before the key flips.
      if (!rollback && version < t.currentVersion) {
        throw new KvError(KvErrorCode.VERSION_TOO_OLD, `cannot publish ${table} v${version}: it is older than the current v${t.currentVersion} on ${replicaName(s.conn)}; use rollback`);
      }
      if (!rollback && v.baseVersion !== 0 && v.baseVersion !== t.currentVersion) {
        throw new KvError(KvErrorCode.LOAD_CONFLICT, `cannot publish ${table} v${version}: it is a delta on v${v.baseVersion}, but v${t.currentVersion} is current on ${replicaName(s.conn)}; load the delta again on v${t.currentVersion}`);
      }
    }
  }
  if (missing.length > 0) {
    throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `cannot ${rollback ? 'roll back to' : 'publish'} ${table} v${version}: ${missing.join('; ')}`);
  }
  return switchVersion(conns, req, expected);
}

/**
 * The Publish calls alone, without first asking every replica for its status: for a loader whose
 * LoadSeal calls have just been answered, by every replica, that the version is sealed there.
 */
export async function switchVersion(conns: ClusterConnections, req: PublishRequest, expected?: CurrentVersion): Promise<{ previous: number[] }> {
  const { table, version, rollback } = req;
  const source = conns.source;
  if (!source.followsVersions) {
    const res = await Promise.all(conns.all().map((c) => call<{ previousVersion: number }>(c, 'Publish', { table, version, rollback })));
    return { previous: res.map((r) => r.previousVersion) };
  }
  // One compare-and-set of the table's key; the replicas follow it, and so do clients.
  const before = expected ?? (await source.readCurrent(table));
  await source.setCurrent(table, version, before);
  return { previous: await waitFollowed(conns, table, version, before.version) };
}

/** Waits until every replica reports `version` current; rejects naming the ones that did not within DEFAULT_FOLLOW_WAIT_MS. */
async function waitFollowed(conns: ClusterConnections, table: string, version: number, previous: number | undefined): Promise<number[]> {
  const until = Date.now() + DEFAULT_FOLLOW_WAIT_MS;
  const first = new Map<ReplicaConn, number>();
  for (;;) {
    const all = await statusAll(conns);
    const behind: string[] = [];
    for (const s of all) {
      const cur = s.status?.tables.find((t) => t.name === table)?.currentVersion;
      if (cur !== undefined && !first.has(s.conn)) first.set(s.conn, cur);
      if (cur !== version) behind.push(s.error ? `${replicaName(s.conn)} does not answer: ${s.error.message}` : `${replicaName(s.conn)} is at v${cur ?? 0}`);
    }
    if (behind.length === 0) return conns.all().map((c) => (first.get(c) === version ? previous : first.get(c)) ?? previous ?? 0);
    if (Date.now() > until) {
      throw new KvError(KvErrorCode.UNAVAILABLE, `${table} v${version} is current in ${conns.source.name}, but not every replica followed within ${DEFAULT_FOLLOW_WAIT_MS / 1000} s: ${behind.join('; ')}`);
    }
    await new Promise((r) => setTimeout(r, FOLLOW_POLL_MS));
  }
}

/**
 * Drops a version that is not current from every replica. Refused before any replica drops it when
 * the version is current anywhere or does not answer; a replica that does not hold it is skipped.
 * Returns how many replicas dropped it.
 */
export async function dropVersion(conns: ClusterConnections, table: string, version: number): Promise<{ dropped: number }> {
  const statuses = await statusAll(conns);
  const problems: string[] = [];
  let held = 0;
  for (const s of statuses) {
    if (s.error) {
      problems.push(`${replicaName(s.conn)} does not answer: ${s.error.message}`);
      continue;
    }
    const t = s.status!.tables.find((x) => x.name === table);
    if (t?.currentVersion === version) problems.push(`${table} v${version} is current on ${replicaName(s.conn)}`);
    if (t?.versions.some((v) => v.version === version)) held++;
  }
  if (problems.length > 0) throw new KvError(KvErrorCode.LOAD_CONFLICT, `cannot drop ${table} v${version}: ${problems.join('; ')}`);
  if (held === 0) throw new KvError(KvErrorCode.VERSION_NOT_FOUND, `no replica holds ${table} v${version}`);
  const res = await Promise.all(conns.all().map((c) => call<{ dropped: boolean }>(c, 'Drop', { table, version })));
  return { dropped: res.filter((r) => r.dropped).length };
}
