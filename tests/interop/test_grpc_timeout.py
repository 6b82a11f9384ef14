"""grpc-timeout through fastmesh (native config; the Envoy parity is in
test_h2_upstream_envoy_parity.py): a grpcio client's deadline against a slow grpcio server.
With grpc_timeout_header_max_ms the proxy answers DEADLINE_EXCEEDED when the deadline minus
the offset passes, cancels the upstream call and counts it; without it the header is
ignored and the route timeout applies (UNAVAILABLE, Envoy's mapping of 504)."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")


class Slow:
    def __init__(self):
        self.cancelled = threading.Event()

    def unary(self, request, context):
        context.add_callback(self.cancelled.set)        # runs when the call ends early
        deadline = time.monotonic() + float(request or b"0")
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.02)
        return request


@pytest.fixture(scope="module")
def slow():
    svc = Slow()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("slow.Slow", {
        "Unary": grpc.unary_unary_rpc_method_handler(svc.unary)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield svc, port
    server.stop(0)


@pytest.fixture(params=["uvloop", "asyncio"])
def proxy(request, slow, start_fastmesh):
    _, port = slow
    cfg = {"listeners": [{"name": "g", "protocol": "http2", "route_table": "rt"}],
           "route_tables": {"rt": {"routes": [
               {"match": {"prefix": "/slow.Slow/", "headers": [{"name": "x-plain",
                                                                "present": True}]},
                "cluster": "slow", "timeout_ms": 300},
               {"match": {"prefix": "/slow.Slow/"}, "cluster": "slow", "timeout_ms": 300,
                "grpc_timeout_header_max_ms": 0, "grpc_timeout_header_offset_ms": 100}]}},
           "clusters": [{"name": "slow", "endpoints": [f"127.0.0.1:{port}"],
                         "http_protocol": "http2"}]}
    return start_fastmesh(cfg, loop=request.param)


def call(fm, body, timeout, metadata=()):
    ch = grpc.insecure_channel(f"127.0.0.1:{fm.port}")
    try:
        t0 = time.monotonic()
        try:
            ch.unary_unary("/slow.Slow/Unary")(body, timeout=timeout, metadata=metadata)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        return code, details, time.monotonic() - t0
    finally:
        ch.close()


def test_deadline_answered_by_the_proxy_and_upstream_cancelled(proxy, slow):
    svc, _ = slow
    svc.cancelled.clear()
    code, details, t = call(proxy, b"3", 1.0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details == "downstream duration timeout"     # the proxy's answer, not the client's
    assert t < 1.0
    assert svc.cancelled.wait(3)
    assert proxy.listener_stats("g")["downstream_rq_max_duration_reached"] >= 1


def test_longer_deadline_outlives_the_route_timeout(proxy):
    code, _, t = call(proxy, b"0.8", 5.0)               # route timeout 300 ms: replaced
    assert code == grpc.StatusCode.OK and t >= 0.8
    code, _, t = call(proxy, b"0.8", None)              # no deadline: no limit, as in Envoy
    assert code == grpc.StatusCode.OK


def test_without_the_route_field_grpc_timeout_is_ignored(proxy):
    code, details, t = call(proxy, b"2", 5.0, metadata=(("x-plain", "1"),))
    assert code == grpc.StatusCode.UNAVAILABLE and "upstream_timeout" in details
    assert t < 1.5
