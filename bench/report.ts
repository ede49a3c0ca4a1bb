import { appendFileSync, existsSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, platform, release, totalmem } from 'node:os';
import type { EmbkvFigures } from './embkv.js';
import type { RedisFigures } from './redis.js';

/** One configuration's figures: one table row. */
export interface Row {
  date: string;
  keys: number;
  dim: number;
  batch: number;
  groups: number;
  replicas: number;
  embkv?: EmbkvFigures | undefined;
  redis?: RedisFigures | undefined;
}

const ms = (x: number): string => (x < 10 ? x.toFixed(2) : x.toFixed(1));
const count = (x: number): string =>
  x >= 1e6 && x % 1e6 === 0 ? `${x / 1e6}M` : x >= 1e3 && x % 1e3 === 0 ? `${x / 1e3}k` : String(x);
const DASH = '–';
// NaN: not measured in this run (no load and no empty baseline when the bench times a running cluster).
const rate = (x: number): string => (Number.isNaN(x) ? DASH : Math.round(x).toLocaleString('en-US'));
const perKey = (bytes: number, raw: number): string => (Number.isNaN(bytes) ? DASH : `${Math.round(bytes)} (${(bytes / raw).toFixed(2)}×)`);

const EMBKV_HEAD = ['p50 ms', 'p90 ms', 'p99 ms', 'max ms', 'client CPU ms/req', 'GC ms/req', 'load keys/s', 'B/key rss', 'B/key rss growth', 'B/key index+vectors'];
const REDIS_HEAD = ['redis p50 ms', 'redis p90 ms', 'redis client (fastest)', 'redis/embkv p50', 'redis B/key used (rss)', 'redis load keys/s'];

/** The markdown table of `rows`; the Redis columns appear when any row has Redis figures. */
export function table(rows: readonly Row[]): string {
  const withRedis = rows.some((r) => r.redis !== undefined);
  const head = ['date', 'keys', 'dim', 'batch', 'groups×replicas', ...EMBKV_HEAD, ...(withRedis ? REDIS_HEAD : [])];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`];
  for (const r of rows) lines.push(rowLine(r, withRedis));
  return lines.join('\n');
}

export function rowLine(r: Row, withRedis: boolean): string {
  const raw = r.dim * 4;
  const e = r.embkv;
  const cells = [r.date, count(r.keys), String(r.dim), count(r.batch), `${r.groups}×${r.replicas}`];
  if (e) {
    cells.push(ms(e.p50), ms(e.p90), ms(e.p99), ms(e.max), ms(e.cpuMsPerRequest), ms(e.gcMsPerRequest), rate(e.loadKeysPerSec),
      perKey(e.rssBytesPerKey, raw), perKey(e.rssGrowthBytesPerKey, raw), perKey(e.versionBytesPerKey, raw));
  } else {
    cells.push(...EMBKV_HEAD.map(() => DASH));
  }
  if (withRedis) {
    const x = r.redis;
    if (x) {
      cells.push(ms(x.p50), ms(x.p90), x.client, e ? `${(x.p50 / e.p50).toFixed(2)}×` : DASH,
        `${Math.round(x.usedBytesPerKey)} (${Math.round(x.rssBytesPerKey)})`, rate(x.loadKeysPerSec));
    } else {
      cells.push(...REDIS_HEAD.map(() => DASH));
    }
  }
  return `| ${cells.join(' | ')} |`;
}

/** The machine, in one line: CPU model and count, memory, OS, Node. */
export function machineLine(): string {
  const c = cpus();
  const models = [...new Set(c.map((x) => x.model.trim()))].join(', ');
  return `${c.length} × ${models}, ${(totalmem() / 2 ** 30).toFixed(1)} GiB RAM, ${platform()} ${release()}, Node ${process.version}`;
}

/** The 1, 5 and 15 minute load averages: above ~0.5 other work shared the cores during the run. */
export function loadLine(): string {
  return loadavg().map((x) => x.toFixed(2)).join(' / ');
}

/** Appends a dated section with the command line, the machine and the table to `path`. */
export function appendResults(
  path: string, rows: readonly Row[], argv: readonly string[], note: string | undefined, extra: readonly string[], loadAtStart: string,
): void {
  if (!existsSync(path)) writeFileSync(path, '# embkv benchmark results\n\nAppended by `npm run bench -- --append-results`; see bench/README.md for the columns.\n');
  const shown = measuringArgs(argv);
  const cmd = shown.length > 0 ? `npm run bench -- ${shown.map(shellQuote).join(' ')}` : 'npm run bench';
  const date = rows[0]?.date ?? new Date().toISOString().slice(0, 10);
  const lines = [
    '',
    `## ${date}: \`${cmd}\``,
    '',
    `Machine: ${machineLine()}. Load average (1/5/15 min) at the start: ${loadAtStart}, at the end: ${loadLine()}.`,
    ...(note ? ['', note] : []),
    ...(extra.length > 0 ? ['', ...extra.map((l) => `- ${l}`)] : []),
    '',
    table(rows),
    '',
  ];
  appendFileSync(path, lines.join('\n'));
}

/** The command line without the flags that only say where results go (--append-results, --note). */
function measuringArgs(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--append-results' || a.startsWith('--note=')) continue;
    if (a === '--note') {
      i++;
      continue;
    }
    out.push(a);
  }
  return out;
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_\-.,=/:]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}
