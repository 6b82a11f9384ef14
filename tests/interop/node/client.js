'use strict';
// A real SOFARPC Bolt client for fastmesh interop tests (no registry: direct serverHost).
//
//   node client.js --host 127.0.0.1:12200 --calls '[{"method":"echo","args":["hello"]}]'
//                  [--timeout 3000] [--codec hessian2|protobuf] [--bolt2 [--crc]]
//   node client.js --host 127.0.0.1:12200 --concurrent 8 --count 1000 [--payload-bytes 64]
//
// Calls mode prints one JSON line per call: {"ok":true,"result":...} or
// {"ok":false,"error":"...","name":"..."}. Concurrent mode runs --count echo calls with
// --concurrent in flight, each with a unique payload, checks every answer equals its
// request, and prints one JSON summary line. --host may list several servers, comma
// separated (round robin). Exit code 0 unless the arguments are bad.

const path = require('path');
const antpb = require('antpb');
const bolt = require('sofa-bolt-node');
const { RpcClient } = require('sofa-rpc-node').client;

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) continue;
    const key = a.slice(2);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) {
      out[key] = true;
    } else {
      out[key] = next;
      i++;
    }
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
const hostList = String(args.host || process.env.BOLT_HOST || '127.0.0.1:12200');
const timeoutMs = Number(args.timeout || 3000);
const codecType = args.codec === 'protobuf' ? 'protobuf' : 'hessian2';
const interfaceName = String(args.service || 'com.example.EchoService');
const version = String(args.version || '1.0');

const noop = () => {};
const logger = {
  debug: noop,
  info: noop,
  warn: (...a) => { if (args.verbose) process.stderr.write(a.map(String).join(' ') + '\n'); },
  error: (...a) => process.stderr.write(a.map(String).join(' ') + '\n'),
};

// sofa-bolt-node with our encoder settings: serialization, Bolt v2, CRC
const protocol = Object.create(bolt);
protocol.encoder = opts => {
  const enc = bolt.encoder(opts);
  enc.codecType = codecType;
  if (args.bolt2) {
    enc.protocolType = 'bolt2';
    enc.boltVersion = args.crc ? 2 : 1;   // SOFABolt: a CRC trailer needs ver1 2 + switch bit
    enc.crcEnable = !!args.crc;
  }
  return enc;
};

const proto = antpb.loadAll(path.join(__dirname, 'proto'));

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function plain(result) {
  if (result && typeof result === 'object' && typeof result.toObject === 'function') {
    return result.toObject({ defaults: true });
  }
  return result === undefined ? null : result;
}

function errorInfo(err) {
  return { ok: false, error: String(err && err.message || err), name: err && err.name || 'Error' };
}

function argsFor(method, callArgs) {
  if (codecType === 'protobuf' && method === 'echo') {
    return [{ message: String(callArgs[0]) }];
  }
  return callArgs;
}

async function runCalls(consumer, calls) {
  for (const call of calls) {
    const method = call.method;
    const callArgs = argsFor(method, call.args || []);
    const t0 = Date.now();
    try {
      const result = await consumer.invoke(method, callArgs, {
        responseTimeout: Number(call.timeout || timeoutMs),
        codecType,
      });
      emit({ ok: true, result: plain(result), ms: Date.now() - t0 });
    } catch (err) {
      emit(Object.assign(errorInfo(err), { ms: Date.now() - t0 }));
    }
  }
}

async function runConcurrent(consumer, inflight, count, payloadBytes) {
  let next = 0;
  let ok = 0;
  let mismatch = 0;
  let errors = 0;
  const samples = [];
  const pad = 'x'.repeat(Math.max(0, payloadBytes));
  const t0 = Date.now();
  async function worker() {
    while (next < count) {
      const i = next++;
      const payload = 'p' + i + '-' + process.pid + '-' + Math.random().toString(36).slice(2) + pad;
      try {
        let result = await consumer.invoke('echo', argsFor('echo', [ payload ]), {
          responseTimeout: timeoutMs,
          codecType,
        });
        result = plain(result);
        const got = codecType === 'protobuf' ? result && result.message : result;
        if (got === payload) {
          ok++;
        } else {
          mismatch++;
          if (samples.length < 5) samples.push({ sent: payload.slice(0, 40), got: String(got).slice(0, 40) });
        }
      } catch (err) {
        errors++;
        if (samples.length < 5) samples.push(errorInfo(err));
      }
    }
  }
  const workers = [];
  for (let w = 0; w < inflight; w++) workers.push(worker());
  await Promise.all(workers);
  emit({ mode: 'concurrent', count, inflight, ok, mismatch, errors, elapsed_ms: Date.now() - t0, samples });
}

async function main() {
  const client = new RpcClient({
    logger,
    protocol,
    connectionOpts: { protocol, proto, noDelay: true, connectTimeout: Math.min(timeoutMs, 3000) },
  });
  const consumer = client.createConsumer({ interfaceName, version, serverHost: hostList, proto });
  client.on('error', err => logger.warn('[client] ' + err.message));
  try {
    await consumer.ready();
    if (args.concurrent || args.count) {
      await runConcurrent(consumer, Number(args.concurrent || 1), Number(args.count || 100),
        Number(args['payload-bytes'] || 0));
    } else {
      let calls;
      try {
        calls = JSON.parse(args.calls || '[]');
      } catch (err) {
        process.stderr.write('--calls is not JSON: ' + err.message + '\n');
        process.exit(2);
      }
      await runCalls(consumer, calls);
    }
  } catch (err) {
    emit(errorInfo(err));
  }
  // do not wait for keepalive timers or the graceful close of pooled connections
  const t = setTimeout(() => process.exit(0), 500);
  t.unref();
  client.close().then(() => process.exit(0), () => process.exit(0));
}

main();
