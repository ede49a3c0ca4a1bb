import xxhash from 'xxhash-wasm';
import { invalidArgument } from './errors.js';

/**
 * Keys travel as packed little-endian uint64: a Uint32Array of 2n words, [lo0, hi0, lo1, hi1, ...],
 * which is byte-for-byte what a BigUint64Array holds on a little-endian host and what the wire carries.
 */
export type PackedKeys = Uint32Array;

/** Every key form the SDK accepts (SPEC: SDK). */
export type KeyInput = BigUint64Array | readonly bigint[] | readonly number[] | readonly string[];

const TWO_32 = 4294967296;
const U64_MAX = (1n << 64n) - 1n;

let hasherPromise: Promise<Awaited<ReturnType<typeof xxhash>>> | undefined;
/** xxhash-wasm instantiates once per process; string keys wait for it. */
export function xxhasher(): Promise<Awaited<ReturnType<typeof xxhash>>> {
  hasherPromise ??= xxhash();
  return hasherPromise;
}

/** xxh64 (seed 0) of the UTF-8 bytes of `s`: the id of a string key, reproducible in any language. */
export async function stringKey(s: string): Promise<bigint> {
  const h = await xxhasher();
  return h.h64Raw(Buffer.from(s, 'utf8'));
}

/**
 * Turns any accepted key form into packed keys, validating each key. `argName` names the argument in
 * errors. BigUint64Array input is viewed, not copied.
 */
export async function packKeys(keys: KeyInput, argName = 'keys'): Promise<PackedKeys> {
  if (keys instanceof BigUint64Array) {
    return new Uint32Array(keys.buffer, keys.byteOffset, keys.length * 2);
  }
  if (!Array.isArray(keys)) {
    throw invalidArgument(`${argName} must be a BigUint64Array or an array of bigint, number or string keys`);
  }
  const n = keys.length;
  const out = new Uint32Array(n * 2);
  if (n === 0) return out;
  const first = typeof keys[0];
  if (first === 'number') {
    const arr = keys as readonly unknown[];
    for (let i = 0; i < n; i++) {
      const k = arr[i];
      if (typeof k !== 'number' || !Number.isSafeInteger(k) || k < 0) {
        throw invalidArgument(`${argName}[${i}] is ${describe(k)}; number keys must be safe non-negative integers (use bigint beyond 2^53)`);
      }
      out[2 * i] = k % TWO_32;
      out[2 * i + 1] = Math.floor(k / TWO_32);
    }
  } else if (first === 'bigint') {
    const arr = keys as readonly unknown[];
    for (let i = 0; i < n; i++) {
      const k = arr[i];
      if (typeof k !== 'bigint' || k < 0n || k > U64_MAX) {
        throw invalidArgument(`${argName}[${i}] is ${describe(k)}; bigint keys must be in [0, 2^64)`);
      }
      out[2 * i] = Number(k & 0xffffffffn);
      out[2 * i + 1] = Number(k >> 32n);
    }
  } else if (first === 'string') {
    const h = await xxhasher();
    const arr = keys as readonly unknown[];
    for (let i = 0; i < n; i++) {
      const k = arr[i];
      if (typeof k !== 'string') throw invalidArgument(`${argName}[${i}] is ${describe(k)}; a key array must not mix kinds`);
      const v = h.h64Raw(Buffer.from(k, 'utf8'));
      out[2 * i] = Number(v & 0xffffffffn);
      out[2 * i + 1] = Number(v >> 32n);
    }
  } else {
    throw invalidArgument(`${argName}[0] is ${describe(keys[0])}; keys must be bigint, number or string`);
  }
  return out;
}

function describe(v: unknown): string {
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v)}`;
  if (typeof v === 'bigint') return `${v}n`;
  if (typeof v === 'number') return String(v);
  return v === null ? 'null' : typeof v;
}

/** The i-th packed key as a bigint (for messages and tools, never on a hot path). */
export function keyAt(keys: PackedKeys, i: number): bigint {
  return (BigInt(keys[2 * i + 1]!) << 32n) | BigInt(keys[2 * i]!);
}

/**
 * The first key that appears twice in `keys`, with both positions; undefined if every key is distinct.
 * A load takes each key once, and so does a put: which of two values was meant is not guessed.
 */
export function repeatedKey(keys: PackedKeys): { key: bigint; first: number; second: number } | undefined {
  const n = keys.length / 2;
  if (n < 2) return undefined;
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  order.sort((a, b) => keys[2 * a + 1]! - keys[2 * b + 1]! || keys[2 * a]! - keys[2 * b]! || a - b);
  for (let j = 1; j < n; j++) {
    const a = order[j - 1]!;
    const b = order[j]!;
    if (keys[2 * a] === keys[2 * b] && keys[2 * a + 1] === keys[2 * b + 1]) return { key: keyAt(keys, a), first: a, second: b };
  }
  return undefined;
}

/** Views bytes (any alignment) as packed keys, copying only when the bytes are not 4-byte aligned. */
export function keysFromBytes(bytes: Uint8Array, argName = 'keys'): PackedKeys {
  if (bytes.byteLength % 8 !== 0) throw invalidArgument(`${argName} has ${bytes.byteLength} bytes, not a multiple of 8`);
  if (bytes.byteOffset % 4 === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  const copy = new Uint32Array(bytes.byteLength / 4);
  new Uint8Array(copy.buffer).set(bytes);
  return copy;
}

/** Views bytes as float32s, copying only when not 4-byte aligned. */
export function floatsFromBytes(bytes: Uint8Array, argName = 'values'): Float32Array {
  if (bytes.byteLength % 4 !== 0) throw invalidArgument(`${argName} has ${bytes.byteLength} bytes, not a multiple of 4`);
  if (bytes.byteOffset % 4 === 0) return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  const copy = new Float32Array(bytes.byteLength / 4);
  new Uint8Array(copy.buffer).set(bytes);
  return copy;
}

/** The bytes of a typed array, as a view. */
export function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/**
 * Index of the first element that is NaN or ±Infinity, or -1. On the bits: a float32 is not finite
 * when its exponent is all ones, and adding one to an all-ones exponent carries into the sign bit.
 * Four floats are tested with one branch (about twice the speed of `v - v !== 0` per float).
 */
export function firstNonFinite(values: Float32Array): number {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const E = 0x7f800000;
  const ONE = 0x00800000;
  const m = u.length & ~3;
  for (let i = 0; i < m; i += 4) {
    if ((((u[i]! & E) + ONE) | ((u[i + 1]! & E) + ONE) | ((u[i + 2]! & E) + ONE) | ((u[i + 3]! & E) + ONE)) & 0x80000000) {
      for (let j = i; ; j++) if ((u[j]! & E) === E) return j;
    }
  }
  for (let i = m; i < u.length; i++) if ((u[i]! & E) === E) return i;
  return -1;
}
