"""Envoy ``config.cluster.v3.Cluster`` (static_resources.clusters[]) -> model ``Cluster``."""
from __future__ import annotations

from typing import Optional

from ..model import Address, Cluster
from ._common import _MISSING, NOT_YET, EnvoyChecker, is_ip, is_ipv4

_TYPES = {"STATIC": 0, "STRICT_DNS": 1, "LOGICAL_DNS": 2, "EDS": 3, "ORIGINAL_DST": 4}
_LB = {"ROUND_ROBIN": 0, "LEAST_REQUEST": 1, "RING_HASH": 2, "RANDOM": 3, "MAGLEV": 5,
       "CLUSTER_PROVIDED": 6, "LOAD_BALANCING_POLICY_CONFIG": 7}
_LB_MODEL = {"ROUND_ROBIN": "round_robin", "RANDOM": "random", "LEAST_REQUEST": "least_request"}

ENVOY_CONNECT_TIMEOUT_MS = 5000        # Cluster.connect_timeout default
ENVOY_DNS_REFRESH_MS = 5000            # Cluster.dns_refresh_rate default
ENVOY_UPSTREAM_IDLE_MS = 3600000       # upstream HTTP idle_timeout default (1 hour)

_OTHER_ISSUE = "a separate issue: " + NOT_YET

_CLUSTER_FIELDS = {
    "name": None, "type": None, "connect_timeout": None, "lb_policy": None,
    "load_assignment": None, "dns_refresh_rate": None, "dns_lookup_family": None,
    "alt_stat_name": None,                         # stats only: ignored
    "health_checks": "active health checking: " + _OTHER_ISSUE,
    "outlier_detection": "outlier detection: " + _OTHER_ISSUE,
    "circuit_breakers": "circuit breakers: " + _OTHER_ISSUE,
    "transport_socket": "upstream TLS / transport sockets: " + _OTHER_ISSUE,
    "transport_socket_matches": "upstream TLS / transport sockets: " + _OTHER_ISSUE,
    "eds_cluster_config": "EDS needs ADS: " + NOT_YET,
    "cluster_type": "custom cluster types: " + NOT_YET,
    "typed_extension_protocol_options": "upstream protocol options: " + NOT_YET,
    "http2_protocol_options": "upstream HTTP/2: " + NOT_YET,
    "common_lb_config": "common_lb_config: " + NOT_YET,
    "load_balancing_policy": "load_balancing_policy: " + NOT_YET,
    "per_connection_buffer_limit_bytes": "per_connection_buffer_limit_bytes: " + NOT_YET,
}

_ENDPOINTS_FIELDS = {"locality": None, "lb_endpoints": None, "load_balancing_weight": None,
                     "priority": None, "proximity": "proximity: " + NOT_YET,
                     "leds_cluster_locality_config": "LEDS: " + NOT_YET}
_LB_ENDPOINT_FIELDS = {"endpoint": None, "load_balancing_weight": None, "health_status": None,
                       "metadata": "endpoint metadata (subset load balancing): " + NOT_YET,
                       "endpoint_name": "named endpoints: " + NOT_YET}
_ENDPOINT_FIELDS = {"address": None, "hostname": None,
                    "health_check_config": "health check settings: " + _OTHER_ISSUE,
                    "additional_addresses": "additional addresses: " + NOT_YET}
_HEALTH = {"UNKNOWN": 0, "HEALTHY": 1, "UNHEALTHY": 2, "DRAINING": 3, "TIMEOUT": 4,
           "DEGRADED": 5}


def translate_cluster(c: EnvoyChecker, raw, path: str, names: dict) -> Optional[Cluster]:
    m = c.message(raw, path, _CLUSTER_FIELDS)
    if m is None:
        return None
    name = c.unique_name(c.need(m, "name"), m.p("name"), "cluster", names)
    kind = "STATIC"
    if "type" in m:
        kind = c.enum(m.get("type"), m.p("type"), _TYPES, "cluster type")
        if kind == "EDS":
            c.err(m.p("type"), "EDS needs ADS (dynamic_resources): " + NOT_YET)
        elif kind == "ORIGINAL_DST":
            c.err(m.p("type"), "ORIGINAL_DST: " + NOT_YET)
    kw: dict = {"name": name, "idle_timeout_ms": ENVOY_UPSTREAM_IDLE_MS,
                "connect_timeout_ms": ENVOY_CONNECT_TIMEOUT_MS}
    if "connect_timeout" in m:
        ms = c.duration_ms(m.get("connect_timeout"), m.p("connect_timeout"))
        if ms == 0:
            c.err(m.p("connect_timeout"), "must be greater than 0s")
        kw["connect_timeout_ms"] = ms
    if "lb_policy" in m:
        lb = c.enum(m.get("lb_policy"), m.p("lb_policy"), _LB, "lb_policy")
        if lb is not None and lb not in _LB_MODEL:
            c.err(m.p("lb_policy"), f"{lb}: {NOT_YET} (supported: {', '.join(_LB_MODEL)})")
        kw["lb_policy"] = _LB_MODEL.get(lb)
    if kind in ("STRICT_DNS", "LOGICAL_DNS"):
        kw["dns_refresh_ms"] = ENVOY_DNS_REFRESH_MS
        if "dns_refresh_rate" in m:
            ms = c.duration_ms(m.get("dns_refresh_rate"), m.p("dns_refresh_rate"))
            if ms is not None and ms < 1:
                c.err(m.p("dns_refresh_rate"), "must be at least 1ms")
            kw["dns_refresh_ms"] = ms
        if kind == "LOGICAL_DNS":
            c.note(m.p("type"), "LOGICAL_DNS: fastmesh resolves the name like STRICT_DNS "
                                "(every address it resolves to is an endpoint)")
    elif "dns_refresh_rate" in m:
        c.err(m.p("dns_refresh_rate"), "only for STRICT_DNS and LOGICAL_DNS clusters")
    if "dns_lookup_family" in m:
        fam = c.enum(m.get("dns_lookup_family"), m.p("dns_lookup_family"),
                     {"AUTO": 0, "V4_ONLY": 1, "V6_ONLY": 2, "V4_PREFERRED": 3, "ALL": 4},
                     "dns_lookup_family")
        if fam is not None and fam != "V4_PREFERRED":
            c.err(m.p("dns_lookup_family"),
                  f"{fam}: {NOT_YET} (fastmesh resolves V4_PREFERRED: IPv4 if any, else IPv6)")
    kw["endpoints"] = _endpoints(c, m, kind)
    return Cluster(**kw)


def _endpoints(c: EnvoyChecker, m, kind: Optional[str]) -> tuple:
    la_raw = m.get("load_assignment", _MISSING)
    if la_raw is _MISSING:
        return ()           # a cluster without endpoints: 503 at request time, as in Envoy
    la = c.message(la_raw, m.p("load_assignment"), {
        "cluster_name": None, "endpoints": None,
        "policy": "load_assignment.policy: " + NOT_YET,
        "named_endpoints": "named endpoints: " + NOT_YET})
    if la is None:
        return ()
    c.text(c.need(la, "cluster_name"), la.p("cluster_name"))     # required by Envoy
    out = []
    weights: dict = {}                    # weight -> path of its first endpoint
    seen: dict = {}
    locs = la.get("endpoints", [])
    for i, loc_raw in enumerate(c.seq(locs, la.p("endpoints"))):
        lp = f"{la.p('endpoints')}[{i}]"
        loc = c.message(loc_raw, lp, _ENDPOINTS_FIELDS)
        if loc is None:
            continue
        if "priority" in loc:
            prio = c.uint(loc.get("priority"), loc.p("priority"))
            if prio:
                c.err(loc.p("priority"), f"priority {prio}: only priority 0 is supported "
                                         f"(failover between priorities: {NOT_YET})")
        if "load_balancing_weight" in loc:      # used only with locality-weighted LB
            c.uint(loc.get("load_balancing_weight"), loc.p("load_balancing_weight"), lo=1)
        lbes = c.need(loc, "lb_endpoints")
        lbes_path = loc.p("lb_endpoints")
        for j, ep_raw in enumerate(() if lbes is _MISSING else c.seq(lbes, lbes_path)):
            ep_path = f"{lbes_path}[{j}]"
            a = _plain_endpoint(ep_raw) if _FAST_PATH else None
            if a is not None:
                # the common shape, read at once (the same result as the full reading below)
                weights.setdefault(1, ep_path)
                key = (a.host, a.port)
                if key in seen:
                    c.err(f"{ep_path}.endpoint.address", f"duplicate endpoint {str(a)!r} "
                                                         f"(also {seen[key]}); {NOT_YET}")
                else:
                    seen[key] = ep_path
                out.append(a)
                continue
            lbe = c.message(ep_raw, ep_path, _LB_ENDPOINT_FIELDS)
            if lbe is None:
                continue
            w = 1
            if "load_balancing_weight" in lbe:
                w = c.uint(lbe.get("load_balancing_weight"), lbe.p("load_balancing_weight"),
                           lo=1)
            if w is not None:
                weights.setdefault(w, lbe.p("load_balancing_weight"))
            if "health_status" in lbe:
                hs = c.enum(lbe.get("health_status"), lbe.p("health_status"), _HEALTH,
                            "health_status")
                if hs not in (None, "UNKNOWN", "HEALTHY"):
                    c.err(lbe.p("health_status"), f"{hs}: endpoints that are not routable "
                                                  f"are {NOT_YET}")
            ep_m = c.need(lbe, "endpoint")
            ep = None if ep_m is _MISSING else c.message(ep_m, lbe.p("endpoint"), _ENDPOINT_FIELDS)
            if ep is None:
                continue
            if "hostname" in ep:                 # informational (auto host rewrite, checks)
                c.text(ep.get("hostname"), ep.p("hostname"), nonempty=False)
            if "address" not in ep:
                c.need(ep, "address")
                continue
            a = c.socket_address(ep.get("address"), ep.p("address"), min_port=1)
            if a is None:
                continue
            if kind == "STATIC" and not is_ip(a.host):
                c.err(ep.p("address"), f"{a.host!r} is not an IP address (STATIC clusters "
                                       "take IP addresses; use STRICT_DNS for names)")
            key = (a.host.lower(), a.port)
            if key in seen:
                c.err(ep.p("address"), f"duplicate endpoint {str(a)!r} (also {seen[key]}); "
                                       f"{NOT_YET}")
            else:
                seen[key] = ep_path
            out.append(a)
    if len(weights) > 1:
        c.err(la.p("endpoints"), "unequal endpoint weights: " + NOT_YET
              + f" (weights {', '.join(str(w) for w in sorted(weights))})")
    if kind == "LOGICAL_DNS" and len(out) > 1:
        c.err(la.p("endpoints"), "LOGICAL_DNS clusters take exactly one endpoint")
    return tuple(out)


_FAST_PATH = True       # off only in the test that compares both readings


def _plain_endpoint(raw) -> Optional[Address]:
    """An LbEndpoint that is exactly ``{endpoint: {address: {socket_address: {address:
    <IPv4>, port_value: <1..65535>}}}}``, as control planes send nearly all of them, -> its
    Address; anything else (another field, camelCase, a name, IPv6, a bad port) -> None,
    for the full reading. 10,000 endpoints are read ~4x faster."""
    if type(raw) is not dict or len(raw) != 1:
        return None
    ep = raw.get("endpoint")
    if type(ep) is not dict or len(ep) != 1:
        return None
    addr = ep.get("address")
    if type(addr) is not dict or len(addr) != 1:
        return None
    sa = addr.get("socket_address")
    if type(sa) is not dict or len(sa) != 2:
        return None
    host, port = sa.get("address"), sa.get("port_value")
    if type(host) is not str or type(port) is not int or not 1 <= port <= 65535 \
            or not is_ipv4(host):
        return None
    return Address(host, port)
