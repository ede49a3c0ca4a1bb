/**
 * A real S3 server for tests and the bench: s3rver on 127.0.0.1 (a free port), in a process of its own
 * (s3rver-main.ts), storing under a directory the caller owns, with one bucket. Objects are written
 * with the AWS SDK, as a job would.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { DeleteObjectCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';

const MAIN = fileURLToPath(new URL('./s3rver-main.js', import.meta.url));

/** The credentials s3rver accepts. */
export const S3RVER_CREDENTIALS = { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' };
/** The environment a kvctl process needs to reach it (credentials and region from the standard chain). */
export const S3RVER_ENV = {
  AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_REGION: 'us-east-1',
  AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true',
};

export class TestS3 {
  private proc: ChildProcess | undefined;
  readonly client: S3Client;

  private constructor(readonly dir: string, readonly bucket: string, readonly port: number, proc: ChildProcess) {
    this.proc = proc;
    this.client = new S3Client({ endpoint: this.endpoint, forcePathStyle: true, region: 'us-east-1', credentials: S3RVER_CREDENTIALS });
  }

  static async start(dir: string, bucket = 'dumps', port = 0): Promise<TestS3> {
    process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';
    const proc = spawn(process.execPath, ['--openssl-legacy-provider', MAIN, dir, bucket, String(port)], { stdio: ['pipe', 'pipe', 'inherit'] });
    const line = await new Promise<string>((resolve, reject) => {
      const rl = createInterface({ input: proc.stdout! });
      rl.once('line', (l) => {
        rl.close();
        resolve(l);
      });
      proc.once('exit', (code) => reject(new Error(`s3rver exited (${code}) before it listened`)));
    });
    return new TestS3(dir, bucket, (JSON.parse(line) as { port: number }).port, proc);
  }

  /** The server's process id while it runs (the bench reads its CPU time). */
  get pid(): number | undefined {
    return this.proc?.pid;
  }

  get endpoint(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  url(key: string): string {
    return `s3://${this.bucket}/${key}`;
  }

  async put(key: string, body: Uint8Array | string): Promise<void> {
    await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: body, ContentLength: typeof body === 'string' ? Buffer.byteLength(body) : body.byteLength }));
  }

  async remove(key: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
  }

  /** Uploads every file of a local directory under `prefix` (which ends in '/'), a few at a time. */
  async putDir(local: string, prefix: string): Promise<void> {
    const names = readdirSync(local).filter((n) => statSync(join(local, n)).isFile());
    for (let i = 0; i < names.length; i += 16) {
      await Promise.all(names.slice(i, i + 16).map((n) => this.put(prefix + n, readFileSync(join(local, n)))));
    }
  }

  /** Stops the server at once (SIGKILL): connections in use are cut, as when the storage goes away. */
  async stop(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = this.proc;
    this.proc = undefined;
    if (p === undefined || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((resolve) => p.once('exit', resolve));
    p.kill(signal);
    await exited;
  }

  async close(): Promise<void> {
    await this.stop('SIGTERM');
    this.client.destroy();
  }
}
