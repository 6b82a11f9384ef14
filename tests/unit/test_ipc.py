"""The supervisor/worker/generation links: msgpack messages over SEQPACKET, with descriptors.
A message larger than one datagram can carry (a config with thousands of xDS clusters) goes
as fragments and arrives whole, with its descriptors; sending never blocks, so two ends sending each other
large messages at once cannot wait on each other."""
from __future__ import annotations

import asyncio
import os

from fastmesh.server import ipc


def test_large_message_arrives_whole_with_its_descriptors():
    async def main():
        a, b = ipc.socketpair()
        loop = asyncio.get_running_loop()
        ca, cb = ipc.Channel(a, loop), ipc.Channel(b, loop)
        big = {"t": "config", "blob": os.urandom(3_000_000),
               "clusters": [{"name": f"c{i}", "endpoints": [f"10.0.{i % 250}.{j}:80"
                                                            for j in range(10)]}
                            for i in range(1000)]}
        r, w = os.pipe()
        try:
            ca.send(big, [r])                   # never blocks: written as the peer reads
            msg, fds = await cb.recv(10)
            assert msg == big and len(fds) == 1
            os.write(w, b"x")
            assert os.read(fds[0], 1) == b"x"          # the very pipe, passed along
            os.close(fds[0])
            for n in (1, ipc.FRAGMENT_BYTES - 40, ipc.FRAGMENT_BYTES + 7):
                small = {"t": "s", "b": b"y" * n}
                ca.send(small)
                assert (await cb.recv(5))[0] == small
            both = [{"t": "a", "b": b"1" * 2_000_000}, {"t": "b", "b": b"2" * 2_000_000}]
            ca.send(both[0])                    # each end sends before either reads
            cb.send(both[1])
            assert (await cb.recv(10))[0] == both[0] and (await ca.recv(10))[0] == both[1]
        finally:
            os.close(r)
            os.close(w)
            ca.close()
            cb.close()
    asyncio.run(main())
