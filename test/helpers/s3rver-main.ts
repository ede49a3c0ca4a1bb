/**
 * s3rver as a process of its own: `node --openssl-legacy-provider s3rver-main.js DIR BUCKET PORT`.
 * It needs the legacy provider (its list continuation tokens are DES-encrypted, which OpenSSL 3 keeps
 * there), and a process of its own also lets a test stop the storage abruptly, with a kill.
 * Prints {"port": P} once it listens; SIGTERM closes it.
 */
import S3rver from 's3rver';

const [dir, bucket, port] = process.argv.slice(2);
// `node --test dist/test/` runs every file under test/, this one too: without arguments it is no server.
if (dir === undefined || bucket === undefined) process.exit(0);
const server = new S3rver({ address: '127.0.0.1', port: Number(port ?? 0), silent: !process.env['S3RVER_LOG'], directory: dir, configureBuckets: [{ name: bucket }],
  // BUCKET.s3.localhost is then a virtual-host request for BUCKET (the tests resolve *.localhost to loopback).
  serviceEndpoint: 'localhost' });
const addr = await server.run();
process.stdout.write(`${JSON.stringify({ port: addr.port })}\n`);
process.once('SIGTERM', () => {
  void server.close().finally(() => process.exit(0));
});
// The parent died: nothing is left to serve.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
