import type { MetricSet } from './registry.js';

/** The watcher's actions, as `kvctl watch` prints them (src/loader/watch.ts WatchActionKind). */
export const WATCH_ACTIONS = ['started', 'found', 'loading', 'loaded', 'published', 'refused', 'skipped', 'waiting', 'error', 'stopped'] as const;

/**
 * `kvctl watch --metrics-port`: what the version watcher of one table did, and the progress of the
 * load it runs. Labels: table, action (one of WATCH_ACTIONS), version.
 */
export class WatchMetrics {
  private readonly actions = new Map<string, number>();
  private readonly lastAt = new Map<string, number>();
  private load: { version: number; rows: number; total: number } | undefined;

  constructor(set: MetricSet, private readonly table: string) {
    set.counter('embkv_watch_actions_total', 'What the version watcher did (loaded, published, refused, error...).', ['table', 'action'],
      () => [...this.actions].map(([action, n]) => [{ table: this.table, action }, n] as const));
    set.gauge('embkv_watch_last_action_timestamp_seconds', 'When the watcher last took each kind of action.', ['table', 'action'],
      () => [...this.lastAt].map(([action, ms]) => [{ table: this.table, action }, ms / 1000] as const));
    set.gauge('embkv_watch_load_rows', 'Rows the watcher\'s load under way has sent so far (load progress).', ['table', 'version'],
      () => (this.load === undefined ? [] : [[{ table: this.table, version: this.load.version }, this.load.rows]]));
    set.gauge('embkv_watch_load_rows_expected', 'Rows the watcher\'s load under way will send, when the dump tells it.', ['table', 'version'],
      () => (this.load === undefined || this.load.total < 0 ? [] : [[{ table: this.table, version: this.load.version }, this.load.total]]));
  }

  onAction(action: string): void {
    this.actions.set(action, (this.actions.get(action) ?? 0) + 1);
    this.lastAt.set(action, Date.now());
    // A load has ended one way or another: its progress series goes.
    if (action !== 'loading') this.load = undefined;
  }

  onProgress(version: number, rows: number, total: number): void {
    this.load = { version, rows, total };
  }
}
