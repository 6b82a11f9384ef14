"""``dynamic_resources``: listeners and clusters from a control plane over ADS.

Supported: ``ads_config`` (api_type GRPC, transport V3, one ``envoy_grpc`` service naming a
static cluster, its ``retry_policy.retry_back_off``), ``lds_config`` and ``cds_config`` as
``{ads: {}}``. The control-plane cluster itself is not a data cluster: its first endpoint is
where the ADS stream goes (plaintext gRPC: TLS to the control plane is the TLS issue's).
Refused, each with its path: REST or non-aggregated config sources, delta xDS, Google gRPC,
xdstp locators.
"""
from __future__ import annotations

from typing import Any, Optional

from ..model import Xds
from ._common import NOT_YET, EnvoyChecker

_SOURCE_FIELDS = {
    "ads": None, "resource_api_version": None, "initial_fetch_timeout": None,
    "path": "file-based config sources: " + NOT_YET,
    "path_config_source": "file-based config sources: " + NOT_YET,
    "api_config_source": "non-aggregated config sources: " + NOT_YET + " (use ads: {})",
    "self": "self config sources: " + NOT_YET,
    "authorities": "xDS authorities: " + NOT_YET,
}


def ads_cluster_name(top) -> Optional[str]:
    """The static cluster the ADS stream goes to (not a data cluster), if any."""
    dr = top.get("dynamic_resources") if top is not None else None
    try:
        return dr["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"]
    except (KeyError, IndexError, TypeError):
        try:
            return dr["adsConfig"]["grpcServices"][0]["envoyGrpc"]["clusterName"]
        except (KeyError, IndexError, TypeError):
            return None


def translate_dynamic(c: EnvoyChecker, top, static_clusters: Any, document: dict) -> \
        Optional[Xds]:
    dr = c.message(top.get("dynamic_resources"), top.p("dynamic_resources"), {
        "ads_config": None, "lds_config": None, "cds_config": None,
        "lds_resources_locator": "xdstp resource locators: " + NOT_YET,
        "cds_resources_locator": "xdstp resource locators: " + NOT_YET,
    })
    if dr is None:
        return None
    if "ads_config" not in dr:
        c.err(dr.p("ads_config"), "missing: fastmesh takes dynamic resources over ADS "
                                  "only (" + NOT_YET + " for other config sources)")
        return None
    ads = c.message(dr.get("ads_config"), dr.p("ads_config"), {
        "api_type": None, "transport_api_version": None, "grpc_services": None,
        "set_node_on_first_message_only": None, "request_timeout": None,
        "rate_limit_settings": None,
        "cluster_names": "REST config sources: " + NOT_YET,
        "refresh_delay": "REST config sources: " + NOT_YET,
        "config_validators": "config validators: " + NOT_YET,
    })
    if ads is None:
        return None
    api = c.enum(ads.get("api_type", "GRPC"), ads.p("api_type"),
                 {"DEPRECATED_AND_UNAVAILABLE_DO_NOT_USE": 0, "REST": 1, "GRPC": 2,
                  "DELTA_GRPC": 3, "AGGREGATED_GRPC": 5, "AGGREGATED_DELTA_GRPC": 6},
                 "api_type")
    if api is not None and api not in ("GRPC", "AGGREGATED_GRPC"):
        c.err(ads.p("api_type"), f"{api}: " + NOT_YET + " (state-of-the-world GRPC only)")
    _api_version(c, ads, "transport_api_version")
    services = ads.get("grpc_services")
    if not isinstance(services, list) or len(services) != 1:
        c.err(ads.p("grpc_services"), "expected exactly one gRPC service")
        return None
    sp = f"{ads.p('grpc_services')}[0]"
    svc = c.message(services[0], sp, {
        "envoy_grpc": None, "timeout": None, "initial_metadata": None,
        "retry_policy": None,
        "google_grpc": "Google gRPC clients: " + NOT_YET + " (use envoy_grpc)"})
    if svc is None or "envoy_grpc" not in svc:
        if svc is not None and "google_grpc" not in svc:
            c.err(svc.p("envoy_grpc"), "missing required field")
        return None
    eg = c.message(svc.get("envoy_grpc"), svc.p("envoy_grpc"), {
        "cluster_name": None, "authority": None, "retry_policy": None,
        "max_receive_message_length": None, "skip_envoy_headers": None})
    if eg is None:
        return None
    cluster = c.text(c.need(eg, "cluster_name"), eg.p("cluster_name"))
    base_ms, max_ms = 500, 30000                      # Envoy's defaults
    rp = eg.get("retry_policy") if "retry_policy" in eg else None
    if rp is not None:
        rpm = c.message(rp, eg.p("retry_policy"), {"retry_back_off": None,
                                                   "num_retries": None})
        if rpm is not None and "retry_back_off" in rpm:
            bo = c.message(rpm.get("retry_back_off"), rpm.p("retry_back_off"),
                           {"base_interval": None, "max_interval": None})
            if bo is not None:
                b = c.duration_ms(c.need(bo, "base_interval"), bo.p("base_interval"))
                base_ms = b if b else base_ms
                max_ms = (c.duration_ms(bo.get("max_interval"), bo.p("max_interval"))
                          if "max_interval" in bo else base_ms * 10) or max_ms
                if max_ms < base_ms:
                    c.err(bo.p("max_interval"), "must not be less than base_interval")
    for key in ("lds_config", "cds_config"):
        if key in dr:
            src = c.message(dr.get(key), dr.p(key), _SOURCE_FIELDS)
            if src is not None:
                if "ads" not in src:
                    c.err(src.p("ads"), "missing: only {ads: {}} is supported")
                _api_version(c, src, "resource_api_version")
    server = _endpoint_of(c, static_clusters, cluster, eg.p("cluster_name"))
    if server is None:
        return None
    node = top.get("node") if "node" in top else {}
    return Xds(cluster=cluster, server=server, retry_base_ms=base_ms, retry_max_ms=max_ms,
               lds="lds_config" in dr, cds="cds_config" in dr,
               node=dict(node) if isinstance(node, dict) else {}, document=document)


def _api_version(c: EnvoyChecker, m, field: str) -> None:
    if field in m:
        v = c.enum(m.get(field), m.p(field), {"AUTO": 0, "V2": 1, "V3": 2}, field)
        if v == "V2":
            c.err(m.p(field), "xDS v2 was removed from Envoy; use V3")


def _endpoint_of(c: EnvoyChecker, clusters: Any, name: Optional[str], path: str) -> \
        Optional[str]:
    """The control plane's address: the first endpoint of the static cluster `name`."""
    if name is None:
        return None
    for item in clusters if isinstance(clusters, list) else ():
        if isinstance(item, dict) and item.get("name") == name:
            try:
                la = item.get("load_assignment") or item.get("loadAssignment")
                ep = (la.get("endpoints") or [])[0]
                lb = (ep.get("lb_endpoints") or ep.get("lbEndpoints"))[0]
                sa = lb["endpoint"]["address"]
                sa = sa.get("socket_address") or sa.get("socketAddress")
                host, port = sa["address"], sa.get("port_value", sa.get("portValue"))
            except (AttributeError, IndexError, KeyError, TypeError):
                c.err(path, f"cluster {name!r} has no endpoint address to reach the control "
                            f"plane at")
                return None
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    c.err(path, f"no static cluster named {name!r}")
    return None
