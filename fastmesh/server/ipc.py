"""Messages between fastmesh processes: msgpack maps over unix sockets, with file
descriptors attached (SCM_RIGHTS) when a message hands over sockets.

Supervisor <-> worker links are SOCK_SEQPACKET socket pairs: one datagram is one message,
so there is no framing to get wrong. Every message is a map with a type ``t``; a request
carries an ``id`` that its reply repeats. The upgrade link between two generations uses the
same Channel over a SOCK_SEQPACKET unix socket bound to a path.
"""
from __future__ import annotations

import array
import asyncio
import itertools
import logging
import socket

import msgpack

log = logging.getLogger("fastmesh.ipc")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024     # a config or a stats map; generous
MAX_FDS = 256                           # per message
PROTOCOL_VERSION = 1


def _cmsg_space() -> int:
    return socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ChannelClosed(ConnectionError):
    pass


class Channel:
    """One end of a SEQPACKET link, driven by the event loop.

    ``send(msg, fds)`` writes a message (blocking briefly if the peer's queue is full);
    ``await recv()`` returns ``(msg, fds)``; ``await request(msg)`` sends with a fresh id and
    waits for the reply with the same id (other messages go to ``on_message``).
    """

    def __init__(self, sock: socket.socket, loop=None, on_message=None):
        self.sock = sock
        self.sock.setblocking(False)
        self.loop = loop or asyncio.get_event_loop()
        self.on_message = on_message          # callback(msg, fds) for unsolicited messages
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future] = {}
        self._queue: asyncio.Queue | None = None
        self._closed = False
        self._reader_on = False

    # -- sending --

    def send(self, msg: dict, fds=()) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"message too large: {len(data)} bytes")
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)))]
        self.sock.setblocking(True)
        self.sock.settimeout(5.0)
        try:
            self.sock.sendmsg([data], anc)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        finally:
            self.sock.setblocking(False)

    async def request(self, msg: dict, fds=(), timeout_s: float = 5.0) -> tuple[dict, list]:
        mid = next(self._ids)
        msg = dict(msg, id=mid)
        fut = self.loop.create_future()
        self._waiters[mid] = fut
        self.start_reading()
        try:
            self.send(msg, fds)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiters.pop(mid, None)

    def reply(self, req: dict, msg: dict, fds=()) -> None:
        self.send(dict(msg, id=req.get("id")), fds)

    # -- receiving --

    def start_reading(self) -> None:
        if not self._reader_on and not self._closed:
            self._reader_on = True
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE_BYTES, _cmsg_space())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._on_closed(exc)
                return
            if not data:
                self._on_closed(None)
                return
            fds = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            try:
                msg = msgpack.unpackb(data, raw=False)
            except Exception:
                log.error("ipc: undecodable message (%d bytes) dropped", len(data))
                for fd in fds:
                    _close_fd(fd)
                continue
            self._dispatch(msg, fds)

    def _dispatch(self, msg: dict, fds: list) -> None:
        mid = msg.get("id") if isinstance(msg, dict) else None
        fut = self._waiters.get(mid) if mid is not None else None
        if fut is not None and not fut.done() and msg.get("t") == "reply":
            fut.set_result((msg, fds))
            return
        if self._queue is not None:
            self._queue.put_nowait((msg, fds))
        elif self.on_message is not None:
            try:
                self.on_message(msg, fds)
            except Exception:
                log.exception("ipc: handler failed for %s", msg.get("t"))
        else:
            for fd in fds:
                _close_fd(fd)

    async def recv(self, timeout_s: float | None = None) -> tuple[dict, list]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        self.start_reading()
        if self._closed and self._queue.empty():
            raise ChannelClosed("closed")
        item = await asyncio.wait_for(self._queue.get(), timeout_s)
        if item is None:
            raise ChannelClosed("closed")
        return item

    def _on_closed(self, exc) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reader()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(str(exc) if exc else "closed"))
        if self._queue is not None:
            self._queue.put_nowait(None)
        elif self.on_message is not None:
            try:
                self.on_message({"t": "closed"}, [])
            except Exception:
                log.exception("ipc: close handler failed")

    def _stop_reader(self) -> None:
        if self._reader_on:
            self._reader_on = False
            try:
                self.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._stop_reader()
        self._closed = True
        self.sock.close()


def _close_fd(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def reply_msg(**fields) -> dict:
    return dict(fields, t="reply")
