"""benchmarks/floor/relay.c, the floor peer of the benchmark tables: built by the harness's
own code with the system compiler, then run as a real process between a real client and a
real echo server. Checks it relays bytes intact both ways, many connections at once, and
closes the client when the upstream goes away."""
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.peers import RelayFloor  # noqa: E402
from benchmarks.procs import Proc, free_port, wait_port  # noqa: E402

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                                 reason="no C compiler")]


class EchoServer:
    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c):
        try:
            while data := c.recv(65536):
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def relay(tmp_path):
    peer = RelayFloor()
    assert peer.find(), peer.missing_reason
    echo = EchoServer()
    port = free_port()
    cfg = peer.write_config("tcp", port, echo.port, tmp_path)
    proc = Proc("relay-floor", peer.argv(cfg, tmp_path), None, tmp_path / "relay.log")
    try:
        wait_port(port, 10, proc)
        yield port, echo
    finally:
        proc.stop()
        echo.close()


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def test_relays_bytes_intact_on_many_connections(relay):
    port, _ = relay
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        for i, c in enumerate(clients):
            payload = bytes((i + j) % 251 for j in range(300_000))   # over any socket buffer
            threading.Thread(target=c.sendall, args=(payload,), daemon=True).start()
            assert recv_exact(c, len(payload)) == payload
    finally:
        for c in clients:
            c.close()


def test_upstream_close_closes_the_client(relay):
    port, echo = relay
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"ping")
    assert recv_exact(c, 4) == b"ping"
    echo.close()
    assert c.recv(10) == b""
    c.close()
