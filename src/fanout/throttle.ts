/**
 * The hedge budget of one shard group, after grpc-js's RetryThrottler: a bucket of `maxTokens` that
 * starts full; every answered sub-request adds `tokenRatio`, every hedge and every failed attempt takes
 * 1, and hedges are sent only while more than half the bucket is left. When a whole group is slow, every
 * sub-request would want a hedge: the bucket drains to half after maxTokens/2 hedges and then allows
 * about one hedge per 1/tokenRatio answers, so hedging cannot double the load.
 */
export class HedgeThrottle {
  private tokens: number;

  constructor(readonly maxTokens: number, readonly tokenRatio: number) {
    this.tokens = maxTokens;
  }

  get level(): number {
    return this.tokens;
  }

  canHedge(): boolean {
    return this.tokens > this.maxTokens / 2;
  }

  onAnswer(): void {
    this.tokens = Math.min(this.tokens + this.tokenRatio, this.maxTokens);
  }

  /** A hedge sent or an attempt failed. */
  onCost(): void {
    this.tokens = Math.max(this.tokens - 1, 0);
  }
}
