"""HTTP/2 clients to HTTP/1.1 upstreams: an http2 listener routing to an `http_protocol:
http1` cluster (the demo upstream, parsed by httptools). Heads are translated both ways,
bodies go with their length or chunked, chunked responses become DATA frames, and a broken
upstream is a reset stream, never a hang. Real clients: curl (HTTP/2 prior knowledge),
h2load, and the `h2` package for what curl cannot show."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl missing")


def _cfg(up) -> dict:
    return {"listeners": [{"name": "h2", "protocol": "http2", "route_table": "rt"}],
            "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "web",
                                                "timeout_ms": 5000}]}},
            "clusters": [{"name": "web", "endpoints": [up.address]}]}


@pytest.fixture(params=["uvloop", "asyncio"])
def proxy(request, start_upstream, start_fastmesh):
    up = start_upstream("web", request.param)
    return start_fastmesh(_cfg(up), loop=request.param)


def curl(fm, path, *args, timeout=30):
    out = subprocess.run([CURL, "-s", "--http2-prior-knowledge", "-o", "-", "-w",
                          "\n%{http_code} %{http_version} %{exitcode}", *args,
                          f"http://127.0.0.1:{fm.port}{path}"],
                         capture_output=True, timeout=timeout)
    body, _, tail = out.stdout.rpartition(b"\n")
    code, version, exitcode = tail.decode().split()
    return int(code), version, int(exitcode), body


def test_request_head_translated(proxy):
    code, version, rc, body = curl(proxy, "/echo?x=1", "-H", "x-custom: v1", "-H",
                                   "te: trailers")
    assert (code, version, rc) == (200, "2", 0)
    seen = json.loads(body)
    names = {k.lower(): v for k, v in seen["headers"]}
    assert seen["method"] == "GET" and seen["url"] == "/echo?x=1"
    assert names["host"] == f"127.0.0.1:{proxy.port}"         # from :authority
    assert names["x-custom"] == "v1"
    assert names.get("te") == "trailers"                       # the one te value allowed


def test_bodies_both_ways(proxy, tmp_path):
    data = bytes(range(256)) * 12000                           # ~3 MB
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    code, _, rc, body = curl(proxy, "/echo", "--data-binary", f"@{f}")
    assert (code, rc) == (200, 0)
    assert json.loads(body)["body_bytes"] == len(data)
    # no content-length (curl -T from a pipe): chunked to the HTTP/1 upstream
    p = subprocess.run([CURL, "-s", "--http2-prior-knowledge", "-T", "-", "-X", "POST",
                        f"http://127.0.0.1:{proxy.port}/echo"], input=data[:100000],
                       capture_output=True, timeout=30)
    assert json.loads(p.stdout)["body_bytes"] == 100000
    for path, n in (("/bytes/3000000", 3000000), ("/chunked/200000", 200000),
                    ("/close/50000", 50000)):
        code, _, rc, body = curl(proxy, path)
        assert (code, rc, len(body)) == (200, 0, n), path


def test_statuses_without_bodies_and_head(proxy):
    for st in (204, 304, 404, 503):
        code, _, rc, _ = curl(proxy, f"/status/{st}")
        assert (code, rc) == (st, 0)
    code, _, rc, body = curl(proxy, "/bytes/100", "-I")
    assert (code, rc) == (200, 0) and b"content-length: 100" in body.lower()


def test_upstream_reset_mid_response_resets_the_stream(proxy):
    code, _, rc, body = curl(proxy, "/reset-mid")
    assert code == 200 and rc != 0 and len(body) < 100        # cut: not passed off as whole
    code, _, rc, _ = curl(proxy, "/reset")
    assert (code, rc) == (503, 0)                   # as Envoy answers a reset before headers
    st = proxy.listener_stats("h2")
    assert st["error_upstream_reset"] >= 2


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load_many_streams_over_pooled_http1_connections(proxy):
    out = subprocess.run(["h2load", "-n", "3000", "-c", "10", "-m", "10",
                          f"http://127.0.0.1:{proxy.port}/"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "3000 succeeded, 0 failed, 0 errored" in out and "3000 2xx" in out, out
    cl = proxy.cluster_stats("web")
    assert cl["upstream_rq_total"] >= 3000
    assert cl["upstream_cx_total"] <= 200          # pooled: not a connection per request


def test_slow_client_window_holds_the_upstream(proxy):
    """A client with a tiny window that stops reading: the proxy stops reading the upstream
    instead of buffering the whole response."""
    h2 = pytest.importorskip("h2.connection")
    import h2.config
    import h2.events
    import h2.settings
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384})
    s.sendall(conn.data_to_send())
    conn.send_headers(1, [(":method", "GET"), (":path", "/bytes/20000000"),
                          (":scheme", "http"), (":authority", "x")], end_stream=True)
    s.sendall(conn.data_to_send())
    got = 0
    import time
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        s.settimeout(0.3)
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                got += len(ev.data)                   # never acknowledged: no window back
        s.sendall(conn.data_to_send())
    assert got <= 16384 + 65535                       # what the windows allowed, no more
    import os
    rss_kib = int(open(f"/proc/{proxy.pid}/status").read().split("VmRSS:")[1].split()[0])
    assert rss_kib < 200 * 1024                       # the 20 MB body is not in the proxy
    s.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_http1_listener_with_codec_auto_serves_h2c(start_upstream, start_fastmesh, loop):
    """codec: auto on an http1 listener: a connection that opens with the HTTP/2 preface is
    served as HTTP/2 (Envoy's codec_type AUTO); HTTP/1.1 is unchanged."""
    up = start_upstream("web", loop)
    cfg = _cfg(up)
    cfg["listeners"][0].update(protocol="http1", codec="auto")
    fm = start_fastmesh(cfg, loop=loop)
    assert curl(fm, "/bytes/70000")[:3] == (200, "2", 0)
    assert curl(fm, "/bytes/70000", "--http1.1")[:3] == (200, "1.1", 0)
    st = fm.listener_stats("h2")
    assert st["downstream_cx_total"] == 2 and st["downstream_rsp_2xx"] == 2
    # without codec: auto the preface is a bad HTTP/1 request
    cfg["listeners"][0]["codec"] = "http1"
    fm2 = start_fastmesh(cfg, loop=loop)
    code, _, rc, _ = curl(fm2, "/")
    assert rc != 0


def test_retries_outliers_and_circuit_breaker(start_upstream, start_fastmesh):
    """The HTTP/1 path's resilience applies to HTTP/2 streams: a dead endpoint is retried
    past (connect-failure), a failing one's 503 is retried on another (5xx) and it gets
    ejected (consecutive_5xx); each request carries an x-request-id upstream."""
    import urllib.request
    from fmtest import free_port
    good, bad = start_upstream("good"), start_upstream("bad")
    urllib.request.urlopen(f"http://{bad.address}/control/fail/503", timeout=5).read()
    cfg = {"listeners": [{"name": "h2", "protocol": "http2", "route_table": "rt"}],
           "route_tables": {"rt": {"routes": [
               {"match": {"prefix": "/dead/"}, "cluster": "withdead",
                "retry_policy": {"retry_on": ["connect-failure"], "num_retries": 2,
                                 "previous_hosts": True}},
               {"match": {"prefix": "/"}, "cluster": "web",
                "retry_policy": {"retry_on": ["5xx"], "num_retries": 2,
                                 "previous_hosts": True}}]}},
           "clusters": [
               {"name": "withdead", "endpoints": [f"127.0.0.1:{free_port()}", good.address],
                "connect_timeout_ms": 500},
               {"name": "web", "endpoints": [bad.address, good.address],
                "outlier_detection": {"consecutive_5xx": 3, "interval_ms": 100,
                                      "max_ejection_pct": 50,
                                      "base_ejection_time_ms": 30000}}]}
    fm = start_fastmesh(cfg)
    for i in range(6):
        code, _, rc, body = curl(fm, "/dead/echo")
        assert (code, rc) == (200, 0), (i, body, fm.proc.stderr_text()[-2000:])
        seen = json.loads(body)
        assert seen["server"] == "good"
        assert any(k.lower() == "x-request-id" for k, _ in seen["headers"])
    for i in range(10):
        code, _, rc, body = curl(fm, "/echo", "--data-binary", "payload-%d" % i)
        assert (code, rc) == (200, 0), (i, body, fm.proc.stderr_text()[-2000:])
        assert json.loads(body)["server"] == "good"      # the 503s were retried
        assert json.loads(body)["body_bytes"] == len("payload-%d" % i)   # the body again
    cl = fm.cluster_stats("web")
    assert cl["upstream_rq_retry"] >= 1
    assert cl["outlier_ejections_enforced_consecutive_5xx"] >= 1, {k: v for k, v in cl.items() if v}
    assert fm.cluster_stats("withdead")["upstream_cx_connect_fail"] >= 1


def test_h2_over_tls_by_alpn(start_upstream, start_fastmesh, tmp_path):
    """A TLS chain offering h2 and http/1.1: curl negotiates h2 and is served HTTP/2;
    a client offering only http/1.1 gets HTTP/1.1 on the same port."""
    pytest.importorskip("cryptography")
    from tlscerts import make_pki
    pki = make_pki(tmp_path / "pki")
    up = start_upstream("web")
    cfg = _cfg(up)
    cfg["listeners"][0].update(protocol="http1", tls={
        "cert_chain_file": pki["server"], "private_key_file": pki["server_key"],
        "alpn": ["h2", "http/1.1"]})
    fm = start_fastmesh(cfg)
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        out = subprocess.run([CURL, "-s", flag, "--cacert", pki["ca"], "-o", "/dev/null",
                              "-w", "%{http_code} %{http_version}", "--resolve",
                              f"localhost:{fm.port}:127.0.0.1",
                              f"https://localhost:{fm.port}/bytes/5000"],
                             capture_output=True, text=True, timeout=30).stdout
        assert out == f"200 {version}", (flag, out)
