/**
 * Preloaded into a kvctl process by a bench (`node --import dist/bench/cpu-report.js kvctl.js ...`):
 * as the process exits, writes its CPU time and peak rss to stderr as one line,
 * `cpu-report {"cpuMs":..,"maxRssMb":..}`, for the bench to read.
 */
process.once('exit', () => {
  const u = process.resourceUsage();
  process.stderr.write(`cpu-report ${JSON.stringify({ cpuMs: Math.round((u.userCPUTime + u.systemCPUTime) / 1000), maxRssMb: Math.round(u.maxRSS / 1024) })}\n`);
});
export {};
