import * as grpc from '@grpc/grpc-js';
import type { Manifest } from '../common/manifest.js';
import { CHANNEL_OPTIONS, EmbkvClient, shardControlClientConstructor } from '../common/wire.js';

/** One channel per replica address, shared by its lookup and control stubs. */
export interface ReplicaConn {
  group: number;
  replica: number;
  address: string;
  channel: grpc.Channel;
  lookup: grpc.Client;
  control: grpc.Client;
}

export class ClusterConnections {
  /** groups[g][r] */
  readonly groups: ReplicaConn[][];

  constructor(readonly manifest: Manifest) {
    const Control = shardControlClientConstructor();
    const creds = grpc.credentials.createInsecure();
    this.groups = manifest.groups.map((g, gi) =>
      g.replicas.map((address, ri) => {
        const channel = new grpc.Channel(address, creds, CHANNEL_OPTIONS);
        return {
          group: gi,
          replica: ri,
          address,
          channel,
          lookup: new EmbkvClient(address, creds, { channelOverride: channel }),
          control: new Control(address, creds, { channelOverride: channel }),
        };
      }),
    );
  }

  all(): ReplicaConn[] {
    return this.groups.flat();
  }

  /** Starts connecting to every replica now, instead of at the first call to each. */
  connect(): void {
    for (const c of this.all()) c.channel.getConnectivityState(true);
  }

  close(): void {
    for (const c of this.all()) {
      c.lookup.close();
      c.control.close();
      c.channel.close();
    }
  }
}

/** Calls a unary control method with a deadline, as a promise. */
export function controlCall<Res>(conn: ReplicaConn, method: string, request: object, deadlineMs: number): Promise<Res> {
  return new Promise<Res>((resolve, reject) => {
    const fn = (conn.control as unknown as Record<string, Function>)[method];
    if (typeof fn !== 'function') {
      reject(new Error(`no control method ${method}`));
      return;
    }
    fn.call(conn.control, request, { deadline: new Date(Date.now() + deadlineMs) }, (err: grpc.ServiceError | null, res: Res) =>
      err ? reject(err) : resolve(res),
    );
  });
}
