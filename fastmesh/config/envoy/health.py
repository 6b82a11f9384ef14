"""Envoy ``config.core.v3.HealthCheck`` (a cluster's health_checks) -> model ``HealthCheck``.

fastmesh runs one active health check per cluster (HTTP or TCP), with Envoy's defaults for
what is not given. Everything that would make Envoy probe or decide differently (gRPC and
custom checkers, TLS, other ports, retriable statuses, edge intervals, event logs, ...) is
refused with its path, so a bootstrap never means less under fastmesh than under Envoy.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Optional

from ..model import HealthCheck
from ._common import _MISSING, NOT_YET, EnvoyChecker, _show

_EVENT_LOGS = "health check event logs: " + NOT_YET
_HC_FIELDS = {
    "timeout": None, "interval": None, "initial_jitter": None, "interval_jitter": None,
    "interval_jitter_percent": None, "unhealthy_threshold": None, "healthy_threshold": None,
    "no_traffic_interval": None, "unhealthy_interval": None,
    "http_health_check": None, "tcp_health_check": None,
    # a connection per probe or one kept open: the verdicts are the same (fastmesh opens
    # one per probe, whichever is asked)
    "reuse_connection": None,
    # accepted at their defaults only (false)
    "always_log_health_check_failures": None, "always_log_health_check_success": None,
    "grpc_health_check": "gRPC health checks: " + NOT_YET + " (use http_health_check or "
                         "tcp_health_check)",
    "custom_health_check": "custom health checkers: " + NOT_YET,
    "alt_port": "health checks on another port (alt_port): " + NOT_YET,
    "no_traffic_healthy_interval": "no_traffic_healthy_interval: " + NOT_YET,
    "unhealthy_edge_interval": "unhealthy_edge_interval: " + NOT_YET,
    "healthy_edge_interval": "healthy_edge_interval: " + NOT_YET,
    "event_log_path": _EVENT_LOGS, "event_logger": _EVENT_LOGS, "event_service": _EVENT_LOGS,
    "tls_options": "TLS health checks (tls_options): " + NOT_YET,
    "transport_socket_match_criteria": "health checks over a transport socket: " + NOT_YET,
    "initial_metadata": "initial_metadata (gRPC): " + NOT_YET,
}
_HTTP_FIELDS = {
    "path": None, "host": None, "expected_statuses": None,
    "codec_client_type": None, "method": None,             # HTTP1 and GET only
    "send": "an HTTP health check request body (send): " + NOT_YET,
    "receive": "matching the HTTP health check response body (receive): " + NOT_YET,
    "response_buffer_size": "response_buffer_size (with receive): " + NOT_YET,
    "request_headers_to_add": "request_headers_to_add on health checks: " + NOT_YET,
    "request_headers_to_remove": "request_headers_to_remove on health checks: " + NOT_YET,
    "retriable_statuses": "retriable_statuses: " + NOT_YET + " (an unexpected status fails "
                          "the host at once, as Envoy does without them)",
    "service_name_matcher": "service_name_matcher: " + NOT_YET,
    "use_http2": "HTTP/2 health checks: " + NOT_YET,
}
_TCP_FIELDS = {"send": None, "receive": None,
               "proxy_protocol_config": "PROXY protocol on health checks: " + NOT_YET}
_PAYLOAD_FIELDS = {"text": None, "binary": None}
_RANGE_FIELDS = {"start": None, "end": None}
_CODECS = {"HTTP1": 0, "HTTP2": 1, "HTTP3": 2}
_METHODS = {"METHOD_UNSPECIFIED": 0, "GET": 1, "HEAD": 2, "POST": 3, "PUT": 4, "DELETE": 5,
            "CONNECT": 6, "OPTIONS": 7, "TRACE": 8, "PATCH": 9}


def translate_health_checks(c: EnvoyChecker, raw, path: str) -> Optional[HealthCheck]:
    """A cluster's ``health_checks``: none, or exactly one (fastmesh runs one per cluster)."""
    if raw is None or raw == []:
        return None
    items = c.seq(raw, path)
    if not items:
        return None
    if len(items) > 1:
        c.err(path, f"{len(items)} health checks: fastmesh runs one per cluster ({NOT_YET} "
                    f"for more); keep one")
        return None
    return _health_check(c, items[0], f"{path}[0]")


def _health_check(c: EnvoyChecker, raw, path: str) -> Optional[HealthCheck]:
    m = c.message(raw, path, _HC_FIELDS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    ok = True
    for field, name in (("timeout", "timeout_ms"), ("interval", "interval_ms")):
        v = c.need(m, field)
        ms = None if v is _MISSING else _positive_ms(c, v, m.p(field))
        ok = ok and ms is not None
        kw[name] = ms
    for field in ("unhealthy_threshold", "healthy_threshold"):
        v = c.need(m, field)
        n = None if v is _MISSING else c.uint(_wrapped(v), m.p(field), lo=1)
        ok = ok and n is not None
        kw[field] = n
    for field, name in (("no_traffic_interval", "no_traffic_interval_ms"),
                        ("unhealthy_interval", "unhealthy_interval_ms")):
        if field in m:
            kw[name] = _positive_ms(c, m.get(field), m.p(field))
            ok = ok and kw[name] is not None
    for field, name in (("interval_jitter", "interval_jitter_ms"),
                        ("initial_jitter", "initial_jitter_ms")):
        if field in m:
            kw[name] = c.duration_ms(m.get(field), m.p(field))
            ok = ok and kw[name] is not None
    if "interval_jitter_percent" in m:
        kw["interval_jitter_pct"] = c.uint(m.get("interval_jitter_percent"),
                                           m.p("interval_jitter_percent"), hi=100)
        ok = ok and kw["interval_jitter_pct"] is not None
    for field in ("always_log_health_check_failures", "always_log_health_check_success"):
        if field in m and m.get(field) is not False:
            c.err(m.p(field), _EVENT_LOGS)
            ok = False
    if "reuse_connection" in m and not isinstance(_wrapped(m.get("reuse_connection")), bool):
        c.err(m.p("reuse_connection"),
              f"expected true or false, got {_show(m.get('reuse_connection'))}")
        ok = False
    kinds = [k for k in ("http_health_check", "tcp_health_check", "grpc_health_check",
                         "custom_health_check") if k in m]
    if not kinds:
        c.err(path, "missing the health checker: one of http_health_check or tcp_health_check")
        return None
    if len(kinds) > 1:
        c.err(path, f"one health checker only, got {' and '.join(kinds)}")
        return None
    if kinds[0] == "http_health_check":
        kw["type"] = "http"
        ok = _http(c, m.get("http_health_check"), m.p("http_health_check"), kw) and ok
    elif kinds[0] == "tcp_health_check":
        kw["type"] = "tcp"
        ok = _tcp(c, m.get("tcp_health_check"), m.p("tcp_health_check"), kw) and ok
    else:
        return None                         # refused by message()
    return HealthCheck(**kw) if ok else None


def _http(c: EnvoyChecker, raw, path: str, kw: dict) -> bool:
    m = c.message(raw, path, _HTTP_FIELDS)
    if m is None:
        return False
    ok = True
    p = c.text(c.need(m, "path"), m.p("path"))
    if p is not None and not p.startswith("/"):
        c.err(m.p("path"), f"expected a path starting with / (sent as the request target), "
                           f"got {_show(p)}")
        p = None
    ok = ok and p is not None
    kw["path"] = p
    if m.get("host"):                       # empty: the cluster's name, as Envoy
        kw["host"] = c.text(m.get("host"), m.p("host"))
        ok = ok and kw["host"] is not None
    if "codec_client_type" in m:
        codec = c.enum(m.get("codec_client_type"), m.p("codec_client_type"), _CODECS,
                       "codec client type")
        if codec is not None and codec != "HTTP1":
            c.err(m.p("codec_client_type"), f"{codec} health checks: {NOT_YET} (HTTP1 only)")
            ok = False
    if "method" in m:
        method = c.enum(m.get("method"), m.p("method"), _METHODS, "method")
        if method is not None and method not in ("GET", "METHOD_UNSPECIFIED"):
            c.err(m.p("method"), f"{method} health checks: {NOT_YET} (GET only)")
            ok = False
    if "expected_statuses" in m:
        ranges = []
        ep = m.p("expected_statuses")
        for i, item in enumerate(c.seq(m.get("expected_statuses"), ep)):
            r = _status_range(c, item, f"{ep}[{i}]")
            if r is None:
                ok = False
            else:
                ranges.append(r)
        if ranges:
            kw["expected_statuses"] = tuple(ranges)
    return ok


def _status_range(c: EnvoyChecker, raw, path: str) -> Optional[tuple[int, int]]:
    """type.v3.Int64Range [start, end), as Envoy checks it: 100 <= start < end <= 600."""
    m = c.message(raw, path, _RANGE_FIELDS)
    if m is None:
        return None
    start = c.uint(m.get("start", 0), m.p("start"), hi=2**63 - 1)
    end = c.uint(m.get("end", 0), m.p("end"), hi=2**63 - 1)
    if start is None or end is None:
        return None
    if start < 100:
        c.err(m.p("start"), f"expected start >= 100, got {start}")
        return None
    if end > 600:
        c.err(m.p("end"), f"expected end <= 600, got {end}")
        return None
    if start >= end:
        c.err(path, f"expected start < end (end is excluded), got start={start} end={end}")
        return None
    return start, end


def _tcp(c: EnvoyChecker, raw, path: str, kw: dict) -> bool:
    m = c.message(raw, path, _TCP_FIELDS)
    if m is None:
        return False
    ok = True
    if "send" in m:
        kw["send_hex"] = _payload(c, m.get("send"), m.p("send"))
        ok = kw["send_hex"] is not None
        if kw["send_hex"] == "":
            kw["send_hex"] = None
    if "receive" in m:
        rp = m.p("receive")
        got = [_payload(c, item, f"{rp}[{i}]") for i, item in
               enumerate(c.seq(m.get("receive"), rp))]
        ok = ok and all(g is not None for g in got)
        kw["receive_hex"] = tuple(g for g in got if g)
    return ok


def _payload(c: EnvoyChecker, raw, path: str) -> Optional[str]:
    """A HealthCheck.Payload: ``text`` (hex) or ``binary`` (base64 in JSON/YAML) -> hex."""
    m = c.message(raw, path, _PAYLOAD_FIELDS)
    if m is None:
        return None
    if ("text" in m) == ("binary" in m):
        c.err(path, "expected exactly one of text (hex) or binary (base64)")
        return None
    if "text" in m:
        s = c.text(m.get("text"), m.p("text"), nonempty=False)
        if s is None:
            return None
        if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})*", s):
            c.err(m.p("text"), f"invalid hex string {_show(s)}")
            return None
        return s.lower()
    s = c.text(m.get("binary"), m.p("binary"), nonempty=False)
    if s is None:
        return None
    try:
        return base64.b64decode(s, validate=True).hex()
    except (binascii.Error, ValueError):
        c.err(m.p("binary"), f"invalid base64 {_show(s)}")
        return None


def _positive_ms(c: EnvoyChecker, v, path: str) -> Optional[int]:
    ms = c.duration_ms(v, path)
    if ms == 0:
        c.err(path, "must be greater than 0s")
        return None
    return ms


def _wrapped(v):
    """A wrapper type (UInt32Value, BoolValue) is written as its plain value; a
    ``{value: ...}`` map is taken too."""
    if isinstance(v, dict) and set(v) == {"value"}:
        return v["value"]
    return v
