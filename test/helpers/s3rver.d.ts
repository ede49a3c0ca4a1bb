// s3rver ships no types; s3rver-main.ts uses this much of it.
declare module 's3rver' {
  interface S3rverOptions {
    address?: string;
    port?: number;
    silent?: boolean;
    directory?: string;
    configureBuckets?: { name: string }[];
    /** Host names BUCKET.s3.<serviceEndpoint> are virtual-host requests for BUCKET. */
    serviceEndpoint?: string;
  }
  export default class S3rver {
    constructor(options: S3rverOptions);
    run(): Promise<{ address: string; port: number }>;
    close(): Promise<void>;
  }
}
