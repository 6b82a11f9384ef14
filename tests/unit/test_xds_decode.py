"""The control plane's resources read fast, and read the same as the slow way.

- ``fastmesh.xds.resources.to_data`` must give exactly what protobuf's own
  ``json_format.MessageToDict(preserving_proto_field_name=True)`` gives (the translator was
  written against that shape): checked on hand-made resources that use every kind of field,
  and on generated load assignments (Hypothesis).
- The translator's fast reading of plain endpoints must give the same model and the same
  errors as its full reading, whatever the endpoint looks like (Hypothesis).
"""
from __future__ import annotations

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings, strategies as st

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from fastmesh.config.envoy import cluster as envoy_cluster
from fastmesh.config.envoy._common import EnvoyChecker
from fastmesh.xds.resources import to_data

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def slow(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def sock(host, port):
    return {"socket_address": {"address": host, "port_value": port}}


CLUSTER = {
    "name": "web", "type": "STRICT_DNS", "connect_timeout": "1.250s",
    "lb_policy": "LEAST_REQUEST", "dns_refresh_rate": "0.000001s",
    "per_connection_buffer_limit_bytes": 32768,
    "circuit_breakers": {"thresholds": [{"priority": "HIGH", "max_connections": 7,
                                         "max_retries": 0, "track_remaining": True}]},
    "outlier_detection": {"consecutive_5xx": 3, "interval": "10s",
                          "max_ejection_percent": 50},
    "common_lb_config": {"healthy_panic_threshold": {"value": 33.5}},      # a double
    "metadata": {"filter_metadata": {"istio": {"config": "x", "n": 1.5, "l": [True, None]}}},
    "typed_extension_protocol_options": {                                 # a map of Any
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                     "HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    "health_checks": [{"timeout": "1s", "interval": "2s", "unhealthy_threshold": 2,
                       "healthy_threshold": 1,
                       "http_health_check": {"path": "/healthz",
                                             "expected_statuses": [{"start": 200,
                                                                    "end": 300}]}}],
    "load_assignment": {"cluster_name": "web", "endpoints": [{
        "locality": {"region": "r", "zone": "z"}, "priority": 0,
        "load_balancing_weight": 3,
        "lb_endpoints": [{"endpoint": {"address": sock("web.internal", 8080),
                                       "hostname": "h"},
                          "health_status": "DRAINING", "load_balancing_weight": 2}]}]},
}

ROUTES = {
    "name": "routes", "virtual_hosts": [{
        "name": "vh", "domains": ["*"],
        "routes": [
            {"match": {"prefix": "/a", "headers": [
                {"name": "x-n", "range_match": {"start": "-5", "end": "9007199254740993"}},
                {"name": "x-s", "string_match": {"exact": "v"}}]},
             "route": {"cluster": "web", "timeout": "0s"}},
            {"match": {"safe_regex": {"regex": "/r/[0-9]+"}},
             "route": {"weighted_clusters": {"clusters": [
                 {"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}}},
            {"match": {"path": "/d"},
             "direct_response": {"status": 200, "body": {"inline_bytes": "AAEC/w=="}}},
        ],
        "request_headers_to_add": [{"header": {"key": "k", "value": "v"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}]}

LISTENER = {
    "name": "ingress", "address": sock("127.0.0.1", 15001),
    "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {"@type": HCM, "stat_prefix": "in", "codec_type": "AUTO",
                         "rds": {"route_config_name": "routes",
                                 "config_source": {"ads": {}, "resource_api_version": "V3"}},
                         "http_filters": [{"name": "envoy.filters.http.router",
                                           "typed_config": {"@type": ROUTER}}]}}]}],
}


@pytest.mark.parametrize("cls,data", [
    (cluster_pb2.Cluster, CLUSTER),
    (route_pb2.RouteConfiguration, ROUTES),
    (listener_pb2.Listener, LISTENER),
    (endpoint_pb2.ClusterLoadAssignment, CLUSTER["load_assignment"]),
    (route_pb2.RouteConfiguration, {"name": "r", "virtual_hosts": [{
        "name": "v", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"}, "route": {"cluster": "c"},
            "typed_per_filter_config": {
                "f": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3."
                               "HTTPFault", "abort": {"http_status": 503}},
                "rl": {"@type": "type.googleapis.com/envoy.extensions.filters.http."
                                "local_ratelimit.v3.LocalRateLimit", "stat_prefix": "x"}}}]}]}),
    (endpoint_pb2.ClusterLoadAssignment, {
        "cluster_name": "x", "policy": {"overprovisioning_factor": 140,
                                        "endpoint_stale_after": "315576000000s"}}),
    (listener_pb2.Listener, dict(LISTENER, use_original_dst=True, listener_filters=[
        {"name": n, "typed_config": {"@type": f"type.googleapis.com/envoy.extensions.filters."
                                              f"listener.{n}.v3.{t}"}}
        for n, t in (("original_dst", "OriginalDst"), ("http_inspector", "HttpInspector"),
                     ("tls_inspector", "TlsInspector"))],
        listener_filters_timeout="0.1s")),
    (cluster_pb2.Cluster, {"name": "pass", "type": "ORIGINAL_DST",
                           "lb_policy": "CLUSTER_PROVIDED", "cleanup_interval": "3s",
                           "original_dst_lb_config": {"use_http_header": True}}),
], ids=["cluster", "routes", "listener", "assignment", "filters", "policy",
        "listener-filters", "original-dst"])
def test_same_as_json_format(cls, data):
    msg = json_format.ParseDict(data, cls())
    assert to_data(msg) == slow(msg)
    assert to_data(msg) == to_data(msg)        # the second read goes through the plans


def test_unknown_enum_number_and_defaults():
    msg = cluster_pb2.Cluster(name="c")
    msg.lb_policy = 42                          # a number this build has no name for
    assert to_data(msg) == slow(msg) == {"name": "c", "lb_policy": 42}
    assert to_data(cluster_pb2.Cluster()) == slow(cluster_pb2.Cluster()) == {}


_hosts = st.one_of(st.sampled_from(["127.0.0.1", "10.0.0.7", "::1", "web.svc", ""]),
                   st.ip_addresses().map(str))
_lb_endpoint = st.fixed_dictionaries(
    {"endpoint": st.fixed_dictionaries({"address": st.builds(sock, _hosts,
                                                             st.integers(0, 65535))})},
    optional={"load_balancing_weight": st.integers(1, 2**32 - 1),
              "health_status": st.sampled_from(["UNKNOWN", "HEALTHY", "UNHEALTHY",
                                                "DRAINING"]),
              "metadata": st.just({"filter_metadata": {"m": {"k": "v"}}})})
_assignment = st.fixed_dictionaries(
    {"cluster_name": st.text(min_size=1, max_size=8),
     "endpoints": st.lists(st.fixed_dictionaries(
         {"lb_endpoints": st.lists(_lb_endpoint, max_size=4)},
         optional={"priority": st.integers(0, 3),
                   "load_balancing_weight": st.integers(1, 100),
                   "locality": st.just({"zone": "z"})}), max_size=3)},
    optional={"policy": st.just({"overprovisioning_factor": 100})})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_assignment)
def test_generated_assignments_same_as_json_format(data):
    msg = json_format.ParseDict(data, endpoint_pb2.ClusterLoadAssignment())
    assert to_data(msg) == slow(msg)


# -- the translator's two readings of an endpoint --------------------------------------------

_odd_hosts = st.sampled_from(["127.0.0.1", "10.1.2.3", "010.1.2.3", "1.2.3", "::1",
                              "[::1]", "web", "-bad-", "", "256.1.1.1", "127.0.0.1 "])
_port = st.one_of(st.integers(-1, 65536), st.sampled_from(["80", True, None, 8.0]))


def _socket_address():
    return st.fixed_dictionaries({}, optional={
        "address": _odd_hosts, "port_value": _port, "portValue": _port,
        "protocol": st.sampled_from(["TCP", "UDP"])})


_endpoint_raw = st.one_of(
    st.builds(lambda h, p: {"endpoint": {"address": sock(h, p)}}, _odd_hosts, _port),
    st.fixed_dictionaries({"endpoint": st.fixed_dictionaries(
        {"address": st.fixed_dictionaries({"socket_address": _socket_address()})},
        optional={"hostname": st.just("h")})},
        optional={"load_balancing_weight": st.integers(1, 3),
                  "health_status": st.sampled_from(["HEALTHY", "DRAINING"])}),
    st.sampled_from([None, [], {}, {"endpoint": None}, {"endpoint": {}},
                     {"endpoint": {"address": {}}}]))


def _translate(raw_cluster: dict, fast: bool):
    old = envoy_cluster._FAST_PATH
    envoy_cluster._FAST_PATH = fast
    try:
        c = EnvoyChecker()
        model = envoy_cluster.translate_cluster(c, raw_cluster, "cluster", {})
        return model, c.errors, c.notes
    finally:
        envoy_cluster._FAST_PATH = old


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_endpoint_raw, max_size=5), st.sampled_from(["STATIC", "STRICT_DNS"]))
def test_fast_endpoint_reading_is_the_full_one(lb_endpoints, kind):
    raw = {"name": "c", "type": kind, "connect_timeout": "1s",
           "load_assignment": {"cluster_name": "c",
                               "endpoints": [{"lb_endpoints": lb_endpoints}]}}
    assert _translate(raw, fast=True) == _translate(raw, fast=False)


def test_duplicate_plain_endpoints_are_refused_by_path():
    raw = {"name": "c", "type": "STATIC",
           "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
               {"endpoint": {"address": sock("10.0.0.1", 80)}},
               {"endpoint": {"address": sock("10.0.0.1", 80)}}]}]}}
    model, errors, _ = _translate(raw, fast=True)
    assert errors == ["cluster.load_assignment.endpoints[0].lb_endpoints[1].endpoint.address: "
                      "duplicate endpoint '10.0.0.1:80' (also cluster.load_assignment."
                      "endpoints[0].lb_endpoints[0]); not supported yet"]
    assert (model, errors) == _translate(raw, fast=False)[:2]
