"""gRPC through fastmesh's HTTP/2 listener (h2c, prior knowledge) to a real grpcio server:
every call type, statuses and messages, metadata and trailing metadata, 4 MB messages,
deadlines, and the proxy's own gRPC answers; plus curl and h2load on the same listener.

The service is generic (bytes in, bytes out: no generated code): `/echo.Echo/<Method>`.
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")

from fmtest import free_port  # noqa: E402

MB = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 16 * MB),
           ("grpc.max_send_message_length", 16 * MB)]


class Echo:
    """The upstream service."""

    def __init__(self):
        self.cancelled = threading.Event()     # a slow stream saw its call cancelled

    def unary(self, request, context):
        md = dict(context.invocation_metadata())
        if request == b"fail":
            context.set_trailing_metadata((("x-why", "asked-to"),))
            context.abort(grpc.StatusCode.NOT_FOUND, "nope: asked to fail")
        if request.startswith(b"sleep:"):
            time.sleep(float(request[6:]))
        context.send_initial_metadata((("x-seen", md.get("x-meta", "-")),))
        context.set_trailing_metadata((("x-trailer", "t-" + md.get("x-meta", "-")),
                                       ("x-bin-bin", b"\x00\x01\xff")))
        return request

    def server_stream(self, request, context):
        count, _, gap_ms = request.partition(b"/")
        for i in range(int(count)):
            if gap_ms:
                time.sleep(int(gap_ms) / 1000)
                if not context.is_active():
                    self.cancelled.set()
                    return
            yield b"msg-%d" % i

    def client_stream(self, request_iterator, context):
        return b"|".join(request_iterator)

    def bidi(self, request_iterator, context):
        for m in request_iterator:
            yield b"re:" + m


def _handlers(svc: Echo):
    return grpc.method_handlers_generic_handler("echo.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(svc.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(svc.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(svc.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(svc.bidi),
    })


@pytest.fixture(scope="module")
def h2_echo():
    """A plain HTTP/2 upstream (fastmesh's codec, tests/interop/h2c_echo.py)."""
    import sys
    from pathlib import Path
    from fmtest import Proc, START_TIMEOUT_S, _wait_line
    p = Proc([sys.executable, str(Path(__file__).parent / "h2c_echo.py"), "--port", "0"],
             name="h2c echo")
    try:
        yield int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
    finally:
        p.stop()


@pytest.fixture(scope="module")
def service():
    return Echo()


@pytest.fixture(scope="module")
def grpc_server(service):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(service),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def _config(upstream_port: int, dead_port: int, plain_port: int) -> dict:
    return {
        "listeners": [{"name": "grpc", "protocol": "http2", "route_table": "rt"}],
        "route_tables": {"rt": {"routes": [
            {"match": {"prefix": "/echo.Echo/"}, "cluster": "echo", "timeout_ms": 1000},
            {"match": {"prefix": "/dead.Service/"}, "cluster": "dead"},
            {"match": {"prefix": "/plain/"}, "cluster": "plain"},
        ]}},
        "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{upstream_port}"],
                      "http_protocol": "http2"},
                     {"name": "plain", "endpoints": [f"127.0.0.1:{plain_port}"],
                      "http_protocol": "http2"},
                     {"name": "dead", "endpoints": [f"127.0.0.1:{dead_port}"],
                      "connect_timeout_ms": 500, "http_protocol": "http2"}],
    }


@pytest.fixture(params=["uvloop", "asyncio"])
def proxy(request, grpc_server, h2_echo, start_fastmesh):
    fm = start_fastmesh(_config(grpc_server, free_port(), h2_echo), loop=request.param)
    return fm


@pytest.fixture
def channel(proxy):
    ch = grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=OPTIONS)
    yield ch
    ch.close()


def test_unary_with_metadata_and_trailers(channel):
    call = channel.unary_unary("/echo.Echo/Unary")
    resp, info = call.with_call(b"hello", metadata=(("x-meta", "m1"),), timeout=10)
    assert resp == b"hello"
    assert dict(info.initial_metadata())["x-seen"] == "m1"
    trailers = dict(info.trailing_metadata())
    assert trailers["x-trailer"] == "t-m1" and trailers["x-bin-bin"] == b"\x00\x01\xff"
    assert info.code() == grpc.StatusCode.OK


def test_error_status_message_and_trailing_metadata(channel):
    call = channel.unary_unary("/echo.Echo/Unary")
    with pytest.raises(grpc.RpcError) as e:
        call(b"fail", timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "nope: asked to fail"
    assert dict(e.value.trailing_metadata())["x-why"] == "asked-to"


def test_server_streaming_in_order(channel):
    got = list(channel.unary_stream("/echo.Echo/ServerStream")(b"50", timeout=10))
    assert got == [b"msg-%d" % i for i in range(50)]


def test_client_streaming(channel):
    resp = channel.stream_unary("/echo.Echo/ClientStream")(
        iter([b"a", b"bb", b"ccc"] * 20), timeout=10)
    assert resp == b"|".join([b"a", b"bb", b"ccc"] * 20)


def test_bidi_ping_pong_in_order(channel):
    """Each message answered before the next is sent: nothing is buffered whole."""
    replies = []
    outbox: list = []
    cond = threading.Condition()

    def requests():
        for i in range(20):
            with cond:
                outbox.append(i)
                cond.notify_all()
            yield b"m%d" % i
            with cond:                         # wait for its answer before the next
                assert cond.wait_for(lambda: len(replies) > i, timeout=10)

    for r in channel.stream_stream("/echo.Echo/Bidi")(requests(), timeout=20):
        with cond:
            replies.append(r)
            cond.notify_all()
    assert replies == [b"re:m%d" % i for i in range(20)]


def test_large_messages_both_ways(channel):
    big = bytes(range(256)) * (4 * MB // 256 + 1000)          # > 4 MiB
    assert channel.unary_unary("/echo.Echo/Unary")(big, timeout=30) == big
    got = channel.stream_stream("/echo.Echo/Bidi")(iter([big, big[:1000]]), timeout=30)
    assert [len(m) for m in got] == [len(big) + 3, 1003]


def test_deadline_exceeded(channel):
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/echo.Echo/Unary")(b"sleep:3", timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_route_timeout_is_a_grpc_error(channel, proxy):
    # the route's timeout (1 s) runs out before the answer: a gRPC UNAVAILABLE from the proxy
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/echo.Echo/Unary")(b"sleep:2.5", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "upstream_timeout" in e.value.details()


def test_proxy_answers_are_grpc_errors(channel, proxy):
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/nothing.Here/Call")(b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/dead.Service/Call")(b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    st = proxy.listener_stats("grpc")
    assert st["error_no_route"] >= 1 and st["error_connect_failed"] >= 1


def test_many_concurrent_calls_share_one_upstream_connection(channel, proxy):
    call = channel.unary_unary("/echo.Echo/Unary")
    with futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda i: call(b"c%d" % i, timeout=10), range(300)))
    assert got == [b"c%d" % i for i in range(300)]
    cl = proxy.cluster_stats("echo")
    assert cl["upstream_cx_total"] == 1 and cl["upstream_rq_total"] >= 300


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load_zero_failed(proxy):
    out = subprocess.run(["h2load", "-n", "5000", "-c", "10", "-m", "10",
                          f"http://127.0.0.1:{proxy.port}/plain/"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "5000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 5000 2xx" in out, out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl missing")
def test_curl_prior_knowledge(proxy):
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                          "%{http_code} %{http_version}",
                          f"http://127.0.0.1:{proxy.port}/nothing"],
                         capture_output=True, text=True, timeout=30).stdout
    assert out == "404 2", out


def test_client_cancel_reaches_the_upstream(channel, service):
    service.cancelled.clear()
    call = channel.unary_stream("/echo.Echo/ServerStream")(b"200/20", timeout=30)
    it = iter(call)
    assert next(it) == b"msg-0"
    call.cancel()                       # RST_STREAM(CANCEL) to the proxy, then upstream
    assert service.cancelled.wait(5)


def test_stream_in_progress_finishes_through_a_drain(grpc_server, h2_echo, start_fastmesh):
    """SIGTERM while a call streams: the proxy sends GOAWAY, the call goes on to its end,
    then the proxy exits."""
    import signal
    fm = start_fastmesh(_config(grpc_server, free_port(), h2_echo))
    ch = grpc.insecure_channel(f"127.0.0.1:{fm.port}", options=OPTIONS)
    try:
        call = ch.unary_stream("/echo.Echo/ServerStream")(b"20/50", timeout=30)
        it = iter(call)
        assert next(it) == b"msg-0"
        fm.proc.popen.send_signal(signal.SIGTERM)
        rest = list(it)
        assert rest == [b"msg-%d" % i for i in range(1, 20)]
        assert call.code() == grpc.StatusCode.OK
        assert fm.proc.popen.wait(10) == 0
    finally:
        ch.close()


def test_upstream_gone_mid_stream_is_an_error_not_a_hang(start_fastmesh, h2_echo):
    """The upstream process dies while a call streams: the client gets an error at once."""
    import sys
    from pathlib import Path
    from fmtest import Proc, START_TIMEOUT_S, _wait_line
    code = (
        "import grpc, time, sys\n"
        "from concurrent import futures\n"
        "def slow(req, ctx):\n"
        "    for i in range(1000):\n"
        "        yield b'x%d' % i\n"
        "        time.sleep(0.05)\n"
        "s = grpc.server(futures.ThreadPoolExecutor(4))\n"
        "s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler('echo.Echo', "
        "{'ServerStream': grpc.unary_stream_rpc_method_handler(slow)}),))\n"
        "p = s.add_insecure_port('127.0.0.1:0'); s.start(); print('READY', p, flush=True)\n"
        "time.sleep(60)\n")
    up = Proc([sys.executable, "-c", code], name="dying grpc server")
    try:
        port = int(_wait_line(up, b"READY", START_TIMEOUT_S).split()[1])
        fm = start_fastmesh(_config(port, free_port(), h2_echo))
        ch = grpc.insecure_channel(f"127.0.0.1:{fm.port}", options=OPTIONS)
        call = ch.unary_stream("/echo.Echo/ServerStream")(b"", timeout=30)
        it = iter(call)
        assert next(it) == b"x0"
        up.popen.kill()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(it)
        assert time.monotonic() - t0 < 5
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.UNKNOWN), e.value
        ch.close()
    finally:
        up.stop()


def test_idle_connections_close_both_sides(grpc_server, h2_echo, start_fastmesh):
    """A client connection with no stream for the listener's idle timeout gets GOAWAY and
    is closed; so is the upstream connection after the cluster's idle timeout."""
    import socket
    cfg = _config(grpc_server, free_port(), h2_echo)
    cfg["listeners"][0]["idle_timeout_ms"] = 500
    cfg["clusters"][0]["idle_timeout_ms"] = 500
    fm = start_fastmesh(cfg)
    ch = grpc.insecure_channel(f"127.0.0.1:{fm.port}", options=OPTIONS)
    try:
        assert ch.unary_unary("/echo.Echo/Unary")(b"x", timeout=10) == b"x"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ls, cl = fm.listener_stats("grpc"), fm.cluster_stats("echo")
            if ls["downstream_cx_active"] == 0 and cl["upstream_cx_active"] == 0:
                break
            time.sleep(0.1)
        assert ls["downstream_cx_idle_closed"] >= 1 and ls["downstream_cx_active"] == 0, ls
        assert cl["upstream_cx_idle_closed"] == 1 and cl["upstream_cx_active"] == 0, cl
        # the channel reconnects for the next call
        assert ch.unary_unary("/echo.Echo/Unary")(b"y", timeout=10) == b"y"
    finally:
        ch.close()


def test_cluster_http_protocol_is_checked():
    from fastmesh.config.load import ConfigError, load_dict
    cfg = _config(1, 2, 3)
    cfg["listeners"][0]["address"] = "127.0.0.1:1"
    cfg["clusters"][0]["http_protocol"] = "h3"
    with pytest.raises(ConfigError) as e:
        load_dict(cfg)
    assert any("clusters[0].http_protocol" in x for x in e.value.errors), e.value.errors
