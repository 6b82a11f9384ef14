"""The real SOFARPC peers (sofa-rpc-node server.js and client.js) talking THROUGH fastmesh.

Every test starts its own fastmesh (``start_fastmesh``) in front of one or two server.js
processes and runs client.js (or a raw socket, where a test needs the exact status code or
control over the frame) against the proxy's bolt listener. Most run on uvloop; a subset
runs again on plain asyncio (the ``loop`` parameter).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmesh._core import bolt
from fmtest import BoltClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bolt_peers import (NODE, NODE_DIR, NodeServer, client_command, requires_node,  # noqa: E402
                        run_client, stop_process, wait_port_closed)

pytestmark = [requires_node, pytest.mark.timeout(180)]

SERVICE = "com.example.EchoService:1.0"
NODE_EMPTY_ERROR = "Server exception when invoke with callback"   # a status without a body
BOTH_LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
FRAMES_DIR = Path(os.environ.get("FASTMESH_BOLT_FRAMES",
                                 Path(__file__).resolve().parents[1] / "data" / "bolt-frames"))


# ============================================================================ helpers

def proxy_config(endpoints, cluster=None, route=None, listener=None):
    return {
        "listeners": [dict({"name": "rpc", "protocol": "bolt", "route_table": "rpc"},
                           **(listener or {}))],
        "route_tables": {"rpc": {"routes": [dict(
            {"match": {"headers": [{"name": "service", "prefix": "com.example.EchoService"}]},
             "cluster": "echo"}, **(route or {}))]}},
        "clusters": [dict({"name": "echo", "endpoints": list(endpoints)}, **(cluster or {}))],
    }


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lstat(fm, key):
    return fm.listener_stats("rpc")[key]


def cstat(fm, key):
    return fm.cluster_stats("echo")[key]


def host_of(fm):
    return f"127.0.0.1:{fm.port}"


class BackgroundClient:
    """client.js started now and collected later (bounded), always stopped."""

    def __init__(self, host, calls=None, timeout_ms=3000, extra=()):
        self.proc = subprocess.Popen(client_command(host, calls, timeout_ms, extra),
                                     cwd=NODE_DIR, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(self, timeout_s=60.0):
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise AssertionError("client.js hung")
        assert self.proc.returncode == 0, err.decode(errors="replace")
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]

    def stop(self):
        stop_process(self.proc)


@pytest.fixture
def background():
    started = []

    def start(*a, **kw):
        c = BackgroundClient(*a, **kw)
        started.append(c)
        return c
    yield start
    for c in started:
        c.stop()


@pytest.fixture
def server():
    with NodeServer("s1") as srv:
        yield srv
    assert wait_port_closed(srv.port), "server.js still listening after stop"


@pytest.fixture
def proxied(server, start_fastmesh):
    """proxied(loop=..., cluster=..., route=..., listener=...) -> fastmesh in front of server"""
    def start(loop="uvloop", **kw):
        return start_fastmesh(proxy_config([server.host], **kw), loop=loop)
    return start


@pytest.fixture
def raw():
    made = []

    def connect(port):
        c = BoltClient(port)
        made.append(c)
        return c
    yield connect
    for c in made:
        c.close()


def captured(name):
    path = FRAMES_DIR / name
    if not path.exists():
        pytest.skip(f"captured frames absent: {path}")
    return bytes.fromhex(path.read_text().strip())


def slow_request(rid, ms, timeout_ms):
    """The captured hessian2 echo("hello") turned into slow("0NNNN"): same string lengths,
    so the hessian2 body stays valid (server.js does Number(ms))."""
    f = bolt.parse_frame(captured("bolt_request.hex"))
    assert b"\x04echo" in f["content"] and b"\x05hello" in f["content"]
    arg = b"%05d" % ms
    f["content"] = f["content"].replace(b"\x04echo", b"\x04slow").replace(b"\x05hello",
                                                                        b"\x05" + arg)
    f["request_id"] = rid
    f["timeout_ms"] = timeout_ms
    return bolt.encode_frame(f)


def echo_request(rid):
    buf = bytearray(captured("bolt_request.hex"))
    bolt.py_frame_set_id(buf, rid)
    return bytes(buf)


# ====================================================================== basic calls

@BOTH_LOOPS
def test_echo_hessian2_and_exception(proxied, loop):
    fm = proxied(loop=loop)
    out = run_client(host_of(fm), [
        {"method": "echo", "args": ["hello"]},
        {"method": "echo", "args": ["héllo, wörld ✓"]},
        {"method": "echo", "args": ["x" * 100000]},
        {"method": "boom"},
        {"method": "whoami"},
    ])
    assert len(out) == 5
    assert out[0]["ok"] and out[0]["result"] == "hello"
    assert out[1]["ok"] and out[1]["result"] == "héllo, wörld ✓"
    assert out[2]["ok"] and out[2]["result"] == "x" * 100000
    assert not out[3]["ok"] and "boom" in out[3]["error"], out[3]
    assert "RpcServerException" in out[3]["error"]        # the server's text, passed through
    assert out[4] == {"ok": True, "result": "s1", "ms": out[4]["ms"]}
    s = fm.stats()
    assert s["listeners"]["rpc"]["downstream_rq_total"] == 5
    assert s["clusters"]["echo"]["upstream_rq_total"] == 5
    assert s["clusters"]["echo"]["upstream_cx_total"] == 1
    assert s["listeners"]["rpc"]["error_no_route"] == 0


@BOTH_LOOPS
def test_echo_protobuf(proxied, loop):
    fm = proxied(loop=loop)
    out = run_client(host_of(fm), [{"method": "echo", "args": ["hello"]},
                                   {"method": "echo", "args": ["protobuf ✓"]}],
                     extra=["--codec", "protobuf"])
    # (boom has no protobuf face in echo.proto: the client refuses it locally)
    assert out[0] == {"ok": True, "result": {"code": 200, "message": "hello"}, "ms": out[0]["ms"]}
    assert out[1]["ok"] and out[1]["result"]["message"] == "protobuf ✓"
    assert cstat(fm, "upstream_rq_total") == 2
    assert cstat(fm, "upstream_rsp_2xx") == 2


@BOTH_LOOPS
@pytest.mark.parametrize("extra", [["--bolt2"], ["--bolt2", "--crc"]], ids=["v2", "v2-crc"])
def test_bolt_v2_through_the_proxy(proxied, loop, extra):
    fm = proxied(loop=loop)
    out = run_client(host_of(fm), [{"method": "echo", "args": ["v2"]}, {"method": "boom"},
                                   {"method": "echo", "args": ["v2 again"]}], extra=extra)
    assert out[0]["ok"] and out[0]["result"] == "v2"
    assert not out[1]["ok"] and "boom" in out[1]["error"]
    assert out[2]["ok"] and out[2]["result"] == "v2 again"
    assert lstat(fm, "error_bad_frame") == 0
    assert cstat(fm, "upstream_rsp_2xx") == 2


def test_bolt_v2_crc_protobuf_concurrent(proxied):
    fm = proxied()
    (summary,) = run_client(host_of(fm), extra=["--bolt2", "--crc", "--codec", "protobuf",
                                                "--concurrent", "8", "--count", "300",
                                                "--payload-bytes", "200"])
    assert (summary["ok"], summary["mismatch"], summary["errors"]) == (300, 0, 0), summary


# ========================================================================= timeouts

@BOTH_LOOPS
def test_slow_call_times_out_and_the_connection_keeps_working(proxied, loop):
    fm = proxied(loop=loop)
    out = run_client(host_of(fm), [{"method": "slow", "args": [1500], "timeout": 300},
                                   {"method": "echo", "args": ["after"]},
                                   {"method": "slow", "args": [100], "timeout": 2000}])
    assert not out[0]["ok"], out[0]
    assert out[0]["ms"] < 1400
    assert out[1]["ok"] and out[1]["result"] == "after"
    assert out[2]["ok"] and out[2]["result"] == "slow-done"
    # the proxy's own deadline (the frame's 300 ms) fires too, even if the client gave up
    wait_until(lambda: cstat(fm, "upstream_rq_timeout") == 1, what="upstream_rq_timeout == 1")
    assert lstat(fm, "error_upstream_timeout") == 1
    assert cstat(fm, "upstream_cx_total") == 1
    assert cstat(fm, "upstream_rq_active") == 0


@BOTH_LOOPS
def test_late_response_from_the_real_server_is_dropped(proxied, raw, loop):
    """Frame timeout 0 (none): server.js answers after 1 s, the route's 300 ms fires first.
    The client gets status 7 with its id, the late answer never reaches it, and the same
    client and upstream connections serve later calls (real client too)."""
    fm = proxied(loop=loop, route={"timeout_ms": 300})
    c = raw(fm.port)
    t0 = time.monotonic()
    c.send(slow_request(0xFFFFFFF0, 1000, timeout_ms=0))
    f = c.read_frame(timeout=3)
    assert (f["request_id"], f["status"]) == (0xFFFFFFF0, bolt.STATUS_TIMEOUT)
    assert time.monotonic() - t0 < 0.9
    assert c.nothing_for(1.3)                       # server.js answers at ~1 s: dropped
    assert cstat(fm, "upstream_rsp_2xx") == 0       # dropped, not counted as an answer
    c.send(echo_request(0xFFFFFFF1))
    f = c.read_frame()
    assert (f["request_id"], f["status"]) == (0xFFFFFFF1, 0) and b"hello" in f["content"]
    out = run_client(host_of(fm), [{"method": "echo", "args": ["later"]}])
    assert out[0]["ok"] and out[0]["result"] == "later"
    s = fm.stats()
    assert s["clusters"]["echo"]["upstream_rq_timeout"] == 1
    assert s["listeners"]["rpc"]["error_upstream_timeout"] == 1
    assert s["clusters"]["echo"]["upstream_cx_total"] == 1     # no reconnect was needed
    assert s["clusters"]["echo"]["upstream_rq_active"] == 0


# ======================================================================= heartbeats

@BOTH_LOOPS
def test_raw_heartbeat_gets_an_ack_with_the_same_id(proxied, raw, loop):
    fm = proxied(loop=loop)
    c = raw(fm.port)
    for proto, ver1, switch, rid in [(1, 1, 0, 4242), (1, 1, 0, 0xFFFFFFFF), (2, 1, 0, 7),
                                     (2, 2, 1, 8)]:
        c.send(bolt.encode_heartbeat(proto, rid, timeout_ms=3000, ver1=ver1, switch=switch))
        ack = c.read_frame()
        assert (ack["proto"], ack["type"], ack["cmdcode"], ack["request_id"], ack["status"]) \
            == (proto, bolt.TYPE_RESPONSE, bolt.CMD_HEARTBEAT, rid, 0)
    assert lstat(fm, "heartbeats") == 4
    assert cstat(fm, "upstream_rq_total") == 0


HEARTBEAT_JS = r"""
// sofa-bolt-node's own encoder/decoder: heartbeats to the proxy, acks decoded by the peer
const net = require('net');
const bolt = require('sofa-bolt-node');
const [port, v2, crc] = process.argv.slice(1).map(Number);
const enc = bolt.encoder({});
if (v2) { enc.protocolType = 'bolt2'; enc.boltVersion = crc ? 2 : 1; enc.crcEnable = !!crc; }
const dec = bolt.decoder({});
const ids = [101, 102, 103];
const acks = [];
const sock = net.connect(port, '127.0.0.1', () => {
  enc.pipe(sock);
  sock.pipe(dec);
  for (const id of ids) enc.writeHeartbeat(id, { timeout: 3000, clientUrl: 'test' });
});
dec.on('heartbeat_ack', p => {
  acks.push(p.packetId);
  if (acks.length === ids.length) {
    process.stdout.write(JSON.stringify({ acks }) + '\n');
    sock.destroy();
    process.exit(0);
  }
});
dec.on('error', e => { process.stdout.write(JSON.stringify({ error: e.message }) + '\n'); process.exit(1); });
setTimeout(() => { process.stdout.write(JSON.stringify({ acks, timeout: true }) + '\n'); process.exit(1); }, 5000);
"""


@pytest.mark.parametrize("v2,crc", [(0, 0), (1, 0), (1, 1)], ids=["v1", "v2", "v2-crc"])
def test_real_peer_codec_heartbeats_acked(proxied, v2, crc):
    """The real client's heartbeat encoder (client.js itself only sends one after 30 s idle),
    and its decoder judging our acks."""
    fm = proxied()
    proc = subprocess.run([NODE, "-e", HEARTBEAT_JS, str(fm.port), str(v2), str(crc)],
                          cwd=NODE_DIR, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=30)
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert proc.returncode == 0, (out, proc.stderr.decode(errors="replace"))
    assert out == {"acks": [101, 102, 103]}
    assert lstat(fm, "heartbeats") == 3


@BOTH_LOOPS
def test_proxy_heartbeats_to_the_real_server_are_acked(proxied, loop):
    fm = proxied(loop=loop, cluster={"heartbeat_interval_ms": 300, "heartbeat_max_missed": 2})
    assert run_client(host_of(fm), [{"method": "echo", "args": ["warm"]}])[0]["ok"]
    wait_until(lambda: cstat(fm, "heartbeat_sent") >= 4, timeout=5, what="4 heartbeats sent")
    s = fm.cluster_stats("echo")
    assert s["heartbeat_missed"] == 0
    assert s["upstream_cx_total"] == 1 and s["upstream_cx_active"] == 1
    out = run_client(host_of(fm), [{"method": "echo", "args": ["still"]}])
    assert out[0]["ok"] and out[0]["result"] == "still"
    assert cstat(fm, "upstream_cx_total") == 1


# ================================================================ ids and balancing

@BOTH_LOOPS
def test_two_client_processes_with_colliding_ids_share_one_upstream(proxied, background,
                                                                    loop):
    fm = proxied(loop=loop)
    args = ["--concurrent", "16", "--count", "1500", "--payload-bytes", "64"]
    a = background(host_of(fm), extra=args)
    b = background(host_of(fm), extra=args)
    (ra,), (rb,) = a.result(), b.result()
    for r in (ra, rb):
        assert r["mode"] == "concurrent"
        assert (r["ok"], r["mismatch"], r["errors"]) == (1500, 0, 0), r
    s = fm.stats()
    assert s["clusters"]["echo"]["upstream_cx_total"] == 1
    assert s["clusters"]["echo"]["upstream_rq_total"] == 3000
    assert s["listeners"]["rpc"]["downstream_cx_total"] >= 2
    assert s["listeners"]["rpc"]["downstream_rsp_2xx"] == 3000


def test_two_endpoints_balanced(start_fastmesh):
    with NodeServer("s-a") as a, NodeServer("s-b") as b:
        fm = start_fastmesh(proxy_config([a.host, b.host]))
        out = run_client(host_of(fm), [{"method": "whoami"}] * 40)
        assert all(r["ok"] for r in out), out
        counts = {k: sum(1 for r in out if r["result"] == k) for k in ("s-a", "s-b")}
        assert sum(counts.values()) == 40
        assert min(counts.values()) >= 14, counts          # round robin: about 20 each
        assert cstat(fm, "upstream_cx_total") == 2


def test_connections_per_endpoint(start_fastmesh, server, background):
    fm = start_fastmesh(proxy_config([server.host], cluster={"connections_per_endpoint": 3}))
    clients = [background(host_of(fm), extra=["--concurrent", "4", "--count", "200"])
               for _ in range(6)]
    for c in clients:
        (r,) = c.result()
        assert (r["ok"], r["mismatch"], r["errors"]) == (200, 0, 0), r
    assert 1 <= cstat(fm, "upstream_cx_total") <= 3


# ===================================================================== failures

def test_server_restarted_under_load(start_fastmesh, background):
    srv = NodeServer("s1").start()
    port = srv.port
    try:
        fm = start_fastmesh(proxy_config([srv.host], cluster={"heartbeat_interval_ms": 1000}))
        assert run_client(host_of(fm), [{"method": "echo", "args": ["up"]}])[0]["ok"]
        # a call certainly in flight when the server dies, and a stream of short ones
        stuck = background(host_of(fm), [{"method": "slow", "args": [4000]}], timeout_ms=8000)
        load = background(host_of(fm), extra=["--concurrent", "8", "--count", "4000",
                                              "--payload-bytes", "32"], timeout_ms=3000)
        wait_until(lambda: cstat(fm, "upstream_rq_active") >= 1, what="calls in flight")
        time.sleep(0.5)
        srv.proc.kill()                                  # abrupt: no graceful close
        srv.stop()
        t_down = time.monotonic()
        (stuck_out,) = stuck.result(timeout_s=10)
        assert not stuck_out["ok"], stuck_out           # failed cleanly, did not hang
        assert time.monotonic() - t_down < 3
        assert stuck_out["ms"] < 4000
        srv = NodeServer("s1", port=port).start()       # back on the same port
        (summary,) = load.result(timeout_s=60)
        assert summary["mismatch"] == 0, summary
        assert summary["ok"] + summary["errors"] == 4000, summary
        assert summary["errors"] >= 1, summary
        out = wait_until(lambda: (lambda o: o if o[0]["ok"] else None)(
            run_client(host_of(fm), [{"method": "echo", "args": ["back"]}])),
            timeout=10, what="a call succeeding after the restart")
        assert out[0]["result"] == "back"
        out = run_client(host_of(fm), [{"method": "whoami"}] * 5)
        assert all(r["ok"] for r in out), out
        s = fm.stats()
        assert s["listeners"]["rpc"]["error_upstream_reset"] >= 1
        assert s["clusters"]["echo"]["upstream_cx_total"] >= 2
        assert s["clusters"]["echo"]["upstream_rq_active"] == 0
    finally:
        srv.stop()


@BOTH_LOOPS
def test_no_route_fails_fast(proxied, raw, loop):
    fm = proxied(loop=loop)
    out = run_client(host_of(fm), [{"method": "echo", "args": ["x"]}], timeout_ms=5000,
                     extra=["--service", "com.other.MissingService"])
    assert not out[0]["ok"], out
    assert NODE_EMPTY_ERROR in out[0]["error"]
    assert out[0]["ms"] < 1000                           # not the 5 s client timeout
    assert lstat(fm, "error_no_route") == 1
    # the status itself: 6, with the client's id, on a raw connection
    f = bolt.parse_frame(captured("bolt_request.hex"))
    f["header_block"] = bolt.encode_header_block({"service": "com.other.MissingService:1.0"})
    f["request_id"] = 0xFFFFFFFF
    c = raw(fm.port)
    c.send(bolt.encode_frame(f))
    rsp = c.read_frame(timeout=2)
    assert (rsp["request_id"], rsp["status"]) == (0xFFFFFFFF, bolt.STATUS_NO_PROCESSOR)
    assert lstat(fm, "error_no_route") == 2
    assert cstat(fm, "upstream_rq_total") == 0


# ================================================================ resilience (issue 11)

def test_circuit_breaker_answers_server_busy_at_once(proxied, background):
    """max_requests 1: while a slow call is in flight, the next call gets status 4 (server
    busy) at once, from the proxy; after it, calls pass again."""
    fm = proxied(cluster={"circuit_breakers": {"max_requests": 1}})
    slow = background(host_of(fm), [{"method": "slow", "args": [1500], "timeout": 5000}],
                      timeout_ms=5000)
    wait_until(lambda: cstat(fm, "upstream_rq_active") == 1, what="the slow call in flight")
    out = run_client(host_of(fm), [{"method": "echo", "args": ["x"]}], timeout_ms=5000)
    assert not out[0]["ok"] and out[0]["ms"] < 1000, out
    assert cstat(fm, "upstream_rq_active_overflow") == 1
    assert lstat(fm, "error_overflow") == 1
    assert slow.result()[0]["ok"]
    assert run_client(host_of(fm), [{"method": "echo", "args": ["y"]}])[0]["ok"]


def test_outlier_detection_ejects_an_endpoint_that_fails_every_call(server, start_fastmesh):
    """Two endpoints: the real server, and an HTTP server that cannot speak Bolt (every call
    sent there dies with its connection). After 2 failures in a row it is ejected (max 50%),
    and every later call goes to the real server."""
    from fmtest import Proc, _wait_line
    http = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                 "--name", "not-bolt"], name="not-bolt")
    try:
        port = int(_wait_line(http, b"READY", 15).split()[1])
        fm = start_fastmesh(proxy_config(
            [server.host, f"127.0.0.1:{port}"],
            cluster={"outlier_detection": {"consecutive_5xx": 2, "max_ejection_pct": 50,
                                           "base_ejection_time_ms": 60000}}))
        out = run_client(host_of(fm), [{"method": "echo", "args": [str(i)]}
                                       for i in range(12)], timeout_ms=3000)
        assert sum(1 for r in out if not r["ok"]) <= 2, out
        assert all(r["ok"] for r in out[-8:]), out
        assert cstat(fm, "outlier_ejections_enforced_total") == 1
        eps = json.loads(fm.admin("/clusters")[1])["echo"]
        assert [e["ejected"] for e in eps] == [False, True]
    finally:
        http.stop()


def test_bolt_health_check_sends_heartbeats(server, start_fastmesh):
    """A bolt health check: a heartbeat to each endpoint; the real server acks it (healthy),
    a port where nobody listens fails; every call goes to the healthy one."""
    from fmtest import free_port
    dead = free_port()
    fm = start_fastmesh(proxy_config(
        [server.host, f"127.0.0.1:{dead}"],
        cluster={"health_check": {"type": "bolt", "timeout_ms": 500, "interval_ms": 200,
                                  "no_traffic_interval_ms": 200}}))
    wait_until(lambda: [e["health_check_failed"] for e in
                        json.loads(fm.admin("/clusters")[1])["echo"]] == [False, True],
               what="the verdicts")
    out = run_client(host_of(fm), [{"method": "echo", "args": [str(i)]} for i in range(6)])
    assert all(r["ok"] for r in out), out
    st = fm.stats()["clusters"]["echo"]
    assert st["health_check_success"] >= 1 and st["health_check_failure"] >= 1


def test_a_service_token_bucket_answers_server_busy(proxied):
    """A Bolt route (a service) with its own token bucket: calls beyond it get status 4 at
    once, from the proxy."""
    fm = proxied(route={"local_rate_limit": {"max_tokens": 2, "fill_interval_ms": 60000}})
    out = run_client(host_of(fm), [{"method": "echo", "args": [str(i)]} for i in range(4)])
    assert [r["ok"] for r in out] == [True, True, False, False], out
    assert all(r["ms"] < 1000 for r in out[2:]), out
    assert lstat(fm, "local_rate_limit_rate_limited") == 2
    assert cstat(fm, "upstream_rq_total") == 2


def test_calls_retried_on_another_endpoint_when_a_connection_dies(server, start_fastmesh):
    """A route retrying on lost connections (the service is idempotent): of two endpoints,
    one cannot speak Bolt (every call sent there dies with its connection); each such call is
    sent again to the real server, and the client sees every call answered."""
    from fmtest import Proc, _wait_line
    http = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                 "--name", "not-bolt"], name="not-bolt")
    try:
        port = int(_wait_line(http, b"READY", 15).split()[1])
        fm = start_fastmesh(proxy_config(
            [f"127.0.0.1:{port}", server.host],
            route={"retry_policy": {"retry_on": ["reset"], "num_retries": 2,
                                    "previous_hosts": True}}))
        out = run_client(host_of(fm), [{"method": "echo", "args": [str(i)]}
                                       for i in range(10)], timeout_ms=3000)
        assert all(r["ok"] and r["result"] == str(i) for i, r in enumerate(out)), out
        assert cstat(fm, "upstream_rq_retry") >= 1
        assert lstat(fm, "error_upstream_reset") == 0
    finally:
        http.stop()


def test_a_retried_status_is_sent_again_then_answered(proxied):
    """bolt_statuses: a call answered with a listed status (boom(): a server exception, 2)
    is sent again; when the retries are spent, the client gets that answer."""
    fm = proxied(route={"retry_policy": {"retry_on": ["reset"], "num_retries": 1,
                                         "bolt_statuses": [2]}})
    out = run_client(host_of(fm), [{"method": "boom", "args": []},
                                   {"method": "echo", "args": ["fine"]}])
    assert not out[0]["ok"] and "boom" in out[0]["error"], out
    assert out[1]["ok"] and out[1]["result"] == "fine", out
    assert cstat(fm, "upstream_rq_retry") == 1
    assert cstat(fm, "upstream_rq_total") == 3               # boom twice, echo once
