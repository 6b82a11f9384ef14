"""Hot restart: handing a running fastmesh over to a new process generation.

Two unix SEQPACKET sockets, both msgpack messages (fastmesh.server.ipc):

- the upgrade socket (``--upgrade-socket``, one per deployment) is served by the running
  generation. A new generation connects to it and the exchange is::

      new -> old   {"t": "hello", "version": 1}
      old -> new   {"t": "listeners", "addresses": [...], "generation": N, "xds": {...}} +
                   the listening fds (admin last; an address repeats once per socket of its
                   SO_REUSEPORT group); "xds": the control plane's resources and versions it
                   serves, so the new generation serves them from its first moment; and
                   "registry": the provider lists it last read from ZooKeeper (same reason)
      new          starts its workers on those sockets (both generations now accept)
      new -> old   {"t": "accepting", "migrate_path": P}
      old          stops accepting, tells its workers to hand over, exits when drained
  Any failure or timeout before "accepting" leaves the old generation serving as before.

- the migrate socket (P, served by the new supervisor): each old worker sends, per Bolt
  connection with nothing in flight (or TCP connection quiet both ways), ``{"t": "migrate", "listener": name, "data": unread bytes}`` + the connection's
  fd; the new supervisor passes it to one of its workers, which continues the same TCP
  connection (the client never sees a reconnect).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from fastmesh.server import ipc

log = logging.getLogger("fastmesh.upgrade")

VERSION = 1
HELLO_TIMEOUT_S = 5.0
ACCEPTING_TIMEOUT_S = 60.0
MIGRATE_REPLY_TIMEOUT_S = 5.0


def bind_seqpacket(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(64)
    s.setblocking(False)
    return s


def connect_seqpacket(path: str, timeout_s: float = 2.0) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    except OSError:
        s.close()
        raise
    return s


# ---------------------------------------------------------------- new generation side

async def fetch_sockets(path: str, loop) -> tuple[ipc.Channel, dict, int, dict] | None:
    """Ask a running generation for its listening sockets. Returns (channel, {address:
    [sockets]}, this generation's number, the control plane's resources it holds (or {}))
    or None when nothing runs there (a stale socket file is removed)."""
    try:
        s = connect_seqpacket(path)
    except OSError as exc:
        raise RuntimeError(f"upgrade socket {path}: {exc}") from exc
    if s is None:
        if os.path.exists(path):
            os.unlink(path)
        return None
    chan = ipc.Channel(s, loop)
    chan.send({"t": "hello", "version": VERSION})
    msg, fds = await chan.recv(timeout_s=HELLO_TIMEOUT_S)
    if msg.get("t") != "listeners" or msg.get("version") != VERSION:
        for fd in fds:
            os.close(fd)
        chan.close()
        raise RuntimeError(f"upgrade: unexpected answer {msg.get('t')!r} "
                           f"(version {msg.get('version')})")
    addrs = msg["addresses"]
    if len(addrs) != len(fds):
        for fd in fds:
            os.close(fd)
        chan.close()
        raise RuntimeError("upgrade: address/socket count mismatch")
    socks: dict = {}
    for addr, fd in zip(addrs, fds):
        sk = socket.socket(fileno=fd)
        sk.setblocking(False)
        socks.setdefault(addr, []).append(sk)
    return (chan, socks, int(msg.get("generation") or 1) + 1, msg.get("xds") or {},
            msg.get("registry") or {})


class _SeqpacketServer:
    """A listening SEQPACKET unix socket on the loop; subclasses handle each connection."""

    def __init__(self, supervisor, path: str, loop):
        self.sup = supervisor
        self.path = path
        self.loop = loop
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.sock = bind_seqpacket(self.path)
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self, unlink: bool = True) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._connected(conn)

    def _connected(self, conn: socket.socket) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- old generation side

class UpgradeServer(_SeqpacketServer):
    """Serves the upgrade socket of a running generation."""

    busy = False

    def start(self) -> None:
        super().start()
        log.info("upgrade socket: %s", self.path)

    def _connected(self, conn: socket.socket) -> None:
        if self.busy:
            conn.close()
            return
        self.busy = True
        self.loop.create_task(self._handle(ipc.Channel(conn, self.loop)))

    async def _handle(self, chan: ipc.Channel) -> None:
        try:
            msg, fds = await chan.recv(timeout_s=HELLO_TIMEOUT_S)
            for fd in fds:
                os.close(fd)
            if msg.get("t") != "hello" or msg.get("version") != VERSION:
                log.error("upgrade: bad hello %r; ignoring", msg)
                return
            addrs, socks = self.sup.handover_sockets()
            t0 = time.monotonic()
            chan.send({"t": "listeners", "version": VERSION, "addresses": addrs,
                       "generation": self.sup.generation,
                       "xds": self.sup.xds.handover() if self.sup.xds is not None else {},
                       "registry": (self.sup.registry.handover()
                                    if self.sup.registry is not None else {})},
                      [s.fileno() for s in socks])
            log.info("upgrade: sent %d listening sockets to the new generation", len(socks))
            msg, fds = await chan.recv(timeout_s=ACCEPTING_TIMEOUT_S)
            for fd in fds:
                os.close(fd)
            if msg.get("t") != "accepting":
                log.error("upgrade: new generation answered %r; still serving", msg.get("t"))
                return
            log.info("upgrade: new generation accepting after %.0f ms; handing over",
                     (time.monotonic() - t0) * 1000)
            self.close(unlink=False)        # the path belongs to the new generation now
            await self.sup.hand_over(msg["migrate_path"], chan)
        except (asyncio.TimeoutError, ipc.ChannelClosed, OSError) as exc:
            log.error("upgrade: failed (%s); the running generation keeps serving",
                      type(exc).__name__ if not str(exc) else exc)
        finally:
            chan.close()
            self.busy = False


class MigrateServer(_SeqpacketServer):
    """Serves the migrate socket of a new generation: connections from old workers."""

    migrated = 0

    def _connected(self, conn: socket.socket) -> None:
        chan = ipc.Channel(conn, self.loop)
        chan.on_message = lambda msg, fds: self.loop.create_task(self._on(chan, msg, fds))
        chan.start_reading()

    async def _on(self, chan, msg, fds) -> None:
        if msg.get("t") == "closed":
            chan.close()
            return
        try:
            if msg.get("t") != "migrate" or len(fds) != 1:
                raise ValueError(f"bad migrate message {msg.get('t')!r} with {len(fds)} fds")
            await self.sup.adopt_connection(msg["listener"], fds[0], msg.get("data", b""),
                                            msg.get("chain"))
            self.migrated += 1
            chan.reply(msg, ipc.reply_msg(ok=True))
        except Exception as exc:
            log.error("migrate: could not adopt a connection: %s", exc)
            if not chan.closed:
                chan.reply(msg, ipc.reply_msg(ok=False, error=str(exc)))
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


# ------------------------------------------------------------------------ worker side

async def migrate_out(plane, path: str, timeout_ms: int) -> int:
    """Old worker: hand each Bolt connection with nothing in flight, and each TCP connection
    quiet in both directions, to the new generation (fd + unread bytes); HTTP connections
    and TLS connections (their session is in this process) drain. Returns connections left at the timeout."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_ms / 1000.0
    chan = None
    sent = 0
    while time.monotonic() < deadline:
        for lst, chain in [(lst, ch) for lst in list(plane.listeners.values())
                           for ch in list(lst.chains.values())]:
            if chain.protocol not in ("bolt", "tcp") or chain.tls is not None:
                # a TLS session lives in this process: it cannot move with its fd, so
                # the connection is served here until it ends or the drain times out
                continue
            for conn in list(chain.ctx.conns):
                if chan is None:
                    try:
                        s = connect_seqpacket(path)
                    except OSError:
                        s = None
                    if s is None:
                        log.error("migrate: %s unreachable; connections drain instead", path)
                        _cancel_migrations(plane)
                        return await plane.drain(max(0, int((deadline - time.monotonic()) * 1000)))
                    chan = ipc.Channel(s, loop)
                detached = conn.detach_for_migration()
                if detached is None:
                    continue                      # a request in flight: try again soon
                fd, data = detached
                try:
                    reply, _ = await chan.request(
                        {"t": "migrate", "listener": lst.name, "chain": chain.cfg.name,
                         "data": data}, [fd],
                        timeout_s=MIGRATE_REPLY_TIMEOUT_S)
                    if not reply.get("ok"):
                        raise RuntimeError(reply.get("error"))
                    sent += 1
                except Exception as exc:
                    log.error("migrate: hand-over failed (%s); keeping the connection", exc)
                    await adopt(plane, lst.name, os.dup(fd), data, chain.cfg.name)
                finally:
                    os.close(fd)
        if plane.active_connections() == 0:
            break
        await asyncio.sleep(0.02)
    if chan is not None:
        chan.close()
    if sent:
        log.info("migrate: handed %d connections to the new generation", sent)
    return plane.active_connections()


def _cancel_migrations(plane) -> None:
    # connections that stopped reading to become migratable read again
    for lst in list(plane.listeners.values()):
        for chain in list(lst.chains.values()):
            for conn in list(chain.ctx.conns):
                cancel = getattr(conn, "cancel_migration", None)
                if cancel is not None:
                    cancel()


async def adopt(plane, listener: str, fd: int, data: bytes, chain: str | None = None) -> None:
    """New worker: continue a connection handed over by the old generation."""
    lst = plane.listeners.get(listener)
    if lst is None:
        os.close(fd)
        raise RuntimeError(f"no listener {listener!r} to adopt a connection")
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    # the chain it was served by (a listener of one chain: that one); the connection keeps
    # its socket, so an original destination is read again from it when needed
    factory = lst.protocol_factory(chain) if chain in lst.chains else \
        next(iter(lst.chains.values())).factory
    fed = []
    if data:
        factory = _bytes_first(factory, data, fed)
    eng = lst.engine()
    if eng is not None:
        # the listener's connections are this process's I/O engine's: so is this one
        _, proto = eng.connect_accepted_socket(factory, sock)
        if proto is None:
            raise RuntimeError(f"listener {listener!r}: the protocol factory failed")
    else:
        _, proto = await loop.connect_accepted_socket(factory, sock)
    # accepted, and counted, by an earlier generation whose counters carry over
    lst.ctx.counters.add("downstream_cx_total", -1)
    if data and not fed:
        proto.adopt_bytes(data)


def _bytes_first(factory, data: bytes, fed: list):
    """`factory`, its protocol handed `data` (what the old generation received and never
    used: a partial Bolt frame, an engine's undelivered bytes) as connection_made returns,
    before its transport reads anything: uvloop's and asyncio's transports start reading
    only then, while bytes fed after `await connect_accepted_socket` could land behind
    newer ones. `fed` gets an entry once done."""
    def make():
        proto = factory()
        cls_made = type(proto).connection_made

        def connection_made(transport):
            del proto.connection_made           # (the class's again)
            cls_made(proto, transport)
            fed.append(True)
            proto.adopt_bytes(data)
        try:
            proto.connection_made = connection_made
        except AttributeError:
            pass                                # (no instance dict: fed afterwards)
        return proto
    return make
