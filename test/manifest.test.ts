import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  DEFAULT_KEEP_VERSIONS,
  loadManifest,
  localManifest,
  parseManifest,
  resolveManifest,
} from '../src/cluster/manifest.js';
import { KvError } from '../src/common/errors.js';

let dir = '';
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'embkv-manifest-'));
});
after(() => {
  rmSync(dir, { recursive: true, force: true });
});

function writeTemp(name: string, text: string): string {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
}

function assertConfigError(fn: () => unknown, what: string, mentions?: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof KvError, `${what}: expected a KvError, got ${String(err)}`);
    assert.equal(err.code, 'KV_INVALID_CONFIG', what);
    if (mentions !== undefined) {
      assert.ok(err.message.includes(mentions), `${what}: message ${JSON.stringify(err.message)} should mention ${mentions}`);
    }
    return true;
  });
}

const oneGroup = (replicas: unknown[]): { partitions: number; groups: { replicas: unknown[] }[] } => ({
  partitions: 64,
  groups: [{ replicas }],
});

// ---- valid manifests -----------------------------------------------------------------------------

test('a valid manifest parses, with keepVersions defaulting to 2', () => {
  assert.equal(DEFAULT_KEEP_VERSIONS, 2);
  const raw = {
    partitions: 64,
    groups: [{ replicas: ['127.0.0.1:7100', '127.0.0.1:7101'] }, { replicas: ['127.0.0.1:7102', '127.0.0.1:7103'] }],
  };
  const m = parseManifest(raw);
  assert.deepEqual(m, {
    partitions: 64,
    groups: [{ replicas: ['127.0.0.1:7100', '127.0.0.1:7101'] }, { replicas: ['127.0.0.1:7102', '127.0.0.1:7103'] }],
    keepVersions: 2,
  });
});

test('keepVersions, partition bounds and address forms that are allowed', () => {
  assert.equal(parseManifest({ ...oneGroup(['h:1']), keepVersions: 5 }).keepVersions, 5);
  assert.equal(parseManifest({ ...oneGroup(['h:1']), keepVersions: 1 }).keepVersions, 1);
  assert.equal(parseManifest({ ...oneGroup(['h:1']), keepVersions: 100 }).keepVersions, 100);
  assert.equal(parseManifest({ partitions: 1, groups: [{ replicas: ['h:1'] }] }).partitions, 1);
  assert.equal(parseManifest({ partitions: 65536, groups: [{ replicas: ['h:1'] }] }).partitions, 65536);
  // As many groups as partitions.
  const three = parseManifest({ partitions: 3, groups: [{ replicas: ['h:1'] }, { replicas: ['h:2'] }, { replicas: ['h:3'] }] });
  assert.equal(three.groups.length, 3);
  const addrs = ['127.0.0.1:7100', 'localhost:1', 'shard-a.example.com:65535', 'UPPER.case:443', '[::1]:7100', '[fe80::1:2]:80'];
  assert.deepEqual(parseManifest(oneGroup(addrs)).groups[0]!.replicas, addrs);
});

test('loadManifest and resolveManifest read a file; resolveManifest also takes an object', () => {
  const raw = { partitions: 16, groups: [{ replicas: ['127.0.0.1:9000'] }, { replicas: ['127.0.0.1:9001'] }], keepVersions: 3 };
  const p = writeTemp('ok.json', JSON.stringify(raw, null, 2));
  const expected = { partitions: 16, groups: [{ replicas: ['127.0.0.1:9000'] }, { replicas: ['127.0.0.1:9001'] }], keepVersions: 3 };
  assert.deepEqual(loadManifest(p), expected);
  assert.deepEqual(resolveManifest(p), expected);
  assert.deepEqual(resolveManifest(raw), expected);
});

test('localManifest lays out consecutive loopback ports and passes validation', () => {
  const m = localManifest(2, 3, 7100);
  assert.deepEqual(m, {
    partitions: 64,
    keepVersions: 2,
    groups: [
      { replicas: ['127.0.0.1:7100', '127.0.0.1:7101', '127.0.0.1:7102'] },
      { replicas: ['127.0.0.1:7103', '127.0.0.1:7104', '127.0.0.1:7105'] },
    ],
  });
  assert.deepEqual(parseManifest(m), m);
});

// ---- refusals ------------------------------------------------------------------------------------

test('refuses unknown top-level fields, naming them', () => {
  assertConfigError(() => parseManifest({ ...oneGroup(['h:1']), shards: 2 }), 'shards', 'shards');
  assertConfigError(() => parseManifest({ ...oneGroup(['h:1']), keepversions: 2 }), 'keepversions typo', 'keepversions');
  assertConfigError(() => parseManifest({ Partitions: 64, groups: [{ replicas: ['h:1'] }] }), 'Partitions', 'Partitions');
});

test('refuses unknown group fields, naming them', () => {
  assertConfigError(() => parseManifest({ partitions: 4, groups: [{ replicas: ['h:1'], weight: 1 }] }), 'weight', 'weight');
  assertConfigError(
    () => parseManifest({ partitions: 4, groups: [{ replicas: ['h:1'] }, { replica: ['h:2'] }] }),
    'replica typo in groups[1]',
    'groups[1]',
  );
});

test('refuses bad partition counts', () => {
  for (const partitions of [0, 65537, 1.5, -1, NaN, Infinity, '64', null, true]) {
    assertConfigError(
      () => parseManifest({ partitions, groups: [{ replicas: ['h:1'] }] }),
      `partitions ${String(partitions)}`,
      'partitions',
    );
  }
  assertConfigError(() => parseManifest({ groups: [{ replicas: ['h:1'] }] }), 'missing partitions', 'partitions');
});

test('refuses empty or malformed groups and replicas', () => {
  const bad: [unknown, string][] = [
    [{ partitions: 4, groups: [] }, 'no groups'],
    [{ partitions: 4 }, 'groups missing'],
    [{ partitions: 4, groups: {} }, 'groups an object'],
    [{ partitions: 4, groups: [null] }, 'group null'],
    [{ partitions: 4, groups: [['h:1']] }, 'group an array'],
    [{ partitions: 4, groups: ['h:1'] }, 'group a string'],
    [{ partitions: 4, groups: [{ replicas: [] }] }, 'no replicas'],
    [{ partitions: 4, groups: [{}] }, 'replicas missing'],
    [{ partitions: 4, groups: [{ replicas: 'h:1' }] }, 'replicas a string'],
    [{ partitions: 65536, groups: Array.from({ length: 4097 }, (_, i) => ({ replicas: [`h:${i + 1}`] })) }, '4097 groups'],
    [{ partitions: 4, groups: [{ replicas: Array.from({ length: 65 }, (_, i) => `h:${i + 1}`) }] }, '65 replicas'],
  ];
  for (const [raw, what] of bad) assertConfigError(() => parseManifest(raw), what);
});

test('refuses more groups than partitions', () => {
  assertConfigError(
    () => parseManifest({ partitions: 2, groups: [{ replicas: ['h:1'] }, { replicas: ['h:2'] }, { replicas: ['h:3'] }] }),
    '3 groups, 2 partitions',
  );
  assertConfigError(() => parseManifest({ partitions: 1, groups: [{ replicas: ['h:1'] }, { replicas: ['h:2'] }] }), '2 groups, 1 partition');
});

test('refuses bad replica addresses, naming the replica', () => {
  const badAddresses: unknown[] = [
    '127.0.0.1',
    '127.0.0.1:',
    ':7100',
    '127.0.0.1:0',
    '127.0.0.1:65536',
    '127.0.0.1:99999',
    '127.0.0.1:123456',
    '127.0.0.1:-1',
    '127.0.0.1:7a',
    'host name:7100',
    'http://h:7100',
    'h:7100/path',
    '::1:7100',
    '[::1]',
    '[::1]:',
    '',
    ' h:1',
    'h:1 ',
    7100,
    null,
    { host: 'h', port: 1 },
  ];
  for (const a of badAddresses) {
    assertConfigError(
      () => parseManifest({ partitions: 4, groups: [{ replicas: ['ok:1'] }, { replicas: ['ok:2', a] }] }),
      `address ${JSON.stringify(a)}`,
      'groups[1].replicas[1]',
    );
  }
});

test('refuses duplicate addresses within a group and across groups', () => {
  assertConfigError(() => parseManifest(oneGroup(['127.0.0.1:7100', '127.0.0.1:7100'])), 'same group', '127.0.0.1:7100');
  assertConfigError(
    () => parseManifest({ partitions: 4, groups: [{ replicas: ['a:1', 'b:1'] }, { replicas: ['c:1', 'a:1'] }] }),
    'across groups',
    'a:1',
  );
});

test('refuses bad keepVersions', () => {
  for (const keepVersions of [0, 101, 1.5, -1, '2', true]) {
    assertConfigError(() => parseManifest({ ...oneGroup(['h:1']), keepVersions }), `keepVersions ${String(keepVersions)}`, 'keepVersions');
  }
});

test('refuses a manifest that is not a JSON object', () => {
  for (const raw of [null, undefined, [], [{ partitions: 4 }], 'cluster.json', 64]) {
    assertConfigError(() => parseManifest(raw), `raw ${JSON.stringify(raw)}`);
  }
});

test('loadManifest refuses an unreadable file, naming the path', () => {
  const missing = join(dir, 'does-not-exist.json');
  assertConfigError(() => loadManifest(missing), 'missing file', missing);
  assertConfigError(() => resolveManifest(missing), 'missing file via resolveManifest', missing);
  assertConfigError(() => loadManifest(dir), 'a directory', dir);
});

test('loadManifest refuses invalid JSON, naming the path', () => {
  const texts = ['', '{', '{ partitions: 64 }', '{"partitions": 64, "groups": [],}', "{'partitions': 64}", 'cluster'];
  texts.forEach((text, i) => {
    const p = writeTemp(`bad-${i}.json`, text);
    assertConfigError(() => loadManifest(p), `JSON ${JSON.stringify(text)}`, p);
  });
});

test('loadManifest names the file when the JSON is valid but the manifest is not', () => {
  const p = writeTemp('unknown-field.json', JSON.stringify({ ...oneGroup(['h:1']), replicasPerGroup: 2 }));
  assertConfigError(() => loadManifest(p), 'unknown field in file', p);
  const p2 = writeTemp('bad-partitions.json', JSON.stringify({ partitions: 0, groups: [{ replicas: ['h:1'] }] }));
  assertConfigError(() => loadManifest(p2), 'bad partitions in file', p2);
});
