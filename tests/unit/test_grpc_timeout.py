"""grpc-timeout: the header's parsing (units H M S m u n, rounded up to ms; malformed: -1,
ignored) and the route fields that turn it on, native and from Envoy's
max_stream_duration."""
from __future__ import annotations

import pytest

from fastmesh._core.h2_proxy import py_grpc_timeout_ms
from fastmesh.config.load import ConfigError, load_dict


@pytest.mark.parametrize("value,ms", [
    (b"1H", 3600000), (b"2M", 120000), (b"5S", 5000), (b"500m", 500), (b"0m", 0),
    (b"1500u", 2), (b"1000u", 1), (b"1n", 1), (b"2000000n", 2), (b"99999999S", 99999999000),
])
def test_units(value, ms):
    assert py_grpc_timeout_ms(value) == ms


@pytest.mark.parametrize("value", [None, b"", b"5", b"S", b"5s", b"-5S", b"5 S", b"123456789S",
                                   b"1.5S", b"5SS"])
def test_malformed_is_ignored(value):
    assert py_grpc_timeout_ms(value) == -1


def _native(route):
    r = {"match": {"prefix": "/"}, "cluster": "c"}
    r.update(route)
    return {"listeners": [{"name": "l", "address": "127.0.0.1:1", "protocol": "http2",
                           "route_table": "rt"}],
            "route_tables": {"rt": {"routes": [r]}},
            "clusters": [{"name": "c", "endpoints": ["127.0.0.1:2"], "http_protocol": "http2"}]}


def _route(cfg):
    return cfg.route_tables["rt"].virtual_hosts[0].routes[0]


def test_native_fields():
    r = _route(load_dict(_native({"grpc_timeout_header_max_ms": 0,
                                  "grpc_timeout_header_offset_ms": 50})))
    assert (r.grpc_timeout_header_max_ms, r.grpc_timeout_header_offset_ms) == (0, 50)
    r = _route(load_dict(_native({})))
    assert r.grpc_timeout_header_max_ms is None           # grpc-timeout ignored


def test_offset_without_max_is_refused():
    with pytest.raises(ConfigError) as ei:
        load_dict(_native({"grpc_timeout_header_offset_ms": 50}))
    assert "grpc_timeout_header_offset_ms" in str(ei.value)
    with pytest.raises(ConfigError):
        load_dict(_native({"grpc_timeout_header_max_ms": -1}))


HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")


def _envoy(action):
    a = {"cluster": "c"}
    a.update(action)
    return {"static_resources": {
        "listeners": [{"name": "in", "address": {"socket_address": {
            "address": "127.0.0.1", "port_value": 1}}, "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {"@type": HCM, "stat_prefix": "in", "route_config": {
                    "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "route": a}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router."
                                 "v3.Router"}}]}}]}]}],
        "clusters": [{"name": "c", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": 2}}}}]}]}}]}}


def test_envoy_max_stream_duration():
    cfg = load_dict(_envoy({"max_stream_duration": {"grpc_timeout_header_max": "2s",
                                                    "grpc_timeout_header_offset": "0.05s"}}))
    r = next(iter(cfg.route_tables.values())).virtual_hosts[0].routes[0]
    assert (r.grpc_timeout_header_max_ms, r.grpc_timeout_header_offset_ms) == (2000, 50)


@pytest.mark.parametrize("action,word", [
    ({"max_grpc_timeout": "2s"}, "grpc_timeout_header_max"),
    ({"grpc_timeout_offset": "1s"}, "grpc_timeout_header_max"),
    ({"max_stream_duration": {"max_stream_duration": "5s"}}, "whole-stream"),
])
def test_envoy_refusals_name_what_to_do(action, word):
    with pytest.raises(ConfigError) as ei:
        load_dict(_envoy(action))
    assert word in str(ei.value)
