import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { streamOf } from '../transport/grpc-patches.js';

/** The longest a stop waits for calls in flight: each is waited for up to its own deadline, at most this. */
export const DEFAULT_DRAIN_MS = 10_000;
/** A stop waits this long past the last deadline of the calls in flight. */
const DEADLINE_MARGIN_MS = 250;
/** How long a stop waits for answers to leave when grpc-js does not show a call's stream. */
const UNTRACKED_FLUSH_MS = 500;

/**
 * The calls a replica has admitted and not yet answered, so that a stop waits for them: a call
 * counts until its HTTP/2 stream closes, that is until its answer has left, so a stop cuts no answer
 * half-sent.
 */
export class CallsInFlight {
  /** Calls admitted and not yet answered, with their deadlines (ms since the epoch; Infinity for none). */
  private readonly calls = new Map<object, number>();
  private drained: (() => void) | undefined;
  /** Set when a call's stream could not be watched: a stop then gives answers a moment to leave. */
  private untrackedSeen = false;

  /** Whether some call's stream could not be watched: its handler ends it with `finished`. */
  get untracked(): boolean {
    return this.untrackedSeen;
  }

  add(call: grpc.ServerUnaryCall<unknown, unknown>): void {
    const d = call.getDeadline();
    const at = d instanceof Date ? d.getTime() : d;
    this.calls.set(call, Number.isFinite(at) && at > 0 ? at : Infinity);
    const stream = streamOf(call);
    if (stream !== undefined) stream.once('close', () => this.finished(call));
    else this.untrackedSeen = true;
  }

  /** A call's answer has left (or, where grpc-js hides its stream, has been handed to grpc-js). */
  finished(call: object): void {
    if (!this.calls.delete(call)) return;
    if (this.calls.size === 0) this.drained?.();
  }

  /**
   * Waits for the calls in flight, each up to its deadline and all within `drainMs`; returns how
   * many there were and how many were still in flight at the end.
   */
  async drain(drainMs: number, log: Logger): Promise<{ waiting: number; forced: number }> {
    const waiting = this.calls.size;
    let forced = 0;
    if (waiting > 0) {
      // A little past the last deadline, so that a call ends by its own deadline (DEADLINE_EXCEEDED
      // to its caller) rather than by the stop.
      const latest = Math.min(Date.now() + drainMs, Math.max(...this.calls.values()) + DEADLINE_MARGIN_MS);
      log.info({ calls: waiting, waitMs: Math.max(0, latest - Date.now()) }, 'draining calls in flight');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(0, latest - Date.now()));
        this.drained = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.drained = undefined;
      forced = this.calls.size;
    }
    if (this.untrackedSeen) await new Promise<void>((resolve) => setTimeout(resolve, UNTRACKED_FLUSH_MS).unref());
    return { waiting, forced };
  }
}
