"""Envoy ``transport_socket`` on a filter chain -> model ``TlsContext``:
``envoy.transport_sockets.tls`` with an ``extensions.transport_sockets.tls.v3.
DownstreamTlsContext`` (``raw_buffer`` means plain). Every field fastmesh does not implement
the way Envoy means it is refused at its path."""
from __future__ import annotations

from typing import Optional

from ..load import check_tls, check_upstream_tls
from ..model import DEFAULT_TLS12_CIPHERS, SanMatch, TlsContext, UpstreamTls
from ._common import _MISSING, NOT_YET, EnvoyChecker
from .route import _regex

DOWNSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
SDS = "SDS (secrets from a control plane or files it watches): a later issue: " + NOT_YET

_DOWNSTREAM_FIELDS = {
    "common_tls_context": None, "require_client_certificate": None, "require_sni": None,
    "session_ticket_keys": "session_ticket_keys: " + NOT_YET,
    "session_ticket_keys_sds_secret_config": SDS,
    "disable_stateless_session_resumption": None,
    "disable_stateful_session_resumption": None,
    "session_timeout": "session_timeout: " + NOT_YET,
    "ocsp_staple_policy": None,
    "full_scan_certs_on_sni_mismatch": None,
    "prefer_client_ciphers": None,
    "tls_session_ticket_keys": "session ticket keys: " + NOT_YET,
}
_COMMON_FIELDS = {
    "tls_params": None, "tls_certificates": None, "validation_context": None,
    "alpn_protocols": None,
    "tls_certificate_sds_secret_configs": None,
    "validation_context_sds_secret_config": SDS,
    "combined_validation_context": "combined_validation_context (SDS): " + NOT_YET,
    "tls_certificate_provider_instance": "certificate provider instances: " + NOT_YET,
    "tls_certificate_certificate_provider": "certificate providers: " + NOT_YET,
    "tls_certificate_certificate_provider_instance": "certificate providers: " + NOT_YET,
    "validation_context_certificate_provider": "certificate providers: " + NOT_YET,
    "validation_context_certificate_provider_instance": "certificate providers: " + NOT_YET,
    "custom_handshaker": "custom handshakers: " + NOT_YET,
    "key_log": "TLS key logging: " + NOT_YET,
    "custom_tls_certificate_selector": "custom certificate selectors: " + NOT_YET,
}
_PARAMS_FIELDS = {
    "tls_minimum_protocol_version": None, "tls_maximum_protocol_version": None,
    "cipher_suites": None, "ecdh_curves": None,
    "signature_algorithms": "signature_algorithms: " + NOT_YET,
    "compliance_policies": "compliance_policies: " + NOT_YET,
}
_CERT_FIELDS = {
    "certificate_chain": None, "private_key": None,
    "password": "encrypted private keys: " + NOT_YET,
    "ocsp_staple": "OCSP stapling: " + NOT_YET,
    "signed_certificate_timestamp": "signed certificate timestamps: " + NOT_YET,
    "private_key_provider": "private key providers: " + NOT_YET,
    "watched_directory": "watched directories (rotation): a later issue: " + NOT_YET,
    "pkcs12": "PKCS#12 bundles: " + NOT_YET + " (use certificate_chain and private_key)",
}
_VALIDATION_FIELDS = {
    "trusted_ca": None, "match_typed_subject_alt_names": None,
    "match_subject_alt_names": None, "crl": None, "only_verify_leaf_cert_crl": None,
    "allow_expired_certificate": None, "trust_chain_verification": None,
    "verify_certificate_spki": "verify_certificate_spki: " + NOT_YET,
    "verify_certificate_hash": "verify_certificate_hash: " + NOT_YET,
    "custom_validator_config": "custom certificate validators: " + NOT_YET,
    "max_verify_depth": "max_verify_depth: " + NOT_YET,
    "watched_directory": "watched directories (rotation): a later issue: " + NOT_YET,
    "system_root_certs": "system_root_certs: " + NOT_YET,
    "ca_certificate_provider_instance": "certificate providers: " + NOT_YET,
    "custom_validator": "custom certificate validators: " + NOT_YET,
}
_VERSIONS = {"TLS_AUTO": 0, "TLSv1_0": 1, "TLSv1_1": 2, "TLSv1_2": 3, "TLSv1_3": 4}
_SAN_TYPES = {"SAN_TYPE_UNSPECIFIED": 0, "EMAIL": 1, "DNS": 2, "URI": 3, "IP_ADDRESS": 4,
              "OTHER_NAME": 5}
_SAN_NATIVE = {"EMAIL": "email", "DNS": "dns", "URI": "uri", "IP_ADDRESS": "ip"}
# Envoy's curve names -> OpenSSL's
_CURVES = {"P-256": "prime256v1", "P-384": "secp384r1", "P-521": "secp521r1",
           "X25519": "X25519"}
ENVOY_DEFAULT_CURVES = ("X25519", "P-256")
XFCC_ENUM = {"SANITIZE": 0, "FORWARD_ONLY": 1, "APPEND_FORWARD": 2, "SANITIZE_SET": 3,
             "ALWAYS_FORWARD_ONLY": 4}


def _tls_socket(c: EnvoyChecker, raw, p: str, tls_type: str, where: str):
    """A transport_socket: (its TLS context's typed_config, path) when it is
    envoy.transport_sockets.tls with a `tls_type`; None when it is plain (raw_buffer) or
    wrong (then reported)."""
    m = c.message(raw, p, {"name": None, "typed_config": None})
    if m is None:
        return None
    name = c.text(m.get("name", ""), m.p("name"), nonempty=False) if "name" in m else ""
    tc = m.get("typed_config", _MISSING)
    t = tc.get("@type") if isinstance(tc, dict) else None
    if t == "type.googleapis.com/" + RAW_BUFFER or (tc is _MISSING and name in (
            "envoy.transport_sockets.raw_buffer", "raw_buffer")):
        return None
    if tc is _MISSING:
        c.err(p, f"typed_config missing: Envoy finds a transport socket by its @type (for "
                 f"TLS: type.googleapis.com/{tls_type})")
        return None
    if t != "type.googleapis.com/" + tls_type:
        c.err(m.p("typed_config"),
              f"transport socket {name!r}{f' ({t})' if t else ''}: {NOT_YET} (supported"
              f"{where}: envoy.transport_sockets.tls with a {tls_type}, and raw_buffer)")
        return None
    return tc, m.p("typed_config")


def translate_transport_socket(c: EnvoyChecker, raw, p: str,
                               protocol: Optional[str]) -> Optional[TlsContext]:
    """-> the chain's TlsContext, or None (plain: raw_buffer, or an error reported)."""
    found = _tls_socket(c, raw, p, DOWNSTREAM_TLS, "")
    return _downstream(c, found[0], found[1], protocol) if found else None


_UPSTREAM_FIELDS = {
    "common_tls_context": None, "sni": None, "max_session_keys": None,
    "allow_renegotiation": None, "enforce_rsa_key_usage": None,
    "auto_host_sni": "auto_host_sni: " + NOT_YET + " (set sni)",
    "auto_sni_san_validation": "auto_sni_san_validation: " + NOT_YET + " (use "
                               "match_typed_subject_alt_names)",
}


def translate_upstream_transport_socket(c: EnvoyChecker, raw, p: str,
                                        http2: bool) -> Optional[UpstreamTls]:
    """A cluster's transport_socket -> its UpstreamTls, or None (plain, or an error
    reported)."""
    found = _tls_socket(c, raw, p, UPSTREAM_TLS, " on clusters")
    return _upstream(c, found[0], found[1], http2) if found else None


def _upstream(c: EnvoyChecker, raw, p: str, http2: bool) -> Optional[UpstreamTls]:
    m = c.typed_config(raw, p, UPSTREAM_TLS, _UPSTREAM_FIELDS)
    if m is None:
        return None
    kw: dict = {}
    if "sni" in m:
        sni = c.text(m.get("sni"), m.p("sni"), nonempty=False)
        if sni:
            kw["sni"] = sni
    if _bool(c, m, "allow_renegotiation"):
        c.err(m.p("allow_renegotiation"), "true: " + NOT_YET)
    if "max_session_keys" in m:
        # a google.protobuf.UInt32Value: a plain number in YAML/JSON
        n = c.integer(m.get("max_session_keys"), m.p("max_session_keys"), lo=0)
        if n is not None:
            kw["max_session_keys"] = min(n, 1)      # fastmesh keeps one (the latest)
    if "common_tls_context" in m:
        cm = c.message(m.get("common_tls_context"), m.p("common_tls_context"), _COMMON_FIELDS)
        if cm is None:
            return None
        _params(c, cm, kw, client=True)
        if "tls_certificate_sds_secret_configs" in cm:
            c.err(cm.p("tls_certificate_sds_secret_configs"),
                  "client certificates from SDS: " + NOT_YET + " (use tls_certificates)")
        certs = c.seq(cm.get("tls_certificates"), cm.p("tls_certificates")) \
            if "tls_certificates" in cm else []
        if len(certs) > 1:
            c.err(cm.p("tls_certificates"), f"{len(certs)} certificates: a client presents one")
        elif certs:
            cp = f"{cm.p('tls_certificates')}[0]"
            cert = c.message(certs[0], cp, _CERT_FIELDS)
            if cert is not None:
                _pem_source(c, c.need(cert, "certificate_chain"), cert.p("certificate_chain"),
                            kw, "cert_chain_file", "cert_chain_pem")
                _pem_source(c, c.need(cert, "private_key"), cert.p("private_key"), kw,
                            "private_key_file", "private_key_pem")
        if "alpn_protocols" in cm:
            ap = cm.p("alpn_protocols")
            kw["alpn"] = tuple(t for j, x in enumerate(c.seq(cm.get("alpn_protocols"), ap))
                               if (t := c.text(x, f"{ap}[{j}]")) is not None)
        if "validation_context" in cm:
            _validation(c, cm.get("validation_context"), cm.p("validation_context"), kw)
    if any(v is None for v in kw.values()):
        return None
    t = UpstreamTls(**kw)
    check_upstream_tls(c, t, p)
    return t


def _downstream(c: EnvoyChecker, raw, p: str, protocol) -> Optional[TlsContext]:
    m = c.typed_config(raw, p, DOWNSTREAM_TLS, _DOWNSTREAM_FIELDS)
    if m is None:
        return None
    kw: dict = {}
    if "require_client_certificate" in m:
        kw["require_client_certificate"] = bool(_bool(c, m, "require_client_certificate"))
    if _bool(c, m, "require_sni"):
        c.err(m.p("require_sni"), "true: " + NOT_YET)
    for flag in ("disable_stateless_session_resumption", "disable_stateful_session_resumption",
                 "full_scan_certs_on_sni_mismatch", "prefer_client_ciphers"):
        if _bool(c, m, flag):
            c.err(m.p(flag), "true: " + NOT_YET)
    if "ocsp_staple_policy" in m:
        pol = c.enum(m.get("ocsp_staple_policy"), m.p("ocsp_staple_policy"),
                     {"LENIENT_STAPLING": 0, "STRICT_STAPLING": 1, "MUST_STAPLE": 2},
                     "ocsp_staple_policy")
        if pol not in (None, "LENIENT_STAPLING"):
            c.err(m.p("ocsp_staple_policy"), f"{pol}: {NOT_YET}")
    cm = c.message(c.need(m, "common_tls_context"), m.p("common_tls_context"), _COMMON_FIELDS) \
        if "common_tls_context" in m else None
    if cm is None:
        if "common_tls_context" not in m:
            c.err(m.p("common_tls_context"), "missing: a server needs a certificate "
                                             "(common_tls_context.tls_certificates)")
        return None
    _params(c, cm, kw)
    if "tls_certificate_sds_secret_configs" in cm:
        if "tls_certificates" in cm:
            c.err(cm.p("tls_certificate_sds_secret_configs"), "with tls_certificates too: "
                  "one certificate per chain, from a file or from SDS")
        _sds_configs(c, cm.get("tls_certificate_sds_secret_configs"),
                     cm.p("tls_certificate_sds_secret_configs"), kw)
        certs = []
    else:
        certs = c.seq(c.need(cm, "tls_certificates"), cm.p("tls_certificates"),
                      nonempty=True) if "tls_certificates" in cm else []
    if "tls_certificates" not in cm:
        pass                                        # need() (or the SDS source) said it
    elif len(certs) > 1:
        c.err(cm.p("tls_certificates"), f"{len(certs)} certificates: {NOT_YET} (one per filter "
              f"chain: choose certificates by SNI with a chain per name)")
    if certs:
        cp = f"{cm.p('tls_certificates')}[0]"
        cert = c.message(certs[0], cp, _CERT_FIELDS)
        if cert is not None:
            _pem_source(c, c.need(cert, "certificate_chain"), cert.p("certificate_chain"), kw,
                        "cert_chain_file", "cert_chain_pem")
            _pem_source(c, c.need(cert, "private_key"), cert.p("private_key"), kw,
                        "private_key_file", "private_key_pem")
    if "alpn_protocols" in cm:
        ap = cm.p("alpn_protocols")
        alpn = tuple(t for j, x in enumerate(c.seq(cm.get("alpn_protocols"), ap))
                     if (t := c.text(x, f"{ap}[{j}]")) is not None)
        served = tuple(a for a in alpn if a != "h3" and (a != "h2" or protocol in
                                                          ("http1", "http2")))
        if served != alpn:
            c.note(ap, f"{[a for a in alpn if a not in served]} not offered: not served by a "
                       f"{protocol} chain (offered: {list(served) or 'no ALPN'})")
        kw["alpn"] = served
    if "validation_context" in cm:
        _validation(c, cm.get("validation_context"), cm.p("validation_context"), kw)
    if kw.get("require_client_certificate") and not (kw.get("trusted_ca_file")
                                                     or kw.get("trusted_ca_pem")):
        c.err(m.p("require_client_certificate"), "true without validation_context.trusted_ca: "
              + NOT_YET + " (fastmesh verifies client certificates against a trusted CA)")
    if kw.get("sds_path"):
        kw["cert_chain_file"] = kw["private_key_file"] = None
    elif not (kw.get("cert_chain_file") or kw.get("cert_chain_pem")) or \
            not (kw.get("private_key_file") or kw.get("private_key_pem")):
        return None
    else:
        kw.setdefault("cert_chain_file", None)
        kw.setdefault("private_key_file", None)
    t = TlsContext(**kw)
    check_tls(c, t, p)
    return t


def _sds_configs(c: EnvoyChecker, raw, p: str, kw: dict) -> None:
    """tls_certificate_sds_secret_configs: one SdsSecretConfig whose sds_config is a file
    (path_config_source, or the older `path`), with an optional watched_directory. SDS from
    a control plane (ads, api_config_source) is refused for now."""
    items = c.seq(raw, p, nonempty=True) or []
    if len(items) > 1:
        c.err(p, f"{len(items)} secrets: one certificate per chain ({NOT_YET})")
        return
    for i, item in enumerate(items):
        ip = f"{p}[{i}]"
        sc = c.message(item, ip, {"name": None, "sds_config": None})
        if sc is None:
            return
        name = c.text(c.need(sc, "name"), sc.p("name"))
        if "sds_config" not in sc:
            c.err(sc.p("sds_config"), "missing: static secrets (bootstrap `secrets`) are "
                                      + NOT_YET + "; give a path_config_source")
            return
        src = c.message(sc.get("sds_config"), sc.p("sds_config"), {
            "path_config_source": None, "path": None, "resource_api_version": None,
            "initial_fetch_timeout": None,
            "ads": "SDS over ADS needs dynamic_resources.ads_config (the secret comes over "
                   "that stream)",
            "api_config_source": "SDS from an API config source: " + NOT_YET,
            "self": "SDS from self: " + NOT_YET})
        if src is None:
            return
        if "resource_api_version" in src and src.get("resource_api_version") not in ("V3", 2):
            c.err(src.p("resource_api_version"), "only V3")
        if "path_config_source" in src:
            pc = c.message(src.get("path_config_source"), src.p("path_config_source"),
                           {"path": None, "watched_directory": None})
            if pc is None:
                return
            path = c.text(c.need(pc, "path"), pc.p("path"))
            if "watched_directory" in pc:
                wd = c.message(pc.get("watched_directory"), pc.p("watched_directory"),
                               {"path": None})
                if wd is not None:
                    kw["sds_watched_directory"] = c.text(c.need(wd, "path"), wd.p("path"))
        elif "path" in src:
            path = c.text(src.get("path"), src.p("path"))
        else:
            c.err(sc.p("sds_config"), "expected path_config_source (SDS from a file)")
            return
        if path is not None and name is not None:
            kw["sds_path"], kw["sds_secret"] = path, name


def _bool(c: EnvoyChecker, m, name: str) -> Optional[bool]:
    """A bool or google.protobuf.BoolValue (true / {value: true})."""
    if name not in m:
        return None
    v = m.get(name)
    if isinstance(v, dict):
        w = c.message(v, m.p(name), {"value": None})
        v = w.get("value", False) if w is not None else False
    return c.boolean(v, m.p(name))


def _params(c: EnvoyChecker, cm, kw: dict, client: bool = False) -> None:
    if "tls_params" not in cm:
        return
    pm = c.message(cm.get("tls_params"), cm.p("tls_params"), _PARAMS_FIELDS)
    if pm is None:
        return
    for field, key, auto in (("tls_minimum_protocol_version", "min_version", "1.2"),
                             ("tls_maximum_protocol_version", "max_version",
                              "1.2" if client else "1.3")):
        if field in pm:
            v = c.enum(pm.get(field), pm.p(field), _VERSIONS, "TLS version")
            if v in ("TLSv1_0", "TLSv1_1"):
                c.err(pm.p(field), f"{v}: {NOT_YET} (TLS 1.2 and 1.3 are served)")
            elif v is not None:
                kw[key] = {"TLS_AUTO": auto, "TLSv1_2": "1.2", "TLSv1_3": "1.3"}[v]
    if kw.get("min_version") == "1.3" and kw.get("max_version", "1.2" if client else
                                                   "1.3") == "1.2":
        c.err(pm.p("tls_minimum_protocol_version"), "above the maximum version" + (
            " (a client's default maximum is TLSv1_2: Envoy would fail every handshake; set "
            "tls_maximum_protocol_version: TLSv1_3)" if client and "max_version" not in kw
            else ""))
    if "cipher_suites" in pm:
        cp = pm.p("cipher_suites")
        names: list = []
        for j, x in enumerate(c.seq(pm.get("cipher_suites"), cp)):
            t = c.text(x, f"{cp}[{j}]")
            if t is None:
                continue
            # BoringSSL's equal-preference groups "[A|B]": kept in their order
            names += [n for n in t.strip("[]").split("|") if n]
        kw["ciphers"] = tuple(names) or DEFAULT_TLS12_CIPHERS
    if "ecdh_curves" in pm:
        ep = pm.p("ecdh_curves")
        curves = [t for j, x in enumerate(c.seq(pm.get("ecdh_curves"), ep))
                  if (t := c.text(x, f"{ep}[{j}]")) is not None]
        if tuple(curves) == ENVOY_DEFAULT_CURVES or not curves:
            pass
        elif len(curves) == 1 and curves[0] in _CURVES:
            kw["ecdh_curve"] = _CURVES[curves[0]]
        else:
            c.err(ep, f"{curves}: {NOT_YET} (one curve of {', '.join(_CURVES)}, or Envoy's "
                      f"default X25519, P-256)")


def _pem_source(c: EnvoyChecker, raw, p: str, kw: dict, file_key: str, pem_key: str) -> None:
    """A DataSource holding PEM: a filename -> kw[file_key]; inline_string or inline_bytes
    (base64 in YAML/JSON, as an xDS secret's arrive) -> kw[pem_key]."""
    if raw is _MISSING:
        return
    m = c.message(raw, p, {
        "filename": None, "inline_string": None, "inline_bytes": None,
        "environment_variable": "certificates from environment variables: " + NOT_YET,
        "watched_directory": "watched directories (rotation): a later issue: " + NOT_YET})
    if m is None:
        return
    kinds = [k for k in ("filename", "inline_string", "inline_bytes") if k in m]
    if len(kinds) != 1:
        if "environment_variable" not in m:
            c.err(p, "expected one of filename, inline_string, inline_bytes")
        return
    k = kinds[0]
    if k == "filename":
        kw[file_key] = c.text(m.get(k), m.p(k))
        return
    v = c.text(m.get(k), m.p(k))
    if v is None:
        return
    if k == "inline_bytes":
        import base64
        import binascii
        try:
            v = base64.b64decode(v, validate=True).decode("ascii")
        except (binascii.Error, ValueError):
            c.err(m.p(k), "not base64 of PEM text")
            return
    if "-----BEGIN " not in v:
        c.err(m.p(k), "not PEM (-----BEGIN ...)")
        return
    kw[pem_key] = v


def _data_source(c: EnvoyChecker, raw, p: str) -> Optional[str]:
    if raw is _MISSING:
        return None
    m = c.message(raw, p, {
        "filename": None,
        "inline_string": "inline certificates and keys: " + NOT_YET + " (use filename)",
        "inline_bytes": "inline certificates and keys: " + NOT_YET + " (use filename)",
        "environment_variable": "certificates from environment variables: " + NOT_YET,
        "watched_directory": "watched directories (rotation): a later issue: " + NOT_YET})
    if m is None or "filename" not in m:
        if m is not None and not any(k in m for k in ("inline_string", "inline_bytes",
                                                      "environment_variable")):
            c.err(p, "missing: filename")
        return None
    return c.text(m.get("filename"), m.p("filename"))


def _validation(c: EnvoyChecker, raw, p: str, kw: dict) -> None:
    v = c.message(raw, p, _VALIDATION_FIELDS)
    if v is None:
        return
    if "trusted_ca" in v:
        _pem_source(c, v.get("trusted_ca"), v.p("trusted_ca"), kw, "trusted_ca_file",
                    "trusted_ca_pem")
    if "crl" in v:
        kw["crl_file"] = _data_source(c, v.get("crl"), v.p("crl"))
    if _bool(c, v, "only_verify_leaf_cert_crl"):
        kw["crl_leaf_only"] = True
    if _bool(c, v, "allow_expired_certificate"):
        c.err(v.p("allow_expired_certificate"), "true: " + NOT_YET)
    if "trust_chain_verification" in v:
        tcv = c.enum(v.get("trust_chain_verification"), v.p("trust_chain_verification"),
                     {"VERIFY_TRUST_CHAIN": 0, "ACCEPT_UNTRUSTED": 1},
                     "trust_chain_verification")
        if tcv == "ACCEPT_UNTRUSTED":
            c.err(v.p("trust_chain_verification"), "ACCEPT_UNTRUSTED: " + NOT_YET)
    sans: list = []
    if "match_typed_subject_alt_names" in v:
        sp = v.p("match_typed_subject_alt_names")
        for j, item in enumerate(c.seq(v.get("match_typed_subject_alt_names"), sp)):
            ip = f"{sp}[{j}]"
            s = c.message(item, ip, {"san_type": None, "matcher": None,
                                     "oid": "OTHER_NAME matchers: " + NOT_YET})
            if s is None:
                continue
            typ = c.enum(c.need(s, "san_type"), s.p("san_type"), _SAN_TYPES, "san_type") \
                if "san_type" in s else None
            if "san_type" not in s:
                pass
            elif typ in ("SAN_TYPE_UNSPECIFIED", "OTHER_NAME"):
                c.err(s.p("san_type"), f"{typ}: {NOT_YET if typ == 'OTHER_NAME' else 'invalid'}"
                      " (DNS, URI, EMAIL or IP_ADDRESS)")
                typ = None
            mt = _string_matcher(c, c.need(s, "matcher"), s.p("matcher")) \
                if "matcher" in s else None
            if typ and mt:
                sans.append(SanMatch(_SAN_NATIVE[typ], *mt))
    if "match_subject_alt_names" in v:
        # deprecated: each matcher against SANs of every type
        sp = v.p("match_subject_alt_names")
        for j, item in enumerate(c.seq(v.get("match_subject_alt_names"), sp)):
            mt = _string_matcher(c, item, f"{sp}[{j}]")
            if mt:
                sans += [SanMatch(t, *mt) for t in ("dns", "uri", "email", "ip")]
    if sans:
        kw["match_subject_alt_names"] = tuple(sans)
        if not kw.get("trusted_ca_file") and not kw.get("trusted_ca_pem"):
            c.err(p, "subject alt name matchers without trusted_ca: " + NOT_YET)


def _string_matcher(c: EnvoyChecker, raw, p: str) -> Optional[tuple]:
    """A type.matcher.v3.StringMatcher -> (kind, value, ignore_case)."""
    if raw is _MISSING:
        return None
    m = c.message(raw, p, {"exact": None, "prefix": None, "suffix": None, "contains": None,
                           "safe_regex": None, "ignore_case": None,
                           "custom": "custom string matchers: " + NOT_YET})
    if m is None:
        return None
    kinds = [k for k in ("exact", "prefix", "suffix", "contains", "safe_regex") if k in m]
    if len(kinds) != 1:
        c.err(p, "expected exactly one of exact, prefix, suffix, contains, safe_regex")
        return None
    k = kinds[0]
    ic = bool(_bool(c, m, "ignore_case")) if "ignore_case" in m else False
    if k == "safe_regex":
        if ic:
            c.err(m.p("ignore_case"), "with safe_regex: Envoy refuses it")
        rx = _regex(c, m.get("safe_regex"), m.p("safe_regex"))
        return None if rx is None else ("regex", rx, False)
    val = c.text(m.get(k), m.p(k), nonempty=False)
    return None if val is None else (k, val, ic)


def translate_xfcc(c: EnvoyChecker, m, kw: dict) -> None:
    """HCM forward_client_cert_details / set_current_client_cert_details -> kw["xfcc"]:
    (mode, details), applied to the chain's TlsContext."""
    mode, details = "sanitize", ()
    if "forward_client_cert_details" in m:
        e = c.enum(m.get("forward_client_cert_details"), m.p("forward_client_cert_details"),
                   XFCC_ENUM, "forward_client_cert_details")
        if e is not None:
            mode = e.lower()
    if "set_current_client_cert_details" in m:
        d = c.message(m.get("set_current_client_cert_details"),
                      m.p("set_current_client_cert_details"),
                      {"subject": None, "cert": None, "chain": None, "dns": None, "uri": None})
        if d is not None:
            details = tuple(k for k in ("subject", "uri", "dns", "cert", "chain") if _bool(c, d, k))
    if mode != "sanitize" or details:
        kw["xfcc"] = (mode, details)
