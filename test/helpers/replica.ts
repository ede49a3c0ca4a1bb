import * as grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS } from '../../src/transport/options.js';
import { type LookupResponse } from '../../src/wire/lookup.js';
import { EmbkvClient } from '../../src/wire/services.js';
import type { Manifest } from '../../src/cluster/manifest.js';
import { partitionOf } from '../../src/cluster/partition.js';
import { sameBits } from './model.js';

/** A Lookup sent to one replica, bypassing the SDK, to see what that replica itself serves. */
export function lookupAt(address: string, table: string, keys: BigUint64Array, version = 0): Promise<LookupResponse> {
  const c = new EmbkvClient(address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  return new Promise<LookupResponse>((resolve, reject) => {
    (c as unknown as { lookup: Function }).lookup(
      { table, version, keys: new Uint8Array(keys.buffer, keys.byteOffset, keys.byteLength) },
      { deadline: new Date(Date.now() + 10_000) },
      (err: Error | null, r: LookupResponse) => {
        c.close();
        if (err) reject(err);
        else resolve(r);
      },
    );
  });
}

/**
 * Whether every replica of each key's group serves exactly `want` (key -> vector) for `table`:
 * undefined when all do, else the first difference, for until() and assertion messages.
 */
export async function differsOnReplicas(manifest: Manifest, table: string, want: Map<bigint, Float32Array>): Promise<string | undefined> {
  const keys = BigUint64Array.from(want.keys());
  const { partitions, groups } = manifest;
  for (const [g, group] of groups.entries()) {
    for (const address of group.replicas) {
      const r = await lookupAt(address, table, keys);
      for (let i = 0; i < keys.length; i++) {
        if (partitionOf(keys[i]!, partitions) % groups.length !== g) continue;
        const got = r.values.subarray(i * r.dim, (i + 1) * r.dim);
        const w = want.get(keys[i]!)!;
        if (r.found[i] !== 1) return `${address} v${r.version}: key ${keys[i]} is absent`;
        if (!sameBits(got, w)) return `${address} v${r.version}: key ${keys[i]} serves ${got[0]}, want ${w[0]}`;
      }
    }
  }
  return undefined;
}
