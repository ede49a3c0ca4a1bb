/**
 * Preloaded into a kvctl child (`NODE_OPTIONS=--import=LOCALHOST_DNS_IMPORT`): names under `.localhost`
 * resolve to 127.0.0.1, as RFC 6761 asks and systemd-resolved does, but glibc with only /etc/hosts does
 * not. A test can then address a bucket as a virtual host (`dumps.s3.localhost`) on loopback without
 * touching /etc/hosts. Every other name resolves as usual.
 */
import dns from 'node:dns';
import { pathToFileURL } from 'node:url';

type Callback = (err: NodeJS.ErrnoException | null, address?: unknown, family?: number) => void;

/** `NODE_OPTIONS` for a child that resolves `*.localhost` to loopback. */
export const LOCALHOST_DNS_IMPORT = pathToFileURL(new URL(import.meta.url).pathname).href;

const original = dns.lookup;
const patched = function (this: unknown, host: string, opts: unknown, cb?: Callback): void {
  const callback = (typeof opts === 'function' ? opts : cb) as Callback;
  const o = (typeof opts === 'object' && opts !== null ? opts : {}) as { all?: boolean };
  if (typeof host === 'string' && host.endsWith('.localhost')) {
    if (o.all) process.nextTick(callback, null, [{ address: '127.0.0.1', family: 4 }]);
    else process.nextTick(callback, null, '127.0.0.1', 4);
    return;
  }
  (original as (...a: unknown[]) => void).call(this, host, opts, cb);
};
// Only in a process that preloads this file on purpose: the test process imports it for the URL alone.
if (process.env['EMBKV_TEST_LOCALHOST_DNS'] === '1') (dns as { lookup: unknown }).lookup = patched;
