#!/usr/bin/env node
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { Command, InvalidArgumentError } from 'commander';
// Each command imports what it runs when it runs (a replica's storage engine, the router, the
// loader): kvctl starts in about half the time that loading every module took.
import { KvError, KvErrorCode, fromGrpcError } from '../common/errors.js';
import { DEFAULT_CONFIG_PATH, loadManifest, localManifest, type Manifest } from '../cluster/manifest.js';
import { dropVersion, publishVersion, statusAll } from '../loader/cluster-ops.js';
import { checkTableName } from '../common/validate.js';
import { parseSnapshotTime } from '../common/snapshot-time.js';
import { ClusterConnections } from '../cluster/connections.js';
import { fetchRouterStats } from '../router/stats-service.js';
import { Progress, formatFanoutStats, formatStatus } from './output.js';
import { checkClientToken } from '../cluster/security.js';
import { DEFAULT_METRICS_HOST } from '../metrics/server.js';
import type { MetricSet } from '../metrics/registry.js';
import { DEFAULT_LEASE_TTL_S, clusterSource, type ClusterSource } from '../cluster/source.js';

const intArg = (name: string, min: number, max = Number.MAX_SAFE_INTEGER) => (value: string): number => {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new InvalidArgumentError(max === Number.MAX_SAFE_INTEGER ? `${name} must be an integer ≥ ${min}` : `${name} must be an integer in [${min}, ${max}]`);
  }
  return n;
};

/** A duration with its unit: `500ms`, `30s`, `2m`, in milliseconds within [min, max]. */
function parseDuration(name: string, value: string, minMs: number, maxMs: number): number {
  const m = /^(\d{1,9})(ms|s|m)$/.exec(value);
  const ms = m ? Number(m[1]) * (m[2] === 'ms' ? 1 : m[2] === 's' ? 1000 : 60_000) : NaN;
  if (!m) throw new InvalidArgumentError(`${name} must be a number with a unit, such as 500ms, 30s or 2m; got ${JSON.stringify(value)}`);
  if (ms < minMs || ms > maxMs) throw new InvalidArgumentError(`${name} must be between ${minMs}ms and ${maxMs / 60_000}m; got ${value}`);
  return ms;
}

/** The default manifest of `cluster up` and `demo`: 2 groups x 2 replicas on 127.0.0.1:7100-7103. */
export const DEFAULT_LOCAL_MANIFEST: Manifest = localManifest(2, 2, 7100, 64);

/** Reads the manifest, or with `writeDefault` writes the embedded default first when there is none. */
function manifestFrom(path: string, writeDefault = false): Manifest {
  if (writeDefault && !existsSync(path)) {
    writeFileSync(path, JSON.stringify(DEFAULT_LOCAL_MANIFEST, null, 2) + '\n');
    process.stderr.write(`wrote ${path}: ${DEFAULT_LOCAL_MANIFEST.groups.length} groups x 2 replicas on 127.0.0.1:7100-7103\n`);
  }
  return loadManifest(path);
}

// Node warns (DEP0123) when a TLS client names an IP address as server name, which grpc-js does for
// every replica addressed by IP: certificates for IPs are verified against their IP SANs all the
// same, and the warning would break kvctl's one-line output.
const emitWarning = process.emitWarning.bind(process) as (...args: unknown[]) => void;
process.emitWarning = ((...args: unknown[]) => {
  const opt = args[1];
  const code = typeof opt === 'object' && opt !== null ? (opt as { code?: unknown }).code : args[2];
  if (code !== 'DEP0123') emitWarning(...args);
}) as typeof process.emitWarning;

// The AWS SDK (loaded for s3:// dumps) warns on Node < 22 that it will stop supporting it; the
// warning says nothing about the load and would break kvctl's one-line output. Its own switch:
process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';

const TOKEN_FILE_HELP = 'read the token (README: Security) from FILE instead of EMBKV_TOKEN';

/** The caller's token: the contents of --token-file (surrounding whitespace dropped), else EMBKV_TOKEN, else none. */
function tokenFrom(o: { tokenFile?: string }): string | undefined {
  if (o.tokenFile !== undefined) {
    let text: string;
    try {
      text = readFileSync(o.tokenFile, 'utf8');
    } catch (err) {
      throw new KvError(KvErrorCode.INVALID_ARGUMENT, `--token-file ${o.tokenFile} cannot be read: ${(err as Error).message}`);
    }
    return checkClientToken(text.trim(), `--token-file ${o.tokenFile}`);
  }
  const env = process.env['EMBKV_TOKEN'];
  return env === undefined || env === '' ? undefined : checkClientToken(env.trim(), 'EMBKV_TOKEN');
}

const CONFIG_HELP = `cluster manifest (default ./${DEFAULT_CONFIG_PATH})`;
const ETCD_HELP = 'the cluster in etcd instead of a manifest file: http://HOST:PORT[,http://HOST:PORT...] (with --cluster)';
const CLUSTER_HELP = 'the cluster\'s name in etcd (with --etcd): its keys are under /embkv/NAME/';

/** Where a command finds the cluster: --config FILE (the default ./cluster.json) or --etcd ENDPOINTS --cluster NAME. */
interface SourceFlags {
  config?: string;
  etcd?: string;
  cluster?: string;
}

/** The cluster source the flags name, opened (the manifest read, etcd followed). The caller closes it. */
async function openSource(o: SourceFlags, extra: { leaseTtlS?: number } = {}): Promise<ClusterSource> {
  if (o.etcd === undefined && o.cluster !== undefined) throw new KvError(KvErrorCode.INVALID_ARGUMENT, '--cluster names a cluster in etcd: give --etcd ENDPOINTS too');
  if (o.etcd !== undefined && o.cluster === undefined) throw new KvError(KvErrorCode.INVALID_ARGUMENT, '--etcd needs --cluster NAME (the name given to kvctl cluster init)');
  if (o.etcd !== undefined && o.config !== undefined) throw new KvError(KvErrorCode.INVALID_ARGUMENT, 'give the cluster as --config FILE or as --etcd ENDPOINTS --cluster NAME, not both');
  const source = await clusterSource(o.etcd !== undefined
    ? { etcd: { endpoints: o.etcd, cluster: o.cluster!, ...(extra.leaseTtlS !== undefined ? { leaseTtlS: extra.leaseTtlS } : {}) } }
    : { config: o.config ?? DEFAULT_CONFIG_PATH });
  try {
    await source.open();
  } catch (err) {
    await source.close();
    throw err;
  }
  return source;
}

/** Resolves on SIGINT or SIGTERM, or when the supervising parent's IPC channel closes (it died). */
function untilSignal(): Promise<NodeJS.Signals | 'parent exited'> {
  return new Promise((resolve) => {
    process.once('SIGINT', () => resolve('SIGINT'));
    process.once('SIGTERM', () => resolve('SIGTERM'));
    if (process.send !== undefined) process.once('disconnect', () => resolve('parent exited'));
  });
}

const METRICS_PORT_HELP = 'serve Prometheus metrics on this port at /metrics (off by default; 0 takes a free port)';
const METRICS_HOST_HELP = 'address of the metrics endpoint; it has no TLS or tokens (default every interface, so Prometheus can scrape from elsewhere)';

interface MetricsFlags {
  metricsPort?: number;
  metricsHost: string;
}

/**
 * With --metrics-port: an HTTP endpoint serving a registry of the process's own series, `labels` on
 * each, and what `register` adds. Resolves with what stops it.
 */
async function startMetrics(o: MetricsFlags, labels: Record<string, string | number>, register: (set: MetricSet) => void, logger?: import('pino').Logger): Promise<() => Promise<void>> {
  if (o.metricsPort === undefined) return async () => undefined;
  const [{ processRegistry }, { MetricsServer }] = await Promise.all([import('../metrics/registry.js'), import('../metrics/server.js')]);
  const server = new MetricsServer({ registry: processRegistry(labels, register), port: o.metricsPort, host: o.metricsHost, ...(logger ? { logger } : {}) });
  await server.start();
  if (logger === undefined) process.stderr.write(`kvctl: metrics on ${o.metricsHost}:${server.port}/metrics\n`);
  return () => server.close();
}

const program = new Command()
  .name('kvctl')
  .description('embkv: a sharded key-value store of float32 embeddings')
  .showHelpAfterError('(run kvctl help for the commands)');

program
  .command('serve')
  .description('run one shard replica')
  .option('--config <file>', CONFIG_HELP)
  .option('--etcd <endpoints>', ETCD_HELP)
  .option('--cluster <name>', CLUSTER_HELP)
  .option('--listen <host:port>', 'listen here instead of at the manifest\'s address (port 0: any free port); with --etcd, the address registered for other hosts to reach this replica at')
  .option('--lease-ttl <s>', `with --etcd, seconds the registration outlives the last keepalive (default ${DEFAULT_LEASE_TTL_S})`, intArg('--lease-ttl', 2, 3600))
  .requiredOption('--group <g>', 'shard group index', intArg('--group', 0, 4095))
  .requiredOption('--replica <r>', 'replica index within the group', intArg('--replica', 0, 63))
  .option('--data <dir>', 'data directory (default ./data/gGrR)')
  .option('--max-put-skew-ms <ms>', 'refuse puts stamped further ahead of this replica\'s clock (default 5000)', intArg('--max-put-skew-ms', 0, 3_600_000))
  .option('--max-inflight-mb <mb>', 'answers not yet sent may hold this much before lookups are refused with KV_RESOURCE_EXHAUSTED (default 512)', intArg('--max-inflight-mb', 1, 1_048_576))
  .option('--insecure', 'listen on a non-loopback address although the manifest has no security', false)
  .option('--metrics-port <p>', METRICS_PORT_HELP, intArg('--metrics-port', 0, 65535))
  .option('--metrics-host <h>', METRICS_HOST_HELP, DEFAULT_METRICS_HOST)
  .action(async (o: SourceFlags & { group: number; replica: number; data?: string; maxPutSkewMs?: number; maxInflightMb?: number; insecure: boolean; listen?: string; leaseTtl?: number } & MetricsFlags) => {
    if (o.listen !== undefined) {
      const m = /^([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$/.exec(o.listen);
      if (m === null || Number(m[2]) > 65535) throw new KvError(KvErrorCode.INVALID_ARGUMENT, `--listen must be HOST:PORT, got ${JSON.stringify(o.listen)}`);
      if (o.etcd !== undefined && /^(0\.0\.0\.0|\[::\])$/.test(m[1]!)) {
        throw new KvError(KvErrorCode.INVALID_ARGUMENT, `--listen ${o.listen}: with --etcd, give the address other hosts reach this replica at (it is registered as it is), not a wildcard`);
      }
    }
    const source = await openSource(o, o.leaseTtl !== undefined ? { leaseTtlS: o.leaseTtl } : {});
    const manifest = source.manifest;
    const [{ ReplicaServer }, { rootLogger }] = await Promise.all([import('../replica/server.js'), import('../common/log.js')]);
    const logger = rootLogger('embkv');
    const server = new ReplicaServer({
      manifest, source, group: o.group, replica: o.replica, dataDir: o.data ?? `data/g${o.group}r${o.replica}`, logger, insecure: o.insecure,
      ...(o.listen !== undefined ? { listenAddress: o.listen } : {}),
      ...(o.maxPutSkewMs !== undefined ? { maxPutSkewMs: o.maxPutSkewMs } : {}),
      ...(o.maxInflightMb !== undefined ? { maxInflightBytes: o.maxInflightMb * 1024 * 1024 } : {}),
    });
    // SIGHUP re-reads the tokens file (an invalid one is logged and the tokens in force stay).
    process.on('SIGHUP', () => {
      try {
        server.reloadTokens();
      } catch {
        // Logged by reloadTokens.
      }
    });
    // Listening for signals before it serves: a stop sent as soon as it logs "serving" is not lost.
    const stop = untilSignal();
    // Metrics first: a replica restoring or catching up shows as not serving.
    const stopMetrics = await startMetrics(o, { group: o.group, replica: o.replica }, (set) => server.registerMetrics(set), logger.child({ component: 'metrics' }));
    await server.start();
    await stop;
    await server.close();
    await stopMetrics();
    await source.close();
    // Closed: calls drained, store closed, logs written synchronously. Nothing else may hold the
    // process (the supervisor's IPC channel would, a stray timer could).
    process.exit(0);
  });

const cluster = program.command('cluster').description('a local cluster, or a cluster\'s manifest in etcd');
cluster
  .command('init')
  .description('store a manifest in etcd, where every process given --etcd ENDPOINTS --cluster NAME reads it')
  .requiredOption('--etcd <endpoints>', 'http://HOST:PORT[,http://HOST:PORT...]')
  .requiredOption('--cluster <name>', 'the cluster\'s name: its keys are under /embkv/NAME/')
  .option('--config <file>', 'the manifest to store', DEFAULT_CONFIG_PATH)
  .option('--force', 'replace a different manifest stored before (running processes keep the one they read until restarted)', false)
  .action(async (o: { etcd: string; cluster: string; config: string; force: boolean }) => {
    // Validated as any manifest file is, then stored as written (security paths stay relative, to each process's directory).
    loadManifest(o.config);
    const text = readFileSync(o.config, 'utf8');
    const { EtcdSource } = await import('../cluster/etcd-source.js');
    const { parseEtcdOptions } = await import('../cluster/source.js');
    const source = new EtcdSource(parseEtcdOptions({ endpoints: o.etcd, cluster: o.cluster }, '--etcd/--cluster'));
    try {
      const r = await source.storeManifest(text, o.force);
      process.stdout.write(r === 'unchanged'
        ? `${source.name}: holds this manifest already; nothing changed\n`
        : `${source.name}: manifest ${r === 'stored' ? 'stored' : 'replaced (running processes keep the one they read until restarted)'} from ${o.config}\n`);
    } finally {
      await source.close();
    }
  });
cluster
  .command('up')
  .description('run every replica of the manifest on this host until Ctrl-C')
  .option('--config <file>', `cluster manifest (default ./${DEFAULT_CONFIG_PATH}, written with the default if missing)`)
  .option('--etcd <endpoints>', `${ETCD_HELP}; each replica listens at and registers its manifest address`)
  .option('--cluster <name>', CLUSTER_HELP)
  .option('--data <dir>', 'data directory', 'data')
  .option('--insecure', 'let replicas listen on non-loopback addresses although the manifest has no security', false)
  .action(async (o: SourceFlags & { data: string; insecure: boolean }) => {
    let manifest: Manifest;
    if (o.etcd === undefined && o.cluster === undefined) {
      manifest = manifestFrom(o.config ?? DEFAULT_CONFIG_PATH, true);
    } else {
      const source = await openSource(o);
      manifest = source.manifest;
      await source.close();
    }
    const { Supervisor } = await import('./supervisor.js');
    const sup = new Supervisor({
      manifest, configPath: o.config ?? DEFAULT_CONFIG_PATH, dataDir: o.data, logs: 'inherit', report: (l) => process.stderr.write(`kvctl: ${l}\n`), insecure: o.insecure,
      ...(o.etcd !== undefined ? { sourceArgs: ['--etcd', o.etcd, '--cluster', o.cluster!] } : {}),
    });
    sup.start();
    process.on('SIGHUP', () => sup.signalAll('SIGHUP'));
    process.once('exit', () => sup.killAll());
    process.stderr.write(`kvctl: started ${manifest.groups.reduce((a, g) => a + g.replicas.length, 0)} replicas; Ctrl-C stops them\n`);
    const sig = await untilSignal();
    process.stderr.write(`kvctl: ${sig}: stopping every replica\n`);
    await sup.stop();
  });

program
  .command('load')
  .description('load a version of a table from NumPy or text files')
  .option('--config <file>', CONFIG_HELP)
  .option('--etcd <endpoints>', ETCD_HELP)
  .option('--cluster <name>', CLUSTER_HELP)
  .requiredOption('--table <name>', 'table name')
  .requiredOption('--version <n>', 'version number', intArg('--version', 1))
  .option('--full <path>', 'a full dump: a file, a NumPy pair or a directory of parts, local or s3://BUCKET/PREFIX/')
  .option('--incremental <path>', 'a delta (upserts and deletes) on top of the current version, published when complete')
  .option('--s3-endpoint <url>', 'S3-compatible endpoint for s3:// dumps (default AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS)')
  .option('--s3-virtual-host', 'with --s3-endpoint, address buckets as virtual hosts (bucket.host) instead of paths', false)
  .option('--no-success-marker', 'load a dump that follows the Hadoop/Spark convention (every s3:// prefix) although it has no _SUCCESS marker')
  .option('--publish', 'publish the version once every replica holds it (default for --incremental)')
  .option('--no-publish', 'only load; publish later with kvctl publish')
  .option('--force', 'accept a version number lower than the current one, and take over a stalled load', false)
  .option('--allow-empty', 'allow a full load with no rows (it empties the table once published)', false)
  .option('--dim <n>', 'the dimension of a full load that changes the table\'s dimension (default: the current version\'s)', intArg('--dim', 1, 16384))
  .option('--snapshot-time <time>', 'a full load: when the training snapshot behind the dump was taken (ISO 8601 with a zone, e.g. 2026-12-02T17:35:09Z); real-time puts stamped at or after it stay over the new version (default: the dump\'s _embkv.json, else the load\'s start)')
  .option('--no-staging', 'send every row over gRPC, also to replicas on this host (which otherwise read a full load from a staged file)')
  .option('--token-file <file>', TOKEN_FILE_HELP)
  .action(async (o: SourceFlags & {
    table: string; version: number; full?: string; incremental?: string; publish?: boolean; force: boolean; allowEmpty: boolean; dim?: number; staging: boolean;
    tokenFile?: string; s3Endpoint?: string; s3VirtualHost: boolean; successMarker: boolean; snapshotTime?: string;
  }) => {
    if ((o.full === undefined) === (o.incremental === undefined)) {
      throw new KvError(KvErrorCode.INVALID_ARGUMENT, 'give the dump to load with exactly one of --full PATH or --incremental PATH');
    }
    if (o.snapshotTime !== undefined && o.incremental !== undefined) {
      throw new KvError(KvErrorCode.INVALID_ARGUMENT, '--snapshot-time applies to --full only: a delta leaves the real-time puts over the current version as they are');
    }
    const snapshotAtMs = o.snapshotTime === undefined ? undefined : parseSnapshotTime(o.snapshotTime, '--snapshot-time');
    const mode = o.full !== undefined ? 'full' : 'incremental';
    const publish = o.publish ?? mode === 'incremental';
    const token = tokenFrom(o);
    const source = await openSource(o);
    const manifest = source.manifest;
    // Connections are set up while the loader's modules load.
    const connections = ClusterConnections.of(source, { token });
    connections.connect();
    const progress = new Progress(`loading ${o.table} v${o.version}`);
    const { runLoad } = await import('../loader/loader.js');
    const r = await runLoad({
      manifest, connections, table: o.table, version: o.version, path: (o.full ?? o.incremental)!, mode, publish, force: o.force, allowEmpty: o.allowEmpty, staging: o.staging,
      ...(o.dim !== undefined ? { dim: o.dim } : {}),
      ...(snapshotAtMs !== undefined ? { snapshotAtMs } : {}),
      s3: { ...(o.s3Endpoint !== undefined ? { endpoint: o.s3Endpoint } : {}), virtualHost: o.s3VirtualHost },
      requireSuccessMarker: o.successMarker,
      onProgress: (rows, total) => progress.update(rows, total),
      // Refusals tell the user which flag to pass.
      optionNames: { table: '--table', version: '--version', dim: '--dim', allowEmpty: '--allow-empty', noSuccessMarker: '--no-success-marker', snapshotTime: '--snapshot-time' },
    }).finally(async () => {
      progress.done();
      connections.close();
      await source.close();
    });
    const rate = Math.round((r.rows + r.deletes) / Math.max(r.ms / 1000, 1e-3));
    const what = mode === 'full'
      ? `${r.rows} keys of dim ${r.dim}${r.snapshotAtMs > 0 ? ` (snapshot ${new Date(r.snapshotAtMs).toISOString()})` : ''}`
      : `a delta on v${r.baseVersion}: ${r.rows} upserts and ${r.deletes} deletes of dim ${r.dim}`;
    process.stdout.write(
      `loaded ${o.table} v${o.version}: ${what} in ${(r.ms / 1000).toFixed(1)} s (${rate} rows/s) on ${r.rowsPerGroup.length} groups` +
        `${r.stagedGroups > 0 ? ` (${r.stagedGroups === r.rowsPerGroup.length ? 'all' : r.stagedGroups} through staged files)` : ''}` +
        `${r.published ? '; published' : `; run kvctl publish --table ${o.table} --version ${o.version} to serve it`}\n`,
    );
  });

program
  .command('watch')
  .description('load and publish every complete version a trainer writes under SOURCE/full/<version>/ and SOURCE/incremental/<version>/')
  .option('--config <file>', CONFIG_HELP)
  .option('--etcd <endpoints>', ETCD_HELP)
  .option('--cluster <name>', CLUSTER_HELP)
  .requiredOption('--table <name>', 'table name')
  .requiredOption('--source <dir>', 'where the trainer writes full/ and incremental/: a directory or s3://BUCKET/PREFIX/')
  .option('--s3-endpoint <url>', 'S3-compatible endpoint for an s3:// source (default AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS)')
  .option('--s3-virtual-host', 'with --s3-endpoint, address buckets as virtual hosts (bucket.host) instead of paths', false)
  .option('--interval <time>', 'how often to look for new versions when idle: 500ms, 30s, 2m', (v) => parseDuration('--interval', v, 50, 24 * 3_600_000), 30_000)
  .option('--no-publish', 'only load each version; the watcher waits until it is published (kvctl publish) before loading the next')
  .option('--no-staging', 'send every row over gRPC, also to replicas on this host')
  .option('--token-file <file>', TOKEN_FILE_HELP)
  .option('--metrics-port <p>', METRICS_PORT_HELP, intArg('--metrics-port', 0, 65535))
  .option('--metrics-host <h>', METRICS_HOST_HELP, DEFAULT_METRICS_HOST)
  .action(async (o: SourceFlags & { table: string; source: string; interval: number; publish: boolean; staging: boolean; tokenFile?: string; s3Endpoint?: string; s3VirtualHost: boolean } & MetricsFlags) => {
    checkTableName(o.table, '--table');
    const token = tokenFrom(o);
    const clusterState = await openSource(o);
    const manifest = clusterState.manifest;
    const [{ runWatch }, { watchSourceFor }, { WatchMetrics }] = await Promise.all([
      import('../loader/watch.js'), import('../loader/watch-source.js'), import('../metrics/watch-metrics.js'),
    ]);
    let metrics: InstanceType<typeof WatchMetrics> | undefined;
    const stopMetrics = await startMetrics(o, {}, (set) => void (metrics = new WatchMetrics(set, o.table)));
    const source = watchSourceFor(o.source, { ...(o.s3Endpoint !== undefined ? { endpoint: o.s3Endpoint } : {}), virtualHost: o.s3VirtualHost });
    const connections = ClusterConnections.of(clusterState, { token });
    const stop = new AbortController();
    // A load under way is aborted (its write version dropped on every replica), then the watcher exits.
    void untilSignal().then(() => stop.abort());
    try {
      await runWatch({
        manifest, connections, table: o.table, source, intervalMs: o.interval, publish: o.publish, staging: o.staging, signal: stop.signal,
        onAction: (a) => {
          metrics?.onAction(a.action);
          process.stdout.write(`watch ${a.table}: ${a.line}\n`);
        },
        onProgress: (version, rows, total) => metrics?.onProgress(version, rows, total),
      });
    } finally {
      connections.close();
      source.close?.();
      await stopMetrics();
      await clusterState.close();
    }
    process.exit(0);
  });

/** The commands on one version of a table, cluster-wide: what each does, and the line it prints. */
const VERSION_COMMANDS: [name: string, description: string, run: (conns: ClusterConnections, table: string, version: number) => Promise<string>][] = [
  ['publish', 'make a loaded version current on every replica', async (conns, table, version) => {
    const r = await publishVersion(conns, { table, version, rollback: false });
    return `${table}: version ${version} is current on every replica (was ${[...new Set(r.previous)].join(', ')})`;
  }],
  ['rollback', 'make an older kept version current again', async (conns, table, version) => {
    const r = await publishVersion(conns, { table, version, rollback: true });
    return `${table}: version ${version} is current on every replica (was ${[...new Set(r.previous)].join(', ')})`;
  }],
  ['drop', 'drop a version that is not current from every replica (memory and rows files)', async (conns, table, version) => {
    const r = await dropVersion(conns, table, version);
    return `${table}: version ${version} dropped from ${r.dropped} replica${r.dropped === 1 ? '' : 's'}`;
  }],
];

for (const [name, description, run] of VERSION_COMMANDS) {
  program
    .command(name)
    .description(description)
    .option('--config <file>', CONFIG_HELP)
    .option('--etcd <endpoints>', ETCD_HELP)
    .option('--cluster <name>', CLUSTER_HELP)
    .requiredOption('--table <name>', 'table name')
    .requiredOption('--version <n>', 'version number', intArg('--version', 1))
    .option('--token-file <file>', TOKEN_FILE_HELP)
    .action(async (o: SourceFlags & { table: string; version: number; tokenFile?: string }) => {
      checkTableName(o.table, '--table');
      const token = tokenFrom(o);
      const source = await openSource(o);
      const conns = ClusterConnections.of(source, { token });
      try {
        process.stdout.write(`${await run(conns, o.table, o.version)}\n`);
      } finally {
        conns.close();
        await source.close();
      }
    });
}

program
  .command('get')
  .description('print the vectors of keys')
  .option('--config <file>', CONFIG_HELP)
  .option('--etcd <endpoints>', ETCD_HELP)
  .option('--cluster <name>', CLUSTER_HELP)
  .requiredOption('--table <name>', 'table name')
  .option('--version <n>', 'version (default: current)', intArg('--version', 1))
  .option('--strings', 'the keys are strings (hashed with xxh64)', false)
  .argument('<keys...>', 'decimal uint64 keys')
  .option('--token-file <file>', TOKEN_FILE_HELP)
  .action(async (keys: string[], o: SourceFlags & { table: string; version?: number; strings: boolean; tokenFile?: string }) => {
    const parsed = o.strings ? keys : keys.map((k, i) => {
      if (!/^\d{1,20}$/.test(k) || BigInt(k) >= 1n << 64n) throw new KvError(KvErrorCode.INVALID_ARGUMENT, `key ${i + 1} (${k}) is not a decimal uint64; use --strings for string keys`);
      return BigInt(k);
    });
    const { EmbeddingClientImpl } = await import('../client/client.js');
    const token = tokenFrom(o);
    if (o.etcd !== undefined && o.cluster === undefined) throw new KvError(KvErrorCode.INVALID_ARGUMENT, '--etcd needs --cluster NAME (the name given to kvctl cluster init)');
    if (o.etcd === undefined && o.cluster !== undefined) throw new KvError(KvErrorCode.INVALID_ARGUMENT, '--cluster names a cluster in etcd: give --etcd ENDPOINTS too');
    const client = new EmbeddingClientImpl({
      ...(o.etcd !== undefined ? { etcd: { endpoints: o.etcd, cluster: o.cluster! }, ...(o.config !== undefined ? { config: o.config } : {}) } : { config: o.config ?? DEFAULT_CONFIG_PATH }),
      ...(token !== undefined ? { token } : {}),
    });
    try {
      const r = await client.getEmbeddings(parsed as bigint[] | string[], { table: o.table, ...(o.version ? { version: o.version } : {}) });
      process.stderr.write(`${o.table} v${r.version} dim ${r.dim}\n`);
      keys.forEach((k, i) => {
        const row = r.found[i] ? Array.from(r.values.subarray(i * r.dim, (i + 1) * r.dim), (v) => String(v)).join(',') : '(absent)';
        process.stdout.write(`${k}\t${row}\n`);
      });
    } finally {
      await client.close();
    }
  });

program
  .command('status')
  .description('groups, replicas, health, tables, versions, keys and memory; exits 1 if a replica does not answer')
  .option('--config <file>', CONFIG_HELP)
  .option('--etcd <endpoints>', ETCD_HELP)
  .option('--cluster <name>', CLUSTER_HELP)
  .option('--json', 'machine-readable output', false)
  .option('--router <host:port>', 'also show the per-group request, hedge, retry and latency stats of a running kvctl router')
  .option('--token-file <file>', TOKEN_FILE_HELP)
  .action(async (o: SourceFlags & { json: boolean; router?: string; tokenFile?: string }) => {
    const token = tokenFrom(o);
    const source = await openSource(o);
    const manifest = source.manifest;
    const conns = ClusterConnections.of(source, { token });
    try {
      const all = await statusAll(conns);
      // --router: the router's stats after the replicas (with --json: { replicas, router }).
      if (o.router !== undefined) {
        const replicas = all.map((s) => ({ group: s.conn.group, replica: s.conn.replica, address: s.conn.address, ...(s.status ? { status: s.status } : { error: s.error?.message }) }));
        let router: object;
        try {
          const stats = await fetchRouterStats(o.router, 3000, manifest.security, token);
          router = { address: o.router, stats };
          if (!o.json) process.stdout.write(formatStatus(all) + `router ${o.router}\n` + formatFanoutStats(stats));
        } catch (err) {
          const msg = fromGrpcError(err as Error, `router ${o.router}`).message;
          router = { address: o.router, error: msg };
          if (!o.json) process.stdout.write(formatStatus(all) + `router ${o.router}  DOWN  ${msg}\n`);
          process.exitCode = 1;
        }
        if (o.json) process.stdout.write(JSON.stringify({ replicas, router }, null, 2) + '\n');
      } else if (o.json) {
        process.stdout.write(JSON.stringify(all.map((s) => ({ group: s.conn.group, replica: s.conn.replica, address: s.conn.address, ...(s.status ? { status: s.status } : { error: s.error?.message }) })), null, 2) + '\n');
      } else {
        process.stdout.write(formatStatus(all));
      }
      const down = all.filter((s) => s.error).length;
      if (down > 0) {
        process.stderr.write(`kvctl: ${down} of ${all.length} replicas do not answer\n`);
        process.exitCode = 1;
      }
    } finally {
      conns.close();
      await source.close();
    }
  });

program
  .command('router')
  .description('run the gRPC router endpoint (Embkv.Lookup for any keys)')
  .option('--config <file>', CONFIG_HELP)
  .option('--etcd <endpoints>', ETCD_HELP)
  .option('--cluster <name>', CLUSTER_HELP)
  .requiredOption('--port <p>', 'port to listen on', intArg('--port', 0, 65535))
  .option('--host <h>', 'address to listen on', '127.0.0.1')
  .option('--stats-interval-ms <ms>', 'log per-group stats this often (0: never; kvctl status --router shows them any time)', intArg('--stats-interval-ms', 0, 86_400_000), 60_000)
  .option('--insecure', 'listen on a non-loopback host although the manifest has no security', false)
  .option('--max-inflight-mb <mb>', 'memory the calls in flight may hold together; calls beyond it are refused with KV_RESOURCE_EXHAUSTED', intArg('--max-inflight-mb', 1, 1_048_576), 1024)
  .option('--metrics-port <p>', METRICS_PORT_HELP, intArg('--metrics-port', 0, 65535))
  .option('--metrics-host <h>', METRICS_HOST_HELP, DEFAULT_METRICS_HOST)
  .action(async (o: SourceFlags & { port: number; host: string; statsIntervalMs: number; insecure: boolean; maxInflightMb: number } & MetricsFlags) => {
    const source = await openSource(o);
    const [{ RouterServer }, { rootLogger }] = await Promise.all([import('../router/server.js'), import('../common/log.js')]);
    const router = new RouterServer({
      manifest: source.manifest, source, host: o.host, port: o.port, logger: rootLogger('embkv'), statsIntervalMs: o.statsIntervalMs, insecure: o.insecure,
      maxInflightBytes: o.maxInflightMb * 1024 * 1024,
    });
    process.on('SIGHUP', () => {
      try {
        router.reloadTokens();
      } catch {
        // Logged by reloadTokens.
      }
    });
    const stop = untilSignal();
    const stopMetrics = await startMetrics(o, {}, (set) => router.registerMetrics(set));
    await router.start();
    process.stderr.write(`kvctl: router listening on ${o.host}:${router.port}\n`);
    await stop;
    await router.close();
    await stopMetrics();
    await source.close();
    // Closed: nothing else may hold the process.
    process.exit(0);
  });

program
  .command('demo')
  .description('start a local cluster, load a demo model, time 150k-key lookups, serve until Ctrl-C')
  .option('--config <file>', 'cluster manifest (written with the default if missing)', DEFAULT_CONFIG_PATH)
  .option('--data <dir>', 'data directory', 'data')
  .option('--keys <n>', 'keys in the demo model', intArg('--keys', 1000), 1_000_000)
  .option('--dim <n>', 'dimension', intArg('--dim', 1, 16384), 32)
  .option('--requests <n>', 'timed 150k-key requests', intArg('--requests', 1), 20)
  .option('--no-serve', 'stop after measuring instead of serving until Ctrl-C')
  .action(async (o: { config: string; data: string; keys: number; dim: number; requests: number; serve: boolean }) => {
    const manifest = manifestFrom(o.config, true);
    const { runDemo } = await import('./demo.js');
    await runDemo({ manifest, configPath: o.config, dataDir: o.data, keys: o.keys, dim: o.dim, requests: o.requests, serve: o.serve, untilSignal });
  });


program.parseAsync(process.argv).catch((err: unknown) => {
  const msg = err instanceof Error ? err.message : String(err);
  process.stderr.write(`kvctl: error: ${msg}\n`);
  process.exit(1);
});
