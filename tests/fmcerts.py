"""In-memory certificates for tests that rotate them (test_secrets): a CA object that issues
leaves as PEM bytes, over tlscerts' builders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tlscerts import make_ca, make_leaf


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        c, k = directory / f"{stem}.crt", directory / f"{stem}.key"
        c.write_bytes(self.cert_pem)
        k.write_bytes(self.key_pem)
        return c, k


class CA:
    def __init__(self, name: str = "fastmesh test CA"):
        self.cert, self.key = make_ca(name)
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, dns=(), uris=(), kind: str = "ec", client=True,
              server=True) -> Issued:
        cert, key = make_leaf((self.cert, self.key), cn, dns=dns, uris=uris, server=server,
                              client=client, kind=kind)
        return Issued(cert.public_bytes(serialization.Encoding.PEM),
                      key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()), cert)
