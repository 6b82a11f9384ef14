"""Downstream TLS and mTLS, native config: curl and Python ssl clients against `fastmesh run`,
on uvloop and on asyncio. Certificates are made per module (tlscerts.make_pki).

HTTP: TLS 1.2 and 1.3, ALPN, x-forwarded-proto, SNI choosing the chain and its certificate,
client certificates accepted and refused by CA, by SPIFFE id and by CRL (counted by reason),
x-forwarded-client-cert reaching the upstream and matched by a route, bodies both ways with
back-pressure, a slow streaming upstream, keep-alive reuse at once and pipelining. Bolt and
TCP over TLS. Bad handshakes: garbage after a ClientHello, a client that never finishes (the
handshake timeout), a client that says nothing; each counted, none leaks a connection.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from fastmesh._core import bolt
from fmtest import free_port
from tlscerts import SPIFFE, make_pki

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_block(pki, cert="server", **kw):
    t = {"cert_chain_file": pki[cert], "private_key_file": pki[f"{cert}_key"]}
    t.update(kw)
    return t


def mtls_block(pki, cert="server", **kw):
    return tls_block(pki, cert, trusted_ca_file=pki["ca"], require_client_certificate=True,
                     match_subject_alt_names=[{"uri": {"exact": SPIFFE + "client"}}], **kw)


def http_cfg(up, tls, routes=None):
    return {
        "listeners": [{"name": "web", "route_table": "rt", "tls": tls}],
        "route_tables": {"rt": {"routes": routes or [{"match": {"prefix": "/"},
                                                      "cluster": "up"}]}},
        "clusters": [{"name": "up", "endpoints": [up.address]}],
    }


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


def connect(port, pki, sni="localhost", **kw) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return client_ctx(pki, **kw).wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def read_response(s, buf=b""):
    """One HTTP/1.1 response with a content-length from s: (status, headers, body, rest)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed mid-head: {buf[:200]!r}")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(hdrs.get("content-length", "0"))
    while len(buf) < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buf += chunk
    return int(lines[0].split()[1]), hdrs, buf[:n], buf[n:]


def get(s, path, host="localhost", extra=""):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    return read_response(s)[:3]


def curl(pki, port, path="/echo", sni="localhost", args=()):
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", pki["ca"],
                        "--resolve", f"{sni}:{port}:127.0.0.1", *args,
                        "-w", "\n%{http_code} %{http_version}",
                        f"https://{sni}:{port}{path}"], capture_output=True, text=True,
                       timeout=30)
    return r.returncode, r.stdout, r.stderr


def lstats(fm, name="web"):
    return fm.listener_stats(name)


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ------------------------------------------------------------------------ HTTP over TLS

@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_curl_over_tls_versions(pki, start_upstream, start_fastmesh, loop_kind, version):
    up = start_upstream()
    fm = start_fastmesh(http_cfg(up, tls_block(pki, alpn=["http/1.1"])), loop=loop_kind)
    args = ["--tlsv1.2", "--tls-max", "1.2"] if version == "1.2" else ["--tlsv1.3"]
    rc, out, err = curl(pki, fm.port, args=args + ["-v"])
    assert rc == 0, err
    body, _, tail = out.rpartition("\n")
    assert tail == "200 1.1"
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["x-forwarded-proto"] == "https"
    assert f"TLSv{version}" in err and "ALPN: server accepted http/1.1" in err, err[-2000:]
    st = lstats(fm)
    assert st["ssl.handshake"] == 1 and st["ssl.no_certificate"] == 1
    # plain HTTP to a TLS listener: refused in the handshake, counted
    with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(100)
        assert data == b"" or data[0] == 0x15, data      # closed, or a TLS alert record
    assert wait_for(lambda: lstats(fm)["ssl.connection_error"] == 1)


def test_version_bounds_and_ciphers(pki, start_upstream, start_fastmesh):
    up = start_upstream()
    fm = start_fastmesh(http_cfg(up, tls_block(pki, min_version="1.3")))
    with pytest.raises(ssl.SSLError):
        connect(fm.port, pki, version="1.2")
    with connect(fm.port, pki, version="1.3") as s:
        assert s.version() == "TLSv1.3"
        assert get(s, "/")[0] == 200
    fm2 = start_fastmesh(http_cfg(up, tls_block(pki, max_version="1.2",
                                                ciphers=["ECDHE-ECDSA-AES256-GCM-SHA384"])))
    with connect(fm2.port, pki) as s:
        assert s.version() == "TLSv1.2"
        assert s.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
        assert get(s, "/")[0] == 200


def test_alpn(pki, start_upstream, start_fastmesh, loop_kind):
    up = start_upstream()
    fm = start_fastmesh(http_cfg(up, tls_block(pki, alpn=["http/1.1"])), loop=loop_kind)
    with connect(fm.port, pki, alpn=["h2", "http/1.1"]) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert get(s, "/")[0] == 200
    with connect(fm.port, pki, alpn=["h2"]) as s:     # no overlap: no ALPN, not a failure
        assert s.selected_alpn_protocol() is None
        assert get(s, "/")[0] == 200


# ------------------------------------------------------------------------ mTLS

def test_mtls_accept_and_refuse_by_reason(pki, start_upstream, start_fastmesh, loop_kind):
    up = start_upstream()
    tls = mtls_block(pki, forward_client_cert="sanitize_set",
                     forward_client_cert_details=["uri", "subject"])
    fm = start_fastmesh(http_cfg(up, tls), loop=loop_kind)
    rc, out, err = curl(pki, fm.port, args=["--cert", pki["client"], "--key", pki["client_key"],
                                            "-H", "x-forwarded-client-cert: By=spoofed"])
    assert rc == 0, err
    seen = {k.lower(): v for k, v in json.loads(out.rpartition("\n")[0])["headers"]}
    xfcc = seen["x-forwarded-client-cert"]
    assert xfcc.startswith(f"By={SPIFFE}server;Hash=") and "spoofed" not in xfcc
    assert f";Subject=\"CN=client,O=fastmesh tests\";URI={SPIFFE}client" in xfcc
    for version in ("1.2", "1.3"):
        for cert, reason in ((None, "ssl.fail_verify_no_cert"),
                             ("stranger", "ssl.fail_verify_error"),
                             ("intruder", "ssl.fail_verify_san")):
            before = lstats(fm)[reason]
            args = ["--tlsv1.2", "--tls-max", "1.2"] if version == "1.2" else ["--tlsv1.3"]
            if cert:
                args += ["--cert", pki[cert], "--key", pki[f"{cert}_key"]]
            rc, out, err = curl(pki, fm.port, args=args)
            assert rc != 0, (version, cert, out)
            assert wait_for(lambda: lstats(fm)[reason] == before + 1), (version, cert,
                                                                        lstats(fm))
    st = lstats(fm)
    assert st["ssl.handshake"] == 1 and st["downstream_cx_active"] == 0
    # the refused never reached the HTTP layer, but were accepted: counted from their accept
    # (Envoy's listener downstream_cx_total; test_tls_envoy_parity checks it beside Envoy)
    assert st["downstream_rq_total"] == 1 and st["downstream_cx_total"] == 7


def test_crl_refuses_a_revoked_client(pki, start_upstream, start_fastmesh):
    up = start_upstream()
    tls = tls_block(pki, trusted_ca_file=pki["ca"], require_client_certificate=True,
                    crl_file=pki["crl"])
    fm = start_fastmesh(http_cfg(up, tls))
    with connect(fm.port, pki, cert="client", version="1.2") as s:
        assert get(s, "/")[0] == 200
    with pytest.raises((ssl.SSLError, OSError)):
        with connect(fm.port, pki, cert="revoked", version="1.2") as s:
            get(s, "/")
    assert wait_for(lambda: lstats(fm)["ssl.fail_verify_error"] == 1)


def test_optional_client_cert_and_xfcc_route(pki, start_upstream, start_fastmesh, loop_kind):
    """trusted_ca without require_client_certificate: a certificate is asked for, verified
    when given, and may be absent; a route matches on the header the proxy set."""
    up = start_upstream()
    tls = tls_block(pki, trusted_ca_file=pki["ca"], forward_client_cert="sanitize_set",
                    forward_client_cert_details=["uri"])
    routes = [
        {"match": {"prefix": "/", "headers": [{"name": "x-forwarded-client-cert",
                                               "regex": f".*URI={SPIFFE}client.*"}]},
         "cluster": "up"},
        {"match": {"prefix": "/"}, "direct_response": {"status": 403, "body": "who are you"}},
    ]
    fm = start_fastmesh(http_cfg(up, tls, routes), loop=loop_kind)
    with connect(fm.port, pki, cert="client") as s:
        status, _, body = get(s, "/echo")
        assert status == 200
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-forwarded-client-cert"].endswith(f";URI={SPIFFE}client")
    with connect(fm.port, pki) as s:       # no certificate: a spoofed header does not pass
        status, _, body = get(s, "/echo", extra=f"x-forwarded-client-cert: URI={SPIFFE}client\r\n")
        assert status == 403 and body == b"who are you"
    with pytest.raises((ssl.SSLError, OSError)):
        with connect(fm.port, pki, cert="stranger") as s:
            get(s, "/")
    st = lstats(fm)
    assert st["ssl.no_certificate"] == 1 and st["ssl.handshake"] == 2


# ------------------------------------------------------------------------ SNI chains

def test_sni_chooses_chain_and_certificate(pki, start_upstream, start_fastmesh, loop_kind):
    up_www, up_api = start_upstream("www"), start_upstream("api")
    cfg = {
        "listeners": [{"name": "web", "filter_chains": [
            {"name": "www", "match": {"server_names": ["www.example.com"]},
             "route_table": "www", "tls": tls_block(pki, "server")},
            {"name": "api", "match": {"server_names": ["*.example.com"]},
             "route_table": "api", "tls": tls_block(pki, "api", alpn=["http/1.1"])},
            {"name": "plain", "default": True, "route_table": "www"},
        ]}],
        "route_tables": {"www": {"routes": [{"match": {"prefix": "/"}, "cluster": "www"}]},
                         "api": {"routes": [{"match": {"prefix": "/"}, "cluster": "api"}]}},
        "clusters": [{"name": "www", "endpoints": [up_www.address]},
                     {"name": "api", "endpoints": [up_api.address]}],
    }
    fm = start_fastmesh(cfg, loop=loop_kind)
    for sni, cn, server in (("www.example.com", "localhost", "www"),
                            ("api.example.com", "api.example.com", "api")):
        rc, out, err = curl(pki, fm.port, sni=sni)
        assert rc == 0, err
        assert json.loads(out.rpartition("\n")[0])["server"] == server
        with connect(fm.port, pki, sni=sni) as s:
            assert dict(x[0] for x in s.getpeercert()["subject"])["commonName"] == cn
    # plain HTTP on the same port: the default chain
    with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body, _ = read_response(s)
        assert status == 200
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-forwarded-proto"] == "http"
    st = lstats(fm)
    assert st["sniffed_tls"] == 4 and st["ssl.handshake"] == 4


# ------------------------------------------------------------------------ bodies, reuse

def test_big_bodies_both_ways_and_slow_stream(pki, start_upstream, start_fastmesh, loop_kind):
    up = start_upstream()
    fm = start_fastmesh(http_cfg(up, tls_block(pki)), loop=loop_kind)
    with connect(fm.port, pki) as s:
        status, _, body = get(s, "/bytes/5000000")
        assert status == 200 and len(body) == 5000000
        payload = os.urandom(3 << 20)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(payload) + payload)
        status, _, body, _ = read_response(s)
        got = json.loads(body)
        assert got["body_bytes"] == len(payload)
        assert got["body_sha256"] == hashlib.sha256(payload).hexdigest()
        # a slow upstream streaming its body: every piece arrives, in order
        t0 = time.monotonic()
        status, _, body = get(s, "/drip/50/600/12")
        assert status == 200 and len(body) == 120 and time.monotonic() - t0 >= 0.5
        # chunked
        s.sendall(b"GET /chunked/100000 HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while not buf.endswith(b"\r\n0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
        assert buf.startswith(b"HTTP/1.1 200")


def test_reuse_at_once_and_pipelined(pki, start_upstream, start_fastmesh, loop_kind):
    up = start_upstream()
    fm = start_fastmesh(http_cfg(up, tls_block(pki)), loop=loop_kind)
    with connect(fm.port, pki) as s:
        for i in range(200):
            assert get(s, f"/{i}")[0] == 200
        s.sendall(b"".join(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n
                           for n in (10, 20000, 30)))
        rest = b""
        for n in (10, 20000, 30):
            status, _, body, rest = read_response(s, rest)
            assert status == 200 and len(body) == n
    assert wait_for(lambda: lstats(fm)["downstream_cx_active"] == 0)
    assert lstats(fm)["ssl.handshake"] == 1


# ------------------------------------------------------------------------ bad handshakes

def client_hello(sni="localhost") -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def closed_within(s, seconds) -> bool:
    s.settimeout(seconds)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_bad_handshakes_counted_and_closed(pki, start_upstream, start_fastmesh, loop_kind):
    up = start_upstream()
    fm = start_fastmesh(http_cfg(up, tls_block(pki, handshake_timeout_ms=400)), loop=loop_kind)
    worker = fm.worker_pids()[0]

    def fds():
        return len(os.listdir(f"/proc/{worker}/fd"))
    with connect(fm.port, pki) as s:        # warm: the upstream pool's connection is made
        assert get(s, "/")[0] == 200
    assert wait_for(lambda: lstats(fm)["downstream_cx_active"] == 0)
    baseline = fds()
    # garbage after a ClientHello
    with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
        s.sendall(client_hello() + os.urandom(300))
        assert closed_within(s, 5)
    assert wait_for(lambda: lstats(fm)["ssl.connection_error"] == 1)
    # a ClientHello, then nothing: the handshake timeout
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
        s.sendall(client_hello())
        assert closed_within(s, 5)
    assert 0.3 <= time.monotonic() - t0 < 3
    # nothing at all
    with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
        assert closed_within(s, 5)
    assert wait_for(lambda: lstats(fm)["downstream_cx_transport_socket_connect_timeout"] == 2)
    # connect and close (a port probe): no TLS error
    socket.create_connection(("127.0.0.1", fm.port), timeout=5).close()
    # a truncated ClientHello then EOF
    with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
        s.sendall(client_hello()[:20])
        s.shutdown(socket.SHUT_WR)
        assert closed_within(s, 5)
    assert wait_for(lambda: lstats(fm)["ssl.connection_error"] == 2)
    # many clients that never finish, at once: each timed out, none left open
    socks = [socket.create_connection(("127.0.0.1", fm.port), timeout=5) for _ in range(30)]
    for s in socks:
        s.sendall(client_hello())
    for s in socks:
        assert closed_within(s, 5)
        s.close()
    assert wait_for(lambda: lstats(fm)["downstream_cx_transport_socket_connect_timeout"] == 32)
    # and the listener still serves
    with connect(fm.port, pki) as s:
        assert get(s, "/")[0] == 200
    assert wait_for(lambda: lstats(fm)["downstream_cx_active"] == 0)
    assert lstats(fm)["ssl.handshake"] == 2
    assert wait_for(lambda: fds() <= baseline), (fds(), baseline)     # no descriptor leaked


# ------------------------------------------------------------------------ Bolt and TCP

class BoltEcho:
    """A threaded Bolt upstream answering each request with its content."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = bytearray()
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while (n := bolt.py_frame_peek(buf)) > 0:
                    f = bolt.parse_frame(bytes(buf[:n]))
                    del buf[:n]
                    if f["cmdcode"] == bolt.CMD_HEARTBEAT:
                        c.sendall(bolt.encode_heartbeat_ack(f["proto"], f["request_id"],
                                                            f["codec"]))
                        continue
                    c.sendall(bolt.encode_response(
                        f["proto"], f["request_id"], f["codec"], 0,
                        b"com.alipay.sofa.rpc.core.response.SofaResponse", b"", f["content"]))

    def close(self):
        self.lsock.close()


def bolt_request(rid, content):
    return bolt.encode_request(1, bolt.TYPE_REQUEST, rid, bolt.CODEC_HESSIAN2, 3000,
                               b"com.alipay.sofa.rpc.core.request.SofaRequest",
                               bolt.encode_header_block({"service": "com.example.Echo:1.0"}),
                               content)


def test_bolt_over_mtls(pki, start_fastmesh, loop_kind):
    up = BoltEcho()
    try:
        cfg = {
            "listeners": [{"name": "rpc", "protocol": "bolt", "route_table": "rpc",
                           "tls": mtls_block(pki)}],
            "route_tables": {"rpc": {"routes": [{"cluster": "rpc"}]}},
            "clusters": [{"name": "rpc", "endpoints": [f"127.0.0.1:{up.port}"]}],
        }
        fm = start_fastmesh(cfg, loop=loop_kind)
        with connect(fm.port, pki, cert="client") as s:
            frames = [bolt_request(i, b"call-%d" % i * 50) for i in range(1, 21)]
            s.sendall(b"".join(frames))
            buf, got = bytearray(), {}
            while len(got) < 20:
                chunk = s.recv(65536)
                assert chunk
                buf += chunk
                while (n := bolt.py_frame_peek(buf)) > 0:
                    f = bolt.parse_frame(bytes(buf[:n]))
                    del buf[:n]
                    got[f["request_id"]] = f["content"]
            assert sorted(got) == list(range(1, 21))
            assert got[7] == b"call-7" * 50
        with pytest.raises((ssl.SSLError, OSError)):
            with connect(fm.port, pki, cert="intruder", version="1.2") as s:
                s.sendall(bolt_request(1, b"x"))
                s.recv(100)
        st = fm.listener_stats("rpc")
        assert st["ssl.handshake"] == 1 and st["ssl.fail_verify_san"] == 1
    finally:
        up.close()


def test_tcp_over_tls(pki, start_fastmesh, loop_kind):
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            def echo(c=c):
                with c:
                    while (d := c.recv(65536)):
                        c.sendall(d)
            threading.Thread(target=echo, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    try:
        cfg = {"listeners": [{"name": "raw", "protocol": "tcp", "cluster": "echo",
                              "tls": tls_block(pki)}],
               "clusters": [{"name": "echo", "endpoints": [
                   f"127.0.0.1:{lsock.getsockname()[1]}"]}]}
        fm = start_fastmesh(cfg, loop=loop_kind)
        with connect(fm.port, pki) as s:
            # one thread: an SSLSocket must not be read and written from two threads at
            # once (one OpenSSL object); 64 KiB out, then its echo back, 32 times
            payload = os.urandom(2 << 20)
            got = bytearray()
            for off in range(0, len(payload), 65536):
                s.sendall(payload[off:off + 65536])
                while len(got) < off + 65536:
                    chunk = s.recv(1 << 20)
                    assert chunk
                    got += chunk
            assert bytes(got) == payload
        assert wait_for(lambda: fm.listener_stats("raw")["downstream_cx_active"] == 0)
        assert fm.listener_stats("raw")["ssl.handshake"] == 1
    finally:
        lsock.close()


# ------------------------------------------------------------------------ hot restart

def test_hot_restart_drains_tls_connections(pki, deployment, procs, loop_kind):
    """A TLS session lives in its process: a hot restart does not migrate TLS connections.
    HTTP: the next response on an old connection says `connection: close`; TCP: the old
    generation keeps serving the connection until it ends (or the drain timeout)."""
    from fmtest import Proc, START_TIMEOUT_S, _wait_line, pid_alive, supervisor_pid, \
        wait_gone, wait_new_generation
    up = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
               "--name", "up"], name="upstream")
    procs.append(up)
    up_addr = f"127.0.0.1:{int(_wait_line(up, b'READY', START_TIMEOUT_S).split()[1])}"
    echo = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                c, _ = echo.accept()
            except OSError:
                return

            def run(c=c):
                with c:
                    while (d := c.recv(65536)):
                        c.sendall(d)
            threading.Thread(target=run, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    http_port, tcp_port = free_port(), free_port()
    cfg = {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": 8000,
        "listeners": [
            {"name": "web", "address": f"127.0.0.1:{http_port}", "route_table": "rt",
             "tls": tls_block(pki)},
            {"name": "raw", "address": f"127.0.0.1:{tcp_port}", "protocol": "tcp",
             "cluster": "echo", "tls": tls_block(pki)}],
        "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}},
        "clusters": [{"name": "up", "endpoints": [up_addr]},
                     {"name": "echo", "endpoints": [f"127.0.0.1:{echo.getsockname()[1]}"]}],
    }
    try:
        d = deployment(cfg, loop=loop_kind)
        d.start()
        h = connect(http_port, pki)
        t = connect(tcp_port, pki)
        assert get(h, "/")[0] == 200
        t.sendall(b"before")
        assert t.recv(100) == b"before"
        time.sleep(0.7)                     # quiet: a plain TCP connection would migrate now
        old = supervisor_pid(d.admin_port)
        d.hup()
        wait_new_generation(d.admin_port, old)
        status, hdrs, _ = get(h, "/")       # served by the old generation, told to go
        assert status == 200 and hdrs.get("connection") == "close"
        h.close()
        t.sendall(b"after")                 # still the old generation's session
        assert t.recv(100) == b"after"
        assert pid_alive(old)
        t.close()
        assert wait_gone(old) < 8
        with connect(tcp_port, pki) as t2:   # the new generation serves new connections
            t2.sendall(b"new")
            assert t2.recv(100) == b"new"
        # TLS counters carry over from the old generation, as the others do
        from fmtest import get_json
        st = get_json(d.admin_port, "/stats")["listeners"]
        assert st["raw"]["ssl.handshake"] == 2 and st["web"]["ssl.handshake"] == 1, st
    finally:
        echo.close()


def test_peer_identity_in_access_log(pki, start_upstream, start_fastmesh, tmp_path, loop_kind):
    """The verified identity reaches the access log through the header the proxy set
    (%REQ(X-FORWARDED-CLIENT-CERT)%); a spoofed one sent by the client is gone from the
    request before anything reads it, the log included."""
    up = start_upstream()
    log = tmp_path / "access.log"
    cfg = http_cfg(up, mtls_block(pki, forward_client_cert="sanitize_set",
                                  forward_client_cert_details=["uri"]))
    cfg["listeners"][0]["access_log"] = {
        "path": str(log), "format": "%RESPONSE_CODE% %REQ(X-FORWARDED-CLIENT-CERT)%\n"}
    fm = start_fastmesh(cfg, loop=loop_kind)
    with connect(fm.port, pki, cert="client") as s:
        status, _, body = get(s, "/echo", extra="X-Forwarded-Client-Cert: URI=spiffe://evil\r\n"
                                                "x-keep: 1\r\n")
        assert status == 200
        seen = [(k.lower(), v) for k, v in json.loads(body)["headers"]]
        assert [v for k, v in seen if k == "x-forwarded-client-cert"] == [
            seen_xfcc := [v for k, v in seen if k == "x-forwarded-client-cert"][0]]
        assert "evil" not in seen_xfcc and seen_xfcc.endswith(f";URI={SPIFFE}client")
        assert ("x-keep", "1") in seen
    assert wait_for(lambda: log.exists() and log.read_text().strip() != "")
    line = log.read_text().strip()
    assert line.startswith("200 By=") and line.endswith(f";URI={SPIFFE}client"), line
    assert "evil" not in line
