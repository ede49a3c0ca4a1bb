import * as grpc from '@grpc/grpc-js';
import { KvError, KvErrorCode } from '../common/errors.js';
import type { Manifest } from './manifest.js';
import { FileSource, type ClusterSource, type SourceEvent } from './source.js';
import { AUTHORIZATION, channelCredentials } from './security.js';
import { CHANNEL_OPTIONS } from '../transport/options.js';
import { EmbkvClient, shardControlClientConstructor } from '../wire/services.js';

/** One channel per replica address, shared by its lookup and control stubs. */
export interface ReplicaConn {
  readonly group: number;
  readonly replica: number;
  /** Where the replica is now: the manifest's address, or (etcd) the one it registered last. */
  readonly address: string;
  /** False while the cluster source knows no address for it (etcd: its lease expired): avoided. */
  readonly present: boolean;
  readonly channel: grpc.Channel;
  readonly lookup: grpc.Client;
  /** Made at first use (see protoPackage in wire/services.ts): a client that only looks up never needs it. */
  readonly control: grpc.Client;
  /** Metadata for one call: `base` (copied) or empty, with this connection's token unless `base` carries one. */
  callMetadata(base?: grpc.Metadata): grpc.Metadata;
}

export interface ConnectionOptions {
  /** Sent as `authorization: Bearer <token>` with every call (README: Security). */
  token?: string | undefined;
}

/** A replica's channel and stubs; they are replaced when the replica moves to another address. */
class Conn implements ReplicaConn {
  private controlStub: grpc.Client | undefined;
  private lookupStub: grpc.Client;
  private ch: grpc.Channel;
  private addr: string;
  present = true;

  constructor(
    readonly group: number, readonly replica: number, address: string,
    private readonly creds: grpc.ChannelCredentials, private readonly bearer: string | undefined,
  ) {
    this.addr = address;
    this.ch = new grpc.Channel(address, creds, CHANNEL_OPTIONS);
    this.lookupStub = new EmbkvClient(address, creds, { channelOverride: this.ch });
  }

  get address(): string {
    return this.addr;
  }

  get channel(): grpc.Channel {
    return this.ch;
  }

  get lookup(): grpc.Client {
    return this.lookupStub;
  }

  callMetadata(base?: grpc.Metadata): grpc.Metadata {
    const md = base === undefined ? new grpc.Metadata() : base.clone();
    if (this.bearer !== undefined && md.get(AUTHORIZATION).length === 0) md.set(AUTHORIZATION, this.bearer);
    return md;
  }

  get control(): grpc.Client {
    if (this.controlStub === undefined) {
      const Control = shardControlClientConstructor();
      this.controlStub = new Control(this.addr, this.creds, { channelOverride: this.ch });
    }
    return this.controlStub;
  }

  /** Points the stubs at `address`; returns the old stubs for the caller to close once their calls are done. */
  moveTo(address: string): () => void {
    const old = { lookup: this.lookupStub, control: this.controlStub, channel: this.ch };
    this.addr = address;
    this.ch = new grpc.Channel(address, this.creds, CHANNEL_OPTIONS);
    this.lookupStub = new EmbkvClient(address, this.creds, { channelOverride: this.ch });
    this.controlStub = undefined;
    return () => {
      old.lookup.close();
      old.control?.close();
      old.channel.close();
    };
  }

  close(): void {
    this.lookupStub.close();
    this.controlStub?.close();
    this.ch.close();
  }
}

/** Calls on a replica's old address may run this long after it moved before its channel is closed. */
const RETIRED_CHANNEL_MS = 30_000;

/**
 * One connection per replica, at the address the cluster source gives: fixed for a manifest file;
 * with etcd, followed as replicas register, move and expire (listeners hear of each change).
 */
export class ClusterConnections {
  /** groups[g][r] */
  readonly groups: readonly ReplicaConn[][];
  readonly source: ClusterSource;
  private readonly conns: Conn[][];
  private readonly creds: grpc.ChannelCredentials;
  private readonly listeners = new Set<(conn: ReplicaConn, moved: boolean) => void>();
  private readonly unsubscribe: () => void;
  private readonly retired = new Set<{ timer: NodeJS.Timeout; close: () => void }>();
  private closed = false;

  /** `source`: an opened ClusterSource (default: the manifest alone, at its addresses). */
  constructor(readonly manifest: Manifest, options: ConnectionOptions = {}, source?: ClusterSource) {
    this.source = source ?? FileSource.of(manifest);
    // TLS with the manifest's CA when it has security.tls; plain text otherwise.
    this.creds = channelCredentials(manifest.security);
    const bearer = options.token === undefined ? undefined : `Bearer ${options.token}`;
    this.conns = manifest.groups.map((g, gi) => g.replicas.map((address, ri) => {
      const known = this.source.address(gi, ri);
      const c = new Conn(gi, ri, known ?? address, this.creds, bearer);
      c.present = known !== undefined;
      return c;
    }));
    this.groups = this.conns;
    this.unsubscribe = this.source.subscribe((e) => this.onSourceEvent(e));
  }

  /** Connections at the addresses an opened `source` gives, following it. */
  static of(source: ClusterSource, options: ConnectionOptions = {}): ClusterConnections {
    return new ClusterConnections(source.manifest, options, source);
  }

  private onSourceEvent(e: SourceEvent): void {
    if (e.kind !== 'member' || this.closed) return;
    const c = this.conns[e.group]?.[e.replica];
    if (c === undefined) return;
    let moved = false;
    if (e.address === undefined) {
      c.present = false;
    } else {
      c.present = true;
      if (e.address !== c.address) {
        moved = true;
        const close = c.moveTo(e.address);
        const r = { timer: setTimeout(() => { this.retired.delete(r); close(); }, RETIRED_CHANNEL_MS), close };
        r.timer.unref();
        this.retired.add(r);
        c.channel.getConnectivityState(true);
      }
    }
    for (const l of this.listeners) l(c, moved);
  }

  /** Calls `listener` when a replica moves, registers or expires; returns the function that stops it. */
  onChange(listener: (conn: ReplicaConn, moved: boolean) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  all(): ReplicaConn[] {
    return this.groups.flat();
  }

  /** Starts connecting to every replica now, instead of at the first call to each. */
  connect(): void {
    for (const c of this.all()) c.channel.getConnectivityState(true);
  }

  close(): void {
    this.closed = true;
    this.unsubscribe();
    this.listeners.clear();
    for (const r of this.retired) {
      clearTimeout(r.timer);
      r.close();
    }
    this.retired.clear();
    for (const c of this.conns.flat()) c.close();
  }
}

/** Calls a unary control method with a deadline, as a promise. */
export function controlCall<Res>(conn: ReplicaConn, method: string, request: object, deadlineMs: number): Promise<Res> {
  return new Promise<Res>((resolve, reject) => {
    const fn = (conn.control as unknown as Record<string, Function>)[method];
    if (typeof fn !== 'function') {
      reject(new KvError(KvErrorCode.INTERNAL, `no control method ${method}`));
      return;
    }
    fn.call(conn.control, request, conn.callMetadata(), { deadline: new Date(Date.now() + deadlineMs) }, (err: grpc.ServiceError | null, res: Res) =>
      err ? reject(err) : resolve(res),
    );
  });
}
