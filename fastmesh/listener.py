"""Listeners: a listening socket, the protocol it speaks, and its lifecycle.

States and transitions::

    INITIALISED --start()--> RUNNING --stop_accepting()--> STOPPED --start()--> RUNNING
         |                      |                              |
         +-------close()--------+------------close()-----------+--> CLOSED

The listening socket is opened once (``bind()``, or handed in by a previous process) and
is kept by the Listener; the loop's server works on a duplicate of it, so stopping accepting
never closes the socket itself: during a hot restart the new process keeps accepting on it.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import socket

from fastmesh._core.accesslog import AccessLog
from fastmesh._core.context import ListenerCtx
from fastmesh._core import http_proxy, tcp_proxy
from fastmesh._core.http_proxy import py_now_ms as now_ms
from fastmesh.config import model

log = logging.getLogger("fastmesh.listener")

BACKLOG = 4096


class ListenerState(enum.Enum):
    INITIALISED = "initialised"
    RUNNING = "running"
    STOPPED = "stopped"
    CLOSED = "closed"


def open_listening_socket(address: model.Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    def __init__(self, cfg: model.Listener, loop):
        self.cfg = cfg
        self.loop = loop
        self.state = ListenerState.INITIALISED
        self.drain_started_ms = 0
        self.sock: socket.socket | None = None
        self.server = None
        self.ctx = ListenerCtx(
            cfg.name, loop,
            max_head_bytes=cfg.max_head_bytes, max_headers=cfg.max_headers,
            max_request_body_bytes=cfg.max_request_body_bytes,
            max_frame_bytes=cfg.max_frame_bytes, idle_timeout_ms=cfg.idle_timeout_ms,
            request_head_timeout_ms=cfg.request_head_timeout_ms,
            stream_idle_timeout_ms=cfg.stream_idle_timeout_ms,
            high_water_bytes=cfg.high_water_bytes, low_water_bytes=cfg.low_water_bytes,
            max_in_flight=cfg.max_in_flight)
        self._set_access_log(cfg.access_log)

    # -- wiring --------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def bound_address(self) -> tuple:
        return self.sock.getsockname() if self.sock is not None else None

    def apply_snapshot(self, snap) -> None:
        """Point new requests at the snapshot's route table / cluster."""
        if self.cfg.protocol in ("http1", "bolt"):
            self.ctx.route_table = snap.route_tables[self.cfg.route_table]
        else:
            self.ctx.tcp_cluster = snap.clusters[self.cfg.cluster]

    def protocol_factory(self):
        ctx = self.ctx
        if self.cfg.protocol == "http1":
            return lambda: http_proxy.HttpDownstreamProtocol(ctx)
        if self.cfg.protocol == "tcp":
            return lambda: tcp_proxy.TcpDownstreamProtocol(ctx)
        from fastmesh._core import bolt_proxy       # built with the Bolt issue
        return lambda: bolt_proxy.BoltDownstreamProtocol(ctx)

    def _set_access_log(self, path: str | None) -> None:
        old = self.ctx.access_log
        if old is not None and (path is None or path != old.path):
            old.close()
            self.ctx.access_log = None
        if path is not None and self.ctx.access_log is None:
            try:
                self.ctx.access_log = AccessLog(path)
            except OSError as exc:
                raise RuntimeError(f"listener {self.cfg.name}: access log {path}: "
                                   f"{exc.strerror or exc}") from exc

    def sweep(self, now_ms: int) -> None:
        if self.ctx.access_log is not None:
            self.ctx.access_log.flush()
        if self.cfg.protocol == "http1":
            http_proxy.sweep_downstreams(self.ctx, now_ms)
        elif self.cfg.protocol == "tcp":
            tcp_proxy.sweep_downstreams(self.ctx, now_ms)
        else:
            from fastmesh._core import bolt_proxy
            bolt_proxy.sweep_downstreams(self.ctx, now_ms)

    # -- lifecycle -------------------------------------------------------------------

    def bind(self, sock: socket.socket | None = None) -> None:
        if self.state is not ListenerState.INITIALISED:
            raise RuntimeError(f"listener {self.name}: bind() in state {self.state.value}")
        self.sock = sock if sock is not None else open_listening_socket(self.cfg.address)

    async def start(self) -> None:
        if self.state is ListenerState.RUNNING:
            return
        if self.state is ListenerState.CLOSED:
            raise RuntimeError(f"listener {self.name}: closed")
        if self.sock is None:
            self.bind()
        dup = self.sock.dup()
        try:
            self.server = await self.loop.create_server(
                self.protocol_factory(), sock=dup, backlog=BACKLOG)
        except BaseException:
            dup.close()
            raise
        self.state = ListenerState.RUNNING
        log.info("listener %s: accepting on %s (%s)", self.name,
                 _fmt(self.bound_address), self.cfg.protocol)

    def stop_accepting(self) -> None:
        """Stop taking new connections; the socket stays open; connections go on."""
        if self.state is ListenerState.RUNNING:
            self.server.close()
            self.server = None
            self.state = ListenerState.STOPPED
            log.info("listener %s: stopped accepting", self.name)

    def begin_drain(self) -> None:
        """Ask connections to finish: each HTTP/1 response from now on carries
        `Connection: close`; connections idle past the drain grace are closed by the sweep."""
        if not self.ctx.draining:
            self.ctx.draining = True
            self.drain_started_ms = now_ms()

    def close_idle_for(self, now: int, idle_ms: int) -> None:
        """Close connections idle for idle_ms, counting from no earlier than the drain's
        start: a client gets idle_ms after the drain began to send its next request."""
        if now - self.drain_started_ms < idle_ms:
            return
        for conn in list(self.ctx.conns):
            conn.close_if_idle_for(now, idle_ms)

    def update(self, cfg: model.Listener) -> None:
        """Same name and address, other settings changed: new limits apply to new requests
        (buffer caps to new connections)."""
        self.cfg = cfg
        c = self.ctx
        c.max_head_bytes, c.max_headers = cfg.max_head_bytes, cfg.max_headers
        c.max_request_body_bytes = cfg.max_request_body_bytes
        c.max_frame_bytes, c.idle_timeout_ms = cfg.max_frame_bytes, cfg.idle_timeout_ms
        c.request_head_timeout_ms = cfg.request_head_timeout_ms
        c.stream_idle_timeout_ms = cfg.stream_idle_timeout_ms
        c.high_water_bytes, c.low_water_bytes = cfg.high_water_bytes, cfg.low_water_bytes
        c.max_in_flight = cfg.max_in_flight
        self._set_access_log(cfg.access_log)

    @property
    def active_connections(self) -> int:
        return len(self.ctx.conns)

    def close(self) -> None:
        self.stop_accepting()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._set_access_log(None)          # flushed, then closed
        self.state = ListenerState.CLOSED

    def abort_connections(self) -> None:
        for conn in list(self.ctx.conns):
            conn.abort()


def _fmt(addr) -> str:
    if addr is None:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
