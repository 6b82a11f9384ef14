"""Unit tests for fastmesh.config.load: parsing, every validation rule, and to_dict round trips."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import re

import pytest

from fastmesh.config import model
from fastmesh.config.load import ConfigError, load_dict, load_file, load_text, to_dict
from fastmesh.config.model import (
    Address,
    Admin,
    Cluster,
    DirectResponse,
    HeaderMatch,
    Listener,
    Route,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)

EXAMPLE = r'''
admin: {address: "127.0.0.1:9901"}        # admin API; loopback by default
listeners:
  - name: ingress
    address: "127.0.0.1:10000"
    protocol: http1                        # http1 | bolt | tcp (default http1)
    route_table: web
route_tables:
  web:
    virtual_hosts:                         # first by domain: exact, "*.suffix", then "*"
      - name: api
        domains: ["api.local", "*.api.local"]
        routes:                            # first match wins
          - match: {prefix: "/v1/"}
            cluster: api_v1
            timeout_ms: 3000
      - name: default
        domains: ["*"]
        routes:
          - match: {path: "/health"}
            direct_response: {status: 200, body: "ok"}
          - match: {prefix: "/", headers: [{name: x-canary, exact: "1"}]}
            weighted_clusters: [{cluster: web_canary, weight: 10}, {cluster: web, weight: 90}]
          - match: {regex: "^/static/.*\\.css$"}
            cluster: web
          - match: {prefix: "/"}
            cluster: web
clusters:
  - name: web
    lb_policy: round_robin
    endpoints: ["127.0.0.1:8001", "backend.local:8002"]
  - {name: web_canary, endpoints: ["127.0.0.1:8003"]}
  - {name: api_v1, endpoints: ["127.0.0.1:8004"]}
'''

RT = "route_tables.web.routes[0]"          # path of the only route in base()


def base() -> dict:
    """A minimal valid config; tests change one thing and check the error."""
    return {
        "listeners": [{"name": "ingress", "address": "127.0.0.1:10000", "route_table": "web"}],
        "route_tables": {"web": {"routes": [{"match": {"prefix": "/"}, "cluster": "web"}]}},
        "clusters": [{"name": "web", "endpoints": ["127.0.0.1:8001"]},
                     {"name": "other", "endpoints": ["127.0.0.1:8002"]}],
    }


def with_route(**route) -> dict:
    d = base()
    d["route_tables"]["web"]["routes"][0] = route
    return d


def with_listener(**fields) -> dict:
    d = base()
    d["listeners"][0].update(fields)
    return d


def with_cluster(**fields) -> dict:
    d = base()
    d["clusters"][0].update(fields)
    return d


def errors(data) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_dict(data)
    return ei.value.errors


def error(data) -> str:
    """The single error ``data`` produces."""
    errs = errors(data)
    assert len(errs) == 1, errs
    return errs[0]


def re_error(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    raise AssertionError("pattern compiles")


# ---------------------------------------------------------------------------------------------
# The example and defaults
# ---------------------------------------------------------------------------------------------

def test_example_loads():
    cfg = load_text(EXAMPLE)
    assert cfg.source == "<string>"
    assert cfg.admin == Admin(Address("127.0.0.1", 9901))
    assert cfg.listeners == (Listener(name="ingress", address=Address("127.0.0.1", 10000),
                                      protocol="http1", route_table="web"),)
    assert list(cfg.route_tables) == ["web"]
    web = cfg.route_tables["web"]
    assert web.name == "web"
    api, default = web.virtual_hosts
    assert api == VirtualHost(
        name="api", domains=("api.local", "*.api.local"),
        routes=(Route(match=RouteMatch(prefix="/v1/"), cluster="api_v1", timeout_ms=3000),))
    assert default.name == "default"
    assert default.domains == ("*",)
    assert default.routes == (
        Route(match=RouteMatch(path="/health"),
              direct_response=DirectResponse(status=200, body="ok")),
        Route(match=RouteMatch(prefix="/", headers=(HeaderMatch(name="x-canary", exact="1"),)),
              weighted_clusters=(WeightedCluster("web_canary", 10), WeightedCluster("web", 90))),
        Route(match=RouteMatch(regex=r"^/static/.*\.css$"), cluster="web"),
        Route(match=RouteMatch(prefix="/"), cluster="web"),
    )
    assert default.routes[0].timeout_ms == model.DEFAULT_ROUTE_TIMEOUT_MS
    assert list(cfg.clusters) == ["web", "web_canary", "api_v1"]
    assert cfg.clusters["web"] == Cluster(
        name="web", lb_policy="round_robin",
        endpoints=(Address("127.0.0.1", 8001), Address("backend.local", 8002)))
    assert cfg.clusters["web_canary"] == Cluster(name="web_canary",
                                                 endpoints=(Address("127.0.0.1", 8003),))
    assert cfg.clusters["api_v1"].endpoints == (Address("127.0.0.1", 8004),)
    assert cfg.workers == 1
    assert cfg.drain_timeout_ms == 30000


def test_load_file(tmp_path):
    p = tmp_path / "mesh.yaml"
    p.write_text(EXAMPLE, encoding="utf-8")
    cfg = load_file(str(p))
    assert cfg.source == str(p)
    assert cfg == dataclasses.replace(load_text(EXAMPLE), source=str(p))


def test_load_file_missing(tmp_path):
    p = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as ei:
        load_file(p)
    assert ei.value.errors == [f"{p}: cannot read config file: No such file or directory"]


def test_defaults_for_minimal_config():
    cfg = load_dict({"listeners": []})
    assert cfg.admin == Admin(Address("127.0.0.1", 9901))
    assert str(cfg.admin.address) == model.DEFAULT_ADMIN_ADDRESS
    assert cfg.listeners == ()
    assert cfg.route_tables == {}
    assert cfg.clusters == {}
    assert cfg.workers == 1
    assert cfg.drain_timeout_ms == 30000


def test_listener_defaults_come_from_model():
    lst = load_dict(base()).listeners[0]
    assert lst == Listener(name="ingress", address=Address("127.0.0.1", 10000), route_table="web")
    assert lst.protocol == "http1"


def test_admin_null_disables():
    assert load_text("listeners: []\nadmin: null\n").admin is None


def test_admin_empty_mapping_gets_default_address():
    assert load_dict({"listeners": [], "admin": {}}).admin == Admin(Address("127.0.0.1", 9901))


def test_admin_errors():
    assert error({"listeners": [], "admin": {"address": "nope"}}) == \
        'admin.address: expected "host:port", got \'nope\''
    assert error({"listeners": [], "admin": {"adress": "127.0.0.1:1"}}) == \
        "admin.adress: unknown key"
    assert error({"listeners": [], "admin": "127.0.0.1:1"}) == \
        "admin: expected a mapping, got '127.0.0.1:1'"


def test_workers_and_drain():
    assert load_dict({"listeners": [], "workers": 4}).workers == 4
    assert load_dict({"listeners": [], "workers": "auto"}).workers == (os.cpu_count() or 1)
    assert load_dict({"listeners": [], "drain_timeout_ms": 0}).drain_timeout_ms == 0
    assert load_dict({"listeners": [], "workers": 0}).workers == 0     # one process
    for bad, shown in [(-1, "-1"), (True, "true"), ("many", "'many'"), (1.5, "1.5")]:
        assert error({"listeners": [], "workers": bad}) == \
            f'workers: expected a non-negative integer or "auto", got {shown} (0: one ' \
            f'process serves everything, for sidecars)'
    assert error({"listeners": [], "drain_timeout_ms": -1}) == \
        "drain_timeout_ms: expected a non-negative integer, got -1"


def test_routes_shorthand_becomes_default_virtual_host():
    cfg = load_dict(base())
    (vh,) = cfg.route_tables["web"].virtual_hosts
    assert vh == VirtualHost(name="default", domains=("*",),
                             routes=(Route(match=RouteMatch(prefix="/"), cluster="web"),))


# ---------------------------------------------------------------------------------------------
# ConfigError, YAML and top level
# ---------------------------------------------------------------------------------------------

def test_config_error_str_joins_errors_and_pickles():
    e = ConfigError(["a: one", "b: two"], "f.yaml")
    assert e.errors == ["a: one", "b: two"]
    assert str(e) == "a: one\nb: two"
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.errors == e.errors and e2.source == "f.yaml" and str(e2) == str(e)


def test_yaml_syntax_error_has_line_number():
    with pytest.raises(ConfigError) as ei:
        load_text("listeners: []\nclusters:\n  - name: a\n   endpoints: []\n", source="m.yaml")
    (msg,) = ei.value.errors
    assert msg.startswith("m.yaml:4:")
    assert "invalid YAML" in msg


def test_yaml_unsafe_tag_rejected():
    with pytest.raises(ConfigError) as ei:
        load_text("listeners: !!python/object/apply:os.getcwd []\n")
    (msg,) = ei.value.errors
    assert msg.startswith("<string>:1:") and "invalid YAML" in msg


def test_yaml_duplicate_keys_are_errors():
    with pytest.raises(ConfigError) as ei:
        load_text("listeners: []\nadmin: {address: '127.0.0.1:1', address: '127.0.0.1:2'}\n"
                  "listeners: []\n", source="m.yaml")
    assert ei.value.errors == ["m.yaml:2:33: duplicate key 'address'",
                               "m.yaml:3:1: duplicate key 'listeners'"]


def test_yaml_merge_keys_are_not_duplicates():
    text = ("clusters:\n"
            "  - &c {name: a, endpoints: ['127.0.0.1:1'], connect_timeout_ms: 10}\n"
            "  - {<<: *c, name: b}\n"
            "listeners: []\n")
    cfg = load_text(text)
    assert cfg.clusters["b"].connect_timeout_ms == 10


def test_empty_and_non_mapping_documents():
    with pytest.raises(ConfigError) as ei:
        load_text("", source="m.yaml")
    assert ei.value.errors == ["m.yaml: empty config (expected a mapping with a 'listeners' key)"]
    with pytest.raises(ConfigError) as ei:
        load_text("- a\n", source="m.yaml")
    assert ei.value.errors == ["m.yaml: expected a mapping at the top level, got a list"]


def test_top_level_unknown_key():
    d = base()
    d["cluster"] = []
    assert error(d) == "cluster: unknown key"


def test_listeners_required_and_a_list():
    assert error({}) == "listeners: missing required key"
    assert error({"listeners": {"a": 1}}) == "listeners: expected a list, got a mapping"


def test_validation_errors_after_yaml_carry_paths():
    with pytest.raises(ConfigError) as ei:
        load_text("listeners:\n  - {name: a, address: '10000', route_table: web}\n"
                  "route_tables: {web: {routes: [{cluster: web}]}}\n"
                  "clusters: [{name: web, endpoints: ['127.0.0.1:1']}]\n")
    assert ei.value.errors == ["listeners[0].address: expected \"host:port\", got '10000'"]


# ---------------------------------------------------------------------------------------------
# Listeners
# ---------------------------------------------------------------------------------------------

def test_listener_unknown_key():
    assert error(with_listener(adress="127.0.0.1:1")) == "listeners[0].adress: unknown key"


def test_listener_not_a_mapping():
    d = base()
    d["listeners"].append("ingress2")
    assert error(d) == "listeners[1]: expected a mapping, got 'ingress2'"


def test_listener_name_and_address_required():
    d = base()
    d["listeners"][0] = {"route_table": "web"}
    assert errors(d) == ["listeners[0].name: missing required key",
                         "listeners[0].address: missing required key"]


def test_listener_name_must_be_non_empty_string():
    assert error(with_listener(name="")) == "listeners[0].name: expected a non-empty string"
    assert error(with_listener(name=5)) == "listeners[0].name: expected a string, got 5 (quote it)"


@pytest.mark.parametrize("addr, msg", [
    ("10000", "expected \"host:port\", got '10000'"),
    (10000, 'expected "host:port", got 10000'),
    ("127.0.0.1:", "expected \"host:port\", got '127.0.0.1:'"),
    (":80", "expected \"host:port\", got ':80'"),
    ("127.0.0.1:http", "invalid port 'http'"),
    ("127.0.0.1:65536", "port 65536 out of range (0..65535)"),
    ("::1:80", 'IPv6 addresses go in brackets, like "[::1]:80", got \'::1:80\''),
    ("[::1]", "expected \"host:port\", got '[::1]'"),
    ("[nope]:80", "invalid IPv6 address 'nope'"),
    ("bad host:80", "invalid host 'bad host'"),
    ("300.1.1.1:80", "invalid host '300.1.1.1'"),
])
def test_listener_address_errors(addr, msg):
    assert error(with_listener(address=addr)) == f"listeners[0].address: {msg}"


@pytest.mark.parametrize("addr, expected", [
    ("127.0.0.1:0", Address("127.0.0.1", 0)),
    ("0.0.0.0:65535", Address("0.0.0.0", 65535)),
    ("[::1]:80", Address("::1", 80)),
    ("[::]:8080", Address("::", 8080)),
    ("localhost:80", Address("localhost", 80)),
])
def test_listener_address_ok(addr, expected):
    a = load_dict(with_listener(address=addr)).listeners[0].address
    assert a == expected
    assert str(a) == addr


def test_listener_names_unique():
    d = base()
    d["listeners"].append({"name": "ingress", "address": "127.0.0.1:10001", "route_table": "web"})
    assert error(d) == "listeners[1].name: duplicate listener name 'ingress' (also listeners[0])"


def test_listener_addresses_unique():
    d = base()
    d["listeners"].append({"name": "b", "address": "127.0.0.1:10000", "route_table": "web"})
    assert error(d) == "listeners[1].address: '127.0.0.1:10000' is already used by listeners[0].address"


def test_listener_ipv6_addresses_compared_canonically():
    d = base()
    d["listeners"][0]["address"] = "[::1]:80"
    d["listeners"].append({"name": "b", "address": "[0:0::1]:80", "route_table": "web"})
    assert error(d) == "listeners[1].address: '[0:0::1]:80' is already used by listeners[0].address"


def test_listener_port_zero_may_repeat():
    d = base()
    d["listeners"][0]["address"] = "127.0.0.1:0"
    d["listeners"].append({"name": "b", "address": "127.0.0.1:0", "route_table": "web"})
    assert len(load_dict(d).listeners) == 2


def test_listener_address_conflicts_with_admin():
    d = with_listener(address="127.0.0.1:9901")
    assert error(d) == "listeners[0].address: '127.0.0.1:9901' is already used by admin.address"
    d["admin"] = None
    load_dict(d)


def test_listener_protocol_unknown():
    assert error(with_listener(protocol="h2")) == \
        "listeners[0].protocol: unknown protocol 'h2' (expected one of: http1, http2, bolt, tcp, auto)"


@pytest.mark.parametrize("protocol", ["http1", "bolt"])
def test_listener_route_table_required(protocol):
    d = base()
    del d["listeners"][0]["route_table"]
    d["listeners"][0]["protocol"] = protocol
    assert error(d) == f"listeners[0].route_table: missing required key (for {protocol} listeners)"


def test_listener_route_table_must_exist():
    assert error(with_listener(route_table="webb")) == \
        "listeners[0].route_table: no route table named 'webb'"


def test_listener_bolt_ok():
    lst = load_dict(with_listener(protocol="bolt")).listeners[0]
    assert lst.protocol == "bolt" and lst.route_table == "web" and lst.cluster is None


def test_http_listener_forbids_cluster():
    assert error(with_listener(cluster="web")) == \
        "listeners[0].cluster: not allowed for http1 listeners (only tcp)"


def test_tcp_listener():
    d = base()
    d["listeners"][0] = {"name": "raw", "address": "127.0.0.1:10000", "protocol": "tcp",
                         "cluster": "web"}
    lst = load_dict(d).listeners[0]
    assert (lst.protocol, lst.cluster, lst.route_table) == ("tcp", "web", None)
    # idle: Envoy's tcp_proxy default (1 h), not the HTTP listeners' minute; a set one stays
    assert lst.idle_timeout_ms == 3600000
    assert load_dict(base()).listeners[0].idle_timeout_ms == 60000
    d["listeners"][0]["idle_timeout_ms"] = 5000
    assert load_dict(d).listeners[0].idle_timeout_ms == 5000
    assert load_dict(to_dict(load_dict(d))).listeners[0].idle_timeout_ms == 5000


def test_tcp_listener_requires_cluster():
    d = base()
    d["listeners"][0] = {"name": "raw", "address": "127.0.0.1:10000", "protocol": "tcp"}
    assert error(d) == "listeners[0].cluster: missing required key"


def test_tcp_listener_cluster_must_exist():
    d = base()
    d["listeners"][0] = {"name": "raw", "address": "127.0.0.1:10000", "protocol": "tcp",
                         "cluster": "nope"}
    assert error(d) == "listeners[0].cluster: no cluster named 'nope'"


def test_tcp_listener_forbids_route_table():
    d = base()
    d["listeners"][0] = {"name": "raw", "address": "127.0.0.1:10000", "protocol": "tcp",
                         "cluster": "web", "route_table": "web"}
    assert error(d) == "listeners[0].route_table: not allowed for tcp listeners"


LISTENER_INTS = [f.name for f in dataclasses.fields(Listener) if f.type == "int"]


def test_listener_int_fields_known():
    assert set(LISTENER_INTS) == {
        "max_head_bytes", "max_headers", "max_request_body_bytes", "max_frame_bytes",
        "idle_timeout_ms", "request_head_timeout_ms", "stream_idle_timeout_ms",
        "high_water_bytes", "low_water_bytes", "max_in_flight", "sniff_timeout_ms"}


NON_NEGATIVE = ("max_request_body_bytes", "stream_idle_timeout_ms", "sniff_timeout_ms")


@pytest.mark.parametrize("field", LISTENER_INTS)
def test_listener_int_limits(field):
    p = f"listeners[0].{field}"
    if field in NON_NEGATIVE:
        assert getattr(load_dict(with_listener(**{field: 0})).listeners[0], field) == 0
        assert error(with_listener(**{field: -1})) == \
            f"{p}: expected a non-negative integer, got -1"
    else:
        assert error(with_listener(**{field: 0})) == f"{p}: expected a positive integer, got 0"
    what = "a non-negative" if field in NON_NEGATIVE else "a positive"
    assert error(with_listener(**{field: True})) == f"{p}: expected {what} integer, got true"
    assert error(with_listener(**{field: "10"})) == f"{p}: expected {what} integer, got '10'"
    assert error(with_listener(**{field: 1.0})) == f"{p}: expected {what} integer, got 1.0"


def test_listener_int_value_kept():
    lst = load_dict(with_listener(max_headers=7, max_in_flight=2)).listeners[0]
    assert (lst.max_headers, lst.max_in_flight) == (7, 2)


def test_listener_low_water_below_high_water():
    assert error(with_listener(low_water_bytes=100, high_water_bytes=100)) == \
        "listeners[0].low_water_bytes: must be less than high_water_bytes (100 >= 100)"
    assert error(with_listener(high_water_bytes=1000)) == \
        "listeners[0].low_water_bytes: must be less than high_water_bytes (65536 >= 1000)"
    lst = load_dict(with_listener(low_water_bytes=1, high_water_bytes=2)).listeners[0]
    assert (lst.low_water_bytes, lst.high_water_bytes) == (1, 2)


# ---------------------------------------------------------------------------------------------
# Route tables and virtual hosts
# ---------------------------------------------------------------------------------------------

def vhosts(*vhs) -> dict:
    d = base()
    d["route_tables"]["web"] = {"virtual_hosts": list(vhs)}
    return d


def vh(name="a", domains=("*",), routes=None) -> dict:
    return {"name": name, "domains": list(domains),
            "routes": routes if routes is not None else [{"cluster": "web"}]}


def test_route_tables_must_be_mapping():
    d = base()
    d["route_tables"] = [{"routes": []}]
    errs = errors(d)
    assert errs[0] == "route_tables: expected a mapping of table name to table, got a list"


def test_route_table_needs_exactly_one_of_virtual_hosts_routes():
    d = base()
    d["route_tables"]["web"] = {}
    assert error(d) == "route_tables.web: expected exactly one of virtual_hosts, routes"
    d["route_tables"]["web"] = {"routes": [{"cluster": "web"}], "virtual_hosts": [vh()]}
    assert error(d) == \
        "route_tables.web: expected exactly one of virtual_hosts, routes (got both)"


def test_route_table_unknown_key_and_not_mapping():
    d = base()
    d["route_tables"]["web"]["vhosts"] = []
    assert error(d) == "route_tables.web.vhosts: unknown key"
    d["route_tables"]["web"] = None
    assert error(d) == "route_tables.web: expected a mapping, got null"


def test_route_table_name_with_odd_characters_is_quoted_in_paths():
    d = base()
    d["route_tables"]["my web"] = {"routes": [{"cluster": "nope"}]}
    assert error(d) == "route_tables['my web'].routes[0].cluster: no cluster named 'nope'"


def test_routes_and_virtual_hosts_non_empty():
    d = base()
    d["route_tables"]["web"] = {"routes": []}
    assert error(d) == "route_tables.web.routes: expected a non-empty list"
    assert error(vhosts()) == "route_tables.web.virtual_hosts: expected a non-empty list"
    assert error(vhosts(vh(routes=[]))) == \
        "route_tables.web.virtual_hosts[0].routes: expected a non-empty list"
    assert error(vhosts(vh(domains=[]))) == \
        "route_tables.web.virtual_hosts[0].domains: expected a non-empty list"


def test_virtual_host_required_keys_and_unknown_key():
    assert errors(vhosts({"domain": ["*"]})) == [
        "route_tables.web.virtual_hosts[0].domain: unknown key",
        "route_tables.web.virtual_hosts[0].name: missing required key",
        "route_tables.web.virtual_hosts[0].domains: missing required key",
        "route_tables.web.virtual_hosts[0].routes: missing required key",
    ]


def test_virtual_host_names_unique():
    assert error(vhosts(vh("a", ["a.local"]), vh("a", ["b.local"]))) == \
        "route_tables.web.virtual_hosts[1].name: duplicate virtual host name 'a' (also virtual_hosts[0])"


def test_domains_lower_cased_and_forms_accepted():
    doms = ["API.Local", "*.Api.Local", "api.local:8080", "10.0.0.1", "[::1]:80", "[::1]", "*"]
    cfg = load_dict(vhosts(vh(domains=doms)))
    assert cfg.route_tables["web"].virtual_hosts[0].domains == (
        "api.local", "*.api.local", "api.local:8080", "10.0.0.1", "[::1]:80", "[::1]", "*")


@pytest.mark.parametrize("dom", ["bad domain", "*api.local", "api.*", "*.", "*.a.local:80",
                                 "a.local:99999", "a.local:x", "::1", "[zz]:80", ""])
def test_invalid_domains(dom):
    msg = error(vhosts(vh(domains=[dom])))
    if dom == "":
        assert msg == "route_tables.web.virtual_hosts[0].domains[0]: expected a non-empty string"
    else:
        assert msg == (f"route_tables.web.virtual_hosts[0].domains[0]: invalid domain {dom!r} "
                       f'(expected "*", "*.suffix", or a host with an optional ":port")')


def test_duplicate_domains_across_virtual_hosts():
    assert error(vhosts(vh("a", ["x.local", "y.local"]), vh("b", ["X.LOCAL"]))) == \
        ("route_tables.web.virtual_hosts[1].domains[0]: duplicate domain 'x.local' "
         "(also at virtual_hosts[0].domains[0])")


def test_duplicate_domain_within_virtual_host():
    assert error(vhosts(vh("a", ["x.local", "x.local"]))) == \
        ("route_tables.web.virtual_hosts[0].domains[1]: duplicate domain 'x.local' "
         "(also at virtual_hosts[0].domains[0])")


def test_at_most_one_catch_all_domain():
    assert error(vhosts(vh("a", ["*"]), vh("b", ["*"]))) == \
        ('route_tables.web.virtual_hosts[1].domains[0]: only one "*" domain is allowed per '
         'route table (also at virtual_hosts[0].domains[0])')


def test_same_domain_in_different_tables_is_fine():
    d = base()
    d["route_tables"]["other"] = {"routes": [{"cluster": "web"}]}
    assert set(load_dict(d).route_tables) == {"web", "other"}


# ---------------------------------------------------------------------------------------------
# Routes: match
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", [{"cluster": "web"}, {"match": {}, "cluster": "web"},
                                   {"match": None, "cluster": "web"}])
def test_match_may_be_omitted_or_empty(route):
    r = load_dict(with_route(**route)).route_tables["web"].virtual_hosts[0].routes[0]
    assert r.match == RouteMatch()


def test_match_at_most_one_path_kind():
    assert error(with_route(match={"path": "/a", "prefix": "/"}, cluster="web")) == \
        f"{RT}.match: at most one of path, prefix, regex (got path, prefix)"
    assert error(with_route(match={"prefix": "/", "regex": "/.*"}, cluster="web")) == \
        f"{RT}.match: at most one of path, prefix, regex (got prefix, regex)"


@pytest.mark.parametrize("kind", ["path", "prefix"])
def test_match_path_and_prefix_start_with_slash(kind):
    assert error(with_route(match={kind: "v1/"}, cluster="web")) == \
        f"{RT}.match.{kind}: must start with \"/\", got 'v1/'"
    assert error(with_route(match={kind: 1}, cluster="web")) == \
        f"{RT}.match.{kind}: expected a string, got 1 (quote it)"


def test_match_regex_must_compile():
    assert error(with_route(match={"regex": "/(a"}, cluster="web")) == \
        f"{RT}.match.regex: invalid regular expression: {re_error('/(a')}"


def test_match_unknown_key():
    assert error(with_route(match={"prefx": "/"}, cluster="web")) == f"{RT}.match.prefx: unknown key"
    assert error(with_route(match="/", cluster="web")) == f"{RT}.match: expected a mapping, got '/'"


def hdr(*headers) -> dict:
    return with_route(match={"prefix": "/", "headers": list(headers)}, cluster="web")


def test_header_matches_parsed_and_lower_cased():
    cfg = load_dict(hdr({"name": "X-Canary", "exact": "1"}, {"name": "x-a", "prefix": ""},
                        {"name": "x-b", "regex": "v[0-9]+"}, {"name": "x-c", "present": False}))
    assert cfg.route_tables["web"].virtual_hosts[0].routes[0].match.headers == (
        HeaderMatch(name="x-canary", exact="1"), HeaderMatch(name="x-a", prefix=""),
        HeaderMatch(name="x-b", regex="v[0-9]+"), HeaderMatch(name="x-c", present=False))


def test_header_match_name_required():
    assert error(hdr({"exact": "1"})) == f"{RT}.match.headers[0].name: missing required key"
    assert error(hdr({"name": "", "exact": "1"})) == \
        f"{RT}.match.headers[0].name: expected a non-empty string"


def test_header_match_exactly_one_kind():
    assert error(hdr({"name": "x"})) == \
        f"{RT}.match.headers[0]: expected exactly one of exact, prefix, regex, present"
    assert error(hdr({"name": "x", "exact": "1", "present": True})) == \
        f"{RT}.match.headers[0]: expected exactly one of exact, prefix, regex, present (got exact, present)"


def test_header_match_value_types():
    assert error(hdr({"name": "x", "exact": 1})) == \
        f"{RT}.match.headers[0].exact: expected a string, got 1 (quote it)"
    assert error(hdr({"name": "x", "present": "yes"})) == \
        f"{RT}.match.headers[0].present: expected true or false, got 'yes'"
    assert error(hdr({"name": "x", "regex": "("})) == \
        f"{RT}.match.headers[0].regex: invalid regular expression: {re_error('(')}"
    assert error(hdr({"name": "x", "exakt": "1", "exact": "1"})) == \
        f"{RT}.match.headers[0].exakt: unknown key"
    assert error(with_route(match={"headers": {"name": "x"}}, cluster="web")) == \
        f"{RT}.match.headers: expected a list, got a mapping"


# ---------------------------------------------------------------------------------------------
# Routes: actions and options
# ---------------------------------------------------------------------------------------------

def test_route_needs_exactly_one_action():
    assert error(with_route(match={"prefix": "/"})) == \
        f"{RT}: expected exactly one of cluster, weighted_clusters, direct_response"
    assert error(with_route(cluster="web", direct_response={"status": 200})) == \
        f"{RT}: expected exactly one of cluster, weighted_clusters, direct_response (got cluster, direct_response)"


def test_route_unknown_key():
    assert error(with_route(cluster="web", timeout=5)) == f"{RT}.timeout: unknown key"


def test_route_cluster_must_exist():
    assert error(with_route(cluster="x")) == f"{RT}.cluster: no cluster named 'x'"


def test_route_cluster_error_path_in_virtual_hosts():
    data = vhosts(vh("a", ["*"], routes=[{"cluster": "web"}, {"cluster": "x"}]))
    data["route_tables"]["web"]["virtual_hosts"][0]["routes"][1]["match"] = {"prefix": "/"}
    assert error(data) == "route_tables.web.virtual_hosts[0].routes[1].cluster: no cluster named 'x'"


def test_weighted_clusters():
    r = load_dict(with_route(weighted_clusters=[{"cluster": "web", "weight": 1},
                                                {"cluster": "other", "weight": 3}]))
    route = r.route_tables["web"].virtual_hosts[0].routes[0]
    assert route.weighted_clusters == (WeightedCluster("web", 1), WeightedCluster("other", 3))
    assert route.cluster is None and route.direct_response is None


def test_weighted_clusters_errors():
    w = f"{RT}.weighted_clusters"
    assert error(with_route(weighted_clusters=[])) == f"{w}: expected a non-empty list"
    assert error(with_route(weighted_clusters=[{"cluster": "x", "weight": 1}])) == \
        f"{w}[0].cluster: no cluster named 'x'"
    for bad, shown in [(0, "0"), (-1, "-1"), (True, "true"), (1.5, "1.5"), ("1", "'1'")]:
        assert error(with_route(weighted_clusters=[{"cluster": "web", "weight": bad}])) == \
            f"{w}[0].weight: expected a positive integer, got {shown}"
    assert errors(with_route(weighted_clusters=[{}])) == [
        f"{w}[0].cluster: missing required key", f"{w}[0].weight: missing required key"]
    assert error(with_route(weighted_clusters=[{"cluster": "web", "weight": 1},
                                               {"cluster": "web", "weight": 2}])) == \
        f"{w}[1].cluster: duplicate cluster 'web' (also weighted_clusters[0])"
    assert error(with_route(weighted_clusters=[{"cluster": "web", "weight": 1, "w": 2}])) == \
        f"{w}[0].w: unknown key"


def test_direct_response():
    r = load_dict(with_route(direct_response={"status": 404}))
    assert r.route_tables["web"].virtual_hosts[0].routes[0].direct_response == \
        DirectResponse(status=404, body="")


def test_direct_response_errors():
    p = f"{RT}.direct_response"
    for bad, shown in [(199, "199"), (600, "600"), ("200", "'200'"), (True, "true")]:
        assert error(with_route(direct_response={"status": bad})) == \
            f"{p}.status: expected an integer in 200..599, got {shown}"
    assert error(with_route(direct_response={})) == f"{p}.status: missing required key"
    assert error(with_route(direct_response={"status": 200, "body": 5})) == \
        f"{p}.body: expected a string, got 5 (quote it)"
    assert error(with_route(direct_response={"status": 200, "headers": {}})) == \
        f"{p}.headers: unknown key"
    assert error(with_route(direct_response=200)) == f"{p}: expected a mapping, got 200"


def test_timeout_ms():
    def timeout(v):
        return load_dict(with_route(cluster="web", timeout_ms=v)).route_tables["web"] \
            .virtual_hosts[0].routes[0].timeout_ms
    assert timeout(0) == 0
    assert timeout(250) == 250
    for bad, shown in [(-1, "-1"), (True, "true"), ("1s", "'1s'"), (None, "null")]:
        assert error(with_route(cluster="web", timeout_ms=bad)) == \
            f"{RT}.timeout_ms: expected a non-negative integer, got {shown}"


def test_request_headers_to_add_list_form():
    r = load_dict(with_route(cluster="web", request_headers_to_add=[
        {"name": "X-B", "value": "2"}, {"name": "x-a", "value": "1"},
        {"name": "x-b", "value": ""}]))
    assert r.route_tables["web"].virtual_hosts[0].routes[0].request_headers_to_add == \
        (("x-b", "2"), ("x-a", "1"), ("x-b", ""))


def test_request_headers_to_add_mapping_form_keeps_order():
    r = load_text("listeners: []\nclusters: [{name: web, endpoints: ['127.0.0.1:1']}]\n"
                  "route_tables: {t: {routes: [{cluster: web, request_headers_to_add: "
                  "{X-Zed: z, x-alpha: a, X-Mid: m}}]}}\n")
    assert r.route_tables["t"].virtual_hosts[0].routes[0].request_headers_to_add == \
        (("x-zed", "z"), ("x-alpha", "a"), ("x-mid", "m"))


def test_request_headers_to_add_errors():
    p = f"{RT}.request_headers_to_add"
    assert error(with_route(cluster="web", request_headers_to_add={"x-a": 1})) == \
        f"{p}.x-a: expected a string, got 1 (quote it)"
    assert error(with_route(cluster="web", request_headers_to_add=[{"name": "x-a"}])) == \
        f"{p}[0].value: missing required key"
    assert error(with_route(cluster="web", request_headers_to_add=[{"value": "v"}])) == \
        f"{p}[0].name: missing required key"
    assert error(with_route(cluster="web", request_headers_to_add=[{"name": "a", "value": "v",
                                                                     "append": True}])) == \
        f"{p}[0].append: unknown key"
    assert error(with_route(cluster="web", request_headers_to_add="x-a: 1")) == \
        f"{p}: expected a list of {{name, value}} or a mapping of name to value, got 'x-a: 1'"
    assert error(with_route(cluster="web", request_headers_to_add={"": "v"})) == \
        f"{p}: header names must be non-empty strings, got ''"


def test_request_headers_to_remove():
    r = load_dict(with_route(cluster="web", request_headers_to_remove=["X-Debug", "cookie"]))
    assert r.route_tables["web"].virtual_hosts[0].routes[0].request_headers_to_remove == \
        ("x-debug", "cookie")
    p = f"{RT}.request_headers_to_remove"
    assert error(with_route(cluster="web", request_headers_to_remove="x-debug")) == \
        f"{p}: expected a list, got 'x-debug'"
    assert error(with_route(cluster="web", request_headers_to_remove=["a", 3])) == \
        f"{p}[1]: expected a string, got 3 (quote it)"


def test_route_not_a_mapping():
    d = base()
    d["route_tables"]["web"]["routes"].append("web")
    assert error(d) == "route_tables.web.routes[1]: expected a mapping, got 'web'"


# ---------------------------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------------------------

def test_clusters_must_be_list_of_mappings():
    d = base()
    d["clusters"] = {"web": {"endpoints": ["127.0.0.1:1"]}}
    # references are not checked when the section itself is unusable
    assert errors(d) == ["clusters: expected a list, got a mapping"]
    d = base()
    d["clusters"].append("x")
    assert error(d) == "clusters[2]: expected a mapping, got 'x'"


def test_cluster_required_keys_and_unknown_key():
    d = base()
    d["clusters"].append({"endpoint": "127.0.0.1:1"})
    assert errors(d) == ["clusters[2].endpoint: unknown key",
                         "clusters[2].name: missing required key",
                         "clusters[2].endpoints: missing required key"]


def test_cluster_names_unique():
    d = base()
    d["clusters"].append({"name": "web", "endpoints": ["127.0.0.1:9"]})
    assert error(d) == "clusters[2].name: duplicate cluster name 'web' (also clusters[0])"


def test_cluster_endpoints():
    c = load_dict(with_cluster(endpoints=["a.svc.cluster.local:80", "[::1]:1", "10.1.2.3:65535",
                                          "Backend_1:8080"])).clusters["web"]
    assert c.endpoints == (Address("a.svc.cluster.local", 80), Address("::1", 1),
                           Address("10.1.2.3", 65535), Address("Backend_1", 8080))


@pytest.mark.parametrize("ep, msg", [
    ("127.0.0.1:0", "port 0 out of range (1..65535)"),
    ("127.0.0.1:70000", "port 70000 out of range (1..65535)"),
    ("127.0.0.1", "expected \"host:port\", got '127.0.0.1'"),
    (8001, 'expected "host:port", got 8001'),
    ("http://a:80", "invalid host 'http://a'"),
])
def test_cluster_endpoint_errors(ep, msg):
    assert error(with_cluster(endpoints=["127.0.0.1:1", ep])) == f"clusters[0].endpoints[1]: {msg}"


def test_cluster_endpoints_list_without_duplicates():
    # empty: no endpoint yet (503 no_healthy_upstream), and it survives the round trip
    cfg = load_dict(with_cluster(endpoints=[]))
    assert cfg.clusters["web"].endpoints == ()
    assert load_dict(to_dict(cfg)) == cfg
    assert error(with_cluster(endpoints="127.0.0.1:1")) == \
        "clusters[0].endpoints: expected a list, got '127.0.0.1:1'"
    assert error(with_cluster(endpoints=["127.0.0.1:1", "127.0.0.1:1"])) == \
        "clusters[0].endpoints[1]: duplicate endpoint '127.0.0.1:1' (also endpoints[0])"


@pytest.mark.parametrize("policy", model.LB_POLICIES)
def test_cluster_lb_policies(policy):
    assert load_dict(with_cluster(lb_policy=policy)).clusters["web"].lb_policy == policy


def test_cluster_lb_policy_unknown():
    d = base()
    d["clusters"][1]["lb_policy"] = "foo"
    assert error(d) == \
        "clusters[1].lb_policy: unknown policy 'foo' (expected one of: round_robin, random, " \
        "least_request, ring_hash, maglev)"


CLUSTER_INTS = [f.name for f in dataclasses.fields(Cluster) if f.type == "int"
                and f.name != "healthy_panic_threshold_pct"]       # 0..100, tested apart


def test_cluster_int_fields_known():
    assert set(CLUSTER_INTS) == {
        "connect_timeout_ms", "dns_refresh_ms", "max_idle_per_endpoint", "idle_timeout_ms",
        "connections_per_endpoint", "heartbeat_interval_ms", "heartbeat_max_missed",
        "min_ring_size", "max_ring_size", "maglev_table_size"}


def test_cluster_health_settings():
    cfg = load_dict(with_cluster(
        healthy_panic_threshold_pct=0,
        health_check={"type": "http", "path": "/healthz", "timeout_ms": 500,
                      "interval_ms": 1000, "unhealthy_threshold": 2,
                      "expected_statuses": [200, [204, 300]]},
        outlier_detection={"consecutive_5xx": 3, "base_ejection_time_ms": 1000}))
    c = cfg.clusters["web"]
    assert c.healthy_panic_threshold_pct == 0
    assert c.health_check == model.HealthCheck(
        type="http", path="/healthz", timeout_ms=500, interval_ms=1000, unhealthy_threshold=2,
        expected_statuses=((200, 201), (204, 300)))
    assert c.outlier_detection == model.OutlierDetection(consecutive_5xx=3,
                                                         base_ejection_time_ms=1000)
    assert load_dict(to_dict(cfg), cfg.source) == cfg


@pytest.mark.parametrize("change,msg", [
    ({"lb_policy": "maglev", "maglev_table_size": 65536}, "maglev_table_size: 65536 is not a "
                                                          "prime number"),
    ({"lb_policy": "ring_hash", "max_ring_size": 512}, "max_ring_size: must be at least "
                                                       "min_ring_size"),
    ({"healthy_panic_threshold_pct": 101}, "healthy_panic_threshold_pct: expected an integer "
                                           "in 0..100"),
    ({"health_check": {"type": "grpc", "timeout_ms": 1, "interval_ms": 1}},
     "health_check.type: unknown health check type 'grpc'"),
    ({"health_check": {"type": "http", "timeout_ms": 1, "interval_ms": 1}},
     "health_check.path: missing required key"),
    ({"health_check": {"type": "tcp", "timeout_ms": 1, "interval_ms": 1, "path": "/"}},
     "health_check.path: not for a tcp health check"),
    ({"health_check": {"type": "tcp", "timeout_ms": 1, "interval_ms": 1, "send_hex": "abc"}},
     "health_check.send_hex: expected bytes in hex"),
    ({"health_check": {"type": "http", "path": "/", "timeout_ms": 1, "interval_ms": 1,
                       "expected_statuses": [[300, 200]]}},
     "health_check.expected_statuses[0]: expected a status"),
    ({"outlier_detection": {"max_ejection_pct": 120}}, "outlier_detection.max_ejection_pct"),
    ({"outlier_detection": {"bogus": 1}}, "outlier_detection.bogus: unknown key"),
])
def test_cluster_health_settings_refused(change, msg):
    with pytest.raises(ConfigError) as e:
        load_dict(with_cluster(**change))
    assert msg in " ".join(e.value.errors)


@pytest.mark.parametrize("field", [f for f in CLUSTER_INTS if f != "max_ring_size"])
def test_cluster_int_fields_positive(field):       # (max_ring_size >= min_ring_size: below)
    p = f"clusters[0].{field}"
    assert getattr(load_dict(with_cluster(**{field: 7})).clusters["web"], field) == 7
    for bad, shown in [(0, "0"), (-5, "-5"), (True, "true"), ("5", "'5'")]:
        assert error(with_cluster(**{field: bad})) == f"{p}: expected a positive integer, got {shown}"


def test_cluster_defaults_come_from_model():
    assert load_dict(base()).clusters["web"] == Cluster(name="web",
                                                        endpoints=(Address("127.0.0.1", 8001),))


def test_broken_cluster_still_counts_for_references():
    # the cluster's own error is reported; routes naming it do not add "no cluster named" noise
    assert error(with_cluster(endpoints="127.0.0.1:1")) == \
        "clusters[0].endpoints: expected a list, got '127.0.0.1:1'"


# ---------------------------------------------------------------------------------------------
# Many errors at once
# ---------------------------------------------------------------------------------------------

def test_all_errors_reported_together():
    d = base()
    d["listeners"][0]["adress"] = "127.0.0.1:1"
    d["listeners"][0]["protocol"] = "http3"
    d["route_tables"]["web"]["routes"].append({"match": {"prefix": "x"}, "cluster": "nope"})
    d["clusters"][1]["lb_policy"] = "foo"
    d["clusters"].append({"name": "c", "endpoints": ["127.0.0.1:0"]})
    d["workers"] = -1
    d["typo"] = 1
    with pytest.raises(ConfigError) as ei:
        load_dict(d)
    expected = [
        "typo: unknown key",
        "listeners[0].adress: unknown key",
        "listeners[0].protocol: unknown protocol 'http3' (expected one of: http1, http2, bolt, tcp, auto)",
        "route_tables.web.routes[1].match.prefix: must start with \"/\", got 'x'",
        "route_tables.web.routes[1].cluster: no cluster named 'nope'",
        "clusters[1].lb_policy: unknown policy 'foo' (expected one of: round_robin, random, " \
        "least_request, ring_hash, maglev)",
        "clusters[2].endpoints[0]: port 0 out of range (1..65535)",
        'workers: expected a non-negative integer or "auto", got -1 (0: one process serves '
        'everything, for sidecars)',
    ]
    assert ei.value.errors == expected
    assert str(ei.value) == "\n".join(expected)


def test_input_not_mutated():
    d = base()
    d["route_tables"]["web"]["routes"][0]["request_headers_to_add"] = {"X-A": "1"}
    before = copy.deepcopy(d)
    load_dict(d)
    assert d == before


# ---------------------------------------------------------------------------------------------
# to_dict
# ---------------------------------------------------------------------------------------------

def test_round_trip_example():
    cfg = load_text(EXAMPLE)
    d = to_dict(cfg)
    json.dumps(d)                                 # plain data only
    assert load_dict(d) == cfg
    assert load_dict(json.loads(json.dumps(d))) == cfg


def test_to_dict_shape():
    d = to_dict(load_text(EXAMPLE))
    assert d["admin"] == {"address": "127.0.0.1:9901"}
    assert d["listeners"][0]["address"] == "127.0.0.1:10000"
    assert d["listeners"][0]["max_head_bytes"] == 65536           # defaults included
    assert "cluster" not in d["listeners"][0]                    # unset optionals left out
    assert d["clusters"][0]["endpoints"] == ["127.0.0.1:8001", "backend.local:8002"]
    assert d["route_tables"]["web"]["virtual_hosts"][1]["routes"][1] == {
        "match": {"prefix": "/", "headers": [{"name": "x-canary", "exact": "1"}]},
        "weighted_clusters": [{"cluster": "web_canary", "weight": 10},
                              {"cluster": "web", "weight": 90}],
        "timeout_ms": 15000, "attempt_count_header": False,
    }
    assert d["workers"] == 1 and d["drain_timeout_ms"] == 30000
    assert "source" not in d


def test_clusters_sent_apart_from_the_rest():
    """What a worker is sent when it already holds some clusters: the rest of the config,
    and the names of those it keeps; the result is the same config."""
    cfg = load_text(EXAMPLE)
    kept = {"web": cfg.clusters["web"]}
    d = to_dict(cfg, except_clusters=kept.keys())
    assert "web" not in {c["name"] for c in d["clusters"]}
    again = load_dict(d, cfg.source, clusters=kept)
    assert again.clusters["web"] is kept["web"]          # taken as it is
    assert again == cfg
    with pytest.raises(ConfigError) as e:                  # routes still need their clusters
        load_dict(d, cfg.source)
    assert any("web" in err for err in e.value.errors)
    with pytest.raises(ConfigError) as e:                  # one name, twice
        load_dict(to_dict(cfg), cfg.source, clusters=kept)
    assert "duplicate cluster name 'web'" in " ".join(e.value.errors)


def test_round_trip_everything_else():
    d = base()
    d["admin"] = None
    d["listeners"].append({"name": "raw", "address": "[::1]:7000", "protocol": "tcp",
                           "cluster": "other", "idle_timeout_ms": 5})
    d["listeners"].append({"name": "rpc", "address": "0.0.0.0:12200", "protocol": "bolt",
                           "route_table": "web", "max_in_flight": 3})
    d["route_tables"]["web"]["routes"] = [
        {"match": {"headers": [{"name": "service", "present": True},
                               {"name": "x-v", "regex": "v[12]"}]},
         "cluster": "web", "timeout_ms": 0,
         "request_headers_to_add": {"x-a": "1", "x-b": ""},
         "request_headers_to_remove": ["X-Debug"]},
        {"direct_response": {"status": 503}},
    ]
    d["clusters"][1].update(lb_policy="least_request", heartbeat_max_missed=9)
    d["workers"] = 3
    d["drain_timeout_ms"] = 0
    cfg = load_dict(d, source="x.yaml")
    out = to_dict(cfg)
    json.dumps(out)
    assert out["admin"] is None
    assert out["listeners"][1]["address"] == "[::1]:7000"
    assert load_dict(out, source="x.yaml") == cfg


def test_listener_access_log():
    assert load_dict(with_listener(access_log="/tmp/a.log")).listeners[0].access_log == \
        "/tmp/a.log"
    assert load_dict(base()).listeners[0].access_log is None
    assert error(with_listener(access_log=5)) == \
        "listeners[0].access_log: expected a string, got 5 (quote it)"
    assert error(with_listener(access_log="")) == \
        "listeners[0].access_log: expected a non-empty string"
    # Bolt listeners have one too now (issue 13); tcp listeners do not
    assert load_dict(with_listener(protocol="bolt", access_log="/tmp/a.log")) \
        .listeners[0].access_log == "/tmp/a.log"
    assert load_dict(with_listener(access_log={"path": "/tmp/a.log", "format": "%DURATION%"})) \
        .listeners[0].access_log_format == "%DURATION%"
    assert error(with_listener(access_log={"path": "/tmp/a.log", "format": "%NOPE%"})) \
        .startswith("listeners[0].access_log.format: unknown operator %NOPE%")
    assert error(with_listener(access_log={"format": "%DURATION%"})) == \
        "listeners[0].access_log.path: missing required key"


def test_route_retries_hashing_mirrors_and_endpoint_weights():
    d = with_route(match={"prefix": "/"}, cluster="web",
                   retry_policy={"retry_on": ["5xx", "connect-failure"], "num_retries": 2,
                                 "per_try_timeout_ms": 300, "previous_hosts": True},
                   hash_policy=[{"kind": "header", "name": "X-User", "terminal": True},
                                {"kind": "source_ip"}],
                   mirrors=[{"cluster": "other", "per_million": 250000}])
    d["clusters"][0].update(lb_policy="ring_hash", endpoints=[
        {"address": "127.0.0.1:8001", "weight": 3}, "127.0.0.1:8003"])
    cfg = load_dict(d)
    r = cfg.route_tables["web"].virtual_hosts[0].routes[0]
    assert r.retry_policy == model.RetryPolicy(retry_on=("5xx", "connect-failure"),
                                               num_retries=2, per_try_timeout_ms=300,
                                               previous_hosts=True)
    assert r.hash_policy == (model.HashPolicy("header", "x-user", True),
                             model.HashPolicy("source_ip"))
    assert r.mirrors == (model.Mirror("other", 250000),)
    assert cfg.clusters["web"].weights == (3, 1)
    assert load_dict(to_dict(cfg), cfg.source) == cfg


@pytest.mark.parametrize("route,msg", [
    ({"retry_policy": {"retry_on": ["5xx", "sometimes"]}},
     "retry_policy.retry_on[1]: unknown retry condition 'sometimes'"),
    ({"retry_policy": {"retry_on": ["5xx"], "backoff_base_ms": 100, "backoff_max_ms": 10}},
     "retry_policy.backoff_max_ms: must be at least backoff_base_ms"),
    ({"hash_policy": [{"kind": "source_ip", "name": "x"}]},
     "hash_policy[0].name: not for a source_ip hash policy"),
    ({"hash_policy": [{"kind": "header"}]}, "hash_policy[0].name: missing required key"),
    ({"mirrors": [{"cluster": "nope"}]}, "mirrors[0].cluster: no cluster named 'nope'"),
    ({"mirrors": [{"cluster": "other", "per_million": 2000000}]},
     "mirrors[0].per_million: expected an integer in 0..1000000"),
])
def test_route_retries_hashing_mirrors_refused(route, msg):
    with pytest.raises(ConfigError) as e:
        load_dict(with_route(match={"prefix": "/"}, cluster="web", **route))
    assert msg in " ".join(e.value.errors), e.value.errors


def test_bolt_health_check():
    cfg = load_dict(with_cluster(health_check={"type": "bolt", "timeout_ms": 500,
                                               "interval_ms": 1000}))
    assert cfg.clusters["web"].health_check.type == "bolt"
    assert load_dict(to_dict(cfg), cfg.source) == cfg
    with pytest.raises(ConfigError) as e:
        load_dict(with_cluster(health_check={"type": "bolt", "timeout_ms": 500,
                                             "interval_ms": 1000, "path": "/"}))
    assert "health_check.path: not for a bolt health check" in " ".join(e.value.errors)


def test_http_filters_native():
    d = with_route(match={"prefix": "/"}, cluster="web",
                   fault={"abort_status": 503, "abort_per_million": 1000000},
                   local_rate_limit={"max_tokens": 5, "fill_interval_ms": 60000,
                                     "x_ratelimit_headers": True,
                                     "response_headers_to_add": {"x-limited": "yes"}})
    d["listeners"][0]["fault"] = {"delay_from_header": True, "delay_per_million": 1000000}
    cfg = load_dict(d)
    lst = cfg.listeners[0]
    assert lst.http_filters == ("fault", "local_rate_limit")       # inferred, in order
    assert lst.fault == model.Fault(delay_from_header=True, delay_per_million=1000000)
    r = cfg.route_tables["web"].virtual_hosts[0].routes[0]
    assert r.local_rate_limit.response_headers_to_add == (("x-limited", "yes"),)
    assert load_dict(to_dict(cfg), cfg.source) == cfg


@pytest.mark.parametrize("change,msg", [
    ({"listeners": [{"name": "ingress", "address": "127.0.0.1:10000", "route_table": "web",
                     "http_filters": ["fault"], "local_rate_limit": {"max_tokens": 1}}]},
     "local_rate_limit is configured (on the listener or its routes) but not in http_filters"),
    ({"listeners": [{"name": "ingress", "address": "127.0.0.1:10000", "route_table": "web",
                     "http_filters": ["gzip"]}]}, "unknown HTTP filter 'gzip'"),
    ({"listeners": [{"name": "ingress", "address": "127.0.0.1:10000", "route_table": "web",
                     "fault": {"abort_status": 99}}]}, "fault.abort_status: expected"),
    ({"listeners": [{"name": "ingress", "address": "127.0.0.1:10000", "route_table": "web",
                     "local_rate_limit": {"tokens_per_fill": 1}}]},
     "local_rate_limit.max_tokens: missing required key"),
])
def test_http_filters_native_refused(change, msg):
    d = base()
    d.update(change)
    with pytest.raises(ConfigError) as e:
        load_dict(d)
    assert msg in " ".join(e.value.errors), e.value.errors


def test_http2_settings_native_and_refused():
    from fastmesh.config.model import Http2Settings
    base = {"listeners": [{"name": "l", "address": "127.0.0.1:0", "protocol": "http2",
                           "route_table": "rt",
                           "http2": {"max_concurrent_streams": 5,
                                     "initial_stream_window_bytes": 100000}}],
            "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "c"}]}},
            "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"], "http_protocol": "http2",
                          "http2": {"initial_connection_window_bytes": 4194304,
                                    "hpack_table_bytes": 0}}]}
    cfg = load_dict(base)
    assert cfg.listeners[0].http2 == Http2Settings(max_concurrent_streams=5,
                                                   initial_stream_window_bytes=100000)
    assert cfg.clusters["c"].http2.initial_connection_window_bytes == 4194304
    assert load_dict(to_dict(cfg)) == cfg
    for bad, where in (({"max_concurrent_streams": 0}, "max_concurrent_streams"),
                       ({"initial_stream_window_bytes": 1000}, "initial_stream_window_bytes"),
                       ({"hpack_table_bytes": 1 << 20}, "hpack_table_bytes"),
                       ({"nope": 1}, "nope")):
        doc = json.loads(json.dumps(base))
        doc["listeners"][0]["http2"] = bad
        with pytest.raises(ConfigError) as ei:
            load_dict(doc)
        assert f"listeners[0].http2" in str(ei.value) and where in str(ei.value), str(ei.value)
