import * as grpc from '@grpc/grpc-js';
import { KvError, KvErrorCode } from '../common/errors.js';
import type { Manifest } from './manifest.js';
import { AUTHORIZATION, channelCredentials } from './security.js';
import { CHANNEL_OPTIONS } from '../transport/options.js';
import { EmbkvClient, shardControlClientConstructor } from '../wire/services.js';

/** One channel per replica address, shared by its lookup and control stubs. */
export interface ReplicaConn {
  group: number;
  replica: number;
  address: string;
  channel: grpc.Channel;
  lookup: grpc.Client;
  /** Made at first use (see protoPackage in wire/services.ts): a client that only looks up never needs it. */
  readonly control: grpc.Client;
  /** Metadata for one call: `base` (copied) or empty, with this connection's token unless `base` carries one. */
  callMetadata(base?: grpc.Metadata): grpc.Metadata;
}

export interface ConnectionOptions {
  /** Sent as `authorization: Bearer <token>` with every call (README: Security). */
  token?: string | undefined;
}

class Conn implements ReplicaConn {
  private controlStub: grpc.Client | undefined;
  readonly lookup: grpc.Client;

  constructor(
    readonly group: number, readonly replica: number, readonly address: string, readonly channel: grpc.Channel,
    private readonly creds: grpc.ChannelCredentials, private readonly bearer: string | undefined,
  ) {
    this.lookup = new EmbkvClient(address, creds, { channelOverride: channel });
  }

  callMetadata(base?: grpc.Metadata): grpc.Metadata {
    const md = base === undefined ? new grpc.Metadata() : base.clone();
    if (this.bearer !== undefined && md.get(AUTHORIZATION).length === 0) md.set(AUTHORIZATION, this.bearer);
    return md;
  }

  get control(): grpc.Client {
    if (this.controlStub === undefined) {
      const Control = shardControlClientConstructor();
      this.controlStub = new Control(this.address, this.creds, { channelOverride: this.channel });
    }
    return this.controlStub;
  }

  close(): void {
    this.lookup.close();
    this.controlStub?.close();
    this.channel.close();
  }
}

export class ClusterConnections {
  /** groups[g][r] */
  readonly groups: readonly ReplicaConn[][];
  private readonly conns: Conn[][];

  constructor(readonly manifest: Manifest, options: ConnectionOptions = {}) {
    // TLS with the manifest's CA when it has security.tls; plain text otherwise.
    const creds = channelCredentials(manifest.security);
    const bearer = options.token === undefined ? undefined : `Bearer ${options.token}`;
    this.conns = manifest.groups.map((g, gi) => g.replicas.map((address, ri) => new Conn(gi, ri, address, new grpc.Channel(address, creds, CHANNEL_OPTIONS), creds, bearer)));
    this.groups = this.conns;
  }

  all(): ReplicaConn[] {
    return this.groups.flat();
  }

  /** Starts connecting to every replica now, instead of at the first call to each. */
  connect(): void {
    for (const c of this.all()) c.channel.getConnectivityState(true);
  }

  close(): void {
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
