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
