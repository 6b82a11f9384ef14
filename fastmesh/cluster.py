"""Endpoint resolution for clusters: IP literals at once, hostnames through the loop's
resolver (IPv4 addresses if the name has any, else IPv6), re-resolved every
``dns_refresh_ms``. A failed lookup keeps the last good addresses (and logs); a cluster with
no address at all answers 503 until one resolves.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket

from fastmesh._core.upstream import Endpoint
from fastmesh._core import http_proxy
from fastmesh.config import model

log = logging.getLogger("fastmesh.cluster")


@functools.lru_cache(maxsize=65536)     # EDS resends the same addresses, thousands at a time
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class ClusterResolver:
    """Keeps one Cython Cluster's endpoint set current."""

    def __init__(self, loop, cfg: model.Cluster, cluster):
        self.loop = loop
        self.cfg = cfg
        self.cluster = cluster
        self.resolved: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self.task: asyncio.Task | None = None

    def needs_dns(self) -> bool:
        return any(not _is_ip(a.host) for a in self.cfg.endpoints)

    async def resolve_once(self) -> None:
        for a in self.cfg.endpoints:
            key = (a.host, a.port)
            if _is_ip(a.host):
                self.resolved[key] = [(a.host, a.port)]
                continue
            try:
                infos = await self.loop.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                if key not in self.resolved:
                    log.warning("cluster %s: cannot resolve %s: %s (endpoint unavailable)",
                                self.cfg.name, a.host, exc)
                else:
                    log.warning("cluster %s: cannot resolve %s: %s (keeping last addresses)",
                                self.cfg.name, a.host, exc)
                continue
            # IPv4 addresses when the name has any, else IPv6 ("v4 preferred", as Envoy's
            # V4_PREFERRED): `localhost` must not become a second, unreachable ::1 endpoint
            v4 = [(sa[0], sa[1]) for fam, _, _, _, sa in infos if fam == socket.AF_INET]
            v6 = [(sa[0], sa[1]) for fam, _, _, _, sa in infos if fam == socket.AF_INET6]
            addrs = []
            for addr in (v4 or v6):
                if addr not in addrs:
                    addrs.append(addr)
            self.resolved[key] = addrs
        self.apply()

    def apply(self) -> None:
        endpoints = []
        weights = self.cfg.weights
        for i, a in enumerate(self.cfg.endpoints):
            w = weights[i] if weights else 1
            for host, port in self.resolved.get((a.host, a.port), ()):
                endpoints.append(Endpoint(host, port, str(a), w))
        for ep in self.cluster.set_endpoints(endpoints):
            http_proxy.drain_endpoint(ep)

    def apply_static(self) -> None:
        """Literal addresses only, synchronously (so listeners can start serving at once)."""
        for a in self.cfg.endpoints:
            if _is_ip(a.host):
                self.resolved[(a.host, a.port)] = [(a.host, a.port)]
        self.apply()

    async def refresh_forever(self) -> None:
        while True:
            try:
                await self.resolve_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster %s: endpoint refresh failed", self.cfg.name)
            await asyncio.sleep(self.cfg.dns_refresh_ms / 1000.0)

    def start(self) -> None:
        self.apply_static()
        if self.needs_dns():
            self.task = self.loop.create_task(self.refresh_forever())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
