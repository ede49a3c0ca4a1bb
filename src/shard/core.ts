import type { Logger } from 'pino';
import type { RealtimePuts } from './puts.js';
import type { ShardStore } from './store.js';
import type { TableState } from './tables.js';

/** The state of one Shard that its restore, load, publish and status modules work on. */
export interface ShardCore {
  readonly store: ShardStore;
  readonly log: Logger;
  readonly tables: Map<string, TableState>;
  readonly keepVersions: number;
  readonly loadIdleMs: number;
  readonly puts: RealtimePuts;
  /** Runs metadata changes of one table one at a time. */
  withTable<T>(table: string, fn: () => Promise<T>): Promise<T>;
}
