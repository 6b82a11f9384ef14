"""The data plane of one worker process: listeners on sockets handed down by the supervisor,
clusters with their resolvers, the timer sweep, and config application.

``apply(cfg, sockets)`` is the only way config gets in: it builds a new snapshot (clusters
with unchanged settings are kept, with their pools), starts added listeners on the given
sockets, updates changed ones in place (new requests see the new route table at once; a
request in progress keeps what it picked), and drains removed ones.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time

from fastmesh import ioengine, snapshot as snapshot_mod
from fastmesh._core import buffer, http_proxy
from fastmesh.cluster import ClusterResolver
from fastmesh.config import model
from fastmesh.listener import Listener, ListenerState

log = logging.getLogger("fastmesh.worker")

UNHEALTHY_HC, UNHEALTHY_EJECTED = 1, 2      # upstream.pxd UnhealthyBits
SWEEP_INTERVAL_S = 0.1          # deadline granularity for timeouts
POOL_SWEEP_EVERY = 10           # idle upstream sweep every 10 sweeps (1 s)
DRAIN_IDLE_CLOSE_MS = 1000      # while draining, close connections idle this long


class DataPlane:
    def __init__(self, loop):
        self.loop = loop
        self.cfg: model.Config | None = None
        self.snapshot = None
        self.listeners: dict[str, Listener] = {}
        self.draining_listeners: list[Listener] = []
        self.resolvers: dict[str, ClusterResolver] = {}
        self._sweeper: asyncio.Task | None = None
        self.draining = False
        # the supervisor's health check verdicts: cluster -> {"host:port": failed}
        self.health: dict = {}

    # -- config ----------------------------------------------------------------------

    async def apply(self, cfg: model.Config, sockets: dict, health: dict | None = None) -> None:
        """sockets: listener name -> the listening sockets this worker serves for it, for
        every listener that is new or whose address changed. health: the supervisor's
        health check verdicts to serve this config with (all of them: clusters not named
        have none). Raises on failure before changing anything it can't undo."""
        snap = snapshot_mod.build(cfg, self.snapshot)
        ioengine.start(self.loop, cfg.engine)       # once per process (a reload only warns)
        # verdicts first: listeners that start below must not pick a failed endpoint
        self._apply_health(snap, self.health if health is None else health)
        # clusters: resolvers follow the snapshot's Cluster objects
        for name in list(self.resolvers):
            r = self.resolvers[name]
            if name not in snap.clusters or snap.clusters[name] is not r.cluster \
                    or cfg.clusters[name] != r.cfg:
                r.stop()
                del self.resolvers[name]
        for name, c in cfg.clusters.items():
            if name not in self.resolvers:
                r = ClusterResolver(self.loop, c, snap.clusters[name])
                r.start()
                self.resolvers[name] = r
        # listeners
        new_names = {l.name for l in cfg.listeners}
        new_addresses = {l.address for l in cfg.listeners}
        for name in list(self.listeners):
            if name not in new_names or name in sockets:
                lst = self.listeners.pop(name)
                # an address no listener keeps is closed: its clients are refused at once
                self._retire(lst, close=lst.cfg.address not in new_addresses)
        started = []
        try:
            for lc in cfg.listeners:
                lst = self.listeners.get(lc.name)
                if lst is None:
                    lst = Listener(lc, self.loop)
                    lst.bind(sockets[lc.name] if lc.bind_to_port else [])
                    lst.apply_snapshot(snap)
                    await lst.start()
                    started.append(lst)
                    self.listeners[lc.name] = lst
                else:
                    lst.update(lc)
                    lst.apply_snapshot(snap)
        except BaseException:
            for lst in started:
                lst.close()
                self.listeners.pop(lst.name, None)
            raise
        self.cfg = cfg
        self.snapshot = snap
        self._index_addresses()
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep_forever())

    def _index_addresses(self) -> None:
        """Listeners by address, for use_original_dst: a connection redirected to one
        listener is handed to the listener bound to where it was going."""
        self.by_address = {(lst.cfg.address.host, lst.cfg.address.port): lst.dispatcher
                           for lst in self.listeners.values()}
        for lst in self.listeners.values():
            lst.dispatcher.hand_off = self._hand_off if lst.cfg.use_original_dst else None

    def _hand_off(self, dst: tuple):
        """The dispatcher of the listener for this original destination: the one on that
        exact address, else the one on the wildcard address with its port; None: none."""
        d = self.by_address.get(dst)
        if d is None:
            d = self.by_address.get(("::" if ":" in dst[0] else "0.0.0.0", dst[1]))
        return d

    def update_endpoints(self, updates: dict) -> None:
        """New endpoint sets for some clusters (EDS), in place: the Cluster objects, their
        pools to endpoints that stay, listeners and route tables are untouched."""
        clusters = dict(self.cfg.clusters)
        for name, addrs in updates.items():
            if name not in clusters:
                raise ValueError(f"no cluster {name!r}")
            # [addr, ...], or {"endpoints": [addr, ...], "weights": [w, ...]} when weighted
            weights = ()
            if isinstance(addrs, dict):
                addrs, weights = addrs["endpoints"], tuple(addrs["weights"])
            c = dataclasses.replace(clusters[name], weights=weights,
                                    endpoints=tuple(model.parse_address(a) for a in addrs))
            clusters[name] = c
            r = self.resolvers.get(name)
            if r is not None:
                r.stop()
                r.cfg = c
                r.resolved = {}
                r.start()
        self.cfg = dataclasses.replace(self.cfg, clusters=clusters)
        self.snapshot = dataclasses.replace(self.snapshot, config=self.cfg)

    def set_health(self, clusters: dict, replace_all: bool = False) -> None:
        """Health check verdicts from the supervisor: cluster -> {"host:port": failed}, the
        whole set for each cluster named (replace_all: for every cluster; those not named
        have no failed endpoint)."""
        health = dict(clusters) if replace_all else dict(self.health, **clusters)
        if self.snapshot is None:
            self.health = health
            return
        self._apply_health(self.snapshot, health, None if replace_all else clusters)

    def _apply_health(self, snap, health: dict, only=None) -> None:
        for name in (snap.clusters if only is None else only):
            cl = snap.clusters.get(name)
            if cl is None:
                continue
            want = set()
            for addr, failed in (health.get(name) or {}).items():
                if failed:
                    a = model.parse_address(addr)
                    want.add((a.host, a.port))
            have = cl.hc_failed
            if want == have:
                continue
            for host, port in have - want:
                cl.set_health_check_failed(host, port, False)
            for host, port in want - have:
                cl.set_health_check_failed(host, port, True)
        self.health = {n: m for n, m in health.items() if m}

    def _retire(self, lst: Listener, close: bool) -> None:
        lst.begin_drain()
        if close:
            lst.stop_listening()
        else:
            lst.stop_accepting()
        self.draining_listeners.append(lst)

    # -- timers ----------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = http_proxy.py_now_ms()
            for lst in list(self.listeners.values()) + self.draining_listeners:
                try:
                    lst.sweep(now)
                    if lst.ctx.draining:
                        lst.close_idle_for(now, DRAIN_IDLE_CLOSE_MS)
                except Exception:
                    log.exception("listener %s: sweep failed", lst.name)
            if self.snapshot is not None:
                for cl in self.snapshot.clusters.values():
                    if cl.od_enabled:
                        cl.outlier_tick(now)        # ejected endpoints whose time is up
            for lst in list(self.draining_listeners):
                if lst.active_connections == 0:
                    lst.close()
                    self.draining_listeners.remove(lst)
            n += 1
            if n % POOL_SWEEP_EVERY == 0:
                buffer.trim_if_worth()
            if n % POOL_SWEEP_EVERY == 0 and self.snapshot is not None:
                for c in self.snapshot.clusters.values():
                    http_proxy.sweep_idle_upstreams(c, now)
                    if c.original_dst:
                        for ep in c.origdst_cleanup(now):   # destinations unused a while
                            http_proxy.drain_endpoint(ep)

    # -- drain and stop --------------------------------------------------------------

    def stop_accepting(self) -> None:
        for lst in self.listeners.values():
            lst.stop_accepting()

    def begin_drain(self, close_listeners: bool = False) -> None:
        """Finish what is in progress. close_listeners: nobody takes these addresses over
        (SIGTERM), so stop them listening; else (hot restart, this worker replaced) only stop
        accepting: the sockets go on being served by the new generation or worker."""
        self.draining = True
        for lst in self.listeners.values():
            lst.begin_drain()
            if close_listeners:
                lst.stop_listening()
            else:
                lst.stop_accepting()

    def active_connections(self) -> int:
        return sum(l.active_connections for l in
                   list(self.listeners.values()) + self.draining_listeners)

    async def drain(self, timeout_ms: int, close_listeners: bool = False) -> int:
        """Stop accepting; let connections finish; returns how many were left at timeout."""
        self.begin_drain(close_listeners)
        deadline = time.monotonic() + timeout_ms / 1000.0
        while time.monotonic() < deadline and self.active_connections():
            await asyncio.sleep(0.05)
        return self.active_connections()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for r in self.resolvers.values():
            r.stop()
        for lst in list(self.listeners.values()) + self.draining_listeners:
            lst.abort_connections()
            lst.close()
        ioengine.stop()

    # -- reports -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return bool(self.listeners) and all(
            l.state is ListenerState.RUNNING for l in self.listeners.values())

    def stats(self) -> dict:
        listeners = {n: lst.counters() for n, lst in self.listeners.items()}
        for lst in self.draining_listeners:
            listeners.setdefault(lst.name, lst.counters())
        clusters = {n: c.counters.to_dict() for n, c in self.snapshot.clusters.items()} \
            if self.snapshot else {}
        for n, c in (self.snapshot.clusters.items() if self.snapshot else ()):
            if c.tls is not None:           # "ssl.*" of a cluster originating TLS
                clusters[n].update(c.tls.counters)
        # latency histograms (fastmesh._core.stats LAT_BOUNDS_US): bucket counts + [sum µs]
        # (only those with a request recorded: a thousand idle clusters send nothing)
        hl = {n: h for n, lst in self.listeners.items()
              if (h := lst.ctx.counters.histogram()) is not None}
        for lst in self.draining_listeners:
            if lst.name not in hl and (h := lst.ctx.counters.histogram()) is not None:
                hl[lst.name] = h
        hc = {n: h for n, c in self.snapshot.clusters.items()
              if (h := c.counters.histogram()) is not None} if self.snapshot else {}
        eng = ioengine.current()
        return {"pid": os.getpid(), "listeners": listeners, "clusters": clusters,
                "histograms": {"listeners": hl, "clusters": hc},
                "config_version": self.snapshot.version if self.snapshot else 0,
                "engine": dict(eng.counters(), name=eng.name) if eng is not None
                else {"name": "uvloop"}}

    def clusters_info(self, figures: bool = False) -> dict:
        """figures: also each endpoint's request, error and connect-failure counts (the
        dashboard's)."""
        out = {}
        for n, c in (self.snapshot.clusters.items() if self.snapshot else ()):
            out[n] = [{"address": f"{e.host}:{e.port}", "origin": e.origin,
                       "active_requests": e.active_requests,
                       "idle_connections": len(e.http_idle),
                       "multiplexed_connections": len(e.mux),
                       "health_check_failed": bool(e.unhealthy & UNHEALTHY_HC),
                       "ejected": bool(e.unhealthy & UNHEALTHY_EJECTED),
                       "ejections": e.ejections}
                      for e in c.get_endpoints()]
            if figures:
                for d, e in zip(out[n], c.get_endpoints()):
                    d.update(rq_total=e.rq_total, rq_error=e.rq_error,
                             cx_connect_fail=e.cx_connect_fail,
                             connect_failing=bool(e.connect_failing))
                    if e.latency is not None:
                        d["latency"] = e.latency.histogram()
        return out

    def listeners_info(self) -> dict:
        out = {}
        for n, lst in self.listeners.items():
            out[n] = {"state": lst.state.value, "protocol": lst.cfg.protocol,
                      "connections": lst.active_connections}
        return out
