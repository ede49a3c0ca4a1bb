import { ClassicLevel } from 'classic-level';
import { pack, unpack } from 'msgpackr';
import { floatsFromBytes, keysFromBytes } from '../common/keys.js';

/**
 * A replica's disk: one classic-level (LevelDB) database under --data.
 *
 *   t!<table>                                  -> msgpack TableMeta (versions, current)
 *   r!<table>!<version:16 digits>!<block:10>   -> [n u32][dim u32][n*8 key bytes][n*dim*4 float bytes]
 *
 * Rows are stored in blocks (one per loader batch): FEASIBILITY measured one entry per key at ~10x
 * slower to load and to rebuild.
 */
export interface VersionMeta {
  version: number;
  dim: number;
  rows: number;
  state: 'loading' | 'sealed';
  loadId: string;
  blocks: number;
}

export interface TableMeta {
  name: string;
  current: number;
  versions: VersionMeta[];
}

const pad = (n: number, width: number): string => String(n).padStart(width, '0');
const versionPrefix = (table: string, version: number): string => `r!${table}!${pad(version, 16)}!`;

export class ShardStore {
  private readonly db: ClassicLevel<string, Uint8Array>;

  constructor(readonly dir: string) {
    this.db = new ClassicLevel<string, Uint8Array>(dir, { keyEncoding: 'utf8', valueEncoding: 'view' });
  }

  async open(): Promise<void> {
    try {
      await this.db.open();
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause;
      if (cause?.code === 'LEVEL_LOCKED') {
        throw new Error(`data directory ${this.dir} is in use by another process (is this replica already running?)`, { cause: err });
      }
      throw new Error(`cannot open data directory ${this.dir}: ${(err as Error).message}`, { cause: err });
    }
  }

  async close(): Promise<void> {
    await this.db.close();
  }

  async readTables(): Promise<TableMeta[]> {
    const out: TableMeta[] = [];
    for await (const [, value] of this.db.iterator({ gte: 't!', lt: 't"' })) {
      out.push(unpack(value) as TableMeta);
    }
    return out;
  }

  /** Writes a table's metadata; `sync` makes it durable against a machine crash, not just a process crash. */
  async putTable(meta: TableMeta, sync: boolean): Promise<void> {
    await this.db.put(`t!${meta.name}`, pack(meta), { sync });
  }

  async appendBlock(table: string, version: number, block: number, keys: Uint32Array, values: Float32Array, n: number, dim: number): Promise<void> {
    const buf = new Uint8Array(8 + n * 8 + n * dim * 4);
    const head = new Uint32Array(buf.buffer, 0, 2);
    head[0] = n;
    head[1] = dim;
    buf.set(new Uint8Array(keys.buffer, keys.byteOffset, n * 8), 8);
    buf.set(new Uint8Array(values.buffer, values.byteOffset, n * dim * 4), 8 + n * 8);
    await this.db.put(`${versionPrefix(table, version)}${pad(block, 10)}`, buf);
  }

  /** The blocks of one version, in storage order. */
  async *readBlocks(table: string, version: number): AsyncGenerator<{ keys: Uint32Array; values: Float32Array; n: number; dim: number }> {
    const prefix = versionPrefix(table, version);
    for await (const value of this.db.values({ gte: prefix, lt: `${prefix}~` })) {
      const head = keysFromBytes(value.subarray(0, 8));
      const n = head[0]!;
      const dim = head[1]!;
      if (value.byteLength !== 8 + n * 8 + n * dim * 4) {
        throw new Error(`corrupt block in ${this.dir} for ${table} v${version}: ${value.byteLength} bytes for ${n} rows of dim ${dim}`);
      }
      yield { keys: keysFromBytes(value.subarray(8, 8 + n * 8)), values: floatsFromBytes(value.subarray(8 + n * 8)), n, dim };
    }
  }

  async dropVersionRows(table: string, version: number): Promise<void> {
    const prefix = versionPrefix(table, version);
    await this.db.clear({ gte: prefix, lt: `${prefix}~` });
  }
}
