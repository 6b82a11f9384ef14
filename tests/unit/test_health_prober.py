"""fastmesh.health.HealthChecker on a real loop against loopback servers (no proxy): the
first round, config changes (endpoints, settings, removal), the verdicts a new config starts
with, and a worker's DataPlane applying verdicts to its Cython clusters."""
from __future__ import annotations

import asyncio
import dataclasses
import socket

from fastmesh.config.model import Address, Cluster, Config, HealthCheck
from fastmesh.health import HealthChecker
from fastmesh.server.dataplane import DataPlane


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TCP = HealthCheck(type="tcp", timeout_ms=300, interval_ms=50, no_traffic_interval_ms=50,
                  unhealthy_threshold=2, healthy_threshold=2)


def _config(*clusters) -> Config:
    return Config(admin=None, listeners=(), clusters={c.name: c for c in clusters})


async def _until(cond, timeout_s=3.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_prober_follows_config():
    async def main():
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        live = server.sockets[0].getsockname()[1]
        dead = _dead_port()
        changes = []
        hc = HealthChecker(loop, changes.append, lambda name: False)
        c = Cluster(name="c", endpoints=(Address("127.0.0.1", live), Address("127.0.0.1", dead)),
                    health_check=TCP)
        try:
            hc.sync(_config(c))
            # pending until the first result: failed
            assert set(hc.preview(_config(c))["c"].values()) == {True}
            await hc.first_round()
            assert hc.verdicts() == {"c": {f"127.0.0.1:{live}": False,
                                           f"127.0.0.1:{dead}": True}}
            await _until(lambda: changes)
            st = hc.stats()["c"]
            assert st["health_check_healthy"] == 1 and st["health_check_network_failure"] >= 1

            # an endpoint added: pending (failed) in the preview, then decided
            other = _dead_port()
            c2 = dataclasses.replace(c, endpoints=c.endpoints + (Address("127.0.0.1", other),))
            assert hc.preview(_config(c2))["c"] == {f"127.0.0.1:{live}": False,
                                                    f"127.0.0.1:{dead}": True,
                                                    f"127.0.0.1:{other}": True}
            hc.sync(_config(c2))
            assert hc.verdicts()["c"][f"127.0.0.1:{live}"] is False     # kept its state
            # settings changed: a new prober, starting from the verdicts it had
            c3 = dataclasses.replace(c2, health_check=dataclasses.replace(TCP, interval_ms=60))
            hc.sync(_config(c3))
            assert hc.verdicts()["c"][f"127.0.0.1:{live}"] is False
            # the health check removed: no verdicts, no counters
            hc.sync(_config(dataclasses.replace(c3, health_check=None)))
            assert hc.verdicts() == {} and hc.stats() == {}
        finally:
            hc.stop()
            server.close()
            await server.wait_closed()
    asyncio.run(main())


def test_dataplane_applies_verdicts_to_new_and_kept_clusters():
    async def main():
        plane = DataPlane(asyncio.get_running_loop())
        c = Cluster(name="c", endpoints=(Address("127.0.0.1", 1), Address("127.0.0.1", 2)))
        cfg = _config(c)
        await plane.apply(cfg, {}, {"c": {"127.0.0.1:2": True}})
        cl = plane.snapshot.clusters["c"]
        assert cl.hc_failed == {("127.0.0.1", 2)}
        assert [e.port for e in cl.get_endpoints() if e.unhealthy & 1] == [2]
        # a change of verdicts for one cluster
        plane.set_health({"c": {"127.0.0.1:2": False, "127.0.0.1:1": True}})
        assert cl.hc_failed == {("127.0.0.1", 1)}
        # a new config whose cluster is rebuilt (new settings): the verdicts follow
        cfg2 = _config(dataclasses.replace(c, connect_timeout_ms=1234))
        await plane.apply(cfg2, {})
        cl2 = plane.snapshot.clusters["c"]
        assert cl2 is not cl and cl2.hc_failed == {("127.0.0.1", 1)}
        # every verdict replaced: a cluster not named has none failed
        plane.set_health({}, replace_all=True)
        assert cl2.hc_failed == set()
        plane.close()
    asyncio.run(main())


def test_hostname_endpoints_are_probed_at_their_addresses():
    async def main():
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        live = server.sockets[0].getsockname()[1]
        hc = HealthChecker(loop, lambda names: None, lambda name: False)
        c = Cluster(name="n", endpoints=(Address("localhost", live),), health_check=TCP)
        try:
            hc.sync(_config(c))
            await hc.first_round()          # the lookup is part of the first round
            # as the workers resolve it (fastmesh.cluster): IPv4 when the name has any
            assert hc.verdicts() == {"n": {f"127.0.0.1:{live}": False}}
            assert hc.preview(_config(c)) == {"n": {f"127.0.0.1:{live}": False}}
        finally:
            hc.stop()
            server.close()
            await server.wait_closed()
    asyncio.run(main())
