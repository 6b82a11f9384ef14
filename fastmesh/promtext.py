"""/stats in the Prometheus text exposition format (version 0.0.4), for scrapers.

One family per counter slot, labelled by listener or cluster:

    # TYPE fastmesh_listener_downstream_rq_total counter
    fastmesh_listener_downstream_rq_total{listener="ingress"} 40

Gauges (`*_active`, `health_check_healthy`, `uptime_seconds`, `workers`, `config_version`)
are typed gauge; every other listener and cluster figure is a counter, named with a `_total`
suffix as the format expects
(`downstream_rsp_2xx` -> `fastmesh_listener_downstream_rsp_2xx_total`).
"""
from __future__ import annotations

from fastmesh._core.stats import GAUGE_SLOTS

# and the gauge the supervisor's health checks add per cluster (fastmesh.health.GAUGES)
GAUGES = GAUGE_SLOTS | frozenset(("health_check_healthy",))

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SERVER = (  # (key in stats["server"], metric name, type, help)
    ("uptime_s", "fastmesh_server_uptime_seconds", "gauge",
     "seconds since this generation started"),
    ("workers", "fastmesh_server_workers", "gauge", "worker processes"),
    ("config_version", "fastmesh_server_config_version", "gauge",
     "config version (1 at start, +1 per applied reload)"),
    ("worker_restarts", "fastmesh_server_worker_restarts_total", "counter",
     "workers restarted after they died"),
    ("reloads", "fastmesh_server_reloads_total", "counter", "reloads applied"),
    ("reload_failures", "fastmesh_server_reload_failures_total", "counter", "reloads refused"),
    ("generation", "fastmesh_server_generation", "gauge",
     "hot-restart generation serving now (1 at start, +1 per hot restart)"),
)
_WORKER = (  # (key in each stats["server"]["worker_connections"] entry, metric, type, help)
    ("downstream_cx_total", "fastmesh_worker_downstream_cx_total", "counter",
     "connections this worker accepted (how the kernel spread them)"),
    ("downstream_cx_active", "fastmesh_worker_downstream_cx_active", "gauge",
     "connections open on this worker"),
)


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def render(stats: dict) -> str:
    out: list[str] = []
    server = stats.get("server") or {}
    out.append("# HELP fastmesh_build_info fastmesh version")
    out.append("# TYPE fastmesh_build_info gauge")
    out.append(f'fastmesh_build_info{{version="{_label(server.get("version", ""))}"}} 1')
    for key, metric, kind, help_text in _SERVER:
        if server.get(key) is not None:
            out.append(f"# HELP {metric} {help_text}")
            out.append(f"# TYPE {metric} {kind}")
            out.append(f"{metric} {server[key]}")
    workers = server.get("worker_connections") or []
    for key, metric, kind, help_text in _WORKER if workers else ():
        out.append(f"# HELP {metric} {help_text}")
        out.append(f"# TYPE {metric} {kind}")
        for w in workers:
            out.append(f'{metric}{{worker="{w.get("index")}"}} {w.get(key, 0)}')
    for kind, label in (("listeners", "listener"), ("clusters", "cluster")):
        groups = stats.get(kind) or {}
        slots: list[str] = []
        for counters in groups.values():
            for k in counters:
                if k not in slots:
                    slots.append(k)
        for slot in slots:
            gauge = slot in GAUGES
            # Envoy's dotted names ("ssl.handshake") are not Prometheus names: dots become _
            metric = f"fastmesh_{label}_{slot.replace('.', '_')}"
            if not gauge and not metric.endswith("_total"):
                metric += "_total"
            out.append(f"# HELP {metric} {label} {slot.replace('_', ' ')}")
            out.append(f"# TYPE {metric} {'gauge' if gauge else 'counter'}")
            for name in sorted(groups):
                if slot in groups[name]:
                    out.append(f'{metric}{{{label}="{_label(name)}"}} {groups[name][slot]}')
    _render_histograms(out, stats.get("latency_histograms") or {})
    return "\n".join(out) + "\n"


def _le(bound_us: int) -> str:
    return repr(bound_us / 1e6)


def _render_histograms(out: list, hist: dict) -> None:
    """Latency histograms: `fastmesh_listener_downstream_rq_time_seconds` and
    `fastmesh_cluster_upstream_rq_time_seconds`, cumulative `_bucket{le=...}`, `_sum`,
    `_count` (buckets: fastmesh._core.stats LAT_BOUNDS_US)."""
    bounds = hist.get("bounds_us") or []
    for kind, label, metric, what in (
            ("listeners", "listener", "fastmesh_listener_downstream_rq_time_seconds",
             "request latency, head received to response complete"),
            ("clusters", "cluster", "fastmesh_cluster_upstream_rq_time_seconds",
             "request latency of requests routed to the cluster")):
        groups = hist.get(kind) or {}
        if not groups:
            continue
        out.append(f"# HELP {metric} {what}")
        out.append(f"# TYPE {metric} histogram")
        for name in sorted(groups):
            h = groups[name]
            lab = f'{label}="{_label(name)}"'
            acc = 0
            for bound, count in zip(bounds, h["counts"]):
                acc += count
                out.append(f'{metric}_bucket{{{lab},le="{_le(bound)}"}} {acc}')
            out.append(f'{metric}_bucket{{{lab},le="+Inf"}} {h["count"]}')
            out.append(f"{metric}_sum{{{lab}}} {h['sum_us'] / 1e6}")
            out.append(f"{metric}_count{{{lab}}} {h['count']}")
