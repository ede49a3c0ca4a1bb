/**
 * Streaming, validating readers of the dump formats `kvctl load` reads (SPEC: "Files that kvctl load reads").
 *
 * planDump() lists the parts of a PATH and checks every header, file size and dim before a single row is
 * sent; readDump() then streams the rows in chunks of bounded size, checking values (NaN/Inf) and text
 * syntax as it goes. Every refusal is a KvError with code KV_INVALID_DATA whose message names the file and,
 * where there is one, the row (0-based for NumPy) or line (1-based for text).
 *
 * The files come through a DumpSource (dump-source.ts): local files, or S3-compatible object storage
 * (s3-source.ts, loaded only for an s3:// location).
 *
 * This file is the loader's dump surface; the work is in plan.ts, readers.ts, npy.ts and text.ts.
 */
export { MAX_LOAD_DIM, type LoadMode } from './dump-files.js';
export {
  DEFAULT_S3_BLOCK_BYTES, DEFAULT_S3_MAX_ATTEMPTS, DEFAULT_S3_READ_AHEAD, DEFAULT_S3_RETRY_BASE_MS, LOCAL_SOURCE, SUCCESS_MARKER,
  hasSuccessMarker, isHadoopMarker, isS3Url, listSubdirectories, parseS3Url,
  type DumpEntry, type DumpSource, type DumpStat, type RandomAccessReader, type S3SourceOptions,
} from './dump-source.js';
export { parseDumpSource } from './source-url.js';
export { readNpyHeader, type NpyHeader } from './npy.js';
export { planDump, type DumpPlan, type PartInfo, type PlanDumpOptions } from './plan.js';
export {
  DEFAULT_CHUNK_ROWS, MAX_CHUNK_BYTES, readDump, type DeleteChunk, type DumpItem, type ReadDumpOptions, type RowChunk,
} from './readers.js';
