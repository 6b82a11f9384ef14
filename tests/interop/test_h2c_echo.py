"""fastmesh's HTTP/2 codec against independent implementations over real sockets: the h2c
echo server (h2c_echo.py, built on the codec) answers curl (libcurl + nghttp2), h2load
(nghttp2) and the `h2` package, with many concurrent streams and flow-controlled bodies.
Runs on uvloop and on plain asyncio."""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fmtest import Proc, _wait_line

h2 = pytest.importorskip("h2")
import h2.config
import h2.connection
import h2.events

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["uvloop", "asyncio"])
def echo(request):
    # fastmesh as the tests import it (CI: the installed wheel; never the source tree's
    # uncompiled modules)
    proc = Proc([sys.executable, str(HERE / "h2c_echo.py"), "--loop", request.param],
                name="h2c echo")
    try:
        port = int(_wait_line(proc, b"READY", 20).split()[1])
        yield port
    finally:
        assert proc.popen.poll() is None, proc.output()     # never crashed
        proc.stop()


def curl_h2():
    curl = shutil.which("curl")
    if not curl or "HTTP2" not in subprocess.run([curl, "-V"], capture_output=True, text=True).stdout:
        pytest.skip("curl without HTTP/2")
    return curl


def test_curl_prior_knowledge(echo, tmp_path):
    curl = curl_h2()
    out = subprocess.run([curl, "-sS", "--http2-prior-knowledge", "-D", "-",
                          f"http://127.0.0.1:{echo}/hello?x=1"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"HTTP/2 200") and out.stdout.endswith(b"GET /hello?x=1\n")
    body = os.urandom(3_000_000)
    (tmp_path / "in").write_bytes(body)
    out = subprocess.run([curl, "-sS", "--http2-prior-knowledge", "--data-binary",
                          f"@{tmp_path / 'in'}", f"http://127.0.0.1:{echo}/up"],
                         capture_output=True, timeout=30)
    assert out.returncode == 0 and hashlib.sha256(out.stdout).digest() == hashlib.sha256(body).digest()


@pytest.mark.skipif(not shutil.which("h2load"), reason="h2load (nghttp2-client) not installed")
def test_h2load_many_concurrent_streams(echo, tmp_path):
    out = subprocess.run(["h2load", "-n", "20000", "-c", "4", "-m", "100",
                          f"http://127.0.0.1:{echo}/"], capture_output=True, text=True, timeout=60)
    assert "20000 succeeded, 0 failed, 0 errored" in out.stdout, out.stdout
    (tmp_path / "body").write_bytes(os.urandom(1_000_000))
    out = subprocess.run(["h2load", "-n", "100", "-c", "2", "-m", "20", "-d", str(tmp_path / "body"),
                          f"http://127.0.0.1:{echo}/up"], capture_output=True, text=True, timeout=60)
    assert "100 succeeded, 0 failed, 0 errored" in out.stdout, out.stdout
    assert "100 2xx" in out.stdout


def test_h2_package_client_grpc_like(echo):
    cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
    cli = h2.connection.H2Connection(cfg)
    cli.local_settings.initial_window_size = 1 << 20
    cli.initiate_connection()
    n = 200
    bodies = {}
    with socket.create_connection(("127.0.0.1", echo)) as s:
        s.sendall(cli.data_to_send())
        opened = False                    # the server's SETTINGS + 1 MiB connection window
        while not opened:
            for ev in cli.receive_data(s.recv(65536)):
                opened |= isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0
        for i in range(n):
            sid = cli.get_next_available_stream_id()
            body = os.urandom(100 + i * 37)
            bodies[sid] = body
            cli.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                   (b":path", b"/helloworld.Greeter/SayHello"),
                                   (b":authority", b"localhost"), (b"te", b"trailers"),
                                   (b"content-type", b"application/grpc")])
            cli.send_data(sid, body, end_stream=True)
        s.sendall(cli.data_to_send())
        got, trailers = {}, {}
        while len(trailers) < n:
            data = s.recv(65536)
            assert data, "server closed"
            for ev in cli.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    got[ev.stream_id] = got.get(ev.stream_id, b"") + ev.data
                    cli.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers[ev.stream_id] = dict(ev.headers)
                elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    pytest.fail(repr(ev))
            out = cli.data_to_send()
            if out:
                s.sendall(out)
    assert got == bodies
    assert all(t == {b"grpc-status": b"0"} for t in trailers.values())


def test_hostile_peer_gets_goaway_and_server_survives(echo):
    with socket.create_connection(("127.0.0.1", echo)) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\4\0\0\0\0\0"
                  + b"\0\0\0\x09\x04\0\0\0\0")                 # CONTINUATION without HEADERS
        data = b""
        s.settimeout(5)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert b"\x07\x00\x00\x00\x00\x00" in data                  # a GOAWAY frame came back
    curl = curl_h2()
    out = subprocess.run([curl, "-sS", "--http2-prior-knowledge", f"http://127.0.0.1:{echo}/again"],
                         capture_output=True, timeout=30)
    assert out.stdout == b"GET /again\n"


def test_grpcio_client(echo):
    """gRPC C core (chttp2, via grpcio: already a fastmesh dependency) as the client: unary
    calls, 300 concurrent, a 3 MB message through flow control, and a bidi stream. The echo
    server answers the framed gRPC messages back with grpc-status 0 trailers."""
    grpc = pytest.importorskip("grpc")
    with grpc.insecure_channel(f"127.0.0.1:{echo}") as ch:
        say = ch.unary_unary("/echo.Echo/Say")
        assert say(b"hello grpc", timeout=10) == b"hello grpc"
        futs = [say.future(os.urandom(i * 100)) for i in range(300)]
        assert [len(f.result(timeout=30)) for f in futs] == [i * 100 for i in range(300)]
        big = os.urandom(3_000_000)
        assert say(big, timeout=30) == big
        chat = ch.stream_stream("/echo.Echo/Chat")
        assert list(chat(iter([b"a", b"bb", b"ccc"]), timeout=10)) == [b"a", b"bb", b"ccc"]
