"""One fastmesh server process: listeners, clusters, admin, timers, signals.

With ``workers: 1`` (the default) this process is both the control world and the only data
worker. The event loop is uvloop unless ``loop="asyncio"`` is asked for (tests run both).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from fastmesh import __version__, snapshot as snapshot_mod
from fastmesh._core import http_proxy
from fastmesh.admin import AdminServer
from fastmesh.cluster import ClusterResolver
from fastmesh.config import model
from fastmesh.config.load import to_dict
from fastmesh.listener import Listener, ListenerState

log = logging.getLogger("fastmesh.server")

SWEEP_INTERVAL_S = 0.1          # deadline granularity for timeouts
POOL_SWEEP_EVERY = 10           # idle upstream sweep every 10 sweeps (1 s)


class Server:
    def __init__(self, cfg: model.Config, loop):
        self.cfg = cfg
        self.loop = loop
        self.snapshot = None
        self.listeners: dict[str, Listener] = {}
        self.resolvers: dict[str, ClusterResolver] = {}
        self.admin: AdminServer | None = None
        self.started_at = time.time()
        self._sweeper: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    # -- start -----------------------------------------------------------------------

    async def start(self) -> None:
        self.snapshot = snapshot_mod.build(self.cfg)
        for name, c in self.cfg.clusters.items():
            r = ClusterResolver(self.loop, c, self.snapshot.clusters[name])
            r.start()
            self.resolvers[name] = r
        try:
            for lc in self.cfg.listeners:
                lst = Listener(lc, self.loop)
                lst.apply_snapshot(self.snapshot)
                lst.bind()
                self.listeners[lc.name] = lst
            for lst in self.listeners.values():
                await lst.start()
            if self.cfg.admin is not None:
                self.admin = AdminServer(self)
                await self.admin.start(self.cfg.admin.address.host, self.cfg.admin.address.port)
        except BaseException:
            self._close_all()
            raise
        self._sweeper = self.loop.create_task(self._sweep_forever())
        log.info("fastmesh %s: serving (%d listeners, %d clusters, pid %d)", __version__,
                 len(self.listeners), len(self.cfg.clusters), os.getpid())

    async def _sweep_forever(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = http_proxy.py_now_ms()
            for lst in self.listeners.values():
                try:
                    lst.sweep(now)
                except Exception:
                    log.exception("listener %s: sweep failed", lst.name)
            n += 1
            if n % POOL_SWEEP_EVERY == 0:
                for c in self.snapshot.clusters.values():
                    http_proxy.sweep_idle_upstreams(c, now)

    # -- stop ------------------------------------------------------------------------

    async def drain_and_stop(self, timeout_ms: int | None = None) -> None:
        """SIGTERM: stop accepting, let requests finish (up to the drain timeout), exit."""
        if self._stopping:
            return
        self._stopping = True
        timeout_ms = self.cfg.drain_timeout_ms if timeout_ms is None else timeout_ms
        log.info("draining (up to %d ms)", timeout_ms)
        for lst in self.listeners.values():
            lst.stop_accepting()
            lst.begin_drain()
        deadline = time.monotonic() + timeout_ms / 1000.0
        while time.monotonic() < deadline:
            if all(lst.active_connections == 0 for lst in self.listeners.values()):
                break
            await asyncio.sleep(0.05)
        left = sum(lst.active_connections for lst in self.listeners.values())
        if left:
            log.warning("drain timeout: closing %d connections", left)
        self.stop_now()

    def stop_now(self) -> None:
        self._stopping = True
        for lst in self.listeners.values():
            lst.abort_connections()
        self._close_all()
        self._stopped.set()

    def _close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for r in self.resolvers.values():
            r.stop()
        for lst in self.listeners.values():
            lst.close()
        if self.admin is not None:
            self.admin.close()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- answers for the admin API ---------------------------------------------------

    def is_ready(self) -> bool:
        return (not self._stopping and bool(self.listeners)
                and all(lst.state is ListenerState.RUNNING for lst in self.listeners.values()))

    def stats(self) -> dict:
        listeners = {n: lst.ctx.counters.to_dict() for n, lst in self.listeners.items()}
        clusters = {n: c.counters.to_dict() for n, c in self.snapshot.clusters.items()}
        return {
            "server": {"version": __version__, "pid": os.getpid(),
                       "uptime_s": round(time.time() - self.started_at, 3),
                       "config_version": self.snapshot.version, "workers": 1},
            "listeners": listeners,
            "clusters": clusters,
        }

    def listeners_info(self) -> dict:
        out = {}
        for n, lst in self.listeners.items():
            addr = lst.bound_address
            out[n] = {"state": lst.state.value, "protocol": lst.cfg.protocol,
                      "address": f"{addr[0]}:{addr[1]}" if addr else None,
                      "connections": lst.active_connections}
        return out

    def clusters_info(self) -> dict:
        out = {}
        for n, c in self.snapshot.clusters.items():
            out[n] = [{"address": f"{e.host}:{e.port}", "origin": e.origin,
                       "active_requests": e.active_requests, "idle_connections": len(e.http_idle)}
                      for e in c.get_endpoints()]
        return out

    def config_dump(self) -> dict:
        return {"version": self.snapshot.version, "source": self.cfg.source,
                "config": to_dict(self.cfg)}


def install_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif kind != "asyncio":
        raise ValueError(f"unknown loop {kind!r}")


def serve(cfg: model.Config, loop_kind: str = "uvloop", on_started=None) -> int:
    """Run until SIGTERM (graceful drain) or SIGINT (immediate stop). Returns an exit code."""
    install_loop(loop_kind)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        server = Server(cfg, loop)
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
        loop.add_signal_handler(signal.SIGTERM,
                                lambda: loop.create_task(server.drain_and_stop()))
        loop.add_signal_handler(signal.SIGINT, server.stop_now)
        if on_started is not None:
            on_started(server)
        await server.wait_stopped()
        log.info("stopped")
        return 0

    return asyncio.run(main())
