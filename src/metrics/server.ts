import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { KvError, KvErrorCode, invalidArgument } from '../common/errors.js';
import type { Registry } from './registry.js';

/**
 * All interfaces: Prometheus scrapes a pod or a host from elsewhere, and the endpoint is opened only
 * when a metrics port is given. It has no TLS and no tokens (it tells table names, versions, key
 * counts, replica addresses, never a vector): give `host` 127.0.0.1 where only local agents scrape.
 */
export const DEFAULT_METRICS_HOST = '0.0.0.0';
export const METRICS_PATH = '/metrics';

export interface MetricsServerOptions {
  registry: Registry;
  /** 0 takes a free port (see `port` once started). */
  port: number;
  host?: string;
  logger?: Logger;
}

/**
 * Serves `GET /metrics` of one registry over HTTP, for `kvctl serve`, `router`, `watch` and `ingest`
 * (and for an SDK user without an HTTP server of their own). Anything else is 404 or 405.
 */
export class MetricsServer {
  private state: 'new' | 'open' | 'closed' = 'new';
  private readonly http: Server;
  private boundPort = 0;
  private readonly host: string;

  constructor(private readonly options: MetricsServerOptions) {
    if (!Number.isInteger(options.port) || options.port < 0 || options.port > 65535) throw invalidArgument(`metrics port must be an integer in [0, 65535], got ${options.port}`);
    this.host = options.host ?? DEFAULT_METRICS_HOST;
    this.http = createServer((req, res) => {
      const path = (req.url ?? '').split('?')[0];
      if (path !== METRICS_PATH) {
        res.writeHead(404, { 'content-type': 'text/plain' }).end(`not found: metrics are at ${METRICS_PATH}\n`);
        return;
      }
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
        return;
      }
      options.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': options.registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
        (err: unknown) => {
          options.logger?.warn({ err }, 'metrics scrape failed');
          res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(err as Error).message}\n`);
        },
      );
    });
    // A scraper that holds its connection open must not keep a stopping process alive.
    this.http.keepAliveTimeout = 5000;
  }

  get port(): number {
    return this.boundPort;
  }

  /** Listens; rejects with KV_UNAVAILABLE naming the address when it cannot (a port in use, say). */
  async start(): Promise<void> {
    if (this.state !== 'new') throw new KvError(KvErrorCode.CLOSED, `metrics server is ${this.state}`);
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => reject(new KvError(KvErrorCode.UNAVAILABLE, `metrics endpoint ${this.host}:${this.options.port}: ${err.message}`, { cause: err }));
      this.http.once('error', onError);
      this.http.listen(this.options.port, this.host, () => {
        this.http.off('error', onError);
        resolve();
      });
    });
    this.state = 'open';
    this.boundPort = (this.http.address() as AddressInfo).port;
    this.options.logger?.info({ host: this.host, port: this.boundPort, path: METRICS_PATH }, 'metrics serving');
  }

  /** Stops listening and closes open connections; idempotent. */
  async close(): Promise<void> {
    if (this.state === 'closed') return;
    const wasOpen = this.state === 'open';
    this.state = 'closed';
    if (!wasOpen) return;
    await new Promise<void>((resolve) => {
      this.http.close(() => resolve());
      this.http.closeAllConnections();
    });
  }
}
