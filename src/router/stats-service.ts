import * as grpc from '@grpc/grpc-js';
import { KvError, KvErrorCode } from '../common/errors.js';
import type { SecurityConfig } from '../cluster/manifest.js';
import { authMetadata, channelCredentials } from '../cluster/security.js';
import { readField } from '../wire/protobuf.js';
import type { FanoutStats } from '../fanout/stats.js';

/**
 * `/embkv.v1.Router/Stats`, served by the router next to Embkv.Lookup for `kvctl status --router`.
 * Standard protobuf (proto/embkv.proto: Router.Stats, RouterStatsResponse { string json = 1; }) where json
 * is a FanoutStats object.
 */

export const ROUTER_STATS_PATH = '/embkv.v1.Router/Stats';

export function encodeStatsResponse(stats: FanoutStats): Buffer {
  // NaN (no samples yet) is not JSON: it travels as null.
  const json = Buffer.from(JSON.stringify(stats), 'utf8');
  const head: number[] = [0x0a];
  let len = json.length;
  while (len >= 128) {
    head.push((len % 128) | 128);
    len = Math.floor(len / 128);
  }
  head.push(len);
  return Buffer.concat([Buffer.from(head), json]);
}

export function decodeStatsResponse(buf: Buffer): FanoutStats {
  const json = readField(buf, 1);
  if (!(json instanceof Uint8Array)) throw new KvError(KvErrorCode.INTERNAL, 'the router\'s stats answer has no json field');
  return JSON.parse(Buffer.from(json.buffer, json.byteOffset, json.byteLength).toString('utf8')) as FanoutStats;
}

export const ROUTER_STATS_SERVICE = {
  stats: {
    path: ROUTER_STATS_PATH,
    requestStream: false,
    responseStream: false,
    requestSerialize: (): Buffer => Buffer.alloc(0),
    requestDeserialize: (): Record<string, never> => ({}),
    responseSerialize: encodeStatsResponse,
    responseDeserialize: decodeStatsResponse,
    originalName: 'Stats',
  },
};

/** Asks a router (`kvctl router`) for its stats. */
export function fetchRouterStats(address: string, deadlineMs: number, security?: SecurityConfig, token?: string): Promise<FanoutStats> {
  const client = new grpc.Client(address, channelCredentials(security));
  const m = ROUTER_STATS_SERVICE.stats;
  return new Promise<FanoutStats>((resolve, reject) => {
    client.makeUnaryRequest<Record<string, never>, FanoutStats>(m.path, m.requestSerialize, m.responseDeserialize, {}, authMetadata(token),
      { deadline: Date.now() + deadlineMs }, (err, res) => (err ? reject(err) : resolve(res!)));
  }).finally(() => client.close());
}
