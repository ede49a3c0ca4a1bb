/**
 * A fault-injecting HTTP proxy in front of the real S3 server (TestS3): every request is recorded and
 * forwarded as it came (method, path, headers: the Host header too, which SigV4 signs), unless the
 * test's rule answers it with a fault instead:
 *
 *   client --> S3Proxy (127.0.0.1:P) --rule?--> fault: 503 SlowDown | 500 InternalError | reset | cut body
 *                                     \-------> s3rver (127.0.0.1:Q), the answer streamed back
 *
 * The retry logic of the S3 source is what is under test; s3rver stays the real server.
 */
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

/** What the proxy does with one request instead of forwarding it. */
export type S3Fault =
  | { kind: 'status'; status: number; code: string }
  /** The connection is destroyed before any answer. */
  | { kind: 'reset' }
  /** The real answer's headers and its first half, then the connection is destroyed. */
  | { kind: 'cut' };

export const SLOW_DOWN: S3Fault = { kind: 'status', status: 503, code: 'SlowDown' };
export const INTERNAL_ERROR: S3Fault = { kind: 'status', status: 500, code: 'InternalError' };
export const RESET: S3Fault = { kind: 'reset' };
export const CUT: S3Fault = { kind: 'cut' };

/** One request as the proxy saw it. */
export interface ProxiedRequest {
  method: string;
  /** The Host header: `127.0.0.1:P` (path style) or `BUCKET.s3.localhost:P` (virtual host). */
  host: string;
  /** The path and query as sent. */
  url: string;
  /** The path without the query, decoded. */
  path: string;
  range?: string;
  /** The fault answered, if any. */
  fault?: S3Fault['kind'];
}

export class S3Proxy {
  readonly requests: ProxiedRequest[] = [];
  /** Decides each request's fault (undefined: forwarded). Set by the test. */
  rule: (r: ProxiedRequest) => S3Fault | undefined = () => undefined;
  private readonly sockets = new Set<Socket>();

  private constructor(private readonly server: Server, private readonly upstreamPort: number) {}

  static async start(upstreamPort: number): Promise<S3Proxy> {
    const server = createServer();
    const proxy = new S3Proxy(server, upstreamPort);
    server.on('request', (req, res) => proxy.handle(req, res));
    server.on('connection', (s) => {
      proxy.sockets.add(s);
      s.once('close', () => proxy.sockets.delete(s));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  /** Path-style endpoint through the proxy. */
  get endpoint(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The requests (not faults) whose path is `/BUCKET/KEY` or, virtual-host style, `/KEY`, by method. */
  count(method: string, pathEnd: string): number {
    return this.requests.filter((r) => r.method === method && r.path.endsWith(pathEnd)).length;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = req.url ?? '/';
    const r: ProxiedRequest = {
      method: req.method ?? 'GET', host: req.headers.host ?? '', url, path: decodeURIComponent(url.split('?')[0]!),
      ...(typeof req.headers.range === 'string' ? { range: req.headers.range } : {}),
    };
    const fault = this.rule(r);
    if (fault !== undefined) r.fault = fault.kind;
    this.requests.push(r);
    if (fault?.kind === 'reset') {
      req.socket.destroy();
      return;
    }
    if (fault?.kind === 'status') {
      req.resume();
      const body = `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${fault.code}</Code><Message>injected by the test proxy</Message></Error>`;
      res.writeHead(fault.status, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    const up = request({ host: '127.0.0.1', port: this.upstreamPort, method: req.method, path: url, headers: req.headers }, (ures) => {
      res.writeHead(ures.statusCode ?? 502, ures.headers);
      if (fault?.kind !== 'cut') {
        ures.pipe(res);
        return;
      }
      // Half the body, then the connection goes away.
      const half = Math.floor(Number(ures.headers['content-length'] ?? 0) / 2);
      let sent = 0;
      ures.on('data', (c: Buffer) => {
        if (sent >= half) return;
        const part = c.subarray(0, half - sent);
        sent += part.length;
        res.write(part);
        if (sent >= half) {
          ures.destroy();
          res.socket?.destroy();
        }
      });
    });
    up.on('error', () => res.socket?.destroy());
    req.pipe(up);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
