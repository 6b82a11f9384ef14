"""Envoy health_checks -> model HealthCheck: translation, Envoy's defaults, refusals (each
naming its path), and the verdict rules of fastmesh.health (Envoy's) without processes."""
from __future__ import annotations

import asyncio
import copy

import pytest

from fastmesh import health
from fastmesh.config.envoy import load_bootstrap
from fastmesh.config.load import ConfigError, load_dict, to_dict
from fastmesh.config.model import HealthCheck
from fmtest import camel

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
CL0 = "static_resources.clusters[0]"
HC0 = f"{CL0}.health_checks[0]"


def sock(host, port):
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap():
    """An HTTP listener over cluster "a" (two endpoints): valid for Envoy 1.40."""
    return {
        "admin": {"address": sock("127.0.0.1", 9901)},
        "static_resources": {
            "listeners": [
                {"name": "http", "address": sock("127.0.0.1", 10000),
                 "filter_chains": [{"filters": [{
                     "name": "envoy.filters.network.http_connection_manager",
                     "typed_config": {
                         "@type": HCM_TYPE, "stat_prefix": "ingress",
                         "route_config": {"name": "web", "virtual_hosts": [
                             {"name": "all", "domains": ["*"], "routes": [
                                 {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]}]},
                         "http_filters": [{"name": "envoy.filters.http.router",
                                           "typed_config": {"@type": ROUTER_TYPE}}]}}]}]}],
            "clusters": [{"name": "a", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "a", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": sock("127.0.0.1", p)}} for p in (8001, 8002)]}]}}],
        },
    }


def with_hc(*checks):
    b = bootstrap()
    b["static_resources"]["clusters"][0]["health_checks"] = list(checks)
    return b


def http_hc(**kw):
    return dict({"timeout": "1s", "interval": "5s", "unhealthy_threshold": 3,
                 "healthy_threshold": 2, "http_health_check": {"path": "/healthz"}}, **kw)


def tcp_hc(**kw):
    return dict({"timeout": "0.5s", "interval": "2s", "unhealthy_threshold": 1,
                 "healthy_threshold": 1, "tcp_health_check": {}}, **kw)


def translated(*checks):
    return load_bootstrap(with_hc(*checks)).clusters["a"].health_check


def errors_of(b):
    with pytest.raises(ConfigError) as ei:
        load_bootstrap(b, "test.yaml")
    return ei.value.errors


def test_http_check_with_envoy_defaults():
    assert translated(http_hc()) == HealthCheck(
        type="http", timeout_ms=1000, interval_ms=5000, unhealthy_threshold=3,
        healthy_threshold=2, path="/healthz", host=None, expected_statuses=((200, 201),),
        no_traffic_interval_ms=60000, unhealthy_interval_ms=None, interval_jitter_ms=0,
        interval_jitter_pct=0, initial_jitter_ms=0)


def test_no_health_checks():
    assert translated() is None
    assert load_bootstrap(bootstrap()).clusters["a"].health_check is None


def test_every_supported_field():
    hc = http_hc(interval_jitter="0.1s", interval_jitter_percent=10, initial_jitter="2s",
                 no_traffic_interval="30s", unhealthy_interval="1s", reuse_connection=False,
                 always_log_health_check_failures=False,
                 http_health_check={"path": "/ready", "host": "svc.local",
                                    "codec_client_type": "HTTP1", "method": "GET",
                                    "expected_statuses": [{"start": 200, "end": 300},
                                                          {"start": "404", "end": "405"}]})
    got = translated(hc)
    assert got == HealthCheck(
        type="http", timeout_ms=1000, interval_ms=5000, unhealthy_threshold=3,
        healthy_threshold=2, interval_jitter_ms=100, interval_jitter_pct=10,
        initial_jitter_ms=2000, no_traffic_interval_ms=30000, unhealthy_interval_ms=1000,
        path="/ready", host="svc.local", expected_statuses=((200, 300), (404, 405)))
    # the JSON spelling means the same
    assert load_bootstrap(camel(with_hc(hc))).clusters["a"].health_check == got
    # and the model goes to the workers and back unchanged
    cfg = load_bootstrap(with_hc(hc))
    assert load_dict(to_dict(cfg), cfg.source).clusters["a"].health_check == got


def test_tcp_check_payloads():
    got = translated(tcp_hc(tcp_health_check={
        "send": {"text": "50494E47"}, "receive": [{"text": "504f"}, {"binary": "Tkc="}]}))
    assert got == HealthCheck(type="tcp", timeout_ms=500, interval_ms=2000,
                              unhealthy_threshold=1, healthy_threshold=1, send_hex="50494e47",
                              receive_hex=("504f", "4e47"))
    # connect-only; and the model round-trips without an HTTP field
    plain = translated(tcp_hc())
    assert plain.send_hex is None and plain.receive_hex == ()
    cfg = load_bootstrap(with_hc(tcp_hc()))
    d = to_dict(cfg)
    assert "expected_statuses" not in d["clusters"][0]["health_check"]
    assert load_dict(d, cfg.source) == cfg


def test_thresholds_as_wrapper_maps():
    got = translated(http_hc(unhealthy_threshold={"value": 4}, healthy_threshold="5"))
    assert (got.unhealthy_threshold, got.healthy_threshold) == (4, 5)


def _drop(name):
    def change(hc):
        hc.pop(name)
    return change


def _http(**kw):
    def change(hc):
        hc["http_health_check"].update(kw)
    return change


REFUSALS = [
    (_drop("timeout"), f"{HC0}.timeout", "missing required field"),
    (_drop("interval"), f"{HC0}.interval", "missing required field"),
    (_drop("unhealthy_threshold"), f"{HC0}.unhealthy_threshold", "missing required field"),
    (_drop("healthy_threshold"), f"{HC0}.healthy_threshold", "missing required field"),
    (lambda hc: hc.update(timeout="0s"), f"{HC0}.timeout", "greater than 0s"),
    (lambda hc: hc.update(interval="0s"), f"{HC0}.interval", "greater than 0s"),
    (lambda hc: hc.update(no_traffic_interval="0s"), f"{HC0}.no_traffic_interval",
     "greater than 0s"),
    (lambda hc: hc.update(unhealthy_threshold=0), f"{HC0}.unhealthy_threshold",
     "expected an integer in 1.."),
    (lambda hc: hc.update(interval_jitter_percent=150), f"{HC0}.interval_jitter_percent",
     "0..100"),
    (_drop("http_health_check"), HC0, "missing the health checker"),
    (lambda hc: hc.update(tcp_health_check={}), HC0, "one health checker only"),
    (lambda hc: (hc.pop("http_health_check"), hc.update(grpc_health_check={})),
     f"{HC0}.grpc_health_check", "gRPC health checks: not supported yet"),
    (lambda hc: (hc.pop("http_health_check"), hc.update(custom_health_check={"name": "x"})),
     f"{HC0}.custom_health_check", "custom health checkers: not supported yet"),
    (lambda hc: hc.update(tls_options={"alpn_protocols": ["h2"]}), f"{HC0}.tls_options",
     "TLS health checks"),
    (lambda hc: hc.update(transport_socket_match_criteria={}),
     f"{HC0}.transport_socket_match_criteria", "not supported yet"),
    (lambda hc: hc.update(alt_port=8080), f"{HC0}.alt_port", "alt_port"),
    (lambda hc: hc.update(event_log_path="/tmp/hc.log"), f"{HC0}.event_log_path",
     "event logs: not supported yet"),
    (lambda hc: hc.update(event_logger=[]), f"{HC0}.event_logger", "event logs"),
    (lambda hc: hc.update(always_log_health_check_failures=True),
     f"{HC0}.always_log_health_check_failures", "event logs"),
    (lambda hc: hc.update(unhealthy_edge_interval="1s"), f"{HC0}.unhealthy_edge_interval",
     "not supported yet"),
    (lambda hc: hc.update(healthy_edge_interval="1s"), f"{HC0}.healthy_edge_interval",
     "not supported yet"),
    (lambda hc: hc.update(no_traffic_healthy_interval="1s"),
     f"{HC0}.no_traffic_healthy_interval", "not supported yet"),
    (lambda hc: hc.update(bogus=1), f"{HC0}.bogus", "unknown field"),
    (_http(path=""), f"{HC0}.http_health_check.path", "non-empty"),
    (lambda hc: hc["http_health_check"].pop("path"), f"{HC0}.http_health_check.path",
     "missing required field"),
    (_http(path="healthz"), f"{HC0}.http_health_check.path", "starting with /"),
    (_http(request_headers_to_add=[{"header": {"key": "k", "value": "v"}}]),
     f"{HC0}.http_health_check.request_headers_to_add", "not supported yet"),
    (_http(request_headers_to_remove=["x"]),
     f"{HC0}.http_health_check.request_headers_to_remove", "not supported yet"),
    (_http(retriable_statuses=[{"start": 500, "end": 600}]),
     f"{HC0}.http_health_check.retriable_statuses", "not supported yet"),
    (_http(send={"text": "00"}), f"{HC0}.http_health_check.send", "not supported yet"),
    (_http(receive=[{"text": "00"}]), f"{HC0}.http_health_check.receive", "not supported yet"),
    (_http(codec_client_type="HTTP2"), f"{HC0}.http_health_check.codec_client_type",
     "HTTP2 health checks: not supported yet"),
    (_http(method="HEAD"), f"{HC0}.http_health_check.method", "HEAD health checks"),
    (_http(service_name_matcher={"exact": "x"}),
     f"{HC0}.http_health_check.service_name_matcher", "not supported yet"),
    (_http(expected_statuses=[{"start": 200, "end": 200}]),
     f"{HC0}.http_health_check.expected_statuses[0]", "start < end"),
    (_http(expected_statuses=[{"start": 99, "end": 200}]),
     f"{HC0}.http_health_check.expected_statuses[0].start", "start >= 100"),
    (_http(expected_statuses=[{"start": 200, "end": 601}]),
     f"{HC0}.http_health_check.expected_statuses[0].end", "end <= 600"),
    (lambda hc: (hc.pop("http_health_check"),
                 hc.update(tcp_health_check={"send": {"text": "zz"}})),
     f"{HC0}.tcp_health_check.send.text", "invalid hex string"),
    (lambda hc: (hc.pop("http_health_check"),
                 hc.update(tcp_health_check={"receive": [{"binary": "!!"}]})),
     f"{HC0}.tcp_health_check.receive[0].binary", "invalid base64"),
    (lambda hc: (hc.pop("http_health_check"),
                 hc.update(tcp_health_check={"send": {"text": "00", "binary": "AA=="}})),
     f"{HC0}.tcp_health_check.send", "exactly one of text"),
    (lambda hc: (hc.pop("http_health_check"),
                 hc.update(tcp_health_check={"proxy_protocol_config": {}})),
     f"{HC0}.tcp_health_check.proxy_protocol_config", "PROXY protocol"),
]


@pytest.mark.parametrize("change,path,msg", REFUSALS)
def test_health_check_refusals(change, path, msg):
    hc = copy.deepcopy(http_hc())
    change(hc)
    errs = errors_of(with_hc(hc))
    assert any(e.startswith(f"{path}: ") and msg in e for e in errs), errs


def test_more_than_one_health_check_refused():
    errs = errors_of(with_hc(http_hc(), tcp_hc()))
    assert any(e.startswith(f"{CL0}.health_checks: ") and "2 health checks" in e
               and "one per cluster" in e for e in errs), errs


def test_not_a_list():
    b = bootstrap()
    b["static_resources"]["clusters"][0]["health_checks"] = {"timeout": "1s"}
    errs = errors_of(b)
    assert any(e.startswith(f"{CL0}.health_checks: expected a list") for e in errs), errs


# -- the verdict rules (Envoy's health_checker_impl), without sockets ----------------------

class _Checker:
    def __init__(self):
        self.changes = []
        self.stats = {}

    def _changed(self, name):
        self.changes.append(name)

    def counters(self, name):
        return self.stats.setdefault(name, dict.fromkeys(health.COUNTERS, 0))


def _prober(**kw):
    from fastmesh.config.model import Address, Cluster
    hc = HealthCheck(**dict(dict(type="http", timeout_ms=100, interval_ms=100, path="/",
                                 unhealthy_threshold=3, healthy_threshold=2), **kw))
    p = health.ClusterProber.__new__(health.ClusterProber)
    p.checker = _Checker()
    p.cfg = Cluster(name="c", endpoints=(Address("127.0.0.1", 1),), health_check=hc)
    p.hc = hc
    p.hosts = {}
    p.first_round = asyncio.Event()
    p.resolver = type("R", (), {"looked_up": True})()
    return p


def test_first_result_decides_at_once():
    p = _prober()
    for result, failed in ((health.OK, False), (health.NETWORK_FAILURE, True)):
        h = health._Host()
        assert h.failed                     # pending: failed until its first result
        p._record(("127.0.0.1", 1), h, result)
        assert h.failed is failed


def test_thresholds_and_immediate_status_failure():
    p = _prober()
    hp = ("127.0.0.1", 1)
    h = health._Host()
    p._record(hp, h, health.OK)
    # network failures: unhealthy_threshold (3) in a row
    p._record(hp, h, health.NETWORK_FAILURE)
    p._record(hp, h, health.NETWORK_FAILURE)
    p._record(hp, h, health.OK)             # resets the count
    p._record(hp, h, health.NETWORK_FAILURE)
    p._record(hp, h, health.NETWORK_FAILURE)
    assert not h.failed
    p._record(hp, h, health.NETWORK_FAILURE)
    assert h.failed
    # healthy again after healthy_threshold (2) successes in a row
    p._record(hp, h, health.OK)
    assert h.failed
    p._record(hp, h, health.OK)
    assert not h.failed
    # an unexpected status fails at once (no retriable_statuses)
    p._record(hp, h, health.ACTIVE_FAILURE)
    assert h.failed
    st = p.checker.stats["c"]
    assert st == {"health_check_attempt": 10, "health_check_success": 4,
                  "health_check_failure": 6, "health_check_network_failure": 5}


def test_intervals_and_jitter():
    p = _prober(interval_ms=1000, no_traffic_interval_ms=60000, unhealthy_interval_ms=300,
                interval_jitter_pct=10, interval_jitter_ms=50)
    h = health._Host(failed=False)
    for _ in range(50):
        assert 60000 <= p._interval_ms(h, traffic=False) < 60000 + 6000 + 50
        assert 1000 <= p._interval_ms(h, traffic=True) < 1000 + 100 + 50
    h.failed = True
    assert 300 <= p._interval_ms(h, traffic=True) < 300 + 30 + 50


def test_tcp_receive_segments_in_order():
    assert health._matches(b"xxPINGyyPONG", [b"PING", b"PONG"])
    assert not health._matches(b"PONGPING", [b"PING", b"PONG"])
    assert health._matches(b"anything", [])
