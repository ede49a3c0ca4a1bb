/**
 * A client host for the multi-host test: an SDK client over etcd that looks up keys 1..KEYS in a loop
 * and prints its counters as one JSON line every 100 ms (the test polls the last line). Each answer
 * is checked to come from one version: row k of version v holds v * 1000 + k.
 * usage: node lookup-loop.js ENDPOINT CLUSTER KEYS DIM
 */
import { EmbeddingClient } from '../../src/index.js';

const [endpoint, cluster, keysArg, dimArg] = process.argv.slice(2);
// `node --test dist/test/` runs every file under test/, this one too: without arguments it is no client.
if (endpoint === undefined || cluster === undefined || keysArg === undefined || dimArg === undefined) process.exit(0);
const KEYS = Number(keysArg);
const DIM = Number(dimArg);
const keys = Array.from({ length: KEYS }, (_, i) => BigInt(i + 1));
const client = new EmbeddingClient({ etcd: { endpoints: [endpoint!], cluster: cluster! } });
const state = { ok: 0, failed: 0, mixed: 0, versions: {} as Record<number, number>, lastError: '', addresses: [] as string[], hedgesSent: 0, hedgesWon: 0 };
let stop = false;
process.on('SIGTERM', () => (stop = true));

const report = setInterval(() => {
  const s = client.stats();
  state.addresses = s.groups.flatMap((g) => g.replicas.map((r) => r.address));
  state.hedgesSent = s.groups.reduce((a, g) => a + g.hedgesSent, 0);
  state.hedgesWon = s.groups.reduce((a, g) => a + g.hedgesWon, 0);
  process.stdout.write(JSON.stringify(state) + '\n');
}, 100);

while (!stop) {
  try {
    const r = await client.getEmbeddings(keys, { table: 'emb' });
    let v = 0;
    let mixed = false;
    for (let i = 0; i < KEYS; i++) {
      const rv = r.found[i] ? (r.values[i * DIM]! - (i + 1)) / 1000 : -1;
      if (i === 0) v = rv;
      else if (rv !== v) mixed = true;
    }
    if (mixed) state.mixed++;
    else {
      state.ok++;
      state.versions[v] = (state.versions[v] ?? 0) + 1;
    }
  } catch (err) {
    state.failed++;
    state.lastError = (err as Error).message;
    // A failure is counted once; do not spin on it.
    await new Promise((r) => setTimeout(r, 50));
  }
}
clearInterval(report);
await client.close();
process.exit(0);
