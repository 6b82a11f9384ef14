"""Certificates from file-based SDS, rotated while clients are connected: fastmesh and real
Envoy on the same bootstrap (DownstreamTlsContext with tls_certificate_sds_secret_configs and
a path_config_source watching its directory). New handshakes get the new certificate within
a second of files being renamed into place (or of a Kubernetes-style ..data swap),
connections already up carry on, and a key that does not match its certificate is refused
with a log line while the pair in use stays."""
from __future__ import annotations

import os
import socket
import ssl
import sys
import time

import pytest
import yaml

pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from fmcerts import CA  # noqa: E402
from fmtest import (Proc, find_envoy, free_port, start_side,  # noqa: E402
                    START_TIMEOUT_S, _wait_line)

ENVOY = find_envoy()
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def sock(p):
    return {"socket_address": {"address": "127.0.0.1", "port_value": p}}


def bootstrap(port, admin, up_port, sds_path, watched):
    return {"node": {"id": "sds", "cluster": "sds"},       # SDS needs both (Envoy)
            "admin": {"address": sock(admin)}, "static_resources": {
        "listeners": [{"name": "tls", "address": sock(port), "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": TLS, "common_tls_context": {"tls_certificate_sds_secret_configs": [
                    {"name": "server", "sds_config": {
                        "path_config_source": {"path": sds_path,
                                               "watched_directory": {"path": watched}},
                        "resource_api_version": "V3"}}]}}},
            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": {
                             "@type": HCM, "stat_prefix": "tls", "codec_type": "HTTP1",
                             "route_config": {"virtual_hosts": [{
                                 "name": "all", "domains": ["*"], "routes": [
                                     {"match": {"prefix": "/"},
                                      "route": {"cluster": "web"}}]}]},
                             "http_filters": [{"name": "envoy.filters.http.router",
                                               "typed_config": {"@type": ROUTER}}]}}]}]}],
        "clusters": [{"name": "web", "type": "STATIC", "connect_timeout": "1s",
                      "load_assignment": {"cluster_name": "web", "endpoints": [
                          {"lb_endpoints": [{"endpoint": {"address": sock(up_port)}}]}]}}]}}


class Pki:
    """A CA, the certificate files in a secret volume laid out as the kubelet does
    (..<stamp>/ directories, a ..data symlink, file symlinks through it), and the SDS file
    naming them."""

    def __init__(self, root):
        self.ca = CA("sds test CA")
        self.dir = root / "secret"
        self.dir.mkdir()
        self.n = 0
        self.project(self.ca.issue("one", dns=["localhost"]))
        for name in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", self.dir / name)
        self.sds = self.dir / "sds.yaml"
        self.sds.write_text(yaml.safe_dump({"resources": [{
            "@type": SECRET, "name": "server", "tls_certificate": {
                "certificate_chain": {"filename": str(self.dir / "tls.crt")},
                "private_key": {"filename": str(self.dir / "tls.key")}}}]}))

    def project(self, issued, key_pem=None):
        # a new ..<stamp> directory, then ..data swapped to it in one rename
        self.n += 1
        sub = self.dir / f"..2026_11_29_{self.n:02d}"
        sub.mkdir()
        (sub / "tls.crt").write_bytes(issued.cert_pem)
        (sub / "tls.key").write_bytes(key_pem or issued.key_pem)
        tmp = self.dir / "..data_tmp"
        os.symlink(sub.name, tmp)
        os.replace(tmp, self.dir / "..data")


def served_cn(port, ca_pem) -> str:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            der = t.getpeercert(binary_form=True)
    name = x509.load_der_x509_certificate(der).subject
    return name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def wait_cn(port, ca_pem, want, timeout=3.0) -> float:
    t0 = time.monotonic()
    while True:
        cn = served_cn(port, ca_pem)
        if cn == want:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"still serving {cn!r}, not {want!r}")
        time.sleep(0.05)


class KeepAlive:
    """One TLS keep-alive connection kept open across the rotation."""

    def __init__(self, port, ca_pem):
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
        self.s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                 server_hostname="localhost")

    def get(self) -> bytes:
        self.s.sendall(b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"\r\n\r\n" + b"x" * 10) and b"\r\n\r\n" not in data[-20:]:
            chunk = self.s.recv(4096)
            if not chunk:
                break
            data += chunk
            if data.count(b"\r\n\r\n") and len(data.split(b"\r\n\r\n", 1)[1]) >= 10:
                break
        return data

    def close(self):
        self.s.close()


@pytest.fixture
def web(procs):
    p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
              "--name", "web"], name="web")
    procs.append(p)
    return int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])


@pytest.mark.parametrize("who", ["fastmesh", "envoy"])
def test_rotation_through_file_sds(who, web, procs, tmp_path):
    if who == "envoy" and ENVOY is None:
        pytest.skip("envoy not found")
    pki = Pki(tmp_path)
    port, admin = free_port(), free_port()
    cfg = tmp_path / "boot.yaml"
    cfg.write_text(yaml.safe_dump(bootstrap(port, admin, web, str(pki.sds), str(pki.dir))))
    p = start_side(who, cfg, admin, procs, base_id=44000, log_level="info")
    ca = pki.ca.cert_pem
    assert served_cn(port, ca) == "one"
    held = KeepAlive(port, ca)
    assert b"200 OK" in held.get()
    # a rotation: new files, ..data swapped
    pki.project(pki.ca.issue("two", dns=["localhost"]))
    took = wait_cn(port, ca, "two")
    assert took < 1.5, took                      # "within a second", with slack for CI
    assert b"200 OK" in held.get()               # the connection made before carries on
    # a key that is not the certificate's: refused, the pair in use stays
    other = pki.ca.issue("other", dns=["localhost"])
    pki.project(pki.ca.issue("three", dns=["localhost"]), key_pem=other.key_pem)
    time.sleep(1.2)
    assert served_cn(port, ca) == "two"
    assert b"200 OK" in held.get()
    # a good pair again: taken
    pki.project(pki.ca.issue("four", dns=["localhost"]))
    wait_cn(port, ca, "four")
    held.close()
    if who == "fastmesh":
        text = p.stderr_text()
        assert "does not match the certificate" in text and "in use stays" in text, text
        import json
        import urllib.request
        st = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats",
                                               timeout=5).read())
        assert st["listeners"]["tls"]["ssl.certificate_rotations"] == 2


def test_native_sds_config_errors(tmp_path):
    from fastmesh.config.load import ConfigError, load_dict
    pki = Pki(tmp_path)
    base = {"listeners": [{"name": "l", "address": "127.0.0.1:1", "protocol": "tcp",
                           "cluster": "c", "tls": {"sds": {"path": str(pki.sds),
                                                           "secret": "server"}}}],
            "clusters": [{"name": "c", "endpoints": ["127.0.0.1:2"]}]}
    cfg = load_dict(base)
    assert cfg.listeners[0].tls.sds_secret == "server"
    base["listeners"][0]["tls"]["sds"]["secret"] = "nope"
    with pytest.raises(ConfigError) as e:
        load_dict(base)
    assert any("listeners[0].tls.sds" in x and "no tls_certificate secret named 'nope'" in x
               for x in e.value.errors), e.value.errors
    base["listeners"][0]["tls"] = {"sds": {"path": str(tmp_path / "missing.yaml"),
                                           "secret": "server"}}
    with pytest.raises(ConfigError) as e:
        load_dict(base)
    assert any("cannot read" in x for x in e.value.errors), e.value.errors
