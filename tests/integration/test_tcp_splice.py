"""TCP listeners' bulk streams go through splice(2) (fastmesh/_core/splice.pyx): bytes intact
both ways, back-pressure without loss or user-space memory, resets on either side, no
descriptor left behind, and a quiet spliced connection still migrates in a hot restart.
Also the tcp listener's idle timeout, on both paths. Real sockets and processes; on uvloop
and plain asyncio."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from fmtest import free_port, get_json, supervisor_pid, wait_gone, wait_new_generation

MB = 1024 * 1024


class Server:
    """A threaded TCP server: `handler(conn)` runs per connection."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.done = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            with conn:
                self.done.append(self.handler(conn))
        except OSError as exc:
            self.done.append(exc)

    def close(self):
        self.sock.close()


def echo(conn):
    n = 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        n += len(data)
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    return n


def _blocks(total: int):
    """Deterministic non-repeating bytes (a hash chain), 1 MiB at a time."""
    seed = b"fastmesh"
    sent = 0
    while sent < total:
        block = hashlib.shake_256(seed + struct.pack("<Q", sent)).digest(MB)
        sent += len(block)
        yield block


def _expected_digest(total: int) -> bytes:
    h = hashlib.sha256()
    for b in _blocks(total):
        h.update(b)
    return h.digest()


def _cfg(port):
    return {"listeners": [{"name": "raw", "protocol": "tcp", "cluster": "up"}],
            "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{port}"]}]}


def _fds(fm) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in fm.worker_pids())


def _wait(cond, timeout_s=10.0, what="condition"):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _settled(fm, fds_before):
    _wait(lambda: fm.listener_stats("raw")["downstream_cx_active"] == 0, what="no connection")
    _wait(lambda: _fds(fm) == fds_before, what=f"the worker's descriptors back to {fds_before}")


def _read_all(s, h=None, limit_s=30.0):
    n = 0
    s.settimeout(limit_s)
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return n
        n += len(chunk)
        if h is not None:
            h.update(chunk)


def test_bulk_both_ways_is_spliced_and_intact(start_fastmesh, loop_kind):
    srv = Server(echo)
    fm = start_fastmesh(_cfg(srv.port), loop=loop_kind)
    fds_before = _fds(fm)
    total = 24 * MB
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    got = hashlib.sha256()
    counted = []
    t = threading.Thread(target=lambda: counted.append(_read_all(s, got)))
    t.start()
    for b in _blocks(total):
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)              # half-close: the echo still comes back, then EOF
    t.join(30)
    s.close()
    assert counted == [total]
    assert got.digest() == _expected_digest(total)
    st = fm.listener_stats("raw")
    assert st["downstream_cx_spliced"] == 1
    assert st["downstream_rx_bytes"] == total
    _settled(fm, fds_before)                # the pipes and the dups are closed
    srv.close()


def test_splice_can_be_turned_off(start_fastmesh, loop_kind):
    srv = Server(echo)
    fm = start_fastmesh(_cfg(srv.port), loop=loop_kind, env={"FASTMESH_TCP_SPLICE": "0"})
    total = 8 * MB
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    got = hashlib.sha256()
    t = threading.Thread(target=_read_all, args=(s, got))
    t.start()
    for b in _blocks(total):
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
    t.join(30)
    s.close()
    assert got.digest() == _expected_digest(total)
    st = fm.listener_stats("raw")
    assert st["downstream_cx_spliced"] == 0 and st["downstream_rx_bytes"] == total
    srv.close()


def test_slow_reader_holds_the_upstream_without_loss_or_memory(start_fastmesh, loop_kind):
    """The upstream pushes 96 MiB at once; the client reads nothing for 1.5 s, then
    everything. What cannot go on waits in the sockets and the pipe (bounded), not in the
    worker's memory; every byte arrives in order."""
    total = 96 * MB

    def push(conn):
        conn.settimeout(30)
        assert conn.recv(2) == b"go"
        for b in _blocks(total):
            conn.sendall(b)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):             # until the client's close comes through (closing
            pass                            # with unread bytes would send RST: data lost)
    srv = Server(push)
    fm = start_fastmesh(_cfg(srv.port), loop=loop_kind)
    wpid = fm.worker_pids()[0]
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    s.sendall(b"go")
    time.sleep(1.5)
    rss_before = _rss_kib(wpid)
    got = hashlib.sha256()
    assert _read_all(s, got) == total
    s.close()
    assert got.digest() == _expected_digest(total)
    assert fm.listener_stats("raw")["downstream_cx_spliced"] == 1
    assert _rss_kib(wpid) - rss_before < 16 * 1024
    srv.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _reset(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_upstream_reset_mid_stream_ends_the_client(start_fastmesh, loop_kind):
    def push_then_reset(conn):
        conn.recv(2)
        for i, b in enumerate(_blocks(8 * MB)):
            conn.sendall(b)
        time.sleep(0.3)
        _reset(conn)                        # close() now sends RST
    srv = Server(push_then_reset)
    fm = start_fastmesh(_cfg(srv.port), loop=loop_kind)
    fds_before = _fds(fm)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    s.sendall(b"go")
    n = 0
    try:
        n = _read_all(s, limit_s=10)
    except ConnectionResetError:
        pass
    s.close()
    assert n <= 8 * MB
    assert fm.listener_stats("raw")["downstream_cx_spliced"] == 1
    _settled(fm, fds_before)
    srv.close()


def test_client_reset_mid_upload_ends_the_upstream(start_fastmesh, loop_kind):
    seen = threading.Event()

    def sink(conn):
        conn.settimeout(10)
        n = 0
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                n += len(data)
        except (ConnectionResetError, socket.timeout):
            pass
        seen.set()
        return n
    srv = Server(sink)
    fm = start_fastmesh(_cfg(srv.port), loop=loop_kind)
    fds_before = _fds(fm)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    for b in _blocks(8 * MB):
        s.sendall(b)
    _wait(lambda: fm.listener_stats("raw")["downstream_cx_spliced"] == 1, what="spliced")
    _reset(s)
    s.close()
    assert seen.wait(10), "the upstream connection was not ended"
    _settled(fm, fds_before)
    srv.close()


def test_quiet_spliced_connection_migrates(deployment, loop_kind):
    srv = Server(echo)
    cfg = {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": 5000,
        "listeners": [{"name": "raw", "address": f"127.0.0.1:{free_port()}",
                       "protocol": "tcp", "cluster": "up"}],
        "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{srv.port}"]}],
    }
    d = deployment(cfg, loop=loop_kind)
    d.start()
    port = int(cfg["listeners"][0]["address"].rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    total = 4 * MB
    got = hashlib.sha256()
    n = 0
    blocks = list(_blocks(total))
    w = threading.Thread(target=lambda: [s.sendall(b) for b in blocks])
    w.start()
    while n < total:
        chunk = s.recv(1 << 20)
        assert chunk
        n += len(chunk)
        got.update(chunk)
    w.join(10)
    assert got.digest() == _expected_digest(total)
    st = get_json(d.admin_port, "/stats")["listeners"]["raw"]
    assert st["downstream_cx_spliced"] == 1
    time.sleep(0.7)                            # quiet both ways: migratable
    old = supervisor_pid(d.admin_port)
    d.hup()
    wait_new_generation(d.admin_port, old)
    wait_gone(old)
    s.sendall(b"still here")                   # same client connection, new process
    assert s.recv(100) == b"still here"
    s.close()
    st = get_json(d.admin_port, "/stats")["listeners"]["raw"]
    assert st["downstream_cx_total"] == 1      # adopted, not reconnected
    srv.close()


@pytest.mark.parametrize("bulk", [False, True], ids=["plain", "spliced"])
def test_idle_timeout_closes_both_sides(start_fastmesh, bulk):
    """idle_timeout_ms on a tcp listener (Envoy's tcp_proxy idle_timeout): no byte either
    way for that long closes the client and the upstream connection, on either path."""
    srv = Server(echo)
    cfg = _cfg(srv.port)
    cfg["listeners"][0]["idle_timeout_ms"] = 800
    fm = start_fastmesh(cfg)
    fds_before = _fds(fm)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    s.settimeout(10)
    data = b"x" * (2 * MB if bulk else 100)
    threading.Thread(target=s.sendall, args=(data,), daemon=True).start()
    n = 0
    while n < len(data):
        chunk = s.recv(1 << 20)
        assert chunk
        n += len(chunk)
    quiet = time.monotonic()
    assert s.recv(1) == b""                     # closed by the proxy
    took = time.monotonic() - quiet
    s.close()
    assert 0.6 <= took <= 2.0, took
    st = fm.listener_stats("raw")
    assert st["downstream_cx_idle_closed"] == 1
    assert st["downstream_cx_spliced"] == (1 if bulk else 0)
    _wait(lambda: len(srv.done) == 1, what="the upstream connection closed")
    _settled(fm, fds_before)
    srv.close()


def test_slow_upstream_holds_the_client_without_loss(start_fastmesh, loop_kind):
    """The other direction: the client uploads 64 MiB to an upstream that reads nothing for
    1.5 s. The client is held back (its sends block), nothing piles up in the worker, and
    the upstream receives every byte in order."""
    total = 64 * MB
    got = hashlib.sha256()

    def slow_sink(conn):
        time.sleep(1.5)
        n = 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            n += len(data)
            got.update(data)
        return n
    srv = Server(slow_sink)
    fm = start_fastmesh(_cfg(srv.port), loop=loop_kind)
    wpid = fm.worker_pids()[0]
    rss_before = _rss_kib(wpid)
    s = socket.create_connection(("127.0.0.1", fm.port), timeout=30)
    for b in _blocks(total):
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(30)
    assert s.recv(1) == b""                     # the upstream's close comes back
    s.close()
    _wait(lambda: len(srv.done) == 1, 30, "the upstream to finish")
    assert srv.done == [total]
    assert got.digest() == _expected_digest(total)
    assert fm.listener_stats("raw")["downstream_cx_spliced"] == 1
    assert _rss_kib(wpid) - rss_before < 16 * 1024
    srv.close()


def test_busy_spliced_connection_is_closed_at_the_drain_deadline(deployment):
    """A hot restart with a stream still moving: it cannot migrate (never quiet), so the
    old generation closes it when its drain time is up, and exits."""
    def push_forever(conn):
        conn.settimeout(30)
        block = b"y" * MB
        try:
            while True:
                conn.sendall(block)
        except OSError:
            pass
    srv = Server(push_forever)
    cfg = {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": 1500,
        "listeners": [{"name": "raw", "address": f"127.0.0.1:{free_port()}",
                       "protocol": "tcp", "cluster": "up"}],
        "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{srv.port}"]}],
    }
    d = deployment(cfg)
    d.start()
    port = int(cfg["listeners"][0]["address"].rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    n = 0
    while n < 8 * MB:
        n += len(s.recv(1 << 20))
    assert get_json(d.admin_port, "/stats")["listeners"]["raw"]["downstream_cx_spliced"] == 1
    old = supervisor_pid(d.admin_port)
    d.hup()
    wait_new_generation(d.admin_port, old)
    started = time.monotonic()
    try:
        while True:                             # keeps reading: the stream stays busy
            chunk = s.recv(1 << 20)
            if not chunk:
                break
    except ConnectionResetError:
        pass
    took = time.monotonic() - started
    s.close()
    assert took < 10, took
    wait_gone(old)
    srv.close()


def test_out_of_descriptors_stays_on_the_ordinary_path(start_fastmesh):
    """The worker has descriptors for the two sockets and the relay's dups but not for its
    pipes (its RLIMIT_NOFILE lowered under it): the bulk stream is relayed through user
    space, intact."""
    import resource
    srv = Server(echo)
    fm = start_fastmesh(_cfg(srv.port))
    wpid = fm.worker_pids()[0]
    soft, hard = resource.prlimit(wpid, resource.RLIMIT_NOFILE)
    fds = [int(x) for x in os.listdir(f"/proc/{wpid}/fd")]
    # new descriptors take the lowest free numbers: room for the client's socket, the
    # upstream socket and the relay's two dups, not for its pipes (one end of one at most)
    free_below = max(fds) + 1 - len(fds)
    assert free_below <= 5, sorted(fds)
    resource.prlimit(wpid, resource.RLIMIT_NOFILE, (max(fds) + 1 + 5 - free_below, hard))
    try:
        total = 8 * MB
        s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
        got = hashlib.sha256()
        t = threading.Thread(target=_read_all, args=(s, got))
        t.start()
        for b in _blocks(total):
            s.sendall(b)
        s.shutdown(socket.SHUT_WR)
        t.join(30)
        s.close()
        assert got.digest() == _expected_digest(total)
        st = fm.listener_stats("raw")
        assert st["downstream_cx_spliced"] == 0 and st["downstream_rx_bytes"] == total
    finally:
        resource.prlimit(wpid, resource.RLIMIT_NOFILE, (soft, hard))
    srv.close()


def test_many_bulk_streams_at_once(start_fastmesh, loop_kind):
    """16 clients echo 4 MiB each at the same time: every stream spliced, every byte back
    to its own client in order, every descriptor closed afterwards."""
    srv = Server(echo)
    fm = start_fastmesh(_cfg(srv.port), loop=loop_kind)
    fds_before = _fds(fm)
    total = 4 * MB
    results = {}

    def client(i):
        s = socket.create_connection(("127.0.0.1", fm.port), timeout=20)
        data = hashlib.shake_256(b"client %d" % i).digest(total)
        got = hashlib.sha256()
        t = threading.Thread(target=_read_all, args=(s, got))
        t.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        t.join(60)
        s.close()
        results[i] = got.digest() == hashlib.sha256(data).digest()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert results == {i: True for i in range(16)}
    assert fm.listener_stats("raw")["downstream_cx_spliced"] == 16
    _settled(fm, fds_before)
    srv.close()
