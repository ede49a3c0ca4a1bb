/** Limits and encodings that the SDK, the loader and the replicas must agree on. */

/** The largest vector dimension a table version may have. */
export const MAX_DIM = 16384;

/** Keys in one real-time put batch (one putEmbeddings call). */
export const MAX_PUT_KEYS = 65_536;

/**
 * Real-time puts carry a write order: client milliseconds * ORDER_SCALE + a writer tag below
 * ORDER_SCALE. The highest order wins per key.
 */
export const ORDER_SCALE = 4096;
