/**
 * A full version's snapshot time: when the training snapshot its dump was written from was taken.
 * Real-time puts stamped at or after it are not in the dump, so they stay layered over the version.
 */
import { echo, invalidArgument } from './errors.js';

/**
 * How far ahead of the loader's clock a snapshot time may be (the trainer's clock and the loader's
 * may differ by this much): a time further ahead is a mistake, not a snapshot already taken.
 */
export const MAX_SNAPSHOT_SKEW_MS = 60_000;

// 2026-12-02T17:35:09Z, 2026-12-02T17:35:09.123+01:00, 2026-12-02T17:35+0100 (RFC 3339 and the
// ISO 8601 extended forms with a zone; lower-case t and z as RFC 3339 allows).
const ISO = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?(?:([Zz])|([+-])(\d{2}):?(\d{2}))$/;

/**
 * Parses an ISO 8601 time with a zone into ms since the epoch (a fraction below 1 ms is dropped, so
 * the time can only move earlier and keep more puts). Refuses a time without a zone (whose zone
 * would be guessed), an impossible date, one before 1970, and one more than MAX_SNAPSHOT_SKEW_MS
 * ahead of `nowMs`. `what` names the value in messages (`--snapshot-time`).
 */
export function parseSnapshotTime(text: unknown, what: string, nowMs = Date.now()): number {
  if (typeof text !== 'string' || text.length > 64) throw invalidArgument(`${what} must be an ISO 8601 time with a zone, such as 2026-12-02T17:35:09Z; got ${echo(text, 64)}`);
  const m = ISO.exec(text);
  if (m === null) {
    const hint = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}([.,]\d+)?)?$/.test(text) ? ' (it has no zone: add Z for UTC, or an offset such as +01:00)' : '';
    throw invalidArgument(`${what} must be an ISO 8601 time with a zone, such as 2026-12-02T17:35:09Z or 2026-12-02T18:35:09.250+01:00; got ${echo(text, 64)}${hint}`);
  }
  const [y, mo, d, h, mi, s = 0] = m.slice(1, 7).map((x) => (x === undefined ? undefined : Number(x))) as number[];
  const ms = m[7] === undefined ? 0 : Number(m[7].slice(0, 3).padEnd(3, '0'));
  const days = new Date(Date.UTC(y!, mo!, 0)).getUTCDate();
  if (mo! < 1 || mo! > 12 || d! < 1 || d! > days || h! > 23 || mi! > 59 || s > 59) {
    throw invalidArgument(`${what}: ${echo(text, 64)} is not a valid date and time`);
  }
  const offMin = m[8] !== undefined ? 0 : (m[9] === '-' ? -1 : 1) * (Number(m[10]) * 60 + Number(m[11]));
  if (Math.abs(offMin) > 18 * 60 || Number(m[11] ?? 0) > 59) throw invalidArgument(`${what}: ${echo(text, 64)} has an impossible zone offset`);
  // Date.UTC takes years below 100 as 19xx: such years are refused first.
  const t = y! < 1970 ? 0 : Date.UTC(y!, mo! - 1, d!, h!, mi!, s, ms) - offMin * 60_000;
  if (t <= 0) throw invalidArgument(`${what}: ${echo(text, 64)} is not after 1970-01-01T00:00:00Z`);
  if (t > nowMs + MAX_SNAPSHOT_SKEW_MS) {
    throw invalidArgument(
      `${what} ${text} is ${Math.round((t - nowMs) / 1000)} s in the future (more than the ${MAX_SNAPSHOT_SKEW_MS / 1000} s allowed for clock skew); ` +
        'a snapshot time is when the training snapshot behind the dump was taken',
    );
  }
  return t;
}
