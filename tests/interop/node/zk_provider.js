'use strict';
// A real SOFARPC provider that registers itself through sofa-rpc-node's own ZooKeeper
// registry (lib/registry/zk), for fastmesh's registry tests.
//
//   node zk_provider.js --zk 127.0.0.1:2181 --id p1 [--version 1.0] [--weight 100]
//                       [--session-timeout-ms 30000] [--leave-wait-ms 1500]
//
// Listens on 127.0.0.1 (a free port), publishes com.example.EchoService:<version> (group SOFA)
// with that address, prints "READY <port>" once its node is in ZooKeeper. Serves
// echo(s) -> s, whoami() -> the --id, slow(ms) -> 'slow-done' after ms.
// SIGTERM leaves gracefully: unpublish, wait --leave-wait-ms (callers see the node go and
// finish what they sent), close, exit. --session-timeout-ms is the ZooKeeper session
// timeout (a SIGKILLed provider's node disappears when it expires).

const net = require('net');
const zookeeper = require('zookeeper-cluster-client');
const { RpcServer } = require('sofa-rpc-node').server;
const { ZookeeperRegistry } = require('sofa-rpc-node').registry;

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
const id = String(args.id || 'p' + process.pid);
const version = String(args.version || '1.0');
const weight = Number(args.weight || 100);
const sessionTimeout = Number(args['session-timeout-ms'] || 30000);
const leaveWaitMs = Number(args['leave-wait-ms'] || 1500);
const interfaceName = String(args.service || 'com.example.EchoService');

const stderrLog = (...a) => process.stderr.write('[' + id + '] ' + a.map(String).join(' ') + '\n');
const logger = { debug() {}, info: stderrLog, warn: stderrLog, error: stderrLog };

// sofa-rpc-node passes no session timeout to its ZooKeeper client: give it ours
const zkWithTimeout = Object.assign({}, zookeeper, {
  createClient(address, options) {
    return zookeeper.createClient(address, Object.assign({}, options, { sessionTimeout: sessionTimeout }));
  },
});

class LoopbackRpcServer extends RpcServer {
  // the weight goes in the published URL itself (publish() waits until it sees that URL)
  get params() {
    return Object.assign(super.params, { weight });
  }

  _startServer(listenPort) {
    const server = net.createServer();
    server.once('error', err => { this.emit('error', err); });
    server.on('connection', socket => { this._handleSocket(socket); });
    server.listen(listenPort, '127.0.0.1', () => {
      this.publishPort = server.address().port;
    });
    return server;
  }
}

const registry = new ZookeeperRegistry({ logger, address: String(args.zk), zookeeper: zkWithTimeout });
const server = new LoopbackRpcServer({ logger, registry, port: 0, publishAddress: '127.0.0.1' });
server.on('error', err => logger.warn('server error: ' + (err && err.message)));
registry.on('error', err => logger.warn('registry error: ' + (err && err.message)));

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
server.addService({ interfaceName, version, group: 'SOFA' }, {
  async echo(s) { return s; },
  async whoami() { return id; },
  async slow(ms) { await sleep(Number(ms) || 0); return 'slow-done'; },
});

async function main() {
  await server.start();
  await registry.ready();
  await server.publish();
  process.stdout.write('READY ' + server.publishPort + '\n');
}

let leaving = false;
async function leave() {
  if (leaving) return;
  leaving = true;
  const hard = setTimeout(() => process.exit(0), leaveWaitMs + 5000);
  hard.unref();
  try {
    await server.unPublish();
    logger.info('unpublished; closing in ' + leaveWaitMs + ' ms');
    await sleep(leaveWaitMs);
    await server.close();
    await registry.close();
  } catch (err) {
    logger.warn('leave: ' + (err && err.message));
  }
  process.exit(0);
}
process.on('SIGTERM', leave);
process.on('SIGINT', leave);
process.stdin.on('end', leave);
process.stdin.resume();

main().catch(err => {
  stderrLog('failed to start: ' + (err && err.stack));
  process.exit(1);
});
