import { setMaxListeners } from 'node:events';
import type * as grpc from '@grpc/grpc-js';
import { KvError, KvErrorCode } from '../common/errors.js';
import type { PackedKeys } from '../common/keys.js';
import type { Manifest } from '../common/manifest.js';
import type { LookupResponse } from '../common/wire.js';
import { ClusterConnections } from './connections.js';
import { GroupCaller } from './group-caller.js';
import { assignGroups, groupTable } from './partition.js';
import { parseReplicaPolicy, type ResolvedReplicaPolicy } from './policy.js';
import { LatencyWindow, latencyOf, type FanoutStats } from './stats.js';

/** Where the merged answer is written: fresh arrays by default, or a wire buffer for the router. */
export type AnswerAllocator = (n: number, dim: number, version: number) => { values: Float32Array; found: Uint8Array };

export interface FanoutResult {
  version: number;
  dim: number;
  values: Float32Array;
  found: Uint8Array;
}

export interface FanoutRequest {
  table: string;
  /** 0 = the current version, the same for every group. */
  version: number;
  keys: PackedKeys;
  /** Absolute deadline, ms since the epoch. */
  deadline: number;
  signal?: AbortSignal | undefined;
  alloc?: AnswerAllocator | undefined;
  /** Sent with every attempt (tests use it for the replicas' fault switch, see replica/server.ts). */
  metadata?: grpc.Metadata | undefined;
}

const defaultAlloc: AnswerAllocator = (n, dim) => ({ values: new Float32Array(n * dim), found: new Uint8Array(n) });

/**
 * Fans a batched lookup out to every shard group at once and merges the answers in request order.
 * Shared by the SDK and the router endpoint.
 */
export class Fanout {
  readonly conns: ClusterConnections;
  readonly policy: ResolvedReplicaPolicy;
  private readonly groupOfPartition: Uint16Array;
  private readonly callers: GroupCaller[];
  private readonly latency = new LatencyWindow(1024);
  private requests = 0;
  private failures = 0;

  /** `policy`: replica choice, hedging and probing (parseReplicaPolicy({}) gives the defaults). */
  constructor(readonly manifest: Manifest, conns?: ClusterConnections, policy?: ResolvedReplicaPolicy) {
    this.conns = conns ?? new ClusterConnections(manifest);
    this.policy = policy ?? parseReplicaPolicy({});
    this.groupOfPartition = groupTable(manifest.partitions, manifest.groups.length);
    this.callers = this.conns.groups.map((replicas, g) => new GroupCaller(g, replicas, this.policy));
  }

  close(): void {
    for (const c of this.callers) c.close();
    this.conns.close();
  }

  /** Counters and recent latency percentiles, per group and per replica. */
  stats(): FanoutStats {
    const now = Date.now();
    return {
      requests: this.requests,
      failures: this.failures,
      latencyMs: latencyOf(this.latency),
      groups: this.callers.map((c) => c.snapshot(now)),
    };
  }

  async lookup(req: FanoutRequest): Promise<FanoutResult> {
    const started = Date.now();
    this.requests++;
    try {
      const r = await this.merge(req);
      this.latency.add(Date.now() - started);
      return r;
    } catch (err) {
      if (!(err instanceof KvError && err.code === KvErrorCode.ABORTED && req.signal?.aborted)) this.failures++;
      throw err;
    }
  }

  private async merge(req: FanoutRequest): Promise<FanoutResult> {
    const n = req.keys.length / 2;
    const G = this.manifest.groups.length;

    // Partition in one pass, then a counting sort of request positions by group:
    //   order[start[g] .. start[g+1]) = the positions whose keys belong to group g, in request order.
    const groupOf = new Uint16Array(n);
    const counts = new Uint32Array(G);
    assignGroups(req.keys, n, this.manifest.partitions, this.groupOfPartition, groupOf, counts);
    const start = new Uint32Array(G + 1);
    for (let g = 0; g < G; g++) start[g + 1] = start[g]! + counts[g]!;
    const fill = start.slice(0, G);
    const order = new Int32Array(n);
    const groupKeys = new Uint32Array(2 * n);
    const src = req.keys;
    for (let i = 0; i < n; i++) {
      const at = fill[groupOf[i]!]!++;
      order[at] = i;
      groupKeys[2 * at] = src[2 * i]!;
      groupKeys[2 * at + 1] = src[2 * i + 1]!;
    }

    const groups: number[] = [];
    for (let g = 0; g < G; g++) if (counts[g]! > 0) groups.push(g);
    // An empty request still asks one group, to learn the version and dim (and that the table exists).
    if (groups.length === 0) groups.push(0);

    const keyBytes = (g: number): Uint8Array => new Uint8Array(groupKeys.buffer, start[g]! * 8, counts[g]! * 8);
    const ctl = new AbortController();
    // Every group call listens on it (the default limit of 10 would warn with more groups).
    setMaxListeners(2 * groups.length + 1, ctl.signal);
    const onAbort = (): void => ctl.abort();
    req.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      if (req.signal?.aborted) throw new KvError(KvErrorCode.ABORTED, 'lookup aborted by its signal');
      const answers = await Promise.all(
        groups.map((g) => this.callers[g]!.call({ table: req.table, version: req.version, keys: keyBytes(g) }, counts[g]!, req.deadline, ctl.signal, req.metadata)),
      );
      // Every group must answer from one version. With version 0, groups that flipped at a different
      // moment of a publish are asked again, pinned to the newest version answered.
      let version = answers[0]!.version;
      let mixed = false;
      for (const a of answers) {
        if (a.version !== version) mixed = true;
        if (a.version > version) version = a.version;
      }
      if (mixed) {
        await Promise.all(
          groups.map(async (g, k) => {
            if (answers[k]!.version === version) return;
            answers[k] = await this.callers[g]!.call({ table: req.table, version, keys: keyBytes(g) }, counts[g]!, req.deadline, ctl.signal, req.metadata);
          }),
        );
      }
      const dim = answers[0]!.dim;
      for (let k = 0; k < answers.length; k++) {
        const a = answers[k]!;
        if (a.version !== version || a.dim !== dim) {
          throw new KvError(KvErrorCode.INTERNAL, `group ${groups[k]} answered version ${a.version} dim ${a.dim}, expected version ${version} dim ${dim}`);
        }
      }
      const out = (req.alloc ?? defaultAlloc)(n, dim, version);
      for (let k = 0; k < groups.length; k++) {
        const g = groups[k]!;
        place(answers[k]!, order, start[g]!, counts[g]!, dim, out.values, out.found);
      }
      return { version, dim, values: out.values, found: out.found };
    } catch (err) {
      ctl.abort();
      throw err;
    } finally {
      req.signal?.removeEventListener('abort', onAbort);
    }
  }
}

/** Copies group rows into request order: row j of the group's answer goes to position order[base + j]. */
function place(a: LookupResponse, order: Int32Array, base: number, count: number, dim: number, values: Float32Array, found: Uint8Array): void {
  const av = a.values;
  const af = a.found;
  if ((dim & 1) === 0 && (av.byteOffset & 7) === 0 && (values.byteOffset & 7) === 0) {
    // Answers arrive 8-byte aligned (see allocLookupResponse): move rows as Float64 pairs. Finite
    // float32 pairs never form a NaN double, so the copy is bit-exact.
    const src = new Float64Array(av.buffer, av.byteOffset, av.length >>> 1);
    const dst = new Float64Array(values.buffer, values.byteOffset, values.length >>> 1);
    const half = dim >>> 1;
    for (let j = 0; j < count; j++) {
      if (af[j] === 0) continue;
      const i = order[base + j]!;
      found[i] = 1;
      let s = j * half;
      let d = i * half;
      const stop = s + half;
      while (s < stop) dst[d++] = src[s++]!;
    }
    return;
  }
  for (let j = 0; j < count; j++) {
    if (af[j] === 0) continue;
    const i = order[base + j]!;
    found[i] = 1;
    let s = j * dim;
    let d = i * dim;
    const stop = s + dim;
    while (s < stop) values[d++] = av[s++]!;
  }
}
