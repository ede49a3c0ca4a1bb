import * as grpc from '@grpc/grpc-js';

/**
 * grpc-js options for 20 MB answers: grpc-js's 4 MiB default refuses them, and its default
 * flow-control window halves throughput (bench/RESULTS.md).
 */
export const MAX_MESSAGE_BYTES = 512 * 1024 * 1024;
/**
 * The largest request a server takes. Requests are small next to answers: a LoadRows batch is at
 * most 32 MiB, a router's Lookup of MAX_ROUTER_KEYS keys 32 MB, a 150k-key Lookup 1.2 MB. Anything
 * larger is refused by grpc-js with RESOURCE_EXHAUSTED before it is buffered whole, where 512 MiB
 * let a 64 MiB garbage request be taken in and go unanswered.
 */
export const MAX_REQUEST_BYTES = 48 * 1024 * 1024;
export const FLOW_CONTROL_WINDOW_BYTES = 16 * 1024 * 1024;
export const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW_BYTES,
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
  // Every replica address gets its own channel even when two share a host.
  'grpc.use_local_subchannel_pool': 1,
  // A restarted replica is reconnected within seconds, not after grpc-js's default 120 s backoff.
  'grpc.initial_reconnect_backoff_ms': 250,
  'grpc.max_reconnect_backoff_ms': 5000,
};
export const SERVER_OPTIONS: grpc.ServerOptions = {
  'grpc.max_receive_message_length': MAX_REQUEST_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc-node.flow_control_window': FLOW_CONTROL_WINDOW_BYTES,
};
