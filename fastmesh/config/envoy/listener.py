"""Envoy ``config.listener.v3.Listener`` (static_resources.listeners[]) -> model ``Listener``
(and, for an HTTP connection manager with an inline route_config, its ``RouteTable``)."""
from __future__ import annotations

from typing import Optional

import dataclasses
import ipaddress

from ..model import ChainMatch, FilterChain, Listener, RouteTable, VirtualHost
from ._common import _MISSING, NOT_YET, EnvoyChecker
from .filters import filter_kind, translate
from .route import translate_route_config
from .tls import translate_transport_socket, translate_xfcc

HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER = "envoy.extensions.filters.http.router.v3.Router"

ENVOY_IDLE_TIMEOUT_MS = 3600000           # HCM and tcp_proxy idle_timeout default (1 hour)
ENVOY_STREAM_IDLE_TIMEOUT_MS = 300000     # HCM stream_idle_timeout default (5 minutes)
ENVOY_MAX_REQUEST_HEADERS_KB = 60         # HCM max_request_headers_kb default
ENVOY_MAX_HEADERS_COUNT = 100             # common_http_protocol_options.max_headers_count

_LISTENER_FIELDS = {
    "name": None, "address": None, "filter_chains": None, "stat_prefix": None,
    "listener_filters": None, "default_filter_chain": None, "use_original_dst": None,
    "bind_to_port": None, "listener_filters_timeout": None,
    "continue_on_listener_filters_timeout": None,
    "traffic_direction": None,                       # informational (stats, tracing)
    "filter_chain_matcher": "filter chain matchers (unified matcher API): " + NOT_YET
                            + " (filter_chain_match on each chain is supported)",
    "additional_addresses": "additional addresses: " + NOT_YET,
    "per_connection_buffer_limit_bytes": "per_connection_buffer_limit_bytes: " + NOT_YET,
    "socket_options": "socket options: " + NOT_YET,
    "transparent": "transparent listeners (TPROXY): " + NOT_YET
                   + " (iptables REDIRECT with original_dst is supported)",
    "freebind": "freebind: " + NOT_YET,
    "access_log": "listener access logs: " + NOT_YET,
    "connection_balance_config": "connection balancing: " + NOT_YET,
    "drain_type": "drain_type: " + NOT_YET,
}
_CHAIN_FIELDS = {
    "filters": None, "name": None, "filter_chain_match": None,
    "transport_socket": None, "transport_socket_connect_timeout": None,
    "use_proxy_proto": "PROXY protocol: " + NOT_YET,
}
_MATCH_FIELDS = {
    "destination_port": None, "prefix_ranges": None, "server_names": None,
    "transport_protocol": None, "application_protocols": None,
    "source_prefix_ranges": None, "source_ports": None, "source_type": None,
    "direct_source_prefix_ranges": "direct_source_prefix_ranges: " + NOT_YET,
    "address_suffix": "address_suffix: " + NOT_YET, "suffix_len": "suffix_len: " + NOT_YET,
}
ORIGINAL_DST = "envoy.filters.listener.original_dst"
HTTP_INSPECTOR = "envoy.filters.listener.http_inspector"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
BOLT_INSPECTOR = "fastmesh.filters.listener.bolt_inspector"
_LISTENER_FILTER_TYPES = {
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst": ORIGINAL_DST,
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": HTTP_INSPECTOR,
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector": TLS_INSPECTOR,
}
_INSPECTOR = {HTTP_INSPECTOR: "http", TLS_INSPECTOR: "tls", BOLT_INSPECTOR: "bolt"}
ENVOY_LISTENER_FILTERS_TIMEOUT_MS = 15000      # Listener.listener_filters_timeout default
_HCM_FIELDS = {
    "stat_prefix": None, "codec_type": None, "route_config": None, "http_filters": None,
    "common_http_protocol_options": None, "stream_idle_timeout": None,
    "request_timeout": None, "request_headers_timeout": None,
    "max_request_headers_kb": None, "normalize_path": None, "merge_slashes": None,
    "rds": "RDS needs dynamic_resources/ADS: " + NOT_YET,
    "scoped_routes": "scoped routes need dynamic_resources/ADS: " + NOT_YET,
    "access_log": None,
    "tracing": "tracing: " + NOT_YET,
    "http_protocol_options": None,
    "http2_protocol_options": None,
    "upgrade_configs": "upgrades (WebSocket): " + NOT_YET,
    "use_remote_address": None, "xff_num_trusted_hops": None,
    "forward_client_cert_details": None, "set_current_client_cert_details": None,
    "server_name": "server_name: " + NOT_YET,
    "drain_timeout": "drain_timeout: " + NOT_YET,
    "delayed_close_timeout": "delayed_close_timeout: " + NOT_YET,
    "path_with_escaped_slashes_action": None, "strip_any_host_port": None,
    "strip_matching_host_port": "strip_matching_host_port: " + NOT_YET,
}
_CODECS = {"AUTO": 0, "HTTP1": 1, "HTTP2": 2, "HTTP3": 3}


def translate_listener(c: EnvoyChecker, raw, path: str, index: int, names: dict,
                       known_clusters: Optional[set],
                       table_names: set) -> tuple[Optional[Listener], list]:
    """-> (the listener, the route tables its chains carry inline)."""
    m = c.message(raw, path, _LISTENER_FIELDS)
    if m is None:
        return None, []
    if "name" in m:
        name = c.unique_name(m.get("name"), m.p("name"), "listener", names)
    else:                                    # Envoy makes up a name; so do we
        name = f"listener_{index}"
        names.setdefault(name, path)
    if "stat_prefix" in m:
        c.text(m.get("stat_prefix"), m.p("stat_prefix"), nonempty=False)
    addr_raw = c.need(m, "address")
    addr = None if addr_raw is _MISSING else c.socket_address(addr_raw, m.p("address"),
                                                              min_port=0)
    kw: dict = {"name": name, "address": addr}
    if "traffic_direction" in m:
        c.enum(m.get("traffic_direction"), m.p("traffic_direction"),
               {"UNSPECIFIED": 0, "INBOUND": 1, "OUTBOUND": 2}, "traffic_direction")
    _listener_filters(c, m, kw)
    if "bind_to_port" in m:
        kw["bind_to_port"] = c.boolean(m.get("bind_to_port"), m.p("bind_to_port"))
    if "use_original_dst" in m and c.boolean(m.get("use_original_dst"),
                                             m.p("use_original_dst")):
        # as Envoy: the hand-off implies the original_dst listener filter
        kw["use_original_dst"] = kw["original_dst"] = True
    tables: list = []
    chains: list = []
    raw_chains = m.get("filter_chains", _MISSING)
    cp = m.p("filter_chains")
    items = [] if raw_chains is _MISSING else c.seq(raw_chains, cp)
    if not items and "default_filter_chain" not in m:
        c.err(cp, "missing required field (a listener needs filter_chains or a "
                  "default_filter_chain)")
        return None, []
    multi = len(items) + ("default_filter_chain" in m) > 1
    chain_names: dict = {}
    chain_set: dict = {}            # listener-wide setting -> the chain that set it
    seen_matches: dict = {}
    for i, ch_raw in enumerate(items):
        ch = _chain(c, ch_raw, f"{cp}[{i}]", i, kw, name, multi, known_clusters, table_names,
                    tables, chain_names, default=False, chain_set=chain_set)
        if ch is None:
            continue
        if ch.match in seen_matches:
            c.err(f"{cp}[{i}].filter_chain_match", f"the same match as filter_chains"
                  f"[{seen_matches[ch.match]}]: Envoy refuses two chains with one match")
        else:
            seen_matches[ch.match] = i
        chains.append(ch)
    if "default_filter_chain" in m:
        ch = _chain(c, m.get("default_filter_chain"), m.p("default_filter_chain"), len(items),
                    kw, name, multi, known_clusters, table_names, tables, chain_names,
                    default=True, chain_set=chain_set)
        if ch is not None:
            chains.append(ch)
    # an HCM with an access log beside one without: the listener's log (the one the
    # chains that have one agree on) leaves the others' requests out, as Envoy does;
    # when no chain has one, there is nothing to leave out
    if not any(ch.access_log and ch.protocol != "tcp" for ch in chains):
        chains = [ch if ch.access_log else dataclasses.replace(ch, access_log=True)
                  for ch in chains]
    if not chains:
        return None, tables
    plain = (len(chains) == 1 and chains[0].match == ChainMatch() and not chains[0].default
             and not kw.get("original_dst") and not kw.get("inspectors"))
    if plain:
        ch = chains[0]
        kw.update(protocol=ch.protocol, route_table=ch.route_table, cluster=ch.cluster,
                  tls=ch.tls)
    else:
        kw.update(protocol="auto", filter_chains=tuple(chains))
    if kw.get("inspectors") is None:
        kw.pop("inspectors", None)
    return Listener(**kw), tables


def _listener_filters(c: EnvoyChecker, m, kw: dict) -> None:
    inspectors = []
    if "listener_filters" in m:
        lp = m.p("listener_filters")
        for i, item in enumerate(c.seq(m.get("listener_filters"), lp)):
            ip = f"{lp}[{i}]"
            f = c.message(item, ip, {
                "name": None, "typed_config": None,
                "filter_disabled": "listener filter_disabled: " + NOT_YET,
                "config_discovery": "listener filter config discovery: " + NOT_YET})
            if f is None:
                continue
            fname = c.text(c.need(f, "name"), f.p("name"))
            tc = f.get("typed_config")
            t = tc.get("@type") if isinstance(tc, dict) else None
            kind = _LISTENER_FILTER_TYPES.get(t[len("type.googleapis.com/"):]) \
                if isinstance(t, str) and t.startswith("type.googleapis.com/") else None
            if t is None:
                if fname == BOLT_INSPECTOR:         # fastmesh's own: no config to carry
                    kind = BOLT_INSPECTOR
                elif fname is not None:
                    # as Envoy 1.40: listener filters are found by their typed_config's type
                    c.err(f.p("typed_config"), f"missing: Envoy finds listener filter "
                          f"{fname!r} by its typed_config's @type (for {ORIGINAL_DST}: "
                          f"type.googleapis.com/envoy.extensions.filters.listener."
                          f"original_dst.v3.OriginalDst)")
                    continue
            if kind is None:
                c.err(f.p("typed_config") if t else f.p("name"),
                      f"listener filter {fname!r}{f' ({t})' if t else ''}: {NOT_YET} "
                      f"(supported: {ORIGINAL_DST}, {HTTP_INSPECTOR}, {TLS_INSPECTOR})")
                continue
            if t is not None and kind != BOLT_INSPECTOR:
                # their configs have nothing fastmesh uses (http_inspector, tls_inspector's
                # JA3 fingerprinting and buffer size are refused when set)
                _, body = t, {k: v for k, v in tc.items() if k != "@type"}
                for k in body:
                    if not (kind == TLS_INSPECTOR and k == "initial_read_buffer_size"):
                        c.err(f"{f.p('typed_config')}.{k}", f"{k}: {NOT_YET}")
            if kind == ORIGINAL_DST:
                kw["original_dst"] = True
            elif _INSPECTOR[kind] not in inspectors:
                inspectors.append(_INSPECTOR[kind])
    kw["inspectors"] = tuple(x for x in ("http", "tls", "bolt") if x in inspectors) or None
    if not inspectors and "listener_filters_timeout" not in m and \
            "continue_on_listener_filters_timeout" not in m:
        return                  # nothing waits for bytes: the timeout has nothing to time
    timeout = ENVOY_LISTENER_FILTERS_TIMEOUT_MS
    if "listener_filters_timeout" in m:
        timeout = c.duration_ms(m.get("listener_filters_timeout"),
                                m.p("listener_filters_timeout"))
    kw["sniff_timeout_ms"] = timeout
    kw["sniff_timeout_continue"] = False
    if "continue_on_listener_filters_timeout" in m:
        kw["sniff_timeout_continue"] = c.boolean(m.get("continue_on_listener_filters_timeout"),
                                                 m.p("continue_on_listener_filters_timeout"))


def _chain(c: EnvoyChecker, raw, chp: str, i: int, kw: dict, listener_name: str, multi: bool,
           known_clusters: Optional[set], table_names: set, tables: list,
           chain_names: dict, default: bool, chain_set: dict) -> Optional[FilterChain]:
    ch = c.message(raw, chp, _CHAIN_FIELDS)
    if ch is None:
        return None
    cname = f"chain_{i}" if not default else "default"
    if "name" in ch:
        cname = c.text(ch.get("name"), ch.p("name"), nonempty=False) or cname
    if cname in chain_names:
        cname = f"{cname}#{i}"
    chain_names[cname] = chp
    match = ChainMatch()
    if "filter_chain_match" in ch:
        if default:
            c.err(ch.p("filter_chain_match"), "the default filter chain has no match")
        else:
            match = _filter_chain_match(c, ch.get("filter_chain_match"),
                                        ch.p("filter_chain_match"))
    filters = c.need(ch, "filters")
    if filters is _MISSING:
        return None
    fp = ch.p("filters")
    filters = c.seq(filters, fp, nonempty=True)
    if len(filters) > 1:
        c.err(fp, f"{len(filters)} network filters: exactly one (http_connection_manager, "
                  "tcp_proxy or the Bolt proxy) is supported yet")
    if not filters:
        return None
    ckw: dict = {}
    base = f"{listener_name}/{cname}" if multi else listener_name
    table = _network_filter(c, filters[0], f"{fp}[0]", ckw, base, known_clusters,
                            table_names)
    if table is not None:
        table_names.add(table.name)
        tables.append(table)
    if "protocol" not in ckw:
        return None
    protocol = ckw.pop("protocol")
    rt, cl = ckw.pop("route_table", None), ckw.pop("cluster", None)
    tls = None
    xfcc = ckw.pop("xfcc", None)
    if "transport_socket" in ch:
        tls = translate_transport_socket(c, ch.get("transport_socket"), ch.p("transport_socket"),
                                         protocol)
    if tls is not None and "transport_socket_connect_timeout" in ch:
        ms = c.duration_ms(ch.get("transport_socket_connect_timeout"),
                           ch.p("transport_socket_connect_timeout"))
        if ms is not None:
            tls = dataclasses.replace(tls, handshake_timeout_ms=ms)
    elif "transport_socket_connect_timeout" in ch:
        c.duration_ms(ch.get("transport_socket_connect_timeout"),
                      ch.p("transport_socket_connect_timeout"))
    if xfcc is not None:
        if tls is not None:
            tls = dataclasses.replace(tls, forward_client_cert=xfcc[0],
                                      forward_client_cert_details=xfcc[1])
        elif xfcc[0] != "always_forward_only":
            c.note(fp, "forward_client_cert_details on a chain without TLS: fastmesh passes "
                       "x-forwarded-client-cert on as received on plain connections (Envoy "
                       "removes it unless ALWAYS_FORWARD_ONLY)")
    # the rest are listener-wide in fastmesh: chains must agree on them
    for key, value in ckw.items():
        if key in chain_set and kw[key] != value:
            c.err(fp, f"{key}: differs from {chain_set[key]}'s: {NOT_YET} (fastmesh keeps "
                      f"one per listener)")
        kw[key] = value
        chain_set.setdefault(key, chp)
    return FilterChain(name=cname, protocol=protocol, match=match, route_table=rt,
                       cluster=cl, default=default, tls=tls,
                       access_log="access_log" in ckw or protocol == "tcp")


def _filter_chain_match(c: EnvoyChecker, raw, p: str) -> ChainMatch:
    m = c.message(raw, p, _MATCH_FIELDS)
    if m is None:
        return ChainMatch()
    kw: dict = {}
    if "destination_port" in m:
        kw["destination_port"] = c.uint(m.get("destination_port"), m.p("destination_port"),
                                        lo=1, hi=65535)
    for key, out in (("prefix_ranges", "destination_cidrs"),
                     ("source_prefix_ranges", "source_cidrs")):
        if key in m:
            cidrs = []
            for j, r in enumerate(c.seq(m.get(key), m.p(key))):
                cidr = _cidr(c, r, f"{m.p(key)}[{j}]")
                if cidr is not None:
                    cidrs.append(cidr)
            kw[out] = tuple(cidrs)
    if "server_names" in m:
        kw["server_names"] = tuple(
            t.lower() for j, x in enumerate(c.seq(m.get("server_names"), m.p("server_names")))
            if (t := c.text(x, f"{m.p('server_names')}[{j}]")) is not None)
    if "transport_protocol" in m:
        t = c.text(m.get("transport_protocol"), m.p("transport_protocol"), nonempty=False)
        if t:
            kw["transport_protocol"] = t
    if "application_protocols" in m:
        kw["application_protocols"] = tuple(
            t for j, x in enumerate(c.seq(m.get("application_protocols"),
                                          m.p("application_protocols")))
            if (t := c.text(x, f"{m.p('application_protocols')}[{j}]")) is not None)
    if "source_ports" in m:
        kw["source_ports"] = tuple(
            v for j, x in enumerate(c.seq(m.get("source_ports"), m.p("source_ports")))
            if (v := c.uint(x, f"{m.p('source_ports')}[{j}]", lo=1, hi=65535)) is not None)
    if "source_type" in m:
        st = c.enum(m.get("source_type"), m.p("source_type"),
                    {"ANY": 0, "SAME_IP_OR_LOOPBACK": 1, "EXTERNAL": 2}, "source_type")
        if st not in (None, "ANY"):
            c.err(m.p("source_type"), f"{st}: {NOT_YET}")
    return ChainMatch(**{k: v for k, v in kw.items() if v is not None})


def _cidr(c: EnvoyChecker, raw, p: str) -> Optional[str]:
    r = c.message(raw, p, {"address_prefix": None, "prefix_len": None})
    if r is None:
        return None
    ip = c.text(c.need(r, "address_prefix"), r.p("address_prefix"))
    if ip is None:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        c.err(r.p("address_prefix"), f"{ip!r} is not an IP address")
        return None
    plen = addr.max_prefixlen
    if "prefix_len" in r:
        plen = c.uint(r.get("prefix_len"), r.p("prefix_len"), lo=0, hi=addr.max_prefixlen)
        if plen is None:
            return None
    return str(ipaddress.ip_network(f"{ip}/{plen}", strict=False))


def _network_filter(c: EnvoyChecker, raw, p: str, kw: dict, listener_name: str,
                    known_clusters: Optional[set], table_names: set) -> Optional[RouteTable]:
    f = c.message(raw, p, {"name": None, "typed_config": None,
                           "config_discovery": "filter config discovery needs ADS: " + NOT_YET})
    if f is None:
        return None
    fname = c.text(c.need(f, "name"), f.p("name"))
    tc = c.need(f, "typed_config")
    if tc is _MISSING or fname is None:
        return None
    # as Envoy: the typed_config's type chooses the filter; its name is only a name
    kind = _network_filter_kind(tc) or fname
    if kind == "envoy.filters.network.http_connection_manager":
        return _hcm(c, tc, f.p("typed_config"), kw, listener_name, known_clusters, table_names)
    if kind == "envoy.filters.network.tcp_proxy":
        _tcp_proxy(c, tc, f.p("typed_config"), kw, known_clusters)
        return None
    if kind == BOLT_FILTER:
        return _bolt_proxy(c, tc, f.p("typed_config"), kw, listener_name, known_clusters,
                           table_names)
    t = tc.get("@type") if isinstance(tc, dict) else None
    c.err(f.p("typed_config") if isinstance(t, str) else f.p("name"),
          f"network filter {fname!r}{f' ({t})' if isinstance(t, str) else ''}: {NOT_YET} "
          "(supported: envoy.filters.network.http_connection_manager, "
          f"envoy.filters.network.tcp_proxy, {BOLT_FILTER})")
    return None


def _network_filter_kind(tc) -> Optional[str]:
    """The filter a typed_config's @type (a TypedStruct's type_url) names, if fastmesh has it."""
    if not isinstance(tc, dict):
        return None
    t = tc.get("@type")
    if t == "type.googleapis.com/" + HCM:
        return "envoy.filters.network.http_connection_manager"
    if t == "type.googleapis.com/" + TCP_PROXY:
        return "envoy.filters.network.tcp_proxy"
    if t in TYPED_STRUCTS:
        inner = tc.get("type_url", tc.get("typeUrl"))
        return BOLT_FILTER if inner in (None, BOLT_TYPE_URL) else None
    return None


# SOFARPC Bolt, which Envoy does not have: fastmesh's own network filter, configured with a
# TypedStruct whose value holds what the native format says of a Bolt listener and its routes
BOLT_FILTER = "fastmesh.filters.network.bolt_proxy"
BOLT_TYPE_URL = "type.googleapis.com/fastmesh.filters.network.bolt_proxy.v1.BoltProxy"
TYPED_STRUCTS = ("type.googleapis.com/xds.type.v3.TypedStruct",
                 "type.googleapis.com/udpa.type.v1.TypedStruct")
_BOLT_LIMITS = ("max_frame_bytes", "max_in_flight", "idle_timeout_ms", "high_water_bytes",
                "low_water_bytes")


def _bolt_proxy(c: EnvoyChecker, raw, p: str, kw: dict, listener_name: str,
                known_clusters: Optional[set], table_names: set) -> Optional[RouteTable]:
    from ..load import _routes
    if not isinstance(raw, dict) or raw.get("@type") not in TYPED_STRUCTS:
        c.err(f"{p}.@type", f"expected one of {', '.join(TYPED_STRUCTS)} (a TypedStruct "
                            f"holding the Bolt listener's fields)")
        return None
    m = c.message(raw, p, {"@type": None, "type_url": None, "value": None})
    if m is None:
        return None
    if m.get("type_url", BOLT_TYPE_URL) != BOLT_TYPE_URL:
        c.err(m.p("type_url"), f"expected {BOLT_TYPE_URL!r}")
    # a google.protobuf.Struct has only doubles: 100 arrives as 100.0 from a control plane
    value = _integral(m.get("value")) if "value" in m else c.need(m, "value")
    v = c.message(value, m.p("value"),
                  dict({"stat_prefix": None, "routes": None}, **{k: None for k in _BOLT_LIMITS}))
    if v is None:
        return None
    routes = _routes(c, c.need(v, "routes"), v.p("routes"), known_clusters)
    kw["protocol"] = "bolt"
    for key in _BOLT_LIMITS:
        if key in v:
            kw[key] = c.integer(v.get(key), v.p(key), lo=1)
    table = listener_name if listener_name not in table_names else f"{listener_name}/bolt"
    n = 2
    while table in table_names:
        table = f"{listener_name}/bolt#{n}"
        n += 1
    kw["route_table"] = table
    return RouteTable(name=table, virtual_hosts=(
        VirtualHost(name="default", domains=("*",), routes=routes),))


def _hcm(c: EnvoyChecker, raw, p: str, kw: dict, listener_name: str,
         known_clusters: Optional[set], table_names: set) -> Optional[RouteTable]:
    m = c.typed_config(raw, p, HCM, _HCM_FIELDS)
    if m is None:
        return None
    kw.update(protocol="http1", idle_timeout_ms=ENVOY_IDLE_TIMEOUT_MS, accept_http_10=False,
              stream_idle_timeout_ms=ENVOY_STREAM_IDLE_TIMEOUT_MS,
              max_head_bytes=ENVOY_MAX_REQUEST_HEADERS_KB * 1024,
              max_headers=ENVOY_MAX_HEADERS_COUNT)
    c.text(c.need(m, "stat_prefix"), m.p("stat_prefix"), nonempty=False)
    if "access_log" in m:
        _access_logs(c, m.get("access_log"), m.p("access_log"), kw)
    codec = c.enum(m.get("codec_type"), m.p("codec_type"), _CODECS, "codec_type") \
        if "codec_type" in m else "AUTO"
    if codec == "HTTP3":
        c.err(m.p("codec_type"), f"HTTP3: {NOT_YET}")
    elif codec == "HTTP2":
        kw["protocol"] = "http2"
    elif codec == "AUTO":
        kw["codec"] = "auto"                # HTTP/1, and HTTP/2 with prior knowledge
    if "http2_protocol_options" in m:
        from fastmesh.config.envoy.cluster import _http2_options
        settings = _http2_options(c, m.get("http2_protocol_options"),
                                  m.p("http2_protocol_options"))
        if settings is not None:
            kw["http2"] = settings
    for flag in ("normalize_path", "merge_slashes"):
        if flag in m and c.boolean(m.get(flag), m.p(flag)) is True:
            c.err(m.p(flag), f"{flag}: true: {NOT_YET}")
    if "common_http_protocol_options" in m:
        o = c.message(m.get("common_http_protocol_options"), m.p("common_http_protocol_options"),
                      {"idle_timeout": None, "max_headers_count": None,
                       "max_connection_duration": "max_connection_duration: " + NOT_YET,
                       "max_stream_duration": "max_stream_duration: " + NOT_YET,
                       "headers_with_underscores_action":
                           "headers_with_underscores_action: " + NOT_YET,
                       "max_requests_per_connection": "max_requests_per_connection: " + NOT_YET,
                       "max_response_headers_kb": "max_response_headers_kb: " + NOT_YET})
        if o is not None and "idle_timeout" in o:
            ms = c.duration_ms(o.get("idle_timeout"), o.p("idle_timeout"))
            if ms == 0:
                c.err(o.p("idle_timeout"), "0s (no idle timeout): " + NOT_YET)
            kw["idle_timeout_ms"] = ms
        if o is not None and "max_headers_count" in o:
            kw["max_headers"] = c.uint(o.get("max_headers_count"), o.p("max_headers_count"),
                                       lo=1)
    if "http_protocol_options" in m:
        o = c.message(m.get("http_protocol_options"), m.p("http_protocol_options"),
                      {"accept_http_10": None, "enable_trailers": None})
        if o is not None and "accept_http_10" in o:
            kw["accept_http_10"] = c.boolean(o.get("accept_http_10"), o.p("accept_http_10"))
        if o is not None and "enable_trailers" in o and \
                not c.boolean(o.get("enable_trailers"), o.p("enable_trailers")):
            # fastmesh always passes an HTTP/2 upstream's trailers to HTTP/1.1 clients in
            # the last chunk of a chunked response (what enable_trailers: true does)
            c.note(o.p("enable_trailers"), "false: fastmesh still passes trailers in chunked "
                   "responses to HTTP/1.1 clients (as Envoy with enable_trailers: true)")
    if "stream_idle_timeout" in m:
        kw["stream_idle_timeout_ms"] = c.duration_ms(m.get("stream_idle_timeout"),
                                                     m.p("stream_idle_timeout"))
    if "request_timeout" in m:
        if c.duration_ms(m.get("request_timeout"), m.p("request_timeout")):
            c.err(m.p("request_timeout"), "a whole-request timeout: " + NOT_YET
                  + ' (only "0s", Envoy\'s default, is accepted)')
    if "request_headers_timeout" in m:
        ms = c.duration_ms(m.get("request_headers_timeout"), m.p("request_headers_timeout"))
        if ms:
            kw["request_head_timeout_ms"] = ms
    if "max_request_headers_kb" in m:
        kb = c.uint(m.get("max_request_headers_kb"), m.p("max_request_headers_kb"), lo=1,
                    hi=8192)
        kw["max_head_bytes"] = None if kb is None else kb * 1024
    # fields whose Envoy default is how fastmesh behaves: accepted at that default
    if "use_remote_address" in m and c.boolean(m.get("use_remote_address"),
                                               m.p("use_remote_address")):
        c.err(m.p("use_remote_address"), "true: " + NOT_YET + " (fastmesh appends the peer to "
              "x-forwarded-for and trusts nothing in it)")
    if "xff_num_trusted_hops" in m and c.uint(m.get("xff_num_trusted_hops"),
                                              m.p("xff_num_trusted_hops")):
        c.err(m.p("xff_num_trusted_hops"), "trusted hops: " + NOT_YET)
    if "path_with_escaped_slashes_action" in m:
        a = c.enum(m.get("path_with_escaped_slashes_action"),
                   m.p("path_with_escaped_slashes_action"),
                   {"IMPLEMENTATION_SPECIFIC_DEFAULT": 0, "KEEP_UNCHANGED": 1,
                    "REJECT_REQUEST": 2, "UNESCAPE_AND_REDIRECT": 3, "UNESCAPE_AND_FORWARD": 4},
                   "path_with_escaped_slashes_action")
        if a not in (None, "IMPLEMENTATION_SPECIFIC_DEFAULT", "KEEP_UNCHANGED"):
            c.err(m.p("path_with_escaped_slashes_action"), f"{a}: {NOT_YET} (paths are kept "
                                                           f"as sent)")
    if "strip_any_host_port" in m and c.boolean(m.get("strip_any_host_port"),
                                                m.p("strip_any_host_port")):
        # Envoy also takes the port off the Host it forwards, which fastmesh does not
        c.err(m.p("strip_any_host_port"), "true: " + NOT_YET)
    translate_xfcc(c, m, kw)
    filters = _http_filters(c, m, kw)
    if "route_config" not in m:
        if "rds" not in m:
            c.err(m.p("route_config"), "missing required field (or rds, which needs ADS)")
        return None
    rc = m.get("route_config")
    base = rc.get("name") if isinstance(rc, dict) and isinstance(rc.get("name"), str) else ""
    table_name = base or listener_name or "routes"
    if table_name in table_names:
        table_name = f"{listener_name}/{table_name}"
    n = 2
    while table_name in table_names:
        table_name = f"{base or listener_name}#{n}"
        n += 1
    table_names.add(table_name)
    kw["route_table"] = table_name
    return translate_route_config(c, rc, m.p("route_config"), table_name, known_clusters,
                                  filters)


def _http_filters(c: EnvoyChecker, m, kw: dict) -> dict:
    """The chain: the router last; fault and local_ratelimit before it (their listener-level
    configs in kw); -> {filter name: kind} for the routes' typed_per_filter_config."""
    hp = m.p("http_filters")
    raw = c.need(m, "http_filters")
    named: dict = {}
    if raw is _MISSING:
        return named
    routers = 0
    order: list = []
    items = c.seq(raw, hp, nonempty=True)
    for i, item in enumerate(items):
        ip = f"{hp}[{i}]"
        f = c.message(item, ip, {"name": None, "typed_config": None, "is_optional": None,
                                 "disabled": None,
                                 "config_discovery": "filter config discovery: " + NOT_YET})
        if f is None:
            continue
        fname = c.text(c.need(f, "name"), f.p("name"))
        optional = "is_optional" in f and c.boolean(f.get("is_optional"),
                                                   f.p("is_optional")) is True
        disabled = "disabled" in f and c.boolean(f.get("disabled"), f.p("disabled")) is True
        tc = f.get("typed_config")
        # as Envoy: the typed_config's type chooses the filter; its name is only a name
        router = (isinstance(tc, dict) and tc.get("@type") == "type.googleapis.com/" + ROUTER
                  or tc is None and fname == "envoy.filters.http.router")
        kind = filter_kind(tc)
        if kind is not None and not router:
            if disabled:
                c.err(f.p("disabled"), f"{fname!r} disabled (to be enabled per route): "
                      + NOT_YET)
            elif kind in order:
                c.err(ip, f"a second {kind} filter: {NOT_YET}")
            else:
                order.append(kind)
                named[fname] = kind
                kw[kind] = translate(c, kind, tc, f.p("typed_config"))
            if routers:
                c.err(ip, "after the router: the router must be the last HTTP filter")
            continue
        if router:
            routers += 1
            if disabled:
                c.err(f.p("disabled"), "the router filter cannot be disabled")
            if i != len(items) - 1:
                c.err(ip, "the router filter must be the last HTTP filter")
            if "typed_config" in f:
                c.typed_config(f.get("typed_config"), f.p("typed_config"), ROUTER, {})
            else:
                c.err(f.p("typed_config"), f"missing required field (expected @type "
                                           f"type.googleapis.com/{ROUTER})")
        elif fname is None:
            continue
        elif disabled:
            # disabled by default and enabled per route, which fastmesh refuses: never runs
            msg = f"HTTP filter {fname!r} is disabled (and no route can enable it): skipped"
            c.note(ip, msg)
        elif optional:
            # is_optional: a proxy that does not support this filter may go without it
            msg = f"HTTP filter {fname!r} is not supported and is_optional: skipped"
            c.note(ip, msg)
        else:
            c.err(f.p("name"), f"HTTP filter {fname!r}: {NOT_YET} (only "
                               "envoy.filters.http.router; mark a filter is_optional: true "
                               "to let fastmesh go without it)")
    if items and routers == 0:
        c.err(hp, "no envoy.filters.http.router: it must be the last HTTP filter")
    if order:
        kw["http_filters"] = tuple(order)
    return named


def _tcp_proxy(c: EnvoyChecker, raw, p: str, kw: dict, known_clusters: Optional[set]) -> None:
    m = c.typed_config(raw, p, TCP_PROXY, {
        "stat_prefix": None, "cluster": None, "idle_timeout": None,
        "max_connect_attempts": None,
        "weighted_clusters": "weighted_clusters: " + NOT_YET,
        "on_demand": "on_demand: " + NOT_YET,
        "metadata_match": "subset load balancing: " + NOT_YET,
        "access_log": "Envoy access logs: " + NOT_YET,
        "hash_policy": "hash_policy: " + NOT_YET,
        "tunneling_config": "tunneling: " + NOT_YET,
        "max_downstream_connection_duration": "max_downstream_connection_duration: " + NOT_YET,
        "downstream_idle_timeout": "downstream_idle_timeout: " + NOT_YET,
        "upstream_idle_timeout": "upstream_idle_timeout: " + NOT_YET})
    if m is None:
        return
    kw.update(protocol="tcp", idle_timeout_ms=ENVOY_IDLE_TIMEOUT_MS)
    c.text(c.need(m, "stat_prefix"), m.p("stat_prefix"), nonempty=False)
    cl = c.need(m, "cluster")
    if cl is not _MISSING:
        name = c.text(cl, m.p("cluster"))
        if name is not None and known_clusters is not None and name not in known_clusters:
            c.err(m.p("cluster"), f"no cluster named {name!r}")
        kw["cluster"] = name
    if "idle_timeout" in m:
        ms = c.duration_ms(m.get("idle_timeout"), m.p("idle_timeout"))
        if ms == 0:
            c.err(m.p("idle_timeout"), "0s (no idle timeout): " + NOT_YET)
        kw["idle_timeout_ms"] = ms
    if "max_connect_attempts" in m:
        n = c.uint(m.get("max_connect_attempts"), m.p("max_connect_attempts"), lo=1)
        if n is not None and n != 1:
            c.err(m.p("max_connect_attempts"), f"{n}: connect retries: " + NOT_YET)


def _integral(x):
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, dict):
        return {k: _integral(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_integral(v) for v in x]
    return x


FILE_ACCESS_LOG = "envoy.extensions.access_loggers.file.v3.FileAccessLog"


def _access_logs(c: EnvoyChecker, raw, p: str, kw: dict) -> None:
    """HCM access_log: one file access log, its log_format's text_format_source
    (inline_string) or json_format translated to fastmesh's format (the same %OPERATOR%
    names; fastmesh._core.accesslog lists those it renders)."""
    from fastmesh._core.accesslog import compile_format
    items = c.seq(raw, p, nonempty=False) or []
    if len(items) > 1:
        c.err(p, f"{len(items)} access logs: one per listener is supported ({NOT_YET})")
        return
    for i, item in enumerate(items):
        ip = f"{p}[{i}]"
        a = c.message(item, ip, {"name": None, "typed_config": None,
                                 "filter": "access log filters: " + NOT_YET})
        if a is None or c.need(a, "typed_config") is _MISSING:
            return
        f = c.typed_config(a.get("typed_config"), a.p("typed_config"), FILE_ACCESS_LOG, {
            "path": None, "log_format": None,
            "format": "the deprecated format field: use log_format",
            "json_format": "the deprecated json_format field: use log_format",
            "typed_json_format": "typed_json_format: " + NOT_YET})
        if f is None:
            return
        path = c.text(c.need(f, "path"), f.p("path"))
        if path is None:
            return
        kw["access_log"] = path
        if "log_format" not in f:
            # no format: Envoy writes its default line, and so does fastmesh
            from fastmesh._core.accesslog import ENVOY_DEFAULT_FORMAT
            kw["access_log_format"] = ENVOY_DEFAULT_FORMAT
            return
        lf = c.message(f.get("log_format"), f.p("log_format"), {
            "text_format_source": None, "json_format": None,
            "text_format": "the deprecated text_format: use text_format_source",
            "omit_empty_values": "omit_empty_values: " + NOT_YET,
            "content_type": None, "formatters": "formatter extensions: " + NOT_YET,
            "json_format_options": "json_format_options: " + NOT_YET})
        if lf is None:
            return

        def check(text: str, where: str) -> bool:
            try:
                compile_format(text)
                return True
            except ValueError as exc:
                c.err(where, str(exc))
                return False
        if "text_format_source" in lf:
            src = c.message(lf.get("text_format_source"), lf.p("text_format_source"),
                            {"inline_string": None,
                             "filename": "a format from a file: " + NOT_YET,
                             "inline_bytes": "inline_bytes: " + NOT_YET,
                             "environment_variable": "environment_variable: " + NOT_YET})
            if src is None:
                return
            text = c.text(c.need(src, "inline_string"), src.p("inline_string"))
            if text is not None and check(text, src.p("inline_string")):
                kw["access_log_format"] = text
        elif "json_format" in lf:
            jf = lf.get("json_format")
            if not isinstance(jf, dict) or not jf:
                c.err(lf.p("json_format"), "expected a non-empty mapping of key -> operator")
                return
            fields = []
            for k, v in jf.items():
                if not isinstance(v, str):
                    c.err(f"{lf.p('json_format')}.{k}", "nested or non-string values: " + NOT_YET)
                    continue
                if check(v, f"{lf.p('json_format')}.{k}"):
                    fields.append((str(k), v))
            kw["access_log_json"] = tuple(fields)
