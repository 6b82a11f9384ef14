"""Where each endpoint came from, for /clusters and /config_dump: ``file`` (an IP literal in
the config), ``dns`` (a hostname, resolved), ``xds`` (a control plane's CDS/EDS) or
``registry`` (ZooKeeper providers, with their URL attributes)."""
from __future__ import annotations

from fastmesh.cluster import _is_ip

SOURCES = ("file", "dns", "xds", "registry")


def _static_non_eds(sup) -> set:
    """Clusters an Envoy bootstrap defines with their endpoints in the file."""
    doc = sup.xds.static if sup.xds is not None else None
    out = set()
    for c in ((doc or {}).get("static_resources") or {}).get("clusters") or ():
        if isinstance(c, dict) and c.get("type") != "EDS" and "eds_cluster_config" not in c:
            out.add(c.get("name"))
    return out


def cluster_source(sup, name: str, cluster) -> str:
    if cluster is not None and cluster.discovery is not None:
        return "registry"
    if sup.xds is not None and name not in _static_non_eds(sup):
        return "xds"
    return "file"


def _endpoint_source(cluster_src: str, origin: str) -> str:
    if cluster_src == "file":
        host = origin.rsplit(":", 1)[0].strip("[]")
        return "file" if _is_ip(host) else "dns"
    return cluster_src


def annotate_clusters(sup, info: dict) -> None:
    """A worker's /clusters answer (cluster -> [endpoint dicts]), in place: each endpoint
    gets "source", and a registry's provider its weight, protocol and URL attributes."""
    for name, eps in info.items():
        cl = sup.cfg.clusters.get(name)
        src = cluster_source(sup, name, cl)
        providers = sup.registry.cluster_endpoints(name) \
            if src == "registry" and sup.registry is not None else {}
        for e in eps if isinstance(eps, list) else ():
            e["source"] = _endpoint_source(src, e.get("origin") or e.get("address", ""))
            p = providers.get(e.get("address"))
            if p is not None:
                e["registry"] = p


def endpoint_sources(sup) -> dict:
    """cluster -> {"source", "endpoints": [{"address", "source", ...}]} for /config_dump."""
    out = {}
    for name, cl in sup.cfg.clusters.items():
        src = cluster_source(sup, name, cl)
        providers = sup.registry.cluster_endpoints(name) \
            if src == "registry" and sup.registry is not None else {}
        eps = []
        for i, a in enumerate(cl.endpoints):
            e = {"address": str(a), "source": _endpoint_source(src, str(a)),
                 "weight": cl.weights[i] if cl.weights else 1}
            if str(a) in providers:
                e["registry"] = providers[str(a)]
            eps.append(e)
        entry = {"source": src, "endpoints": eps}
        if cl.discovery is not None:
            z = cl.discovery.zookeeper
            entry["registry"] = {"type": "zookeeper", "servers": z.servers,
                                 "service": z.service, "group": z.group, "root": z.root}
        out[name] = entry
    return out
