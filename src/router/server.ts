import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { invalidArgument, toGrpcError } from '../common/errors.js';
import { keysFromBytes } from '../common/keys.js';
import type { Manifest } from '../common/manifest.js';
import { checkTableName } from '../common/validate.js';
import { EMBKV_SERVER_SERVICE, SERVER_OPTIONS, allocLookupResponse, type LookupRequest } from '../common/wire.js';
import { Fanout } from './fanout.js';

export const DEFAULT_ROUTER_DEADLINE_MS = 5000;
export const MAX_ROUTER_KEYS = 4_000_000;

export interface RouterOptions {
  manifest: Manifest;
  host: string;
  port: number;
  logger: Logger;
  /** Deadline of a request whose caller set none. */
  deadlineMs?: number;
}

/**
 * The router endpoint: the same Embkv.Lookup service as a replica, for any keys. It fans out exactly
 * like the SDK and writes the merged answer straight into the response buffer.
 */
export class RouterServer {
  private readonly server = new grpc.Server(SERVER_OPTIONS);
  private readonly fanout: Fanout;
  private readonly log: Logger;
  private boundPort = 0;

  constructor(private readonly options: RouterOptions) {
    this.fanout = new Fanout(options.manifest);
    this.log = options.logger.child({ component: 'router' });
  }

  get port(): number {
    return this.boundPort;
  }

  async start(): Promise<void> {
    this.server.addService(EMBKV_SERVER_SERVICE, { lookup: this.onLookup.bind(this) });
    const addr = this.options.host.includes(':') ? `[${this.options.host}]:${this.options.port}` : `${this.options.host}:${this.options.port}`;
    this.boundPort = await new Promise<number>((resolve, reject) =>
      this.server.bindAsync(addr, grpc.ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port))),
    );
    this.log.info({ host: this.options.host, port: this.boundPort, groups: this.options.manifest.groups.length }, 'router serving');
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.tryShutdown(() => resolve()));
    this.fanout.close();
  }

  private onLookup(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    let buf: Buffer | undefined;
    Promise.resolve()
      .then(() => {
        const req = call.request;
        checkTableName(req.table);
        const keys = keysFromBytes(req.keys);
        if (keys.length / 2 > MAX_ROUTER_KEYS) throw invalidArgument(`a lookup holds ${keys.length / 2} keys; at most ${MAX_ROUTER_KEYS}`);
        const callDeadline = call.getDeadline();
        const deadline = callDeadline instanceof Date ? callDeadline.getTime()
          : Number.isFinite(callDeadline) ? Number(callDeadline) : Date.now() + (this.options.deadlineMs ?? DEFAULT_ROUTER_DEADLINE_MS);
        const ctl = new AbortController();
        call.on('cancelled', () => ctl.abort());
        return this.fanout.lookup({
          table: req.table,
          version: req.version,
          keys,
          deadline,
          signal: ctl.signal,
          alloc: (n, dim, version) => {
            const r = allocLookupResponse(version, dim, n);
            buf = r.buf;
            return r;
          },
        });
      })
      .then(() => callback(null, buf!), (err: unknown) => callback(toGrpcError(err)));
  }
}
