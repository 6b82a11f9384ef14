"""Bolt and TCP through a real `fastmesh run` whose worker serves its data sockets with each
I/O engine (`engine: io_uring` / `epoll` in the config): the listener's client connections
and the upstream connections are the engine's. Real clients (raw sockets, a Bolt client),
real upstreams (threaded socket servers, benchmarks.boltload's echo server), and real hot
restarts (SIGHUP) whose connections migrate from one generation's engine to the next's.

The whole Bolt, TCP and operations suites also run on an engine by environment:
    FASTMESH_ENGINE=io_uring pytest integration/test_bolt_frames.py integration/test_tcp_proxy.py
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from fmtest import (REPO, BoltClient, Proc, free_port, get_json, pid_alive, supervisor_pid,
                    wait_gone, wait_new_generation)

try:
    from fastmesh._core import engine_uring
    URING_WHY = engine_uring.probe()
except ImportError as exc:
    URING_WHY = str(exc)

FRAMES = Path(__file__).resolve().parents[1] / "data" / "bolt-frames"
NO_ENV = {"FASTMESH_ENGINE": ""}        # the config's `engine` decides, not the CI's loop


@pytest.fixture(params=["io_uring", "epoll"])
def engine(request):
    if request.param == "io_uring" and URING_WHY is not None:
        pytest.skip(f"io_uring unavailable: {URING_WHY}")
    return request.param


def _engines(admin_port: int) -> list:
    return [w["engine"] for w in
            get_json(admin_port, "/stats")["server"]["worker_connections"]]


def _wait_open_transports(admin_port: int, want, timeout=5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = sum(e["engine.open_transports"] for e in _engines(admin_port))
        if want(n) or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


class _Server:
    """A real TCP server on a thread; `handle(conn)` runs per connection on its own thread."""

    def __init__(self, handle):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        with conn:
            try:
                self.handle(conn)
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def servers():
    made = []

    def make(handle):
        s = _Server(handle)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def _tcp_cfg(port: int, engine: str, **listener) -> dict:
    return {"engine": engine,
            "listeners": [dict({"name": "raw", "protocol": "tcp", "cluster": "up"}, **listener)],
            "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{port}"]}]}


def _recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def _echo(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


# ------------------------------------------------------------------------------ TCP

def test_tcp_client_and_upstream_connections_are_the_engines(engine, servers, start_fastmesh):
    srv = servers(_echo)
    fm = start_fastmesh(_tcp_cfg(srv.port, engine), env=NO_ENV)
    assert all(e["name"] == engine for e in _engines(fm.admin_port))
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    for i in range(20):
        s.sendall(b"ping %d" % i)
        assert s.recv(100) == b"ping %d" % i
    # the client's connection and its upstream connection: both served by the engine
    assert _wait_open_transports(fm.admin_port, lambda n: n == 2) == 2
    s.close()
    assert _wait_open_transports(fm.admin_port, lambda n: n == 0) == 0


def test_tcp_half_close_each_way(engine, servers, start_fastmesh):
    """The client's FIN reaches the upstream, which still answers after it; the upstream's
    FIN reaches the client, which still sends after it. Each side's EOF is passed through
    once everything before it was relayed."""
    got = {}

    def answer_after_eof(conn):
        data = _recv_all(conn)                  # until the client's FIN
        conn.sendall(b"got %d bytes: %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))

    def speak_first_then_listen(conn):
        conn.sendall(b"hello, and goodbye")
        conn.shutdown(socket.SHUT_WR)           # the server is done talking
        got["late"] = _recv_all(conn)           # ... but reads on

    a = servers(answer_after_eof)
    b = servers(speak_first_then_listen)
    cfg = {"engine": engine,
           "listeners": [{"name": "a", "protocol": "tcp", "cluster": "a"},
                         {"name": "b", "protocol": "tcp", "cluster": "b"}],
           "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{a.port}"]},
                        {"name": "b", "endpoints": [f"127.0.0.1:{b.port}"]}]}
    fm = start_fastmesh(cfg, env=NO_ENV)
    data = os.urandom(3 * 1024 * 1024 + 17)
    s = socket.create_connection(("127.0.0.1", fm.ports["a"]), timeout=10)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    assert _recv_all(s) == b"got %d bytes: %s" % (len(data), hashlib.sha256(data).hexdigest().encode())
    s.close()

    s = socket.create_connection(("127.0.0.1", fm.ports["b"]), timeout=10)
    assert _recv_all(s) == b"hello, and goodbye"        # EOF: the server's FIN came through
    late = os.urandom(1024 * 1024)
    s.sendall(late)                             # our side is still open, and relayed
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    s.close()
    deadline = time.monotonic() + 5
    while "late" not in got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got.get("late") == late
    assert _wait_open_transports(fm.admin_port, lambda n: n == 0) == 0


def test_tcp_large_transfers_through_slow_readers(engine, servers, start_fastmesh):
    """Back-pressure both ways with small water marks and tiny socket buffers: a 24 MiB
    download to a client that reads slowly at first, and a 24 MiB upload to an upstream
    that reads slowly at first; every byte arrives, in order."""
    blob = os.urandom(1024 * 1024) * 23 + os.urandom(1024 * 1024)
    blob_sha = hashlib.sha256(blob).hexdigest().encode()

    def send_blob(conn):
        conn.sendall(blob)

    def slow_sink(conn):
        h, n, t0 = hashlib.sha256(), 0, time.monotonic()
        while True:
            chunk = conn.recv(65536 if time.monotonic() - t0 > 1.0 else 4096)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            if time.monotonic() - t0 < 1.0:
                time.sleep(0.005)               # slow for a second: the proxy must hold
        conn.sendall(b"%d %s" % (n, h.hexdigest().encode()))

    down = servers(send_blob)
    up = servers(slow_sink)
    cfg = {"engine": engine,
           "listeners": [{"name": "down", "protocol": "tcp", "cluster": "down",
                          "high_water_bytes": 65536, "low_water_bytes": 16384},
                         {"name": "up", "protocol": "tcp", "cluster": "up",
                          "high_water_bytes": 65536, "low_water_bytes": 16384}],
           "clusters": [{"name": "down", "endpoints": [f"127.0.0.1:{down.port}"]},
                        {"name": "up", "endpoints": [f"127.0.0.1:{up.port}"]}]}
    fm = start_fastmesh(cfg, env=NO_ENV)

    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.settimeout(30)
    c.connect(("127.0.0.1", fm.ports["down"]))
    h, n, t0 = hashlib.sha256(), 0, time.monotonic()
    while True:
        chunk = c.recv(4096 if time.monotonic() - t0 < 1.0 else 1 << 20)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
        if time.monotonic() - t0 < 1.0:
            time.sleep(0.005)
    c.close()
    assert n == len(blob) and h.hexdigest().encode() == blob_sha

    c = socket.create_connection(("127.0.0.1", fm.ports["up"]), timeout=30)
    c.sendall(blob)
    c.shutdown(socket.SHUT_WR)
    assert _recv_all(c) == b"%d %s" % (len(blob), blob_sha)
    c.close()
    st = fm.stats()["listeners"]
    assert st["down"]["downstream_cx_total"] == 1 and st["up"]["downstream_rx_bytes"] == len(blob)
    assert _wait_open_transports(fm.admin_port, lambda n: n == 0) == 0


def test_tcp_bad_input_never_crashes_the_worker(engine, servers, start_fastmesh):
    """Resets from either side in the middle of a transfer, an upstream that refuses:
    each connection ends, the worker keeps serving, nothing is left open."""
    def reset_midway(conn):
        conn.recv(1000)
        conn.sendall(os.urandom(100000))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()

    srv = servers(reset_midway)
    refused = free_port()
    cfg = {"engine": engine,
           "listeners": [{"name": "rst", "protocol": "tcp", "cluster": "rst"},
                         {"name": "gone", "protocol": "tcp", "cluster": "gone"}],
           "clusters": [{"name": "rst", "endpoints": [f"127.0.0.1:{srv.port}"]},
                        {"name": "gone", "endpoints": [f"127.0.0.1:{refused}"]}]}
    fm = start_fastmesh(cfg, env=NO_ENV)
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", fm.ports["rst"]), timeout=10)
        try:
            s.sendall(os.urandom(5000))
            if i % 2:                           # the client resets too, mid-stream
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            else:
                while s.recv(65536):
                    pass
        except OSError:
            pass
        s.close()
        try:
            # (the refused upstream is known so fast that the reset may beat connect())
            s = socket.create_connection(("127.0.0.1", fm.ports["gone"]), timeout=10)
            assert s.recv(10) == b""
            s.close()
        except ConnectionResetError:
            pass
    assert fm.proc.popen.poll() is None
    assert _wait_open_transports(fm.admin_port, lambda n: n == 0) == 0
    assert "Traceback" not in fm.proc.output()


# ------------------------------------------------------------------------------ Bolt

def _start_bolt_echo(procs, delay_ms=0) -> int:
    port = free_port()
    procs.append(Proc([sys.executable, "-m", "benchmarks.boltload", "echo-server", "--listen",
                       f"127.0.0.1:{port}", "--delay-ms", str(delay_ms)], name="bolt echo",
                      cwd=str(REPO)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return port


def _bolt_cfg(echo_port: int, engine: str) -> dict:
    return {"engine": engine,
            "admin": {"address": f"127.0.0.1:{free_port()}"},
            "drain_timeout_ms": 20000,
            "listeners": [{"name": "rpc", "address": f"127.0.0.1:{free_port()}",
                           "protocol": "bolt", "route_table": "rpc"}],
            "route_tables": {"rpc": {"routes": [
                {"match": {"headers": [{"name": "service", "present": True}]},
                 "cluster": "echo"}]}},
            "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{echo_port}"]}]}


def _request(i: int) -> bytes:
    from fastmesh._core import bolt
    frame = bytearray(bytes.fromhex((FRAMES / "bolt_request.hex").read_text().strip()))
    bolt.py_frame_set_id(frame, i)
    return bytes(frame)


def test_bolt_client_and_upstream_connections_are_the_engines(engine, procs, start_fastmesh):
    port = _start_bolt_echo(procs)
    cfg = _bolt_cfg(port, engine)
    fm = start_fastmesh(cfg, env=NO_ENV)
    c = BoltClient(fm.port)
    c.send(b"".join(_request(i) for i in range(1, 201)))      # pipelined
    ids = [c.read_frame()["request_id"] for _ in range(200)]
    assert sorted(ids) == list(range(1, 201))
    # the client's connection and the multiplexed upstream connection
    assert _wait_open_transports(fm.admin_port, lambda n: n >= 2) >= 2
    assert all(e["name"] == engine for e in _engines(fm.admin_port))
    c.send(b"\x01" * 64)                        # junk: the connection is cut, nothing else
    c.sock.settimeout(5)
    try:
        assert c.sock.recv(100) == b""
    except ConnectionResetError:
        pass
    c.close()
    c = BoltClient(fm.port)
    c.send(_request(7))
    assert c.read_frame()["request_id"] == 7
    c.close()
    assert fm.stats()["listeners"]["rpc"]["downstream_cx_total"] == 2


def _worker_engines_after_restart(d) -> list:
    return _engines(d.admin_port)


def test_migrated_bolt_connection_with_calls_in_flight(engine, deployment, procs):
    """A hot restart while calls are in flight (a slow service: 300 ms a call): the old
    generation stops reading, lets them finish, and hands the connection (and what it
    received meanwhile) to the new generation, whose engine adopts it. Calls sent during
    the hand-over are answered; the client never reconnects."""
    port = _start_bolt_echo(procs, delay_ms=300)
    cfg = _bolt_cfg(port, engine)
    d = deployment(cfg)
    d.start(env=NO_ENV)
    c = BoltClient(int(cfg["listeners"][0]["address"].rsplit(":", 1)[1]), timeout=20)
    c.send(_request(1))
    assert c.read_frame()["request_id"] == 1
    old = supervisor_pid(d.admin_port)
    c.send(_request(2) + _request(3))           # in flight when the restart begins
    d.hup()
    sent = [2, 3]
    for i in range(4, 40):                      # and more while it is handed over
        c.send(_request(i))
        sent.append(i)
        time.sleep(0.02)
    wait_new_generation(d.admin_port, old)
    got = sorted(c.read_frame()["request_id"] for _ in sent)
    assert got == sent
    wait_gone(old, 20)
    c.send(_request(100))
    f = c.read_frame()
    assert f["request_id"] == 100 and f["status"] == 0
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["rpc"]["downstream_cx_total"] == 1      # adopted, not reconnected
    engines = _worker_engines_after_restart(d)
    assert all(e["name"] == engine for e in engines)
    # the adopted client connection and its upstream: the new generation's engine's
    assert sum(e["engine.open_transports"] for e in engines) >= 2
    c.close()


def test_migrated_tcp_connection_continues_on_the_new_engine(engine, deployment, servers):
    srv = servers(_echo)
    cfg = {"engine": engine,
           "admin": {"address": f"127.0.0.1:{free_port()}"},
           "drain_timeout_ms": 5000,
           "listeners": [{"name": "raw", "address": f"127.0.0.1:{free_port()}",
                          "protocol": "tcp", "cluster": "up"}],
           "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{srv.port}"]}]}
    d = deployment(cfg)
    d.start(env=NO_ENV)
    s = socket.create_connection(("127.0.0.1", int(cfg["listeners"][0]["address"].rsplit(":", 1)[1])),
                                 timeout=10)
    for gen in range(2):
        s.sendall(b"before %d" % gen)
        assert s.recv(100) == b"before %d" % gen
        time.sleep(0.7)                         # quiet both ways: migratable
        old = supervisor_pid(d.admin_port)
        d.hup()
        wait_new_generation(d.admin_port, old)
        wait_gone(old, 10)
        data = os.urandom(2 * 1024 * 1024)
        s.sendall(data)                         # same connection, the new process's engine
        got = bytearray()
        while len(got) < len(data):
            got += s.recv(1 << 20)
        assert bytes(got) == data
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["raw"]["downstream_cx_total"] == 1
    engines = _engines(d.admin_port)
    assert all(e["name"] == engine for e in engines)
    # the 2 MiB stream is bulk: the splice relay takes its two sockets over from the engine
    # (epoll: at once; io_uring: once the armed receives are cancelled and the sends done),
    # in each generation
    spliced = st["listeners"]["raw"]["downstream_cx_spliced"]
    assert spliced >= 1
    assert sum(e["engine.open_transports"] for e in engines) == 0
    s.shutdown(socket.SHUT_WR)
    assert s.recv(10) == b""
    s.close()


def test_bolt_connection_migrates_between_engines(deployment, procs):
    """The config's `engine` changes between hot restarts (it is read once per process):
    one Bolt connection moves uvloop -> epoll -> io_uring -> uvloop, each generation adopting
    the descriptor (and any unread bytes) into its own transports; every call is answered
    and the client never reconnects."""
    order = ["uvloop", "epoll"] + (["io_uring"] if URING_WHY is None else []) + ["uvloop"]
    port = _start_bolt_echo(procs)
    cfg = _bolt_cfg(port, order[0])
    d = deployment(cfg)
    d.start(env=NO_ENV)
    c = BoltClient(int(cfg["listeners"][0]["address"].rsplit(":", 1)[1]), timeout=20)
    n = 0

    def calls(k):
        nonlocal n
        for _ in range(k):
            n += 1
            c.send(_request(n))
            f = c.read_frame()
            assert f["request_id"] == n and f["status"] == 0

    for eng in order[1:]:
        calls(10)
        cfg["engine"] = eng
        d.write(cfg)
        old = supervisor_pid(d.admin_port)
        d.hup()
        wait_new_generation(d.admin_port, old)
        calls(10)                               # during the hand-over
        wait_gone(old, 20)
        calls(10)
        engines = _engines(d.admin_port)
        assert all((e or {"name": "uvloop"})["name"] == eng for e in engines), (eng, engines)
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["rpc"]["downstream_cx_total"] == 1      # adopted, not reconnected
    c.close()


@pytest.mark.parametrize("kind", ["uvloop", "epoll", "io_uring"])
def test_partial_bolt_frame_migrates_with_the_connection(kind, deployment, procs):
    """Half a request is read by the old generation when the hot restart comes: it goes to
    the new generation with the descriptor and is fed to the new protocol before anything
    the new transport reads, so the rest completes it and the call is answered."""
    if kind == "io_uring" and URING_WHY is not None:
        pytest.skip(f"io_uring unavailable: {URING_WHY}")
    port = _start_bolt_echo(procs)
    cfg = _bolt_cfg(port, kind)
    d = deployment(cfg)
    d.start(env=NO_ENV)
    c = BoltClient(int(cfg["listeners"][0]["address"].rsplit(":", 1)[1]), timeout=20)
    c.send(_request(1))
    assert c.read_frame()["request_id"] == 1
    req = _request(2)
    c.send(req[:20])                            # half a frame: the old generation holds it
    time.sleep(0.3)
    old = supervisor_pid(d.admin_port)
    d.hup()
    wait_new_generation(d.admin_port, old)
    wait_gone(old, 20)
    c.send(req[20:])                            # the rest, to the new generation
    f = c.read_frame()
    assert f["request_id"] == 2 and f["status"] == 0
    c.send(_request(3))
    assert c.read_frame()["request_id"] == 3
    st = get_json(d.admin_port, "/stats")
    assert st["listeners"]["rpc"]["downstream_cx_total"] == 1
    assert st["listeners"]["rpc"]["error_bad_frame"] == 0
    c.close()
