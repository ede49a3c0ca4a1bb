import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';

/**
 * Test fault switches, obeyed only by a replica started with EMBKV_TEST_FAULTS=1. Like grpc-js tests'
 * `respond-with-status`: a Lookup is delayed by the request's `embkv-test-delay-ms` metadata, "300"
 * on every replica or "g0r0=300,g1r1=50" on the replicas listed. Without the variable the metadata
 * is ignored.
 */
export const TEST_FAULTS = process.env['EMBKV_TEST_FAULTS'] === '1';
export const TEST_DELAY_METADATA = 'embkv-test-delay-ms';

/**
 * EMBKV_TEST_HOLD_LOAD=table:version:rows (with EMBKV_TEST_FAULTS=1): the load call that brings that
 * version's write version to `rows` rows or more gets no answer, so a test can fault a load midway.
 */
const TEST_HOLD_LOAD = ((): { table: string; version: number; rows: number } | undefined => {
  const m = /^([^:]+):(\d+):(\d+)$/.exec(TEST_FAULTS ? (process.env['EMBKV_TEST_HOLD_LOAD'] ?? '') : '');
  return m ? { table: m[1]!, version: Number(m[2]), rows: Number(m[3]) } : undefined;
})();

/** The delay a Lookup's metadata asks of replica `replica` of group `group`, in ms (0: none). */
export function testDelayMs(metadata: grpc.Metadata, group: number, replica: number): number {
  const v = metadata.get(TEST_DELAY_METADATA)[0];
  if (typeof v !== 'string') return 0;
  if (/^\d+$/.test(v)) return Number(v);
  for (const part of v.split(',')) {
    const m = /^g(\d+)r(\d+)=(\d+)$/.exec(part.trim());
    if (m && Number(m[1]) === group && Number(m[2]) === replica) return Number(m[3]);
  }
  return 0;
}

/** EMBKV_TEST_HOLD_LOAD for one replica: holds the first row call that takes that load far enough. */
export class LoadHold {
  private held = false;

  constructor(private readonly log: Logger) {}

  /** A promise never settled for the call to hold (once: a load that takes it over goes through), else undefined. */
  check(table: string, version: number, rows: number): Promise<never> | undefined {
    const hold = TEST_HOLD_LOAD;
    if (!TEST_FAULTS || hold === undefined || this.held || hold.table !== table || hold.version !== version || rows < hold.rows) return undefined;
    this.held = true;
    this.log.info({ table, version, rows }, 'test switch: holding the load');
    return new Promise<never>(() => undefined);
  }
}
