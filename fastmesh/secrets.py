"""TLS secrets: certificates and keys as Envoy's SDS delivers them, from files or a control
plane, checked before use and swapped into live TLS contexts without a restart.

Control world only. A `TlsCertificate` or `ValidationContext` secret holds PEM bytes, read
once from wherever the config points (a file, inline text); the data world never reads
certificate files itself. Putting a secret into an `ssl.SSLContext` goes through an
anonymous in-memory file (memfd): key material is never written to disk by fastmesh.

Rotation has one rule, Envoy's: a new pair is used only if it is whole and consistent; a
key that does not match its certificate, a file that does not parse, a missing file are
refused with a log line and the pair in use stays. Checking happens on a scratch context
first, because a failed `load_cert_chain` leaves the context it was called on without a
usable pair (measured: OpenSSL keeps the new certificate and then refuses the key).
A context updated in place serves new handshakes with the new pair; connections already
established keep theirs.

File-based SDS (Envoy: `sds_config.path_config_source`): the file holds a discovery
response, `resources:` a list of `envoy.extensions.transport_sockets.tls.v3.Secret`.
`SdsFile.poll()` notices changes by the files' identity (device, inode, size, mtime, with
symlinks followed), so both ways certificates are rotated in practice are seen: a file
renamed over the old one, and a Kubernetes-style swap of the `..data` symlink. Envoy watches
for moves into the `watched_directory` (or onto the file); polling every 250 ms sees the
same events within a second and also catches an edit in place, which a check then refuses
while it is half-written.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Optional

import yaml

log = logging.getLogger("fastmesh.secrets")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
POLL_INTERVAL_MS = 250
MAX_PEM_BYTES = 1 << 20        # a certificate chain or key file larger than this is refused


class SecretError(ValueError):
    """A secret that cannot be used: the message says which and why."""


@dataclass(frozen=True)
class TlsCertificate:
    """A certificate chain and its private key (PEM)."""
    name: str
    cert_chain_pem: bytes
    private_key_pem: bytes
    # where they came from (for log lines and the admin page), and the files to watch
    source: str = ""
    files: tuple = ()


@dataclass(frozen=True)
class ValidationContext:
    """Trust anchors for verifying the peer (PEM), and an optional CRL."""
    name: str
    trusted_ca_pem: Optional[bytes]
    crl_pem: Optional[bytes] = None
    source: str = ""
    files: tuple = ()
    # the rest of a CertificateValidationContext as given (SAN matchers, ...): the
    # transport socket's translation reads it
    extra: dict = field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------- data sources

def read_data_source(ds, where: str, base_dir: str = "") -> tuple[bytes, Optional[str]]:
    """An Envoy DataSource (`filename` | `inline_string` | `inline_bytes` (base64) |
    `environment_variable`) -> (its bytes, the file it came from or None)."""
    if not isinstance(ds, dict) or len(ds) != 1:
        raise SecretError(f"{where}: expected one of filename, inline_string, inline_bytes, "
                          f"environment_variable")
    (kind, value), = ds.items()
    if not isinstance(value, str):
        raise SecretError(f"{where}.{kind}: expected a string")
    if kind == "filename":
        path = value if os.path.isabs(value) or not base_dir else os.path.join(base_dir, value)
        return _read_file(path, f"{where}.filename"), path
    if kind == "inline_string":
        return value.encode(), None
    if kind == "inline_bytes":
        try:
            return base64.b64decode(value, validate=True), None
        except ValueError as exc:
            raise SecretError(f"{where}.inline_bytes: not base64 ({exc})") from None
    if kind == "environment_variable":
        v = os.environ.get(value)
        if v is None:
            raise SecretError(f"{where}.environment_variable: {value} is not set")
        return v.encode(), None
    raise SecretError(f"{where}: unknown data source {kind!r} (filename, inline_string, "
                      f"inline_bytes, environment_variable)")


def _read_file(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise SecretError(f"{where}: {path} is larger than {MAX_PEM_BYTES} bytes")
    return data


# ------------------------------------------------------------------ Secret resources

def parse_secret(res: dict, where: str, base_dir: str = ""):
    """One Envoy v3 `Secret` (as a dict: YAML, JSON or decoded from xDS) -> TlsCertificate
    or ValidationContext, files read and the pair checked."""
    if not isinstance(res, dict):
        raise SecretError(f"{where}: expected a Secret mapping")
    t = res.get("@type")
    if t is not None and t != SECRET_TYPE:
        raise SecretError(f"{where}.@type: expected {SECRET_TYPE!r}, got {t!r}")
    name = res.get("name")
    if not isinstance(name, str) or not name:
        raise SecretError(f"{where}.name: a Secret needs a name")
    kinds = [k for k in ("tls_certificate", "validation_context", "session_ticket_keys",
                         "generic_secret") if k in res]
    unknown = set(res) - {"@type", "name", "tls_certificate", "validation_context",
                          "session_ticket_keys", "generic_secret"}
    if unknown:
        raise SecretError(f"{where}.{sorted(unknown)[0]}: unknown field")
    if len(kinds) != 1:
        raise SecretError(f"{where}: a Secret holds exactly one of tls_certificate, "
                          f"validation_context (got {kinds or 'none'})")
    kind = kinds[0]
    body = res[kind]
    w = f"{where}.{kind}"
    if not isinstance(body, dict):
        raise SecretError(f"{w}: expected a mapping")
    if kind == "tls_certificate":
        return _tls_certificate(name, body, w, base_dir)
    if kind == "validation_context":
        return _validation_context(name, body, w, base_dir)
    raise SecretError(f"{w}: {kind} secrets are not supported yet")


def _watched_dir(body: dict, w: str) -> Optional[str]:
    wd = body.get("watched_directory")
    if wd is None:
        return None
    if not isinstance(wd, dict) or not isinstance(wd.get("path"), str):
        raise SecretError(f"{w}.watched_directory: expected {{path: DIR}}")
    return wd["path"]


def _tls_certificate(name: str, body: dict, w: str, base_dir: str) -> TlsCertificate:
    allowed = {"certificate_chain", "private_key", "watched_directory"}
    refused = {"pkcs12": "PKCS#12 bundles", "password": "encrypted private keys",
               "private_key_provider": "private key providers",
               "ocsp_staple": "OCSP stapling",
               "signed_certificate_timestamp": "signed certificate timestamps"}
    for k in body:
        if k in refused:
            raise SecretError(f"{w}.{k}: {refused[k]} are not supported yet")
        if k not in allowed:
            raise SecretError(f"{w}.{k}: unknown field")
    for k in ("certificate_chain", "private_key"):
        if k not in body:
            raise SecretError(f"{w}.{k}: required")
    wd = _watched_dir(body, w)
    # with a watched directory, relative file names are inside it (Envoy's rule)
    base = wd or base_dir
    chain, chain_file = read_data_source(body["certificate_chain"], f"{w}.certificate_chain",
                                         base)
    key, key_file = read_data_source(body["private_key"], f"{w}.private_key", base)
    files = tuple(f for f in (chain_file, key_file) if f)
    src = ", ".join(files) if files else "inline"
    check_pair(chain, key, f"{w} ({src})")
    return TlsCertificate(name, chain, key, src, files)


def _validation_context(name: str, body: dict, w: str, base_dir: str) -> ValidationContext:
    wd = _watched_dir(body, w)
    base = wd or base_dir
    ca = crl = None
    files = []
    if "trusted_ca" in body:
        ca, f = read_data_source(body["trusted_ca"], f"{w}.trusted_ca", base)
        files.append(f)
        check_ca(ca, f"{w}.trusted_ca")
    if "crl" in body:
        crl, f = read_data_source(body["crl"], f"{w}.crl", base)
        files.append(f)
    extra = {k: v for k, v in body.items()
             if k not in ("trusted_ca", "crl", "watched_directory")}
    files = tuple(f for f in files if f)
    return ValidationContext(name, ca, crl, ", ".join(files) if files else "inline", files,
                             extra)


# ----------------------------------------------------------------- PEM into contexts

@contextlib.contextmanager
def pem_path(data: bytes):
    """A path that reads as `data`, backed by an anonymous in-memory file (ssl's loaders
    take paths only); gone when the block ends."""
    fd = os.memfd_create("fastmesh-pem", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def load_pair(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Put a certificate chain and key into ctx (ssl.SSLError if they do not fit)."""
    with pem_path(chain_pem) as c, pem_path(key_pem) as k:
        ctx.load_cert_chain(c, k)


def check_pair(chain_pem: bytes, key_pem: bytes, where: str) -> None:
    """SecretError unless the chain parses and the key is the certificate's: tried on a
    scratch context, so a live one is never left half-loaded."""
    if b"-----BEGIN" not in chain_pem:
        raise SecretError(f"{where}: the certificate chain is not PEM")
    if b"-----BEGIN" not in key_pem:
        raise SecretError(f"{where}: the private key is not PEM")
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        load_pair(scratch, chain_pem, key_pem)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise SecretError(f"{where}: the private key does not match the certificate") \
                from None
        raise SecretError(f"{where}: unusable certificate or key ({reason})") from None


def check_ca(ca_pem: bytes, where: str) -> None:
    """SecretError unless ca_pem holds at least one parsable certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise SecretError(f"{where}: no usable CA certificate ({exc})") from None


def apply_certificate(ctx: ssl.SSLContext, secret: TlsCertificate) -> None:
    """Serve `secret` from now on: new handshakes on ctx use it, established connections
    keep what they negotiated. The pair was checked when the secret was made."""
    load_pair(ctx, secret.cert_chain_pem, secret.private_key_pem)


# ------------------------------------------------------------------ file-based SDS

def _identity(path: str):
    try:
        st = os.stat(path)              # follows symlinks: a swapped ..data is a new file
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SdsFile:
    """The secrets of one SDS file (Envoy: `path_config_source`), kept current by `poll()`.

    `secrets` maps name -> TlsCertificate | ValidationContext. A change to the file or to
    any file a secret reads is picked up by the next poll; each secret is replaced only by
    a valid new version (a refused one is logged once per version seen, and the old one
    stays). `version` counts accepted changes."""

    def __init__(self, path: str, watched_directory: Optional[str] = None):
        self.path = path
        self.watched_directory = watched_directory
        self.secrets: dict = {}
        self.version = 0
        self.refused: dict = {}          # secret name (or "" for the file) -> last error
        self._seen = None
        self.reload(initial=True)

    def _watched(self) -> tuple:
        files = [self.path]
        for s in self.secrets.values():
            files.extend(s.files)
        return tuple(sorted(set(files)))

    def _signature(self):
        return tuple((f, _identity(f)) for f in self._watched())

    def reload(self, initial: bool = False) -> bool:
        """Read the file again; True if any secret changed. At start-up (initial) an
        unusable file raises SecretError; later it is logged and the old secrets stay."""
        base = os.path.dirname(os.path.abspath(self.path))
        try:
            raw = _read_file(self.path, self.path)
            try:
                doc = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise SecretError(f"{self.path}: not YAML/JSON: {exc}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("resources"), list):
                raise SecretError(f"{self.path}: expected `resources:` a list of Secrets")
        except SecretError as exc:
            if initial:
                raise
            self._refuse("", str(exc))
            self._seen = self._signature()
            return False
        self.refused.pop("", None)
        new = dict(self.secrets)
        names = set()
        for i, res in enumerate(doc["resources"]):
            where = f"{self.path}: resources[{i}]"
            name = res.get("name") if isinstance(res, dict) else None
            try:
                s = parse_secret(res, where, base)
            except SecretError as exc:
                if initial:
                    raise
                self._refuse(name or where, str(exc))
                if isinstance(name, str):
                    names.add(name)         # the old version of it, if any, stays
                continue
            if s.name in names:
                raise_or_log = SecretError(f"{where}.name: {s.name!r} appears twice")
                if initial:
                    raise raise_or_log
                self._refuse(s.name, str(raise_or_log))
                continue
            names.add(s.name)
            self.refused.pop(s.name, None)
            new[s.name] = s
        for gone in set(new) - names:
            del new[gone]
        changed = new != self.secrets
        if changed:
            self.secrets = new
            self.version += 1
            if not initial:
                log.info("secrets from %s: now version %d (%s)", self.path, self.version,
                         ", ".join(sorted(new)))
        self._seen = self._signature()
        return changed

    def _refuse(self, key: str, message: str) -> None:
        if self.refused.get(key) != message:
            log.error("%s; the secret in use stays", message)
        self.refused[key] = message

    def poll(self) -> bool:
        """Reload if any watched file changed since last time; True if a secret changed."""
        if self._signature() == self._seen:
            return False
        return self.reload()
