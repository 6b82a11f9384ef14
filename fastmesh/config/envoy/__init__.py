"""Envoy v3 bootstrap -> the typed model (``fastmesh.config.model``).

    looks_like_bootstrap(data) -> bool       # is this parsed document an Envoy bootstrap?
    load_bootstrap(data, source) -> Config   # translate it, or raise ConfigError

A bootstrap that Envoy accepts either means the same in fastmesh or is refused with an error
naming the path of the field in the file (``static_resources.clusters[0].type: ...``). Every
problem is reported, not just the first. The translation works on plain data (YAML or JSON,
proto or JSON field names), resource by resource: ``listener``, ``route``, ``cluster``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..load import ConfigError, load_dict, to_dict
from ..model import Admin, Config
from ._common import NOT_YET, EnvoyChecker, _show, snake
from .cluster import translate_cluster
from .compose import State, compose
from .dynamic import ads_cluster_name, translate_dynamic
from .listener import translate_listener

__all__ = ["looks_like_bootstrap", "load_bootstrap", "translate_composed"]

# top-level Bootstrap fields; "admin" is shared with the native format
_BOOTSTRAP_ONLY = {
    "node", "static_resources", "dynamic_resources", "cluster_manager", "hds_config",
    "flags_path", "stats_sinks", "stats_config", "stats_flush_interval", "stats_flush_on_admin",
    "watchdog", "watchdogs", "tracing", "layered_runtime", "overload_manager",
    "enable_dispatcher_stats", "header_prefix", "stats_server_version_override",
    "use_tcp_for_dns_lookups", "dns_resolution_config", "typed_dns_resolver_config",
    "bootstrap_extensions", "fatal_actions", "config_sources", "default_config_source",
    "default_socket_interface", "certificate_provider_instances", "inline_headers",
    "perf_tracing_file_path", "default_regex_engine", "xds_delegate_extension",
    "xds_config_tracker_extension", "listener_manager", "application_log_config",
    "grpc_async_client_manager_config", "memory_allocator_manager",
}
_ADS = "ADS/xDS: " + NOT_YET
_TOP_FIELDS: dict = {
    "node": None, "static_resources": None, "admin": None, "layered_runtime": None,
    "overload_manager": None, "cluster_manager": None,
    "stats_config": None, "stats_sinks": None, "stats_flush_interval": None,
    "stats_flush_on_admin": None, "stats_server_version_override": None,
    "dynamic_resources": None,
    "config_sources": _ADS, "default_config_source": _ADS, "hds_config": _ADS,
}


def looks_like_bootstrap(data: Any) -> bool:
    """True for a mapping with an Envoy-only top-level field (either spelling), or whose
    ``admin.address`` is an Envoy address mapping rather than a "host:port" string."""
    if not isinstance(data, dict):
        return False
    if any(isinstance(k, str) and snake(k) in _BOOTSTRAP_ONLY for k in data):
        return True
    admin = data.get("admin")
    return isinstance(admin, dict) and isinstance(admin.get("address"), dict)


def load_bootstrap(data: Any, source: str = "<string>") -> Config:
    """A bootstrap file -> the model. With ``dynamic_resources``, the static resources are
    taken as they stand before the control plane's first answer: EDS clusters without
    endpoints yet, listeners waiting for their RDS route configuration left out (warming)."""
    if isinstance(data, dict) and any(isinstance(k, str) and snake(k) == "dynamic_resources"
                                      for k in data):
        cfg = translate_composed(compose(data, State()).document, source)
        if cfg.xds is not None:
            # the control plane's updates are composed with the file as written
            cfg = dataclasses.replace(cfg, xds=dataclasses.replace(cfg.xds, document=data))
        return cfg
    return translate_composed(data, source)


def translate_composed(data: Any, source: str = "<string>",
                       reuse_translations: bool = False) -> Config:
    """The translation proper, of a document whose RDS and EDS references have been filled
    in (``compose``). ``reuse_translations``: for the control plane's compositions, whose
    resources are never changed in place, a cluster object translated before is not
    translated again (see ``translate_cluster_cached``)."""
    c = EnvoyChecker()
    top = c.message(data, "", {**_TOP_FIELDS, **{k: f"{k}: {NOT_YET}" for k in _BOOTSTRAP_ONLY
                                                  if k not in _TOP_FIELDS}})
    if top is None:
        raise ConfigError(c.errors, source)
    admin = _admin(c, top)
    _ignored(c, top)

    listeners: list = []
    tables: dict = {}
    clusters: dict = {}
    checked: dict = {}          # clusters whose earlier translation (and check) is reused
    if "static_resources" in top:
        sr = c.message(top.get("static_resources"), top.p("static_resources"), {
            "listeners": None, "clusters": None,
            "secrets": "secrets (TLS): a separate issue: " + NOT_YET})
        if sr is not None:
            raw_clusters = sr.get("clusters", [])
            known = None
            if isinstance(raw_clusters, list):
                known = set()
                for item in raw_clusters:
                    if isinstance(item, dict) and isinstance(item.get("name"), str):
                        known.add(item["name"])
            names: dict = {}
            ads_cluster = ads_cluster_name(top) if "dynamic_resources" in top else None
            fresh: dict = {}
            for i, item in enumerate(c.seq(raw_clusters, sr.p("clusters"))):
                if isinstance(item, dict) and ads_cluster and item.get("name") == ads_cluster:
                    continue        # the control plane's cluster: where ADS goes, not data
                if reuse_translations:
                    cl, reused = translate_cluster_cached(
                        c, item, f"{sr.p('clusters')}[{i}]", names, fresh)
                else:
                    cl, reused = translate_cluster(c, item, f"{sr.p('clusters')}[{i}]",
                                                   names), False
                if cl is not None and cl.name is not None and cl.name not in clusters:
                    clusters[cl.name] = cl
                    if reused:
                        checked[cl.name] = cl
            if reuse_translations and isinstance(raw_clusters, list):
                # only what this document holds stays cached (bounded by its size)
                _CLUSTERS.clear()
                _CLUSTERS.update(fresh)
            lnames: dict = {}
            addrs: dict = {}
            if admin is not None and admin.address is not None and admin.address.port:
                addrs[(admin.address.host, admin.address.port)] = "admin"
            lp = sr.p("listeners")
            for i, item in enumerate(c.seq(sr.get("listeners", []), lp)):
                p = f"{lp}[{i}]"
                lst, chain_tables = translate_listener(c, item, p, i, lnames, known,
                                                       set(tables))
                for table in chain_tables:
                    tables[table.name] = table
                if lst is None:
                    continue
                if lst.address is not None and lst.address.port:
                    key = (lst.address.host.lower(), lst.address.port)
                    if key in addrs:
                        c.err(f"{p}.address", f"{str(lst.address)!r} is already used by "
                                              f"{addrs[key]}")
                    addrs.setdefault(key, p)
                listeners.append(lst)
    node = top.get("node") if "node" in top else None
    if any(t is not None and t.sds_path for lst in listeners
           for t in [lst.tls] + [ch.tls for ch in lst.filter_chains]) and not (
            isinstance(node, dict) and node.get("id") and node.get("cluster")):
        c.err("node", "id and cluster are required when secrets come from SDS (Envoy's "
                      "TlsCertificateSdsApi refuses the bootstrap without them)")
    xds = None
    if "dynamic_resources" in top:
        sr_raw = top.get("static_resources") if "static_resources" in top else {}
        xds = translate_dynamic(c, top, (sr_raw or {}).get("clusters") if isinstance(
            sr_raw, dict) else None, data)
    if c.errors:
        raise ConfigError(c.errors, source)
    cfg = Config(admin=admin, listeners=tuple(listeners), route_tables=tables,
                 clusters=clusters, source=source, xds=xds)
    # Belt and braces: the model's own invariants, checked by the native loader. A problem
    # found only here is a gap in this translator; it is still reported, never ignored.
    # (Clusters whose translation is reused were checked so when they were first made.)
    try:
        load_dict(to_dict(cfg, except_clusters=checked.keys()), source, clusters=checked)
    except ConfigError as e:
        raise ConfigError([f"(as translated) {err}" for err in e.errors], source) from None
    return cfg


_CLUSTERS: dict = {}    # name -> (cluster data, its model): clean translations


def translate_cluster_cached(c: EnvoyChecker, item, path: str, names: dict,
                             fresh: dict | None = None) -> tuple:
    """-> (the cluster's model or None, whether an earlier translation was reused).

    A control plane resends every cluster with each update; one whose data is the very
    object translated before (it is never changed in place) translated cleanly then, and does
    again. Only its name still has to be unique among this document's clusters. A clean
    translation is remembered in ``fresh`` (a full translation's new cache) or, without it,
    in the cache itself (one cluster translated between full passes: an EDS update)."""
    name = item.get("name") if isinstance(item, dict) else None
    hit = _CLUSTERS.get(name) if isinstance(name, str) else None
    into = _CLUSTERS if fresh is None else fresh
    if hit is not None and hit[0] is item:
        model = hit[1]
        c.unique_name(model.name, f"{path}.name", "cluster", names)
        into[name] = hit
        return model, True
    before = (len(c.errors), len(c.notes))
    model = translate_cluster(c, item, path, names)
    if model is not None and isinstance(name, str) and (len(c.errors), len(c.notes)) == before:
        into[name] = (item, model)
    return model, False


def _admin(c: EnvoyChecker, top) -> Any:
    """No ``admin`` (or no address): Envoy runs without an admin API, and so does fastmesh."""
    if "admin" not in top:
        return None
    m = c.message(top.get("admin"), top.p("admin"), {
        "address": None,
        "access_log_path": None, "access_log": None, "profile_path": None,  # ignored
        "socket_options": "socket options: " + NOT_YET,
        "ignore_global_conn_limit": "ignore_global_conn_limit: " + NOT_YET})
    if m is None or "address" not in m:
        return None
    a = c.socket_address(m.get("address"), m.p("address"), min_port=0)
    return Admin(a) if a is not None else None


def _ignored(c: EnvoyChecker, top) -> None:
    """Sections accepted without effect, checked only as far as they could route."""
    if "node" in top and not isinstance(top.get("node"), dict):
        c.err(top.p("node"), f"expected a mapping, got {_show(top.get('node'))}")
    if "layered_runtime" in top:
        lr = c.message(top.get("layered_runtime"), top.p("layered_runtime"), {"layers": None})
        for i, layer in enumerate(c.seq(lr.get("layers", []), lr.p("layers")) if lr else ()):
            lp = f"{lr.p('layers')}[{i}]"
            m = c.message(layer, lp, {
                "name": None, "admin_layer": None, "static_layer": None,
                "disk_layer": "disk runtime layers (may change behaviour): " + NOT_YET,
                "rtds_layer": "RTDS needs ADS: " + NOT_YET})
            if m is not None and m.get("static_layer"):
                c.err(m.p("static_layer"), "runtime values (may change behaviour): " + NOT_YET
                      + " (an empty static_layer is accepted)")
    if "overload_manager" in top:
        om = top.get("overload_manager")
        if isinstance(om, dict) and any(snake(k) == "actions" and v for k, v in om.items()):
            c.err(top.p("overload_manager"), "overload actions (they shed or refuse traffic): "
                                             + NOT_YET)
        elif not isinstance(om, dict):
            c.err(top.p("overload_manager"), f"expected a mapping, got {_show(om)}")
    if "cluster_manager" in top:
        cm = top.get("cluster_manager")
        if not isinstance(cm, dict) or cm:
            c.err(top.p("cluster_manager"), "cluster_manager settings (local cluster, "
                                            "upstream bind address, ...): " + NOT_YET
                                            + " (an empty mapping is accepted)")

