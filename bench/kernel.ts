// The lookup kernel alone, in one process: 150k random present keys from a 1M-key dim-32 version.
// `node dist/bench/kernel.js` prints the median of 15 runs for each kernel: a write version's
// (JavaScript, float32 copies) and a sealed one's (WebAssembly, src/shard/lookup-kernel.wat).
import { randomFillSync } from 'node:crypto';
import { VersionData } from '../src/shard/version-data.js';

const N = 1_000_000;
const DIM = 32;
const Q = 150_000;
const keys = new Uint32Array(2 * N);
randomFillSync(keys);
const values = new Float32Array(N * DIM);
for (let i = 0; i < values.length; i++) values[i] = i % 1000;
const v = new VersionData(DIM, N);
if (v.append(keys, values, N) >= 0) throw new Error('random keys collided; run again');
const q = new Uint32Array(2 * Q);
for (let i = 0; i < Q; i++) {
  const r = Math.floor(Math.random() * N);
  q[2 * i] = keys[2 * r]!;
  q[2 * i + 1] = keys[2 * r + 1]!;
}

function median(label: string): void {
  const times: number[] = [];
  for (let k = 0; k < 15; k++) {
    const out = new Float32Array(Q * DIM);
    const found = new Uint8Array(Q);
    const t = performance.now();
    v.lookup(q, Q, out, found);
    times.push(performance.now() - t);
  }
  times.sort((a, b) => a - b);
  console.log(`${label}: ${times[7]!.toFixed(1)} ms per 150k keys`);
}

median('write version (float32 copies)');
v.seal();
median(`sealed version (${v.kernel === 'wasm' ? 'WebAssembly' : 'JavaScript, float64 pairs'})`);
