import { invalidArgument } from './errors.js';

const TABLE_NAME = /^[A-Za-z0-9_.-]{1,128}$/;

export function checkTableName(table: unknown, arg = 'table'): string {
  if (typeof table !== 'string' || !TABLE_NAME.test(table)) {
    throw invalidArgument(`${arg} must be 1-128 characters of [A-Za-z0-9_.-], got ${JSON.stringify(table)}`);
  }
  return table;
}

export function checkVersion(version: unknown, arg = 'version', allowZero = false): number {
  if (typeof version !== 'number' || !Number.isSafeInteger(version) || version < (allowZero ? 0 : 1)) {
    throw invalidArgument(`${arg} must be a positive integer, got ${JSON.stringify(version)}`);
  }
  return version;
}
