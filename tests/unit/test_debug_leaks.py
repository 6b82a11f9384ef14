"""Debug-build leak check: run real HTTP and TCP traffic through an in-process data plane on
real loopback sockets, tear everything down, and assert that every receive block, session
and upstream connection the Cython core allocated was freed.

The counters exist only in a debug build (`FASTMESH_DEBUG=1 pip install .`, which .ci/run
builds and tests separately); in a release build this test is skipped.
"""
from __future__ import annotations

import asyncio
import gc
import socket

import pytest

from fastmesh._core import buffer, http_proxy, tcp_proxy
from fastmesh.config.load import load_dict
from fastmesh.demo.upstream import start_upstream
from fastmesh.listener import open_listening_socket
from fastmesh.server.dataplane import DataPlane

pytestmark = pytest.mark.skipif(not buffer.debug_leak_counts()["debug_build"],
                                reason="release build: leak counters are compiled out")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _traffic(loop_kind):
    loop = asyncio.get_running_loop()
    up = await start_upstream("127.0.0.1", 0, "leak")
    up_port = up.sockets[0].getsockname()[1]
    cfg = load_dict({
        "admin": None,
        "listeners": [
            {"name": "web", "address": f"127.0.0.1:{_free_port()}", "protocol": "http1",
             "route_table": "rt"},
            {"name": "raw", "address": f"127.0.0.1:{_free_port()}", "protocol": "tcp",
             "cluster": "up"}],
        "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}},
        "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{up_port}"]}],
    })
    sockets = {l.name: [open_listening_socket(l.address)] for l in cfg.listeners}
    plane = DataPlane(loop)
    await plane.apply(cfg, sockets)
    for name in ("web", "raw"):
        port = sockets[name][0].getsockname()[1]
        for i in range(20):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            path = ["/", "/chunked/20000", "/close/3000", "/bytes/70000"][i % 4]
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(r.read(), 10)
            assert data.startswith(b"HTTP/1.1 200")
            w.close()
    plane.close()
    up.close()
    await up.wait_closed()
    for _ in range(10):
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_no_leaks_after_traffic(loop_kind):
    if loop_kind == "uvloop":
        import uvloop
        runner = uvloop.run
    else:
        runner = asyncio.run
    runner(_traffic(loop_kind))
    gc.collect()
    assert http_proxy.debug_leak_counts()["downstream"] == 0
    assert http_proxy.debug_leak_counts()["upstream"] == 0
    assert tcp_proxy.debug_leak_counts()["downstream"] == 0
    assert tcp_proxy.debug_leak_counts()["upstream"] == 0
    assert buffer.debug_leak_counts()["blocks"] == 0
