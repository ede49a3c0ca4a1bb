import { KvError, KvErrorCode } from '../common/errors.js';
import { LOOKUP_KERNEL_WASM } from './wasm-kernel-bytes.js';

/**
 * WebAssembly memory holding one version's rows, and once the version is sealed its slot table
 * too, so that its lookups run in the compiled kernel of src/shard/lookup-kernel.wat: 19k keys from
 * 250k took 1.25-1.38 ms there against 3.26-3.53 ms in the JavaScript kernel (bench/RESULTS.md).
 *
 *   [ slots ] [ slab 0 | slab 1 | ... | slab k ]  [ kernel scratch: keys | out | found | blk ]
 *   presized   rows, written while the version loads  added at seal(); the memory never grows after it
 *
 * A version sized for its load puts its slot table first; one that outgrows it (or was not sized)
 * keeps its slots in JavaScript until seal() copies them in after the slabs. Slabs are allocated
 * back to back, so row r lives at rows + r * rowBytes. Growing the
 * memory replaces its ArrayBuffer: whoever holds views into it takes them again (`buffer`). Pages
 * never written are never resident, so a slab's unused tail costs address space only.
 */

/** Keys one kernel call takes; a longer lookup goes in chunks, so the scratch stays small and warm. */
const CHUNK = 4096;
const PAGE = 65536;
/** The most one version keeps in WebAssembly memory (a wasm32 memory addresses 4 GiB). */
const ARENA_MAX_BYTES = 3 * 2 ** 30;

/** The kernel's scratch for rows of `dim` floats: a chunk's keys, rows and found flags, and 64 bytes of block rows. */
function scratchBytes(dim: number): number {
  return CHUNK * 8 + CHUNK * dim * 4 + CHUNK + 64;
}

type KernelFn = (keys: number, n: number, slots: number, cap: number, rows: number, rowBytes: number, out: number, found: number, blk: number) => number;

let compiled: WebAssembly.Module | null | undefined;

/** The compiled kernel, or undefined where this runtime has no WebAssembly (or no SIMD). */
function kernelModule(): WebAssembly.Module | undefined {
  if (compiled === undefined) {
    try {
      compiled = new WebAssembly.Module(Buffer.from(LOOKUP_KERNEL_WASM, 'base64'));
    } catch {
      compiled = null;
    }
  }
  return compiled ?? undefined;
}

interface Sealed {
  fn: KernelFn;
  cap: number;
  slotsOff: number;
  rowsOff: number;
  /** The scratch, as views: a chunk's keys, then its rows, then its found flags, then 64 bytes of block rows. */
  keys: Uint32Array;
  out: Float32Array;
  found: Uint8Array;
}

export class LookupArena {
  private readonly memory: WebAssembly.Memory;
  private used = 0;
  private sealedAt: Sealed | undefined;

  private constructor(private readonly module: WebAssembly.Module, private readonly dim: number, expectedBytes: number) {
    // Sized for the rows expected at once: V8 counts each growth of a memory as external memory
    // and started extra mark-compacts (~50 ms each in a replica) for a load that grew it slab by slab.
    const initial = Math.min(Math.ceil(expectedBytes / PAGE), ARENA_MAX_BYTES / PAGE);
    this.memory = new WebAssembly.Memory({ initial, maximum: ARENA_MAX_BYTES / PAGE });
  }

  /**
   * An arena for rows of `dim` floats, sized for `expectedRows` of them and `slots` slots, or
   * undefined where the kernel cannot serve them (dim not a multiple of 4, no WebAssembly).
   */
  static create(dim: number, expectedRows = 0, slots = 0): LookupArena | undefined {
    if (dim <= 0 || dim % 4 !== 0) return undefined;
    const mod = kernelModule();
    if (mod === undefined) return undefined;
    const bytes = expectedRows * dim * 4 + slots * 12 + scratchBytes(dim) + 2 * 64;
    // A version expected past what one memory holds starts in JavaScript arrays rather than fill
    // the memory and move out of it.
    if (bytes > ARENA_MAX_BYTES) return undefined;
    try {
      return new LookupArena(mod, dim, bytes);
    } catch {
      // No address space for another memory (each reserves its maximum): this version uses JavaScript arrays.
      return undefined;
    }
  }

  /** The memory's current buffer (a new one after each growth). */
  get buffer(): ArrayBuffer {
    return this.memory.buffer;
  }

  /** Allocates `bytes` (64-byte aligned) at the end; undefined if that passes ARENA_MAX_BYTES. */
  alloc(bytes: number): number | undefined {
    if (this.sealedAt !== undefined) throw new KvError(KvErrorCode.INTERNAL, 'alloc in a sealed arena');
    const off = (this.used + 63) & ~63;
    const end = off + bytes;
    if (end > ARENA_MAX_BYTES) return undefined;
    const have = this.memory.buffer.byteLength;
    // Grow by at least a quarter (16 MiB at first): address space, not memory, until written, and
    // few growths, each of which V8 counts as new external memory.
    if (end > have) {
      try {
        const step = Math.max(256, Math.ceil(have / PAGE / 4));
        this.memory.grow(Math.max(Math.ceil((end - have) / PAGE), Math.min(step, ARENA_MAX_BYTES / PAGE - have / PAGE)));
      } catch {
        return undefined; // the system refused the memory: the caller moves to JavaScript arrays
      }
    }
    this.used = end;
    return off;
  }

  /**
   * Adds the kernel's scratch (and the slot table, unless it lives here already), and instantiates
   * the kernel for rows from byte `rowsOff`. Returns the slot table's view in the arena, or
   * undefined if it does not fit (the caller keeps its own).
   */
  seal(slots: Uint32Array, cap: number, rowsOff: number): Uint32Array | undefined {
    const inside = slots.buffer === this.memory.buffer;
    const slotsOff = inside ? slots.byteOffset : this.alloc(slots.byteLength);
    const scratchOff = this.alloc(scratchBytes(this.dim));
    if (slotsOff === undefined || scratchOff === undefined) return undefined;
    const buf = this.memory.buffer;
    const view = new Uint32Array(buf, slotsOff, slots.length);
    if (!inside) view.set(slots);
    const instance = new WebAssembly.Instance(this.module, { env: { memory: this.memory } });
    this.sealedAt = {
      fn: instance.exports['lookup'] as KernelFn,
      cap, slotsOff, rowsOff,
      keys: new Uint32Array(buf, scratchOff, CHUNK * 2),
      out: new Float32Array(buf, scratchOff + CHUNK * 8, CHUNK * this.dim),
      found: new Uint8Array(buf, scratchOff + CHUNK * 8 + CHUNK * this.dim * 4, CHUNK),
    };
    return view;
  }

  /**
   * VersionData.lookup for a sealed arena: the vector of each of n packed keys into `out[i*dim ...]`
   * (zeros for an absent key) and 1/0 into `found[i]`; returns the keys found.
   */
  lookup(keys: Uint32Array, n: number, out: Float32Array, found: Uint8Array): number {
    const s = this.sealedAt;
    if (s === undefined) throw new KvError(KvErrorCode.INTERNAL, 'lookup in an arena not sealed');
    const dim = this.dim;
    let hits = 0;
    for (let base = 0; base < n; base += CHUNK) {
      const m = Math.min(CHUNK, n - base);
      s.keys.set(keys.subarray(2 * base, 2 * (base + m)));
      hits += s.fn(s.keys.byteOffset, m, s.slotsOff, s.cap, s.rowsOff, dim * 4, s.out.byteOffset, s.found.byteOffset, s.found.byteOffset + CHUNK);
      out.set(s.out.subarray(0, m * dim), base * dim);
      found.set(s.found.subarray(0, m), base);
    }
    return hits;
  }
}
