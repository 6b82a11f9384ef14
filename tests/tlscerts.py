"""Test certificates, made with `cryptography`: ECDSA P-256 by default.

``make_pki(dir)`` writes, as PEM files, and returns their paths in a dict:
- ca / ca_key: the mesh CA; other_ca: an unrelated CA (its clients must be refused)
- server (+ _key): CN/DNS "localhost", "www.example.com", URI spiffe://cluster.local/ns/default/sa/server
- api (+ _key): DNS "api.example.com" (a second certificate, for SNI chain selection)
- client (+ _key): URI spiffe://cluster.local/ns/default/sa/client, DNS client.default.svc
- intruder (+ _key): URI spiffe://cluster.local/ns/default/sa/intruder (same CA, wrong id)
- stranger (+ _key): URI spiffe://cluster.local/ns/default/sa/client, from other_ca
- revoked (+ _key): same CA, listed in crl
- crl: the CA's CRL revoking `revoked`
- inter (+ _key): an intermediate CA under the mesh CA; ca_and_inter: both CAs in one file
- chained (+ _key): DNS "full.example.com", "leaf.example.com", issued by `inter`;
  chained_full: the same certificate followed by `inter` (a chain file)
"""
from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE = "spiffe://cluster.local/ns/default/sa/"


def _key(kind="ec"):
    return ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn, org="fastmesh tests"):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(cn, issuer=None):
    """A CA: self-signed, or an intermediate signed by issuer (a (cert, key) CA)."""
    key = _key()
    name = _name(cn)
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return cert, key


def make_leaf(ca, cn, dns=(), uris=(), server=True, client=True, kind="ec"):
    ca_cert, ca_key = ca
    key = _key(kind)
    sans = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]
    eku = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
        ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(_now() - datetime.timedelta(days=1))
         .not_valid_after(_now() + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             ca_key.public_key()), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _write(d: Path, name, cert, key=None):
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = {name: str(d / f"{name}.pem")}
    if key is not None:
        (d / f"{name}_key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[f"{name}_key"] = str(d / f"{name}_key.pem")
    return out


def make_pki(d) -> dict:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    ca = make_ca("mesh root")
    other = make_ca("other root")
    out = {}
    out.update(_write(d, "ca", ca[0], ca[1]))
    out.update(_write(d, "other_ca", other[0], other[1]))
    out.update(_write(d, "server", *make_leaf(ca, "localhost",
                                              dns=("localhost", "www.example.com"),
                                              uris=(SPIFFE + "server",))))
    out.update(_write(d, "api", *make_leaf(ca, "api.example.com", dns=("api.example.com",))))
    out.update(_write(d, "client", *make_leaf(ca, "client", dns=("client.default.svc",),
                                              uris=(SPIFFE + "client",), server=False)))
    out.update(_write(d, "intruder", *make_leaf(ca, "intruder", uris=(SPIFFE + "intruder",),
                                                server=False)))
    out.update(_write(d, "stranger", *make_leaf(other, "client", uris=(SPIFFE + "client",),
                                                server=False)))
    revoked = make_leaf(ca, "revoked", uris=(SPIFFE + "client",), server=False)
    out.update(_write(d, "revoked", *revoked))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca[0].subject)
           .last_update(_now() - datetime.timedelta(days=1))
           .next_update(_now() + datetime.timedelta(days=30))
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(revoked[0].serial_number)
                                    .revocation_date(_now() - datetime.timedelta(days=1))
                                    .build())
           .sign(ca[1], hashes.SHA256()))
    (d / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    out["crl"] = str(d / "crl.pem")
    inter = make_ca("mesh intermediate", issuer=ca)
    out.update(_write(d, "inter", *inter))
    chained = make_leaf(inter, "chained", dns=("full.example.com", "leaf.example.com"))
    out.update(_write(d, "chained", *chained))
    pem = serialization.Encoding.PEM
    (d / "chained_full.pem").write_bytes(chained[0].public_bytes(pem) +
                                         inter[0].public_bytes(pem))
    out["chained_full"] = str(d / "chained_full.pem")
    (d / "ca_and_inter.pem").write_bytes(ca[0].public_bytes(pem) + inter[0].public_bytes(pem))
    out["ca_and_inter"] = str(d / "ca_and_inter.pem")
    return out
