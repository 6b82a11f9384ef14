"""stream_idle_timeout_ms: an HTTP/1 exchange that moves no bytes either way for that long is
ended (408 when the client stalls mid-body, 504 when the upstream never answers and no route
timeout runs, a closed connection once a response has started), while an exchange that keeps
moving, however slowly, is left alone. Real fastmesh and upstream processes, raw sockets."""
import time

import pytest

from fmtest import RawClient

pytestmark = pytest.mark.timeout(60)

IDLE_MS = 400


@pytest.fixture
def mesh(start_fastmesh, start_upstream, loop_kind):
    up = start_upstream("web", loop=loop_kind)
    cfg = {
        "listeners": [{"name": "ingress", "protocol": "http1", "route_table": "web",
                       "stream_idle_timeout_ms": IDLE_MS}],
        "route_tables": {"web": {"routes": [
            {"match": {"prefix": "/"}, "cluster": "web", "timeout_ms": 0}]}},
        "clusters": [{"name": "web", "endpoints": [up.address]}],
    }
    return start_fastmesh(cfg, loop=loop_kind)


def head_of(raw: bytes) -> tuple[int, bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    reason = b""
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"x-fastmesh-error:"):
            reason = line.split(b":", 1)[1].strip()
    return int(head.split(b" ")[1]), reason


def test_client_stalled_mid_body_gets_408(mesh):
    before = mesh.listener_stats()
    with RawClient(mesh.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"b" * 10)
        t0 = time.monotonic()
        out = c.read_raw_until_close(timeout=10)
        waited = time.monotonic() - t0
    assert head_of(out) == (408, b"stream_idle_timeout")
    assert waited >= IDLE_MS / 1000 * 0.9
    after = mesh.listener_stats()
    assert after["error_stream_idle_timeout"] - before["error_stream_idle_timeout"] == 1


def test_silent_upstream_without_route_timeout_gets_504(mesh):
    with RawClient(mesh.port) as c:
        c.request("GET", "/_/slow/5000")
        resp = c.read_response()
        assert resp.status == 504
        assert resp.header("x-fastmesh-error") == "stream_idle_timeout"
        c.request("GET", "/")                # the client connection is still usable
        assert c.read_response().status == 200


def test_upstream_stalled_mid_response_closes_the_client(mesh):
    before = mesh.listener_stats()
    with RawClient(mesh.port) as c:
        c.request("GET", "/_/stall-mid")
        with pytest.raises(ConnectionError):
            c.read_response()                # never passed off as a whole response
    after = mesh.listener_stats()
    assert after["error_stream_idle_timeout"] - before["error_stream_idle_timeout"] == 1


def test_slow_but_moving_body_is_not_cut_off(mesh):
    body = b"0123456789" * 10
    with RawClient(mesh.port, timeout=10) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 10):            # 10 pieces, 150 ms apart: 1.5 s total
            c.send(body[i:i + 10])
            time.sleep(0.15)
        resp = c.read_response()
    assert resp.status == 200
    assert resp.json()["body_bytes"] == len(body)
