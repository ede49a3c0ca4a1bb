import type { KvError } from '../common/errors.js';
import type { ReplicaStatus, WatcherNoteStatus } from '../loader/cluster-ops.js';
import type { FanoutStats } from '../fanout/stats.js';
import type { ReplicaConn } from '../cluster/connections.js';

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

const num = (n: number): string => n.toLocaleString('en-US');

/** A progress line on a terminal (stderr), redrawn at most 10 times a second; silent otherwise. */
export class Progress {
  private last = 0;
  private readonly started = Date.now();
  private readonly tty = process.stderr.isTTY === true;
  constructor(private readonly label: string) {}

  update(done: number, total: number): void {
    if (!this.tty) return;
    const now = Date.now();
    if (now - this.last < 100 && done !== total) return;
    this.last = now;
    const rate = done / Math.max((now - this.started) / 1000, 1e-3);
    let bar = '';
    if (total > 0) {
      const width = 30;
      const filled = Math.min(width, Math.round((done / total) * width));
      bar = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${((done / total) * 100).toFixed(0)}% `;
    }
    process.stderr.write(`\r${this.label} ${bar}${num(done)}${total > 0 ? `/${num(total)}` : ''} keys, ${num(Math.round(rate))} keys/s   `);
  }

  done(): void {
    if (this.tty && this.last !== 0) process.stderr.write('\n');
  }
}

export function formatStatus(all: { conn: ReplicaConn; status?: ReplicaStatus; error?: KvError }[]): string {
  const lines: string[] = [];
  let group = -1;
  for (const s of all) {
    if (s.conn.group !== group) {
      group = s.conn.group;
      lines.push(`group ${group}`);
    }
    const head = `  replica ${s.conn.replica}  ${s.conn.address}`;
    if (s.error || !s.status) {
      lines.push(`${head}  DOWN  ${s.error?.message ?? ''}`);
      continue;
    }
    const st = s.status;
    lines.push(`${head}  UP ${Math.round(st.uptimeMs / 1000)} s  rss ${formatBytes(st.rssBytes)}  heap ${formatBytes(st.heapUsedBytes)}`);
    for (const t of st.tables) {
      const versions = t.versions.map((v) => {
        const what = v.state === 'loading' ? `loading, ${num(v.keys)} rows so far` : `${num(v.keys)} keys`;
        const delta = v.baseVersion ? ` delta on v${v.baseVersion} +${num(v.deltaUpserts)} -${num(v.deltaDeletes)}` : '';
        const snapshot = v.snapshotAtMs ? ` snapshot ${new Date(v.snapshotAtMs).toISOString()}` : '';
        return `v${v.version}${v.version === t.currentVersion ? '*' : ''} ${what} dim ${v.dim} ${formatBytes(v.bytes)}${delta}${snapshot}`;
      });
      lines.push(`    ${t.name}  current v${t.currentVersion}  [${versions.join('; ')}]`);
      if (t.realtimeBatches > 0) {
        const age = Math.max(0, Math.round((Date.now() - t.lastPutAtMs) / 1000));
        lines.push(`      real-time: ${num(t.realtimeKeys)} keys from ${num(t.realtimeBatches)} batches, last put ${age} s ago, catch-up lag ${num(t.realtimeLagMs)} ms`);
      }
    }
  }
  lines.push(...formatWatchers(all));
  return lines.join('\n') + '\n';
}

const ago = (ms: number): string => `${Math.max(0, Math.round((Date.now() - ms) / 1000))} s ago`;

/**
 * Each table's version-watcher note, the newest any replica holds (a replica that was down when the
 * watcher wrote may hold an older one).
 */
function formatWatchers(all: { status?: ReplicaStatus }[]): string[] {
  const newest = new Map<string, WatcherNoteStatus>();
  for (const s of all) {
    for (const n of s.status?.watchers ?? []) {
      const seen = newest.get(n.table);
      if (seen === undefined || n.atMs > seen.atMs) newest.set(n.table, n);
    }
  }
  const lines: string[] = [];
  for (const n of [...newest.values()].sort((a, b) => a.table.localeCompare(b.table))) {
    lines.push(`watcher ${n.table}  ${n.watcher}  source ${n.source}`);
    lines.push(`  last action ${ago(n.atMs)}: ${n.action}`);
    if (n.error !== '') lines.push(`  last error ${ago(n.errorAtMs)}: ${n.error}`);
  }
  return lines;
}

const fmt = (x: number | null): string => (x === null || Number.isNaN(x) ? '-' : x < 10 ? x.toFixed(1) : x.toFixed(0));

/** Human-readable lines of FanoutStats (for `kvctl status --router` and logs). */
export function formatFanoutStats(s: FanoutStats): string {
  const l = s.latencyMs;
  const lines = [`  requests ${s.requests}  failures ${s.failures}  p50/p95/p99 ${fmt(l.p50)}/${fmt(l.p95)}/${fmt(l.p99)} ms`];
  for (const g of s.groups) {
    const gl = g.latencyMs;
    lines.push(
      `  group ${g.group}  requests ${g.requests}  hedges ${g.hedgesSent} (won ${g.hedgesWon}, throttled ${g.hedgesThrottled})  retries ${g.retries}` +
        `  failures ${g.failures}  p50/p95/p99 ${fmt(gl.p50)}/${fmt(gl.p95)}/${fmt(gl.p99)} ms  hedge delay ${fmt(g.hedgeDelayMs)} ms  tokens ${g.hedgeTokens.toFixed(1)}`,
    );
    for (const r of g.replicas) {
      lines.push(
        `    replica ${r.replica}  ${r.address}  ${r.health.toUpperCase()}${r.avoidedForMs > 0 ? ` (avoided ${r.avoidedForMs} ms)` : ''}` +
          `  attempts ${r.attempts}  answers ${r.answers}  failures ${r.failures}  ewma ${fmt(r.ewmaMs)} ms${r.lastError ? `  last error: ${r.lastError}` : ''}`,
      );
    }
  }
  return lines.join('\n') + '\n';
}
