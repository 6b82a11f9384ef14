'use strict';
// A real SOFARPC Bolt server for fastmesh interop tests (no registry).
//
//   node server.js --port 12200 --id s1 [--host 127.0.0.1]
//
// Serves com.example.EchoService:1.0 over hessian2 and protobuf (proto/echo.proto):
//   echo(s) -> s (protobuf: EchoRequest{message} -> EchoResponse{code: 200, message})
//   boom()  -> throws Error('boom')
//   slow(ms) -> sleeps ms, then 'slow-done'
//   whoami() -> the --id given here
// Prints "READY <port>" on stdout once listening (port 0 picks a free one); logs go to stderr.
// Exits on SIGTERM/SIGINT, or when stdin closes if --exit-on-stdin-close is given.

const net = require('net');
const path = require('path');
const antpb = require('antpb');
const { RpcServer } = require('sofa-rpc-node').server;

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
const port = Number(args.port !== undefined ? args.port : (process.env.PORT || 0));
const host = args.host || process.env.HOST || '127.0.0.1';
const serverId = String(args.id || process.env.SERVER_ID || 'server-' + process.pid);

const stderrLog = (...a) => process.stderr.write(a.map(String).join(' ') + '\n');
const logger = {
  debug() {},
  info: stderrLog,
  warn: stderrLog,
  error: stderrLog,
};

// listen on one address only (the stock server listens on all interfaces)
class LoopbackRpcServer extends RpcServer {
  _startServer(listenPort) {
    const server = net.createServer();
    server.once('error', err => { this.emit('error', err); });
    server.on('connection', socket => { this._handleSocket(socket); });
    server.listen(listenPort, host);
    return server;
  }
}

const proto = antpb.loadAll(path.join(__dirname, 'proto'));
const server = new LoopbackRpcServer({ logger, port, proto });
server.on('error', err => { logger.warn('[server] ' + (err && err.message)); });

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

server.addService({ interfaceName: 'com.example.EchoService', version: '1.0' }, {
  async echo(s) {
    if (s && typeof s === 'object' && typeof s.toObject === 'function') {
      return { code: 200, message: s.message };      // protobuf EchoRequest
    }
    return s;
  },
  async boom() {
    throw new Error('boom');
  },
  async slow(ms) {
    await sleep(Number(ms) || 0);
    return 'slow-done';
  },
  async whoami() {
    return serverId;
  },
});

async function main() {
  await server.start();
  const realPort = server._servers[0].address().port;
  process.stdout.write('READY ' + realPort + '\n');
}

let closing = false;
function shutdown() {
  if (closing) return;
  closing = true;
  const timer = setTimeout(() => process.exit(0), 2000);
  timer.unref();
  server.close().then(() => process.exit(0), () => process.exit(0));
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args['exit-on-stdin-close']) {
  process.stdin.on('end', shutdown);
  process.stdin.on('close', shutdown);
  process.stdin.resume();
}

main().catch(err => {
  stderrLog('[server] failed to start: ' + (err && err.stack));
  process.exit(1);
});
