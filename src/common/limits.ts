/** Limits and encodings that the SDK, the loader and the replicas must agree on. */
import { KvError, KvErrorCode } from './errors.js';

/** The largest vector dimension a table version may have. */
export const MAX_DIM = 16384;

/** Keys in one real-time put batch (one putEmbeddings call). */
export const MAX_PUT_KEYS = 65_536;

/**
 * Real-time puts carry a write order: client milliseconds * ORDER_SCALE + a writer tag below
 * ORDER_SCALE. The highest order wins per key.
 */
export const ORDER_SCALE = 4096;

/** The largest answer a replica or the router gives to one lookup. */
export const MAX_ANSWER_BYTES = 256 * 1024 * 1024;

/** Refuses a lookup of `n` keys whose answer at `dim` would pass MAX_ANSWER_BYTES. */
export function checkAnswerSize(n: number, dim: number): void {
  if (n * dim * 4 > MAX_ANSWER_BYTES) {
    throw new KvError(KvErrorCode.RESOURCE_EXHAUSTED, `an answer of ${n} keys of dim ${dim} would exceed ${MAX_ANSWER_BYTES} bytes; split the request`);
  }
}
