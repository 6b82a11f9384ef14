"""Configurable access-log formats (Envoy-style %OPERATOR% text and JSON lines) on HTTP/1,
with a real proxy and upstream; the operator parser; config errors with paths."""
import json
import time
import urllib.request

import pytest

from fastmesh._core.accesslog import compile_format
from fastmesh.config.load import ConfigError, load_dict


def _lines(path, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return path.read_text().splitlines()
        time.sleep(0.05)
    raise AssertionError(path.read_text() if path.exists() else "no file")


def _cfg(up, access_log):
    return {"listeners": [{"name": "web", "protocol": "http1", "route_table": "rt",
                           "access_log": access_log}],
            "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}},
            "clusters": [{"name": "up", "endpoints": [up.address]}]}


def test_text_format_operators(start_upstream, start_fastmesh, tmp_path, loop_kind):
    up = start_upstream("u", loop_kind)
    path = tmp_path / "a.log"
    fmt = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
           '%RESPONSE_FLAGS% %DURATION% ua=%REQ(USER-AGENT)% host=%REQ(:AUTHORITY)% '
           '%UPSTREAM_CLUSTER% %UPSTREAM_HOST% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% '
           'rid=%REQ(X-REQUEST-ID)% missing=%REQ(X-NOPE)% 100%%')
    fm = start_fastmesh(_cfg(up, {"path": str(path), "format": fmt}), loop=loop_kind)
    req = urllib.request.Request(fm.url("/a/b?c=1"), headers={"User-Agent": "probe/1",
                                                              "X-Request-Id": "rid-42"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    line = _lines(path, 1)[0]
    assert line.startswith("[20") and "Z]" in line
    assert '"GET /a/b?c=1 HTTP/1.1" 200 - ' in line
    assert "ua=probe/1" in line and f"host=127.0.0.1:{fm.port}" in line
    assert f" up {up.address} 127.0.0.1 " in line
    assert "rid=rid-42" in line and "missing=-" in line and line.endswith(" 100%")


def test_bytes_response_headers_and_envoy_flags(start_upstream, start_fastmesh, tmp_path,
                                                loop_kind):
    """BYTES_RECEIVED / BYTES_SENT count bodies as decoded (chunked framing not counted),
    RESP(X) reads the response head as sent, RESPONSE_FLAGS are Envoy's codes."""
    import http.client
    import socket as _socket
    from fmtest import free_port
    up = start_upstream("u", loop_kind)
    path = tmp_path / "a.jsonl"
    cfg = _cfg(up, {"path": str(path), "json_format": {
        "id": "%REQ(X-REQUEST-ID)%", "rx": "%BYTES_RECEIVED%", "tx": "%BYTES_SENT%",
        "len": "%RESP(CONTENT-LENGTH)%", "te": "%RESP(X-NOPE?TRANSFER-ENCODING)%",
        "flags": "%RESPONSE_FLAGS%", "long": "%RESPONSE_FLAGS_LONG%",
        "details": "%RESPONSE_CODE_DETAILS%", "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "host": "%HOSTNAME%", "code": "%RESPONSE_CODE%"}})
    cfg["route_tables"]["rt"]["routes"].insert(
        0, {"match": {"prefix": "/dead/"}, "cluster": "dead"})
    cfg["route_tables"]["rt"]["routes"].insert(
        0, {"match": {"prefix": "/none/"}, "direct_response": {"status": 404}})
    cfg["clusters"].append({"name": "dead", "endpoints": [f"127.0.0.1:{free_port()}"]})
    fm = start_fastmesh(cfg, loop=loop_kind)
    ports = {}

    def go(rid, method, p, body=None, chunked=False):
        conn = http.client.HTTPConnection("127.0.0.1", fm.port, timeout=10)
        conn.connect()
        ports[rid] = conn.sock.getsockname()[1]
        conn.request(method, p, body=iter(body) if chunked else body,
                     headers={"X-Request-Id": rid}, encode_chunked=chunked)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    st, body = go("len", "POST", "/bytes/777", b"z" * 123)
    assert st == 200 and len(body) == 777
    assert go("chunked", "POST", "/chunked/20000", [b"a" * 70, b"b" * 30], True)[0] == 200
    st, dead_body = go("dead", "GET", "/dead/x")
    assert st == 503
    # a client that goes away mid-response: DC
    with _socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
        s.sendall(b"GET /drip/0/3000/10 HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or got.endswith(b"\r\n\r\n"):
            got += s.recv(100)             # the head and some of the body (10-byte pieces)
    recs = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(recs) < 4:
        recs = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())} \
            if path.exists() else {}
        time.sleep(0.05)
    r = recs["len"]
    assert (r["rx"], r["tx"], r["len"], r["te"], r["flags"], r["details"], r["code"]) == \
        ("123", "777", "777", None, "-", "via_upstream", "200"), r
    assert r["client"] == f"127.0.0.1:{ports['len']}" and r["host"]
    r = recs["chunked"]
    assert (r["rx"], r["tx"], r["len"], r["te"]) == ("100", "20000", None, "chunked"), r
    r = recs["dead"]
    assert (r["flags"], r["long"], r["details"], r["code"]) == \
        ("UF", "UpstreamConnectionFailure", "connect_failed", "503"), r
    assert r["tx"] == str(len(dead_body)) and r["len"] == str(len(dead_body)), r
    r = recs["gone"]
    assert (r["flags"], r["long"], r["code"]) == ("DC", "DownstreamConnectionTermination",
                                                  "200"), r
    assert 10 <= int(r["tx"]) < 100, r


def test_json_format(start_upstream, start_fastmesh, tmp_path):
    up = start_upstream("u")
    path = tmp_path / "a.jsonl"
    fm = start_fastmesh(_cfg(up, {"path": str(path), "json_format": {
        "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%", "code": "%RESPONSE_CODE%",
        "upstream": "%UPSTREAM_HOST%", "nothing": "%REQ(X-NONE)%", "ms": "%DURATION%"}}))
    for p in ("/one", "/two"):
        with urllib.request.urlopen(fm.url(p), timeout=5) as r:
            assert r.status == 200
    recs = [json.loads(l) for l in _lines(path, 2)]
    assert [r["path"] for r in recs] == ["/one", "/two"]
    assert recs[0]["method"] == "GET" and recs[0]["code"] == "200"
    assert recs[0]["upstream"] == up.address and recs[0]["nothing"] is None


def test_compile_format():
    assert compile_format("a %DURATION% b") == ["a ", ("DURATION", None), " b"]
    assert compile_format("%REQ(X-Y):10%") == [("REQ", "X-Y")]
    for bad, word in (("%NOPE%", "unknown operator"), ("%REQ%", "needs an argument"),
                      ("50% off", "unclosed")):
        with pytest.raises(ValueError, match=word):
            compile_format(bad)


def test_config_errors_name_the_path():
    base = {"listeners": [{"name": "t", "protocol": "tcp", "address": "127.0.0.1:1",
                           "cluster": "c", "access_log": "/tmp/x"}],
            "clusters": [{"name": "c", "endpoints": ["127.0.0.1:2"]}]}
    with pytest.raises(ConfigError) as e:
        load_dict(base)
    assert any("listeners[0].access_log" in x for x in e.value.errors)
    base["listeners"][0].update(protocol="http1", route_table="rt", cluster=None)
    del base["listeners"][0]["cluster"]
    base["route_tables"] = {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "c"}]}}
    base["listeners"][0]["access_log"] = {"path": "/tmp/x", "format": "%UPSTREAM_TRANSPORT_FAILURE_REASON%"}
    with pytest.raises(ConfigError) as e:
        load_dict(base)
    assert any("listeners[0].access_log.format" in x and "UPSTREAM_TRANSPORT_FAILURE_REASON" in x
               for x in e.value.errors), e.value.errors
    base["listeners"][0]["access_log"] = {"path": "/tmp/x", "format": "%DURATION%"}
    cfg = load_dict(base)
    assert cfg.listeners[0].access_log_format == "%DURATION%"
