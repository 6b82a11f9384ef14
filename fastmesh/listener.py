"""Listeners: a listening socket, the protocol it speaks, and its lifecycle.

States and transitions::

    INITIALISED --start()--> RUNNING --stop_accepting()--> STOPPED --start()--> RUNNING
         |                      |                              |
         +-------close()--------+------------close()-----------+--> CLOSED

The listening sockets are opened once by the supervisor (or handed in by a previous
generation) and kept by the Listener; the loop's servers work on duplicates of them, so
stopping accepting never closes a socket itself: during a hot restart the new generation keeps
accepting on it. A listener that nobody will serve any more (SIGTERM, removed by a reload)
is *closed* instead: connections already queued in the kernel are accepted and served, then
the socket stops listening (shutdown), so later clients are refused at once and fail over
instead of completing a handshake nobody answers.

Each address is a group of SO_REUSEPORT sockets, one per worker: the kernel spreads new
connections over the workers by a hash of the connection, instead of letting whichever worker
wakes first take the whole accept backlog.
"""
from __future__ import annotations

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


def open_listening_socket(address: model.Address, reuse_port: bool = False,
                          port: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port if port is None else port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def open_socket_group(address: model.Address, n: int) -> list:
    """n SO_REUSEPORT listening sockets on one address (one per worker). The first bind is
    made without SO_REUSEPORT, so an address another process already listens on is refused
    (EADDRINUSE) rather than silently shared with it."""
    probe = open_listening_socket(address)
    port = probe.getsockname()[1]           # port 0: the kernel's choice, for all of them
    probe.close()
    return grow_socket_group(address, [], n, port)


def grow_socket_group(address: model.Address, group: list, n: int,
                      port: int | None = None) -> list:
    """Add SO_REUSEPORT sockets to a group (a new generation with more workers)."""
    if port is None:
        port = group[0].getsockname()[1]
    added = []
    try:
        while len(group) + len(added) < n:
            added.append(open_listening_socket(address, reuse_port=True, port=port))
    except OSError:
        for s in added:
            s.close()
        raise
    return group + added


def stop_listening(sock: socket.socket) -> None:
    """Stop the kernel accepting on this listening socket, whoever else holds a descriptor
    of it (shutdown acts on the socket, close only on our descriptor)."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class Listener:
    def __init__(self, cfg: model.Listener, loop):
        self.cfg = cfg
        self.loop = loop
        self.state = ListenerState.INITIALISED
        self.drain_started_ms = 0
        self.socks: list = []                # listening sockets this worker serves
        self.servers: list = []
        self.pending_accepts = 0             # accepted in stop_listening, not yet connected
        self.ctx = ListenerCtx(
            cfg.name, loop,
            max_head_bytes=cfg.max_head_bytes, max_headers=cfg.max_headers,
            max_request_body_bytes=cfg.max_request_body_bytes,
            max_frame_bytes=cfg.max_frame_bytes, idle_timeout_ms=cfg.idle_timeout_ms,
            request_head_timeout_ms=cfg.request_head_timeout_ms,
            stream_idle_timeout_ms=cfg.stream_idle_timeout_ms,
            high_water_bytes=cfg.high_water_bytes, low_water_bytes=cfg.low_water_bytes,
            max_in_flight=cfg.max_in_flight, accept_http_10=cfg.accept_http_10)
        self._set_access_log(cfg.access_log, cfg.access_log_format, cfg.access_log_json)
        self._filter_cfgs: tuple = (None, None)     # what ctx.fault / ctx.ratelimit were made of

    # -- wiring --------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def bound_address(self) -> tuple:
        return self.socks[0].getsockname() if self.socks else None

    def apply_snapshot(self, snap) -> None:
        """Point new requests at the snapshot's route table / cluster."""
        if self.cfg.protocol in ("http1", "bolt"):
            self.ctx.route_table = snap.route_tables[self.cfg.route_table]
        else:
            self.ctx.tcp_cluster = snap.clusters[self.cfg.cluster]
        self._apply_http_filters()

    def _apply_http_filters(self) -> None:
        """The listener's HTTP filters; a token bucket whose settings did not change keeps
        its tokens."""
        from fastmesh import snapshot as snapshot_mod
        cfg, ctx = self.cfg, self.ctx
        ctx.http_filters = tuple(snapshot_mod.FILTER_KINDS[n] for n in cfg.http_filters) \
            if cfg.http_filters else None
        if cfg.fault != self._filter_cfgs[0]:
            ctx.fault = snapshot_mod.fault_policy(cfg.fault) if cfg.fault else None
        if cfg.local_rate_limit != self._filter_cfgs[1]:
            ctx.ratelimit = snapshot_mod.token_bucket(cfg.local_rate_limit) \
                if cfg.local_rate_limit else None
        self._filter_cfgs = (cfg.fault, cfg.local_rate_limit)

    def protocol_factory(self):
        ctx = self.ctx
        if self.cfg.protocol == "http1":
            return lambda: http_proxy.HttpDownstreamProtocol(ctx)
        if self.cfg.protocol == "tcp":
            return lambda: tcp_proxy.TcpDownstreamProtocol(ctx)
        from fastmesh._core import bolt_proxy       # built with the Bolt issue
        return lambda: bolt_proxy.BoltDownstreamProtocol(ctx)

    def _set_access_log(self, path: str | None, fmt=None, json_fields=()) -> None:
        old = self.ctx.access_log
        if old is not None and (path is None or path != old.path
                                or (fmt, json_fields) != getattr(self, "_access_log_format", (None, ()))):
            old.close()
            self.ctx.access_log = None
        self._access_log_format = (fmt, json_fields)
        if path is not None and self.ctx.access_log is None:
            try:
                self.ctx.access_log = AccessLog(path, fmt, json_fields or None)
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

    def bind(self, socks: list | None = None) -> None:
        if self.state is not ListenerState.INITIALISED:
            raise RuntimeError(f"listener {self.name}: bind() in state {self.state.value}")
        self.socks = list(socks) if socks else [open_listening_socket(self.cfg.address)]

    async def start(self) -> None:
        if self.state is ListenerState.RUNNING:
            return
        if self.state is ListenerState.CLOSED:
            raise RuntimeError(f"listener {self.name}: closed")
        if not self.socks:
            self.bind()
        try:
            for sock in self.socks:
                dup = sock.dup()
                try:
                    self.servers.append(await self.loop.create_server(
                        self.protocol_factory(), sock=dup, backlog=BACKLOG))
                except BaseException:
                    dup.close()
                    raise
        except BaseException:
            for srv in self.servers:
                srv.close()
            self.servers = []
            raise
        self.state = ListenerState.RUNNING
        log.info("listener %s: accepting on %s (%s)", self.name,
                 _fmt(self.bound_address), self.cfg.protocol)

    def stop_accepting(self) -> None:
        """Stop taking new connections; the socket stays open; connections go on."""
        if self.state is ListenerState.RUNNING:
            for srv in self.servers:
                srv.close()
            self.servers = []
            self.state = ListenerState.STOPPED
            log.info("listener %s: stopped accepting", self.name)

    def stop_listening(self) -> int:
        """Nobody will serve this address any more: take the connections the kernel has
        already queued (they are served, and told `Connection: close`), then stop the socket
        listening so new ones are refused at once. Returns how many were taken."""
        self.stop_accepting()
        taken = 0
        factory = self.protocol_factory()
        for sock in self.socks:
            while True:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                conn.setblocking(False)
                taken += 1
                self.pending_accepts += 1
                self.loop.create_task(self._serve_accepted(factory, conn))
            stop_listening(sock)
            sock.close()
        self.socks = []
        if taken:
            log.info("listener %s: served %d connections left in the accept queue", self.name,
                     taken)
        log.info("listener %s: closed (new connections are refused)", self.name)
        return taken

    async def _serve_accepted(self, factory, conn) -> None:
        try:
            await self.loop.connect_accepted_socket(factory, conn)
        except OSError:
            conn.close()
        finally:
            self.pending_accepts -= 1

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
        c.accept_http_10 = cfg.accept_http_10
        self._set_access_log(cfg.access_log, cfg.access_log_format, cfg.access_log_json)

    @property
    def active_connections(self) -> int:
        return len(self.ctx.conns) + self.pending_accepts

    def close(self) -> None:
        self.stop_accepting()
        for sock in self.socks:
            sock.close()
        self.socks = []
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
