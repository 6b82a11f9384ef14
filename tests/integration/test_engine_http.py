"""HTTP/1 through a real `fastmesh run` whose worker serves its data sockets with each
I/O engine (`engine: io_uring` / `epoll` in the config), with real clients (curl, wrk, raw
sockets) and real upstreams (fastmesh.demo.upstream; a threaded server of random bytes).

The whole HTTP/1 behaviour suite also runs on an engine by environment:
    FASTMESH_ENGINE=io_uring pytest integration/test_http_proxy.py
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from fmtest import RawClient, simple_config, wrk_result, wrk_start

try:
    from fastmesh._core import engine_uring
    URING_WHY = engine_uring.probe()
except ImportError as exc:
    URING_WHY = str(exc)

BLOB = os.urandom(1024 * 1024) * 19 + os.urandom(1024 * 1024)     # 20 MiB
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


class _BlobHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def blob_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BlobHandler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture(params=["io_uring", "epoll"])
def engine(request):
    if request.param == "io_uring" and URING_WHY is not None:
        pytest.skip(f"io_uring unavailable: {URING_WHY}")
    return request.param


@pytest.fixture
def mesh(engine, start_upstream, start_fastmesh, blob_server):
    up = start_upstream("web")
    cfg = simple_config({"web": [up.address], "blob": [f"127.0.0.1:{blob_server}"]},
                        routes=[{"match": {"prefix": "/blob"}, "cluster": "blob"},
                                {"match": {"prefix": "/"}, "cluster": "web"}],
                        listener_extra={"max_request_body_bytes": 16 * 1024 * 1024,
                                        "request_head_timeout_ms": 2000,
                                        "stream_idle_timeout_ms": 3000})
    cfg["engine"] = engine
    fm = start_fastmesh(cfg, env={"FASTMESH_ENGINE": ""})
    fm.engine = engine
    return fm


def test_the_worker_runs_the_engine(mesh):
    spread = mesh.stats()["server"]["worker_connections"]
    assert spread and all(w["engine"]["name"] == mesh.engine for w in spread), spread
    with RawClient(mesh.port) as c:
        for i in range(20):
            c.request(path="/")
            assert c.read_response().status == 200
    eng = mesh.stats()["server"]["worker_connections"][0]["engine"]
    assert eng["engine.wakes"] > 0 and eng["engine.events"] >= 20


def test_curl_and_keep_alive_reuse(mesh):
    r = subprocess.run(["curl", "-s", "--max-time", "10", mesh.url("/")], capture_output=True)
    assert r.stdout == b"hello from web\n"
    before_l = mesh.listener_stats()
    before_c = mesh.cluster_stats("web")
    with RawClient(mesh.port) as c:
        for i in range(50):
            c.request(path=f"/{i}")
            assert c.read_response().body == b"hello from web\n"
    after_l = mesh.listener_stats()
    after_c = mesh.cluster_stats("web")
    assert after_l["downstream_cx_total"] - before_l["downstream_cx_total"] == 1
    assert after_c["upstream_rq_total"] - before_c["upstream_rq_total"] == 50
    assert after_c["upstream_cx_total"] - before_c["upstream_cx_total"] <= 1


def test_pipelined_requests_in_order(mesh):
    with RawClient(mesh.port) as c:
        c.send(b"".join(b"GET /echo HTTP/1.1\r\nHost: a\r\nx-n: %d\r\n\r\n" % i
                        for i in range(30)))
        for i in range(30):
            r = c.read_response()
            assert r.status == 200 and dict(r.json()["headers"])["x-n"] == str(i)


def _blob_to_a_slow_reader(c) -> None:
    """GET /blob on c (plain or TLS, a small receive buffer), read slowly for the first
    3 MiB: every byte arrives, in order."""
    c.settimeout(20)
    c.sendall(b"GET /blob HTTP/1.1\r\nHost: a\r\n\r\n")
    got = bytearray()
    head = None
    while head is None or len(got) < len(BLOB):
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
        if head is None and b"\r\n\r\n" in got:
            head, _, rest = bytes(got).partition(b"\r\n\r\n")
            got = bytearray(rest)
        if len(got) < 3 * 1024 * 1024:
            time.sleep(0.001)
    assert head is not None and head.startswith(b"HTTP/1.1 200")
    assert len(got) == len(BLOB)
    assert hashlib.sha256(got).hexdigest() == BLOB_SHA


def test_20mb_download_to_a_slow_reader(mesh):
    """Back-pressure both ways: the client's tiny receive buffer backs the proxy's writes up,
    the proxy pauses reading its upstream; every byte arrives, in order."""
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", mesh.port))
    with c:
        _blob_to_a_slow_reader(c)


def test_8mb_upload(mesh):
    body = os.urandom(8 * 1024 * 1024)
    with RawClient(mesh.port, timeout=20) as c:
        c.request("POST", "/echo", body=body)
        r = c.read_response()
    assert r.status == 200
    assert r.json()["body_bytes"] == len(body)
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_upstream_reset_mid_response_then_serving(mesh):
    before = mesh.listener_stats()
    with RawClient(mesh.port) as c:
        c.request(path="/reset-mid")
        raw = c.read_raw_until_close()
    assert raw.startswith(b"HTTP/1.1 200") and len(raw.partition(b"\r\n\r\n")[2]) < 100
    after = mesh.listener_stats()
    assert after["error_reset_mid_response"] - before["error_reset_mid_response"] == 1
    with RawClient(mesh.port) as c:
        c.request(path="/")
        assert c.read_response().body == b"hello from web\n"


def test_client_resets_mid_request(mesh):
    """Clients that reset with a request half sent, many at once: nothing wedges."""
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", mesh.port))
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\ncontent-length: 100000\r\n\r\nabc")
        socks.append(s)
    time.sleep(0.2)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    deadline = time.time() + 5
    while time.time() < deadline:
        if mesh.listener_stats()["downstream_cx_active"] == 0:
            break
        time.sleep(0.05)
    assert mesh.listener_stats()["downstream_cx_active"] == 0
    with RawClient(mesh.port) as c:
        c.request(path="/")
        assert c.read_response().body == b"hello from web\n"


def test_wrk_200_keep_alive_connections(mesh):
    p = wrk_start(mesh.port, 2, conns=200)
    n, out = wrk_result(p)
    assert n > 100, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    assert mesh.proc.popen.poll() is None


def _chaos(port: int, seconds: float, seed: int) -> None:
    """Clients that misbehave: resets, half-closes, slow readers with tiny buffers, junk,
    pipelines, bodies cut short, a broken chunked body, 20 MiB downloads left unread."""
    import random
    r = random.Random(seed)
    stop = time.time() + seconds
    reqs = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /blob HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"b" * 50000,
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 20,
            bytes(r.getrandbits(8) for _ in range(3000)),
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]
    while time.time() < stop:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            if r.random() < 0.3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(r.choice(reqs))
            act = r.random()
            if act < 0.3:
                s.recv(r.randint(1, 100000))
            elif act < 0.5:
                s.shutdown(socket.SHUT_WR)
                s.recv(1000)
            elif act < 0.7:
                time.sleep(r.random() * 0.05)
                s.recv(10)
            if r.random() < 0.5:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            s.close()
        except OSError:
            pass


def test_misbehaving_clients_under_load(mesh):
    """wrk with 100 connections while 8 threads of misbehaving clients hammer the listener:
    the worker survives, logs no internal error, serves afterwards, and every client
    connection is closed once the clients are gone."""
    p = wrk_start(mesh.port, 4, conns=100)
    threads = [threading.Thread(target=_chaos, args=(mesh.port, 4, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n, out = wrk_result(p)
    assert n > 100, out
    assert mesh.proc.popen.poll() is None
    with RawClient(mesh.port) as c:
        c.request(path="/")
        assert c.read_response().body == b"hello from web\n"
    deadline = time.time() + 15
    while time.time() < deadline and mesh.listener_stats()["downstream_cx_active"] > 0:
        time.sleep(0.2)
    assert mesh.listener_stats()["downstream_cx_active"] == 0
    log = mesh.proc.stderr_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


# ---------------------------------------------------------------- TLS chains on the engine

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tlscerts import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_mesh(engine, start_upstream, start_fastmesh, blob_server, pki):
    up = start_upstream("web")
    cfg = simple_config({"web": [up.address], "blob": [f"127.0.0.1:{blob_server}"]},
                        routes=[{"match": {"prefix": "/blob"}, "cluster": "blob"},
                                {"match": {"prefix": "/"}, "cluster": "web"}],
                        listener_extra={"max_request_body_bytes": 16 * 1024 * 1024,
                                        "tls": {"cert_chain_file": pki["server"],
                                                "private_key_file": pki["server_key"],
                                                "handshake_timeout_ms": 1000}})
    cfg["engine"] = engine
    fm = start_fastmesh(cfg, env={"FASTMESH_ENGINE": ""})
    fm.engine = engine
    return fm


def _tls_client(pki, port, rcvbuf=None):
    import ssl
    ctx = ssl.create_default_context(cafile=pki["ca"])
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(20)
    raw.connect(("127.0.0.1", port))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _tls_raw_client(pki, port) -> RawClient:
    """fmtest's RawClient (responses parsed by httptools) over a verified TLS connection."""
    import ssl
    c = RawClient(port, timeout=20)
    c.sock = ssl.create_default_context(cafile=pki["ca"]).wrap_socket(
        c.sock, server_hostname="localhost")
    return c


def test_tls_chain_served_by_the_engine(tls_mesh, pki):
    """A TLS listener's connections are the engine's (its events grow with TLS requests),
    keep-alive requests reuse the one connection, curl verifies the certificate."""
    eng0 = tls_mesh.stats()["server"]["worker_connections"][0]["engine"]
    assert eng0["name"] == tls_mesh.engine
    url = f"https://localhost:{tls_mesh.port}/"
    r = subprocess.run(["curl", "-s", "--max-time", "10", "--cacert", pki["ca"],
                        "--resolve", f"localhost:{tls_mesh.port}:127.0.0.1", url, url],
                       capture_output=True)
    assert r.stdout == b"hello from web\n" * 2, r
    with _tls_raw_client(pki, tls_mesh.port) as c:
        for i in range(30):
            c.request(path="/echo", headers={"x-n": str(i)})
            resp = c.read_response()
            assert resp.status == 200
            seen = dict(resp.json()["headers"])
            assert seen["x-n"] == str(i) and seen["x-forwarded-proto"] == "https"
    st = tls_mesh.listener_stats()
    # (curl's two requests share one connection)
    assert st["ssl.handshake"] == 2 and st["downstream_cx_total"] == 2, st
    eng1 = tls_mesh.stats()["server"]["worker_connections"][0]["engine"]
    assert eng1["engine.events"] - eng0["engine.events"] >= 30, (eng0, eng1)


def test_tls_20mb_download_to_a_slow_reader(tls_mesh, pki):
    """Back-pressure through the TLS engine on the I/O engine: every byte arrives, in
    order, to a client with a 4 KiB receive buffer."""
    with _tls_client(pki, tls_mesh.port, rcvbuf=4096) as s:
        _blob_to_a_slow_reader(s)


def test_tls_resets_stalls_and_handshake_timeouts(tls_mesh, pki):
    """Clients that reset mid-handshake, stall in it (the handshake timeout closes them), or
    reset mid-request: nothing wedges, every connection is closed, and the listener serves."""
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", tls_mesh.port))
        if i % 2:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        socks.append(s)
    for s in socks[:20]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    for _ in range(10):
        t = _tls_client(pki, tls_mesh.port)
        t.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\ncontent-length: 100000\r\n\r\nabc")
        t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        t.close()
    deadline = time.time() + 5           # the 20 left stall past the 1 s handshake timeout
    key = "downstream_cx_transport_socket_connect_timeout"
    while time.time() < deadline and tls_mesh.listener_stats()[key] < 20:
        time.sleep(0.05)
    while time.time() < deadline and tls_mesh.listener_stats()["downstream_cx_active"] > 0:
        time.sleep(0.05)
    st = tls_mesh.listener_stats()
    assert st[key] == 20 and st["downstream_cx_active"] == 0, st
    for s in socks[20:]:
        s.settimeout(2)
        assert s.recv(100) == b""       # closed by the proxy
        s.close()
    with _tls_raw_client(pki, tls_mesh.port) as c:
        c.request(path="/")
        assert c.read_response().body == b"hello from web\n"
    log = tls_mesh.proc.stderr_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
