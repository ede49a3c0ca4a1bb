import * as grpc from '@grpc/grpc-js';
import { KvError, KvErrorCode, fromGrpcError } from '../common/errors.js';
import type { PackedKeys } from '../common/keys.js';
import { controlCall, type ClusterConnections, type ReplicaConn } from '../cluster/connections.js';
import { assignGroups, groupTable, sortByGroup } from '../cluster/partition.js';

export interface PutRequest {
  table: string;
  keys: PackedKeys;
  values: Float32Array;
  dim: number;
  /** Write order (client ms * 4096 + writer tag) and writer id: they name the batch on every replica. */
  order: number;
  writer: string;
  /** Absolute deadline, ms since the epoch. */
  deadline: number;
}

/**
 * After one replica of a group logged a put, the others get half as long again as it took (at least
 * STRAGGLER_WAIT_MIN_MS): a frozen replica holds a put to about 1.5 times its usual time.
 */
const STRAGGLER_WAIT_FACTOR = 0.5;
const STRAGGLER_WAIT_MIN_MS = 5;

/** gRPC statuses after which a replica is taken to be down rather than to refuse the batch. */
const DOWN = new Set<number>([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED, grpc.status.UNKNOWN]);

/**
 * Sends a real-time batch to every replica of each owning group. A group acknowledges once one
 * replica has logged the batch durably and the others have too, or have had half as long again (see
 * firstAcknowledgement): a frozen or slow replica holds no put for long, and a replica that missed
 * the batch pulls it from its peers. A refusal (bad input, unknown table) that comes before the
 * group's first acknowledgement rejects the call.
 */
export async function putToGroups(conns: ClusterConnections, req: PutRequest): Promise<void> {
  const { manifest } = conns;
  const G = manifest.groups.length;
  const n = req.keys.length / 2;
  const groupOf = new Uint16Array(n);
  const counts = new Uint32Array(G);
  assignGroups(req.keys, n, manifest.partitions, groupTable(manifest.partitions, G), groupOf, counts);
  const keys = new Uint32Array(2 * n);
  const values = new Float32Array(n * req.dim);
  const start = sortByGroup(req.keys, n, groupOf, counts, keys, req.values, req.dim, values);
  const groups: number[] = [];
  for (let g = 0; g < G; g++) if (counts[g]! > 0) groups.push(g);
  await Promise.all(
    groups.map(async (g) => {
      const body = {
        table: req.table,
        keys: Buffer.from(keys.buffer, start[g]! * 8, counts[g]! * 8),
        values: Buffer.from(values.buffer, start[g]! * req.dim * 4, counts[g]! * req.dim * 4),
        order: req.order,
        writer: req.writer,
      };
      const replicas = conns.groups[g]!;
      await firstAcknowledgement(g, replicas.map((c) => controlCall(c, 'Put', body, Math.max(1, req.deadline - Date.now()))), replicas);
    }),
  );
}

/**
 * Resolves once every replica has answered, or, when one is slower, half as long again after the
 * first replica logged the batch as that one took (at least STRAGGLER_WAIT_MIN_MS): healthy replicas
 * all have a put when it resolves, and a frozen one delays it about 1.5-fold. Rejects at the first
 * refusal before any replica logged the batch, or with UNAVAILABLE once every replica is down. Calls
 * still out are left to end by their deadline; their replicas catch up through peer sync.
 */
function firstAcknowledgement(g: number, calls: Promise<unknown>[], replicas: readonly ReplicaConn[]): Promise<void> {
  const started = Date.now();
  return new Promise<void>((resolve, reject) => {
    let pending = calls.length;
    let down: KvError | undefined;
    let acked = false;
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve();
    };
    calls.forEach((p, r) => {
      p.then(
        () => {
          pending--;
          if (!acked) {
            acked = true;
            timer = setTimeout(finish, Math.max(STRAGGLER_WAIT_MIN_MS, STRAGGLER_WAIT_FACTOR * (Date.now() - started)));
            timer.unref();
          }
          if (pending === 0) finish();
        },
        (se: grpc.ServiceError) => {
          pending--;
          if (settled) return;
          if (acked) {
            if (pending === 0) finish();
            return;
          }
          const err = fromGrpcError(se, `group ${g} replica ${r} (${replicas[r]!.address})`);
          if (!DOWN.has(se.code)) {
            settled = true;
            reject(err);
            return;
          }
          down = err;
          if (pending === 0) {
            settled = true;
            reject(new KvError(KvErrorCode.UNAVAILABLE, `group ${g}: no replica took the put (${replicas.map((c) => c.address).join(', ')}): ${down.message}`, { cause: down }));
          }
        },
      );
    });
  });
}
