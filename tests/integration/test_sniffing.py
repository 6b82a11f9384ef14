"""One port, every protocol: a listener with `protocol: auto` tells HTTP/1, Bolt, TLS and
anything else apart by the first bytes and serves each by its own chain, with data arriving
whole or one byte at a time; filter chains chosen by TLS SNI; the sniffing timeout; an
ORIGINAL_DST cluster chosen by header. Real peers: curl, sofa-rpc-node, an OpenSSL TLS server
(Python's ssl), raw sockets. On uvloop and plain asyncio.

Interception with iptables in network namespaces is in test_sidecar_netns.py."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fmtest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
from bolt_peers import NodeServer, node_skip_reason, run_client  # noqa: E402

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------ real peers

class ThreadedServer:
    """A listening socket on 127.0.0.1 served by threads, a thread per connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stop_ev = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop_ev.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        raise NotImplementedError

    def close(self):
        self.stop_ev.set()
        self.sock.close()


class EchoServer(ThreadedServer):
    """TCP: echoes what it gets, the first bytes prefixed by its name (to tell backends
    apart); greets first when given a greeting (a server-first protocol)."""

    def __init__(self, name: str, greeting: bytes = b""):
        self.name = name.encode()
        self.greeting = greeting
        super().__init__()

    def _handle(self, conn):
        with conn:
            if self.greeting:
                conn.sendall(self.greeting)
            prefix = self.name + b":"
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(prefix + data)
                prefix = b""


class TlsServer(ThreadedServer):
    """A TLS server (OpenSSL, through Python's ssl) with its own self-signed certificate for
    `name`; answers each line with "<name>:<line>"."""

    def __init__(self, tmp: Path, name: str):
        self.name = name
        cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                        f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
        self.cert = str(cert)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols(["h2", "http/1.1"])
        super().__init__()

    def _handle(self, conn):
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                f = tls.makefile("rb")
                for line in f:
                    tls.sendall(f"{self.name}:".encode() + line)
        except (OSError, ssl.SSLError):
            pass


def tls_call(port: int, server_name: str, cafile: str, alpn=("http/1.1",),
             one_byte_at_a_time=False) -> tuple[str, str]:
    """A TLS client: handshake (SNI, ALPN, the server's certificate verified), one line;
    -> (reply, negotiated ALPN)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(list(alpn))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if one_byte_at_a_time:
        # the ClientHello reaches the proxy a byte per segment
        inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inb, outb, server_hostname=server_name)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outb.read()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in hello:
            raw.sendall(bytes([b]))
            time.sleep(0.001)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = outb.read()
                if data:
                    raw.sendall(data)
                chunk = raw.recv(65536)
                assert chunk, "connection closed during the handshake"
                inb.write(chunk)
        raw.sendall(outb.read())
        obj.write(b"hello\n")
        raw.sendall(outb.read())
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                reply += obj.read(4096)
            except ssl.SSLWantReadError:
                chunk = raw.recv(65536)
                assert chunk
                inb.write(chunk)
        raw.close()
        return reply.decode().strip(), obj.selected_alpn_protocol()
    with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        tls.sendall(b"hello\n")
        reply = tls.makefile("rb").readline()
        return reply.decode().strip(), tls.selected_alpn_protocol()


def tcp_call(port: int, data: bytes, one_byte_at_a_time=False, expect=None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if one_byte_at_a_time:
            for b in data:
                s.sendall(bytes([b]))
                time.sleep(0.002)
        else:
            s.sendall(data)
        want = expect if expect is not None else len(data)
        out = b""
        while len(out) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def http_call(port: int, path="/", one_byte_at_a_time=False) -> bytes:
    req = f"GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if one_byte_at_a_time:
            for b in req:
                s.sendall(bytes([b]))
                time.sleep(0.002)
        else:
            s.sendall(req)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


# ------------------------------------------------------------------------ the proxy

@pytest.fixture
def peers(tmp_path, start_upstream):
    made = {"web": start_upstream("web"), "echo": EchoServer("echo"),
            "tls-a": TlsServer(tmp_path, "a.example.com"),
            "tls-b": TlsServer(tmp_path, "b.example.com")}
    yield made
    for k in ("echo", "tls-a", "tls-b"):
        made[k].close()


def auto_config(peers, bolt_port=None, sniff_timeout_ms=None) -> dict:
    lst = {"name": "auto", "protocol": "auto", "route_table": "web", "cluster": "raw"}
    if bolt_port:
        lst["bolt_route_table"] = "rpc"
    if sniff_timeout_ms is not None:
        lst["sniff_timeout_ms"] = sniff_timeout_ms
    cfg = {
        "listeners": [lst],
        "route_tables": {"web": {"routes": [{"match": {"prefix": "/"}, "cluster": "web"}]}},
        "clusters": [{"name": "web", "endpoints": [peers["web"].address]},
                     {"name": "raw", "endpoints": [f"127.0.0.1:{peers['echo'].port}"]}],
    }
    if bolt_port:
        cfg["route_tables"]["rpc"] = {"routes": [{"cluster": "rpc"}]}
        cfg["clusters"].append({"name": "rpc", "endpoints": [f"127.0.0.1:{bolt_port}"]})
    return cfg


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "byte-at-a-time"])
def test_http_and_tcp_on_one_port(peers, start_fastmesh, loop_kind, one_byte):
    fm = start_fastmesh(auto_config(peers), loop=loop_kind)
    rsp = http_call(fm.port, "/hello/echo", one_byte)
    assert rsp.startswith(b"HTTP/1.1 200"), rsp[:200]
    assert b'"web"' in rsp                     # the demo upstream names itself
    # bytes that are not HTTP: the TCP chain, echoed by the raw backend
    for data in (b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x01binary\xff", b"hello\n",
                 b"get lowercase is not a method\r\n"):
        assert tcp_call(fm.port, data, one_byte, expect=len(data) + 5) == b"echo:" + data
    # curl, a real HTTP client
    out = subprocess.run(["curl", "-sS", "--max-time", "10", fm.url("/via-curl")],
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    st = fm.listener_stats("auto")
    assert st["sniffed_http1"] == 2
    assert st["sniffed_tcp"] == 4
    assert st["sniff_timeout"] == 0
    assert st["downstream_rq_total"] == 2


def test_http_then_keepalive_and_pipelined(peers, start_fastmesh):
    """The sniffed bytes are handed to the HTTP chain whole: two pipelined requests in the
    first segment both get answers, in order."""
    fm = start_fastmesh(auto_config(peers))
    req = b"GET /one/echo HTTP/1.1\r\nHost: a\r\n\r\nGET /two/echo HTTP/1.1\r\nHost: a\r\n" \
          b"Connection: close\r\n\r\n"
    out = tcp_call(fm.port, req, expect=1 << 30)
    assert out.count(b"HTTP/1.1 200") == 2
    assert 0 < out.index(b"/one/echo") < out.index(b"/two/echo")


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "byte-at-a-time"])
def test_tls_passthrough_by_sni(peers, start_fastmesh, loop_kind, one_byte):
    """TLS is not terminated: the ClientHello's SNI chooses the chain, the bytes go through
    to the backend, which completes the handshake with the client itself."""
    a, b = peers["tls-a"], peers["tls-b"]
    cfg = {
        "listeners": [{"name": "edge", "filter_chains": [
            {"name": "a", "match": {"server_names": ["a.example.com"]}, "cluster": "a"},
            {"name": "b", "match": {"server_names": ["*.example.com"]}, "cluster": "b"},
            {"name": "http", "match": {"application_protocols": ["http/1.1"],
                                       "transport_protocol": "raw_buffer"},
             "protocol": "http1", "route_table": "web"},
            {"name": "other", "default": True, "cluster": "raw"}]}],
        "route_tables": {"web": {"routes": [{"match": {"prefix": "/"}, "cluster": "web"}]}},
        "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{a.port}"]},
                     {"name": "b", "endpoints": [f"127.0.0.1:{b.port}"]},
                     {"name": "web", "endpoints": [peers["web"].address]},
                     {"name": "raw", "endpoints": [f"127.0.0.1:{peers['echo'].port}"]}],
    }
    fm = start_fastmesh(cfg, loop=loop_kind)
    # exact name beats the wildcard; the wildcard takes the rest of the domain
    assert tls_call(fm.port, "a.example.com", a.cert, one_byte_at_a_time=one_byte) == \
        ("a.example.com:hello", "http/1.1")
    ctx_b = b.cert
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_call(fm.port, "c.example.com", ctx_b)     # went to b, whose name is b.example.com
    assert tls_call(fm.port, "b.example.com", ctx_b, alpn=("h2",)) == \
        ("b.example.com:hello", "h2")
    assert http_call(fm.port, "/", one_byte).startswith(b"HTTP/1.1 200")
    assert tcp_call(fm.port, b"plain\n", one_byte, expect=11) == b"echo:plain\n"
    st = fm.listener_stats("edge")
    assert st["sniffed_tls"] == 3 and st["sniffed_http1"] == 1 and st["sniffed_tcp"] == 1
    assert st["no_filter_chain_match"] == 0


def test_no_matching_chain_closes_and_counts(peers, start_fastmesh):
    cfg = {
        "listeners": [{"name": "strict", "filter_chains": [
            {"match": {"application_protocols": ["http/1.1"]}, "protocol": "http1",
             "route_table": "web"}]}],
        "route_tables": {"web": {"routes": [{"match": {"prefix": "/"}, "cluster": "web"}]}},
        "clusters": [{"name": "web", "endpoints": [peers["web"].address]}],
    }
    fm = start_fastmesh(cfg)
    assert tcp_call(fm.port, b"\x00nothing anyone speaks\n", expect=1) == b""
    assert http_call(fm.port, "/").startswith(b"HTTP/1.1 200")
    st = fm.listener_stats("strict")
    assert st["no_filter_chain_match"] == 1 and st["sniffed_tcp"] == 1


def test_sniff_timeout_then_tcp(peers, start_fastmesh, loop_kind):
    """A server-first protocol: the client says nothing until greeted. After the sniffing
    timeout the connection goes on as TCP (counted), and the greeting arrives."""
    greeter = EchoServer("db", greeting=b"220 ready\r\n")
    try:
        cfg = auto_config(peers, sniff_timeout_ms=300)
        cfg["clusters"][1]["endpoints"] = [f"127.0.0.1:{greeter.port}"]
        fm = start_fastmesh(cfg, loop=loop_kind)
        with socket.create_connection(("127.0.0.1", fm.port), timeout=10) as s:
            t0 = time.monotonic()
            assert s.recv(100) == b"220 ready\r\n"
            waited = time.monotonic() - t0
            s.sendall(b"QUIT\r\n")
            assert s.recv(100) == b"db:QUIT\r\n"
        assert 0.25 <= waited < 3, waited
        st = fm.listener_stats("auto")
        assert st["sniff_timeout"] == 1
    finally:
        greeter.close()


def test_sniff_timeout_close_when_told(peers, start_fastmesh):
    cfg = auto_config(peers, sniff_timeout_ms=200)
    cfg["listeners"][0]["sniff_timeout_continue"] = False
    fm = start_fastmesh(cfg)
    with socket.create_connection(("127.0.0.1", fm.port), timeout=10) as s:
        s.sendall(b"GE")                      # a request line that never completes
        assert s.recv(100) == b""             # closed at the timeout
    assert fm.listener_stats("auto")["sniff_timeout"] == 1


def test_h2c_preface_goes_to_http2(peers, start_fastmesh):
    """The HTTP/2 preface is neither HTTP/1 nor TCP: the listener's HTTP/2 chain answers it
    with its SETTINGS (Envoy's codec_type AUTO)."""
    fm = start_fastmesh(auto_config(peers))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    out = tcp_call(fm.port, preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", expect=9)
    assert out[3] == 4 and out[4] == 0, out          # a SETTINGS frame (not an ack)
    st = fm.listener_stats("auto")
    assert st["sniffed_h2c"] == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl missing")
def test_http1_and_h2c_on_one_port(peers, start_fastmesh, loop_kind):
    fm = start_fastmesh(auto_config(peers), loop=loop_kind)
    for flag, version in (("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")):
        out = subprocess.run(["curl", "-s", flag, "-o", "/dev/null", "-w",
                              "%{http_code} %{http_version}",
                              f"http://127.0.0.1:{fm.port}/hello/echo"],
                             capture_output=True, text=True, timeout=30).stdout
        assert out == f"200 {version}", (flag, out)
    st = fm.listener_stats("auto")
    assert st["sniffed_h2c"] == 1 and st["sniffed_http1"] == 1


def test_client_half_close_while_sniffing(peers, start_fastmesh):
    """All the client sends, then EOF, before the sniffer could decide: the chain gets the
    bytes and the EOF, and the answer still comes back."""
    fm = start_fastmesh(auto_config(peers))
    with socket.create_connection(("127.0.0.1", fm.port), timeout=10) as s:
        s.sendall(b"GET")
        s.shutdown(socket.SHUT_WR)
        out = s.recv(100)
    assert out == b"echo:GET"


@pytest.mark.skipif(node_skip_reason() is not None, reason=str(node_skip_reason()))
def test_bolt_on_the_same_port(peers, start_fastmesh, loop_kind):
    """sofa-rpc-node's client, with HTTP and TCP on the same port."""
    with NodeServer("s1") as srv:
        fm = start_fastmesh(auto_config(peers, bolt_port=srv.port), loop=loop_kind)
        out = run_client(f"127.0.0.1:{fm.port}", [{"method": "echo", "args": ["hi"]},
                                                  {"method": "whoami"}])
        assert out[0]["ok"] and out[0]["result"] == "hi"
        assert out[1]["ok"] and out[1]["result"] == "s1"
        assert http_call(fm.port).startswith(b"HTTP/1.1 200")
        st = fm.listener_stats("auto")
        assert st["sniffed_bolt"] >= 1 and st["sniffed_http1"] == 1


def test_original_dst_cluster_by_header(peers, start_fastmesh, loop_kind):
    """use_http_header: the x-envoy-original-dst-host header names the destination; the
    per-destination endpoints show in /clusters and are dropped after cleanup."""
    web2 = peers["web"]
    cfg = {
        "listeners": [{"name": "out", "protocol": "http1", "route_table": "r"}],
        "route_tables": {"r": {"routes": [{"match": {"prefix": "/"}, "cluster": "pass"}]}},
        "clusters": [{"name": "pass", "type": "original_dst",
                      "original_dst": {"use_http_header": True, "cleanup_interval_ms": 500}}],
    }
    fm = start_fastmesh(cfg, loop=loop_kind)
    import requests
    r = requests.get(fm.url("/x/echo"), headers={"x-envoy-original-dst-host": web2.address},
                     timeout=10)
    assert r.status_code == 200 and r.json()["server"] == "web"
    import json
    clusters = json.loads(fm.admin("/clusters")[1])
    assert [e["address"] for e in clusters["pass"]] == [web2.address]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not json.loads(fm.admin("/clusters")[1])["pass"]:
            break
        time.sleep(0.2)
    assert json.loads(fm.admin("/clusters")[1])["pass"] == []


def test_original_dst_without_redirect_refuses_not_loops(peers, start_fastmesh):
    """A connection that reached the listener directly (not through an iptables REDIRECT)
    has this proxy as its destination: an ORIGINAL_DST cluster would connect back into the
    proxy, again and again. It is refused at once and counted instead (Envoy would loop)."""
    cfg = {
        "listeners": [{"name": "out", "original_dst": True, "protocol": "auto",
                       "route_table": "r", "cluster": "pass", "sniff_timeout_ms": 200}],
        "route_tables": {"r": {"routes": [{"match": {"prefix": "/"}, "cluster": "pass"}]}},
        "clusters": [{"name": "pass", "type": "original_dst"}],
    }
    fm = start_fastmesh(cfg)
    t0 = time.monotonic()
    assert tcp_call(fm.port, b"\x00raw\n", expect=1) == b""
    rsp = http_call(fm.port, "/")
    assert rsp.startswith(b"HTTP/1.1 503"), rsp[:100]
    assert time.monotonic() - t0 < 5
    st = fm.stats()
    assert st["listeners"]["out"]["downstream_cx_total"] == 2         # no loop
    assert st["clusters"]["pass"]["no_healthy_endpoint"] == 2
    assert st["clusters"]["pass"]["upstream_cx_total"] == 0


@pytest.mark.skipif(node_skip_reason() is not None, reason=str(node_skip_reason()))
def test_bolt_frame_one_byte_at_a_time(peers, start_fastmesh):
    """The captured SOFARPC request (sofa-rpc-node's echo("hello")) reaches the sniffing
    listener a byte per segment; the real server's answer comes back whole."""
    from fastmesh._core import bolt
    from fmtest import BoltClient
    frames = Path(__file__).resolve().parents[1] / "data" / "bolt-frames"
    req = bytes.fromhex((frames / "bolt_request.hex").read_text().strip())
    with NodeServer("s1") as srv:
        fm = start_fastmesh(auto_config(peers, bolt_port=srv.port))
        c = BoltClient(fm.port)
        try:
            for b in req:
                c.send(bytes([b]))
                time.sleep(0.001)
            rsp = c.read_frame()
        finally:
            c.sock.close()
        sent = bolt.parse_frame(req)
        assert rsp["request_id"] == sent["request_id"] and rsp["status"] == 0
        assert b"hello" in rsp["content"]
        assert fm.listener_stats("auto")["sniffed_bolt"] == 1
