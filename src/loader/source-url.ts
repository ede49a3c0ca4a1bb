/**
 * A dump location to its DumpSource: local files for a path, S3 for `s3://bucket/...`, whose module
 * (and the AWS SDK) is imported at the first request, so local loads never load the SDK.
 */
import { invalidArgument } from '../common/errors.js';
import {
  LOCAL_SOURCE, isS3Url, parseS3Url, s3Basename, s3Dirname, s3Join,
  type DumpEntry, type DumpSource, type DumpStat, type RandomAccessReader, type S3SourceOptions,
} from './dump-source.js';

/**
 * The source of a location: S3 for `s3://bucket/...` (the SDK is loaded at the first request), local
 * files otherwise. Close it when done.
 */
export function parseDumpSource(url: string, s3: S3SourceOptions = {}): DumpSource {
  if (typeof url !== 'string' || url.length === 0) throw invalidArgument('the dump location must be a non-empty string');
  if (!isS3Url(url)) return LOCAL_SOURCE;
  parseS3Url(url);
  return new LazyS3Source(s3);
}

/** Delegates to S3DumpSource, importing it (and the AWS SDK) at the first call: local loads never load the SDK. */
class LazyS3Source implements DumpSource {
  readonly kind = 's3' as const;
  private impl: Promise<DumpSource> | undefined;
  private loaded: DumpSource | undefined;
  private closed = false;

  constructor(private readonly options: S3SourceOptions) {}

  private get(): Promise<DumpSource> {
    this.impl ??= import('./s3-source.js').then(({ S3DumpSource }) => {
      this.loaded = new S3DumpSource(this.options);
      if (this.closed) this.loaded.close();
      return this.loaded;
    });
    return this.impl;
  }

  async stat(loc: string): Promise<DumpStat | undefined> {
    return (await this.get()).stat(loc);
  }

  async list(loc: string): Promise<DumpEntry[]> {
    return (await this.get()).list(loc);
  }

  async open(loc: string): Promise<RandomAccessReader> {
    return (await this.get()).open(loc);
  }

  join(dir: string, name: string): string {
    return s3Join(dir, name);
  }

  dirname(loc: string): string {
    return s3Dirname(loc);
  }

  basename(loc: string): string {
    return s3Basename(loc);
  }

  close(): void {
    this.closed = true;
    this.loaded?.close();
  }
}
