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
from fastmesh._core import http_proxy, sniff, tcp_proxy
from fastmesh._core.dispatch import ChainMatch, Dispatcher
from fastmesh._core.tls import new_counters as new_tls_counters
from fastmesh._core.http_proxy import py_now_ms as now_ms
from fastmesh.config import model
from fastmesh import ioengine

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
        if family == socket.AF_INET6:
            # IPv6 only, as Envoy binds "::" (ipv4_compat false): "0.0.0.0" and "::" on one
            # port are two listeners, IPv4 and IPv6, as a sidecar's rules need them
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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


def _ctx_for(cfg: model.Listener, loop, counters=None) -> ListenerCtx:
    ctx = ListenerCtx(
        cfg.name, loop, counters=counters,
        max_head_bytes=cfg.max_head_bytes, max_headers=cfg.max_headers,
        max_request_body_bytes=cfg.max_request_body_bytes,
        max_frame_bytes=cfg.max_frame_bytes, idle_timeout_ms=cfg.idle_timeout_ms,
        request_head_timeout_ms=cfg.request_head_timeout_ms,
        stream_idle_timeout_ms=cfg.stream_idle_timeout_ms,
        high_water_bytes=cfg.high_water_bytes, low_water_bytes=cfg.low_water_bytes,
        max_in_flight=cfg.max_in_flight, accept_http_10=cfg.accept_http_10)
    ctx.accept_h2c = cfg.codec == "auto"
    ctx.h2_settings = h2_settings(cfg.http2)
    return ctx


def h2_settings(s: model.Http2Settings) -> tuple:
    return (s.max_concurrent_streams, s.initial_stream_window_bytes,
            s.initial_connection_window_bytes, s.hpack_table_bytes)


def _set_limits(c: ListenerCtx, cfg: model.Listener) -> None:
    c.max_head_bytes, c.max_headers = cfg.max_head_bytes, cfg.max_headers
    c.max_request_body_bytes = cfg.max_request_body_bytes
    c.max_frame_bytes, c.idle_timeout_ms = cfg.max_frame_bytes, cfg.idle_timeout_ms
    c.request_head_timeout_ms = cfg.request_head_timeout_ms
    c.stream_idle_timeout_ms = cfg.stream_idle_timeout_ms
    c.high_water_bytes, c.low_water_bytes = cfg.high_water_bytes, cfg.low_water_bytes
    c.max_in_flight = cfg.max_in_flight
    c.accept_http_10 = cfg.accept_http_10
    c.accept_h2c = cfg.codec == "auto"
    c.h2_settings = h2_settings(cfg.http2)


_SWEEPS = {"http1": http_proxy.sweep_downstreams, "tcp": tcp_proxy.sweep_downstreams}


class Chain:
    """One filter chain at run time: its protocol, and the context its connections share
    (the listener's counters; its own route table or cluster)."""

    def __init__(self, cfg: model.FilterChain, ctx: ListenerCtx, tls_counters: dict):
        self.cfg = cfg
        self.ctx = ctx
        self.tls_counters = tls_counters
        if cfg.protocol == "http1":
            self.plain_factory = lambda: http_proxy.HttpDownstreamProtocol(ctx)
        elif cfg.protocol == "tcp":
            self.plain_factory = lambda: tcp_proxy.TcpDownstreamProtocol(ctx)
        elif cfg.protocol == "http2":
            from fastmesh._core import h2_proxy
            self.plain_factory = lambda: h2_proxy.H2DownstreamProtocol(ctx)
        else:
            from fastmesh._core import bolt_proxy
            self.plain_factory = lambda: bolt_proxy.BoltDownstreamProtocol(ctx)
        self.tls = None
        self.sds = None
        self.factory = self.plain_factory
        self.set_tls(cfg.tls)

    def set_tls(self, t) -> None:
        """(Re)build the chain's TLS from its config: new connections use it; connections
        already open keep the context they were made with."""
        if t is None:
            self.tls, self.factory = None, self.plain_factory
            self.ctx.tls_http = None
            self.sds = None
            return
        from fastmesh import tls as tls_mod
        secret = None
        self.sds = None
        if t.sds_path:
            self.sds, secret = tls_mod.sds_certificate(t)
            self.sds_in_use = secret
            self.sds_next_poll_ms = 0
        self.tls = tls_mod.server_config(t, self.cfg.name, self.tls_counters, secret)
        self.tls.cx_counters = self.ctx.counters
        if "h2" in t.alpn and self.cfg.protocol in ("http1", "http2"):
            from fastmesh._core import h2_proxy
            ctx = self.ctx
            self.tls.h2_factory = lambda: h2_proxy.H2DownstreamProtocol(ctx)
        self.factory = self.tls.factory(self.plain_factory)
        self.ctx.tls_http = tls_mod.http_hook(t) if self.cfg.protocol == "http1" else None

    @property
    def protocol(self) -> str:
        return self.cfg.protocol

    def poll_secrets(self, now: int) -> None:
        """File-based SDS: a rotated certificate (files renamed into place, or a swapped
        ..data symlink) serves new handshakes from the next poll (every 250 ms);
        connections already up keep theirs. A pair that does not match is refused (one
        log line) and the one in use stays."""
        from fastmesh.secrets import POLL_INTERVAL_MS, apply_certificate, TlsCertificate
        if now < self.sds_next_poll_ms:
            return
        self.sds_next_poll_ms = now + POLL_INTERVAL_MS
        if not self.sds.poll():
            return
        secret = self.sds.secrets.get(self.cfg.tls.sds_secret)
        if not isinstance(secret, TlsCertificate):
            log.error("chain %s: secret %r is gone from %s; the certificate in use stays",
                      self.cfg.name, self.cfg.tls.sds_secret, self.sds.path)
            return
        if secret is not self.sds_in_use and secret != self.sds_in_use:
            apply_certificate(self.tls.context, secret)
            self.sds_in_use = secret
            self.tls_counters["ssl.certificate_rotations"] += 1
            log.info("chain %s: new certificate from %s (%s)", self.cfg.name, self.sds.path,
                     secret.source)

    def sweep(self, now: int) -> None:
        if self.sds is not None:
            self.poll_secrets(now)
        fn = _SWEEPS.get(self.cfg.protocol)
        if fn is None:
            if self.cfg.protocol == "http2":
                from fastmesh._core import h2_proxy as mod
            else:
                from fastmesh._core import bolt_proxy as mod
            fn = mod.sweep_downstreams
        fn(self.ctx, now)


class Listener:
    def __init__(self, cfg: model.Listener, loop):
        self.cfg = cfg
        self.loop = loop
        self.state = ListenerState.INITIALISED
        self.drain_started_ms = 0
        self.socks: list = []                # listening sockets this worker serves
        self.servers: list = []
        self.pending_accepts = 0             # accepted in stop_listening, not yet connected
        # the first chain's context owns the counters (and the access log) all chains share
        self.ctx = _ctx_for(cfg, loop)
        self.chains: dict[str, Chain] = {}
        self.old_chains: list[Chain] = []    # removed by a reload, connections still open
        self.dispatcher = Dispatcher(cfg.name, loop)
        self.tls_counters = new_tls_counters()   # "ssl.*": the listener's TLS chains share
        self.access_log = None               # the listener's, given to the chains that log
        self._set_chains(cfg)
        self._set_access_log(cfg.access_log, cfg.access_log_format, cfg.access_log_json)
        self._filter_cfgs: tuple = (None, None)     # what ctx.fault / ctx.ratelimit were made of

    # -- wiring --------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def bound_address(self) -> tuple:
        return self.socks[0].getsockname() if self.socks else None

    @property
    def dispatched(self) -> bool:
        """Whether connections go through the dispatcher (chains chosen per connection)
        rather than straight to the one chain's protocol."""
        cfg = self.cfg
        return bool(cfg.filter_chains or cfg.original_dst or cfg.use_original_dst
                    or cfg.inspectors)

    def _ctxs(self) -> list:
        return [ch.ctx for ch in list(self.chains.values()) + self.old_chains]

    def _set_chains(self, cfg: model.Listener) -> None:
        """Chains by name: a chain that stays keeps its context (its connections); a
        removed one is kept aside until its connections are gone."""
        new: dict[str, Chain] = {}
        for i, fc in enumerate(cfg.chains()):
            old = self.chains.pop(fc.name, None)
            if old is not None and old.cfg.protocol == fc.protocol:
                tls_changed = old.cfg.tls != fc.tls
                old.cfg = fc
                old.ctx.access_log = self.access_log if fc.access_log else None
                if tls_changed:
                    old.set_tls(fc.tls)
                new[fc.name] = old
                continue
            if old is not None:
                self.old_chains.append(old)
            # the main context serves the first chain made, for the chain's whole life
            in_use = any(ch.ctx is self.ctx for ch in
                         list(new.values()) + list(self.chains.values()) + self.old_chains)
            ctx = _ctx_for(cfg, self.loop, self.ctx.counters) if in_use else self.ctx
            ctx.access_log = self.access_log if fc.access_log else None
            ctx.draining = self.ctx.draining
            new[fc.name] = Chain(fc, ctx, self.tls_counters)
        self.old_chains.extend(self.chains.values())
        self.chains = new
        d = self.dispatcher
        chains = [ch for ch in new.values() if not ch.cfg.default]
        d.matches = tuple(_chain_match(ch.cfg.match) for ch in chains)
        d.factories = tuple(ch.factory for ch in chains)
        d.default_factory = next((ch.factory for ch in new.values() if ch.cfg.default), None)
        d.original_dst = cfg.original_dst or cfg.use_original_dst
        d.inspect = inspect_bits(cfg.inspectors)
        d.needs_bytes = bool(d.inspect)        # as Envoy: inspectors read before any match
        d.sniff_timeout_ms = cfg.sniff_timeout_ms
        d.continue_on_timeout = cfg.sniff_timeout_continue

    def apply_snapshot(self, snap) -> None:
        """Point new requests at the snapshot's route tables / clusters."""
        for ch in self.chains.values():
            if ch.protocol in ("http1", "http2", "bolt"):
                ch.ctx.route_table = snap.route_tables[ch.cfg.route_table]
            else:
                ch.ctx.tcp_cluster = snap.clusters[ch.cfg.cluster]
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
        for c in self._ctxs():
            if c is not ctx:
                c.http_filters, c.fault, c.ratelimit = ctx.http_filters, ctx.fault, ctx.ratelimit

    def protocol_factory(self, chain: str | None = None):
        if chain is not None and chain in self.chains:
            return self.chains[chain].factory
        if self.dispatched:
            return self.dispatcher.protocol
        return self._one_chain_protocol

    def _one_chain_protocol(self):
        # the chain's factory as it is at each connection: an update may have replaced it
        # (new TLS settings, a certificate from SDS over ADS) while the server keeps this
        return next(iter(self.chains.values())).factory()

    def _set_access_log(self, path: str | None, fmt=None, json_fields=()) -> None:
        old = self.access_log
        if old is not None and (path is None or path != old.path
                                or (fmt, json_fields) != getattr(self, "_access_log_format", (None, ()))):
            old.close()
            self.access_log = None
        self._access_log_format = (fmt, json_fields)
        if path is not None and self.access_log is None:
            try:
                self.access_log = AccessLog(path, fmt, json_fields or None)
            except OSError as exc:
                raise RuntimeError(f"listener {self.cfg.name}: access log {path}: "
                                   f"{exc.strerror or exc}") from exc
        # every chain's connections log to it, but a chain that says it does not (Envoy:
        # an HCM without access_log beside one with it)
        for ch in list(self.chains.values()) + self.old_chains:
            ch.ctx.access_log = self.access_log if ch.cfg.access_log else None

    def sweep(self, now_ms: int) -> None:
        if self.access_log is not None:
            self.access_log.flush()
        for ch in list(self.chains.values()) + self.old_chains:
            ch.sweep(now_ms)
        if self.old_chains:
            self.old_chains = [ch for ch in self.old_chains if ch.ctx.conns]

    def counters(self) -> dict:
        """The listener's counters, the dispatcher's (sniffing, chain matching) included
        when it has a dispatcher."""
        out = self.ctx.counters.to_dict()
        if self.dispatched:
            out.update(self.dispatcher.counters)
        if any(ch.cfg.tls is not None for ch in self.chains.values()) or any(
                self.tls_counters.values()):
            out.update(self.tls_counters)
        return out

    # -- lifecycle -------------------------------------------------------------------

    def bind(self, socks: list | None = None) -> None:
        if self.state is not ListenerState.INITIALISED:
            raise RuntimeError(f"listener {self.name}: bind() in state {self.state.value}")
        if not self.cfg.bind_to_port:
            self.socks = []
            return
        self.socks = list(socks) if socks else [open_listening_socket(self.cfg.address)]

    async def start(self) -> None:
        if self.state is ListenerState.RUNNING:
            return
        if self.state is ListenerState.CLOSED:
            raise RuntimeError(f"listener {self.name}: closed")
        if not self.cfg.bind_to_port:
            # serves only the connections another listener hands over (use_original_dst)
            self.state = ListenerState.RUNNING
            log.info("listener %s: serving %s hand-offs (not bound)", self.name,
                     self.cfg.address)
            return
        if not self.socks:
            self.bind()
        eng = self.engine()
        try:
            for sock in self.socks:
                dup = sock.dup()
                try:
                    if eng is not None:
                        self.servers.append(eng.serve(dup, self.protocol_factory()))
                    else:
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
        log.info("listener %s: accepting on %s (%s%s)", self.name,
                 _fmt(self.bound_address), self.cfg.protocol,
                 f", engine {eng.name}" if eng is not None else "")

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

    def engine(self):
        """The process's I/O engine if it serves this listener's connections, else None."""
        eng = ioengine.current()
        return eng if eng is not None and ioengine.serves(self.cfg) else None

    async def _serve_accepted(self, factory, conn) -> None:
        try:
            eng = self.engine()
            if eng is not None:
                eng.connect_accepted_socket(factory, conn)
                return
            await self.loop.connect_accepted_socket(factory, conn)
        except OSError:
            conn.close()
        finally:
            self.pending_accepts -= 1

    def begin_drain(self) -> None:
        """Ask connections to finish: each HTTP/1 response from now on carries
        `Connection: close`; connections idle past the drain grace are closed by the sweep."""
        if not self.ctx.draining:
            for c in self._ctxs():
                c.draining = True
            self.drain_started_ms = now_ms()

    def close_idle_for(self, now: int, idle_ms: int) -> None:
        """Close connections idle for idle_ms, counting from no earlier than the drain's
        start: a client gets idle_ms after the drain began to send its next request."""
        if now - self.drain_started_ms < idle_ms:
            return
        for c in self._ctxs():
            for conn in list(c.conns):
                conn.close_if_idle_for(now, idle_ms)

    def update(self, cfg: model.Listener) -> None:
        """Same name and address, other settings changed: new limits apply to new requests
        (buffer caps to new connections); chains are matched by name."""
        self.cfg = cfg
        self._set_chains(cfg)
        for c in self._ctxs():
            _set_limits(c, cfg)
        self._set_access_log(cfg.access_log, cfg.access_log_format, cfg.access_log_json)

    @property
    def active_connections(self) -> int:
        return (sum(len(c.conns) for c in self._ctxs()) + self.pending_accepts
                + len(self.dispatcher.pending))

    def close(self) -> None:
        self.stop_accepting()
        for sock in self.socks:
            sock.close()
        self.socks = []
        self._set_access_log(None)          # flushed, then closed
        self.state = ListenerState.CLOSED

    def abort_connections(self) -> None:
        for c in self._ctxs():
            for conn in list(c.conns):
                conn.abort()
        self.dispatcher.abort_pending()


def _chain_match(m: model.ChainMatch) -> ChainMatch:
    return ChainMatch(destination_port=m.destination_port,
                      destination_cidrs=m.destination_cidrs, server_names=m.server_names,
                      transport_protocol=m.transport_protocol,
                      application_protocols=m.application_protocols,
                      source_cidrs=m.source_cidrs, source_ports=m.source_ports)


def inspect_bits(inspectors) -> int:
    bits = 0
    for name in inspectors:
        bits |= {"http": sniff.HTTP, "tls": sniff.TLS, "bolt": sniff.BOLT}[name]
    return bits


def _fmt(addr) -> str:
    if addr is None:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
