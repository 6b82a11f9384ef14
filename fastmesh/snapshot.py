"""Compile the typed config model into the data world's objects: route tables and clusters.

A snapshot is immutable once built. Applying a new config builds a new snapshot; clusters
whose settings are unchanged are carried over (their connection pools and counters live on),
everything else is new. Listeners pick up the new route tables for their next request.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fastmesh._core.filters import FAULT, RATELIMIT, FaultPolicy, TokenBucket
from fastmesh._core.retry import RetryPolicy
from fastmesh._core.router import HeaderMatcher, Route, RouteTable, VirtualHost
from fastmesh._core.upstream import Cluster
from fastmesh.config import model

# MatchKind / ActionKind values of router.pxd
M_ANY, M_EXACT, M_PREFIX, M_REGEX, M_ABSENT = 0, 1, 2, 3, 4
A_CLUSTER, A_WEIGHTED, A_DIRECT = 0, 1, 2
FILTER_KINDS = {"fault": FAULT, "local_rate_limit": RATELIMIT}
HASH_KINDS = {"header": 0, "cookie": 1, "source_ip": 2, "query_parameter": 3}  # http_proxy.pyx


@dataclass(frozen=True)
class Snapshot:
    config: model.Config
    route_tables: dict        # name -> RouteTable
    clusters: dict            # name -> Cluster (Cython)
    version: int


def _header_matcher(m: model.HeaderMatch) -> HeaderMatcher:
    name = m.name.encode()
    if m.exact is not None:
        return HeaderMatcher(name, M_EXACT, m.exact.encode())
    if m.prefix is not None:
        return HeaderMatcher(name, M_PREFIX, m.prefix.encode())
    if m.regex is not None:
        return HeaderMatcher(name, M_REGEX, None, re.compile(m.regex.encode()))
    return HeaderMatcher(name, M_ANY if m.present else M_ABSENT)


def _route(r: model.Route, name: str, clusters: dict) -> Route:
    mt = r.match
    if mt.path is not None:
        path_kind, path, rx = M_EXACT, mt.path.encode(), None
    elif mt.prefix is not None:
        path_kind, path, rx = M_PREFIX, mt.prefix.encode(), None
    elif mt.regex is not None:
        path_kind, path, rx = M_REGEX, None, re.compile(mt.regex.encode())
    else:
        path_kind, path, rx = M_ANY, None, None
    headers = tuple(_header_matcher(h) for h in mt.headers)
    weighted, weights, cluster = (), (), None
    status, body = 0, b""
    if r.direct_response is not None:
        action = A_DIRECT
        status, body = r.direct_response.status, r.direct_response.body.encode()
    elif r.weighted_clusters:
        action = A_WEIGHTED
        weighted = tuple(clusters[w.cluster] for w in r.weighted_clusters)
        weights = tuple(w.weight for w in r.weighted_clusters)
    else:
        action = A_CLUSTER
        cluster = clusters[r.cluster]
    add = tuple((n.encode(), v.encode()) for n, v in r.request_headers_to_add)
    remove = tuple(n.encode() for n in r.request_headers_to_remove)
    route = Route(name, path_kind, path, rx, headers, action, cluster, weighted, weights,
                  status, body, r.timeout_ms, add, remove)
    rp = r.retry_policy
    if rp is not None:
        route.retry = RetryPolicy(
            rp.retry_on, rp.num_retries, per_try_timeout_ms=rp.per_try_timeout_ms,
            backoff_base_ms=rp.backoff_base_ms,
            backoff_max_ms=rp.backoff_max_ms if rp.backoff_max_ms is not None
            else 10 * rp.backoff_base_ms,
            previous_hosts=rp.previous_hosts,
            host_selection_attempts=rp.host_selection_retry_max_attempts,
            status_codes=rp.retriable_status_codes, bolt_statuses=rp.bolt_statuses)
    route.attempt_count_header = r.attempt_count_header
    if r.grpc_timeout_header_max_ms is not None:
        route.grpc_timeout_max_ms = r.grpc_timeout_header_max_ms
        route.grpc_timeout_offset_ms = r.grpc_timeout_header_offset_ms or 0
    if r.fault is not None:
        route.fault = fault_policy(r.fault)
    if r.local_rate_limit is not None:
        route.ratelimit = token_bucket(r.local_rate_limit)
    if r.mirrors:
        route.mirrors = tuple((clusters[mr.cluster], mr.per_million, mr.host_suffix)
                              for mr in r.mirrors)
    if r.hash_policy:
        route.hash_policy = tuple((HASH_KINDS[hp.kind], hp.name.encode(), hp.terminal)
                                  for hp in r.hash_policy)
    return route


def fault_policy(f: model.Fault) -> FaultPolicy:
    return FaultPolicy(f.abort_status, f.abort_per_million, f.abort_from_header,
                       f.abort_header_unit, f.delay_ms, f.delay_per_million,
                       f.delay_from_header, f.delay_header_unit, f.max_active_faults)


def token_bucket(rl: model.LocalRateLimit) -> TokenBucket:
    from fastmesh._core.http_proxy import py_now_ms
    extra = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode())
                     for n, v in rl.response_headers_to_add)
    return TokenBucket(rl.max_tokens, rl.tokens_per_fill, rl.fill_interval_ms,
                       rl.enabled_per_million, rl.enforced_per_million, rl.status,
                       rl.x_ratelimit_headers, extra, py_now_ms())


def compile_route_table(t: model.RouteTable, clusters: dict) -> RouteTable:
    vhosts, domains = [], []
    for vh in t.virtual_hosts:
        routes = tuple(_route(r, f"{vh.name}/{i}", clusters) for i, r in enumerate(vh.routes))
        v = VirtualHost(vh.name, routes)
        vhosts.append(v)
        domains.extend((d.encode(), v) for d in vh.domains)
    return RouteTable(t.name, tuple(vhosts), domains, t.strip_host_port)


def _cluster_settings(c: model.Cluster) -> tuple:
    return (c.lb_policy, c.http_protocol, c.connect_timeout_ms, c.max_idle_per_endpoint,
            c.idle_timeout_ms,
            c.connections_per_endpoint, c.heartbeat_interval_ms, c.heartbeat_max_missed,
            c.min_ring_size, c.max_ring_size, c.maglev_table_size, c.original_dst, c.tls,
            c.http2)


def new_cluster(c: model.Cluster) -> Cluster:
    cl = Cluster(c.name, lb_policy=c.lb_policy, connect_timeout_ms=c.connect_timeout_ms,
                 max_idle_per_endpoint=c.max_idle_per_endpoint,
                 idle_timeout_ms=c.idle_timeout_ms,
                 connections_per_endpoint=c.connections_per_endpoint,
                 heartbeat_interval_ms=c.heartbeat_interval_ms,
                 heartbeat_max_missed=c.heartbeat_max_missed,
                 min_ring_size=c.min_ring_size, max_ring_size=c.max_ring_size,
                 maglev_table_size=c.maglev_table_size)
    cl.http2 = c.http_protocol == "http2"
    s = c.http2
    cl.h2_settings = (s.max_concurrent_streams, s.initial_stream_window_bytes,
                      s.initial_connection_window_bytes, s.hpack_table_bytes)
    if c.tls is not None:
        from fastmesh.tls import client_config
        cl.tls = client_config(c.tls, c.name, cl.http2)
    od = c.original_dst
    if od is not None:
        cl.configure_original_dst(od.http_header_name if od.use_http_header else None,
                                  od.port_override, od.cleanup_interval_ms)
    configure_health(cl, c)
    return cl


def configure_health(cl: Cluster, c: model.Cluster) -> None:
    """Panic threshold, circuit breakers and outlier detection: set in place, so a cluster
    carried over to a new snapshot keeps its pools, counters and its endpoints' health."""
    cl.panic_threshold_pct = c.healthy_panic_threshold_pct
    cb = c.circuit_breakers or model.CircuitBreakers()
    cl.configure_breakers(cb.max_connections, cb.max_pending_requests, cb.max_requests,
                          cb.max_retries)
    od = c.outlier_detection
    if od is None:
        cl.configure_outlier()          # off
    else:
        cl.configure_outlier(
            consecutive_5xx=od.consecutive_5xx,
            consecutive_gateway=od.consecutive_gateway_failure,
            enforcing_5xx_pct=od.enforcing_consecutive_5xx_pct,
            enforcing_gateway_pct=od.enforcing_consecutive_gateway_failure_pct,
            interval_ms=od.interval_ms, base_ejection_ms=od.base_ejection_time_ms,
            max_ejection_ms=od.max_ejection_time_ms, max_ejection_pct=od.max_ejection_pct,
            split=od.split_external_local_origin_errors,
            consecutive_local=od.consecutive_local_origin_failure,
            enforcing_local_pct=od.enforcing_consecutive_local_origin_failure_pct)
    cl.refresh_health()


def build(cfg: model.Config, previous: Snapshot | None = None) -> Snapshot:
    """Build a snapshot; reuse the previous snapshot's Cluster objects whose settings and
    endpoint list are unchanged."""
    clusters = {}
    for name, c in cfg.clusters.items():
        old = previous.clusters.get(name) if previous else None
        old_cfg = previous.config.clusters.get(name) if previous else None
        if (old is not None and old_cfg is not None
                and _cluster_settings(old_cfg) == _cluster_settings(c)):
            clusters[name] = old
            if (old_cfg.outlier_detection, old_cfg.healthy_panic_threshold_pct,
                    old_cfg.circuit_breakers) != (c.outlier_detection,
                                                  c.healthy_panic_threshold_pct,
                                                  c.circuit_breakers):
                configure_health(old, c)
        else:
            clusters[name] = new_cluster(c)
    tables = {name: compile_route_table(t, clusters) for name, t in cfg.route_tables.items()}
    version = previous.version + 1 if previous else 1
    return Snapshot(cfg, tables, clusters, version)
