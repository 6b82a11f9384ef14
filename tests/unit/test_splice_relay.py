"""The splice relay on its own, over real loopback TCP connections: bytes a transport read
before the relay took its sockets over (io_uring's stash, handed over by SpliceRelay.prefill)
go out first and in order, also when they are far more than the destination's socket
buffers hold and the destination reads slowly (partial sends, then the writer watch)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

import pytest

from fastmesh._core.splice import SpliceRelay
from fastmesh._core.stats import Counters

MB = 1 << 20


def _tcp_pair():
    """(proxy's end, peer's end) of one loopback TCP connection."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    peer = socket.create_connection(ls.getsockname())
    mine, _ = ls.accept()
    ls.close()
    mine.setblocking(False)
    return mine, peer


def _read_exactly(sock, n, pace_s=0.0):
    h, got = hashlib.sha256(), 0
    sock.settimeout(30)
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        assert chunk, f"closed after {got} of {n} bytes"
        h.update(chunk)
        got += len(chunk)
        if pace_s:
            threading.Event().wait(pace_s)
    return h.digest()


@pytest.mark.parametrize("slow", [False, True], ids=["fast-reader", "slow-reader"])
def test_prefilled_bytes_go_first_then_the_spliced_stream(slow):
    loop = asyncio.new_event_loop()
    client_mine, client = _tcp_pair()
    up_mine, upstream = _tcp_pair()
    first_up = os.urandom(6 * MB)           # more than both sockets' buffers hold
    first_down = os.urandom(3 * MB)
    later_up = os.urandom(2 * MB)           # what the client sends after the hand-over
    ended = []
    done = loop.create_future()

    def on_end(exc):
        ended.append(exc)
        done.set_result(None)

    counters = Counters("listener")
    relay = SpliceRelay(loop, os.dup(client_mine.fileno()), os.dup(up_mine.fileno()),
                        counters, on_end)
    client_mine.close()
    up_mine.close()
    relay.prefill(first_up, first_down)
    results = {}

    def upstream_side():
        results["up"] = _read_exactly(upstream, len(first_up) + len(later_up),
                                      0.002 if slow else 0.0)
        upstream.shutdown(socket.SHUT_WR)

    def client_side():
        client.sendall(later_up)
        client.shutdown(socket.SHUT_WR)
        results["down"] = _read_exactly(client, len(first_down))

    threads = [threading.Thread(target=f, daemon=True) for f in (upstream_side, client_side)]
    relay.start()
    for t in threads:
        t.start()
    try:
        loop.run_until_complete(asyncio.wait_for(done, 60))
    finally:
        for t in threads:
            t.join(10)
        client.close()
        upstream.close()
        loop.close()
    assert ended == [None]
    assert results["up"] == hashlib.sha256(first_up + later_up).digest()
    assert results["down"] == hashlib.sha256(first_down).digest()
    assert relay.moved() == (len(first_up) + len(later_up), len(first_down))
    assert counters.get("downstream_rx_bytes") == len(first_up) + len(later_up)
