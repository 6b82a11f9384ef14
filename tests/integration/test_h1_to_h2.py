"""HTTP/1.1 clients to HTTP/2 clusters: an http1 listener routing to an `http_protocol: http2`
cluster. Each request becomes a stream on the endpoint's one shared HTTP/2 connection (the
upstream is tests/interop/h2c_echo.py, on fastmesh's codec; its /t/ paths answer as each test
needs). Real clients: curl, h2load --h1, raw sockets parsed by httptools."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmtest import START_TIMEOUT_S, Proc, RawClient, _wait_line

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl missing")
ECHO = Path(__file__).parent.parent / "interop" / "h2c_echo.py"


def _cfg(echo_port: int, **route) -> dict:
    r = {"match": {"prefix": "/"}, "cluster": "h2", "timeout_ms": 5000}
    r.update(route)
    return {"listeners": [{"name": "web", "protocol": "http1", "route_table": "rt"}],
            "route_tables": {"rt": {"routes": [r]}},
            "clusters": [{"name": "h2", "endpoints": [f"127.0.0.1:{echo_port}"],
                          "http_protocol": "http2", "connect_timeout_ms": 1000}]}


@pytest.fixture
def start_echo(procs):
    def start(loop="uvloop", max_streams=1000) -> int:
        p = Proc([sys.executable, str(ECHO), "--port", "0", "--loop", loop, "--max-streams",
                  str(max_streams)], name="h2c echo")
        procs.append(p)
        return int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
    return start


@pytest.fixture(params=["uvloop", "asyncio"])
def setup(request, start_echo, start_fastmesh):
    echo = start_echo(request.param)
    return start_fastmesh(_cfg(echo), loop=request.param), echo


def echo_stats(echo_port: int) -> dict:
    out = subprocess.run([CURL, "-s", "--http2-prior-knowledge",
                          f"http://127.0.0.1:{echo_port}/t/stats"], capture_output=True,
                         timeout=10)
    return json.loads(out.stdout)


def curl(fm, path, *args, timeout=30):
    out = subprocess.run([CURL, "-s", "-o", "-", "-w", "\n%{http_code} %{exitcode}", *args,
                          f"http://127.0.0.1:{fm.port}{path}"], capture_output=True,
                         timeout=timeout)
    body, _, tail = out.stdout.rpartition(b"\n")
    code, exitcode = tail.decode().split()
    return int(code), int(exitcode), body


def seen_headers(body: bytes) -> dict:
    return {k: v for k, v in json.loads(body)}


def test_get_head_translated_and_keep_alive(setup):
    fm, echo = setup
    with RawClient(fm.port) as c:
        c.request("GET", "/t/headers?x=1", {"Connection": "keep-alive, x-drop",
                                            "x-drop": "1", "Keep-Alive": "timeout=5",
                                            "TE": "trailers", "x-custom": "v1",
                                            "Proxy-Connection": "keep-alive"},
                  host="api.local:8080")
        r = c.read_response()
        assert r.status == 200 and r.header("transfer-encoding") == "chunked"
        h = seen_headers(bytes(r.body))
        assert (h[":method"], h[":scheme"], h[":authority"], h[":path"]) == \
            ("GET", "http", "api.local:8080", "/t/headers?x=1")
        assert h["x-custom"] == "v1" and h["te"] == "trailers" and "x-request-id" in h
        for gone in ("host", "connection", "keep-alive", "proxy-connection", "x-drop",
                     "transfer-encoding", "upgrade"):
            assert gone not in h, gone
        # the same client connection carries the next requests (keep-alive on HTTP/1)
        for i in range(3):
            c.request("GET", f"/n{i}")
            r = c.read_response()
            assert (r.status, bytes(r.body)) == (200, f"GET /n{i}\n".encode())
    assert echo_stats(echo)["connections"] == 1
    st = fm.listener_stats("web")
    assert st["downstream_rq_total"] >= 4 and st["downstream_rsp_2xx"] >= 4
    cl = fm.cluster_stats("h2")
    assert cl["upstream_cx_total"] == 1 and cl["upstream_rq_total"] >= 4


def test_post_bodies_content_length_and_chunked(setup, tmp_path):
    fm, echo = setup
    data = bytes(range(256)) * 8000                            # ~2 MB
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    code, rc, body = curl(fm, "/echo", "--data-binary", f"@{f}")
    assert (code, rc) == (200, 0) and body == data
    code, rc, body = curl(fm, "/t/headers", "--data-binary", f"@{f}")
    h = seen_headers(body)
    assert h["content-length"] == str(len(data)) and h["body-bytes"] == str(len(data))
    # chunked (curl -T from a pipe): DATA frames, no content-length, no transfer-encoding
    p = subprocess.run([CURL, "-s", "-T", "-", "-X", "POST",
                        f"http://127.0.0.1:{fm.port}/t/headers"], input=data[:300000],
                       capture_output=True, timeout=30)
    h = seen_headers(p.stdout)
    assert h["body-bytes"] == "300000" and "content-length" not in h
    assert "transfer-encoding" not in h
    p = subprocess.run([CURL, "-s", "-T", "-", "-X", "POST", f"http://127.0.0.1:{fm.port}/up"],
                       input=data[:300000], capture_output=True, timeout=30)
    assert p.stdout == data[:300000]


def test_chunked_request_trailers_become_http2_trailers(setup):
    fm, echo = setup
    with RawClient(fm.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"TE: trailers\r\n\r\n5\r\nhello\r\n6\r\n world\r\n"
               b"0\r\nx-checksum: 42\r\n\r\n")
        r = c.read_response()
        # the echo answers a request with te: trailers with trailers of its own, after
        # the request's end (its HTTP/2 trailers) came
        assert (r.status, bytes(r.body)) == (200, b"hello world")


def test_response_trailers_only_when_chunked(setup):
    fm, _ = setup
    with RawClient(fm.port) as c:
        c.request("GET", "/t/trailers")
        raw = b""
        c.sock.settimeout(5)
        while not raw.endswith(b"\r\n\r\n") or b"0\r\n" not in raw:
            raw += c.sock.recv(65536)
        assert b"transfer-encoding: chunked" in raw.lower()
        assert raw.endswith(b"2\r\nok\r\n0\r\nx-trailer: yes\r\n\r\n"), raw
        c.request("GET", "/t/trailers?cl")      # length-delimited: the trailers are dropped
        raw = b""
        while not raw.endswith(b"ok"):
            raw += c.sock.recv(65536)
        assert b"content-length: 2\r\n" in raw.lower() and b"x-trailer" not in raw
        c.request("GET", "/again")              # and the connection is still in step
        head = b""
        while b"GET /again\n" not in head:
            head += c.sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and b"x-trailer" not in head


def test_large_response_slow_reader_bounded_memory(setup):
    """20 MB through a client that reads slowly: the proxy holds the stream's window
    closed instead of buffering, so its memory stays flat; every byte arrives."""
    fm, _ = setup
    pid = fm.worker_pids()[0]

    def rss_kb():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    total = 20_000_000
    for query in ("", "?cl"):
        s = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
        s.sendall(f"GET /t/bytes/{total}{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        before = rss_kb()
        buf = bytearray(s.recv(4096))
        time.sleep(1.5)                 # the proxy fills what the socket takes, then waits
        peak = rss_kb()
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        end = buf.index(b"\r\n\r\n") + 4
        while (len(buf) - end < total) if query else not buf.endswith(b"\r\n0\r\n\r\n"):
            chunk = s.recv(1 << 20)
            assert chunk, "connection closed early"
            buf += chunk
        s.close()
        head, _, body = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        if query:
            assert b"content-length: 20000000" in head.lower() and len(body) == total
        else:
            assert b"transfer-encoding: chunked" in head.lower()
            assert len(body) > total
        assert peak - before < 8 * 1024, (before, peak)   # KB: far below the 20 MB


def test_upstream_reset_is_503_and_mid_response_closes(setup):
    fm, _ = setup
    code, rc, body = curl(fm, "/t/reset")
    assert (code, rc) == (503, 0) and b"upstream connection reset" in body
    with RawClient(fm.port) as c:
        c.request("GET", "/t/reset-mid")
        with pytest.raises(ConnectionError):
            c.read_response()               # cut short: never passed off as complete
    code, rc, body = curl(fm, "/after")      # the shared connection still works
    assert (code, body) == (200, b"GET /after\n")
    st = fm.listener_stats("web")
    assert st["error_upstream_reset"] >= 1 and st["error_reset_mid_response"] >= 1


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load missing")
def test_many_http1_clients_share_one_upstream_connection(setup):
    fm, echo = setup
    out = subprocess.run(["h2load", "--h1", "-n", "3000", "-c", "50",
                          f"http://127.0.0.1:{fm.port}/"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "3000 succeeded, 0 failed, 0 errored" in out and "3000 2xx" in out, out
    assert echo_stats(echo)["connections"] == 1
    assert fm.cluster_stats("h2")["upstream_cx_total"] == 1


def test_route_timeout_and_client_disconnect_cancel_the_stream(setup, start_fastmesh):
    fm, echo = setup
    code, rc, body = curl(fm, "/t/slow/3000", "-m", "10")
    assert code == 200                       # within the 5 s route timeout
    fm2 = start_fastmesh(_cfg(echo, timeout_ms=300))
    t0 = time.monotonic()
    code, rc, body = curl(fm2, "/t/slow/3000")
    assert code == 504 and time.monotonic() - t0 < 2.5
    time.sleep(0.3)
    assert echo_stats(echo)["resets"].get("8", 0) >= 1      # RST_STREAM(CANCEL)
    before = echo_stats(echo)["resets"].get("8", 0)
    s = socket.create_connection(("127.0.0.1", fm.port))
    s.sendall(b"GET /t/slow/3000 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    # the client leaves before the answer (a reset: a FIN alone is a half-close, after
    # which HTTP/1 clients may still read the response)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    deadline = time.monotonic() + 3
    while echo_stats(echo)["resets"].get("8", 0) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert echo_stats(echo)["resets"].get("8", 0) == before + 1


def test_unreachable_endpoint_is_503(start_fastmesh):
    from fmtest import free_port
    fm = start_fastmesh(_cfg(free_port()))
    code, rc, body = curl(fm, "/x")
    assert code == 503 and b"connect" in body
    assert fm.listener_stats("web")["error_connect_failed"] == 1
    assert fm.cluster_stats("h2")["upstream_cx_connect_fail"] == 1


def test_concurrent_streams_limit_of_the_upstream_is_respected(start_echo, start_fastmesh,
                                                               loop_kind):
    """The endpoint allows 4 streams at once: 24 HTTP/1 clients' requests at once get more
    connections, as Envoy's pool makes them, none carrying more than 4 streams (the codec
    would refuse a fifth: none refused, none failed); the full ones close once their streams
    are done, the newest stays for the next requests."""
    import concurrent.futures
    echo = start_echo(loop_kind, max_streams=4)
    fm = start_fastmesh(_cfg(echo), loop=loop_kind)

    def one(i):
        return curl(fm, f"/t/slow/200?i={i}")[0]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(24)))
    assert codes == [200] * 24
    assert time.monotonic() - t0 >= 0.2
    made = fm.cluster_stats("h2")["upstream_cx_total"]
    assert 2 <= made <= 24 // 4 + 2, made
    assert echo_stats(echo)["connections"] == made
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and fm.cluster_stats("h2")["upstream_cx_active"] > 1:
        time.sleep(0.1)
    assert fm.cluster_stats("h2")["upstream_cx_active"] == 1


def test_retries_and_access_log_as_for_http1(start_echo, start_fastmesh, tmp_path, loop_kind):
    """The HTTP/1 path's machinery applies unchanged: a reset stream is retried by the
    route's policy (then 503), and every request is one access-log line."""
    echo = start_echo(loop_kind)
    log_path = tmp_path / "access.log"
    cfg = _cfg(echo, retry_policy={"retry_on": ["reset"], "num_retries": 2})
    cfg["listeners"][0]["access_log"] = str(log_path)
    fm = start_fastmesh(cfg, loop=loop_kind)
    code, rc, body = curl(fm, "/t/reset")
    assert code == 503
    assert fm.cluster_stats("h2")["upstream_rq_retry"] == 2
    assert echo_stats(echo)["connections"] == 1
    code, rc, body = curl(fm, "/t/bytes/5000?cl")
    assert (code, len(body)) == (200, 5000)
    deadline = time.monotonic() + 3
    lines = []
    while time.monotonic() < deadline and len(lines) < 2:
        time.sleep(0.2)
        lines = log_path.read_text().splitlines() if log_path.exists() else []
    assert len(lines) == 2, lines
    assert '"GET /t/reset HTTP/1.1" 503 upstream_reset' in lines[0] and " h2 " in lines[0]
    assert '"GET /t/bytes/5000?cl HTTP/1.1" 200 -' in lines[1] and f":{echo} " in lines[1]


def test_idle_upstream_connection_closes(start_echo, start_fastmesh):
    """The shared HTTP/2 connection is closed (GOAWAY) after the cluster's idle timeout,
    on a listener that has only HTTP/1 clients."""
    echo = start_echo()
    cfg = _cfg(echo)
    cfg["clusters"][0]["idle_timeout_ms"] = 400
    fm = start_fastmesh(cfg)
    assert curl(fm, "/x")[0] == 200
    assert echo_stats(echo)["open"] == 2             # the proxy's, and this query's own
    deadline = time.monotonic() + 3
    while echo_stats(echo)["open"] > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert echo_stats(echo)["open"] == 1
    assert fm.cluster_stats("h2")["upstream_cx_idle_closed"] == 1
    assert curl(fm, "/y")[0] == 200                  # a new one when needed
    assert echo_stats(echo)["connections"] == 2


def test_mirror_to_an_http2_cluster_is_skipped_and_counted(start_echo, start_fastmesh):
    primary, shadow = start_echo(), start_echo()
    cfg = _cfg(primary, mirrors=[{"cluster": "shadow"}])
    cfg["clusters"].append({"name": "shadow", "endpoints": [f"127.0.0.1:{shadow}"],
                            "http_protocol": "http2"})
    fm = start_fastmesh(cfg)
    assert curl(fm, "/m")[:3:2] == (200, b"GET /m\n")
    time.sleep(0.3)
    assert fm.cluster_stats("shadow")["upstream_rq_shadow_skipped"] == 1
    assert echo_stats(shadow)["connections"] == 0     # no HTTP/1.1 bytes at an h2c server
