"""Envoy v3 bootstrap -> typed model (fastmesh.config.envoy): translations and refusals.

Each refusal test changes one field of a bootstrap that Envoy 1.40 accepts and checks the error
names that field's path. tests/integration/test_envoy_parity.py runs real Envoy on the same
kind of file.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from fastmesh.config.envoy import load_bootstrap, looks_like_bootstrap
from fastmesh.config.envoy._common import snake
from fastmesh.config.envoy.cluster import ENVOY_BREAKERS
from fastmesh.config.load import ConfigError, load_dict, load_file, load_text, to_dict
from fastmesh.config.model import (Address, Admin, CircuitBreakers, Cluster, DirectResponse,
                                   Fault, HeaderMatch, Listener, LocalRateLimit,
                                   OutlierDetection, RetryPolicy, Route, RouteMatch,
                                   WeightedCluster)
from fmtest import camel

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
TCP_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
VH0 = f"{HCM}.route_config.virtual_hosts[0]"
R0 = f"{VH0}.routes[0]"
CL0 = "static_resources.clusters[0]"
LBE0 = f"{CL0}.load_assignment.endpoints[0].lb_endpoints[0]"


def sock(host, port):
    return {"socket_address": {"address": host, "port_value": port}}


def endpoint(host, port, **kw):
    return {"endpoint": {"address": sock(host, port)}, **kw}


def cluster(name, *eps, **kw):
    return {"name": name, "connect_timeout": "1s", **kw,
            "load_assignment": {"cluster_name": name,
                                "endpoints": [{"lb_endpoints": [endpoint(h, p) for h, p in eps]}]}}


def bootstrap():
    """An HTTP listener and a tcp_proxy listener over two clusters: valid for Envoy 1.40."""
    return {
        "node": {"id": "sidecar", "cluster": "test"},
        "admin": {"address": sock("127.0.0.1", 9901)},
        "static_resources": {
            "listeners": [
                {"name": "http", "address": sock("127.0.0.1", 10000),
                 "filter_chains": [{"filters": [{
                     "name": "envoy.filters.network.http_connection_manager",
                     "typed_config": {
                         "@type": HCM_TYPE, "stat_prefix": "ingress", "codec_type": "AUTO",
                         "route_config": {"name": "web", "virtual_hosts": [
                             {"name": "all", "domains": ["*"], "routes": [
                                 {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]}]},
                         "http_filters": [{"name": "envoy.filters.http.router",
                                           "typed_config": {"@type": ROUTER_TYPE}}]}}]}]},
                {"name": "tcp", "address": sock("127.0.0.1", 10001),
                 "filter_chains": [{"filters": [{
                     "name": "envoy.filters.network.tcp_proxy",
                     "typed_config": {"@type": TCP_TYPE, "stat_prefix": "tcp",
                                      "cluster": "b"}}]}]},
            ],
            "clusters": [cluster("a", ("127.0.0.1", 8001), ("127.0.0.1", 8002)),
                         cluster("b", ("127.0.0.1", 8003))],
        },
    }


FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def _file_log(log_format, path="/tmp/fm-access.log"):
    tc = {"@type": FILE_LOG_TYPE, "path": path}
    if log_format is not None:
        tc["log_format"] = log_format
    return {"name": "envoy.access_loggers.file", "typed_config": tc}


def test_file_access_log_formats():
    b = bootstrap()
    fmt = '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%" %RESPONSE_CODE%\n'
    hcm(b)["access_log"] = [_file_log({"text_format_source": {"inline_string": fmt}})]
    lst = load_bootstrap(b, "test.yaml").listeners[0]
    assert lst.access_log == "/tmp/fm-access.log" and lst.access_log_format == fmt
    hcm(b)["access_log"] = [_file_log({"json_format": {"code": "%RESPONSE_CODE%",
                                                        "path": "%REQ(:PATH)%"}})]
    lst = load_bootstrap(b, "test.yaml").listeners[0]
    assert lst.access_log_json == (("code", "%RESPONSE_CODE%"), ("path", "%REQ(:PATH)%"))
    hcm(b)["access_log"] = [_file_log(None)]
    lst = load_bootstrap(b, "test.yaml").listeners[0]
    # no log_format: Envoy's default line, as Envoy writes it
    from fastmesh._core.accesslog import ENVOY_DEFAULT_FORMAT
    assert lst.access_log == "/tmp/fm-access.log"
    assert lst.access_log_format == ENVOY_DEFAULT_FORMAT


def hcm(b):
    return b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


def vhost(b, i=0):
    return hcm(b)["route_config"]["virtual_hosts"][i]


def route0(b):
    return vhost(b)["routes"][0]


def errors_of(b):
    with pytest.raises(ConfigError) as ei:
        load_bootstrap(b, "test.yaml")
    return ei.value.errors


# -- recognition and dispatch ------------------------------------------------------------------

def test_looks_like_bootstrap():
    assert looks_like_bootstrap(bootstrap())
    assert looks_like_bootstrap({"staticResources": {}})
    assert looks_like_bootstrap({"node": {"id": "x"}})
    assert looks_like_bootstrap({"admin": {"address": sock("127.0.0.1", 1)}})
    assert not looks_like_bootstrap({"listeners": [], "admin": {"address": "127.0.0.1:1"}})
    assert not looks_like_bootstrap({"admin": None, "listeners": []})
    assert not looks_like_bootstrap(None)
    assert not looks_like_bootstrap([1])


def test_snake():
    assert snake("statPrefix") == "stat_prefix"
    assert snake("maxRequestHeadersKb") == "max_request_headers_kb"
    assert snake("googleRe2") == "google_re2"
    assert snake("stat_prefix") == "stat_prefix"


def test_load_text_yaml_and_json_give_the_same_model(tmp_path):
    b = bootstrap()
    y = tmp_path / "envoy.yaml"
    y.write_text(yaml.safe_dump(b))
    j = tmp_path / "envoy.json"
    j.write_text(json.dumps(b, indent="\t"))          # tabs: not YAML, still JSON
    cy, cj = load_file(str(y)), load_file(str(j))
    assert cy.listeners == cj.listeners and cy.clusters == cj.clusters
    assert cy.route_tables == cj.route_tables
    assert cj.source == str(j)


def test_camel_case_and_snake_case_give_the_same_model():
    b = bootstrap()
    vhost(b)["routes"][0]["request_headers_to_add"] = [
        {"header": {"key": "x-a", "value": "1"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}]
    hcm(b)["common_http_protocol_options"] = {"idle_timeout": "30s"}
    hcm(b)["max_request_headers_kb"] = 32
    c = camel(b)
    assert "staticResources" in c and "maxRequestHeadersKb" in hcm_of(c)
    assert load_bootstrap(b) == load_bootstrap(c)


def hcm_of(c):
    return c["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]


def test_both_spellings_of_one_field_refused():
    b = bootstrap()
    hcm(b)["statPrefix"] = "x"
    assert any(e.startswith(f"{HCM}.statPrefix: field 'stat_prefix' given twice")
               for e in errors_of(b))


def test_load_dict_dispatches_and_native_still_works():
    cfg = load_dict(bootstrap(), "x")
    assert cfg.listeners[0].name == "http"
    native = load_dict(to_dict(cfg), "x")
    assert native == cfg


# -- admin -------------------------------------------------------------------------------------

def test_admin():
    assert load_bootstrap(bootstrap()).admin == Admin(Address("127.0.0.1", 9901))
    b = bootstrap()
    del b["admin"]
    assert load_bootstrap(b).admin is None             # Envoy: no admin section, no admin
    b["admin"] = {"access_log_path": "/dev/null"}
    assert load_bootstrap(b).admin is None
    b["admin"] = {"address": sock("::1", 0), "access_log_path": "/dev/null"}
    assert load_bootstrap(b).admin == Admin(Address("::1", 0))


def test_admin_refusals():
    b = bootstrap()
    b["admin"]["address"] = {"pipe": {"path": "/tmp/admin.sock"}}
    assert "admin.address.pipe: unix socket addresses: not supported yet" in errors_of(b)
    b = bootstrap()
    b["admin"]["socket_options"] = []
    assert any(e.startswith("admin.socket_options: socket options") for e in errors_of(b))


# -- listeners ---------------------------------------------------------------------------------

def test_http_listener_defaults_are_envoys():
    lst = load_bootstrap(bootstrap()).listeners[0]
    assert lst == Listener(name="http", address=Address("127.0.0.1", 10000), protocol="http1",
                           route_table="web", max_head_bytes=60 * 1024, max_headers=100,
                           idle_timeout_ms=3600000, stream_idle_timeout_ms=300000,
                           accept_http_10=False, codec="auto")   # codec_type AUTO: h2c too


def sample_listener_options():
    b = bootstrap()
    h = hcm(b)
    h["codec_type"] = "HTTP1"
    h["common_http_protocol_options"] = {"idle_timeout": "0.25s", "max_headers_count": 50}
    h["stream_idle_timeout"] = {"seconds": 2, "nanos": 500000000}
    h["request_timeout"] = "0s"
    h["request_headers_timeout"] = "3s"
    h["max_request_headers_kb"] = 96
    h["normalize_path"] = False
    h["http_protocol_options"] = {"accept_http_10": True}
    return b


def test_http2_codecs_and_clusters():
    b = bootstrap()
    hcm(b)["codec_type"] = "HTTP2"
    hcm(b)["http2_protocol_options"] = {"max_concurrent_streams": 50}
    cl = b["static_resources"]["clusters"][0]
    cl["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    cfg = load_bootstrap(b)
    assert cfg.listeners[0].protocol == "http2"
    assert cfg.clusters[cl["name"]].http_protocol == "http2"
    hcm(b)["codec_type"] = "HTTP1"
    assert load_bootstrap(b).listeners[0].codec == "http1"
    hcm(b)["http2_protocol_options"] = {"allow_connect": True}
    assert any("allow_connect" in e and "not supported yet" in e for e in errors_of(b))


def test_http_listener_options():
    b = sample_listener_options()
    h = hcm(b)
    lst = load_bootstrap(b).listeners[0]
    assert (lst.idle_timeout_ms, lst.max_headers, lst.stream_idle_timeout_ms,
            lst.request_head_timeout_ms, lst.max_head_bytes) == (250, 50, 2500, 3000, 96 * 1024)
    assert lst.accept_http_10 is True
    h["stream_idle_timeout"] = "0s"
    h["codec_type"] = 1                                      # enum by number
    assert load_bootstrap(b).listeners[0].stream_idle_timeout_ms == 0


def test_durations():
    b = bootstrap()
    for v, ms in [("5s", 5000), ("0.25s", 250), ("1.0000001s", 1001), ("0s", 0),
                  ({"seconds": 1}, 1000), ({"nanos": 1}, 1), ({"seconds": "2"}, 2000)]:
        hcm(b)["stream_idle_timeout"] = v
        assert load_bootstrap(b).listeners[0].stream_idle_timeout_ms == ms, v
    for v in ["5", "5ms", "-1s", 5, {"minutes": 1}]:
        hcm(b)["stream_idle_timeout"] = v
        assert any(e.startswith(f"{HCM}.stream_idle_timeout") for e in errors_of(b)), v


def test_tcp_listener():
    cfg = load_bootstrap(bootstrap())
    assert cfg.listeners[1] == Listener(name="tcp", address=Address("127.0.0.1", 10001),
                                        protocol="tcp", cluster="b", idle_timeout_ms=3600000)
    b = bootstrap()
    b["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"][
        "idle_timeout"] = "10s"
    assert load_bootstrap(b).listeners[1].idle_timeout_ms == 10000


def test_unnamed_listener_and_route_config_get_names():
    b = bootstrap()
    del b["static_resources"]["listeners"][0]["name"]
    del hcm(b)["route_config"]["name"]
    cfg = load_bootstrap(b)
    assert cfg.listeners[0].name == "listener_0"
    assert cfg.listeners[0].route_table == "listener_0" and "listener_0" in cfg.route_tables


def test_two_http_listeners_with_the_same_route_config_name():
    b = bootstrap()
    second = copy.deepcopy(b["static_resources"]["listeners"][0])
    second["name"] = "http2"
    second["address"] = sock("127.0.0.1", 10002)
    b["static_resources"]["listeners"].append(second)
    cfg = load_bootstrap(b)
    assert [lst.route_table for lst in cfg.listeners if lst.protocol == "http1"] == \
        ["web", "http2/web"]


def test_filters_are_chosen_by_their_typed_config_not_their_name():
    """As in Envoy, a filter's name is only a name when it has a typed_config: an HTTP
    connection manager called "hcm" with a router called "r" is the usual listener."""
    b = bootstrap()
    b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["name"] = "hcm"
    hcm(b)["http_filters"][-1]["name"] = "r"
    assert load_bootstrap(b) == load_bootstrap(bootstrap())
    b = bootstrap()             # the router's name on another filter's config is not a router
    hcm(b)["http_filters"][-1]["typed_config"] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}
    assert any("no envoy.filters.http.router" in e for e in errors_of(b))


def test_optional_and_disabled_http_filters_are_skipped_with_a_note(caplog):
    b = bootstrap()
    hcm(b)["http_filters"][:0] = [
        {"name": "envoy.filters.http.cors", "is_optional": True, "typed_config": {}},
        {"name": "envoy.filters.http.fault", "disabled": True, "typed_config": {}}]
    with caplog.at_level("WARNING", logger="fastmesh.config.envoy"):
        load_bootstrap(b)
    assert "envoy.filters.http.cors" in caplog.text and "is_optional: skipped" in caplog.text
    assert "envoy.filters.http.fault" in caplog.text


LISTENER_REFUSALS = [
    (lambda b: hcm(b).update(codec_type="HTTP3"), f"{HCM}.codec_type", "HTTP3: not supported"),
    (lambda b: hcm(b).update(codec_type="SPDY"), f"{HCM}.codec_type", "unknown codec_type"),
    (lambda b: (hcm(b).pop("route_config"),
                hcm(b).update(rds={"route_config_name": "x", "config_source": {"ads": {}}})),
     f"{HCM}.rds", "RDS needs dynamic_resources/ADS: not supported yet"),
    (lambda b: hcm(b)["http_filters"].insert(0, {"name": "envoy.filters.http.cors",
                                                 "typed_config": {}}),
     f"{HCM}.http_filters[0].name", "HTTP filter 'envoy.filters.http.cors': not supported"),
    (lambda b: hcm(b)["http_filters"].append({"name": "envoy.filters.http.cors",
                                              "is_optional": True, "typed_config": {}}),
     f"{HCM}.http_filters[0]", "the router filter must be the last"),
    (lambda b: hcm(b)["http_filters"][0]["typed_config"].update(suppress_envoy_headers=True),
     f"{HCM}.http_filters[0].typed_config.suppress_envoy_headers", "unknown field"),
    (lambda b: hcm(b).update({"@type": "type.googleapis.com/x.Y"}), f"{HCM}.@type",
     "expected 'type.googleapis.com/envoy.extensions"),
    (lambda b: hcm(b).update(request_timeout="5s"), f"{HCM}.request_timeout",
     "a whole-request timeout: not supported yet"),
    (lambda b: hcm(b).update(common_http_protocol_options={"idle_timeout": "0s"}),
     f"{HCM}.common_http_protocol_options.idle_timeout", "0s (no idle timeout)"),
    (lambda b: hcm(b).update(access_log=[_file_log({"text_format_source": {
        "inline_string": "%UPSTREAM_TRANSPORT_FAILURE_REASON%"}})]),
     f"{HCM}.access_log[0].typed_config.log_format.text_format_source.inline_string",
     "unknown operator %UPSTREAM_TRANSPORT_FAILURE_REASON%"),
    (lambda b: hcm(b).update(access_log=[dict(_file_log(None), filter={})]),
     f"{HCM}.access_log[0].filter", "access log filters"),
    (lambda b: hcm(b).update(merge_slashes=True), f"{HCM}.merge_slashes", "not supported yet"),
    (lambda b: hcm(b).update(http_protocol_options={"allow_absolute_url": True}),
     f"{HCM}.http_protocol_options.allow_absolute_url", "unknown field"),
    (lambda b: hcm(b).update(max_request_headers_kb=9000), f"{HCM}.max_request_headers_kb",
     "expected an integer in 1..8192"),
    (lambda b: hcm(b).pop("stat_prefix"), f"{HCM}.stat_prefix", "missing required field"),
    (lambda b: b["static_resources"]["listeners"][0]["filter_chains"][0].update(
        filter_chain_match={"direct_source_prefix_ranges": []}),
     "static_resources.listeners[0].filter_chains[0].filter_chain_match."
     "direct_source_prefix_ranges", "direct_source_prefix_ranges: not supported yet"),
    (lambda b: b["static_resources"]["listeners"][0]["filter_chains"].append(
        {"filters": []}), "static_resources.listeners[0].filter_chains[1].filters",
     "expected a non-empty list"),
    (lambda b: b["static_resources"]["listeners"][0]["filter_chains"][0].update(
        transport_socket={"name": "tls"}),
     "static_resources.listeners[0].filter_chains[0].transport_socket", "TLS"),
    (lambda b: b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"].insert(
        0, {"name": "envoy.filters.network.rbac", "typed_config": {}}),
     "static_resources.listeners[0].filter_chains[0].filters", "2 network filters"),
    (lambda b: b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0].update(
        name="envoy.filters.network.redis_proxy", typed_config={
            "@type": "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3."
                     "RedisProxy", "stat_prefix": "r"}),
     "static_resources.listeners[0].filter_chains[0].filters[0].typed_config",
     "network filter 'envoy.filters.network.redis_proxy' (type.googleapis.com/envoy."
     "extensions.filters.network.redis_proxy.v3.RedisProxy): not supported"),
    (lambda b: b["static_resources"]["listeners"][0].update(listener_filters=[{
        "name": "envoy.filters.listener.proxy_protocol", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3."
                     "ProxyProtocol"}}]),
     "static_resources.listeners[0].listener_filters[0].typed_config",
     "listener filter 'envoy.filters.listener.proxy_protocol'"),
    (lambda b: b["static_resources"]["listeners"][0].update(bogus=1),
     "static_resources.listeners[0].bogus", "unknown field"),
    (lambda b: b["static_resources"]["listeners"][0]["address"]["socket_address"].update(
        protocol="UDP"), "static_resources.listeners[0].address.socket_address.protocol",
     "UDP: not supported yet"),
    (lambda b: b["static_resources"]["listeners"][0]["address"]["socket_address"].update(
        port_value=70000), "static_resources.listeners[0].address.socket_address.port_value",
     "expected an integer in 0..65535"),
    (lambda b: b["static_resources"]["listeners"][1].update(
        address=sock("127.0.0.1", 10000)), "static_resources.listeners[1].address",
     "'127.0.0.1:10000' is already used by static_resources.listeners[0]"),
    (lambda b: b["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0][
        "typed_config"].update(cluster="nope"),
     "static_resources.listeners[1].filter_chains[0].filters[0].typed_config.cluster",
     "no cluster named 'nope'"),
    (lambda b: b["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0][
        "typed_config"].update(weighted_clusters={"clusters": []}),
     "static_resources.listeners[1].filter_chains[0].filters[0].typed_config.weighted_clusters",
     "weighted_clusters: not supported yet"),
    (lambda b: b["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0][
        "typed_config"].update(max_connect_attempts=3),
     "static_resources.listeners[1].filter_chains[0].filters[0].typed_config."
     "max_connect_attempts", "connect retries"),
]


@pytest.mark.parametrize("change,path,msg", LISTENER_REFUSALS)
def test_listener_refusals(change, path, msg):
    b = bootstrap()
    change(b)
    errs = errors_of(b)
    assert any(e.startswith(f"{path}: ") and msg in e for e in errs), errs


# -- routes ------------------------------------------------------------------------------------

def sample_routes():
    b = bootstrap()
    rc = hcm(b)["route_config"]
    rc["virtual_hosts"] = [
        {"name": "api", "domains": ["api.local", "*.API.local"], "routes": [
            {"match": {"prefix": "/v1/", "case_sensitive": True},
             "route": {"cluster": "a", "timeout": "3s"}}]},
        {"name": "all", "domains": ["*"], "routes": [
            {"name": "health", "match": {"path": "/health"},
             "direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
            {"match": {"path": "/empty"}, "direct_response": {"status": 503}},
            {"match": {"prefix": "/", "headers": [
                {"name": "X-Canary", "string_match": {"exact": "1"}},
                {"name": "x-p", "string_match": {"prefix": "ab", "ignore_case": False}},
                {"name": "x-r", "string_match": {"safe_regex": {"regex": "v[0-9]+"}}},
                {"name": "x-present", "present_match": True},
                {"name": "x-bare"},
                {"name": "x-old", "exact_match": "e", "invert_match": False},
                {"name": "x-oldp", "prefix_match": "p"},
                {"name": "x-oldr", "safe_regex_match": {"google_re2": {}, "regex": "r+"}}]},
             "route": {"weighted_clusters": {"clusters": [
                 {"name": "a", "weight": 10}, {"name": "b", "weight": 90},
                 {"name": "a2", "weight": 0}]}}},
            {"match": {"safe_regex": {"regex": "/static/.*\\.css"}},
             "route": {"cluster": "b", "timeout": "0s"},
             "request_headers_to_add": [
                 {"header": {"key": "X-Added", "value": "yes"}},
                 {"header": {"key": "x-pct", "value": "100%%"}, "append": True},
                 {"header": {"key": "x-empty", "value": ""}},
                 {"header": {"key": "x-kept", "value": ""}, "keep_empty_value": True}],
             "request_headers_to_remove": ["X-Secret"]},
            {"match": {"prefix": ""}, "route": {"cluster": "a"}}]}]
    b["static_resources"]["clusters"].append(cluster("a2", ("127.0.0.1", 8009)))
    return b


def test_routes_translation():
    table = load_bootstrap(sample_routes()).route_tables["web"]
    assert table.strip_host_port is False               # Envoy matches Host as sent
    api, all_ = table.virtual_hosts
    assert (api.name, api.domains) == ("api", ("api.local", "*.api.local"))
    assert api.routes == (Route(match=RouteMatch(prefix="/v1/"), cluster="a", timeout_ms=3000),)
    health, empty, canary, static, catch_all = all_.routes
    assert health == Route(match=RouteMatch(path="/health"),
                           direct_response=DirectResponse(200, "ok"))
    assert empty.direct_response == DirectResponse(503, "")
    assert canary.match.headers == (
        HeaderMatch("x-canary", exact="1"), HeaderMatch("x-p", prefix="ab"),
        HeaderMatch("x-r", regex="v[0-9]+"), HeaderMatch("x-present", present=True),
        HeaderMatch("x-bare", present=True), HeaderMatch("x-old", exact="e"),
        HeaderMatch("x-oldp", prefix="p"), HeaderMatch("x-oldr", regex="r+"))
    assert canary.weighted_clusters == (WeightedCluster("a", 10), WeightedCluster("b", 90))
    assert canary.timeout_ms == 15000
    assert static.match == RouteMatch(regex="/static/.*\\.css")
    assert static.timeout_ms == 0
    assert static.request_headers_to_add == (("x-added", "yes"), ("x-pct", "100%"),
                                             ("x-kept", ""))
    assert static.request_headers_to_remove == ("x-secret",)
    assert catch_all.match == RouteMatch()


ROUTE_REFUSALS = [
    (lambda b: route0(b)["route"].update(hash_policy=[{"cookie": {"name": "s", "ttl": "1s"}}]),
     f"{R0}.route.hash_policy[0].cookie.ttl", "generated cookies"),
    (lambda b: route0(b)["route"].update(hash_policy=[{"filter_state": {"key": "k"}}]),
     f"{R0}.route.hash_policy[0].filter_state", "filter_state"),
    (lambda b: route0(b)["route"].update(prefix_rewrite="/x"), f"{R0}.route.prefix_rewrite",
     "prefix_rewrite: not supported yet"),
    (lambda b: route0(b)["route"].update(retry_policy={"retry_on": "5xx,cancelled"}),
     f"{R0}.route.retry_policy.retry_on", "retry condition 'cancelled': not supported"),
    (lambda b: route0(b)["route"].update(retry_policy={"retry_priority": {}}),
     f"{R0}.route.retry_policy.retry_priority", "retry_priority"),
    (lambda b: route0(b)["route"].update(retry_policy={"retry_host_predicate": [
        {"name": "envoy.retry_host_predicates.omit_canary_hosts"}]}),
     f"{R0}.route.retry_policy.retry_host_predicate[0]", "retry host predicate"),
    (lambda b: route0(b)["route"].update(retry_policy={"retry_back_off": {
        "base_interval": "1s", "max_interval": "0.5s"}}),
     f"{R0}.route.retry_policy.retry_back_off.max_interval", "at least base_interval"),
    (lambda b: route0(b)["route"].update(cluster_header="x-c"), f"{R0}.route.cluster_header",
     "not supported yet"),
    (lambda b: (route0(b).pop("route"), route0(b).update(redirect={"path_redirect": "/"})),
     f"{R0}.redirect", "redirects: not supported yet"),
    (lambda b: route0(b)["route"].update(cluster="nope"), f"{R0}.route.cluster",
     "no cluster named 'nope'"),
    (lambda b: route0(b)["route"].update(timeout="abc"), f"{R0}.route.timeout",
     "expected a duration"),
    (lambda b: route0(b).update(direct_response={"status": 200}), R0,
     "expected one action, got route, direct_response"),
    (lambda b: route0(b).update(direct_response={"status": 99}) or route0(b).pop("route"),
     f"{R0}.direct_response.status", "expected an integer in 200..599"),
    (lambda b: route0(b).update(direct_response={"status": 200, "body": {"filename": "/x"}})
     or route0(b).pop("route"), f"{R0}.direct_response.body.filename", "bodies from files"),
    (lambda b: route0(b)["match"].update(case_sensitive=False), f"{R0}.match.case_sensitive",
     "case-insensitive path matches: not supported yet"),
    (lambda b: route0(b)["match"].update(query_parameters=[{"name": "q"}]),
     f"{R0}.match.query_parameters", "query parameter matches"),
    (lambda b: route0(b)["match"].update(path="/x"), f"{R0}.match",
     "expected one path match, got prefix, path"),
    (lambda b: route0(b).update(match={}), f"{R0}.match", "missing a path match"),
    (lambda b: route0(b)["match"].update(prefix="/a?b"), f"{R0}.match.prefix",
     "query string"),
    (lambda b: route0(b)["match"].update(prefix=None, safe_regex={"regex": "("})
     or route0(b)["match"].pop("prefix"), f"{R0}.match.safe_regex.regex",
     "invalid regular expression"),
    (lambda b: route0(b)["match"].update(headers=[{"name": "x", "invert_match": True}]),
     f"{R0}.match.headers[0].invert_match", "inverted header matches: not supported yet"),
    (lambda b: route0(b)["match"].update(headers=[{"name": "x", "present_match": False}]),
     f"{R0}.match.headers[0].present_match", "present_match: false: not supported yet"),
    (lambda b: route0(b)["match"].update(headers=[{"name": "x", "string_match": {
        "suffix": "z"}}]), f"{R0}.match.headers[0].string_match.suffix", "suffix matches"),
    (lambda b: route0(b)["match"].update(headers=[{"name": "x", "string_match": {
        "exact": "z", "ignore_case": True}}]),
     f"{R0}.match.headers[0].string_match.ignore_case", "case-insensitive header matches"),
    (lambda b: route0(b)["match"].update(headers=[{"name": ":authority", "exact_match": "z"}]),
     f"{R0}.match.headers[0].name", "pseudo-headers"),
    (lambda b: route0(b)["match"].update(headers=[{"name": "x", "range_match": {}}]),
     f"{R0}.match.headers[0].range_match", "range matches"),
    (lambda b: route0(b).update(request_headers_to_add=[
        {"header": {"key": "x", "value": "v"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]),
     f"{R0}.request_headers_to_add[0].append_action", "OVERWRITE_IF_EXISTS_OR_ADD: not supp"),
    (lambda b: route0(b).update(request_headers_to_add=[
        {"header": {"key": "x", "value": "v"}, "append": False}]),
     f"{R0}.request_headers_to_add[0].append", "append: false (overwrite)"),
    (lambda b: route0(b).update(request_headers_to_add=[
        {"header": {"key": "x", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"}}]),
     f"{R0}.request_headers_to_add[0].header.value", "formatters"),
    (lambda b: route0(b).update(request_headers_to_add=[{"header": {"key": "x", "value": "1"}}],
                                request_headers_to_remove=["X"]),
     f"{R0}.request_headers_to_remove", "both removed and added"),
    (lambda b: route0(b).update(response_headers_to_add=[]), f"{R0}.response_headers_to_add",
     "response header changes"),
    (lambda b: vhost(b).update(request_headers_to_add=[]), f"{VH0}.request_headers_to_add",
     "apply to every route"),
    (lambda b: hcm(b)["route_config"].update(request_headers_to_remove=["x"]),
     f"{HCM}.route_config.request_headers_to_remove", "apply to every route"),
    (lambda b: vhost(b).update(domains=["*", "*"]), f"{VH0}.domains[1]", "duplicate domain"),
    (lambda b: vhost(b).update(domains=["foo.*"]), f"{VH0}.domains[0]", "invalid domain"),
    (lambda b: vhost(b).update(routes=[]), f"{VH0}.routes", "no routes"),
    (lambda b: route0(b).update(route={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 1}, {"name": "a", "weight": 2}]}}),
     f"{R0}.route.weighted_clusters.clusters[1].name", "duplicate cluster 'a'"),
    (lambda b: route0(b).update(route={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 0}]}}), f"{R0}.route.weighted_clusters.clusters",
     "the weights add up to 0"),
    (lambda b: route0(b).update(route={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 1, "request_headers_to_add": []}]}}),
     f"{R0}.route.weighted_clusters.clusters[0].request_headers_to_add",
     "per-cluster header changes"),
]


@pytest.mark.parametrize("change,path,msg", ROUTE_REFUSALS)
def test_route_refusals(change, path, msg):
    b = bootstrap()
    change(b)
    errs = errors_of(b)
    assert any(e.startswith(f"{path}: ") and msg in e for e in errs), errs


def test_strip_host_port_in_the_model_and_the_router():
    from fastmesh._core.router import RouteTable, VirtualHost
    for strip, with_port, wild_with_port in [(True, "api", "wild"), (False, "any", "any")]:
        api, wild, any_ = VirtualHost("api", ()), VirtualHost("wild", ()), VirtualHost("any", ())
        t = RouteTable("t", (api, wild, any_), [(b"api.local", api), (b"*.w.local", wild),
                                                (b"*", any_)], strip)
        assert t.py_select(b"api.local") == "api"
        assert t.py_select(b"api.local:8080") == with_port
        assert t.py_select(b"x.w.local") == "wild"
        assert t.py_select(b"x.w.local:80") == wild_with_port
    native = {"listeners": [], "route_tables": {"t": {
        "strip_host_port": False, "routes": [{"direct_response": {"status": 200}}]}}}
    cfg = load_dict(native)
    assert cfg.route_tables["t"].strip_host_port is False
    assert load_dict(to_dict(cfg)) == cfg
    native["listeners"] = [{"name": "l", "address": "127.0.0.1:0", "route_table": "t",
                            "accept_http_10": False}]
    cfg = load_dict(native)
    assert cfg.listeners[0].accept_http_10 is False and load_dict(to_dict(cfg)) == cfg
    native["route_tables"]["t"]["strip_host_port"] = "no"
    with pytest.raises(ConfigError) as ei:
        load_dict(native)
    assert ei.value.errors == ["route_tables.t.strip_host_port: expected true or false, got 'no'"]


# -- clusters ----------------------------------------------------------------------------------

def sample_clusters():
    b = bootstrap()
    b["static_resources"]["clusters"] = [
        {"name": "s", "load_assignment": {"cluster_name": "s", "endpoints": [
            {"lb_endpoints": [endpoint("127.0.0.1", 1, load_balancing_weight=3),
                              endpoint("::1", 2, load_balancing_weight=3,
                                       health_status="HEALTHY")]},
            {"priority": 0, "locality": {"zone": "z"},
             "lb_endpoints": [endpoint("10.0.0.1", 3, load_balancing_weight=3)]}]}},
        {"name": "a", "type": "STRICT_DNS", "lb_policy": "LEAST_REQUEST",
         "connect_timeout": "0.5s", "dns_refresh_rate": "10s",
         "dns_lookup_family": "V4_PREFERRED",
         "load_assignment": {"cluster_name": "a",
                             "endpoints": [{"lb_endpoints": [endpoint("svc.local", 80)]}]}},
        {"name": "b", "type": "LOGICAL_DNS", "lb_policy": "RANDOM",
         "load_assignment": {"cluster_name": "b",
                             "endpoints": [{"lb_endpoints": [endpoint("example.com", 443)]}]}},
    ]
    return b


def test_endpoint_weights():
    b = sample_clusters()
    c0 = b["static_resources"]["clusters"][0]
    lbes = [lbe for loc in c0["load_assignment"]["endpoints"] for lbe in loc["lb_endpoints"]]
    for i, lbe in enumerate(lbes):
        lbe["load_balancing_weight"] = i + 1
    cl = load_bootstrap(b).clusters[c0["name"]]
    assert cl.weights == tuple(range(1, len(lbes) + 1))
    assert load_dict(to_dict(load_bootstrap(b)), "x").clusters[c0["name"]] == cl
    for lbe in lbes:
        lbe["load_balancing_weight"] = 7               # equal: the same as none
    assert load_bootstrap(b).clusters[c0["name"]].weights == ()


def test_retry_policies():
    b = bootstrap()
    route0(b)["route"]["retry_policy"] = {
        "retry_on": "5xx, connect-failure,retriable-status-codes", "num_retries": 3,
        "per_try_timeout": "0.25s", "retriable_status_codes": [418],
        "retry_back_off": {"base_interval": "0.01s"},
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": {"@type": "type.googleapis.com/envoy."
                                                   "extensions.retry.host.previous_hosts.v3."
                                                   "PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "3"}
    vhost(b)["retry_policy"] = {"retry_on": "gateway-error"}      # route0 has its own

    def route0_policy(b):
        cfg = load_bootstrap(b)
        return cfg.route_tables[cfg.listeners[0].route_table].virtual_hosts[0].routes[0] \
            .retry_policy
    assert route0_policy(b) == RetryPolicy(
        retry_on=("5xx", "connect-failure", "retriable-status-codes"), num_retries=3,
        per_try_timeout_ms=250, retriable_status_codes=(418,), backoff_base_ms=10,
        previous_hosts=True, host_selection_retry_max_attempts=3)
    del route0(b)["route"]["retry_policy"]                      # now the virtual host's
    assert route0_policy(b) == RetryPolicy(retry_on=("gateway-error",))


def test_circuit_breakers_outlier_detection_and_panic_threshold():
    b = sample_clusters()
    c0 = b["static_resources"]["clusters"][0]
    c0["circuit_breakers"] = {"thresholds": [
        {"priority": "HIGH", "max_connections": 1},            # routes are DEFAULT priority
        {"max_connections": 2, "max_pending_requests": 0, "track_remaining": True}]}
    c0["outlier_detection"] = {"consecutive_5xx": 3, "interval": "0.5s",
                               "base_ejection_time": "2s", "max_ejection_percent": 50,
                               "enforcing_success_rate": 0}
    c0["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    cl = load_bootstrap(b).clusters[c0["name"]]
    assert cl.circuit_breakers == CircuitBreakers(max_connections=2, max_pending_requests=0,
                                                  max_requests=1024, max_retries=3)
    assert cl.outlier_detection == OutlierDetection(consecutive_5xx=3, interval_ms=500,
                                                    base_ejection_time_ms=2000,
                                                    max_ejection_pct=50)
    assert cl.healthy_panic_threshold_pct == 0


def test_clusters_translation(caplog):
    with caplog.at_level("WARNING", logger="fastmesh.config.envoy"):
        cl = load_bootstrap(sample_clusters()).clusters
    assert "static_resources.clusters[2].type: LOGICAL_DNS: fastmesh resolves" in caplog.text
    assert cl["s"] == Cluster(name="s", endpoints=(Address("127.0.0.1", 1), Address("::1", 2),
                                                   Address("10.0.0.1", 3)),
                              connect_timeout_ms=5000, idle_timeout_ms=3600000,
                              circuit_breakers=ENVOY_BREAKERS)
    assert cl["a"] == Cluster(name="a", endpoints=(Address("svc.local", 80),),
                              lb_policy="least_request", connect_timeout_ms=500,
                              dns_refresh_ms=10000, idle_timeout_ms=3600000,
                              circuit_breakers=ENVOY_BREAKERS)
    assert cl["b"].lb_policy == "random" and cl["b"].dns_refresh_ms == 5000


CLUSTER_REFUSALS = [
    (lambda c: c.update(type="EDS"), f"{CL0}.type", "EDS needs ADS"),
    (lambda c: c.update(type="ORIGINAL_DST"), f"{CL0}.lb_policy",
     "ROUND_ROBIN is not valid for cluster type ORIGINAL_DST"),
    (lambda c: c.update(lb_policy="CLUSTER_PROVIDED"), f"{CL0}.lb_policy",
     "CLUSTER_PROVIDED is only for cluster type ORIGINAL_DST"),
    (lambda c: c.update(lb_policy="RING_HASH", ring_hash_lb_config={
        "hash_function": "MURMUR_HASH_2"}), f"{CL0}.ring_hash_lb_config.hash_function",
     "MURMUR_HASH_2"),
    (lambda c: c.update(lb_policy="MAGLEV", maglev_lb_config={"table_size": "65536"}),
     f"{CL0}.maglev_lb_config.table_size", "not a prime"),
    (lambda c: c.update(least_request_lb_config={"choice_count": 3}),
     f"{CL0}.least_request_lb_config", "only its defaults"),
    (lambda c: c.update(outlier_detection={"enforcing_success_rate": 100}),
     f"{CL0}.outlier_detection.enforcing_success_rate", "success-rate"),
    (lambda c: c.update(outlier_detection={"enforcing_consecutive_local_origin_failure": 101}),
     f"{CL0}.outlier_detection.enforcing_consecutive_local_origin_failure", "0..100"),
    (lambda c: c.update(outlier_detection={"max_ejection_percent": 101}),
     f"{CL0}.outlier_detection.max_ejection_percent", "0..100"),
    (lambda c: c.update(common_lb_config={"healthy_panic_threshold": {"value": 12.5}}),
     f"{CL0}.common_lb_config.healthy_panic_threshold.value", "fractional"),
    (lambda c: c.update(common_lb_config={"zone_aware_lb_config": {}}),
     f"{CL0}.common_lb_config.zone_aware_lb_config", "zone-aware"),
    (lambda c: c.update(circuit_breakers={"per_host_thresholds": [{}]}),
     f"{CL0}.circuit_breakers.per_host_thresholds", "per-host thresholds"),
    (lambda c: c.update(circuit_breakers={"thresholds": [{"retry_budget": {}}]}),
     f"{CL0}.circuit_breakers.thresholds[0].retry_budget", "retry budgets"),
    (lambda c: c.update(circuit_breakers={"thresholds": [{"priority": "LOW"}]}),
     f"{CL0}.circuit_breakers.thresholds[0].priority", "unknown routing priority"),
    (lambda c: c.update(transport_socket={}), f"{CL0}.transport_socket", "TLS"),
    (lambda c: c.update(connect_timeout="0s"), f"{CL0}.connect_timeout", "greater than 0s"),
    (lambda c: c.update(dns_lookup_family="V6_ONLY"), f"{CL0}.dns_lookup_family", "V6_ONLY"),
    (lambda c: c.update(dns_refresh_rate="1s"), f"{CL0}.dns_refresh_rate",
     "only for STRICT_DNS and LOGICAL_DNS"),
    (lambda c: c["load_assignment"].pop("cluster_name"), f"{CL0}.load_assignment.cluster_name",
     "missing required field"),
    (lambda c: (c["load_assignment"]["endpoints"][0]["lb_endpoints"][0].update(
        load_balancing_weight=5), c.update(lb_policy="MAGLEV")), f"{CL0}.load_assignment",
     "unequal endpoint weights with MAGLEV: not supported yet"),
    (lambda c: c["load_assignment"]["endpoints"][0].update(priority=1),
     f"{CL0}.load_assignment.endpoints[0].priority", "only priority 0"),
    (lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0].update(
        health_status="DRAINING"), f"{LBE0}.health_status", "DRAINING"),
    (lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0].update(
        endpoint={"address": sock("backend.local", 80)}), f"{LBE0}.endpoint.address",
     "not an IP address (STATIC"),
    (lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][1].update(
        endpoint={"address": sock("127.0.0.1", 8001)}),
     f"{CL0}.load_assignment.endpoints[0].lb_endpoints[1].endpoint.address",
     "duplicate endpoint"),
    (lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"].update(
        health_check_config={}), f"{LBE0}.endpoint.health_check_config", "health check"),
    (lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"].update(port_value=0),
     f"{LBE0}.endpoint.address.socket_address.port_value", "expected an integer in 1..65535"),
    (lambda c: c.update(type="LOGICAL_DNS"), f"{CL0}.load_assignment.endpoints",
     "LOGICAL_DNS clusters take exactly one endpoint"),
    (lambda c: c.update(lb_subset_config={}), f"{CL0}.lb_subset_config", "unknown field"),
]


@pytest.mark.parametrize("change,path,msg", CLUSTER_REFUSALS)
def test_cluster_refusals(change, path, msg):
    b = bootstrap()
    change(b["static_resources"]["clusters"][0])
    errs = errors_of(b)
    assert any(e.startswith(f"{path}: ") and msg in e for e in errs), errs


def test_duplicate_cluster_names():
    b = bootstrap()
    b["static_resources"]["clusters"][1]["name"] = "a"
    assert any(e.startswith("static_resources.clusters[1].name: duplicate cluster name 'a'")
               for e in errors_of(b))


# -- top level ---------------------------------------------------------------------------------

def sample_ignored_sections():
    b = bootstrap()
    b.update(layered_runtime={"layers": [{"name": "admin", "admin_layer": {}},
                                         {"name": "static", "static_layer": {}}]},
             stats_config={"use_all_default_tags": False}, stats_flush_interval="5s",
             overload_manager={"refresh_interval": "1s", "resource_monitors": [
                 {"name": "envoy.resource_monitors.fixed_heap", "typed_config": {
                     "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                              "fixed_heap.v3.FixedHeapConfig",
                     "max_heap_size_bytes": 1073741824}}]},
             cluster_manager={})
    return b


def test_ignored_sections_are_accepted():
    assert load_bootstrap(sample_ignored_sections()).listeners


# bootstraps fastmesh accepts; tests/integration/test_envoy_parity.py has Envoy validate them
ACCEPTED_SAMPLES = {"base": bootstrap, "routes": sample_routes, "clusters": sample_clusters,
                    "listener_options": sample_listener_options,
                    "ignored_sections": sample_ignored_sections,
                    "camel_case": lambda: camel(bootstrap())}


TOP_REFUSALS = [
    (lambda b: b.update(dynamic_resources={"ads_config": {}}),
     "dynamic_resources.ads_config.grpc_services", "expected exactly one gRPC service"),
    (lambda b: b.update(dynamic_resources={"lds_config": {"path": "/x"}}),
     "dynamic_resources.ads_config", "over ADS only"),
    (lambda b: b.update(layered_runtime={"layers": [{"name": "s", "static_layer": {"k": 1}}]}),
     "layered_runtime.layers[0].static_layer", "runtime values"),
    (lambda b: b.update(overload_manager={"actions": [{"name": "x"}]}), "overload_manager",
     "overload actions"),
    (lambda b: b.update(cluster_manager={"local_cluster_name": "a"}), "cluster_manager",
     "cluster_manager settings"),
    (lambda b: b.update(tracing={}), "tracing", "tracing: not supported yet"),
    (lambda b: b.update(listeners=[]), "listeners", "unknown field"),
    (lambda b: b["static_resources"].update(secrets=[]), "static_resources.secrets", "TLS"),
]


@pytest.mark.parametrize("change,path,msg", TOP_REFUSALS)
def test_top_level_refusals(change, path, msg):
    b = bootstrap()
    change(b)
    errs = errors_of(b)
    assert any(e.startswith(f"{path}: ") and msg in e for e in errs), errs


def test_all_errors_are_collected():
    b = bootstrap()
    hcm(b)["codec_type"] = "HTTP3"
    route0(b)["route"]["prefix_rewrite"] = "/"
    b["static_resources"]["clusters"][0]["type"] = "EDS"
    b["static_resources"]["clusters"][1]["outlier_detection"] = {"enforcing_success_rate": 9}
    b["dynamic_resources"] = {}
    errs = errors_of(b)
    for path in (f"{HCM}.codec_type", f"{R0}.route.prefix_rewrite", f"{CL0}.type",
                 "static_resources.clusters[1].outlier_detection.enforcing_success_rate",
                 "dynamic_resources.ads_config"):
        assert any(e.startswith(path + ": ") for e in errs), (path, errs)


def test_camel_case_paths_are_reported_as_written():
    b = camel(bootstrap())
    hcm_of(b)["codecType"] = "HTTP3"
    b["staticResources"]["clusters"][0]["lbPolicy"] = "CLUSTER_PROVIDED"
    errs = errors_of(b)
    assert any(e.startswith("staticResources.listeners[0].filterChains[0].filters[0]."
                            "typedConfig.codecType: HTTP3") for e in errs), errs
    assert any(e.startswith("staticResources.clusters[0].lbPolicy: CLUSTER_PROVIDED")
               for e in errs)


def test_load_text_reports_duplicate_keys_and_yaml_errors():
    text = yaml.safe_dump(bootstrap()) + "node: {id: again}\n"
    with pytest.raises(ConfigError) as ei:
        load_text(text, "e.yaml")
    assert any("duplicate key 'node'" in e for e in ei.value.errors)


# -- the command line --------------------------------------------------------------------------

def _validate(path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "fastmesh", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_cli_validate_accepts_a_bootstrap(tmp_path):
    for name, text in [("envoy.yaml", yaml.safe_dump(bootstrap())),
                       ("envoy.json", json.dumps(camel(bootstrap())))]:
        f = tmp_path / name
        f.write_text(text)
        r = _validate(f)
        assert r.returncode == 0, r.stderr
        assert "ok (2 listeners, 1 route tables, 2 clusters)" in r.stdout


def test_cli_validate_lists_every_refusal(tmp_path):
    b = bootstrap()
    hcm(b)["codec_type"] = "HTTP3"
    b["static_resources"]["clusters"][0]["type"] = "EDS"
    f = tmp_path / "envoy.yaml"
    f.write_text(yaml.safe_dump(b))
    r = _validate(f)
    assert r.returncode == 1
    assert f"{f}: {HCM}.codec_type: HTTP3: not supported yet" in r.stderr
    assert f"{f}: {CL0}.type: EDS needs ADS" in r.stderr
    assert "2 problem(s)" in r.stderr


# ---------------------------------------------------------------------------------------------
# Bolt: fastmesh's own network filter, configured by a TypedStruct
# ---------------------------------------------------------------------------------------------

BOLT_TS = "type.googleapis.com/xds.type.v3.TypedStruct"
BOLT_URL = "type.googleapis.com/fastmesh.filters.network.bolt_proxy.v1.BoltProxy"


def with_bolt(value, ts=BOLT_TS, type_url=BOLT_URL):
    b = bootstrap()
    b["static_resources"]["listeners"].append(
        {"name": "rpc", "address": sock("127.0.0.1", 12200),
         "filter_chains": [{"filters": [{
             "name": "fastmesh.filters.network.bolt_proxy",
             "typed_config": {"@type": ts, "type_url": type_url, "value": value}}]}]})
    return b


BOLT_ROUTES = [{"match": {"headers": [{"name": "service", "prefix": "com.example."}]},
                "cluster": "a"}]


@pytest.mark.parametrize("ts", [BOLT_TS, "type.googleapis.com/udpa.type.v1.TypedStruct"])
def test_bolt_listener_from_a_typed_struct(ts):
    # a Struct's numbers are doubles: 100.0 from a control plane is the integer 100
    cfg = load_bootstrap(with_bolt({"routes": BOLT_ROUTES, "max_in_flight": 100.0,
                                    "max_frame_bytes": 1048576}, ts), "t")
    rpc = next(l for l in cfg.listeners if l.name == "rpc")
    assert (rpc.protocol, rpc.max_in_flight, rpc.max_frame_bytes) == ("bolt", 100, 1048576)
    table = cfg.route_tables[rpc.route_table]
    (vh,) = table.virtual_hosts
    assert vh.domains == ("*",) and vh.routes[0].cluster == "a"
    assert vh.routes[0].match.headers == (HeaderMatch(name="service", prefix="com.example."),)


@pytest.mark.parametrize("value,path,msg", [
    ({"routes": BOLT_ROUTES, "max_in_flight": 0}, "value.max_in_flight", "positive"),
    ({"routes": [{"match": {"headers": [{"name": "service", "present": True}]},
                  "cluster": "nope"}]}, "value.routes[0].cluster", "no cluster named 'nope'"),
    ({"routes": BOLT_ROUTES, "max_inflight": 5}, "value.max_inflight", "unknown"),
    ({}, "value.routes", "missing"),
])
def test_bolt_typed_struct_refusals(value, path, msg):
    errs = errors_of(with_bolt(value))
    base = "static_resources.listeners[2].filter_chains[0].filters[0].typed_config."
    assert any(e.startswith(base + path) and msg in e for e in errs), errs


def test_bolt_typed_struct_wrong_types_refused():
    errs = errors_of(with_bolt({"routes": BOLT_ROUTES},
                               ts="type.googleapis.com/google.protobuf.Struct"))
    assert any("TypedStruct" in e for e in errs), errs
    errs = errors_of(with_bolt({"routes": BOLT_ROUTES}, type_url="type.googleapis.com/x.Y"))
    assert any(e.endswith("type_url: expected " + repr(BOLT_URL)) for e in errs), errs


FAULT_T = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
RL_T = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


def with_filter(b, tc, name="f", **extra):
    hcm(b)["http_filters"].insert(0, dict({"name": name, "typed_config": tc}, **extra))
    return b


def test_fault_and_rate_limit_filters_translate():
    b = with_filter(bootstrap(), {"@type": RL_T, "stat_prefix": "rl"}, name="rl")
    b = with_filter(b, {"@type": FAULT_T, "delay": {"header_delay": {},
                                                   "percentage": {"numerator": 5}}})
    route0(b)["typed_per_filter_config"] = {
        "f": {"@type": FAULT_T, "abort": {"http_status": 503, "percentage": {
            "numerator": 25, "denominator": "TEN_THOUSAND"}}},
        "rl": {"@type": RL_T, "stat_prefix": "r", "token_bucket": {
            "max_tokens": 3, "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": "k", "default_value": {"numerator": 100}}}}
    cfg = load_bootstrap(b)
    lst = cfg.listeners[0]
    assert lst.http_filters == ("fault", "local_rate_limit")
    assert lst.fault == Fault(delay_from_header=True, delay_per_million=50000)
    assert lst.local_rate_limit is None                     # no bucket at this level
    r = cfg.route_tables[lst.route_table].virtual_hosts[0].routes[0]
    assert r.fault == Fault(abort_status=503, abort_per_million=2500, abort_header_unit=100)
    assert r.local_rate_limit == LocalRateLimit(max_tokens=3, fill_interval_ms=1000,
                                                enforced_per_million=0)    # Envoy: unset 0%


@pytest.mark.parametrize("change,path,msg", [
    (lambda b: with_filter(b, {"@type": FAULT_T, "headers": [{"name": "x"}]}),
     f"{HCM}.http_filters[0].typed_config.headers", "header-matched faults"),
    (lambda b: with_filter(b, {"@type": RL_T, "stat_prefix": "r", "descriptors": []}),
     f"{HCM}.http_filters[0].typed_config.descriptors", "descriptors"),
    (lambda b: with_filter(b, {"@type": FAULT_T}, disabled=True),
     f"{HCM}.http_filters[0].disabled", "enabled per route"),
    (lambda b: route0(b).update(typed_per_filter_config={"x": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"}}),
     f"{R0}.typed_per_filter_config.x", "per-route config of type"),
    (lambda b: with_filter(b, {"@type": RL_T, "stat_prefix": "r", "token_bucket": {
        "max_tokens": 1, "fill_interval": "0.01s"}}),
     f"{HCM}.http_filters[0].typed_config.token_bucket.fill_interval", "at least 50ms"),
])
def test_fault_and_rate_limit_refusals(change, path, msg):
    b = bootstrap()
    change(b)
    errs = errors_of(b)
    assert any(e.startswith(f"{path}: ") and msg in e for e in errs), errs
