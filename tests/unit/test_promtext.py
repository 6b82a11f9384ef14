"""The Prometheus exposition of /stats, read back by prometheus_client's own parser (the
reference implementation of the format): every figure comes back with its labels and type."""
from prometheus_client.parser import text_string_to_metric_families

from fastmesh import promtext

STATS = {
    "server": {"version": "0.1.0", "uptime_s": 12.5, "workers": 2, "config_version": 3,
               "worker_restarts": 1, "reloads": 2, "reload_failures": 0, "pid": 7,
               "worker_pids": [8, 9]},
    "listeners": {
        "ingress": {"downstream_rq_total": 40, "downstream_rsp_2xx": 39,
                    "downstream_cx_active": 3, "downstream_rx_bytes": 1000},
        'we"ird\\name': {"downstream_rq_total": 1, "downstream_rsp_2xx": 1,
                         "downstream_cx_active": 0, "downstream_rx_bytes": 5},
    },
    "clusters": {"web": {"upstream_rq_total": 40, "upstream_cx_active": 2}},
}


def parsed(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (fam.type, s.value)
    return out


def test_every_figure_round_trips_with_its_type():
    got = parsed(promtext.render(STATS))
    assert got[("fastmesh_listener_downstream_rq_total", (("listener", "ingress"),))] == \
        ("counter", 40)
    assert got[("fastmesh_listener_downstream_rsp_2xx_total", (("listener", "ingress"),))] == \
        ("counter", 39)
    assert got[("fastmesh_listener_downstream_cx_active", (("listener", "ingress"),))] == \
        ("gauge", 3)
    assert got[("fastmesh_listener_downstream_rx_bytes_total", (("listener", "ingress"),))] == \
        ("counter", 1000)
    assert got[("fastmesh_cluster_upstream_cx_active", (("cluster", "web"),))] == ("gauge", 2)
    assert got[("fastmesh_server_uptime_seconds", ())] == ("gauge", 12.5)
    assert got[("fastmesh_server_worker_restarts_total", ())] == ("counter", 1)
    assert got[("fastmesh_build_info", (("version", "0.1.0"),))] == ("gauge", 1)


def test_label_values_are_escaped():
    got = parsed(promtext.render(STATS))
    assert got[("fastmesh_listener_downstream_rq_total", (("listener", 'we"ird\\name'),))] == \
        ("counter", 1)


def test_every_listener_and_cluster_figure_is_exposed():
    got = parsed(promtext.render(STATS))
    n = sum(len(c) for c in STATS["listeners"].values()) + \
        sum(len(c) for c in STATS["clusters"].values())
    assert len([k for k in got if k[0].startswith(("fastmesh_listener_", "fastmesh_cluster_"))]) == n


def test_envoy_dotted_tls_counters_become_valid_names():
    stats = {"server": {}, "listeners": {"tls": {"ssl.handshake": 3,
                                                 "ssl.fail_verify_san": 1}}}
    got = parsed(promtext.render(stats))
    assert got[("fastmesh_listener_ssl_handshake_total", (("listener", "tls"),))] == \
        ("counter", 3.0)
    assert got[("fastmesh_listener_ssl_fail_verify_san_total", (("listener", "tls"),))] == \
        ("counter", 1.0)
