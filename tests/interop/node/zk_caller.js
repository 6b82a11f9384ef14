'use strict';
// A SOFARPC client that keeps calling whoami() through fastmesh until told to stop, for
// fastmesh's registry tests (which provider answers, and how many calls fail).
//
//   node zk_caller.js --host 127.0.0.1:PORT [--version 1.0] [--concurrent 2]
//                     [--interval-ms 5] [--timeout 3000]
//
// Prints a JSON line every 200 ms: {"t": ms since start, "ok": {"<provider id>": n}, "fail": n,
// "errors": [first few]} for the calls finished in that window; on stop (SIGTERM or stdin
// closed) the calls in flight finish and a last line {"done": true, "ok": {...}, "fail": n}
// gives the totals.

const bolt = require('sofa-bolt-node');
const { RpcClient } = require('sofa-rpc-node').client;

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) continue;
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) {
      out[a.slice(2)] = true;
    } else {
      out[a.slice(2)] = next;
      i++;
    }
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
const host = String(args.host);
const version = String(args.version || '1.0');
const concurrent = Number(args.concurrent || 2);
const intervalMs = Number(args['interval-ms'] || 5);
const timeoutMs = Number(args.timeout || 3000);
const noop = () => {};
const logger = { debug: noop, info: noop, warn: noop,
  error: (...a) => process.stderr.write(a.map(String).join(' ') + '\n') };

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const t0 = Date.now();
let win = { ok: {}, fail: 0, errors: [] };
const total = { ok: {}, fail: 0, errors: [] };
let stopping = false;

function record(okId, err) {
  for (const acc of [ win, total ]) {
    if (err) {
      acc.fail++;
      if (acc.errors.length < 5) acc.errors.push(String(err && err.message || err).slice(0, 200));
    } else {
      acc.ok[okId] = (acc.ok[okId] || 0) + 1;
    }
  }
}

async function main() {
  const client = new RpcClient({ logger, protocol: bolt,
    connectionOpts: { protocol: bolt, noDelay: true, connectTimeout: 3000 } });
  const consumer = client.createConsumer({ interfaceName: 'com.example.EchoService', version,
    serverHost: host });
  await consumer.ready();
  const timer = setInterval(() => {
    process.stdout.write(JSON.stringify(Object.assign({ t: Date.now() - t0 }, win)) + '\n');
    win = { ok: {}, fail: 0, errors: [] };
  }, 200);
  async function worker() {
    while (!stopping) {
      try {
        const who = await consumer.invoke('whoami', [], { responseTimeout: timeoutMs });
        record(String(who), null);
      } catch (err) {
        record(null, err);
      }
      if (intervalMs > 0) await sleep(intervalMs);
    }
  }
  process.stdout.write(JSON.stringify({ started: true }) + '\n');
  await Promise.all(Array.from({ length: concurrent }, worker));
  clearInterval(timer);
  process.stdout.write(JSON.stringify(Object.assign({ t: Date.now() - t0 }, win)) + '\n');
  process.stdout.write(JSON.stringify(Object.assign({ done: true }, total)) + '\n');
  const t = setTimeout(() => process.exit(0), 500);
  t.unref();
  client.close().then(() => process.exit(0), () => process.exit(0));
}

function stop() { stopping = true; }
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.resume();

main().catch(err => {
  process.stdout.write(JSON.stringify({ done: true, fatal: String(err && err.message) }) + '\n');
  process.exit(1);
});
