"""Raw TCP listeners: bytes relayed both ways, half-close passed through, bulk transfer
intact, connect failures counted. On uvloop and plain asyncio."""
from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from fmtest import free_port


@pytest.fixture
def echo_server():
    """A thread echoing bytes back until EOF, then closing (a real socket server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


def _cfg(port):
    return {"listeners": [{"name": "raw", "protocol": "tcp", "cluster": "echo"}],
            "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{port}"]}]}


def test_relay_bulk_and_half_close(start_fastmesh, echo_server, loop_kind):
    fm = start_fastmesh(_cfg(echo_server), loop=loop_kind)
    data = os.urandom(8 * 1024 * 1024)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    got = bytearray()

    def reader():
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got.extend(chunk)
    t = threading.Thread(target=reader)
    t.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)              # half-close: the echo still comes back, then EOF
    t.join(20)
    s.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    st = fm.listener_stats("raw")
    assert st["downstream_cx_total"] == 1 and st["downstream_rx_bytes"] == len(data)


def test_connect_failure_closes_client(start_fastmesh, loop_kind):
    fm = start_fastmesh(_cfg(free_port()), loop=loop_kind)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    s.settimeout(10)
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass
    s.close()
    assert fm.listener_stats("raw")["error_connect_failed"] == 1


def test_client_bytes_wait_for_a_slow_upstream_connect(start_fastmesh, loop_kind):
    """The client sends megabytes before the upstream has accepted: fastmesh buffers up to
    its cap, stops reading, and delivers every byte once connected (a regression test for
    a pause issued inside connection_made, which uvloop ignores)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = bytearray()

    def slow_sink():
        import time
        time.sleep(0.8)                         # the kernel queues the SYN meanwhile
        conn, _ = srv.accept()
        with conn:
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                got.extend(chunk)
    t = threading.Thread(target=slow_sink)
    t.start()
    fm = start_fastmesh(_cfg(srv.getsockname()[1]), loop=loop_kind)
    data = os.urandom(4 * 1024 * 1024)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    t.join(20)
    s.close()
    srv.close()
    assert len(got) == len(data) and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_server_first_greeting_arrives_at_once(start_fastmesh, loop_kind):
    """A server-first protocol (SMTP, MySQL): the upstream speaks as soon as it accepts, and
    its greeting reaches the silent client at once, every time (on asyncio the greeting
    could be read before the upstream was linked to its client, and then waited for the
    upstream's next bytes)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.sendall(b"220 ready\r\n")
            threading.Thread(target=lambda c=conn: (c.recv(100), c.close()), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    try:
        fm = start_fastmesh(_cfg(srv.getsockname()[1]), loop=loop_kind)
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as c:
                assert c.recv(100) == b"220 ready\r\n"
    finally:
        stop.set()
        srv.close()


def test_backpressure_holds_after_a_slow_connect(start_fastmesh, loop_kind):
    """The upstream's accept queue is full, so fastmesh's connect waits for a SYN retry
    (~1 s) while the client keeps sending: the receive buffer fills and reading stops. Once
    connected, what was buffered fills the upstream side past its high water at once; the
    client must stay paused until that drains (it was read again regardless, and a slow
    upstream let the proxy's memory grow by everything the client sent: seen on the
    io_uring engine, whose connects complete later). Every byte arrives; the worker's memory
    stays within its bounds (io_uring: the buffer ring's pages and a paused connection's
    stash, 30-42 MiB seen, peaks included; uvloop: a few MiB), far below the 96 MiB sent
    (the defect grew it by 128 MiB on io_uring): the bound is 64 MiB."""
    import time
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    blocker = socket.create_connection(srv.getsockname(), timeout=5)    # fills the queue
    total = 96 * 1024 * 1024
    h = hashlib.sha256()
    n = [0]

    def slow_sink():
        time.sleep(0.3)
        first, _ = srv.accept()                 # the blocker: the retried SYN gets in
        first.close()
        conn, _ = srv.accept()
        with conn:
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                n[0] += len(chunk)
                h.update(chunk)
                time.sleep(0.002)               # ~30 MB/s at most: slower than the client
    t = threading.Thread(target=slow_sink)
    t.start()
    fm = start_fastmesh(_cfg(srv.getsockname()[1]), loop=loop_kind)
    wpid = fm.worker_pids()[0]

    def rss_kib():
        with open(f"/proc/{wpid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    before = rss_kib()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib())
            time.sleep(0.05)
    w = threading.Thread(target=watch)
    w.start()
    data = os.urandom(1 << 20)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=30)
    for _ in range(total >> 20):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    t.join(60)
    done.set()
    w.join(5)
    s.close()
    srv.close()
    blocker.close()
    assert n[0] == total
    assert h.digest() == hashlib.sha256(data * (total >> 20)).digest()
    assert peak[0] - before < 64 * 1024, (before, peak[0])
