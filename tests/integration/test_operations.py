"""Live operations on real processes: workers, reload, hot restart (SIGHUP and a second
`fastmesh run` on the same upgrade socket), drain, and a worker killed with SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fmtest import (REPO, BoltClient, Proc, RawClient, free_port, get_json, pid_alive,
                    post_json, supervisor_pid, wait_gone, wait_new_generation, wrk_result, wrk_start)

FRAMES = Path(__file__).resolve().parents[1] / "data" / "bolt-frames"





@pytest.fixture
def upstream(procs):
    proc = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                 "--name", "up"], name="upstream")
    procs.append(proc)
    line = proc.popen.stdout.readline()
    assert line.startswith(b"READY"), proc.output()
    return f"127.0.0.1:{int(line.split()[1])}"


def http_cfg(upstream: str, **listener) -> dict:
    return {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": 5000,
        "listeners": [dict({"name": "web", "address": f"127.0.0.1:{free_port()}",
                            "protocol": "http1", "route_table": "rt"}, **listener)],
        "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}},
        "clusters": [{"name": "up", "endpoints": [upstream]}],
    }





def _port(cfg, i=0):
    return int(cfg["listeners"][i]["address"].rsplit(":", 1)[1])


# ------------------------------------------------------------------------ workers

def test_workers_share_listeners_and_stats_sum(deployment, upstream):
    d = deployment(http_cfg(upstream), workers=2)
    d.start()
    port = _port(d.cfg)
    for _ in range(40):
        with RawClient(port) as c:
            c.request(path="/")
            assert c.read_response().status == 200
    st = get_json(d.admin_port, "/stats")
    assert st["server"]["workers"] == 2 and len(st["server"]["worker_pids"]) == 2
    assert st["listeners"]["web"]["downstream_rq_total"] == 40


def test_killed_worker_is_restarted(deployment, upstream):
    d = deployment(http_cfg(upstream), workers=2)
    d.start()
    st = get_json(d.admin_port, "/stats")["server"]
    victim = st["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = get_json(d.admin_port, "/stats")["server"]
        if st["worker_restarts"] == 1 and victim not in st["worker_pids"] \
                and len(st["worker_pids"]) == 2:
            break
        time.sleep(0.1)
    assert st["worker_restarts"] == 1 and victim not in st["worker_pids"]
    port = _port(d.cfg)
    for _ in range(20):
        with RawClient(port) as c:
            c.request(path="/")
            assert c.read_response().status == 200
    assert "restarting" in d.procs[0].stderr_text()


def _requests(port: int, n: int) -> None:
    for _ in range(n):
        with RawClient(port) as c:
            c.request(path="/")
            assert c.read_response().status == 200


def _wait_stat(admin_port: int, listener: str, key: str, want: int, timeout=15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = get_json(admin_port, "/stats")["listeners"].get(listener, {}).get(key)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_prometheus_stats_match_json_stats(deployment, upstream):
    from prometheus_client.parser import text_string_to_metric_families
    d = deployment(http_cfg(upstream))
    d.start()
    _requests(_port(d.cfg), 7)
    with urllib.request.urlopen(f"http://127.0.0.1:{d.admin_port}/stats/prometheus",
                                timeout=5) as r:
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    js = get_json(d.admin_port, "/stats")
    samples = {(s.name, tuple(s.labels.items())): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("fastmesh_listener_downstream_rq_total", (("listener", "web"),))] == 7
    for k, v in js["listeners"]["web"].items():
        name = f"fastmesh_listener_{k}" + ("" if k.endswith(("_total", "_active")) else "_total")
        assert samples[(name, (("listener", "web"),))] == v, k
    for k, v in js["clusters"]["up"].items():
        name = f"fastmesh_cluster_{k}" + ("" if k.endswith(("_total", "_active")) else "_total")
        assert samples[(name, (("cluster", "up"),))] == v, k


def test_counters_survive_a_worker_crash(deployment, upstream):
    d = deployment(http_cfg(upstream))
    d.start()
    port = _port(d.cfg)
    _requests(port, 30)
    time.sleep(1.5)                                 # at least one snapshot of the worker
    victim = get_json(d.admin_port, "/stats")["server"]["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while get_json(d.admin_port, "/stats")["server"]["worker_restarts"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _wait_stat(d.admin_port, "web", "downstream_cx_active", 0)
    _requests(port, 10)
    st = get_json(d.admin_port, "/stats")["listeners"]["web"]
    assert st["downstream_rq_total"] == 40 and st["downstream_rsp_2xx"] == 40
    assert st["downstream_cx_active"] == 0          # gauges are not carried over


def test_counters_survive_hot_restarts(deployment, upstream, loop_kind):
    d = deployment(http_cfg(upstream), workers=2, loop=loop_kind)
    d.start()
    port = _port(d.cfg)
    total = 0
    for _ in range(2):
        _requests(port, 25)
        total += 25
        old = supervisor_pid(d.admin_port)
        d.hup()
        wait_new_generation(d.admin_port, old)
        wait_gone(old)
    _requests(port, 10)
    total += 10
    assert _wait_stat(d.admin_port, "web", "downstream_rq_total", total) == total
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["web"]["downstream_rsp_2xx"] == total
    assert st["clusters"]["up"]["upstream_rq_total"] == total


# ------------------------------------------------------------------------ reload

def test_counters_survive_a_restart_during_a_drain(deployment, upstream):
    """Generation 2 is replaced while generation 1 still drains a slow request: generation 1's
    totals reach generation 3 through generation 2."""
    d = deployment(http_cfg(upstream))
    d.start()
    port = _port(d.cfg)
    _requests(port, 5)
    slow = RawClient(port, timeout=15)
    slow.request(path="/_/slow/2500")                   # keeps generation 1 draining
    time.sleep(0.3)
    gen1 = supervisor_pid(d.admin_port)
    d.hup()
    gen2 = wait_new_generation(d.admin_port, gen1)
    d.hup()
    wait_new_generation(d.admin_port, gen2)
    assert slow.read_response().status == 200           # finished by generation 1
    slow.close()
    wait_gone(gen1)
    wait_gone(gen2)
    _requests(port, 4)
    assert _wait_stat(d.admin_port, "web", "downstream_rq_total", 10) == 10


def test_reload_applies_routes_listeners_and_rejects_bad_config(deployment, upstream):
    cfg = http_cfg(upstream)
    d = deployment(cfg)
    d.start()
    port = _port(cfg)
    keep = RawClient(port)            # a keep-alive connection that lives across reloads
    keep.request(path="/")
    assert keep.read_response().body == b"hello from up\n"

    # a new route answered directly, and a second listener
    cfg2 = json.loads(json.dumps(cfg))
    cfg2["route_tables"]["rt"]["routes"].insert(
        0, {"match": {"path": "/v2"}, "direct_response": {"status": 200, "body": "v2"}})
    cfg2["listeners"].append({"name": "extra", "address": f"127.0.0.1:{free_port()}",
                              "protocol": "http1", "route_table": "rt"})
    d.write(cfg2)
    status, out = post_json(d.admin_port, "/reload")
    assert status == 200 and out["ok"], out
    keep.request(path="/v2")
    assert keep.read_response().body == b"v2"           # same connection, new routes
    with RawClient(_port(cfg2, 1)) as c:
        c.request(path="/v2")
        assert c.read_response().body == b"v2"

    # an invalid config changes nothing and lists every error
    bad = json.loads(json.dumps(cfg2))
    bad["route_tables"]["rt"]["routes"][1]["cluster"] = "nope"
    bad["clusters"][0]["lb_policy"] = "fastest"
    d.write(bad)
    status, out = post_json(d.admin_port, "/reload")
    assert status == 400 and not out["ok"]
    assert any("no cluster named 'nope'" in e for e in out["errors"])
    assert any("lb_policy" in e for e in out["errors"])
    keep.request(path="/v2")
    assert keep.read_response().body == b"v2"

    # removing the extra listener stops it accepting; the first is undisturbed
    d.write(cfg)
    status, out = post_json(d.admin_port, "/reload")
    assert status == 200, out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", _port(cfg2, 1)), timeout=2).recv(1)
        raise OSError("accepted")
    keep.request(path="/")
    assert keep.read_response().body == b"hello from up\n"
    keep.close()


# ------------------------------------------------------------------------ hot restart

def test_hot_restart_under_load_loses_nothing(deployment, upstream, loop_kind):
    d = deployment(http_cfg(upstream), loop=loop_kind)
    d.start()
    port = _port(d.cfg)
    load = wrk_start(port, 12)
    times = []
    for _ in range(5):
        time.sleep(1.5)
        old = supervisor_pid(d.admin_port)
        t0 = time.monotonic()
        d.hup()
        wait_new_generation(d.admin_port, old)
        took_exit = wait_gone(old)
        times.append((time.monotonic() - t0, took_exit))
    reqs, out = wrk_result(load)
    assert reqs > 1000, out
    assert "Socket errors" not in out and "Non-2xx" not in out, out
    # a broken config: the new generation refuses to start; the old one keeps serving
    bad = json.loads(json.dumps(d.cfg))
    bad["clusters"][0]["endpoints"] = ["not an address"]
    d.write(bad)
    old = supervisor_pid(d.admin_port)
    d.hup()
    time.sleep(2.0)
    assert supervisor_pid(d.admin_port) == old
    with RawClient(port) as c:
        c.request(path="/")
        assert c.read_response().status == 200


def test_second_run_on_same_upgrade_socket_takes_over(deployment, upstream, loop_kind):
    d = deployment(http_cfg(upstream), loop=loop_kind)
    first = d.start()
    port = _port(d.cfg)
    c = RawClient(port)
    c.request(path="/")
    assert c.read_response().status == 200
    old = supervisor_pid(d.admin_port)
    second = d.start(wait=False)                        # the container-style upgrade
    wait_new_generation(d.admin_port, old)
    assert get_json(d.admin_port, "/stats")["server"]["pid"] == second.popen.pid
    # the old generation's connection gets its last response with Connection: close
    c.request(path="/")
    r = c.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    c.close()
    assert first.popen.wait(15) == 0
    with RawClient(port) as c2:
        c2.request(path="/")
        assert c2.read_response().status == 200


def test_failed_new_generation_leaves_old_serving(deployment, upstream):
    cfg = http_cfg(upstream)
    d = deployment(cfg)
    d.start()
    old = supervisor_pid(d.admin_port)
    # valid config, but a new listener on a port somebody else holds: the new generation
    # gets the old sockets, fails to bind the new one, and gives up
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    cfg2 = json.loads(json.dumps(cfg))
    cfg2["listeners"].append({"name": "taken", "protocol": "http1", "route_table": "rt",
                              "address": f"127.0.0.1:{blocker.getsockname()[1]}"})
    d.write(cfg2)
    p = d.start(wait=False)
    assert p.popen.wait(20) != 0
    assert "cannot start" in p.stderr_text()
    blocker.close()
    assert supervisor_pid(d.admin_port) == old
    with RawClient(_port(cfg)) as c:
        c.request(path="/")
        assert c.read_response().status == 200


def test_sigterm_drains_in_flight_request(deployment, upstream, loop_kind):
    d = deployment(http_cfg(upstream), loop=loop_kind)
    p = d.start()
    port = _port(d.cfg)
    with RawClient(port) as c:
        c.request(path="/slow/700")
        time.sleep(0.2)
        p.popen.send_signal(signal.SIGTERM)
        r = c.read_response()
        assert r.status == 200 and r.body == b"slow done\n"
        assert r.header("connection") == "close"
    assert p.popen.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


# ------------------------------------------------------------------------ Bolt migration

def _frame(name: str) -> bytes:
    return bytes.fromhex((FRAMES / name).read_text().strip())


def _start_bolt_echo(procs, delay_ms=0) -> int:
    echo_port = free_port()
    echo = Proc([sys.executable, "-m", "benchmarks.boltload", "echo-server", "--listen",
                 f"127.0.0.1:{echo_port}", "--delay-ms", str(delay_ms)], name="bolt echo",
                cwd=str(REPO))
    procs.append(echo)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", echo_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return echo_port


def _bolt_cfg(echo_port: int, drain_timeout_ms: int) -> dict:
    """A Bolt listener routing every call to the echo upstream."""
    return {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": drain_timeout_ms,
        "listeners": [{"name": "rpc", "address": f"127.0.0.1:{free_port()}",
                       "protocol": "bolt", "route_table": "rpc"}],
        "route_tables": {"rpc": {"routes": [
            {"match": {"headers": [{"name": "service", "present": True}]}, "cluster": "echo"}]}},
        "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{echo_port}"]}],
    }


@pytest.mark.parametrize("peer", ["sofa-rpc-node", "boltload-echo"])
def test_bolt_connection_migrates_across_restarts(deployment, procs, peer, loop_kind):
    """A raw Bolt client on one TCP connection sends real SOFARPC requests (the captured
    hessian2 echo("hello") frame, id patched) across three hot restarts: every call is
    answered and the connection is never closed."""
    from fastmesh._core import bolt
    if peer == "sofa-rpc-node":
        sys.path.insert(0, str(REPO / "tests" / "interop"))
        from bolt_peers import NodeServer, node_skip_reason
        reason = node_skip_reason()
        if reason:
            pytest.skip(reason)
        server = NodeServer("s1")
        server.start()
        procs.append(server)                    # stop() at teardown
        echo_port = server.port
    else:
        echo_port = _start_bolt_echo(procs)
    cfg = _bolt_cfg(echo_port, drain_timeout_ms=5000)
    d = deployment(cfg, loop=loop_kind)
    d.start()
    req = bytearray(_frame("bolt_request.hex"))
    client = BoltClient(_port(cfg))

    def call(i: int) -> None:
        frame = bytearray(req)
        bolt.py_frame_set_id(frame, i)
        client.send(frame)
        f = client.read_frame()
        assert f["request_id"] == i and f["status"] == 0

    n = 1
    for restart in range(3):
        for _ in range(20):
            call(n)
            n += 1
        old = supervisor_pid(d.admin_port)
        d.hup()
        wait_new_generation(d.admin_port, old)
        # calls keep working on the same TCP connection during and after the hand-over
        for _ in range(20):
            call(n)
            n += 1
        wait_gone(old)
    for _ in range(20):
        call(n)
        n += 1
    client.close()
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["rpc"]["downstream_cx_total"] == 1     # adopted, not reconnected


def test_busy_bolt_connection_migrates(deployment, procs, loop_kind):
    """A client that always has calls in flight (a window of 8 on one connection) is never
    idle: the old generation stops reading from it, lets the calls in flight finish and
    hands it over with the requests waiting in the kernel. Every call is answered, the
    connection is never closed, and the old generation leaves long before its drain
    timeout."""
    from fastmesh._core import bolt
    echo_port = _start_bolt_echo(procs, delay_ms=40)    # a slow service: 40 ms a call
    cfg = _bolt_cfg(echo_port, drain_timeout_ms=30000)
    d = deployment(cfg, loop=loop_kind)
    d.start()
    req = bytearray(_frame("bolt_request.hex"))
    client = BoltClient(_port(cfg))
    outstanding: set = set()
    state = {"next": 1, "answered": 0}

    def send_one():
        frame = bytearray(req)
        bolt.py_frame_set_id(frame, state["next"])
        client.send(frame)
        outstanding.add(state["next"])
        state["next"] += 1

    def fill():
        while len(outstanding) < 8:
            send_one()

    def step():
        f = client.read_frame()
        assert f["status"] == 0 and f["request_id"] in outstanding, f
        outstanding.remove(f["request_id"])
        state["answered"] += 1
        fill()

    for _ in range(8):                      # staggered: one answer every ~5 ms, so at no
        send_one()                          # moment is nothing in flight
        time.sleep(0.005)
    for _ in range(100):
        step()
    old = supervisor_pid(d.admin_port)
    d.hup()
    t0 = time.monotonic()
    while pid_alive(old) and time.monotonic() - t0 < 20:
        step()                                  # the window stays full throughout
    left_after_s = time.monotonic() - t0
    assert not pid_alive(old)
    assert left_after_s < 10, left_after_s      # not the drain timeout (30 s): migrated
    for _ in range(100):
        step()
    while outstanding:
        f = client.read_frame()
        assert f["status"] == 0
        outstanding.remove(f["request_id"])
        state["answered"] += 1
    client.close()
    assert state["answered"] == state["next"] - 1
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["rpc"]["downstream_cx_total"] == 1     # adopted, not reconnected


def test_tcp_connection_migrates_when_quiet(deployment, upstream, loop_kind):
    cfg = {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": 5000,
        "listeners": [{"name": "raw", "address": f"127.0.0.1:{free_port()}",
                       "protocol": "tcp", "cluster": "up"}],
        "clusters": [{"name": "up", "endpoints": [upstream]}],
    }
    d = deployment(cfg, loop=loop_kind)
    d.start()
    with RawClient(_port(cfg)) as c:               # HTTP keep-alive over the raw TCP listener
        c.request(path="/")
        assert c.read_response().body == b"hello from up\n"
        time.sleep(0.7)                            # quiet both ways: migratable
        old = supervisor_pid(d.admin_port)
        d.hup()
        wait_new_generation(d.admin_port, old)
        wait_gone(old)
        c.request(path="/")                        # same client connection, new process
        assert c.read_response().body == b"hello from up\n"
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["raw"]["downstream_cx_total"] == 1


def test_sniffed_tcp_connection_migrates_to_its_chain(deployment, upstream, loop_kind):
    """A listener that chooses chains per connection: a connection the sniffer sent to the
    TCP chain (its first bytes are not HTTP) is handed over in a hot restart and continues
    on the new generation's TCP chain, not sniffed again (its next bytes are HTTP)."""
    import socket as _socket
    import threading
    echo = _socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(4)

    def handle(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def serve():                        # the new generation connects a new upstream
        while True:
            try:
                conn, _ = echo.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    cfg = {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": 5000,
        "listeners": [{"name": "auto", "address": f"127.0.0.1:{free_port()}",
                       "protocol": "auto", "route_table": "web", "cluster": "echo"}],
        "route_tables": {"web": {"routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}},
        "clusters": [{"name": "up", "endpoints": [upstream]},
                     {"name": "echo", "endpoints": [f"127.0.0.1:{echo.getsockname()[1]}"]}],
    }
    d = deployment(cfg, loop=loop_kind)
    d.start()
    try:
        with _socket.create_connection(("127.0.0.1", _port(cfg)), timeout=10) as c:
            c.sendall(b"\x00ping\n")
            assert c.recv(100) == b"\x00ping\n"
            time.sleep(0.7)                            # quiet both ways: migratable
            old = supervisor_pid(d.admin_port)
            d.hup()
            wait_new_generation(d.admin_port, old)
            wait_gone(old)
            line = b"GET / HTTP/1.1\r\n\r\n"          # HTTP now: still the TCP chain's
            c.sendall(line)
            got = b""
            while len(got) < len(line):
                got += c.recv(100)
            assert got == line
        st = get_json(d.admin_port, "/stats")["listeners"]["auto"]
        assert st["downstream_cx_total"] == 1 and st["downstream_rq_total"] == 0
    finally:
        echo.close()
