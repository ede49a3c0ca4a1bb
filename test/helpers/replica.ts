import * as grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS } from '../../src/transport/options.js';
import { type LookupResponse } from '../../src/wire/lookup.js';
import { EmbkvClient } from '../../src/wire/services.js';

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
