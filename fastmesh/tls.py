"""Downstream TLS, control world: a chain's ``model.TlsContext`` -> an ``ssl.SSLContext``
and the data world's ``TlsServerConfig`` (fastmesh/_core/tls.pyx), built once per chain.

Envoy semantics kept here:
- TLS 1.2 .. 1.3 by default; TLS 1.2 cipher suites by OpenSSL name (Envoy's default list);
  TLS 1.3 suites are not configurable (as in Envoy).
- ALPN: exactly the configured list, server preference; a client offering none of them gets
  no ALPN (not a failure), as BoringSSL does.
- trusted_ca without require_client_certificate: a client certificate is asked for and
  verified when given, and its absence is fine; with it: a handshake without one fails.
- match_subject_alt_names: a verified peer is accepted when any matcher matches any SAN of
  its type; a peer with no certificate (allowed when not required) is not checked.
"""
from __future__ import annotations

import logging
import ssl

from fastmesh.config import model

log = logging.getLogger("fastmesh.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_SAN_TYPES = {"uri": "URI", "dns": "DNS", "email": "email", "ip": "IP Address"}
_XFCC_MODES = {m: i for i, m in enumerate(model.XFCC_MODES)}
_XFCC_BITS = {"subject": 1, "uri": 2, "dns": 4, "cert": 8, "chain": 16}


class TlsConfigError(ValueError):
    """A TLS context that cannot be built (the message says which file and why)."""


def sds_certificate(t: model.TlsContext):
    """(the SdsFile, the chain's TlsCertificate) of a context whose pair comes from a
    file-based SDS source; TlsConfigError names what is missing."""
    from fastmesh.secrets import SdsFile, SecretError, TlsCertificate
    try:
        sds = SdsFile(t.sds_path, t.sds_watched_directory)
    except SecretError as exc:
        raise TlsConfigError(str(exc)) from None
    secret = sds.secrets.get(t.sds_secret)
    if not isinstance(secret, TlsCertificate):
        have = ", ".join(sorted(n for n, v in sds.secrets.items()
                                if isinstance(v, TlsCertificate))) or "none"
        raise TlsConfigError(f"{t.sds_path}: no tls_certificate secret named "
                             f"{t.sds_secret!r} (there: {have})")
    return sds, secret


def build_context(t: model.TlsContext, secret=None) -> ssl.SSLContext:
    """The chain's SSLContext; its certificate and key from the files, or from `secret`
    (a fastmesh.secrets.TlsCertificate: SDS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[t.min_version]
    ctx.maximum_version = _VERSIONS[t.max_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # one TLS 1.3 session ticket per handshake (OpenSSL sends two): enough for the client to
    # resume, and each ticket is a session copied and encrypted (~40 µs of a ~600 µs
    # handshake here, measured in process)
    ctx.num_tickets = 1
    _set_suites(ctx, t.ciphers, t.ecdh_curve)
    if secret is not None:
        _load_pair(ctx, None, None, secret.cert_chain_pem, secret.private_key_pem)
    else:
        _load_pair(ctx, t.cert_chain_file, t.private_key_file, t.cert_chain_pem,
                   t.private_key_pem)
    if t.alpn:
        ctx.set_alpn_protocols(list(t.alpn))
    if t.trusted_ca_file or t.trusted_ca_pem:
        _load_cas(ctx, t.trusted_ca_file, t.crl_file, t.crl_leaf_only, t.trusted_ca_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED if t.require_client_certificate \
            else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    send_chain_as_given(ctx)
    return ctx


# OpenSSL's SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, SSL_MODE_NO_AUTO_CHAIN, NULL) (ssl.h)
_SSL_CTRL_MODE = 33
_SSL_MODE_NO_AUTO_CHAIN = 0x8
_ssl_ctx_ctrl = None        # (SSL_CTX_ctrl, SSL_CTX_get_options) once looked up; False: none
_no_auto_chain_warned = False


def send_chain_as_given(ctx: ssl.SSLContext) -> bool:
    """Send our certificate chain as the files give it, as Envoy does: OpenSSL would
    otherwise, when the file holds the leaf alone, build a chain from the context's trust
    store in every handshake (an X509_STORE_CTX and a verification each time: ~12% of a
    full ECDSA handshake's CPU here, measured with perf), and send the intermediates it
    found there, which Envoy never sends.

    Python's ssl has no setter for OpenSSL's modes: the mode is set on the SSL_CTX the
    SSLContext holds (the first field after the object header, in every CPython with
    OpenSSL 1.1/3), through the libssl the ssl module itself is linked to. The pointer is
    checked first (its options must read back as ctx.options); where anything does not
    match, OpenSSL's default stays and False is returned."""
    global _ssl_ctx_ctrl, _no_auto_chain_warned
    if _ssl_ctx_ctrl is None:
        _ssl_ctx_ctrl = _lookup_ssl_ctx_ctrl()
    ok = False
    if _ssl_ctx_ctrl:
        import ctypes
        ctrl, get_options = _ssl_ctx_ctrl
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if ptr and get_options(ptr) == ctx.options:
            mode = ctrl(ptr, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
            ok = bool(mode & _SSL_MODE_NO_AUTO_CHAIN)
    if not ok and not _no_auto_chain_warned:
        _no_auto_chain_warned = True
        log.warning("TLS: cannot set OpenSSL's SSL_MODE_NO_AUTO_CHAIN through this Python's "
                    "ssl module: a certificate file holding the leaf alone is completed from "
                    "the trust store in each handshake (Envoy sends it alone)")
    return ok


def _lookup_ssl_ctx_ctrl():
    try:
        import _ssl
        import ctypes
        lib = ctypes.CDLL(_ssl.__file__)     # its libssl's symbols are found through it
        ctrl, get_options = lib.SSL_CTX_ctrl, lib.SSL_CTX_get_options
    except (ImportError, OSError, AttributeError):
        return False
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    return ctrl, get_options


def _set_suites(ctx: ssl.SSLContext, ciphers, curve) -> None:
    """TLS 1.2 cipher suites (as Envoy: every name must be one; OpenSSL alone skips unknown
    ones) and the ECDH curve, if one is set."""
    for name in ciphers:
        try:
            ctx.set_ciphers(name)
        except ssl.SSLError:
            raise TlsConfigError(f"cipher suite {name!r}: unknown (OpenSSL names, such as "
                                 f"ECDHE-ECDSA-AES128-GCM-SHA256)")
    ctx.set_ciphers(":".join(ciphers))
    if curve:
        try:
            ctx.set_ecdh_curve(curve)
        except (ValueError, ssl.SSLError) as exc:
            raise TlsConfigError(f"ecdh curve {curve!r}: {exc}")


def _load_pair(ctx: ssl.SSLContext, cert_file, key_file, cert_pem, key_pem,
               what: str = "certificate") -> None:
    """Our certificate chain and key, from files or PEM text."""
    try:
        if cert_pem is not None or key_pem is not None:     # (the other may be a file)
            from fastmesh.secrets import load_pair
            load_pair(ctx, _bytes(cert_pem) if cert_pem is not None else _read(cert_file),
                      _bytes(key_pem) if key_pem is not None else _read(key_file))
        else:
            ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise TlsConfigError(f"{exc.filename}: no such file")
    except (ssl.SSLError, OSError) as exc:
        where = "(inline PEM)" if cert_pem is not None else f"{cert_file} / key {key_file}"
        raise TlsConfigError(f"{what} {where}: {getattr(exc, 'reason', None) or exc}")


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _bytes(pem) -> bytes:
    return pem.encode("ascii", "replace") if isinstance(pem, str) else pem


def _load_cas(ctx: ssl.SSLContext, ca_file, crl_file, crl_leaf_only: bool,
              ca_pem=None) -> None:
    """The CAs a peer's certificate must chain to (a file or PEM text), and the CRLs
    checked with them."""
    try:
        if ca_pem is not None:
            ctx.load_verify_locations(cadata=_bytes(ca_pem).decode("ascii", "replace"))
        else:
            ctx.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise TlsConfigError(f"{ca_file}: no such file")
    except ssl.SSLError as exc:
        raise TlsConfigError(f"trusted CA {ca_file or '(inline PEM)'}: "
                             f"{getattr(exc, 'reason', None) or exc}")
    if crl_file:
        try:
            ctx.load_verify_locations(cafile=crl_file)
        except FileNotFoundError:
            raise TlsConfigError(f"{crl_file}: no such file")
        except ssl.SSLError as exc:
            raise TlsConfigError(f"CRL {crl_file}: {getattr(exc, 'reason', None) or exc}")
        ctx.verify_flags |= (ssl.VERIFY_CRL_CHECK_LEAF if crl_leaf_only
                             else ssl.VERIFY_CRL_CHECK_CHAIN)


def _san_matchers(sans) -> tuple:
    return tuple((_SAN_TYPES[m.san_type], "safe_regex" if m.kind == "regex" else m.kind,
                  m.value, m.ignore_case) for m in sans)


def local_uri_sans(cert_file: str, pem: bytes = None) -> tuple:
    """The URI SANs of our own certificate (Envoy's XFCC By= element), from its file or
    its PEM."""
    from cryptography import x509
    try:
        if pem is None:
            with open(cert_file, "rb") as f:
                pem = f.read()
        cert = x509.load_pem_x509_certificate(pem)
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except Exception:
        return ()
    return tuple(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def server_config(t: model.TlsContext, name: str, counters: dict, secret=None):
    """The data world's per-chain TLS config (`secret`: the pair, when it comes from SDS)."""
    from fastmesh._core.tls import TlsServerConfig
    details = 0
    for d in t.forward_client_cert_details:
        details |= _XFCC_BITS[d]
    pem = secret.cert_chain_pem if secret else (_bytes(t.cert_chain_pem)
                                                if t.cert_chain_pem else None)
    by = local_uri_sans(t.cert_chain_file, pem) \
        if t.forward_client_cert in ("append_forward", "sanitize_set") else ()
    return TlsServerConfig(
        name, build_context(t, secret),
        san_matchers=_san_matchers(t.match_subject_alt_names),
        handshake_timeout_ms=t.handshake_timeout_ms, counters=counters,
        xfcc_mode=_XFCC_MODES[t.forward_client_cert], xfcc_details=details,
        local_uri_sans=by)


def http_hook(t: model.TlsContext):
    from fastmesh._core.tls import TlsHttpHook
    return TlsHttpHook(_XFCC_MODES[t.forward_client_cert], True)


# ------------------------------------------------------------------------ upstream side

def build_client_context(t: model.UpstreamTls, http2: bool) -> ssl.SSLContext:
    """A cluster's client SSLContext (Envoy's UpstreamTlsContext semantics): the upstream's
    certificate verified against trusted_ca_file when set (never its host name: names are
    checked by the SAN matchers), our certificate when set, versions, TLS 1.2 suites, ALPN
    (h2 offered by an http2 cluster unless set)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = _VERSIONS[t.min_version]
    ctx.maximum_version = _VERSIONS[t.max_version]
    ctx.options |= ssl.OP_NO_COMPRESSION
    _set_suites(ctx, t.ciphers, t.ecdh_curve)
    if t.cert_chain_file or t.cert_chain_pem:
        _load_pair(ctx, t.cert_chain_file, t.private_key_file, t.cert_chain_pem,
                   t.private_key_pem, "client certificate")
    alpn = list(t.alpn) or (["h2"] if http2 else [])
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if t.trusted_ca_file or t.trusted_ca_pem:
        _load_cas(ctx, t.trusted_ca_file, t.crl_file, t.crl_leaf_only, t.trusted_ca_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE     # Envoy: no validation_context, no verification
    send_chain_as_given(ctx)
    return ctx


def client_config(t: model.UpstreamTls, cluster: str, http2: bool):
    """The data world's TLS of a cluster (fastmesh._core.tls.TlsClientConfig)."""
    from fastmesh._core.tls import TlsClientConfig
    return TlsClientConfig(
        cluster, build_client_context(t, http2), sni=t.sni,
        san_matchers=_san_matchers(t.match_subject_alt_names),
        resume=t.max_session_keys > 0)
