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
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TYPES = (LISTENER, CLUSTER, ROUTE, ENDPOINT, SECRET)
# LDS and CDS answers are the whole set (a resource left out is removed); RDS and EDS answers
# carry the resources asked for
WHOLE_SET = (LISTENER, CLUSTER)
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


@dataclass
class State:
    """The dynamic resources accepted so far, by type, then by name."""
    resources: dict = field(default_factory=lambda: {t: {} for t in TYPES})

    def __post_init__(self):
        for t in TYPES:                 # (a previous generation's may lack newer types)
            self.resources.setdefault(t, {})

    def with_update(self, type_url: str, update: dict) -> "State":
        new = State({t: dict(v) for t, v in self.resources.items()})
        if type_url in WHOLE_SET:
            new.resources[type_url] = dict(update)
        else:
            new.resources[type_url].update(update)
        return new


def _get(d, name: str, default=None):
    """A field by its proto name or its JSON (lowerCamelCase) name: a bootstrap file may use
    either, as Envoy reads both. Anything that is not a mapping has no fields."""
    if not isinstance(d, dict):
        return default
    if name in d:
        return d[name]
    camel = _CAMEL.get(name)
    if camel is None:
        head, *rest = name.split("_")
        camel = _CAMEL[name] = head + "".join(w[:1].upper() + w[1:] for w in rest)
    return d.get(camel, default)


def _key(d: dict, name: str) -> str:
    """The key ``name`` is spelled with in ``d`` (the proto name when absent)."""
    if name in d or _get(d, name, _ABSENT) is _ABSENT:
        return name
    return _CAMEL[name]


_CAMEL: dict = {}
_ABSENT = object()


def _items(d, name: str):
    v = _get(d, name)
    return v if isinstance(v, list) else ()


def _hcm_configs(listener: dict):
    for fc in _items(listener, "filter_chains"):
        for flt in _items(fc, "filters"):
            tc = _get(flt, "typed_config")
            if isinstance(tc, dict) and str(tc.get("@type", "")).endswith(HCM):
                yield tc


def _rds_refs(listener: dict):
    for tc in _hcm_configs(listener):
        name = _get(tc.get("rds"), "route_config_name")
        if isinstance(name, str):       # else the translator says what is wrong
            yield name, tc


def _route_clusters(route_config: dict):
    for vh in _items(route_config, "virtual_hosts"):
        for r in _items(vh, "routes"):
            action = _get(r, "route") or {}
            if isinstance(_get(action, "cluster"), str):
                yield _get(action, "cluster")
            for wc in _items(_get(action, "weighted_clusters"), "clusters"):
                if isinstance(_get(wc, "name"), str):
                    yield _get(wc, "name")
            for mp in _items(action, "request_mirror_policies"):
                if isinstance(_get(mp, "cluster"), str):
                    yield _get(mp, "cluster")


def _tcp_clusters(listener: dict):
    for fc in _items(listener, "filter_chains"):
        for flt in _items(fc, "filters"):
            tc = _get(flt, "typed_config")
            if isinstance(tc, dict) and str(tc.get("@type", "")).endswith(TCP_PROXY) \
                    and isinstance(tc.get("cluster"), str):
                yield tc["cluster"]


def _tls_contexts(transport_socket):
    """The common_tls_context of a TLS transport socket (Downstream or UpstreamTlsContext)."""
    tc = _get(transport_socket, "typed_config")
    cm = _get(tc, "common_tls_context")
    return cm if isinstance(cm, dict) else None


def _transport_sockets(resource: dict):
    """A listener's filter chains' transport sockets, or a cluster's own."""
    ts = _get(resource, "transport_socket")
    if isinstance(ts, dict):
        yield ts
    for fc in _items(resource, "filter_chains"):
        ts = _get(fc, "transport_socket")
        if isinstance(ts, dict):
            yield ts


def _over_ads(sc) -> bool:
    return isinstance(_get(sc, "sds_config"), dict) and "ads" in _get(sc, "sds_config")


def _sds_refs(cm: dict):
    """(where, config) of each SDS-over-ADS secret a common_tls_context names: its
    certificates, its validation context (alone or combined with a default one)."""
    for sc in _items(cm, "tls_certificate_sds_secret_configs"):
        if _over_ads(sc):
            yield "certificate", sc
    sc = _get(cm, "validation_context_sds_secret_config")
    if _over_ads(sc):
        yield "validation", sc
    sc = _get(_get(cm, "combined_validation_context"), "validation_context_sds_secret_config")
    if _over_ads(sc):
        yield "combined", sc


def _secret_names(resource: dict) -> set:
    return {_get(sc, "name") for ts in _transport_sockets(resource)
            if (cm := _tls_contexts(ts)) is not None for _, sc in _sds_refs(cm)
            if isinstance(_get(sc, "name"), str)}


def _with_secrets(resource: dict, secrets: dict) -> dict:
    """A copy of the listener or cluster with each SDS-over-ADS reference replaced by the
    secret the control plane sent: a certificate becomes `tls_certificates` (inline PEM), a
    validation context `validation_context` (a combined one: the default merged with the
    secret's, lists joined, as Envoy merges them)."""
    resource = copy.deepcopy(resource)
    for ts in _transport_sockets(resource):
        cm = _tls_contexts(ts)
        if cm is None:
            continue
        refs = list(_sds_refs(cm))
        certs = [secrets[_get(sc, "name")].get("tls_certificate") or {}
                 for kind, sc in refs if kind == "certificate"]
        if certs:
            key = _key(cm, "tls_certificate_sds_secret_configs")
            left = [sc for sc in cm[key] if not _over_ads(sc)]
            if left:
                cm[key] = left
            else:
                del cm[key]
            cm[_key(cm, "tls_certificates")] = list(_items(cm, "tls_certificates")) + certs
        for kind, sc in refs:
            vc = secrets[_get(sc, "name")].get("validation_context") or {}
            if kind == "validation":
                del cm[_key(cm, "validation_context_sds_secret_config")]
                cm[_key(cm, "validation_context")] = vc
            elif kind == "combined":
                ck = _key(cm, "combined_validation_context")
                merged = dict(_get(cm[ck], "default_validation_context") or {})
                for k, v in vc.items():
                    merged[k] = list(merged.get(k) or []) + v if isinstance(v, list) else v
                del cm[ck]
                cm[_key(cm, "validation_context")] = merged
    return resource


def _is_eds(cluster: dict) -> bool:
    return _get(cluster, "type") == "EDS"


def _eds_name(cluster: dict) -> str:
    return _get(_get(cluster, "eds_cluster_config"), "service_name") or cluster.get("name")


def compose(static: dict, state: State) -> "Composed":
    """The bootstrap-shaped document for the file's static resources and the dynamic ones
    accepted so far (static first, as in the file), with what it still needs from the
    control plane. Static listeners and clusters may use RDS and EDS over the same stream."""
    doc = dict(static)          # dynamic_resources kept: it names the control plane's cluster
    sr = copy.deepcopy(_get(static, "static_resources") or {})
    if not isinstance(sr, dict):
        return Composed(doc, {}, [], {ROUTE: set(), ENDPOINT: set(), SECRET: set()})
    listeners = list(_items(sr, "listeners"))
    clusters = list(_items(sr, "clusters"))
    origins: dict = {}
    routes, assignments = state.resources[ROUTE], state.resources[ENDPOINT]
    wanted_eds: set = set()
    eds_users: dict = {}
    secrets = state.resources[SECRET]
    wanted_secrets: set = set()
    for i, c in enumerate(clusters):
        needs = _secret_names(c) if isinstance(c, dict) and _get(
            static, "dynamic_resources") else ()
        if needs:
            # a static cluster's secrets over the same stream: in place once they are all
            # here (until then the translator says what it lacks)
            wanted_secrets |= needs
            if all(n in secrets for n in needs):
                c = clusters[i] = _with_secrets(c, secrets)
        if isinstance(c, dict) and _is_eds(c) and _get(static, "dynamic_resources"):
            # a static EDS cluster, fed by the same ADS stream
            wanted_eds.add(_eds_name(c))
            eds_users.setdefault(_eds_name(c), []).append(c)
            clusters[i] = _with_assignment(c, assignments)
    warming = []
    for name, c in sorted(state.resources[CLUSTER].items()):
        # resources are never changed in place: a cluster the control plane resent unchanged
        # is the very object translated last time, so its translation is reused
        needs = _secret_names(c) if isinstance(c, dict) else ()
        if needs:
            wanted_secrets |= needs
            if any(n not in secrets for n in needs):
                warming.append(f"cluster {name}")       # (its secrets first, as Envoy)
                continue
            c = _with_secrets(c, secrets)
        if _is_eds(c):
            wanted_eds.add(_eds_name(c))
            eds_users.setdefault(_eds_name(c), []).append(c)
            # the cluster's endpoints are its load assignment, as EDS last sent it (none yet:
            # no endpoint, so requests get 503 until it comes)
            c = _with_assignment(c, assignments)
        origins[f"static_resources.clusters[{len(clusters)}]"] = f"cluster {name!r}"
        clusters.append(c)
    unchecked_refs: set = set()
    wanted_routes: set = set()
    static_listeners, listeners = listeners, []
    dynamic = [(None, lst) for lst in static_listeners] + sorted(
        state.resources[LISTENER].items())
    for name, lst in dynamic:
        if not isinstance(lst, dict):
            listeners.append(lst)           # the translator says what is wrong with it
            continue
        needs = _secret_names(lst) if name is not None or _get(static,
                                                                "dynamic_resources") else ()
        wanted_secrets |= set(needs)
        lst = _with_secrets(lst, secrets) if needs and all(n in secrets for n in needs) \
            else copy.deepcopy(lst)
        refs = list(_rds_refs(lst))
        wanted_routes.update(rc for rc, _ in refs)
        if any(rc not in routes for rc, _ in refs) or any(n not in secrets for n in needs):
            warming.append(name or lst.get("name"))
            continue
        for rc, tc in refs:
            del tc["rds"]
            tc[_key(tc, "route_config")] = routes[rc]      # read only, never changed
            unchecked_refs.update(_route_clusters(tc["route_config"]))
        if name is not None:
            unchecked_refs.update(_tcp_clusters(lst))
            origins[f"static_resources.listeners[{len(listeners)}]"] = f"listener {name!r}"
        listeners.append(lst)
    # Envoy does not check the clusters an RDS route configuration or a tcp_proxy names: a
    # cluster that does not exist (yet) answers 503 / closes the connection at request time.
    # Such a name gets a cluster without endpoints, which behaves the same way here.
    known = {c.get("name") for c in clusters if isinstance(c, dict)}
    for name in sorted(unchecked_refs - known):
        clusters.append({"name": name, "type": "STATIC", "connect_timeout": "5s",
                         "load_assignment": {"cluster_name": name}})
    sr[_key(sr, "listeners")], sr[_key(sr, "clusters")] = listeners, clusters
    doc[_key(static, "static_resources")] = sr
    # only what this composition used stays cached (bounded by the config's size)
    _VIEWS.clear()
    _VIEWS.update(_VIEWS_NEXT)
    _VIEWS_NEXT.clear()
    return Composed(doc, origins, warming, {ROUTE: wanted_routes, ENDPOINT: wanted_eds,
                                            SECRET: wanted_secrets}, eds_users)


@dataclass
class Composed:
    document: dict          # bootstrap-shaped: what the translator reads
    origins: dict           # composed path prefix -> "kind 'name'" of the resource sent
    warming: list           # listeners (and clusters) waiting for their route
                            # configuration or their secrets
    wanted: dict            # ROUTE / ENDPOINT / SECRET -> the names to subscribe to
    eds_users: dict = field(default_factory=dict)   # EDS name -> the clusters it feeds


def _view(c: dict, a: dict | None) -> dict:
    view = dict(c)
    view[_key(c, "type")] = "STATIC"
    view.pop("eds_cluster_config", None)
    view.pop("edsClusterConfig", None)
    view[_key(c, "load_assignment")] = a if a is not None else {"cluster_name": _eds_name(c)}
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
