"""xDS resources as plain data.

An xDS resource arrives as a protobuf ``Any``; it is turned into the same plain data a
bootstrap file holds (proto field names, enums by name, durations as "1.5s"), so one
translator (``fastmesh.config.envoy``) serves the bootstrap file and the control plane alike;
``fastmesh.config.envoy.compose`` puts the two together.
"""
from __future__ import annotations

from google.protobuf import json_format

# importing the message modules registers every type an xDS resource may carry in an Any
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
# a cluster's HTTP/2 protocol options (Istio sends them): readable, so the translator can say
# what it refuses, rather than the resource being undecodable
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from udpa.type.v1 import typed_struct_pb2 as _udpa_typed_struct  # noqa: F401
from xds.type.v3 import typed_struct_pb2 as _xds_typed_struct  # noqa: F401

from fastmesh.config.envoy.compose import (  # noqa: F401  (one place for these names)
    CLUSTER, ENDPOINT, LISTENER, ROUTE, WHOLE_SET, Composed, State, compose, name_origin,
    with_assignment)

# what each type is called in logs and errors, its message class, and the field naming it
KINDS = {
    LISTENER: ("listener", listener_pb2.Listener, "name"),
    CLUSTER: ("cluster", cluster_pb2.Cluster, "name"),
    ROUTE: ("route configuration", route_pb2.RouteConfiguration, "name"),
    ENDPOINT: ("cluster load assignment", endpoint_pb2.ClusterLoadAssignment, "cluster_name"),
}


class ResourceError(ValueError):
    pass


def decode(type_url: str, any_msg) -> tuple[str, dict]:
    """One resource of a DiscoveryResponse -> (its name, its plain data)."""
    kind, cls, name_field = KINDS[type_url]
    if any_msg.type_url != type_url:
        raise ResourceError(f"a {kind} response carries a {any_msg.type_url}")
    msg = cls()
    if not any_msg.Unpack(msg):
        raise ResourceError(f"undecodable {kind}")
    try:
        data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    except (TypeError, KeyError, ValueError, json_format.Error) as exc:
        # a typed_config of a type this build does not know cannot be read, so it is refused
        raise ResourceError(f"{kind} {getattr(msg, name_field)!r}: {exc}") from exc
    name = getattr(msg, name_field)
    if not name:
        raise ResourceError(f"a {kind} without a {name_field}")
    return name, data
