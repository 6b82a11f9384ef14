"""The dashboard's JSON API, latency histograms, /stats?filter and /logging on a real proxy
(real upstreams, real requests; each test on uvloop and asyncio)."""
from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fmtest import free_port, get_json, post_json


def _config(web, api, dead_port):
    return {
        "listeners": [{"name": "ingress", "protocol": "http1", "route_table": "rt"}],
        "route_tables": {"rt": {"virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/api"}, "cluster": "api"},
                {"match": {"prefix": "/"}, "cluster": "web"}]}]}},
        "clusters": [{"name": "web", "endpoints": [web.address]},
                     {"name": "api", "endpoints": [api.address, f"127.0.0.1:{dead_port}"]}],
    }


@pytest.fixture
def proxy(start_upstream, start_fastmesh, loop_kind):
    web, api = start_upstream("web", loop_kind), start_upstream("api", loop_kind)
    dead = free_port()
    fm = start_fastmesh(_config(web, api, dead), loop=loop_kind)
    fm.dead = f"127.0.0.1:{dead}"
    return fm


def _get(fm, path):
    with urllib.request.urlopen(fm.url(path), timeout=5) as r:
        return r.status, r.read()


def _try_get(fm, path):
    try:
        return _get(fm, path)[0]
    except urllib.error.HTTPError as e:
        return e.code


def _admin_json(fm, path):
    return get_json(fm.admin_port, path)


def test_histogram_counts_match_requests(proxy):
    for _ in range(25):
        assert _get(proxy, "/x")[0] == 200
    deadline = time.monotonic() + 5
    while True:
        st = _admin_json(proxy, "/stats")
        h = st["latency_histograms"]
        if h["listeners"].get("ingress", {}).get("count") == 25 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert h["listeners"]["ingress"]["count"] == 25
    assert h["clusters"]["web"]["count"] == 25
    assert sum(h["clusters"]["web"]["counts"]) == 25
    assert h["clusters"]["web"]["sum_us"] > 0
    assert len(h["bounds_us"]) + 1 == len(h["clusters"]["web"]["counts"])
    assert h["bounds_us"] == sorted(h["bounds_us"])


def test_prometheus_histograms_parse(proxy):
    for _ in range(7):
        _get(proxy, "/y")
    time.sleep(0.2)
    status, body = proxy.admin("/stats/prometheus")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    fam = fams["fastmesh_cluster_upstream_rq_time_seconds"]
    assert fam.type == "histogram"
    samples = [s for s in fam.samples if s.labels.get("cluster") == "web"]
    count = [s.value for s in samples if s.name.endswith("_count")]
    assert count == [7]
    buckets = [s for s in samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 7
    values = [b.value for b in buckets]
    assert values == sorted(values)                 # cumulative
    assert [s.value for s in samples if s.name.endswith("_sum")][0] > 0
    assert "fastmesh_listener_downstream_rq_time_seconds" in fams


def test_stats_filter(proxy):
    st = _admin_json(proxy, "/stats?filter=rq_total$")
    assert set(st["listeners"]["ingress"]) == {"downstream_rq_total"}
    assert set(st["clusters"]["web"]) == {"upstream_rq_total"}
    assert "server" not in st
    st = _admin_json(proxy, "/stats?filter=" + urllib.request.quote(r"^clusters\.api\."))
    assert list(st) == ["clusters"] and list(st["clusters"]) == ["api"]
    status, body = proxy.admin("/stats?filter=" + urllib.request.quote("(unclosed"))
    assert status == 400 and b"regular expression" in body
    status, body = proxy.admin("/stats/prometheus?filter=" + urllib.request.quote("cx_active"))
    assert status == 200 and b"downstream_cx_active" in body and b"rq_total" not in body


def test_logging_levels(proxy):
    status, out = post_json(proxy.admin_port, "/logging?level=debug")
    assert status == 200 and out["root"] == "debug"
    _get(proxy, "/z")
    # the worker logs at debug now too
    deadline = time.monotonic() + 5
    while "DEBUG" not in proxy.proc.stderr_text() and time.monotonic() < deadline:
        _get(proxy, "/z")
        time.sleep(0.1)
    assert "DEBUG fastmesh.worker[w0]: worker 0: log levels set" in proxy.proc.stderr_text()
    assert "DEBUG fastmesh.supervisor: log levels set" in proxy.proc.stderr_text()
    status, out = post_json(proxy.admin_port, "/logging?level=warning")
    assert status == 200 and out["root"] == "warning"
    req = urllib.request.Request(f"http://127.0.0.1:{proxy.admin_port}/logging?level=loud",
                                 method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400


def test_topology_rates_events(proxy):
    topo = _admin_json(proxy, "/api/topology")
    assert [l["name"] for l in topo["listeners"]] == ["ingress"]
    assert topo["listeners"][0]["route_table"] == "rt"
    rt = topo["route_tables"][0]
    assert rt["name"] == "rt" and rt["virtual_hosts"][0]["name"] == "all"
    assert [r["clusters"][0]["cluster"] for r in rt["virtual_hosts"][0]["routes"]] == ["api", "web"]
    cl = {c["name"]: c for c in topo["clusters"]}
    assert set(cl) == {"web", "api"}
    eps = {e["address"]: e["health"] for e in cl["api"]["endpoints"]}
    assert proxy.dead in eps
    # the dead endpoint is found unreachable (probe, or connect failures under traffic)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for _ in range(4):
            _try_get(proxy, "/api/q")
        eps = {e["address"]: e["health"]
               for c in _admin_json(proxy, "/api/topology")["clusters"] if c["name"] == "api"
               for e in c["endpoints"]}
        if eps[proxy.dead] == "unreachable":
            break
        time.sleep(0.3)
    assert eps[proxy.dead] == "unreachable"
    assert [h for a, h in eps.items() if a != proxy.dead] == ["healthy"]

    # rates move under load
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for _ in range(20):
            _get(proxy, "/w")
        rates = _admin_json(proxy, "/api/rates")
        if rates["clusters"]["web"]["rq_per_s"] > 0:
            break
    assert rates["clusters"]["web"]["rq_per_s"] > 0
    assert rates["clusters"]["web"]["p50_ms"] is not None
    assert rates["listeners"]["ingress"]["rq_per_s"] > 0
    assert "connections" in rates["listeners"]["ingress"]
    assert set(rates["endpoints"]["api"]) >= {proxy.dead}
    # each endpoint has its own percentiles (from its own histogram)
    web_ep = next(iter(rates["endpoints"]["web"].values()))
    assert web_ep["p50_ms"] is not None and web_ep["p99_ms"] >= web_ep["p50_ms"]
    assert rates["endpoints"]["api"][proxy.dead]["p50_ms"] is None      # never answered

    ev = _admin_json(proxy, "/api/events")
    assert ev["events"][0]["kind"] == "server" and ev["events"][0]["source"] == "start"
    last = ev["last"]
    # a reload that removes the dead endpoint and adds a cluster shows in the timeline
    cfg = json.loads(json.dumps(proxy.cfg))
    cfg["clusters"][1]["endpoints"] = cfg["clusters"][1]["endpoints"][:1]
    cfg["clusters"].append({"name": "extra", "endpoints": cfg["clusters"][0]["endpoints"]})
    import yaml
    proxy.path.write_text(yaml.safe_dump(cfg))
    status, out = post_json(proxy.admin_port, "/reload")
    assert status == 200, out
    ev = _admin_json(proxy, f"/api/events?since={last}")
    got = {(e["kind"], e["action"], e["name"], e["source"]) for e in ev["events"]}
    assert ("endpoint", "removed", f"api/{proxy.dead}", "file reload") in got
    assert ("cluster", "added", "extra", "file reload") in got
    assert all(e["config_version"] == ev["config_version"] for e in ev["events"])
    status, _ = proxy.admin("/api/events?since=x")
    assert status == 400


def test_sse_does_not_block_admin(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=5)
    s.sendall(b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b"event: rates" not in got:
        got += s.recv(65536)
    assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got
    assert b"event: topology" in got
    t0 = time.monotonic()
    assert proxy.admin("/ready")[0] == 200
    assert time.monotonic() - t0 < 1.0
    n = got.count(b"event: rates")
    deadline = time.monotonic() + 3
    while got.count(b"event: rates") < n + 4 and time.monotonic() < deadline:
        got += s.recv(65536)
    assert got.count(b"event: rates") >= n + 4          # several updates a second
    s.close()


def test_admin_parser_errors(proxy):
    with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=5) as s:
        s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=5) as s:
        s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 431")
    status, _ = proxy.admin("/nope")
    assert status == 404
    # a request split into pieces is parsed whole
    with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=5) as s:
        for piece in (b"GET /re", b"ady HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            s.sendall(piece)
            time.sleep(0.02)
        assert s.recv(1000).startswith(b"HTTP/1.1 200")


def test_health_words_hc_and_ejection(start_upstream, start_fastmesh, loop_kind):
    """An endpoint failing its active health check is `unhealthy`, one ejected by outlier
    detection `ejected`; the transitions are in the timeline."""
    a, b = start_upstream("a", loop_kind), start_upstream("b", loop_kind)
    c, d = start_upstream("c", loop_kind), start_upstream("d", loop_kind)
    cfg = {
        "listeners": [{"name": "in", "protocol": "http1", "route_table": "rt"}],
        "route_tables": {"rt": {"routes": [
            {"match": {"prefix": "/od"}, "cluster": "od"},
            {"match": {"prefix": "/"}, "cluster": "hc"}]}},
        "clusters": [
            {"name": "hc", "endpoints": [a.address, b.address],
             "health_check": {"type": "http", "path": "/healthz", "timeout_ms": 500,
                              "interval_ms": 200, "no_traffic_interval_ms": 200}},
            {"name": "od", "endpoints": [c.address, d.address],
             "outlier_detection": {"consecutive_5xx": 2, "interval_ms": 100,
                                   "max_ejection_pct": 50}}],
    }
    fm = start_fastmesh(cfg, loop=loop_kind)
    _admin_json(fm, "/api/topology")    # watched from now: transitions are seen as they happen
    time.sleep(0.5)
    urllib.request.urlopen(f"http://{b.address}/control/health/fail", timeout=5).read()
    urllib.request.urlopen(f"http://{d.address}/control/fail/500", timeout=5).read()

    def health():
        return {(c_["name"], e["address"]): e["health"]
                for c_ in _admin_json(fm, "/api/topology")["clusters"] for e in c_["endpoints"]}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for _ in range(6):
            _try_get(fm, "/od/x")
        h = health()
        if h[("hc", b.address)] == "unhealthy" and h[("od", d.address)] == "ejected":
            break
        time.sleep(0.2)
    assert h[("hc", b.address)] == "unhealthy", h
    assert h[("od", d.address)] == "ejected", h
    assert h[("hc", a.address)] == "healthy" and h[("od", c.address)] == "healthy"
    time.sleep(0.5)                     # a sample or two: transitions enter the timeline
    events = _admin_json(fm, "/api/events")["events"]
    got = {(e["name"], e["source"]) for e in events if e["action"] == "health"}
    assert (f"od/{d.address}", "outlier detection") in got, events
