"""Envoy ``config.cluster.v3.Cluster`` (static_resources.clusters[]) -> model ``Cluster``."""
from __future__ import annotations

from typing import Optional

from ..model import Address, CircuitBreakers, Cluster, OriginalDst, OutlierDetection
from ._common import _MISSING, NOT_YET, EnvoyChecker, is_ip, is_ipv4
from .health import translate_health_checks
from .tls import translate_upstream_transport_socket

_TYPES = {"STATIC": 0, "STRICT_DNS": 1, "LOGICAL_DNS": 2, "EDS": 3, "ORIGINAL_DST": 4}
_LB = {"ROUND_ROBIN": 0, "LEAST_REQUEST": 1, "RING_HASH": 2, "RANDOM": 3, "MAGLEV": 5,
       "CLUSTER_PROVIDED": 6, "LOAD_BALANCING_POLICY_CONFIG": 7}
_LB_MODEL = {"ROUND_ROBIN": "round_robin", "RANDOM": "random", "LEAST_REQUEST": "least_request",
             "RING_HASH": "ring_hash", "MAGLEV": "maglev"}

ENVOY_CONNECT_TIMEOUT_MS = 5000        # Cluster.connect_timeout default
ENVOY_DNS_REFRESH_MS = 5000            # Cluster.dns_refresh_rate default
ENVOY_UPSTREAM_IDLE_MS = 3600000       # upstream HTTP idle_timeout default (1 hour)
# CircuitBreakers.Thresholds defaults: a cluster without circuit_breakers has these too
ENVOY_BREAKERS = CircuitBreakers(max_connections=1024, max_pending_requests=1024,
                                 max_requests=1024, max_retries=3)

_OTHER_ISSUE = "a separate issue: " + NOT_YET

_CLUSTER_FIELDS = {
    "name": None, "type": None, "connect_timeout": None, "lb_policy": None,
    "load_assignment": None, "dns_refresh_rate": None, "dns_lookup_family": None,
    "alt_stat_name": None,                         # stats only: ignored
    "health_checks": None, "outlier_detection": None,
    "circuit_breakers": None, "ring_hash_lb_config": None, "maglev_lb_config": None,
    "least_request_lb_config": None, "round_robin_lb_config": None,
    "transport_socket": None,
    "transport_socket_matches": "transport_socket_matches: " + NOT_YET + " (one "
                                "transport_socket per cluster)",
    "eds_cluster_config": "EDS needs ADS: " + NOT_YET,
    "cluster_type": "custom cluster types: " + NOT_YET,
    "typed_extension_protocol_options": None,
    "http2_protocol_options": None,             # deprecated: HTTP/2 to the endpoints
    "common_lb_config": None,
    "original_dst_lb_config": None, "cleanup_interval": None,
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
_OD_FIELDS = dict.fromkeys((
    "consecutive_5xx", "consecutive_gateway_failure", "enforcing_consecutive_5xx",
    "enforcing_consecutive_gateway_failure", "interval", "base_ejection_time",
    "max_ejection_time", "max_ejection_percent", "enforcing_success_rate",
    "success_rate_minimum_hosts", "success_rate_request_volume", "success_rate_stdev_factor",
    "enforcing_failure_percentage", "failure_percentage_threshold",
    "failure_percentage_minimum_hosts", "failure_percentage_request_volume",
    "split_external_local_origin_errors", "consecutive_local_origin_failure",
    "enforcing_consecutive_local_origin_failure", "enforcing_local_origin_success_rate",
    "enforcing_failure_percentage_local_origin", "max_ejection_time_jitter"))
# fields fastmesh refuses when they are set to anything but their default
_OD_OFF_ONLY = ("max_ejection_time_jitter", "successful_active_health_check_uneject_host",
                "monitors", "always_eject_one_host")
_OD_FIELDS.update(dict.fromkeys(_OD_OFF_ONLY))
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
    kw: dict = {"name": name, "idle_timeout_ms": ENVOY_UPSTREAM_IDLE_MS,
                "connect_timeout_ms": ENVOY_CONNECT_TIMEOUT_MS,
                "circuit_breakers": ENVOY_BREAKERS}
    if "connect_timeout" in m:
        ms = c.duration_ms(m.get("connect_timeout"), m.p("connect_timeout"))
        if ms == 0:
            c.err(m.p("connect_timeout"), "must be greater than 0s")
        kw["connect_timeout_ms"] = ms
    if kind == "ORIGINAL_DST" or m.get("lb_policy") == "CLUSTER_PROVIDED":
        return _original_dst_cluster(c, m, kind, kw)
    for key in ("original_dst_lb_config", "cleanup_interval"):
        if key in m:
            c.err(m.p(key), "only for ORIGINAL_DST clusters")
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
    kw["endpoints"], weights = _endpoints(c, m, kind)
    if weights:
        if kw.get("lb_policy") == "maglev":
            c.err(m.p("load_assignment"), "unequal endpoint weights with MAGLEV: " + NOT_YET)
        kw["weights"] = weights
    if "health_checks" in m:
        kw["health_check"] = translate_health_checks(c, m.get("health_checks"),
                                                     m.p("health_checks"))
    _lb_configs(c, m, kw.get("lb_policy"), kw)
    if "outlier_detection" in m:
        kw["outlier_detection"] = _outlier_detection(c, m.get("outlier_detection"),
                                                     m.p("outlier_detection"))
    _shared_options(c, m, kw)
    return Cluster(**kw)


def _shared_options(c: EnvoyChecker, m, kw: dict) -> None:
    """What every cluster type reads alike: circuit breakers, common LB settings, upstream
    protocol options."""
    if "circuit_breakers" in m:
        kw["circuit_breakers"] = _circuit_breakers(c, m.get("circuit_breakers"),
                                                   m.p("circuit_breakers"))
    if "common_lb_config" in m:
        _common_lb_config(c, m.get("common_lb_config"), m.p("common_lb_config"), kw)
    _protocol_options(c, m, kw)
    if "http2_protocol_options" in m:           # the deprecated cluster field: HTTP/2 too
        _set_http2(kw, _http2_options(c, m.get("http2_protocol_options"),
                                      m.p("http2_protocol_options")))
        kw["http_protocol"] = "http2"
    if "transport_socket" in m:                 # TLS to the endpoints
        kw["tls"] = translate_upstream_transport_socket(
            c, m.get("transport_socket"), m.p("transport_socket"),
            kw.get("http_protocol") == "http2")


# HTTP/2 protocol options fastmesh reads; the settings it does not apply yet are noted
_HTTP2_FIELDS = {
    "hpack_table_size": None, "max_concurrent_streams": None,
    "initial_stream_window_size": None, "initial_connection_window_size": None,
    "max_outbound_frames": None, "max_outbound_control_frames": None,
    "max_consecutive_inbound_frames_with_empty_payload": None,
    "max_inbound_priority_frames_per_stream": None,
    "max_inbound_window_update_frames_per_data_frame_sent": None,
    "stream_error_on_invalid_http_messaging": None,
    "override_stream_error_on_invalid_http_message": None,
    "allow_connect": "extended CONNECT: " + NOT_YET,
    "allow_metadata": "METADATA frames: " + NOT_YET,
    "custom_settings_parameters": "custom SETTINGS: " + NOT_YET,
    "connection_keepalive": "HTTP/2 PING keepalive: " + NOT_YET,
    "use_oghttp2_codec": None,
    "max_metadata_size": "METADATA frames: " + NOT_YET,
    "enable_huffman_encoding_for_headers": None,
}


# Envoy's Http2ProtocolOptions fields -> model.Http2Settings'
_HTTP2_SETTINGS = {"max_concurrent_streams": "max_concurrent_streams",
                   "initial_stream_window_size": "initial_stream_window_bytes",
                   "initial_connection_window_size": "initial_connection_window_bytes",
                   "hpack_table_size": "hpack_table_bytes"}


def _http2_options(c: EnvoyChecker, raw, p: str):
    """-> the Http2Settings they set (fastmesh's defaults for what they leave out: Envoy's
    own are unbounded), or None when they set none of them."""
    from ..model import HTTP2_LIMITS, Http2Settings
    o = c.message(raw if raw is not None else {}, p, _HTTP2_FIELDS)
    if o is None:
        return None
    kw = {}
    for envoy_name, ours in _HTTP2_SETTINGS.items():
        if envoy_name not in o:
            continue
        lo, hi = HTTP2_LIMITS[ours]
        v = c.integer(o.get(envoy_name), o.p(envoy_name), lo=lo)
        if v is None:
            continue
        if v > hi:
            if ours == "hpack_table_bytes":
                c.err(o.p(envoy_name), f"{v}: above {hi}, {NOT_YET} (fastmesh bounds the "
                                       f"HPACK table each connection's decoder keeps)")
                continue
            v = hi
        kw[ours] = v
    return Http2Settings(**kw) if kw else None


def _set_http2(kw: dict, settings) -> None:
    if settings is not None:
        kw["http2"] = settings


HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _protocol_options(c: EnvoyChecker, m, kw: dict) -> None:
    """typed_extension_protocol_options: the upstream HTTP protocol options (Istio sets them
    on every cluster). HTTP/1 upstreams only, for now: an explicit HTTP/1 config, or
    use_downstream_protocol_config (fastmesh's downstream is HTTP/1, so the upstream is too);
    common_http_protocol_options.idle_timeout is the pooled connections' idle timeout."""
    if "typed_extension_protocol_options" not in m:
        return
    tp = m.p("typed_extension_protocol_options")
    raw = m.get("typed_extension_protocol_options")
    if not isinstance(raw, dict):
        c.err(tp, "expected a mapping of extension name to options")
        return
    for name, opts in raw.items():
        p = f"{tp}.{name}"
        t = opts.get("@type") if isinstance(opts, dict) else None
        if t != "type.googleapis.com/" + HTTP_OPTIONS:
            c.err(p, f"protocol options {name!r}{f' ({t})' if t else ''}: {NOT_YET} (only "
                     f"{HTTP_OPTIONS})")
            continue
        o = c.typed_config(opts, p, HTTP_OPTIONS, {
            "common_http_protocol_options": None, "explicit_http_config": None,
            "use_downstream_protocol_config": None,
            "auto_config": "auto_config (ALPN-chosen upstream protocol): " + NOT_YET,
            "upstream_http_protocol_options": "upstream_http_protocol_options: " + NOT_YET,
            "http_filters": "upstream HTTP filters: " + NOT_YET,
            "header_validation_config": "header_validation_config: " + NOT_YET,
            "outlier_detection": "per-cluster HTTP outlier settings: " + NOT_YET})
        if o is None:
            continue
        if "common_http_protocol_options" in o:
            co = c.message(o.get("common_http_protocol_options"),
                           o.p("common_http_protocol_options"), {
                               "idle_timeout": None,
                               "max_connection_duration": "max_connection_duration: " + NOT_YET,
                               "max_requests_per_connection":
                                   "max_requests_per_connection: " + NOT_YET,
                               "max_headers_count": "upstream max_headers_count: " + NOT_YET,
                               "max_stream_duration": "max_stream_duration: " + NOT_YET,
                               "headers_with_underscores_action":
                                   "headers_with_underscores_action: " + NOT_YET,
                               "max_response_headers_kb": "max_response_headers_kb: " + NOT_YET})
            if co is not None and "idle_timeout" in co:
                ms = c.duration_ms(co.get("idle_timeout"), co.p("idle_timeout"))
                if ms == 0:
                    c.err(co.p("idle_timeout"), "0s (pooled connections never idle out): "
                                                + NOT_YET)
                elif ms is not None:
                    kw["idle_timeout_ms"] = ms
        if "explicit_http_config" in o:
            ec = c.message(o.get("explicit_http_config"), o.p("explicit_http_config"), {
                "http_protocol_options": None,
                "http2_protocol_options": None,
                "http3_protocol_options": "upstream HTTP/3: " + NOT_YET})
            if ec is not None and "http_protocol_options" in ec:
                _http1_options(c, ec.get("http_protocol_options"), ec.p("http_protocol_options"))
            if ec is not None and "http2_protocol_options" in ec:
                _set_http2(kw, _http2_options(c, ec.get("http2_protocol_options"),
                                              ec.p("http2_protocol_options")))
                kw["http_protocol"] = "http2"
        if "use_downstream_protocol_config" in o:
            # fastmesh's listeners speak HTTP/1, so "the downstream's protocol" is HTTP/1
            dc = c.message(o.get("use_downstream_protocol_config"),
                           o.p("use_downstream_protocol_config"), {
                               "http_protocol_options": None, "http2_protocol_options": None,
                               "http3_protocol_options": None})
            if dc is not None and "http_protocol_options" in dc:
                _http1_options(c, dc.get("http_protocol_options"), dc.p("http_protocol_options"))
            if dc is not None and "http2_protocol_options" in dc:
                _http2_options(c, dc.get("http2_protocol_options"),
                               dc.p("http2_protocol_options"))
                c.note(dc.p("http2_protocol_options"), "the downstream's protocol is not "
                       "followed yet: HTTP/2 clients reach this cluster over HTTP/1.1")


def _http1_options(c: EnvoyChecker, raw, p: str) -> None:
    c.message(raw, p, {"accept_http_10": None, "enable_trailers": None,
                       "header_key_format": "header_key_format: " + NOT_YET,
                       "allow_chunked_length": "allow_chunked_length: " + NOT_YET,
                       "default_host_for_http_10": "default_host_for_http_10: " + NOT_YET,
                       "override_stream_error_on_invalid_http_message":
                           "override_stream_error_on_invalid_http_message: " + NOT_YET})


def _outlier_detection(c: EnvoyChecker, raw, path: str) -> Optional[OutlierDetection]:
    """cluster.v3.OutlierDetection: consecutive 5xx and gateway failures, with Envoy's
    defaults; the other detectors are refused when they would act (their enforcing % is
    not 0), since fastmesh does not run them."""
    m = c.message(raw, path, _OD_FIELDS)
    if m is None:
        return None
    kw: dict = {}
    for field, name in (("consecutive_5xx", "consecutive_5xx"),
                        ("consecutive_gateway_failure", "consecutive_gateway_failure"),
                        ("enforcing_consecutive_5xx", "enforcing_consecutive_5xx_pct"),
                        ("enforcing_consecutive_gateway_failure",
                         "enforcing_consecutive_gateway_failure_pct"),
                        ("max_ejection_percent", "max_ejection_pct")):
        if field in m:
            v = c.uint(m.get(field), m.p(field),
                       hi=100 if name.endswith("_pct") else 2**32 - 1)
            kw[name] = v
    for field, name in (("interval", "interval_ms"),
                        ("base_ejection_time", "base_ejection_time_ms"),
                        ("max_ejection_time", "max_ejection_time_ms")):
        if field in m:
            ms = c.duration_ms(m.get(field), m.p(field))
            if ms == 0:
                c.err(m.p(field), "must be greater than 0s")
            kw[name] = ms
    # detectors fastmesh does not run: accepted only while they cannot eject
    for field, default in (("enforcing_success_rate", 100),
                           ("enforcing_failure_percentage", 0),
                           ("enforcing_local_origin_success_rate", 100),
                           ("enforcing_failure_percentage_local_origin", 0)):
        value = c.uint(m.get(field), m.p(field), hi=100) if field in m else default
        if value and field in ("enforcing_success_rate", "enforcing_failure_percentage"):
            # success rate needs success_rate_minimum_hosts (5) hosts with request volume;
            # refused when given explicitly, accepted at its default (noted)
            if field in m:
                c.err(m.p(field), f"{field}: {value}: success-rate and failure-percentage "
                                  f"ejection: {NOT_YET} (set it to 0)")
    for field in _OD_OFF_ONLY:
        v = m.get(field)
        if field in m and v not in (False, [], "0s", {}, None):
            c.err(m.p(field), f"{field}: {NOT_YET}")
    if "enforcing_success_rate" not in m:
        c.note(path, "Envoy also runs success-rate ejection by default (clusters of 5+ "
                     "hosts with 100+ requests per interval); fastmesh does not (set "
                     "enforcing_success_rate: 0 to say so)")
    if "split_external_local_origin_errors" in m:
        kw["split_external_local_origin_errors"] = c.boolean(
            m.get("split_external_local_origin_errors"),
            m.p("split_external_local_origin_errors"))
    if "consecutive_local_origin_failure" in m:
        kw["consecutive_local_origin_failure"] = c.uint(
            m.get("consecutive_local_origin_failure"), m.p("consecutive_local_origin_failure"))
    if "enforcing_consecutive_local_origin_failure" in m:
        kw["enforcing_consecutive_local_origin_failure_pct"] = c.uint(
            m.get("enforcing_consecutive_local_origin_failure"),
            m.p("enforcing_consecutive_local_origin_failure"), hi=100)
    if any(v is None for v in kw.values()):
        return None
    return OutlierDetection(**kw)


def _uint64(c: EnvoyChecker, v, path: str, lo: int, hi: int):
    """A UInt64Value: a decimal string in proto JSON, a number in YAML."""
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    return c.integer(v, path, lo=lo, hi=hi)


def _lb_configs(c: EnvoyChecker, m, policy: Optional[str], kw: dict) -> None:
    """ring_hash_lb_config, maglev_lb_config; the others only with their defaults."""
    if "ring_hash_lb_config" in m:
        r = c.message(m.get("ring_hash_lb_config"), m.p("ring_hash_lb_config"), {
            "minimum_ring_size": None, "maximum_ring_size": None, "hash_function": None})
        if r is not None:
            if "minimum_ring_size" in r:
                kw["min_ring_size"] = _uint64(c, r.get("minimum_ring_size"),
                                              r.p("minimum_ring_size"), 1, 8388608)
            if "maximum_ring_size" in r:
                kw["max_ring_size"] = _uint64(c, r.get("maximum_ring_size"),
                                              r.p("maximum_ring_size"), 1, 8388608)
            if "hash_function" in r:
                fn = c.enum(r.get("hash_function"), r.p("hash_function"),
                            {"XX_HASH": 0, "MURMUR_HASH_2": 1}, "hash_function")
                if fn == "MURMUR_HASH_2":
                    c.err(r.p("hash_function"), "MURMUR_HASH_2: " + NOT_YET + " (XX_HASH)")
            if isinstance(kw.get("max_ring_size"), int) and \
                    kw["max_ring_size"] < kw.get("min_ring_size", 1024):
                c.err(r.p("maximum_ring_size"), "must be at least minimum_ring_size")
    if "maglev_lb_config" in m:
        g = c.message(m.get("maglev_lb_config"), m.p("maglev_lb_config"), {"table_size": None})
        if g is not None and "table_size" in g:
            size = _uint64(c, g.get("table_size"), g.p("table_size"), 2, 5000011)
            if size is not None and any(size % d == 0 for d in range(2, int(size ** .5) + 1)):
                c.err(g.p("table_size"), f"{size} is not a prime number")
            kw["maglev_table_size"] = size
    for field in ("least_request_lb_config", "round_robin_lb_config"):
        if field in m and m.get(field) not in ({}, None):
            c.err(m.p(field), f"{field}: {NOT_YET} (only its defaults)")


def _circuit_breakers(c: EnvoyChecker, raw, path: str) -> Optional[CircuitBreakers]:
    """cluster.v3.CircuitBreakers: the DEFAULT priority's thresholds (fastmesh routes are all
    DEFAULT priority, so HIGH thresholds never apply), Envoy's defaults for what is unset."""
    m = c.message(raw, path, {
        "thresholds": None,
        "per_host_thresholds": "per-host thresholds: " + NOT_YET})
    if m is None:
        return None
    values = {k: getattr(ENVOY_BREAKERS, k) for k in _BREAKER_FIELDS}
    for i, t in enumerate(c.seq(m.get("thresholds", []), m.p("thresholds"))):
        tm = c.message(t, f"{m.p('thresholds')}[{i}]", dict(
            dict.fromkeys(_BREAKER_FIELDS), priority=None, track_remaining=None,
            retry_budget="retry budgets: " + NOT_YET,
            max_connection_pools="max_connection_pools: " + NOT_YET))
        if tm is None:
            continue
        prio = c.enum(tm.get("priority", "DEFAULT"), tm.p("priority"),
                      {"DEFAULT": 0, "HIGH": 1}, "routing priority")
        if prio != "DEFAULT":
            continue
        for k in _BREAKER_FIELDS:
            if k in tm:
                values[k] = c.uint(tm.get(k), tm.p(k))
    if any(v is None for v in values.values()):
        return None
    return CircuitBreakers(**values)


_BREAKER_FIELDS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


def _common_lb_config(c: EnvoyChecker, raw, path: str, kw: dict) -> None:
    m = c.message(raw, path, {
        "healthy_panic_threshold": None,
        "zone_aware_lb_config": "zone-aware balancing: " + NOT_YET,
        "locality_weighted_lb_config": "locality-weighted balancing: " + NOT_YET,
        "update_merge_window": None,            # batching of host updates: no effect here
        "ignore_new_hosts_until_first_hc": "ignore_new_hosts_until_first_hc: " + NOT_YET,
        "close_connections_on_host_set_change": "close_connections_on_host_set_change: "
                                                + NOT_YET,
        "consistent_hashing_lb_config": "consistent_hashing_lb_config: " + NOT_YET,
        "override_host_status": "override_host_status: " + NOT_YET})
    if m is None or "healthy_panic_threshold" not in m:
        return
    p = c.message(m.get("healthy_panic_threshold"), m.p("healthy_panic_threshold"),
                  {"value": None})
    if p is None:
        return
    v = p.get("value", 0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
        c.err(p.p("value"), f"expected a percentage (0..100), got {v!r}")
        return
    if v != int(v):
        c.err(p.p("value"), f"{v}: fractional percentages: {NOT_YET}")
        return
    kw["healthy_panic_threshold_pct"] = int(v)


ENVOY_ORIGINAL_DST_CLEANUP_MS = 5000       # Cluster.cleanup_interval default


def _original_dst_cluster(c: EnvoyChecker, m, kind: Optional[str], kw: dict) -> Cluster:
    """type ORIGINAL_DST with lb_policy CLUSTER_PROVIDED (Envoy accepts neither without the
    other): each connection goes where its client addressed it."""
    if kind != "ORIGINAL_DST":
        c.err(m.p("lb_policy"), "CLUSTER_PROVIDED is only for cluster type ORIGINAL_DST")
    elif m.get("lb_policy") != "CLUSTER_PROVIDED":
        lb = m.get("lb_policy", "ROUND_ROBIN")
        c.err(m.p("lb_policy"), f"{lb} is not valid for cluster type ORIGINAL_DST: only "
                                f"CLUSTER_PROVIDED is")
    if "load_assignment" in m:
        c.err(m.p("load_assignment"), "ORIGINAL_DST clusters have no load assignment")
    for key in ("health_checks", "outlier_detection", "ring_hash_lb_config",
                "maglev_lb_config", "least_request_lb_config", "round_robin_lb_config",
                "dns_refresh_rate"):
        if key in m:
            c.err(m.p(key), f"with an ORIGINAL_DST cluster: {NOT_YET}")
    od: dict = {"cleanup_interval_ms": ENVOY_ORIGINAL_DST_CLEANUP_MS}
    if "cleanup_interval" in m:
        ms = c.duration_ms(m.get("cleanup_interval"), m.p("cleanup_interval"))
        if ms == 0:
            c.err(m.p("cleanup_interval"), "must be greater than 0s")
        od["cleanup_interval_ms"] = ms
    if "original_dst_lb_config" in m:
        o = c.message(m.get("original_dst_lb_config"), m.p("original_dst_lb_config"), {
            "use_http_header": None, "http_header_name": None, "upstream_port_override": None,
            "metadata_key": "original_dst_lb_config.metadata_key: " + NOT_YET})
        if o is not None:
            if "use_http_header" in o:
                od["use_http_header"] = c.boolean(o.get("use_http_header"),
                                                  o.p("use_http_header"))
            if "http_header_name" in o:
                h = c.text(o.get("http_header_name"), o.p("http_header_name"))
                if h:
                    od["http_header_name"] = h.lower()
            if "upstream_port_override" in o:
                od["port_override"] = c.uint(o.get("upstream_port_override"),
                                             o.p("upstream_port_override"), lo=1, hi=65535)
    _shared_options(c, m, kw)
    kw["endpoints"] = ()
    kw["original_dst"] = OriginalDst(**{k: v for k, v in od.items() if v is not None})
    return Cluster(**kw)


def _endpoints(c: EnvoyChecker, m, kind: Optional[str]) -> tuple:
    la_raw = m.get("load_assignment", _MISSING)
    if la_raw is _MISSING:
        return (), ()       # a cluster without endpoints: 503 at request time, as in Envoy
    la = c.message(la_raw, m.p("load_assignment"), {
        "cluster_name": None, "endpoints": None,
        "policy": "load_assignment.policy: " + NOT_YET,
        "named_endpoints": "named endpoints: " + NOT_YET})
    if la is None:
        return (), ()
    c.text(c.need(la, "cluster_name"), la.p("cluster_name"))     # required by Envoy
    out = []
    ws = []                               # each endpoint's load-balancing weight
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
                key = (a.host, a.port)
                if key in seen:
                    c.err(f"{ep_path}.endpoint.address", f"duplicate endpoint {str(a)!r} "
                                                         f"(also {seen[key]}); {NOT_YET}")
                else:
                    seen[key] = ep_path
                out.append(a)
                ws.append(1)
                continue
            lbe = c.message(ep_raw, ep_path, _LB_ENDPOINT_FIELDS)
            if lbe is None:
                continue
            w = 1
            if "load_balancing_weight" in lbe:
                w = c.uint(lbe.get("load_balancing_weight"), lbe.p("load_balancing_weight"),
                           lo=1, hi=2**31 - 1)
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
            ws.append(w if w is not None else 1)
    if kind == "LOGICAL_DNS" and len(out) > 1:
        c.err(la.p("endpoints"), "LOGICAL_DNS clusters take exactly one endpoint")
    # equal weights balance as no weights at all
    return tuple(out), (tuple(ws) if len(set(ws)) > 1 else ())


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
