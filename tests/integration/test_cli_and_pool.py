"""The command line (validate, --version, demo) and the upstream connection pool's edges,
against real processes."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from fmtest import Proc, RawClient, free_port, simple_config, wait_ready

FM = [sys.executable, "-m", "fastmesh"]


def test_version():
    out = subprocess.run(FM + ["--version"], capture_output=True, timeout=30, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fastmesh ")


def test_validate_reports_every_problem_with_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
listeners:
  - {name: ingress, address: "127.0.0.1:10000", protocol: http1, route_table: web}
  - {name: other, address: "10000", protocol: smtp}
route_tables:
  web:
    routes:
      - {match: {prefix: "/"}, cluster: x}
clusters:
  - {name: c1, endpoints: ["127.0.0.1:1"], lb_policy: fastest}
""")
    out = subprocess.run(FM + ["validate", "-c", str(bad)], capture_output=True, timeout=30,
                         text=True)
    assert out.returncode != 0
    err = out.stderr
    assert "route_tables.web.virtual_hosts[0].routes[0].cluster: no cluster named 'x'" in err \
        or "route_tables.web.routes[0].cluster: no cluster named 'x'" in err
    assert "listeners[1].address" in err
    assert "listeners[1].protocol" in err
    assert "clusters[0].lb_policy" in err
    good = tmp_path / "good.yaml"
    good.write_text("""
listeners: [{name: l, address: "127.0.0.1:10000", route_table: t}]
route_tables: {t: {routes: [{match: {prefix: "/"}, cluster: c}]}}
clusters: [{name: c, endpoints: ["127.0.0.1:1"]}]
""")
    out = subprocess.run(FM + ["validate", "-c", str(good)], capture_output=True, timeout=30,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_run_refuses_invalid_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [{name: l, address: nope}]\n")
    out = subprocess.run(FM + ["run", "-c", str(bad)], capture_output=True, timeout=30,
                         text=True)
    assert out.returncode == 1 and "listeners[0].address" in out.stderr


def test_demo_serves_and_stops(procs):
    port, admin = free_port(), free_port()
    p = Proc(FM + ["demo", "--port", str(port), "--admin-port", str(admin)], name="demo")
    procs.append(p)
    wait_ready(admin, p)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        assert r.read() == b"ok"
    bodies = set()
    for _ in range(4):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            bodies.add(r.read())
    assert bodies == {b"hello from web-1\n", b"hello from web-2\n"}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/echo",
                                 headers={"Host": "api.local"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert b'"server": "api_v1-1"' in r.read()
    p.popen.send_signal(signal.SIGINT)
    assert p.popen.wait(10) == 0
    out = p.popen.stdout.read().decode()
    assert "curl" in out                       # it printed what to try


class ClosingUpstream:
    """An HTTP/1.1 server that answers one request per connection *without* saying
    `Connection: close`, then closes the connection shortly after: a pool that reuses such a
    connection would send a request into a closed socket."""

    def __init__(self, close_after_s=0.05):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.close_after_s = close_after_s
        self.stop = threading.Event()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c):
        with c:
            c.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(4096)
                if not chunk:
                    return
                data += chunk
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            time.sleep(self.close_after_s)


@pytest.mark.parametrize("gap_s", [0.0, 0.2])
def test_pool_never_sends_on_a_connection_the_upstream_closed(start_fastmesh, loop_kind, gap_s):
    up = ClosingUpstream()
    fm = start_fastmesh(simple_config({"c": [f"127.0.0.1:{up.port}"]}), loop=loop_kind)
    with RawClient(fm.port) as client:
        for _ in range(15):
            client.request(path="/")
            r = client.read_response()
            assert r.status == 200 and r.body == b"ok"
            time.sleep(gap_s)
    st = fm.listener_stats()
    assert st["error_upstream_reset"] == 0 and st["downstream_rsp_2xx"] == 15
    up.stop.set()


def test_pool_idle_timeout_and_bound(start_fastmesh, start_upstream, loop_kind):
    up = start_upstream("pool")
    cfg = simple_config({"c": [up.address]})
    cfg["clusters"][0].update({"idle_timeout_ms": 300, "max_idle_per_endpoint": 2})
    fm = start_fastmesh(cfg, loop=loop_kind)
    clients = [RawClient(fm.port) for _ in range(5)]
    for c in clients:                          # 5 requests in flight at once: 5 connections
        c.request(path="/slow/200")
    for c in clients:
        assert c.read_response().status == 200
    for c in clients:
        c.close()
    time.sleep(0.3)
    info = fm.admin("/clusters")[1]
    import json
    eps = json.loads(info)["c"]
    assert eps[0]["idle_connections"] <= 2       # the bound
    time.sleep(1.5)                               # past idle_timeout_ms (+ sweep period)
    eps = json.loads(fm.admin("/clusters")[1])["c"]
    assert eps[0]["idle_connections"] == 0
    st = fm.cluster_stats("c")
    assert st["upstream_cx_total"] == 5 and st["upstream_cx_active"] == 0


def test_hostname_endpoints_are_resolved(start_fastmesh, start_upstream, loop_kind):
    up = start_upstream("named")
    cfg = simple_config({"c": [f"localhost:{up.port}"]})
    cfg["clusters"][0]["dns_refresh_ms"] = 200
    fm = start_fastmesh(cfg, loop=loop_kind)
    import json
    deadline = time.monotonic() + 5
    eps = []
    while time.monotonic() < deadline and not eps:
        eps = json.loads(fm.admin("/clusters")[1])["c"]
        time.sleep(0.05)
    assert eps == [{"address": f"127.0.0.1:{up.port}", "origin": f"localhost:{up.port}",
                    "active_requests": 0, "idle_connections": 0,
                    "multiplexed_connections": 0, "health_check_failed": False,
                    "ejected": False, "ejections": 0, "source": "dns"}]
    for _ in range(5):
        with RawClient(fm.port) as c:
            c.request(path="/")
            assert c.read_response().body == b"hello from named\n"
