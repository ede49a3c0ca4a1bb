import { echo, invalidArgument } from './errors.js';

export const MAX_TABLE_NAME_CHARS = 128;
const TABLE_NAME = /^[A-Za-z0-9_.-]{1,128}$/;

/** Length first, so an oversized name costs nothing more and is never echoed whole. */
export function checkTableName(table: unknown, arg = 'table'): string {
  if (typeof table === 'string' && table.length > MAX_TABLE_NAME_CHARS) {
    throw invalidArgument(`${arg} must be 1-${MAX_TABLE_NAME_CHARS} characters of [A-Za-z0-9_.-], got ${table.length} characters: ${echo(table, 40)}`);
  }
  if (typeof table !== 'string' || !TABLE_NAME.test(table)) {
    throw invalidArgument(`${arg} must be 1-${MAX_TABLE_NAME_CHARS} characters of [A-Za-z0-9_.-], got ${echo(table)}`);
  }
  return table;
}

/**
 * A version: a positive safe integer, or a bigint of one (converted). Larger values are refused:
 * versions travel as JavaScript numbers, exact only up to 2^53-1.
 */
export function checkVersion(version: unknown, arg = 'version', allowZero = false): number {
  const min = allowZero ? 0 : 1;
  if (typeof version === 'bigint') {
    if (version > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw invalidArgument(`${arg} ${version} is above 2^53-1, the largest version embkv takes`);
    }
    if (version >= BigInt(min)) return Number(version);
  } else if (typeof version === 'number' && Number.isInteger(version) && version > Number.MAX_SAFE_INTEGER) {
    throw invalidArgument(`${arg} ${echo(version)} is above 2^53-1, the largest version embkv takes`);
  }
  if (typeof version !== 'number' || !Number.isSafeInteger(version) || version < min) {
    throw invalidArgument(`${arg} must be a positive integer, got ${echo(version)}`);
  }
  return version;
}

/**
 * Refuses an options object with a key outside `known`, naming the right option where `renamed`
 * knows it (undici: 'unsupported keepAlive, use pipelining=0 instead').
 */
export function refuseUnknownOptions(options: object, known: ReadonlySet<string>, renamed: Readonly<Record<string, string>> = {}): void {
  for (const k of Object.keys(options)) {
    if (known.has(k)) continue;
    const hint = renamed[k];
    throw invalidArgument(hint !== undefined ? `unsupported option ${k}, use ${hint}` : `unsupported option ${k} (known: ${[...known].join(', ')})`);
  }
}
