"""The configuration a control plane and a bootstrap file make together, as plain data.

``compose(static, state)`` builds the bootstrap-shaped document the translator reads: the
file's static resources, plus the dynamic ones the control plane sent (``State``), with each
listener's RDS route configuration put in place of its ``rds`` reference and each EDS cluster
given its ClusterLoadAssignment as ``load_assignment``. A listener whose route configuration
has not arrived yet is *warming*: left out until it has (as Envoy does), so it never serves a
half-known table. ``origins`` maps each composed path prefix back to the resource it came
from, so a refusal names the resource the control plane sent. No protobuf here: the ADS
client (fastmesh.xds) turns resources into this plain data first.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER, CLUSTER, ROUTE, ENDPOINT)
# LDS and CDS answers are the whole set (a resource left out is removed); RDS and EDS answers
# carry the resources asked for
WHOLE_SET = (LISTENER, CLUSTER)
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


@dataclass
class State:
    """The dynamic resources accepted so far, by type, then by name."""
    resources: dict = field(default_factory=lambda: {t: {} for t in TYPES})

    def with_update(self, type_url: str, update: dict) -> "State":
        new = State({t: dict(v) for t, v in self.resources.items()})
        if type_url in WHOLE_SET:
            new.resources[type_url] = dict(update)
        else:
            new.resources[type_url].update(update)
        return new


def _hcm_configs(listener: dict):
    for fc in listener.get("filter_chains") or ():
        for flt in fc.get("filters") or ():
            tc = flt.get("typed_config") or {}
            if tc.get("@type", "").endswith(HCM):
                yield tc


def _rds_refs(listener: dict):
    for tc in _hcm_configs(listener):
        rds = tc.get("rds")
        if rds is not None:
            yield rds.get("route_config_name", ""), tc


def _route_clusters(route_config: dict):
    for vh in route_config.get("virtual_hosts") or ():
        for r in vh.get("routes") or ():
            action = r.get("route") or {}
            if isinstance(action.get("cluster"), str):
                yield action["cluster"]
            for wc in (action.get("weighted_clusters") or {}).get("clusters") or ():
                if isinstance(wc.get("name"), str):
                    yield wc["name"]


def _tcp_clusters(listener: dict):
    for fc in listener.get("filter_chains") or ():
        for flt in fc.get("filters") or ():
            tc = flt.get("typed_config") or {}
            if tc.get("@type", "").endswith(TCP_PROXY) and isinstance(tc.get("cluster"), str):
                yield tc["cluster"]


def _is_eds(cluster: dict) -> bool:
    return cluster.get("type") == "EDS"


def _eds_name(cluster: dict) -> str:
    return (cluster.get("eds_cluster_config") or {}).get("service_name") or cluster["name"]


def compose(static: dict, state: State) -> "Composed":
    """The bootstrap-shaped document for the file's static resources and the dynamic ones
    accepted so far (static first, as in the file), with what it still needs from the
    control plane. Static listeners and clusters may use RDS and EDS over the same stream."""
    doc = dict(static)          # dynamic_resources kept: it names the control plane's cluster
    sr = copy.deepcopy(static.get("static_resources") or {})
    listeners = list(sr.get("listeners") or [])
    clusters = list(sr.get("clusters") or [])
    origins: dict = {}
    routes, assignments = state.resources[ROUTE], state.resources[ENDPOINT]
    wanted_eds: set = set()
    eds_users: dict = {}
    for i, c in enumerate(clusters):
        if isinstance(c, dict) and _is_eds(c) and static.get("dynamic_resources"):
            # a static EDS cluster, fed by the same ADS stream
            wanted_eds.add(_eds_name(c))
            eds_users.setdefault(_eds_name(c), []).append(c)
            clusters[i] = _with_assignment(c, assignments)
    for name, c in sorted(state.resources[CLUSTER].items()):
        # resources are never changed in place: a cluster the control plane resent unchanged
        # is the very object translated last time, so its translation is reused
        if _is_eds(c):
            wanted_eds.add(_eds_name(c))
            eds_users.setdefault(_eds_name(c), []).append(c)
            # the cluster's endpoints are its load assignment, as EDS last sent it (none yet:
            # no endpoint, so requests get 503 until it comes)
            c = _with_assignment(c, assignments)
        origins[f"static_resources.clusters[{len(clusters)}]"] = f"cluster {name!r}"
        clusters.append(c)
    warming = []
    unchecked_refs: set = set()
    wanted_routes: set = set()
    static_listeners, listeners = listeners, []
    dynamic = [(None, lst) for lst in static_listeners] + sorted(
        state.resources[LISTENER].items())
    for name, lst in dynamic:
        lst = copy.deepcopy(lst)
        refs = list(_rds_refs(lst))
        wanted_routes.update(rc for rc, _ in refs)
        if any(rc not in routes for rc, _ in refs):
            warming.append(name or lst.get("name"))
            continue
        for rc, tc in refs:
            del tc["rds"]
            tc["route_config"] = routes[rc]        # read only, never changed
            unchecked_refs.update(_route_clusters(tc["route_config"]))
        if name is not None:
            unchecked_refs.update(_tcp_clusters(lst))
            origins[f"static_resources.listeners[{len(listeners)}]"] = f"listener {name!r}"
        listeners.append(lst)
    # Envoy does not check the clusters an RDS route configuration or a tcp_proxy names: a
    # cluster that does not exist (yet) answers 503 / closes the connection at request time.
    # Such a name gets a cluster without endpoints, which behaves the same way here.
    known = {c.get("name") for c in clusters}
    for name in sorted(unchecked_refs - known):
        clusters.append({"name": name, "type": "STATIC", "connect_timeout": "5s",
                         "load_assignment": {"cluster_name": name}})
    sr["listeners"], sr["clusters"] = listeners, clusters
    doc["static_resources"] = sr
    # only what this composition used stays cached (bounded by the config's size)
    _VIEWS.clear()
    _VIEWS.update(_VIEWS_NEXT)
    _VIEWS_NEXT.clear()
    return Composed(doc, origins, warming, {ROUTE: wanted_routes, ENDPOINT: wanted_eds},
                    eds_users)


@dataclass
class Composed:
    document: dict          # bootstrap-shaped: what the translator reads
    origins: dict           # composed path prefix -> "kind 'name'" of the resource sent
    warming: list           # listeners waiting for their route configuration
    wanted: dict            # ROUTE / ENDPOINT -> the names to subscribe to
    eds_users: dict = field(default_factory=dict)   # EDS name -> the clusters it feeds


def _view(c: dict, a: dict | None) -> dict:
    view = dict(c, type="STATIC")
    view.pop("eds_cluster_config", None)
    view["load_assignment"] = a if a is not None else {"cluster_name": _eds_name(c)}
    return view


def _with_assignment(c: dict, assignments: dict) -> dict:
    """An EDS cluster as a static one holding its load assignment, as EDS last sent it (none
    yet: no endpoint, so requests get 503 until it comes). The same cluster and assignment
    objects give the same object back, so an unchanged cluster's translation is reused."""
    name = c.get("name")
    a = assignments.get(_eds_name(c))
    hit = _VIEWS.get(name)
    if hit is None or hit[0] is not c or hit[1] is not a:
        hit = (c, a, _view(c, a))
    _VIEWS_NEXT[name] = hit
    return hit[2]


def eds_view(c: dict, assignments: dict) -> dict:
    """``_with_assignment`` between two compositions (an EDS update applied on its own): the
    view is remembered for the next composition, so the translation made of it now is the
    one the next full pass reuses."""
    name = c.get("name")
    a = assignments.get(_eds_name(c))
    hit = _VIEWS.get(name)
    if hit is None or hit[0] is not c or hit[1] is not a:
        hit = _VIEWS[name] = (c, a, _view(c, a))
    return hit[2]


_VIEWS: dict = {}       # cluster name -> (cluster, assignment, view)
_VIEWS_NEXT: dict = {}  # the views the composition under way uses: they become _VIEWS


def name_origin(error: str, origins: dict) -> str:
    """Rewrite a translator error's path so it names the resource the control plane sent:
    ``static_resources.listeners[3].address...`` -> ``listener 'web': address...``."""
    for prefix in sorted(origins, key=len, reverse=True):
        if error.startswith(prefix):
            rest = error[len(prefix):].lstrip(".")
            return f"{origins[prefix]}: {rest}" if not rest.startswith(":") else \
                f"{origins[prefix]}{rest}"
    return error
