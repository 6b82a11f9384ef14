"""The HTTP/1 access log: one line per request that ends, in the documented format, for
proxied, locally answered and rejected requests; written by the worker within ~100 ms.
Real fastmesh and upstream processes; both loops."""
import re
import time

import pytest

from fmtest import RawClient, free_port

pytestmark = pytest.mark.timeout(60)

LINE = re.compile(
    r'^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<client>\S+) "(?P<request>[^"]*)" '
    r'(?P<status>\d{3}|-) (?P<flag>\S+) (?P<ms>\d+\.\d{3}) (?P<cluster>\S+) (?P<upstream>\S+) '
    r'(?P<rid>\S+)$')


@pytest.fixture
def mesh(start_fastmesh, start_upstream, loop_kind, tmp_path):
    up = start_upstream("web", loop=loop_kind)
    log_path = tmp_path / "access.log"
    cfg = {
        "listeners": [{"name": "ingress", "protocol": "http1", "route_table": "web",
                       "access_log": str(log_path)}],
        "route_tables": {"web": {"virtual_hosts": [
            {"name": "known", "domains": ["known.local"], "routes": [
                {"match": {"prefix": "/dead/"}, "cluster": "dead"},
                {"match": {"path": "/direct"}, "direct_response": {"status": 200,
                                                                   "body": "d"}},
                {"match": {"prefix": "/"}, "cluster": "web"}]}]}},
        "clusters": [{"name": "web", "endpoints": [up.address]},
                     {"name": "dead", "endpoints": [f"127.0.0.1:{free_port()}"]}],
    }
    return start_fastmesh(cfg, loop=loop_kind), log_path, up


def read_lines(path, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines()
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_one_line_per_request_in_the_documented_format(mesh):
    fm, log_path, up = mesh
    with RawClient(fm.port) as c:
        c.request("GET", "/_/slow/30", host="known.local", headers={"x-request-id": "rid-1"})
        assert c.read_response().status == 200
        c.request("POST", "/echo", host="known.local", body=b"abc")
        assert c.read_response().status == 200
        c.request("GET", "/direct", host="known.local")
        assert c.read_response().status == 200
        c.request("GET", "/dead/x", host="known.local")
        assert c.read_response().status == 503
        c.request("GET", "/", host="unknown.local")
        assert c.read_response().status == 404
    with RawClient(fm.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: known.local\r\nBad Header\r\n\r\n")
        assert c.read_raw_until_close().startswith(b"HTTP/1.1 400")
    lines = read_lines(log_path, 6)
    assert len(lines) == 6, lines
    got = [LINE.match(l) for l in lines]
    assert all(got), lines
    slow, post, direct, dead, noroute, bad = (m.groupdict() for m in got)
    assert slow["request"] == "GET /_/slow/30 HTTP/1.1" and slow["status"] == "200"
    assert slow["flag"] == "-" and slow["cluster"] == "web" and slow["upstream"] == up.address
    assert slow["rid"] == "rid-1" and float(slow["ms"]) >= 25
    assert slow["client"] == "127.0.0.1"
    assert post["request"] == "POST /echo HTTP/1.1" and len(post["rid"]) == 36  # generated
    assert (direct["status"], direct["flag"], direct["upstream"]) == ("200", "-", "-")
    assert (dead["status"], dead["flag"], dead["cluster"]) == ("503", "connect_failed", "dead")
    assert (noroute["status"], noroute["flag"], noroute["cluster"]) == ("404", "no_route", "-")
    assert (bad["request"], bad["status"], bad["flag"]) == ("-", "400", "bad_request")


def test_client_reset_mid_request_is_logged(mesh):
    # (a plain FIN is a half-close the proxy honours: the response is still sent and logged)
    import socket
    import struct
    fm, log_path, _ = mesh
    c = RawClient(fm.port)
    c.request("GET", "/_/slow/2000", host="known.local")
    time.sleep(0.2)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                                               # RST
    lines = read_lines(log_path, 1)
    m = LINE.match(lines[-1])
    assert m and m["status"] == "-" and m["flag"] == "downstream_reset", lines


def test_an_access_log_that_cannot_be_opened_stops_the_start_with_the_reason(tmp_path):
    import subprocess
    import sys

    import yaml
    cfg = {"admin": {"address": f"127.0.0.1:{free_port()}"},
           "listeners": [{"name": "ingress", "address": f"127.0.0.1:{free_port()}",
                          "route_table": "web", "access_log": str(tmp_path / "no" / "a.log")}],
           "route_tables": {"web": {"routes": [{"match": {"prefix": "/"},
                                                "direct_response": {"status": 200}}]}},
           "clusters": []}
    path = tmp_path / "fastmesh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "fastmesh", "run", "-c", str(path)],
                       capture_output=True, timeout=30)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert f"access log {tmp_path / 'no' / 'a.log'}: No such file or directory" in err, err
