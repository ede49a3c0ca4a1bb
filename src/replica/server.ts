import * as grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument, toGrpcError } from '../common/errors.js';
import { floatsFromBytes, keysFromBytes } from '../common/keys.js';
import type { Manifest } from '../common/manifest.js';
import { EMBKV_SERVER_SERVICE, SERVER_OPTIONS, shardControlService, type LookupRequest } from '../common/wire.js';
import { checkTableName, checkVersion } from '../common/validate.js';
import { Shard } from '../shard/shard.js';
import { ShardStore } from '../shard/store.js';

export interface ReplicaOptions {
  manifest: Manifest;
  group: number;
  replica: number;
  dataDir: string;
  logger: Logger;
  /** Listen here instead of the manifest's address (tests). */
  listenAddress?: string;
}

type State = 'new' | 'opening' | 'open' | 'closing' | 'closed';

/**
 * One shard replica process: restores its tables from its own disk, then serves Lookup, the control
 * RPCs of the loader and operators, and grpc.health.v1.
 */
export class ReplicaServer {
  private state: State = 'new';
  private readonly server = new grpc.Server(SERVER_OPTIONS);
  private readonly store: ShardStore;
  private readonly shard: Shard;
  private readonly health = new HealthImplementation({ '': 'NOT_SERVING' });
  private readonly log: Logger;
  private readonly address: string;
  private readonly startedMs = Date.now();
  private boundPort = 0;

  constructor(private readonly options: ReplicaOptions) {
    const { manifest, group, replica } = options;
    const g = manifest.groups[group];
    if (g === undefined) throw invalidArgument(`group ${group} is not in the manifest (it has ${manifest.groups.length} groups)`);
    const addr = g.replicas[replica];
    if (addr === undefined) throw invalidArgument(`replica ${replica} is not in group ${group} (it has ${g.replicas.length} replicas)`);
    this.address = options.listenAddress ?? addr;
    this.log = options.logger.child({ component: 'replica', group, replica });
    this.store = new ShardStore(options.dataDir);
    this.shard = new Shard(this.store, { keepVersions: manifest.keepVersions, logger: this.log });
  }

  get port(): number {
    return this.boundPort;
  }

  async start(): Promise<void> {
    if (this.state !== 'new') throw new KvError(KvErrorCode.CLOSED, `replica is ${this.state}`);
    this.state = 'opening';
    await this.store.open();
    await this.shard.restore();
    this.server.addService(EMBKV_SERVER_SERVICE, { lookup: this.onLookup.bind(this) });
    this.server.addService(shardControlService(), this.controlHandlers());
    this.health.addToServer(this.server);
    this.boundPort = await new Promise<number>((resolve, reject) => {
      this.server.bindAsync(this.address, grpc.ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port)));
    });
    this.health.setStatus('', 'SERVING');
    this.state = 'open';
    this.log.info({ address: this.address, port: this.boundPort, data: this.options.dataDir }, 'serving');
  }

  /** Stops taking calls, lets calls in flight finish (up to `graceMs`), then closes the store. */
  async close(graceMs = 5000): Promise<void> {
    if (this.state === 'closed' || this.state === 'closing') return;
    this.state = 'closing';
    this.health.setStatus('', 'NOT_SERVING');
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.server.forceShutdown();
        resolve();
      }, graceMs);
      timer.unref();
      this.server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    await this.store.close();
    this.state = 'closed';
    this.log.info('stopped');
  }

  private onLookup(call: grpc.ServerUnaryCall<LookupRequest, Buffer>, callback: grpc.sendUnaryData<Buffer>): void {
    try {
      const req = call.request;
      checkTableName(req.table);
      const keys = keysFromBytes(req.keys);
      callback(null, this.shard.lookup(req.table, req.version, keys));
    } catch (err) {
      callback(toGrpcError(err));
    }
  }

  private controlHandlers(): grpc.UntypedServiceImplementation {
    const unary = <Req, Res>(fn: (req: Req) => Promise<Res> | Res) =>
      (call: grpc.ServerUnaryCall<Req, Res>, callback: grpc.sendUnaryData<Res>): void => {
        Promise.resolve()
          .then(() => fn(call.request))
          .then((res) => callback(null, res), (err: unknown) => {
            if (!(err instanceof KvError)) this.log.error({ err }, 'control call failed');
            callback(toGrpcError(err));
          });
      };
    return {
      LoadBegin: unary(async (r: { table: string; version: number; dim: number; loadId: string; force: boolean }) => ({
        currentVersion: await this.shard.loadBegin(r.table, checkVersion(r.version), r.dim, r.loadId, r.force),
      })),
      LoadRows: unary(async (r: { table: string; version: number; loadId: string; keys: Buffer; values: Buffer }) => ({
        rows: await this.shard.loadRows(r.table, r.version, r.loadId, keysFromBytes(r.keys), floatsFromBytes(r.values)),
      })),
      LoadSeal: unary(async (r: { table: string; version: number; loadId: string; expectedRows: number }) => ({
        rows: await this.shard.loadSeal(r.table, r.version, r.loadId, r.expectedRows),
      })),
      LoadAbort: unary(async (r: { table: string; version: number; loadId: string }) => {
        await this.shard.loadAbort(r.table, r.version, r.loadId);
        return {};
      }),
      Publish: unary(async (r: { table: string; version: number; rollback: boolean }) => ({
        previousVersion: await this.shard.publish(r.table, r.version, r.rollback),
      })),
      Status: unary(() => {
        const mem = process.memoryUsage();
        return {
          group: this.options.group,
          replica: this.options.replica,
          address: this.address,
          uptimeMs: Date.now() - this.startedMs,
          rssBytes: mem.rss,
          heapUsedBytes: mem.heapUsed,
          tables: this.shard.status(),
          pid: process.pid,
        };
      }),
    };
  }
}
