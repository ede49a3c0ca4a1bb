/**
 * A dump's metadata file, `_embkv.json` in the dump's directory (or prefix), written by the trainer
 * before `_SUCCESS`:
 *
 *   { "snapshotTime": "2026-12-02T17:35:09Z" }
 *
 * `snapshotTime` (optional): when the training snapshot behind a full dump was taken, an ISO 8601
 * time with a zone. `_SUCCESS` itself is not read: Hadoop's S3A committers write JSON of their own
 * into it. The name starts with `_`, so dump planning and older releases pass over it.
 */
import { echo } from '../common/errors.js';
import { parseSnapshotTime } from '../common/snapshot-time.js';
import { dataError } from './dump-files.js';
import type { DumpSource } from './dump-source.js';

export const DUMP_METADATA_FILE = '_embkv.json';
/** A metadata file larger than this is refused unread: it holds a few fields. */
export const MAX_DUMP_METADATA_BYTES = 64 * 1024;

const FIELDS = new Set(['snapshotTime']);

export interface DumpMetadata {
  /** ms since the epoch; absent when the file declares none. */
  snapshotAtMs?: number;
}

/** Checks a metadata file's text; `where` names it in refusals (KV_INVALID_DATA). */
export function parseDumpMetadata(text: string, where: string, nowMs = Date.now()): DumpMetadata {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw dataError(`${where} is not valid JSON (${(err as Error).message}); it holds an object such as {"snapshotTime": "2026-12-02T17:35:09Z"}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw dataError(`${where} must hold a JSON object such as {"snapshotTime": "2026-12-02T17:35:09Z"}, not ${echo(raw, 40)}`);
  }
  const unknown = Object.keys(raw).filter((k) => !FIELDS.has(k));
  if (unknown.length > 0) throw dataError(`${where}: unknown field ${echo(unknown[0], 40)} (known: ${[...FIELDS].join(', ')})`);
  const out: DumpMetadata = {};
  const time = (raw as { snapshotTime?: unknown }).snapshotTime;
  if (time !== undefined) {
    try {
      out.snapshotAtMs = parseSnapshotTime(time, 'snapshotTime', nowMs);
    } catch (err) {
      throw dataError(`${where}: ${(err as Error).message}`);
    }
  }
  return out;
}

/** Reads and checks the metadata file at `loc` (a file the dump's listing holds). */
export async function readDumpMetadata(source: DumpSource, loc: string): Promise<DumpMetadata> {
  const reader = await source.open(loc);
  try {
    if (reader.size > MAX_DUMP_METADATA_BYTES) throw dataError(`${loc} holds ${reader.size} bytes; a metadata file holds at most ${MAX_DUMP_METADATA_BYTES}`);
    const buf = new Uint8Array(reader.size);
    let at = 0;
    while (at < buf.length) {
      const n = await reader.read(buf, at, buf.length - at, at);
      if (n <= 0) throw dataError(`${loc} ended after ${at} of its ${buf.length} bytes`);
      at += n;
    }
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(buf);
    } catch {
      throw dataError(`${loc} is not UTF-8 text`);
    }
    return parseDumpMetadata(text, loc);
  } finally {
    await reader.close();
  }
}
