import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { KvError, invalidArgument } from '../common/errors.js';
import type { AnswerBufferPool } from '../transport/answer-pool.js';
import { decodeLoadRowsRequest, encodeLoadRowsRequest, type LoadRowsRequest } from './load-rows.js';
import { decodeLookupRequest, decodeLookupResponse, encodeLookupRequest, type LookupRequest, type LookupResponse } from './lookup.js';
import { checkVarintFields } from './protobuf.js';

export const PROTO_PATH = fileURLToPath(new URL('../../../proto/embkv.proto', import.meta.url));

/**
 * What a server's request deserializer hands on for a message it cannot decode. grpc-js answers a
 * deserializer that throws with INTERNAL "Error deserializing request", which tells the caller
 * nothing; the handler throws this error instead (see decoded), so the caller gets
 * INVALID_ARGUMENT with the decoder's reason.
 */
export class UndecodableRequest {
  constructor(readonly error: KvError) {}
}

/** A server handler's request, or the decoder's refusal of it thrown. Every handler calls it first. */
export function decoded<T>(request: T | UndecodableRequest): T {
  if (request instanceof UndecodableRequest) throw request.error;
  return request;
}

/** `decode` with its failure handed on as an UndecodableRequest instead of thrown to grpc-js. */
function tolerant<T>(decode: (b: Buffer) => T, method: string): (b: Buffer) => T | UndecodableRequest {
  return (b) => {
    try {
      return decode(b);
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      return new UndecodableRequest(err instanceof KvError ? err : invalidArgument(`malformed ${method} request: ${reason}`, { cause: err }));
    }
  };
}

const identity = (b: Buffer): Buffer => b;

/** The Embkv service with hand codecs: the server receives decoded requests and sends prebuilt buffers. */
export const EMBKV_SERVER_SERVICE = {
  lookup: {
    path: '/embkv.v1.Embkv/Lookup',
    requestStream: false,
    responseStream: false,
    requestSerialize: encodeLookupRequest,
    requestDeserialize: tolerant(decodeLookupRequest, 'Lookup'),
    responseSerialize: identity,
    responseDeserialize: identity,
    originalName: 'Lookup',
  },
} satisfies grpc.ServiceDefinition;

export const EMBKV_CLIENT_SERVICE = {
  lookup: {
    path: '/embkv.v1.Embkv/Lookup',
    requestStream: false,
    responseStream: false,
    requestSerialize: encodeLookupRequest,
    requestDeserialize: (b: Buffer): LookupRequest => decodeLookupRequest(b),
    responseSerialize: identity,
    responseDeserialize: (b: Buffer): LookupResponse => decodeLookupResponse(b),
    originalName: 'Lookup',
  },
} satisfies grpc.ServiceDefinition;

let controlPackage: grpc.GrpcObject | undefined;
/**
 * The control package, parsed from the .proto on first use. proto-loader (and protobufjs under it) is
 * loaded only then: an SDK process that only looks up never loads it, and its heap, which every
 * mark-compact walks, stays ~2 MB smaller.
 */
function protoPackage(): grpc.GrpcObject {
  if (controlPackage === undefined) {
    const protoLoader = createRequire(import.meta.url)('@grpc/proto-loader') as typeof import('@grpc/proto-loader');
    controlPackage = grpc.loadPackageDefinition(
      protoLoader.loadSync(PROTO_PATH, { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true }),
    );
  }
  return controlPackage;
}

let controlService: grpc.ServiceDefinition | undefined;

/** Field numbers to names of a proto-loader method's request (its descriptor rides along). */
function fieldNames(method: object): Map<number, string> {
  const fields = (method as { requestType?: { type?: { field?: { name: string; number: number }[] } } }).requestType?.type?.field ?? [];
  return new Map(fields.map((f) => [f.number, f.name]));
}
let controlClient: grpc.ServiceClientConstructor | undefined;

/**
 * The ShardControl service definition: control messages through proto-loader, except LoadRows, whose
 * megabytes of rows go through the hand codec above (views on receipt; a LoadRowsMessage is sent as is).
 */
export function shardControlService(): grpc.ServiceDefinition {
  if (controlService === undefined) {
    const v1 = (protoPackage()['embkv'] as grpc.GrpcObject)['v1'] as grpc.GrpcObject;
    const generated = (v1['ShardControl'] as grpc.ServiceClientConstructor).service;
    const methods: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
    // Integer fields are checked before protobufjs rounds them, and a refusal reaches the handler.
    for (const [name, m] of Object.entries(generated)) {
      const names = fieldNames(m);
      const deserialize = m.requestDeserialize;
      methods[name] = {
        ...m,
        requestDeserialize: tolerant((b: Buffer): unknown => {
          checkVarintFields(b, names);
          return deserialize(b);
        }, name),
      };
    }
    methods['LoadRows'] = {
      ...generated['LoadRows']!,
      requestSerialize: (r: Buffer | Partial<LoadRowsRequest>): Buffer => (Buffer.isBuffer(r) ? r : encodeLoadRowsRequest(r)),
      requestDeserialize: tolerant(decodeLoadRowsRequest, 'LoadRows'),
    } as grpc.MethodDefinition<unknown, unknown>;
    controlService = methods;
  }
  return controlService;
}

export function shardControlClientConstructor(): grpc.ServiceClientConstructor {
  controlClient ??= grpc.makeGenericClientConstructor(shardControlService(), 'ShardControl');
  return controlClient;
}

export const EmbkvClient = grpc.makeGenericClientConstructor(EMBKV_CLIENT_SERVICE, 'Embkv');

/** The server side of Embkv with answers from `pool` returned to it once framed. */
export function embkvServerService(pool: AnswerBufferPool): grpc.ServiceDefinition {
  return { lookup: { ...EMBKV_SERVER_SERVICE.lookup, responseSerialize: pool.onSerialize } };
}
