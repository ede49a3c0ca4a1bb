#!/usr/bin/env node
// `npm test` after the build: runs every test file in dist/test/ with node:test, then the import-cycle
// check, then checks that the suite left nothing behind. Every process the suite starts inherits
// EMBKV_TEST_SUITE=<id>, and every temp dir it makes lands under its own TMPDIR; afterwards, pass or
// fail, a process still carrying the id, or a file left in that TMPDIR, fails the run (and is removed).
// usage: node scripts/run-tests.mjs [TEST_DIR]   (default dist/test/)
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const suiteTmp = mkdtempSync(join(tmpdir(), 'embkv-suite-'));
const id = suiteTmp.slice(suiteTmp.lastIndexOf('-') + 1);
const env = { ...process.env, TMPDIR: suiteTmp, EMBKV_TEST_SUITE: id };
// A hung test fails after this instead of stalling the run.
const TEST_TIMEOUT_MS = 10 * 60_000;

let current;
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    current?.kill(sig);
  });
}

function run(cmd, args) {
  return new Promise((resolve) => {
    current = spawn(cmd, args, { cwd: root, env, stdio: 'inherit' });
    current.on('exit', (code, signal) => resolve(code ?? (signal ? 1 : 0)));
  });
}

/** Processes other than this one whose environment carries this suite's id: [pid, command line]. */
function suiteProcesses() {
  const out = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      if (!readFileSync(`/proc/${name}/environ`, 'latin1').split('\0').includes(`EMBKV_TEST_SUITE=${id}`)) continue;
      out.push([Number(name), readFileSync(`/proc/${name}/cmdline`, 'latin1').split('\0').join(' ').trim()]);
    } catch {
      // gone meanwhile, or not ours to read
    }
  }
  return out;
}

/** Waits (bounded) for processes that are still exiting to be gone; returns those that stay. */
async function lingering() {
  const until = Date.now() + 5000;
  for (;;) {
    const left = suiteProcesses();
    if (left.length === 0 || Date.now() > until) return left;
    await new Promise((r) => setTimeout(r, 100));
  }
}

const testDir = process.argv[2] ?? 'dist/test/';
const testCode = await run(process.execPath, ['--test', '--test-concurrency=1', `--test-timeout=${TEST_TIMEOUT_MS}`, testDir]);
const madgeCode = testCode === 0 ? await run(process.execPath, [join(root, 'node_modules/madge/bin/cli.js'), '-c', '--extensions', 'js', 'dist/src']) : 0;

const problems = [];
const procs = process.platform === 'linux' ? await lingering() : [];
for (const [pid, cmd] of procs) {
  problems.push(`process ${pid} outlived the suite: ${cmd}`);
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}
const files = readdirSync(suiteTmp);
for (const f of files) problems.push(`temp entry left behind: ${join(suiteTmp, f)}`);
rmSync(suiteTmp, { recursive: true, force: true });

if (problems.length > 0) {
  process.stderr.write(`\nnpm test: the suite left things behind (removed now):\n${problems.map((p) => `  ${p}`).join('\n')}\n`);
} else {
  process.stderr.write(`\nnpm test: no process or temp dir of the suite is left\n`);
}
process.exitCode = testCode !== 0 ? testCode : madgeCode !== 0 ? madgeCode : problems.length > 0 ? 1 : 0;
