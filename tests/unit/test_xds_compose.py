"""A bootstrap file's static resources composed with what the control plane sent
(fastmesh.config.envoy.compose), whichever spelling the file uses: Envoy reads proto names
(``filter_chains``) and JSON names (``filterChains``) alike, so a static listener on RDS and a
static EDS cluster with a service_name work in both.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmtest import camel  # noqa: E402
from xds_server import assignment, bootstrap, route_config, to_cluster  # noqa: E402

from fastmesh.config.envoy import translate_composed  # noqa: E402
from fastmesh.config.envoy.compose import (ENDPOINT, ROUTE, SECRET, State, compose)  # noqa: E402
from fastmesh.config.model import Address  # noqa: E402

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def static_on_ads() -> dict:
    b = bootstrap(19000, 18000)
    b["static_resources"]["listeners"] = [{
        "name": "in", "address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": 15000}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {"@type": HCM, "stat_prefix": "in",
                             "rds": {"route_config_name": "r",
                                     "config_source": {"ads": {},
                                                       "resource_api_version": "V3"}},
                             "http_filters": [{"name": "envoy.filters.http.router",
                                               "typed_config": {"@type": ROUTER}}]}}]}]}]
    b["static_resources"]["clusters"].append({
        "name": "e", "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"service_name": "svc", "eds_config": {
            "ads": {}, "resource_api_version": "V3"}}})
    return b


def state_with_route_and_assignment() -> State:
    rc = json_format.MessageToDict(route_config("r", [to_cluster("/", "e")]),
                                   preserving_proto_field_name=True)
    la = json_format.MessageToDict(assignment("svc", 8001, 8002),
                                   preserving_proto_field_name=True)
    return State().with_update(ROUTE, {"r": rc}).with_update(ENDPOINT, {"svc": la})


@pytest.mark.parametrize("spelling", ["proto", "json"])
def test_static_rds_listener_and_eds_cluster(spelling):
    b = static_on_ads()
    if spelling == "json":
        b = camel(b)
        assert "staticResources" in b and "filterChains" in str(b)
    before = compose(b, State())
    assert before.warming == ["in"]                     # its route configuration: not yet
    assert before.wanted == {ROUTE: {"r"}, ENDPOINT: {"svc"}, SECRET: set()}
    assert translate_composed(before.document, "x").listeners == ()
    after = compose(b, state_with_route_and_assignment())
    assert after.warming == []
    cfg = translate_composed(after.document, "x")
    assert [lst.name for lst in cfg.listeners] == ["in"]
    assert cfg.clusters["e"].endpoints == (Address("127.0.0.1", 8001),
                                           Address("127.0.0.1", 8002))
    table = cfg.route_tables[cfg.listeners[0].route_table]
    assert table.virtual_hosts[0].routes[0].cluster == "e"


def test_a_listener_that_is_not_a_mapping_is_refused_not_composed_away():
    b = static_on_ads()
    b["static_resources"]["listeners"].append("oops")
    with pytest.raises(Exception) as e:
        translate_composed(compose(b, state_with_route_and_assignment()).document, "x")
    assert re.search(r"listeners\[1\]: expected a mapping", str(e.value.errors))
