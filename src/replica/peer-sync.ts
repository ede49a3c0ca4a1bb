import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { KvError, KvErrorCode } from '../common/errors.js';
import { floatsFromBytes, keysFromBytes } from '../common/keys.js';
import { CHANNEL_OPTIONS } from '../transport/options.js';
import { shardControlClientConstructor } from '../wire/services.js';
import { ORDER_SCALE } from '../common/limits.js';
import type { Shard } from '../shard/shard.js';
import type { SecurityConfig } from '../cluster/manifest.js';
import { authMetadata, channelCredentials } from '../cluster/security.js';

export const PULL_INTERVAL_MS = 250;
/** Refusals that a retry would meet again: the batch is skipped. */
const PERMANENT = new Set<string>([KvErrorCode.TABLE_NOT_FOUND, KvErrorCode.VERSION_NOT_FOUND, KvErrorCode.INVALID_ARGUMENT]);
const PULL_BATCHES = 256;
/** One catch-up call may take this long; a peer that does not answer in time is skipped. */
const CATCH_UP_CALL_MS = 5000;

interface PulledBatch {
  seq: number;
  table: string;
  order: number;
  writer: string;
  keys: Buffer;
  values: Buffer;
}

interface Peer {
  replica: number;
  /** Undefined while the cluster source knows no address for the peer (etcd: not registered). */
  address: string | undefined;
  client: grpc.Client | undefined;
  /** The peer's log position up to which this replica has what it logged. */
  cursor: number;
  /** Which of the admin tokens this peer is called with: the next one after a refusal (a rotation under way). */
  tokenIndex: number;
}

/**
 * Keeps the real-time puts of a group's replicas in step. Writers send every put to every replica;
 * a replica that missed some (it was down, or a call to it failed) pulls them from its peers' put
 * logs: once before it serves, then every PULL_INTERVAL_MS. Batches carry their write order and
 * writer, so one applied twice, or in another order, ends in the same state.
 */
export class PeerSync {
  private readonly peers: Peer[];
  private timer: NodeJS.Timeout | undefined;
  private running = false;
  private readonly creds: grpc.ChannelCredentials;

  /**
   * `adminTokens`: the tokens file's admin tokens (PutsSince needs admin); empty without a tokens
   * file. Channels use the manifest's TLS, with the replica's certificate as client certificate under mTLS.
   */
  constructor(
    private readonly shard: Shard, peers: { replica: number; address: string | undefined }[], private readonly log: Logger,
    security: SecurityConfig | undefined, private readonly adminTokens: () => readonly string[],
  ) {
    this.creds = channelCredentials(security);
    this.peers = peers.map(({ replica, address }) => ({ replica, address, client: this.clientFor(address), cursor: 0, tokenIndex: 0 }));
  }

  private clientFor(address: string | undefined): grpc.Client | undefined {
    if (address === undefined) return undefined;
    const Control = shardControlClientConstructor();
    return new Control(address, this.creds, CHANNEL_OPTIONS);
  }

  /**
   * A peer moved, registered or expired (etcd): pull from its new address, from the start of its log
   * (batches already held are skipped), or not at all while it has none.
   */
  setPeerAddress(replica: number, address: string | undefined): void {
    const p = this.peers.find((x) => x.replica === replica);
    if (p === undefined || p.address === address) return;
    p.client?.close();
    p.address = address;
    p.client = this.clientFor(address);
    p.cursor = 0;
  }

  private metadataFor(p: Peer): grpc.Metadata {
    const tokens = this.adminTokens();
    return authMetadata(tokens.length === 0 ? undefined : tokens[p.tokenIndex % tokens.length]);
  }

  /** Pulls everything the reachable peers logged; a peer that does not answer is skipped. */
  async catchUp(): Promise<void> {
    await Promise.all(
      this.peers.map(async (p) => {
        if (p.client === undefined) return;
        try {
          const pulled = await this.pullAll(p, CATCH_UP_CALL_MS);
          if (pulled > 0) this.log.info({ peer: p.address, batches: pulled }, 'caught up on real-time puts');
        } catch (err) {
          this.log.warn({ peer: p.address, err: (err as Error).message }, 'peer not reachable to catch up from');
        }
      }),
    );
  }

  start(): void {
    if (this.peers.length === 0) return;
    const tick = (): void => {
      this.timer = setTimeout(() => {
        if (this.running) return tick();
        this.running = true;
        Promise.allSettled(this.peers.map((p) => this.pullAll(p, 2000)))
          .finally(() => {
            this.running = false;
            if (this.timer !== undefined) tick();
          });
      }, PULL_INTERVAL_MS);
      this.timer.unref();
    };
    tick();
  }

  stop(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    for (const p of this.peers) p.client?.close();
  }

  /** Pulls until the peer has nothing newer; each call may take `callMs` (a large backlog takes many). */
  private async pullAll(p: Peer, callMs: number): Promise<number> {
    let applied = 0;
    const client = p.client;
    if (client === undefined) return 0;
    for (;;) {
      // It moved meanwhile: the next round pulls from its new address.
      if (p.client !== client) return applied;
      const deadline = Date.now() + callMs;
      const res = await new Promise<{ batches: PulledBatch[]; lastSeq: number }>((resolve, reject) => {
        (client as unknown as Record<string, Function>)['PutsSince']!.call(
          client,
          { afterSeq: p.cursor, maxBatches: PULL_BATCHES },
          this.metadataFor(p),
          { deadline: new Date(deadline) },
          (err: grpc.ServiceError | null, r: { batches: PulledBatch[]; lastSeq: number }) => {
            // A peer that does not know this token yet (or any more): the next admin token next time.
            if (err && (err.code === grpc.status.UNAUTHENTICATED || err.code === grpc.status.PERMISSION_DENIED)) p.tokenIndex++;
            if (err) reject(err);
            else resolve(r);
          },
        );
      });
      // A peer whose log restarted below our cursor (its disk was replaced) is read again from the start.
      if (res.lastSeq < p.cursor) {
        p.cursor = 0;
        continue;
      }
      for (const b of res.batches) {
        if (!this.shard.hasPut(b.order, b.writer)) {
          try {
            const lag = Math.max(0, Date.now() - Math.floor(b.order / ORDER_SCALE));
            await this.shard.put({ table: b.table, keys: keysFromBytes(b.keys), values: floatsFromBytes(b.values), order: b.order, writer: b.writer, lagMs: lag });
            applied++;
          } catch (err) {
            if (!(err instanceof KvError) || !PERMANENT.has(err.code)) {
              // A disk error or a full overlay may pass: keep the cursor here and try again next time.
              this.log.warn({ peer: p.address, seq: b.seq, err: (err as Error).message }, 'could not apply a put batch from a peer; will retry');
              return applied;
            }
            // A batch this replica can never apply (a table it does not hold, a superseded dim) is skipped.
            this.log.warn({ peer: p.address, seq: b.seq, table: b.table, err: err.message }, 'skipped a put batch from a peer');
          }
        }
        p.cursor = b.seq;
      }
      if (res.batches.length === 0 || p.cursor >= res.lastSeq) return applied;
    }
  }
}
