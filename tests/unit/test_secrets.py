"""TLS secrets (fastmesh.secrets): Envoy Secret resources from an SDS file, checked before
use, rotated by renames and by Kubernetes-style symlink swaps, and swapped into a live
SSLContext that real TLS handshakes (OpenSSL through Python's ssl) then see."""
from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import threading

import pytest
import yaml

pytest.importorskip("cryptography")
from fmcerts import CA  # noqa: E402

from fastmesh.secrets import (SECRET_TYPE, SdsFile, SecretError, TlsCertificate,  # noqa: E402
                              ValidationContext, apply_certificate, parse_secret)


@pytest.fixture(scope="module")
def ca():
    return CA()


def sds_doc(*resources):
    return {"version_info": "1", "resources": [{"@type": SECRET_TYPE, **r} for r in resources]}


def cert_secret(name, chain, key, watched=None):
    tc = {"certificate_chain": {"filename": str(chain)}, "private_key": {"filename": str(key)}}
    if watched:
        tc["watched_directory"] = {"path": str(watched)}
    return {"name": name, "tls_certificate": tc}


class TlsServer:
    """A real TLS server on 127.0.0.1 (a thread) answering each connection's bytes with
    the same bytes, on the context under test."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        try:
            with self.ctx.wrap_socket(s, server_side=True) as t:
                while True:
                    data = t.recv(1024)
                    if not data:
                        return
                    t.sendall(data)
        except (OSError, ssl.SSLError):
            pass

    def close(self):
        self.stop = True
        self.sock.close()


def client_ctx(ca):
    c = ssl.create_default_context(cadata=ca.cert_pem.decode())
    c.check_hostname = False
    return c


def connect(port, ca):
    t = client_ctx(ca).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
    return t


def served_cn(port, ca) -> str:
    from cryptography import x509
    with connect(port, ca) as t:
        der = t.getpeercert(binary_form=True)
    name = x509.load_der_x509_certificate(der).subject
    return "CN=" + name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def test_parse_and_serve(ca, tmp_path):
    chain, key = ca.issue("one", dns=["a.local"]).write(tmp_path, "one")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    f = tmp_path / "sds.yaml"
    f.write_text(yaml.safe_dump(sds_doc(
        cert_secret("server", chain, key),
        {"name": "trust", "validation_context": {
            "trusted_ca": {"filename": str(tmp_path / "ca.pem")},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}]}})))
    sds = SdsFile(str(f))
    s, v = sds.secrets["server"], sds.secrets["trust"]
    assert isinstance(s, TlsCertificate) and s.cert_chain_pem == chain.read_bytes()
    assert isinstance(v, ValidationContext) and v.trusted_ca_pem == ca.cert_pem
    assert v.extra["match_typed_subject_alt_names"][0]["san_type"] == "URI"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_certificate(ctx, s)
    srv = TlsServer(ctx)
    try:
        assert served_cn(srv.port, ca) == "CN=one"
    finally:
        srv.close()


def test_inline_sources_and_relative_names(ca, tmp_path):
    one = ca.issue("inline")
    s = parse_secret({"name": "x", "tls_certificate": {
        "certificate_chain": {"inline_string": one.cert_pem.decode()},
        "private_key": {"inline_bytes": base64.b64encode(one.key_pem).decode()}}}, "r")
    assert s.private_key_pem == one.key_pem and s.source == "inline"
    # with a watched directory, relative file names are inside it
    d = tmp_path / "certs"
    d.mkdir()
    one.write(d, "tls")
    s = parse_secret({"name": "y", "tls_certificate": {
        "certificate_chain": {"filename": "tls.crt"}, "private_key": {"filename": "tls.key"},
        "watched_directory": {"path": str(d)}}}, "r")
    assert s.files == (str(d / "tls.crt"), str(d / "tls.key"))


@pytest.mark.parametrize("res,msg", [
    ({"name": "x"}, "exactly one of"),
    ({"tls_certificate": {}}, "needs a name"),
    ({"name": "x", "tls_certificate": {"certificate_chain": {"filename": "/nonexistent.pem"},
                                       "private_key": {"inline_string": "k"}}},
     "cannot read /nonexistent.pem"),
    ({"name": "x", "tls_certificate": {"pkcs12": {"filename": "/a.p12"}}}, "PKCS#12"),
    ({"name": "x", "tls_certificate": {"password": {"inline_string": "p"}}}, "encrypted"),
    ({"name": "x", "tls_certificate": {"nope": 1}}, "unknown field"),
    ({"name": "x", "generic_secret": {}}, "not supported yet"),
    ({"name": "x", "@type": "type.googleapis.com/x.Y", "tls_certificate": {}}, "expected"),
    ({"name": "x", "tls_certificate": {"certificate_chain": {"inline_bytes": "%%"},
                                       "private_key": {"inline_string": "k"}}}, "not base64"),
    ({"name": "x", "tls_certificate": {"certificate_chain": {"inline_string": "junk"},
                                       "private_key": {"inline_string": "junk"}}}, "not PEM"),
])
def test_refusals_name_the_field(res, msg):
    with pytest.raises(SecretError, match=msg) as e:
        parse_secret(res, "resources[0]")
    assert str(e.value).startswith("resources[0]")


def test_mismatched_key_refused(ca):
    a, b = ca.issue("a"), ca.issue("b")
    with pytest.raises(SecretError, match="private key does not match the certificate"):
        parse_secret({"name": "x", "tls_certificate": {
            "certificate_chain": {"inline_string": a.cert_pem.decode()},
            "private_key": {"inline_string": b.key_pem.decode()}}}, "r")


def test_rotation_by_rename_keeps_established_connections(ca, tmp_path):
    chain, key = ca.issue("one").write(tmp_path, "tls")
    f = tmp_path / "sds.yaml"
    f.write_text(yaml.safe_dump(sds_doc(cert_secret("server", chain, key))))
    sds = SdsFile(str(f))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_certificate(ctx, sds.secrets["server"])
    srv = TlsServer(ctx)
    try:
        old = connect(srv.port, ca)
        old.sendall(b"before")
        assert old.recv(100) == b"before"
        assert not sds.poll()                       # nothing changed yet
        # new files written aside, then renamed over the old ones (what Envoy watches for)
        two = ca.issue("two")
        (tmp_path / "new.crt").write_bytes(two.cert_pem)
        (tmp_path / "new.key").write_bytes(two.key_pem)
        os.replace(tmp_path / "new.key", key)
        os.replace(tmp_path / "new.crt", chain)
        assert sds.poll() and sds.version == 2
        apply_certificate(ctx, sds.secrets["server"])
        assert served_cn(srv.port, ca) == "CN=two"  # new handshakes: the new pair
        old.sendall(b"after")                       # the established one carries on
        assert old.recv(100) == b"after"
        old.close()
    finally:
        srv.close()


def test_kubernetes_symlink_swap(ca, tmp_path):
    d = tmp_path / "secret-volume"
    d.mkdir()

    def project(stamp, issued):
        sub = d / f"..{stamp}"
        sub.mkdir()
        issued.write(sub, "tls")
        tmp = d / "..data_tmp"
        os.symlink(sub.name, tmp)
        os.replace(tmp, d / "..data")               # the atomic swap the kubelet does
    project("2026_11_29_01", ca.issue("one"))
    for n in ("tls.crt", "tls.key"):
        os.symlink(f"..data/{n}", d / n)
    f = tmp_path / "sds.yaml"
    f.write_text(yaml.safe_dump(sds_doc(cert_secret("server", "tls.crt", "tls.key", d))))
    sds = SdsFile(str(f))
    assert b"BEGIN" in sds.secrets["server"].cert_chain_pem
    project("2026_11_29_02", ca.issue("two"))
    assert sds.poll()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_certificate(ctx, sds.secrets["server"])
    srv = TlsServer(ctx)
    try:
        assert served_cn(srv.port, ca) == "CN=two"
    finally:
        srv.close()


def test_bad_pair_is_refused_with_a_log_line_and_the_old_one_stays(ca, tmp_path, caplog):
    chain, key = ca.issue("one").write(tmp_path, "tls")
    f = tmp_path / "sds.yaml"
    f.write_text(yaml.safe_dump(sds_doc(cert_secret("server", chain, key))))
    sds = SdsFile(str(f))
    before = sds.secrets["server"]
    other = ca.issue("other")
    (tmp_path / "new.key").write_bytes(other.key_pem)
    os.replace(tmp_path / "new.key", key)           # a key that is not the certificate's
    with caplog.at_level(logging.ERROR, logger="fastmesh.secrets"):
        assert not sds.poll()
        assert not sds.poll()                       # the same bad version: one line only
    assert sds.secrets["server"] is before and sds.version == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not match the certificate" in lines[0], lines
    assert "in use stays" in lines[0]
    # a half-written certificate (an edit in place) is refused too, then taken when whole
    good = ca.issue("fixed")
    chain.write_bytes(good.cert_pem[:40])
    key.write_bytes(good.key_pem)
    assert not sds.poll()
    chain.write_bytes(good.cert_pem)
    os.utime(chain, ns=(1, 1))                      # (the same second: the size differs)
    assert sds.poll() and sds.version == 2
    assert sds.secrets["server"].cert_chain_pem == good.cert_pem
    assert "server" not in sds.refused


def test_a_broken_sds_file_later_keeps_the_secrets(ca, tmp_path):
    chain, key = ca.issue("one").write(tmp_path, "tls")
    f = tmp_path / "sds.yaml"
    f.write_text(yaml.safe_dump(sds_doc(cert_secret("server", chain, key))))
    sds = SdsFile(str(f))
    f.write_text("resources: [")                   # not YAML
    assert not sds.poll() and "server" in sds.secrets
    assert "not YAML" in sds.refused[""]
    f.write_text(yaml.safe_dump(sds_doc()))        # the secret removed: gone
    assert sds.poll() and sds.secrets == {}


def test_start_up_errors_raise(tmp_path):
    with pytest.raises(SecretError, match="cannot read"):
        SdsFile(str(tmp_path / "missing.yaml"))
    f = tmp_path / "sds.yaml"
    f.write_text("{}")
    with pytest.raises(SecretError, match="resources"):
        SdsFile(str(f))
