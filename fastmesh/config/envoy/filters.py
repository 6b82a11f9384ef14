"""Envoy HTTP filters fastmesh runs before the router: envoy.filters.http.fault
(``HTTPFault``) and envoy.filters.http.local_ratelimit (``LocalRateLimit``), at listener
level (the HTTP connection manager's http_filters) and per route (typed_per_filter_config,
keyed by the filter's name in the chain). Envoy's semantics for what is unset: a percentage
left out is 0% (no fault), an unset filter_enabled / filter_enforced is 0% (no limiting)."""
from __future__ import annotations

from typing import Optional

from ..model import Fault, LocalRateLimit
from ._common import NOT_YET, EnvoyChecker

FAULT_TYPE = "envoy.extensions.filters.http.fault.v3.HTTPFault"
RATELIMIT_TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
KIND_OF_TYPE = {"type.googleapis.com/" + FAULT_TYPE: "fault",
                "type.googleapis.com/" + RATELIMIT_TYPE: "local_rate_limit"}
# per million, what one unit of each FractionalPercent denominator is worth
_UNIT = {"HUNDRED": 10000, "TEN_THOUSAND": 100, "MILLION": 1}
_DENOMINATORS = {"HUNDRED": 0, "TEN_THOUSAND": 1, "MILLION": 2}


def filter_kind(tc) -> Optional[str]:
    """"fault" / "local_rate_limit" for a typed_config of those types, else None."""
    return KIND_OF_TYPE.get(tc.get("@type")) if isinstance(tc, dict) else None


def translate(c: EnvoyChecker, kind: str, raw, path: str):
    return (translate_fault if kind == "fault" else translate_local_rate_limit)(c, raw, path)


def _percent(c: EnvoyChecker, raw, path: str) -> tuple[Optional[int], int]:
    """type.v3.FractionalPercent -> (per million, the per-million unit of its denominator)."""
    m = c.message(raw, path, {"numerator": None, "denominator": None})
    if m is None:
        return None, 10000
    den = c.enum(m.get("denominator", "HUNDRED"), m.p("denominator"), _DENOMINATORS,
                 "denominator") or "HUNDRED"
    num = c.uint(m.get("numerator", 0), m.p("numerator"))
    if num is None:
        return None, _UNIT[den]
    return min(1000000, num * _UNIT[den]), _UNIT[den]


def translate_fault(c: EnvoyChecker, raw, path: str) -> Optional[Fault]:
    m = c.typed_config(raw, path, FAULT_TYPE, {
        "abort": None, "delay": None, "max_active_faults": None,
        "upstream_cluster": "upstream_cluster: " + NOT_YET,
        "downstream_nodes": "downstream_nodes: " + NOT_YET,
        "headers": "header-matched faults: " + NOT_YET,
        "response_rate_limit": "response_rate_limit: " + NOT_YET,
        "delay_percent_runtime": None, "abort_percent_runtime": None,
        "delay_duration_runtime": None, "abort_http_status_runtime": None,
        "max_active_faults_runtime": None, "response_rate_limit_percent_runtime": None,
        "abort_grpc_status_runtime": None,
        "disable_downstream_cluster_stats": None,
        "filter_metadata": "filter_metadata: " + NOT_YET})
    if m is None:
        return None
    kw: dict = {}
    for part, fixed in (("abort", "http_status"), ("delay", "fixed_delay")):
        if part in m:
            kw.update(_fault_part(c, m, part, fixed))
    if "max_active_faults" in m:
        kw["max_active_faults"] = c.uint(m.get("max_active_faults"), m.p("max_active_faults"))
    if any(v is None for v in kw.values()):
        return None
    return Fault(**kw)


def _fault_part(c: EnvoyChecker, m, part: str, fixed: str) -> dict:
    """A FaultAbort or FaultDelay: its fixed status / delay, whether a header chooses it, and
    its share (Envoy: a percentage left out is 0%)."""
    fields = {fixed: None, f"header_{part}": None, "percentage": None}
    if part == "abort":
        fields["grpc_status"] = "gRPC aborts: " + NOT_YET
    a = c.message(m.get(part), m.p(part), fields)
    if a is None:
        return {}
    kw: dict = {}
    if fixed in a:
        kw["abort_status" if part == "abort" else "delay_ms"] = (
            c.uint(a.get(fixed), a.p(fixed), lo=200, hi=599) if part == "abort"
            else c.duration_ms(a.get(fixed), a.p(fixed)))
    if f"header_{part}" in a:
        c.message(a.get(f"header_{part}"), a.p(f"header_{part}"), {})
        kw[f"{part}_from_header"] = True
    if fixed not in a and f"header_{part}" not in a:
        c.err(a.p(fixed), f"missing required field (or header_{part})")
    kw[f"{part}_per_million"], kw[f"{part}_header_unit"] = (
        _percent(c, a.get("percentage"), a.p("percentage")) if "percentage" in a
        else (0, 10000))
    return kw


def translate_local_rate_limit(c: EnvoyChecker, raw, path: str) -> Optional[LocalRateLimit]:
    """A LocalRateLimit; None (and no error) when it has no token_bucket (the filter does
    nothing at this level, as in Envoy)."""
    m = c.typed_config(raw, path, RATELIMIT_TYPE, {
        "stat_prefix": None, "token_bucket": None, "filter_enabled": None,
        "filter_enforced": None, "status": None, "response_headers_to_add": None,
        "enable_x_ratelimit_headers": None, "stage": None,
        "always_consume_default_token_bucket": None,
        "request_headers_to_add_when_not_enforced":
            "request_headers_to_add_when_not_enforced: " + NOT_YET,
        "descriptors": "rate limit descriptors: " + NOT_YET,
        "local_rate_limit_per_downstream_connection":
            "per-connection buckets: " + NOT_YET,
        "local_cluster_rate_limit": "local_cluster_rate_limit: " + NOT_YET,
        "rate_limited_as_resource_exhausted": None,
        "vh_rate_limits": "vh_rate_limits: " + NOT_YET,
        "enable_x_ratelimit_headers_in_response": None,
        "rate_limits": "rate_limits: " + NOT_YET})
    if m is None:
        return None
    c.text(c.need(m, "stat_prefix"), m.p("stat_prefix"), nonempty=False)
    if "local_rate_limit_per_downstream_connection" in m and \
            m.get("local_rate_limit_per_downstream_connection") is False:
        pass
    if "stage" in m and c.uint(m.get("stage"), m.p("stage"), hi=10):
        c.err(m.p("stage"), "stages: " + NOT_YET)
    if "rate_limited_as_resource_exhausted" in m and c.boolean(
            m.get("rate_limited_as_resource_exhausted"),
            m.p("rate_limited_as_resource_exhausted")):
        c.err(m.p("rate_limited_as_resource_exhausted"), "gRPC status: " + NOT_YET)
    if "token_bucket" not in m:
        return None
    tb = c.message(m.get("token_bucket"), m.p("token_bucket"), {
        "max_tokens": None, "tokens_per_fill": None, "fill_interval": None})
    if tb is None:
        return None
    kw: dict = {"max_tokens": c.uint(c.need(tb, "max_tokens"), tb.p("max_tokens"), lo=1)}
    if "tokens_per_fill" in tb:
        kw["tokens_per_fill"] = c.uint(tb.get("tokens_per_fill"), tb.p("tokens_per_fill"),
                                       lo=1)
    ms = c.duration_ms(c.need(tb, "fill_interval"), tb.p("fill_interval"))
    if ms is not None and ms < 50:
        c.err(tb.p("fill_interval"), "must be at least 50ms (as Envoy)")
    kw["fill_interval_ms"] = ms
    for field, name in (("filter_enabled", "enabled_per_million"),
                        ("filter_enforced", "enforced_per_million")):
        if field not in m:
            kw[name] = 0                # Envoy: unset is 0%
            continue
        f = c.message(m.get(field), m.p(field), {"default_value": None, "runtime_key": None})
        if f is None:
            continue
        c.text(c.need(f, "runtime_key"), f.p("runtime_key"))
        kw[name] = (_percent(c, f.get("default_value"), f.p("default_value"))[0]
                    if "default_value" in f else 0)
    if "status" in m:
        st = c.message(m.get("status"), m.p("status"), {"code": None})
        if st is not None:
            kw["status"] = _status_code(c, st.get("code"), st.p("code"))
    if "response_headers_to_add" in m:
        out = []
        hp = m.p("response_headers_to_add")
        for i, h in enumerate(c.seq(m.get("response_headers_to_add"), hp)):
            hm = c.message(h, f"{hp}[{i}]", {"header": None, "append_action": None,
                                             "append": None, "keep_empty_value": None})
            hv = c.message(hm.get("header"), hm.p("header"), {"key": None, "value": None}) \
                if hm is not None else None
            if hv is not None:
                k = c.text(c.need(hv, "key"), hv.p("key"))
                v = c.header_value(hv.get("value", ""), hv.p("value"))
                if k is not None and v is not None:
                    out.append((k.lower(), v))
        kw["response_headers_to_add"] = tuple(out)
    if "enable_x_ratelimit_headers" in m:
        x = c.enum(m.get("enable_x_ratelimit_headers"), m.p("enable_x_ratelimit_headers"),
                   {"OFF": 0, "DRAFT_VERSION_03": 1}, "enable_x_ratelimit_headers")
        kw["x_ratelimit_headers"] = x == "DRAFT_VERSION_03"
    if any(v is None for v in kw.values()):
        return None
    return LocalRateLimit(**kw)


_STATUS_CODES = {"TooManyRequests": 429, "ServiceUnavailable": 503, "Forbidden": 403,
                 "BadRequest": 400, "InternalServerError": 500, "OK": 200,
                 "Unauthorized": 401, "NotFound": 404}


def _status_code(c: EnvoyChecker, v, path: str) -> Optional[int]:
    """type.v3.StatusCode: a name (TooManyRequests) or its number."""
    if isinstance(v, str) and v in _STATUS_CODES:
        return _STATUS_CODES[v]
    if isinstance(v, int) and not isinstance(v, bool) and 200 <= v <= 599:
        return v
    c.err(path, f"expected an HTTP status (a number or a name such as TooManyRequests), "
                f"got {v!r}")
    return None
