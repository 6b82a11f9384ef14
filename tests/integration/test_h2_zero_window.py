"""An HTTP/2 client that advertises a zero flow-control window and never opens it must not
pin its stream (and the upstream stream or connection behind it) for ever: streams whose
response has waited for the client's window for the listener's `stream_idle_timeout_ms`
are reset both ways and counted (`error_stream_idle_timeout`). A raw client built on the
`h2` package, against the h2c echo server (HTTP/2 cluster) and the demo upstream (HTTP/1)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmtest import START_TIMEOUT_S, Proc, _wait_line

h2conn = pytest.importorskip("h2.connection")
import h2.config  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402

ECHO = Path(__file__).parent.parent / "interop" / "h2c_echo.py"


@pytest.fixture
def setup(procs, start_upstream, start_fastmesh, loop_kind):
    p = Proc([sys.executable, str(ECHO), "--port", "0", "--loop", loop_kind], name="h2c echo")
    procs.append(p)
    echo = int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
    web = start_upstream("web", loop_kind)
    cfg = {"listeners": [{"name": "h2", "protocol": "http2", "route_table": "rt",
                          "stream_idle_timeout_ms": 800}],
           "route_tables": {"rt": {"routes": [
               {"match": {"prefix": "/t/"}, "cluster": "h2echo"},
               {"match": {"prefix": "/"}, "cluster": "web"}]}},
           "clusters": [{"name": "h2echo", "endpoints": [f"127.0.0.1:{echo}"],
                         "http_protocol": "http2"},
                        {"name": "web", "endpoints": [web.address]}]}
    return start_fastmesh(cfg, loop=loop_kind), echo


def zero_window_client(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    c = h2conn.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    s.sendall(c.data_to_send())
    return s, c


def events_until(s, c, want, timeout):
    """Read frames (never opening a window) until an event of type `want` or timeout."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except socket.timeout:
            break
        if not data:
            break
        for ev in c.receive_data(data):
            got.append(ev)
            if isinstance(ev, want):
                return got
        out = c.data_to_send()
        if out:
            s.sendall(out)
    return got


@pytest.mark.parametrize("path", ["/t/bytes/1000000", "/bytes/1000000"])
def test_zero_window_stream_is_reset_after_the_stream_idle_timeout(setup, path):
    fm, echo = setup
    s, c = zero_window_client(fm.port)
    c.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "http"),
                       (":authority", "x")], end_stream=True)
    s.sendall(c.data_to_send())
    t0 = time.monotonic()
    evs = events_until(s, c, h2.events.StreamReset, 5)
    elapsed = time.monotonic() - t0
    resets = [e for e in evs if isinstance(e, h2.events.StreamReset)]
    assert any(isinstance(e, h2.events.ResponseReceived) for e in evs)
    assert not any(isinstance(e, h2.events.DataReceived) and e.data for e in evs)
    assert resets and resets[0].stream_id == 1 and resets[0].error_code == 8   # CANCEL
    assert 0.7 < elapsed < 3.0, elapsed
    # the connection itself goes on: a request with a window of its own is answered
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    c.send_headers(3, [(":method", "GET"), (":path", "/t/x"), (":scheme", "http"),
                       (":authority", "x")], end_stream=True)
    s.sendall(c.data_to_send())
    evs = events_until(s, c, h2.events.StreamEnded, 5)
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 3 for e in evs)
    s.close()
    st = fm.listener_stats("h2")
    assert st["error_stream_idle_timeout"] == 1
    assert st["downstream_rq_active"] == 0
    if path.startswith("/t/"):              # the upstream stream was cancelled too
        out = subprocess.run(["curl", "-s", "--http2-prior-knowledge",
                              f"http://127.0.0.1:{echo}/t/stats"], capture_output=True,
                             timeout=10)
        assert json.loads(out.stdout)["resets"].get("8", 0) >= 1
    assert fm.cluster_stats("h2echo" if path.startswith("/t/") else "web")[
        "upstream_rq_active"] == 0


def test_stall_protection_off_with_zero(procs, start_fastmesh, start_upstream):
    web = start_upstream("web")
    fm = start_fastmesh({"listeners": [{"name": "h2", "protocol": "http2", "route_table": "rt",
                                        "stream_idle_timeout_ms": 0}],
                         "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"},
                                                             "cluster": "web"}]}},
                         "clusters": [{"name": "web", "endpoints": [web.address]}]})
    s, c = zero_window_client(fm.port)
    c.send_headers(1, [(":method", "GET"), (":path", "/bytes/100000"), (":scheme", "http"),
                       (":authority", "x")], end_stream=True)
    s.sendall(c.data_to_send())
    evs = events_until(s, c, h2.events.StreamReset, 1.5)
    assert not any(isinstance(e, h2.events.StreamReset) for e in evs)
    assert fm.listener_stats("h2")["error_stream_idle_timeout"] == 0
    s.close()


class ZeroWindowUpstream:
    """An HTTP/2 server (the `h2` package, threads) that never gives back flow-control
    window: a request body stops after the first 64 KiB. Records the resets it receives."""

    def __init__(self):
        import threading
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.resets = []
        self.requests = 0
        self.stop = False
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        import threading
        self.lsock.settimeout(0.2)
        while not self.stop:
            try:
                s, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return                          # closed
            threading.Thread(target=self.conn, args=(s,), daemon=True).start()

    def conn(self, s):
        # the default 64 KiB window, never given back: after 64 KiB of a body, zero
        c = h2conn.H2Connection(h2.config.H2Configuration(client_side=False))
        c.initiate_connection()
        s.sendall(c.data_to_send())
        s.settimeout(0.2)
        while not self.stop:
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    self.requests += 1
                elif isinstance(ev, h2.events.StreamReset):
                    self.resets.append(ev.error_code)
            out = c.data_to_send()
            if out:
                s.sendall(out)

    def close(self):
        self.stop = True
        self.lsock.close()


def test_upstream_zero_window_ends_the_request_with_504(start_fastmesh, loop_kind):
    up = ZeroWindowUpstream()
    try:
        fm = start_fastmesh({
            "listeners": [{"name": "h2", "protocol": "http2", "route_table": "rt",
                           "stream_idle_timeout_ms": 800}],
            "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "stuck",
                                                "timeout_ms": 0}]}},
            "clusters": [{"name": "stuck", "endpoints": [f"127.0.0.1:{up.port}"],
                          "http_protocol": "http2"}]}, loop=loop_kind)
        s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
        c = h2conn.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        c.send_headers(1, [(":method", "POST"), (":path", "/upload"), (":scheme", "http"),
                           (":authority", "x")])
        s.sendall(c.data_to_send())
        sent, evs = 0, []
        t0 = time.monotonic()
        total = 4_000_000
        while sent < total and time.monotonic() - t0 < 0.5:   # as much as the proxy takes
            n = min(c.local_flow_control_window(1), 16000, total - sent)
            if n:
                c.send_data(1, b"z" * n)
                sent += n
                s.sendall(c.data_to_send())
                continue
            evs += events_until(s, c, h2.events.WindowUpdated, 0.1)
        assert 65535 <= sent < total        # the proxy's window + the upstream's are the limit
        evs += events_until(s, c, h2.events.StreamEnded, 5)
        elapsed = time.monotonic() - t0
        rsp = [e for e in evs if isinstance(e, h2.events.ResponseReceived)]
        assert rsp and dict(rsp[0].headers)[b":status"] == b"504", evs
        assert dict(rsp[0].headers)[b"x-fastmesh-error"] == b"stream_idle_timeout"
        assert 0.7 < elapsed < 3.0, elapsed
        s.close()
        deadline = time.monotonic() + 3
        while not up.resets and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up.requests == 1 and up.resets == [8]          # RST_STREAM(CANCEL)
        st = fm.listener_stats("h2")
        assert st["error_stream_idle_timeout"] == 1 and st["downstream_rsp_5xx"] == 1
        assert fm.cluster_stats("stuck")["upstream_rq_active"] == 0
    finally:
        up.close()
