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
           '%UPSTREAM_CLUSTER% %UPSTREAM_HOST% %DOWNSTREAM_REMOTE_ADDRESS% '
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
    base["listeners"][0]["access_log"] = {"path": "/tmp/x", "format": "%BYTES_SENT%"}
    with pytest.raises(ConfigError) as e:
        load_dict(base)
    assert any("listeners[0].access_log.format" in x and "BYTES_SENT" in x
               for x in e.value.errors), e.value.errors
    base["listeners"][0]["access_log"] = {"path": "/tmp/x", "format": "%DURATION%"}
    cfg = load_dict(base)
    assert cfg.listeners[0].access_log_format == "%DURATION%"
