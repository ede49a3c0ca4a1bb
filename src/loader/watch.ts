/**
 * The version watcher (`kvctl watch`): loads every complete version a trainer writes to a source
 * (watch-source.ts) that is newer than the table's current version, and publishes it.
 *
 * It keeps no state of its own. Each round it asks the cluster what is current and what is held
 * (Status), lists the source, and takes one step (nextStep): load the newest complete full version,
 * else the next delta on the current version, else publish a version a loader sealed but did not
 * publish, else wait. The only memory it has is which source versions it refused, so that a bad dump
 * is not loaded again every interval; a restarted watcher tries each of those once more.
 *
 * Two watchers on one table do not load a version twice: the replicas refuse a second LoadBegin
 * while a version is being loaded (KV_LOAD_CONFLICT: the watcher waits) and a version that exists
 * (KV_VERSION_EXISTS: the watcher takes it as done and looks again).
 */
import { hostname } from 'node:os';
import type { Logger } from 'pino';
import { KvError, KvErrorCode } from '../common/errors.js';
import type { Manifest } from '../cluster/manifest.js';
import { checkTableName } from '../common/validate.js';
import { ClusterConnections } from '../cluster/connections.js';
import { call, statusAll, switchVersion, type WatcherNoteStatus } from './cluster-ops.js';
import { runLoad } from './loader.js';
import type { WatchKind, WatchSource } from './watch-source.js';

export const DEFAULT_WATCH_INTERVAL_MS = 30_000;
/** Failures of one version that are not the dump's fault (a replica down, a full disk) before it is refused. */
export const DEFAULT_WATCH_MAX_ATTEMPTS = 3;
/** The longest wait between rounds while the cluster or the source fails (the interval doubles up to it). */
export const MAX_WATCH_BACKOFF_MS = 5 * 60_000;
// Short: the last note is written as the watcher stops, which must take at most 2 s.
const NOTE_DEADLINE_MS = 1000;
/** A note is rewritten at least this often while nothing happens, so status shows the watcher is alive. */
const NOTE_HEARTBEAT_MS = 60_000;

export type WatchActionKind = 'started' | 'found' | 'loading' | 'loaded' | 'published' | 'refused' | 'skipped' | 'waiting' | 'error' | 'stopped';

/** One thing the watcher did or decided, with the line it prints. */
export interface WatchAction {
  action: WatchActionKind;
  table: string;
  /** The source directory the action is about (`full/12`), if any. */
  dir?: string;
  /**
   * For 'published': how long after the version's _SUCCESS marker was written (its mtime or
   * LastModified, by the source's clock) the version became current, in ms.
   */
  sinceMarkerMs?: number;
  line: string;
}

export interface WatchOptions {
  manifest: Manifest;
  table: string;
  source: WatchSource;
  /** Between rounds when nothing is to be done (default 30 s). */
  intervalMs?: number;
  /** Publish each version once sealed (default true); false stages it only (see nextStep). */
  publish?: boolean;
  /** Attempts of a version that fail for reasons other than its dump (default 3) before it is refused. */
  maxAttempts?: number;
  /** Full loads through staged files where replicas run on this host (default true, as for runLoad). */
  staging?: boolean;
  /** Stops the watcher; a load under way is aborted and its write version dropped. */
  signal?: AbortSignal;
  onAction?: (a: WatchAction) => void;
  /** Progress of the load under way: rows sent of `total` (see LoadOptions.onProgress). */
  onProgress?: (version: number, rows: number, total: number) => void;
  logger?: Logger;
  /** Connections to use (and leave open); by default the watcher opens its own. */
  connections?: ClusterConnections;
  /** How notes name this watcher (default host:pid). */
  watcherName?: string;
}

/** A version directory of the source. */
export interface SourceVersion {
  kind: WatchKind;
  version: number;
  /** `full/12`: how the watcher names it. */
  dir: string;
  /** The directory's name under `SOURCE/<kind>/` (`12`, or `0012`). */
  name: string;
  complete: boolean;
  /** When its _SUCCESS marker was written (ms since the epoch; NaN if the source does not say), once complete. */
  markedAtMs?: number;
}

/** What the cluster holds of the table: the version every replica serves, and the sealed versions. */
export interface ClusterView {
  current: number;
  /** Sealed versions held by every replica, with the version a delta applies to (0: full). */
  sealed: Map<number, { base: number }>;
}

export type Step =
  | { kind: 'load'; v: SourceVersion }
  | { kind: 'publish'; v: SourceVersion }
  | { kind: 'wait'; key: string; why: string }
  | { kind: 'idle' };

/**
 * The one thing to do next, from the cluster's view and the source's versions (each list ascending),
 * with the skipped source versions reported through `skip`:
 *
 * - With `publish` false, a sealed version newer than the current one stops everything until it is
 *   published: a delta applies to the current version, so loading one on top of an unpublished
 *   version would build on the wrong base.
 * - The newest complete full version above the current one that was not refused is loaded (older
 *   full versions, and deltas up to it, are skipped); one that every replica holds sealed already
 *   (a loader stopped before its publish) is published.
 * - Otherwise the deltas above the current version, in order: each applies to the current version.
 *   A delta waits for its _SUCCESS; a refused delta blocks those after it, and so does a full
 *   version above the current one that is refused or not yet complete, until a newer complete full
 *   version is loaded.
 */
export function nextStep(
  view: ClusterView, fulls: SourceVersion[], deltas: SourceVersion[], refused: ReadonlySet<string>, publish: boolean,
  skip: (v: SourceVersion, why: string) => void,
): Step {
  const c = view.current;
  if (!publish) {
    const staged = [...view.sealed.keys()].filter((v) => v > c).sort((a, b) => b - a)[0];
    if (staged !== undefined) return { kind: 'wait', key: `staged v${staged}`, why: `v${staged} is loaded but not published; the watcher goes on once it is (kvctl publish)` };
  }
  const newFulls = fulls.filter((f) => f.version > c);
  const best = newFulls.filter((f) => f.complete && !refused.has(f.dir)).at(-1);
  if (best !== undefined) {
    for (const f of newFulls) if (f.version < best.version && !refused.has(f.dir)) skip(f, `full/${best.version} is newer`);
    for (const d of deltas) if (d.version > c && d.version <= best.version && !refused.has(d.dir)) skip(d, `not above full/${best.version}`);
    return { kind: view.sealed.has(best.version) && publish ? 'publish' : 'load', v: best };
  }
  if (c === 0) return { kind: 'wait', key: 'no full', why: 'no complete full version to start the table from' };
  // The first full version above the current one that is not loaded: deltas beyond it build on it.
  const barrier = newFulls[0];
  let blockedBy: string | undefined;
  for (const d of deltas) {
    if (d.version <= c) continue;
    if (blockedBy === undefined && barrier !== undefined && d.version > barrier.version) {
      blockedBy = `${barrier.dir} is ${refused.has(barrier.dir) ? 'refused' : 'not complete'}`;
    }
    if (blockedBy !== undefined) {
      if (!refused.has(d.dir)) skip(d, `${blockedBy}; waiting for a newer complete full version`);
      continue;
    }
    if (refused.has(d.dir)) {
      blockedBy = `${d.dir} was refused`;
      continue;
    }
    if (!d.complete) return { kind: 'wait', key: `incomplete ${d.dir}`, why: `${d.dir} has no _SUCCESS yet` };
    const held = view.sealed.get(d.version);
    if (held !== undefined && publish && held.base === c) return { kind: 'publish', v: d };
    return { kind: 'load', v: d };
  }
  return { kind: 'idle' };
}

/** Runs the watcher until `signal` aborts it. Rejects only for a bad option. */
export async function runWatch(options: WatchOptions): Promise<void> {
  await new VersionWatcher(options).run();
}

/** KvError codes of failures that are not the dump's fault: tried again, at most maxAttempts times. */
const TRANSIENT = new Set<string>([
  KvErrorCode.UNAVAILABLE, KvErrorCode.DEADLINE_EXCEEDED, KvErrorCode.RESOURCE_EXHAUSTED, KvErrorCode.INTERNAL,
  KvErrorCode.UNAUTHENTICATED, KvErrorCode.PERMISSION_DENIED, KvErrorCode.CLOSED,
]);

class VersionWatcher {
  private readonly table: string;
  private readonly intervalMs: number;
  private readonly publish: boolean;
  private readonly maxAttempts: number;
  private readonly signal: AbortSignal;
  /** Source directories refused, with why: not loaded again by this process. */
  private readonly refused = new Map<string, string>();
  private readonly attempts = new Map<string, number>();
  /** The last line said under each key: a state is reported when it changes, not every round. */
  private readonly said = new Map<string, string>();
  private readonly note: WatcherNoteStatus;
  private noteWrittenAt = 0;
  private noteChain: Promise<void> = Promise.resolve();
  private conns!: ClusterConnections;

  constructor(private readonly o: WatchOptions) {
    this.table = checkTableName(o.table, 'table');
    this.intervalMs = o.intervalMs ?? DEFAULT_WATCH_INTERVAL_MS;
    if (!Number.isInteger(this.intervalMs) || this.intervalMs < 1) throw new KvError(KvErrorCode.INVALID_ARGUMENT, 'intervalMs must be a positive integer');
    this.publish = o.publish ?? true;
    this.maxAttempts = o.maxAttempts ?? DEFAULT_WATCH_MAX_ATTEMPTS;
    this.signal = o.signal ?? new AbortController().signal;
    this.note = {
      table: this.table, watcher: o.watcherName ?? `${hostname()}:${process.pid}`, source: o.source.location, atMs: 0, action: '', error: '', errorAtMs: 0,
    };
  }

  async run(): Promise<void> {
    this.conns = this.o.connections ?? new ClusterConnections(this.o.manifest);
    let failures = 0;
    try {
      this.act('started', `started: watching ${this.o.source.location} every ${this.intervalMs} ms${this.publish ? '' : ' (loads are not published)'}`);
      while (!this.signal.aborted) {
        let again = false;
        try {
          again = await this.round();
          failures = 0;
        } catch (err) {
          if (this.signal.aborted) break;
          failures++;
          const wait = this.delay(failures);
          this.act('error', `error: ${(err as Error).message}; looking again in ${(wait / 1000).toFixed(1)} s`);
          await this.sleep(wait);
          continue;
        }
        if (Date.now() - this.noteWrittenAt > NOTE_HEARTBEAT_MS) this.writeNote();
        // After a step, the next one at once: a full version and its deltas load back to back.
        if (!again) await this.sleep(this.delay(0));
      }
      this.act('stopped', 'stopped');
    } finally {
      await this.noteChain;
      if (this.o.connections === undefined) this.conns.close();
    }
  }

  /**
   * The interval, doubled for each round failed in a row (up to MAX_WATCH_BACKOFF_MS), less up to 20%
   * so two watchers drift apart; never more, so a marker is seen within one interval.
   */
  private delay(failures: number): number {
    const base = Math.min(this.intervalMs * 2 ** Math.min(failures, 16), Math.max(this.intervalMs, MAX_WATCH_BACKOFF_MS));
    return Math.round(base * (0.8 + 0.2 * Math.random()));
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      if (this.signal.aborted) return resolve();
      const done = (): void => {
        clearTimeout(timer);
        this.signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.signal.addEventListener('abort', done, { once: true });
    });
  }

  /** One look at the cluster and the source, and at most one step. True if it loaded or published. */
  private async round(): Promise<boolean> {
    const view = await this.clusterView();
    const fulls = await this.listed('full', view.current);
    const deltas = await this.listed('incremental', view.current);
    const step = nextStep(view, fulls, deltas, new Set(this.refused.keys()), this.publish, (v, why) => this.say('skipped', v.dir, `skipped ${v.dir}: ${why}`));
    if (step.kind === 'idle') return false;
    if (step.kind === 'wait') {
      this.say('waiting', step.key, `waiting: ${step.why}`);
      return false;
    }
    return step.kind === 'publish' ? this.publishHeld(step.v, view) : this.load(step.v, view);
  }

  /** The table as every replica sees it; a replica that does not answer, or disagreement on the current version, fails the round. */
  private async clusterView(): Promise<ClusterView> {
    const all = await statusAll(this.conns);
    const down = all.filter((s) => s.error !== undefined);
    if (down.length > 0) {
      throw new KvError(KvErrorCode.UNAVAILABLE, `the cluster: ${down.map((s) => s.error!.message).join('; ')}`);
    }
    const currents = new Set<number>();
    const count = new Map<number, { n: number; base: number }>();
    for (const s of all) {
      const t = s.status!.tables.find((x) => x.name === this.table);
      currents.add(t?.currentVersion ?? 0);
      for (const v of t?.versions ?? []) {
        if (v.state !== 'sealed') continue;
        const seen = count.get(v.version) ?? { n: 0, base: v.baseVersion };
        seen.n++;
        count.set(v.version, seen);
      }
    }
    if (currents.size > 1) {
      throw new KvError(KvErrorCode.LOAD_CONFLICT, `replicas disagree on the current version of ${this.table} (${[...currents].join(', ')}); a publish is under way or was cut short (kvctl publish finishes it)`);
    }
    const sealed = new Map<number, { base: number }>();
    for (const [v, { n, base }] of count) if (n === all.length) sealed.set(v, { base });
    return { current: [...currents][0] ?? 0, sealed };
  }

  /** The source's versions of one kind, ascending; those above the current version with their _SUCCESS checked. */
  private async listed(kind: WatchKind, current: number): Promise<SourceVersion[]> {
    const out = new Map<number, SourceVersion>();
    for (const name of await this.o.source.listVersions(kind)) {
      if (name.startsWith('.') || name.startsWith('_')) continue; // a trainer's temporary directory
      const dir = `${kind}/${name}`;
      const version = /^\d{1,16}$/.test(name) ? Number(name) : NaN;
      if (!Number.isSafeInteger(version) || version < 1) {
        this.say('skipped', dir, `skipped ${dir}: not a version number`);
        continue;
      }
      const other = out.get(version);
      if (other !== undefined) {
        this.say('skipped', dir, `skipped ${dir}: ${other.dir} names the same version`);
        continue;
      }
      out.set(version, { kind, version, dir, name, complete: false });
    }
    const versions = [...out.values()].sort((a, b) => a.version - b.version);
    for (const v of versions) {
      if (v.version <= current || this.refused.has(v.dir)) continue;
      const at = await this.o.source.completedAt(kind, v.name);
      v.complete = at !== undefined;
      if (at !== undefined) {
        v.markedAtMs = at;
        this.say('found', `found ${v.dir}`, `found ${v.dir}`, v.dir);
      }
    }
    return versions;
  }

  private async load(v: SourceVersion, view: ClusterView): Promise<boolean> {
    const incremental = v.kind === 'incremental';
    this.say('loading', v.dir, `loading ${v.dir} as v${v.version}${incremental ? ` (a delta on v${view.current})` : ''}`);
    try {
      const r = await runLoad({
        manifest: this.o.manifest, connections: this.conns, table: this.table, version: v.version,
        path: this.o.source.dumpPath(v.kind, v.name), mode: v.kind, publish: false, ...this.o.source.loadOptions,
        signal: this.signal, ...(this.o.staging !== undefined ? { staging: this.o.staging } : {}), ...(this.o.logger ? { logger: this.o.logger } : {}),
        ...(this.o.onProgress !== undefined ? { onProgress: (rows: number, total: number) => this.o.onProgress!(v.version, rows, total) } : {}),
      });
      const what = incremental ? `${r.rows} upserts and ${r.deletes} deletes on v${r.baseVersion}` : `${r.rows} keys`;
      const snapshot = r.snapshotAtMs > 0 ? `; snapshot ${new Date(r.snapshotAtMs).toISOString()}` : '';
      this.say('loaded', v.dir, `loaded ${v.dir} as v${v.version}: ${what} of dim ${r.dim} in ${(r.ms / 1000).toFixed(1)} s${snapshot}`);
    } catch (err) {
      return this.failed(v, err);
    }
    if (!this.publish) {
      this.say('waiting', `staged v${v.version}`, `waiting: v${v.version} is loaded but not published; the watcher goes on once it is (kvctl publish)`);
      return true;
    }
    try {
      // Every replica has just sealed it: no round of Status calls first.
      await switchVersion(this.conns, { table: this.table, version: v.version, rollback: false });
    } catch (err) {
      return this.failed(v, err);
    }
    this.attempts.delete(v.dir);
    this.published(v, `published ${v.dir}: v${v.version} is current`);
    return true;
  }

  /** A version every replica holds sealed but does not serve: its loader stopped before the publish. */
  private async publishHeld(v: SourceVersion, view: ClusterView): Promise<boolean> {
    try {
      await switchVersion(this.conns, { table: this.table, version: v.version, rollback: false });
    } catch (err) {
      return this.failed(v, err);
    }
    this.published(v, `published ${v.dir}: v${v.version} is current (it was loaded, not published; v${view.current} was current)`);
    return true;
  }

  /** Reports a publish with how long after its _SUCCESS marker the version became current. */
  private published(v: SourceVersion, line: string): void {
    const since = v.markedAtMs !== undefined && Number.isFinite(v.markedAtMs) ? Math.max(0, Date.now() - v.markedAtMs) : undefined;
    const full = since === undefined ? line : `${line}, ${(since / 1000).toFixed(1)} s after its _SUCCESS`;
    this.say('published', v.dir, full, v.dir, since);
  }

  /** Sorts a failed load or publish into: stopping, another loader's work, worth another try, or a refusal. */
  private failed(v: SourceVersion, err: unknown): boolean {
    if (this.signal.aborted) return false;
    const code = err instanceof KvError ? err.code : undefined;
    const msg = (err as Error).message;
    if (code === KvErrorCode.LOAD_CONFLICT && / is being loaded /.test(msg)) {
      this.say('waiting', v.dir, `waiting: ${v.dir}: another loader is at work on ${this.table} (${msg})`);
      return false;
    }
    if (code === KvErrorCode.UNAVAILABLE && (err as KvError).detail?.['system'] === 's3') {
      // Object storage down or refusing us (after the source's own retries): not the dump's fault, so
      // no attempt is counted; the round fails and is tried again, the interval doubling up to 5 min.
      throw new KvError(KvErrorCode.UNAVAILABLE, `${v.dir}: ${msg}`, { cause: err, detail: { system: 's3' } });
    }
    if (code === KvErrorCode.VERSION_EXISTS) {
      // Another watcher (or kvctl load) got there first: the next round sees what the cluster holds.
      this.say('skipped', v.dir, `skipped ${v.dir}: v${v.version} exists already (loaded by another loader)`);
      return false;
    }
    if (code !== undefined && (TRANSIENT.has(code) || code === KvErrorCode.LOAD_CONFLICT)) {
      const n = (this.attempts.get(v.dir) ?? 0) + 1;
      this.attempts.set(v.dir, n);
      if (n < this.maxAttempts) {
        this.act('error', `error: ${v.dir} failed (attempt ${n} of ${this.maxAttempts}): ${msg}`, v.dir);
        return false;
      }
    }
    this.refused.set(v.dir, msg);
    this.attempts.delete(v.dir);
    const next = v.kind === 'full' ? 'a newer complete full version' : 'a newer complete full version; the deltas after it wait';
    this.act('refused', `refused ${v.dir}: ${msg} (the watcher moves on to ${next})`, v.dir);
    // Looks again at once: a newer complete full version may be there already.
    return true;
  }

  /**
   * Reports an action once per state: `key` names what it is about (a source directory, by default
   * `dir`), and its line is repeated only when it changes.
   */
  private say(action: WatchActionKind, key: string, line: string, dir = key.includes('/') ? key : undefined, sinceMarkerMs?: number): void {
    if (this.said.get(key) === line) return;
    this.said.set(key, line);
    this.act(action, line, dir, sinceMarkerMs);
  }

  private act(action: WatchActionKind, line: string, dir?: string, sinceMarkerMs?: number): void {
    const now = Date.now();
    this.note.action = line;
    this.note.atMs = now;
    if (action === 'refused' || action === 'error') {
      this.note.error = line;
      this.note.errorAtMs = now;
    }
    this.o.logger?.info({ table: this.table, action, dir }, line);
    this.o.onAction?.({ action, table: this.table, ...(dir !== undefined ? { dir } : {}), ...(sinceMarkerMs !== undefined ? { sinceMarkerMs } : {}), line });
    this.writeNote();
  }

  /**
   * Sends the note to every replica, after the one before (a replica that does not answer misses it
   * and gets the next). Never fails the watcher: the note is for status, nothing reads it back.
   */
  private writeNote(): void {
    this.noteWrittenAt = Date.now();
    const note = { ...this.note };
    this.noteChain = this.noteChain.then(async () => {
      const res = await Promise.allSettled(this.conns.all().map((c) => call(c, 'SetWatcherNote', note, NOTE_DEADLINE_MS)));
      const failed = res.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) this.o.logger?.debug({ err: failed.reason }, 'watcher note not written everywhere');
    });
  }
}
