"""Envoy ``config.route.v3.RouteConfiguration`` (inline in an HTTP connection manager)
-> model ``RouteTable``: virtual hosts, routes, matches and actions."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..load import _domain
from ..model import (DEFAULT_ROUTE_TIMEOUT_MS, DirectResponse, HashPolicy, HeaderMatch, Mirror,
                     RetryPolicy, Route, RouteMatch, RouteTable, VirtualHost, WeightedCluster)
from ._common import _MISSING, NOT_YET, EnvoyChecker
from .filters import filter_kind, translate

_HEADERS_HERE = ("headers added or removed here apply to every route: " + NOT_YET
                 + " (put them on each route)")

_CONFIG_FIELDS = {
    "name": None, "virtual_hosts": None, "validate_clusters": None,
    "request_headers_to_add": _HEADERS_HERE, "request_headers_to_remove": _HEADERS_HERE,
    "response_headers_to_add": "response header changes: " + NOT_YET,
    "response_headers_to_remove": "response header changes: " + NOT_YET,
    "vhds": "VHDS needs ADS: " + NOT_YET,
    "internal_only_headers": "internal_only_headers: " + NOT_YET,
}
_VHOST_FIELDS = {
    "name": None, "domains": None, "routes": None,
    "request_headers_to_add": _HEADERS_HERE, "request_headers_to_remove": _HEADERS_HERE,
    "response_headers_to_add": "response header changes: " + NOT_YET,
    "response_headers_to_remove": "response header changes: " + NOT_YET,
    "require_tls": "require_tls: " + NOT_YET,
    "retry_policy": None,
    "include_request_attempt_count": None,
    "typed_per_filter_config": "per-filter config: " + NOT_YET,
}
_ROUTE_FIELDS = {
    "name": None, "match": None, "route": None, "direct_response": None,
    "request_headers_to_add": None, "request_headers_to_remove": None,
    "redirect": "redirects: " + NOT_YET,
    "filter_action": "filter_action: " + NOT_YET,
    "non_forwarding_action": "non_forwarding_action: " + NOT_YET,
    "response_headers_to_add": "response header changes: " + NOT_YET,
    "response_headers_to_remove": "response header changes: " + NOT_YET,
    "typed_per_filter_config": None,
    "metadata": "route metadata: " + NOT_YET,
    "decorator": "tracing decorators: " + NOT_YET,
}
_MATCH_FIELDS = {
    "prefix": None, "path": None, "safe_regex": None, "headers": None, "case_sensitive": None,
    "path_separated_prefix": "path_separated_prefix: " + NOT_YET,
    "path_match_policy": "path_match_policy: " + NOT_YET,
    "connect_matcher": "CONNECT: " + NOT_YET,
    "query_parameters": "query parameter matches: " + NOT_YET,
    "runtime_fraction": "runtime_fraction: " + NOT_YET,
    "grpc": "gRPC matches: " + NOT_YET,
    "tls_context": "TLS matches: " + NOT_YET,
    "dynamic_metadata": "metadata matches: " + NOT_YET,
}
_DEPRECATED_GRPC = ("deprecated in Envoy's v3 API (Envoy 1.40 still takes it, with a "
                    "warning): write max_stream_duration: {grpc_timeout_header_max, "
                    "grpc_timeout_header_offset} instead, which fastmesh translates")
_ACTION_FIELDS = {
    "cluster": None, "weighted_clusters": None, "timeout": None,
    "cluster_header": "cluster_header: " + NOT_YET,
    "cluster_specifier_plugin": "cluster_specifier_plugin: " + NOT_YET,
    "prefix_rewrite": "prefix_rewrite: " + NOT_YET,
    "regex_rewrite": "regex_rewrite: " + NOT_YET,
    "host_rewrite_literal": "host rewrites: " + NOT_YET,
    "auto_host_rewrite": "host rewrites: " + NOT_YET,
    "host_rewrite_header": "host rewrites: " + NOT_YET,
    "idle_timeout": "per-route idle_timeout: " + NOT_YET,
    "retry_policy": None,
    "request_mirror_policies": None,
    "hash_policy": None,
    "rate_limits": "rate limits: " + NOT_YET,
    "upgrade_configs": "upgrades (WebSocket): " + NOT_YET,
    "max_stream_duration": None,
    "max_grpc_timeout": _DEPRECATED_GRPC,
    "grpc_timeout_offset": _DEPRECATED_GRPC,
}
_STREAM_DURATION_FIELDS = {
    "grpc_timeout_header_max": None, "grpc_timeout_header_offset": None,
    "max_stream_duration": "a route's max_stream_duration (whole-stream limit): " + NOT_YET,
}
_HEADER_MATCHER_FIELDS = {
    "name": None, "string_match": None, "present_match": None, "invert_match": None,
    "exact_match": None, "prefix_match": None, "safe_regex_match": None,
    "suffix_match": "suffix matches: " + NOT_YET,
    "contains_match": "contains matches: " + NOT_YET,
    "range_match": "range matches: " + NOT_YET,
    "treat_missing_header_as_empty": "treat_missing_header_as_empty: " + NOT_YET,
}
_STRING_MATCHER_FIELDS = {
    "exact": None, "prefix": None, "safe_regex": None, "ignore_case": None,
    "suffix": "suffix matches: " + NOT_YET, "contains": "contains matches: " + NOT_YET,
    "custom": "custom matchers: " + NOT_YET,
}


def translate_route_config(c: EnvoyChecker, raw, path: str, table_name: str,
                           known_clusters: Optional[set],
                           filters: Optional[dict] = None) -> Optional[RouteTable]:
    """filters: the listener's HTTP filters that take a per-route config, name -> kind."""
    m = c.message(raw, path, _CONFIG_FIELDS)
    if m is None:
        return None
    if "name" in m:
        c.text(m.get("name"), m.p("name"), nonempty=False)
    if "validate_clusters" in m:
        # false: Envoy would accept a route to a missing cluster (and answer 503); fastmesh
        # still refuses it, which is a clear refusal rather than a different meaning.
        c.boolean(m.get("validate_clusters"), m.p("validate_clusters"))
    vhosts = []
    names: dict = {}
    domains_seen: dict = {}
    vp = m.p("virtual_hosts")
    raw_vhosts = m.get("virtual_hosts", [])
    for i, item in enumerate(c.seq(raw_vhosts, vp)):
        vh = _virtual_host(c, item, f"{vp}[{i}]", names, domains_seen, known_clusters,
                           filters or {})
        if vh is not None:
            vhosts.append(vh)
    if isinstance(raw_vhosts, list) and not raw_vhosts:
        c.err(vp, "no virtual hosts: a route table that answers 404 to everything is "
                  + NOT_YET)
    # Envoy matches the Host header as sent (strip_matching_host_port and strip_any_host_port
    # default to false): "api.local:8080" does not select the domain "api.local".
    return RouteTable(name=table_name, virtual_hosts=tuple(vhosts), strip_host_port=False)


def _virtual_host(c: EnvoyChecker, raw, p: str, names: dict, domains_seen: dict,
                  known_clusters: Optional[set], filters: dict) -> Optional[VirtualHost]:
    m = c.message(raw, p, _VHOST_FIELDS)
    if m is None:
        return None
    name = c.unique_name(c.need(m, "name"), m.p("name"), "virtual host", names)
    domains = []
    dp = m.p("domains")
    d_raw = c.need(m, "domains")
    for j, d in enumerate(() if d_raw is _MISSING else c.seq(d_raw, dp, nonempty=True)):
        dom = _domain(c, d, f"{dp}[{j}]")
        if dom is None:
            continue
        if dom in domains_seen:
            c.err(f"{dp}[{j}]", f"duplicate domain {dom!r} (also {domains_seen[dom]})")
        else:
            domains_seen[dom] = f"{dp}[{j}]"
        domains.append(dom)
    attempt_count = bool("include_request_attempt_count" in m and c.boolean(
        m.get("include_request_attempt_count"), m.p("include_request_attempt_count")))
    vh_retry = None
    if "retry_policy" in m:     # for the routes without their own
        vh_retry = translate_retry_policy(c, m.get("retry_policy"), m.p("retry_policy"))
    rp = m.p("routes")
    routes = []
    r_raw = m.get("routes", [])
    for i, item in enumerate(c.seq(r_raw, rp)):
        r = _route(c, item, f"{rp}[{i}]", known_clusters, filters)
        if r is not None:
            if vh_retry is not None and r.retry_policy is None and r.direct_response is None:
                r = dataclasses.replace(r, retry_policy=vh_retry)
            if attempt_count:
                r = dataclasses.replace(r, attempt_count_header=True)
            routes.append(r)
    if isinstance(r_raw, list) and not r_raw:
        c.err(rp, "no routes: a virtual host that answers 404 to everything is " + NOT_YET)
    return VirtualHost(name=name, domains=tuple(domains), routes=tuple(routes))


def _route(c: EnvoyChecker, raw, p: str, known_clusters: Optional[set],
           filters: dict) -> Optional[Route]:
    m = c.message(raw, p, _ROUTE_FIELDS)
    if m is None:
        return None
    if "name" in m:
        c.text(m.get("name"), m.p("name"), nonempty=False)
    kw: dict = {}
    match = c.need(m, "match")
    kw["match"] = RouteMatch() if match is _MISSING else _match(c, match, m.p("match"))
    actions = [a for a in ("route", "direct_response", "redirect", "filter_action",
                           "non_forwarding_action") if a in m]
    if not actions:
        c.err(p, "missing an action (route or direct_response)")
    elif len(actions) > 1:
        c.err(p, f"expected one action, got {', '.join(actions)}")
    if "route" in m:
        kw.update(_action(c, m.get("route"), m.p("route"), known_clusters))
    if "direct_response" in m:
        kw["direct_response"] = _direct(c, m.get("direct_response"), m.p("direct_response"))
    if "typed_per_filter_config" in m:
        kw.update(_per_filter(c, m.get("typed_per_filter_config"),
                              m.p("typed_per_filter_config"), filters))
    if "request_headers_to_add" in m:
        kw["request_headers_to_add"] = _headers_to_add(c, m.get("request_headers_to_add"),
                                                       m.p("request_headers_to_add"))
    if "request_headers_to_remove" in m:
        rp = m.p("request_headers_to_remove")
        out = []
        for i, n in enumerate(c.seq(m.get("request_headers_to_remove"), rp)):
            s = c.text(n, f"{rp}[{i}]")
            if s is not None:
                out.append(s.lower())
        kw["request_headers_to_remove"] = tuple(out)
        both = {n for n, _ in kw.get("request_headers_to_add", ())} & set(out)
        if both:
            c.err(rp, f"{', '.join(sorted(both))}: both removed and added by the same route "
                      f"(the outcome depends on the order of the two): {NOT_YET}")
    return Route(**kw)


def _match(c: EnvoyChecker, raw, p: str) -> RouteMatch:
    m = c.message(raw, p, _MATCH_FIELDS)
    if m is None:
        return RouteMatch()
    kinds = [k for k in ("prefix", "path", "safe_regex") if k in m]
    if not kinds:
        c.err(p, "missing a path match (prefix, path or safe_regex)")
    elif len(kinds) > 1:
        c.err(p, f"expected one path match, got {', '.join(kinds)}")
    if "case_sensitive" in m:
        if c.boolean(m.get("case_sensitive"), m.p("case_sensitive")) is False:
            c.err(m.p("case_sensitive"), "case-insensitive path matches: " + NOT_YET)
    kw: dict = {}
    if "prefix" in m:
        s = c.text(m.get("prefix"), m.p("prefix"), nonempty=False)
        if s is not None:
            if "?" in s:
                c.err(m.p("prefix"), "a prefix with '?' (Envoy matches it against the query "
                                     "string too): " + NOT_YET)
            elif s == "":
                pass                                     # matches every path
            elif not s.startswith("/"):
                c.err(m.p("prefix"), f'a prefix not starting with "/" ({s!r}): ' + NOT_YET)
            else:
                kw["prefix"] = s
    if "path" in m:
        s = c.text(m.get("path"), m.p("path"))
        if s is not None and not s.startswith("/"):
            c.err(m.p("path"), f'a path not starting with "/" ({s!r}): ' + NOT_YET)
        kw["path"] = s
    if "safe_regex" in m:
        kw["regex"] = _regex(c, m.get("safe_regex"), m.p("safe_regex"))
    if "headers" in m:
        hp = m.p("headers")
        kw["headers"] = tuple(_header_match(c, h, f"{hp}[{i}]")
                              for i, h in enumerate(c.seq(m.get("headers"), hp)))
    return RouteMatch(**kw)


def _regex(c: EnvoyChecker, raw, p: str) -> Optional[str]:
    """A type.matcher.v3.RegexMatcher: RE2 in Envoy, compiled with Python ``re`` here."""
    m = c.message(raw, p, {"regex": None, "google_re2": None})
    if m is None:
        return None
    if "google_re2" in m:                     # deprecated, empty: the default engine
        c.message(m.get("google_re2"), m.p("google_re2"), {
            "max_program_size": "max_program_size: " + NOT_YET})
    return c.regex(c.need(m, "regex"), m.p("regex"))


def _header_match(c: EnvoyChecker, raw, p: str) -> Optional[HeaderMatch]:
    m = c.message(raw, p, _HEADER_MATCHER_FIELDS)
    if m is None:
        return None
    name = c.text(c.need(m, "name"), m.p("name"))
    if name is not None:
        name = name.lower()
        if name.startswith(":") or name == "host":
            c.err(m.p("name"), f"{name!r}: matching pseudo-headers (and host, which Envoy "
                               f"sees as :authority) is {NOT_YET}")
    if "invert_match" in m:
        if c.boolean(m.get("invert_match"), m.p("invert_match")) is True:
            c.err(m.p("invert_match"), "inverted header matches: " + NOT_YET)
    kinds = [k for k in ("string_match", "present_match", "exact_match", "prefix_match",
                         "safe_regex_match") if k in m]
    if len(kinds) > 1:
        c.err(p, f"expected one header match, got {', '.join(kinds)}")
    kw: dict = {}
    if not kinds:
        kw["present"] = True                 # no match given: the header must be present
    if "present_match" in m:
        v = c.boolean(m.get("present_match"), m.p("present_match"))
        if v is False:
            c.err(m.p("present_match"), "present_match: false: " + NOT_YET
                  + " (its meaning changed between Envoy releases)")
        kw["present"] = True
    if "exact_match" in m:
        kw["exact"] = c.text(m.get("exact_match"), m.p("exact_match"), nonempty=False)
    if "prefix_match" in m:
        kw["prefix"] = c.text(m.get("prefix_match"), m.p("prefix_match"))
    if "safe_regex_match" in m:
        kw["regex"] = _regex(c, m.get("safe_regex_match"), m.p("safe_regex_match"))
    if "string_match" in m:
        sp = m.p("string_match")
        s = c.message(m.get("string_match"), sp, _STRING_MATCHER_FIELDS)
        if s is not None:
            sk = [k for k in ("exact", "prefix", "safe_regex", "suffix", "contains", "custom")
                  if k in s]
            if len(sk) != 1:
                c.err(sp, "expected exactly one of exact, prefix, safe_regex"
                          + (f" (got {', '.join(sk)})" if sk else ""))
            if "ignore_case" in s:
                if c.boolean(s.get("ignore_case"), s.p("ignore_case")) is True:
                    c.err(s.p("ignore_case"), "case-insensitive header matches: " + NOT_YET)
            if "exact" in s:
                kw["exact"] = c.text(s.get("exact"), s.p("exact"), nonempty=False)
            if "prefix" in s:
                kw["prefix"] = c.text(s.get("prefix"), s.p("prefix"))
            if "safe_regex" in s:
                kw["regex"] = _regex(c, s.get("safe_regex"), s.p("safe_regex"))
    return HeaderMatch(name=name, **kw)


def _action(c: EnvoyChecker, raw, p: str, known_clusters: Optional[set]) -> dict:
    m = c.message(raw, p, _ACTION_FIELDS)
    if m is None:
        return {}
    kw: dict = {"timeout_ms": DEFAULT_ROUTE_TIMEOUT_MS}
    if ("cluster" in m) == ("weighted_clusters" in m):
        c.err(p, "expected exactly one of cluster, weighted_clusters")
    if "cluster" in m:
        kw["cluster"] = _cluster_ref(c, m.get("cluster"), m.p("cluster"), known_clusters)
    if "weighted_clusters" in m:
        kw["weighted_clusters"] = _weighted(c, m.get("weighted_clusters"),
                                            m.p("weighted_clusters"), known_clusters)
    if "timeout" in m:
        kw["timeout_ms"] = c.duration_ms(m.get("timeout"), m.p("timeout"))
    if "max_stream_duration" in m:
        sd = c.message(m.get("max_stream_duration"), m.p("max_stream_duration"),
                       _STREAM_DURATION_FIELDS)
        if sd is not None and "grpc_timeout_header_max" in sd:
            kw["grpc_timeout_header_max_ms"] = c.duration_ms(
                sd.get("grpc_timeout_header_max"), sd.p("grpc_timeout_header_max"))
        if sd is not None and "grpc_timeout_header_offset" in sd:
            kw["grpc_timeout_header_offset_ms"] = c.duration_ms(
                sd.get("grpc_timeout_header_offset"), sd.p("grpc_timeout_header_offset"))
    if "retry_policy" in m:
        kw["retry_policy"] = translate_retry_policy(c, m.get("retry_policy"),
                                                    m.p("retry_policy"))
    if "hash_policy" in m:
        kw["hash_policy"] = _hash_policies(c, m.get("hash_policy"), m.p("hash_policy"))
    if "request_mirror_policies" in m:
        kw["mirrors"] = _mirrors(c, m.get("request_mirror_policies"),
                                 m.p("request_mirror_policies"), known_clusters)
    return kw


_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10000, "MILLION": 1000000}


def _mirrors(c: EnvoyChecker, raw, p: str, known_clusters: Optional[set]) -> tuple:
    out = []
    for i, item in enumerate(c.seq(raw, p)):
        ip = f"{p}[{i}]"
        m = c.message(item, ip, {
            "cluster": None, "runtime_fraction": None, "trace_sampled": None,
            "disable_shadow_host_suffix_append": None,
            "cluster_header": "cluster_header: " + NOT_YET,
            "request_headers_mutations": "request_headers_mutations: " + NOT_YET})
        if m is None:
            continue
        name = _cluster_ref(c, c.need(m, "cluster"), m.p("cluster"), known_clusters)
        per_million = 1000000
        if "runtime_fraction" in m:
            rf = c.message(m.get("runtime_fraction"), m.p("runtime_fraction"),
                           {"default_value": None, "runtime_key": None})
            dv = rf.get("default_value") if rf is not None else None
            d = c.message(dv, rf.p("default_value"), {"numerator": None, "denominator": None}) \
                if rf is not None and "default_value" in rf else None
            if d is not None:
                num = c.uint(d.get("numerator", 0), d.p("numerator"))
                den = c.enum(d.get("denominator", "HUNDRED"), d.p("denominator"),
                             {"HUNDRED": 0, "TEN_THOUSAND": 1, "MILLION": 2}, "denominator")
                if num is not None and den is not None:
                    per_million = min(1000000, num * (1000000 // _DENOMINATORS[den]))
            elif rf is not None:
                per_million = 0         # a runtime key with no default and no runtime: 0%
        suffix = not ("disable_shadow_host_suffix_append" in m and c.boolean(
            m.get("disable_shadow_host_suffix_append"), m.p("disable_shadow_host_suffix_append")))
        if name is not None:
            out.append(Mirror(cluster=name, per_million=per_million, host_suffix=suffix))
    return tuple(out)


def _per_filter(c: EnvoyChecker, raw, p: str, filters: dict) -> dict:
    """A route's typed_per_filter_config: {filter name: its config for this route}. For a
    fault or local rate limit filter of the listener's chain, the route's own config; for
    one of those types the chain does not have, nothing (Envoy does nothing with it
    either); any other type is refused."""
    out: dict = {}
    if not isinstance(raw, dict):
        c.err(p, "expected a mapping of filter name to config")
        return out
    for name, tc in raw.items():
        path = f"{p}.{name}"
        kind = filter_kind(tc)
        if kind is None:
            t = tc.get("@type") if isinstance(tc, dict) else None
            c.err(path, f"per-route config of type {t!r}: {NOT_YET} (supported: "
                        "HTTPFault, LocalRateLimit)")
            continue
        if filters.get(name) != kind:
            continue
        cfg = translate(c, kind, tc, path)
        if cfg is not None:
            out[kind] = cfg
    return out


def _hash_policies(c: EnvoyChecker, raw, p: str) -> tuple:
    """route.v3.RouteAction.HashPolicy: header, cookie (an existing cookie: a generated
    one, with ttl, is refused), connection_properties.source_ip, query_parameter."""
    out = []
    for i, item in enumerate(c.seq(raw, p)):
        ip = f"{p}[{i}]"
        m = c.message(item, ip, {
            "header": None, "cookie": None, "connection_properties": None,
            "query_parameter": None, "terminal": None,
            "filter_state": "filter_state hashing: " + NOT_YET})
        if m is None:
            continue
        kinds = [k for k in ("header", "cookie", "connection_properties", "query_parameter")
                 if k in m]
        if len(kinds) != 1:
            c.err(ip, "expected exactly one of header, cookie, connection_properties, "
                      "query_parameter")
            continue
        terminal = bool("terminal" in m and c.boolean(m.get("terminal"), m.p("terminal")))
        k = kinds[0]
        if k == "header":
            h = c.message(m.get(k), m.p(k), {"header_name": None,
                                             "regex_rewrite": "regex_rewrite: " + NOT_YET})
            name = c.text(c.need(h, "header_name"), h.p("header_name")) if h else None
            if name is not None:
                out.append(HashPolicy("header", name.lower(), terminal))
        elif k == "cookie":
            ck = c.message(m.get(k), m.p(k), {
                "name": None, "path": None,
                "ttl": "generated cookies (ttl): " + NOT_YET,
                "attributes": "cookie attributes: " + NOT_YET})
            name = c.text(c.need(ck, "name"), ck.p("name")) if ck else None
            if name is not None:
                out.append(HashPolicy("cookie", name, terminal))
        elif k == "connection_properties":
            cp = c.message(m.get(k), m.p(k), {"source_ip": None})
            if cp is not None and c.boolean(cp.get("source_ip", False), cp.p("source_ip")):
                out.append(HashPolicy("source_ip", "", terminal))
        else:
            q = c.message(m.get(k), m.p(k), {"name": None})
            name = c.text(c.need(q, "name"), q.p("name")) if q else None
            if name is not None:
                out.append(HashPolicy("query_parameter", name, terminal))
    return tuple(out)


# Envoy's retry_on conditions that mean something for HTTP/1 (refused-stream never happens)
_RETRY_ON = ("5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx",
             "retriable-status-codes", "refused-stream")
_PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
_PREVIOUS_HOSTS_TYPE = ("type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                        "PreviousHostsPredicate")


def translate_retry_policy(c: EnvoyChecker, raw, p: str) -> Optional[RetryPolicy]:
    """route.v3.RetryPolicy -> model.RetryPolicy (Envoy's defaults: 1 retry, 25 ms base
    back-off, max 10 x base)."""
    m = c.message(raw, p, {
        "retry_on": None, "num_retries": None, "per_try_timeout": None,
        "retry_host_predicate": None, "host_selection_retry_max_attempts": None,
        "retriable_status_codes": None, "retry_back_off": None,
        "per_try_idle_timeout": "per_try_idle_timeout: " + NOT_YET,
        "retry_priority": "retry_priority: " + NOT_YET,
        "retry_options_predicates": "retry_options_predicates: " + NOT_YET,
        "rate_limited_retry_back_off": "rate_limited_retry_back_off: " + NOT_YET,
        "retriable_headers": "retriable_headers: " + NOT_YET,
        "retriable_request_headers": "retriable_request_headers: " + NOT_YET})
    if m is None:
        return None
    kw: dict = {}
    on = c.text(m.get("retry_on", ""), m.p("retry_on"), nonempty=False) or ""
    names = [x.strip() for x in on.split(",") if x.strip()]
    for name in names:
        if name not in _RETRY_ON:
            c.err(m.p("retry_on"), f"retry condition {name!r}: {NOT_YET} (supported: "
                                   f"{', '.join(_RETRY_ON)})")
    kw["retry_on"] = tuple(n for n in names if n in _RETRY_ON)
    if "num_retries" in m:
        kw["num_retries"] = c.uint(m.get("num_retries"), m.p("num_retries"))
    if "per_try_timeout" in m:
        kw["per_try_timeout_ms"] = c.duration_ms(m.get("per_try_timeout"),
                                                 m.p("per_try_timeout"))
    if "retriable_status_codes" in m:
        sp = m.p("retriable_status_codes")
        kw["retriable_status_codes"] = tuple(
            c.uint(x, f"{sp}[{i}]", lo=100, hi=599)
            for i, x in enumerate(c.seq(m.get("retriable_status_codes"), sp)))
    if "host_selection_retry_max_attempts" in m:
        v = m.get("host_selection_retry_max_attempts")
        if isinstance(v, str) and v.isdigit():        # an int64: a string in proto JSON
            v = int(v)
        kw["host_selection_retry_max_attempts"] = c.integer(
            v, m.p("host_selection_retry_max_attempts"), lo=1)
    if "retry_back_off" in m:
        b = c.message(m.get("retry_back_off"), m.p("retry_back_off"),
                      {"base_interval": None, "max_interval": None})
        if b is not None:
            base = c.duration_ms(c.need(b, "base_interval"), b.p("base_interval"))
            kw["backoff_base_ms"] = base
            if "max_interval" in b:
                mx = c.duration_ms(b.get("max_interval"), b.p("max_interval"))
                if mx is not None and base is not None and mx < base:
                    c.err(b.p("max_interval"), "must be at least base_interval")
                kw["backoff_max_ms"] = mx
            if base == 0:
                c.err(b.p("base_interval"), "must be greater than 0s")
    for i, pred in enumerate(c.seq(m.get("retry_host_predicate", []),
                                   m.p("retry_host_predicate"))):
        pp = f"{m.p('retry_host_predicate')}[{i}]"
        pm = c.message(pred, pp, {"name": None, "typed_config": None})
        if pm is None:
            continue
        tc = pm.get("typed_config")
        t = tc.get("@type") if isinstance(tc, dict) else None
        if t == _PREVIOUS_HOSTS_TYPE or (t is None and pm.get("name") == _PREVIOUS_HOSTS):
            kw["previous_hosts"] = True
        else:
            c.err(pp, f"retry host predicate {pm.get('name')!r}: {NOT_YET} (supported: "
                      f"{_PREVIOUS_HOSTS})")
    if any(v is None for v in kw.values()) or None in kw.get("retriable_status_codes", ()):
        return None
    return RetryPolicy(**kw)


def _cluster_ref(c: EnvoyChecker, v, p: str, known_clusters: Optional[set]) -> Optional[str]:
    name = c.text(v, p)
    if name is not None and known_clusters is not None and name not in known_clusters:
        c.err(p, f"no cluster named {name!r}")
    return name


def _weighted(c: EnvoyChecker, raw, p: str, known_clusters: Optional[set]) -> tuple:
    m = c.message(raw, p, {
        "clusters": None,
        "total_weight": "total_weight (deprecated): " + NOT_YET,
        "runtime_key_prefix": "runtime_key_prefix: " + NOT_YET,
        "header_name": "header_name: " + NOT_YET,
        "random_value_specifier": "random_value_specifier: " + NOT_YET})
    if m is None:
        return ()
    out = []
    seen: dict = {}
    cp = m.p("clusters")
    cl_raw = c.need(m, "clusters")
    total = 0
    for i, item in enumerate(() if cl_raw is _MISSING else c.seq(cl_raw, cp, nonempty=True)):
        ip = f"{cp}[{i}]"
        w = c.message(item, ip, {
            "name": None, "weight": None,
            "cluster_header": "cluster_header: " + NOT_YET,
            "request_headers_to_add": "per-cluster header changes: " + NOT_YET,
            "request_headers_to_remove": "per-cluster header changes: " + NOT_YET,
            "response_headers_to_add": "response header changes: " + NOT_YET,
            "response_headers_to_remove": "response header changes: " + NOT_YET,
            "host_rewrite_literal": "host rewrites: " + NOT_YET,
            "metadata_match": "subset load balancing: " + NOT_YET,
            "typed_per_filter_config": "per-filter config: " + NOT_YET})
        if w is None:
            continue
        name = _cluster_ref(c, c.need(w, "name"), w.p("name"), known_clusters)
        if name is not None:
            if name in seen:
                c.err(w.p("name"), f"duplicate cluster {name!r} (also {seen[name]}): "
                                   + NOT_YET)
            else:
                seen[name] = ip
        weight = c.uint(w.get("weight", 0), w.p("weight"))
        if weight is None:
            continue
        total += weight
        if weight > 0:                        # weight 0: never picked, as in Envoy
            out.append(WeightedCluster(cluster=name, weight=weight))
    if cl_raw is not _MISSING and isinstance(cl_raw, list) and cl_raw and total == 0:
        c.err(cp, "the weights add up to 0")
    return tuple(out)


def _direct(c: EnvoyChecker, raw, p: str) -> Optional[DirectResponse]:
    m = c.message(raw, p, {"status": None, "body": None,
                           "body_format": "body_format: " + NOT_YET})
    if m is None:
        return None
    status = c.uint(c.need(m, "status"), m.p("status"), lo=200, hi=599)
    kw = {}
    if "body" in m:
        b = c.message(m.get("body"), m.p("body"), {
            "inline_string": None,
            "inline_bytes": "inline_bytes: " + NOT_YET + " (use inline_string)",
            "filename": "bodies from files: " + NOT_YET,
            "environment_variable": "bodies from the environment: " + NOT_YET})
        if b is not None and "inline_string" in b:
            kw["body"] = c.text(b.get("inline_string"), b.p("inline_string"), nonempty=False)
    return DirectResponse(status=status, **kw)


def _headers_to_add(c: EnvoyChecker, raw, p: str) -> tuple:
    """HeaderValueOption[]: only Envoy's default append action (add another value)."""
    out = []
    for i, item in enumerate(c.seq(raw, p)):
        ip = f"{p}[{i}]"
        m = c.message(item, ip, {"header": None, "append": None, "append_action": None,
                                 "keep_empty_value": None})
        if m is None:
            continue
        if "append" in m:
            if c.boolean(m.get("append"), m.p("append")) is False:
                c.err(m.p("append"), "append: false (overwrite): " + NOT_YET)
            if "append_action" in m:
                c.err(m.p("append"), "append and append_action cannot both be given")
        if "append_action" in m:
            a = c.enum(m.get("append_action"), m.p("append_action"), {
                "APPEND_IF_EXISTS_OR_ADD": 0, "ADD_IF_ABSENT": 1,
                "OVERWRITE_IF_EXISTS_OR_ADD": 2, "OVERWRITE_IF_EXISTS": 3}, "append_action")
            if a not in (None, "APPEND_IF_EXISTS_OR_ADD"):
                c.err(m.p("append_action"), f"{a}: {NOT_YET}")
        keep_empty = False
        if "keep_empty_value" in m:
            keep_empty = c.boolean(m.get("keep_empty_value"), m.p("keep_empty_value"))
        h = c.need(m, "header")
        if h is _MISSING:
            continue
        hm = c.message(h, m.p("header"), {"key": None, "value": None,
                                          "raw_value": "raw_value: " + NOT_YET})
        if hm is None:
            continue
        key = c.text(c.need(hm, "key"), hm.p("key"))
        value = c.header_value(hm.get("value", ""), hm.p("value"))
        if key is not None and (key.startswith(":") or key.lower() == "host"):
            c.err(hm.p("key"), f"{key!r}: adding pseudo-headers or host: {NOT_YET}")
        if key is None or value is None:
            continue
        if value == "" and not keep_empty:
            continue                          # Envoy does not add an empty value
        out.append((key.lower(), value))
    return tuple(out)


__all__ = ["translate_route_config"]
