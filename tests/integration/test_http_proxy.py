"""HTTP/1.1 behaviour through a real `fastmesh run` process, real upstream processes, and
real clients (curl, raw sockets, requests). Every test runs on uvloop and on plain asyncio.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from fmtest import Fastmesh, Proc, RawClient, Upstream, _wait_line, free_port, wait_ready

CURL = ["curl", "-s", "--max-time", "10"]


def _start_upstream(name, started):
    proc = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                 "--name", name], name=f"upstream {name}")
    started.append(proc)
    line = _wait_line(proc, b"READY", 15)
    return Upstream(proc, int(line.split()[1]), name)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def mesh(request, tmp_path_factory):
    """One fastmesh (on the loop under test) in front of four upstream processes."""
    started = []
    try:
        web1 = _start_upstream("web-1", started)
        web2 = _start_upstream("web-2", started)
        canary = _start_upstream("canary", started)
        api = _start_upstream("api", started)
        dead_port = free_port()                   # nothing listens here
        cfg = {
            "admin": {"address": f"127.0.0.1:{free_port()}"},
            "listeners": [{"name": "ingress", "address": f"127.0.0.1:{free_port()}",
                           "protocol": "http1", "route_table": "web",
                           "max_request_body_bytes": 8 * 1024 * 1024,
                           "max_head_bytes": 8192, "request_head_timeout_ms": 600}],
            "route_tables": {"web": {"virtual_hosts": [
                {"name": "api", "domains": ["api.local", "*.api.local"], "routes": [
                    {"match": {"prefix": "/v1/"}, "cluster": "api_v1", "timeout_ms": 3000},
                ]},
                {"name": "exact-port", "domains": ["port.local:8080"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {"status": 200,
                                                                  "body": "port-vhost"}}]},
                {"name": "default", "domains": ["*"], "routes": [
                    {"match": {"path": "/health"},
                     "direct_response": {"status": 200, "body": "ok"}},
                    {"match": {"prefix": "/timeout/"}, "cluster": "web", "timeout_ms": 300,
                     "request_headers_to_add": {"x-route": "timeout"}},
                    {"match": {"prefix": "/dead/"}, "cluster": "dead"},
                    {"match": {"prefix": "/nowhere/"}, "cluster": "unresolvable"},
                    {"match": {"prefix": "/", "headers": [{"name": "x-canary", "exact": "1"}]},
                     "weighted_clusters": [{"cluster": "canary", "weight": 50},
                                           {"cluster": "web", "weight": 50}]},
                    {"match": {"regex": "^/static/.*\\.css$"}, "cluster": "canary"},
                    {"match": {"prefix": "/only-get",
                               "headers": [{"name": "x-present", "present": True}]},
                     "cluster": "api_v1"},
                    {"match": {"prefix": "/x/"}, "cluster": "web",
                     "request_headers_to_add": [{"name": "x-added", "value": "yes"}],
                     "request_headers_to_remove": ["x-secret"]},
                    {"match": {"prefix": "/"}, "cluster": "web"},
                ]},
            ]}},
            "clusters": [
                {"name": "web", "endpoints": [web1.address, web2.address]},
                {"name": "canary", "endpoints": [canary.address]},
                {"name": "api_v1", "endpoints": [api.address]},
                {"name": "dead", "endpoints": [f"127.0.0.1:{dead_port}"],
                 "connect_timeout_ms": 1000},
                {"name": "unresolvable", "endpoints": ["no-such-host.invalid:80"]},
            ],
        }
        path = tmp_path_factory.mktemp("mesh") / "fastmesh.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--loop",
                     request.param, "--log-level", "warning"], name="fastmesh")
        started.append(proc)
        fm = Fastmesh(proc, cfg, path)
        wait_ready(fm.admin_port, proc)
        fm.loop_kind = request.param
        yield fm
        assert proc.popen.poll() is None, "fastmesh died during the tests:\n" + proc.output()
    finally:
        for p in reversed(started):
            p.stop()


def curl(*args, check=True):
    r = subprocess.run(CURL + list(args), capture_output=True, timeout=20)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def delta(before: dict, after: dict, key: str) -> int:
    return after[key] - before[key]


# ------------------------------------------------------------------------ basics

def test_get_round_robin_with_curl(mesh):
    bodies = [curl(mesh.url("/")).stdout for _ in range(4)]
    assert sorted(set(bodies)) == [b"hello from web-1\n", b"hello from web-2\n"]


def test_keep_alive_downstream_and_upstream_reuse(mesh):
    before_l = mesh.listener_stats()
    before_c = mesh.cluster_stats("api_v1")
    with RawClient(mesh.port) as c:
        for i in range(20):
            c.request(path=f"/v1/{i}", host="api.local")
            r = c.read_response()
            assert r.status == 200 and r.body == b"hello from api\n"
    after_l = mesh.listener_stats()
    after_c = mesh.cluster_stats("api_v1")
    assert delta(before_l, after_l, "downstream_cx_total") == 1
    assert delta(before_c, after_c, "upstream_rq_total") == 20
    assert delta(before_c, after_c, "upstream_cx_total") <= 1     # pooled connection reused


def test_pipelined_requests_answered_in_order(mesh):
    with RawClient(mesh.port) as c:
        reqs = b"".join(
            b"GET /x/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i if i % 2 else
            b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n" for i in range(10))
        reqs += b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        reqs += b"GET /v1/last HTTP/1.1\r\nHost: api.local\r\n\r\n"
        c.send(reqs)
        for i in range(10):
            r = c.read_response()
            assert r.status == 200
            assert r.body == (b"ok" if i % 2 == 0 else r.body)
            if i % 2:
                assert r.body.startswith(b"hello from web-")
        echo = c.read_response().json()
        assert echo["body"] == "hello" and echo["method"] == "POST"
        assert c.read_response().body == b"hello from api\n"


def test_requests_library_session(mesh):
    with requests.Session() as s:
        for _ in range(3):
            r = s.get(mesh.url("/echo"), timeout=5)
            assert r.status_code == 200
            assert r.json()["url"] == "/echo"


# ------------------------------------------------------------------------ routing

def test_domain_matching_exact_suffix_and_default(mesh):
    assert curl("-H", "Host: api.local", mesh.url("/v1/a")).stdout == b"hello from api\n"
    assert curl("-H", "Host: x.api.local", mesh.url("/v1/a")).stdout == b"hello from api\n"
    assert curl("-H", "Host: API.LOCAL:10000", mesh.url("/v1/a")).stdout == b"hello from api\n"
    assert curl("-H", "Host: port.local:8080", mesh.url("/")).stdout == b"port-vhost"
    # api vhost has no route for /other: 404 (no fall-through to another vhost)
    r = curl("-i", "-H", "Host: api.local", mesh.url("/other"))
    assert b" 404 " in r.stdout.split(b"\r\n")[0]
    assert b"x-fastmesh-error: no_route" in r.stdout


def test_path_exact_regex_and_header_matches(mesh):
    assert curl(mesh.url("/health")).stdout == b"ok"
    assert curl(mesh.url("/health/more")).stdout.startswith(b"hello from web-")
    assert curl(mesh.url("/static/site.css")).stdout == b"hello from canary\n"
    assert curl(mesh.url("/static/site.js")).stdout.startswith(b"hello from web-")
    assert curl("-H", "x-present: anything", mesh.url("/only-get")).stdout == b"hello from api\n"
    assert curl(mesh.url("/only-get")).stdout.startswith(b"hello from web-")


def test_weighted_clusters_split(mesh):
    seen = {"canary": 0, "web": 0}
    with RawClient(mesh.port) as c:
        for _ in range(200):
            c.request(path="/", headers={"x-canary": "1"})
            body = c.read_response().body
            seen["canary" if body == b"hello from canary\n" else "web"] += 1
    assert 60 <= seen["canary"] <= 140, seen          # 50/50 within a wide margin


def test_request_headers_added_and_removed(mesh):
    r = requests.get(mesh.url("/x/_/echo"), headers={"x-secret": "s", "x-keep": "k"}, timeout=5)
    seen = {k.lower(): v for k, v in r.json()["headers"]}
    assert seen["x-added"] == "yes" and seen["x-keep"] == "k" and "x-secret" not in seen
    r = requests.get(mesh.url("/timeout/_/echo"), timeout=5)
    assert dict((k.lower(), v) for k, v in r.json()["headers"])["x-route"] == "timeout"


def test_forwarded_headers_and_hop_by_hop_removed(mesh):
    with RawClient(mesh.port) as c:
        c.send(b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\n"
               b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x\r\n"
               b"Upgrade: websocket\r\nProxy-Authorization: basic x\r\n"
               b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Custom: c\r\n\r\n")
        r = c.read_response()
    seen = {k.lower(): v for k, v in r.json()["headers"]}
    for hop in ("connection", "x-hop", "keep-alive", "te", "trailer", "upgrade",
                "proxy-authorization"):
        assert hop not in seen, hop
    assert seen["x-custom"] == "c"
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    rid = seen["x-request-id"]
    assert len(rid) == 36 and rid[14] == "4"
    # an existing request id is kept
    r2 = requests.get(mesh.url("/echo"), headers={"x-request-id": "given-id"}, timeout=5)
    assert dict((k.lower(), v) for k, v in r2.json()["headers"])["x-request-id"] == "given-id"


# ------------------------------------------------------------------------ bodies

def test_post_content_length_body_streams_intact(mesh):
    body = os.urandom(3 * 1024 * 1024 + 17)
    r = requests.post(mesh.url("/echo"), data=body, timeout=20)
    assert r.status_code == 200
    echo = r.json()
    assert echo["body_bytes"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body(mesh, tmp_path):
    f = tmp_path / "body.bin"
    body = os.urandom(200_000)
    f.write_bytes(body)
    r = curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}", mesh.url("/echo"))
    echo = json.loads(r.stdout)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    # and hand-made chunks with extensions and trailers, split over many writes
    with RawClient(mesh.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5;ext=1\r\nhel", b"lo\r\n", b"6\r\n wor", b"ld\r\n0\r\nX-T: 1\r\n\r\n"):
            c.send(piece)
            time.sleep(0.01)
        assert c.read_response().json()["body"] == "hello world"


def test_chunked_and_close_delimited_responses(mesh):
    with RawClient(mesh.port) as c:
        c.request(path="/chunked/100000")
        r = c.read_response()
        assert r.header("transfer-encoding") == "chunked" and r.body == b"y" * 100000
        # a close-delimited upstream body is re-framed as chunked: the client keeps its conn
        c.request(path="/close/50000")
        r = c.read_response()
        assert r.header("transfer-encoding") == "chunked" and r.body == b"z" * 50000
        c.request(path="/health")
        assert c.read_response().body == b"ok"


def test_http10_client_gets_close_delimited(mesh):
    with RawClient(mesh.port) as c:
        c.send(b"GET /chunked/3000 HTTP/1.0\r\nHost: h\r\n\r\n")
        raw = c.read_raw_until_close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"y" * 3000
    with RawClient(mesh.port) as c:     # 1.0 keep-alive with a content-length response
        c.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r = c.read_response()
        assert r.body == b"ok"


def test_large_download_and_upload(mesh, tmp_path):
    n = 64 * 1024 * 1024
    r = curl("-o", "/dev/null", "-w", "%{size_download} %{http_code}", mesh.url(f"/bytes/{n}"))
    assert r.stdout == f"{n} 200".encode()


def test_slow_reader_bounded_memory(mesh):
    """A client that reads slowly: the proxy stops reading the upstream (backpressure)
    instead of buffering the whole response."""
    worker = mesh.worker_pids()[0]
    rss_before = _rss_kb(worker)
    n = 200 * 1024 * 1024
    s = socket.create_connection(("127.0.0.1", mesh.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)
    got = 0
    peak = rss_before
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and got < 8 * 1024 * 1024:
        got += len(s.recv(65536))
        time.sleep(0.002)
        peak = max(peak, _rss_kb(worker))
    time.sleep(0.5)
    peak = max(peak, _rss_kb(worker))
    s.close()
    assert got > 0
    # the upstream could send 200 MB; the proxy must hold only a few buffers' worth
    assert peak - rss_before < 40 * 1024, (rss_before, peak)


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_expect_100_continue(mesh):
    with RawClient(mesh.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n"
               b"Expect: 100-continue\r\n\r\n")
        c.sock.settimeout(5)
        first = c.sock.recv(100)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        c.send(b"data")
        c.parser.feed_data(first[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
        r = c.read_response()
        echo = r.json()
        assert echo["body"] == "data"
        assert "expect" not in {k.lower() for k, _ in echo["headers"]}
    big = os.urandom(2 * 1024 * 1024)           # curl sends Expect for big bodies
    r = requests.post(mesh.url("/echo"), data=big, headers={"Expect": "100-continue"},
                      timeout=10)
    assert r.json()["body_sha256"] == hashlib.sha256(big).hexdigest()


def test_transfer_codings_besides_chunked_are_kept(mesh):
    import gzip
    with RawClient(mesh.port) as c:
        # relayed chunked as received: the coding stays named
        c.request(path="/gzip-chunked/5000")
        r = c.read_response()
        assert r.header("transfer-encoding") == "gzip, chunked"
        assert gzip.decompress(bytes(r.body)) == b"g" * 5000
        # close-delimited "gzip" re-framed for a 1.1 client: "gzip, chunked", still in sync
        c.request(path="/gzip-close/5000")
        r = c.read_response()
        assert r.header("transfer-encoding") == "gzip, chunked"
        assert gzip.decompress(bytes(r.body)) == b"g" * 5000
        c.request(path="/health")
        assert c.read_response().body == b"ok"
    # an HTTP/1.0 client cannot receive a transfer coding: 502, never corrupt content
    with RawClient(mesh.port) as c:
        c.send(b"GET /gzip-chunked/100 HTTP/1.0\r\nHost: h\r\n\r\n")
        raw = c.read_raw_until_close()
    assert raw.startswith(b"HTTP/1.1 502") and b"upstream_protocol" in raw


def _head_then_in_sync(mesh, path: str) -> bytes:
    """HEAD path on a raw connection: returns the response head after checking no body
    followed it and the connection is still in sync (the next response is the right one)."""
    with RawClient(mesh.port) as c:
        c.send(b"HEAD %s HTTP/1.1\r\nHost: h\r\n\r\n" % path.encode())
        c.sock.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            data += c.sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert rest == b""
        c.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
        time.sleep(0.2)
        more = c.sock.recv(4096)
        assert more.startswith(b"HTTP/1.1 200") and more.endswith(b"ok")
    return head


def test_head_keeps_the_transfer_encoding_a_get_would_have(mesh):
    assert b"transfer-encoding: chunked" in _head_then_in_sync(mesh, "/chunked/1000").lower()


def test_head_204_304_and_1xx(mesh):
    assert b"content-length: 1000" in _head_then_in_sync(mesh, "/bytes/1000").lower()
    with RawClient(mesh.port) as c:
        for status in (204, 304):
            c.request(path=f"/status/{status}")
            r = c.read_response()
            assert r.status == status and r.body == b""
        c.request(path="/status/103")
        r = c.read_response()
        assert r.informational == [103] and r.status == 200 and r.body == b"after-1xx"


# ------------------------------------------------------------------------ errors

def _err(resp_bytes: bytes) -> tuple[int, bytes]:
    head = resp_bytes.split(b"\r\n\r\n", 1)[0]
    status = int(head.split(b" ")[1])
    reason = b""
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"x-fastmesh-error:"):
            reason = line.split(b":", 1)[1].strip()
    return status, reason


@pytest.mark.parametrize("raw,status,reason,counter", [
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400, b"bad_request", "error_bad_request"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
     400, b"bad_request", "error_bad_request"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400, b"bad_request",
     "error_bad_request"),
    (b"GET / HTTP/1.1\r\nHost: h\rX: 1\r\n\r\n", 400, b"bad_request", "error_bad_request"),
    (b"GET / HTTP/1.1\r\nHo st: h\r\n\r\n", 400, b"bad_request", "error_bad_request"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, b"bad_request", "error_bad_request"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
     b"bad_request", "error_bad_request"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 431, b"head_too_large",
     "error_head_too_large"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999\r\n\r\n", 413,
     b"body_too_large", "error_body_too_large"),
])
def test_malformed_requests_get_errors_and_counters(mesh, raw, status, reason, counter):
    before = mesh.listener_stats()
    with RawClient(mesh.port) as c:
        c.send(raw)
        out = c.read_raw_until_close()
    assert _err(out) == (status, reason)
    assert b"connection: close" in out.lower()
    after = mesh.listener_stats()
    assert delta(before, after, counter) == 1


def test_chunked_body_over_limit_413(mesh):
    with RawClient(mesh.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"a" * (1 << 20))
        try:
            for _ in range(10):
                c.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = c.read_raw_until_close()
    assert out.startswith(b"HTTP/1.1 413")


def test_no_route_404(mesh):
    r = curl("-i", "-H", "Host: api.local", mesh.url("/nothing"))
    assert _err(r.stdout) == (404, b"no_route")


def test_no_healthy_endpoint_503(mesh):
    r = curl("-i", mesh.url("/nowhere/x"))
    assert _err(r.stdout) == (503, b"no_healthy_upstream")


def test_connect_failure_503(mesh):
    before = mesh.listener_stats()
    r = curl("-i", mesh.url("/dead/x"))
    assert _err(r.stdout) == (503, b"connect_failed")
    assert delta(before, mesh.listener_stats(), "error_connect_failed") == 1


def test_upstream_timeout_504(mesh):
    before = mesh.listener_stats()
    t0 = time.monotonic()
    r = curl("-i", mesh.url("/timeout/_/slow/3000"))
    took = time.monotonic() - t0
    assert _err(r.stdout) == (504, b"upstream_timeout")
    assert took < 2.0
    assert delta(before, mesh.listener_stats(), "error_upstream_timeout") == 1


def test_upstream_reset_before_response_503(mesh):
    # Envoy's answer to a reset before the response headers: 503
    r = curl("-i", mesh.url("/reset"))
    assert _err(r.stdout) == (503, b"upstream_reset")
    # the proxy keeps serving
    assert curl(mesh.url("/health")).stdout == b"ok"


def test_malformed_upstream_response_502_upstream_protocol(mesh):
    before = mesh.listener_stats()
    with RawClient(mesh.port) as c:
        c.request(path="/malformed")
        r = c.read_response()
        assert r.status == 502 and r.header("x-fastmesh-error") == "upstream_protocol"
        c.request(path="/health")                   # the client connection survives
        assert c.read_response().body == b"ok"
    assert delta(before, mesh.listener_stats(), "error_upstream_protocol") == 1


def test_client_reset_mid_request_releases_the_upstream_request(mesh):
    """A client gone while its request waits upstream no longer counts as a request in
    flight (the least_request balancer reads the same figure)."""
    import struct

    def in_flight():
        per_ep = json.loads(mesh.admin("/clusters")[1])["web"]
        return (mesh.cluster_stats("web")["upstream_rq_active"],
                sum(e["active_requests"] for e in per_ep))
    c = RawClient(mesh.port)
    c.request(path="/_/slow/1500")
    deadline = time.monotonic() + 5
    while in_flight() != (1, 1):
        assert time.monotonic() < deadline, in_flight()
        time.sleep(0.05)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                                               # RST
    deadline = time.monotonic() + 5
    while in_flight() != (0, 0):
        assert time.monotonic() < deadline, in_flight()
        time.sleep(0.05)


def test_upstream_reset_mid_response_closes_client(mesh):
    before = mesh.listener_stats()
    with RawClient(mesh.port) as c:
        c.request(path="/reset-mid")
        with pytest.raises(ConnectionError):
            c.read_response()             # never a truncated response passed off as whole
    r = curl(mesh.url("/reset-mid"), check=False)
    assert r.returncode in (18, 56)       # curl: partial file / recv failure
    assert delta(before, mesh.listener_stats(), "error_reset_mid_response") == 2


def test_request_head_timeout_408(mesh):
    with RawClient(mesh.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: slowloris\r\n")
        out = c.read_raw_until_close(timeout=5)
    assert _err(out) == (408, b"head_timeout")


def test_many_bad_inputs_never_wedge(mesh):
    import random
    rnd = random.Random(7)
    for i in range(60):
        junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300)))
        with RawClient(mesh.port) as c:
            try:
                c.send(junk + b"\r\n\r\n")
                c.read_raw_until_close(timeout=3)
            except OSError:
                pass
    assert curl(mesh.url("/health")).stdout == b"ok"


# ------------------------------------------------------------------------ load & admin

def test_wrk_load_no_errors(mesh):
    r = subprocess.run(["wrk", "-t1", "-c20", "-d2s", mesh.url("/")], capture_output=True,
                       timeout=30)
    out = r.stdout.decode()
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    assert "requests in" in out


def test_admin_endpoints(mesh):
    assert curl(mesh.url("/health")).stdout == b"ok"         # at least one request counted
    status, body = mesh.admin("/ready")
    assert status == 200 and body == b"ready\n"
    stats = mesh.stats()
    assert stats["listeners"]["ingress"]["downstream_rq_total"] > 0
    assert "web" in stats["clusters"]
    status, body = mesh.admin("/config_dump")
    dump = json.loads(body)
    assert dump["config"]["listeners"][0]["name"] == "ingress"
    status, body = mesh.admin("/listeners")
    assert json.loads(body)["ingress"]["state"] == "running"
    status, body = mesh.admin("/clusters")
    assert len(json.loads(body)["web"]) == 2
    assert mesh.admin("/nope")[0] == 404


def test_early_response_before_the_body_reaches_the_client(mesh):
    """The upstream answers before reading the request body: the client gets the whole
    response, then the connection closes (the rest of its body cannot be resynchronised)."""
    with RawClient(mesh.port) as c:
        c.send(b"POST /early/403 HTTP/1.1\r\nHost: h\r\nContent-Length: 5000000\r\n\r\n"
               + b"a" * 200000)
        r = c.read_response()
        assert r.status == 403 and r.body == b"early"
        assert r.header("connection") == "close"


def test_client_gone_mid_head_is_a_reset_not_a_bad_request(mesh):
    before = mesh.listener_stats()
    s = socket.create_connection(("127.0.0.1", mesh.port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: exam")      # half a head, then the client leaves
    s.shutdown(socket.SHUT_WR)
    assert s.recv(100) == b""                       # nothing to answer: closed quietly
    s.close()
    deadline = time.monotonic() + 5
    while True:
        after = mesh.listener_stats()
        if after["error_downstream_reset"] > before["error_downstream_reset"]:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after["error_downstream_reset"] == before["error_downstream_reset"] + 1
    assert after["error_bad_request"] == before["error_bad_request"]
