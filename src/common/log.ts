import { pino, type Logger } from 'pino';

/** The process logger: JSON lines on stderr so stdout stays for command output. */
export function rootLogger(name: string, level = process.env['EMBKV_LOG_LEVEL'] ?? 'info'): Logger {
  return pino({ name, level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}
