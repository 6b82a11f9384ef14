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
import collections
import itertools
import logging
import os
import socket

import msgpack

log = logging.getLogger("fastmesh.ipc")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024    # a config (1,000s of xDS clusters) or a stats map
FRAGMENT_BYTES = 64 * 1024              # one datagram; a unix socket's send buffer (~208 KiB
                                        # by default) caps a datagram, so larger messages go
                                        # as fragments
RECV_BYTES = 256 * 1024                 # >= a fragment, and >= any datagram a unix socket's
                                        # default buffer lets an older peer send whole
MORE = b"\xc1"                          # first byte of a fragment that more follow (0xc1 is
                                        # never the first byte of a msgpack value)
MAX_FDS = 256                           # per message
PROTOCOL_VERSION = 1


def _cmsg_space() -> int:
    return socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ChannelClosed(ConnectionError):
    pass


class Channel:
    """One end of a SEQPACKET link, driven by the event loop.

    ``send(msg, fds)`` queues a message and writes what the socket takes (never blocks);
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
        self._partial: list = []              # fragments of a message still arriving
        self._partial_bytes = 0
        self._out: collections.deque = collections.deque()  # (datagram, fds) not yet written
        self._writer_on = False

    # -- sending --

    def send(self, msg: dict, fds=()) -> None:
        """Queue a message and write what the socket takes now; the rest goes out as the
        peer reads (the loop's writer callback), so two processes sending each other large
        messages at once never block each other. The descriptors are duplicated until sent."""
        if self._closed:
            raise ChannelClosed("closed")
        data = msgpack.packb(msg, use_bin_type=True)
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"message too large: {len(data)} bytes")
        # all but the last fragment start with MORE; the descriptors ride on the last
        pieces = [data[i:i + FRAGMENT_BYTES] for i in range(0, len(data), FRAGMENT_BYTES)]
        for piece in pieces[:-1]:
            self._out.append((MORE + piece, ()))
        self._out.append((pieces[-1], tuple(os.dup(fd) for fd in fds)))
        self._write()

    def _write(self) -> None:
        out = self._out
        while out:
            data, fds = out[0]
            try:
                self.sock.sendmsg([data], _rights(fds))
            except (BlockingIOError, InterruptedError):
                if not self._writer_on:
                    self._writer_on = True
                    self.loop.add_writer(self.sock.fileno(), self._write)
                return
            except OSError as exc:
                self._drop_output()
                self._on_closed(exc)
                return
            out.popleft()
            for fd in fds:
                _close_fd(fd)
        if self._writer_on:
            self._writer_on = False
            self.loop.remove_writer(self.sock.fileno())

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Block until everything queued is written (a process about to exit)."""
        if not self._out or self._closed:
            return not self._out
        if self._writer_on:
            self._writer_on = False
            self.loop.remove_writer(self.sock.fileno())
        self.sock.settimeout(timeout_s)
        try:
            while self._out:
                data, fds = self._out[0]
                self.sock.sendmsg([data], _rights(fds))
                self._out.popleft()
                for fd in fds:
                    _close_fd(fd)
        except OSError:
            self._drop_output()
            return False
        finally:
            self.sock.setblocking(False)
        return True

    def _drop_output(self) -> None:
        for _, fds in self._out:
            for fd in fds:
                _close_fd(fd)
        self._out.clear()

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
                data, anc, flags, _ = self.sock.recvmsg(RECV_BYTES, _cmsg_space())
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
            if data[:1] == MORE:
                self._partial.append(data[1:])
                self._partial_bytes += len(data) - 1
                if self._partial_bytes > MAX_MESSAGE_BYTES:
                    log.error("ipc: message over %d bytes dropped", MAX_MESSAGE_BYTES)
                    self._partial, self._partial_bytes = [], 0
                for fd in fds:
                    _close_fd(fd)
                continue
            if self._partial:
                data = b"".join(self._partial) + data
                self._partial, self._partial_bytes = [], 0
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
        if self._writer_on:
            self._writer_on = False
            try:
                self.loop.remove_writer(self.sock.fileno())
            except (ValueError, OSError):
                pass
        self._drop_output()
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
        self.flush()                          # what was sent before closing still arrives
        self._stop_reader()
        if self._writer_on:
            self._writer_on = False
            self.loop.remove_writer(self.sock.fileno())
        self._drop_output()
        self._closed = True
        self.sock.close()


def _rights(fds) -> list:
    """The ancillary data passing these descriptors (none: no ancillary data)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def reply_msg(**fields) -> dict:
    return dict(fields, t="reply")
