/**
 * What a version watcher (kvctl watch) last did on a table: a replica keeps it in its metadata and
 * shows it in Status (SetWatcherNote); the watcher itself never reads it back.
 */
export interface WatcherNote {
  table: string;
  watcher: string;
  source: string;
  atMs: number;
  action: string;
  error: string;
  errorAtMs: number;
}
