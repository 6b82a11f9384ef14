"""Raw TCP proxying: each client connection gets its own upstream connection to an endpoint
of the listener's cluster; bytes are relayed both ways as Slices of the receive buffers, with
backpressure (a side whose peer's write buffer is over high water stops reading).
Half-close is passed through: EOF from one side shuts the write side of the other.

A bulk stream (a read that filled SPLICE_AFTER_READ_BYTES or more) is handed over to a
SpliceRelay (splice.pyx) once nothing is queued on either side: its bytes then go from
socket to socket through kernel pipes, without coming up to user space. FASTMESH_TCP_SPLICE=0
in the environment turns that off (comparisons, kernels without splice)."""
import asyncio
import logging
import os

from fastmesh.ratelog import RateLimitedLog

from libc.stdint cimport int64_t

from fastmesh._core cimport debug
from fastmesh._core.buffer cimport Receiver, RecvBuffer
from fastmesh._core.clock cimport now_ms
from fastmesh._core.context cimport ListenerCtx
from fastmesh._core.stats cimport (
    LS_CX_TOTAL, LS_CX_ACTIVE, LS_RX_BYTES, LS_ERR_NO_HEALTHY_UPSTREAM, LS_ERR_CONNECT_FAILED,
    LS_CX_SPLICED, LS_CX_IDLE_CLOSED, CS_CX_TOTAL, CS_CX_ACTIVE, CS_CX_CONNECT_FAIL, CS_RQ_TOTAL, CS_RQ_ACTIVE,
)
from fastmesh._core.upstream cimport Cluster, Endpoint
from fastmesh._core.upstream import open_connection
from fastmesh._core.engine import detach_transport, installed as installed_engine
from fastmesh._core.engine import Transport as EngineTransport
from fastmesh._core.sockio cimport redirected_dst
from fastmesh._core.splice cimport SpliceRelay

log = logging.getLogger("fastmesh.tcp")
rlog = RateLimitedLog(log)          # for warnings a peer can repeat at line rate

# Big reads and writes: each write wakes the peer, and the wake-up costs more than the copy
# (tcp-bulk: 64 KiB buffers ~740 CPU µs/MB, 256 KiB ~390). Blocks are pooled (buffer.pyx).
cdef Py_ssize_t BUF_INITIAL = 262144
cdef Py_ssize_t BUF_CAP = 1048576

# reads adding up to this much, each at least BULK_READ_BYTES, say the stream is bulk:
# worth six descriptors and two pipes (uvloop and epoll read up to the buffer's free tail,
# so one read does it; io_uring's reads are its ring buffers, 16 KiB each)
cdef Py_ssize_t SPLICE_AFTER_READ_BYTES = 65536
cdef Py_ssize_t BULK_READ_BYTES = 16384
cdef bint SPLICE_ON = os.environ.get("FASTMESH_TCP_SPLICE", "1") != "0"


def _spliceable_types():
    # transports whose socket is a plain TCP socket the loop reads itself, and whose
    # abort() stops watching it and closes only its own descriptor (synchronously:
    # EPOLL_CTL_DEL before close), so a dup of it can be handed to a SpliceRelay
    types = []
    try:
        from asyncio.selector_events import _SelectorSocketTransport
        types.append(_SelectorSocketTransport)
    except ImportError:
        pass
    try:
        from uvloop.loop import TCPTransport
        types.append(TCPTransport)
    except ImportError:
        pass
    return tuple(types)


cdef tuple SPLICEABLE = _spliceable_types()


cdef str _engine_of(object transport):
    # the name of the I/O engine serving this transport, or None (uvloop's, asyncio's, TLS)
    if not isinstance(transport, EngineTransport):
        return None
    eng = installed_engine()
    return eng.name if eng is not None else None


cdef int _socket_fd(object transport) except -2:
    # the socket under a transport a SpliceRelay can take over now, or -1: the loop's own
    # TCP transports, and the epoll engine's (whose abort() takes the descriptor out of its
    # set and closes it, nothing in flight). Not io_uring's at once: a receive may be armed
    # on the socket until its cancel lands (see _hands_over).
    if isinstance(transport, SPLICEABLE):
        sock = transport.get_extra_info("socket")
        return sock.fileno() if sock is not None else -1
    return transport.fd if _engine_of(transport) == "epoll" else -1


cdef inline bint _hands_over(object transport):
    # an io_uring transport: a SpliceRelay can take its socket once reading has paused and
    # no kernel operation names it (handover_ready()); what the cancelled receive took
    # meanwhile (stashed()) the relay sends first
    return _engine_of(transport) == "io_uring"


# io_uring: how often, 1 ms apart, a hand-over waits for both sockets to be quiet before it
# gives up (and the stream goes on through user space)
cdef int HANDOVER_TRIES = 50


cdef class TcpPipe(Receiver):
    # One side of a relay: reads into its buffer and writes to the peer's transport.
    cdef:
        object transport
        TcpPipe peer
        bint is_downstream
        bint eof
        bint closed
        bint reading_paused
        bint write_blocked          # our transport is over its high water (pause_writing)
        ListenerCtx ctx
        Cluster cluster
        Endpoint ep
        object connect_task
        tuple dst                   # (host, port) the client addressed (ORIGINAL_DST)
        public int64_t deadline_ms
        int64_t last_io_ms          # last byte read on this side
        SpliceRelay relay           # the bulk path, once handed over (both sides share it)
        bint leaving                # reading stopped by a migration not done yet
        bint handing_over           # io_uring: reading paused until both sockets can go to
                                    # a SpliceRelay (the downstream side's _handover_step)
        int handover_tries
        Py_ssize_t bulk_run_bytes   # bytes of the current run of big reads
        bytes adopted               # migrated bytes the buffer could not take yet

    def __init__(self, ListenerCtx ctx, bint is_downstream):
        self.ctx = ctx
        self.is_downstream = is_downstream
        self.rbuf = RecvBuffer(BUF_INITIAL, BUF_CAP)
        debug.count_alloc(debug.LEAK_DOWNSTREAM if is_downstream else debug.LEAK_UPSTREAM)

    def __dealloc__(self):
        debug.count_free(debug.LEAK_DOWNSTREAM if self.is_downstream else debug.LEAK_UPSTREAM)

    def connection_made(self, transport):
        self.transport = transport
        self.last_io_ms = now_ms()
        transport.set_write_buffer_limits(self.ctx.high_water_bytes, self.ctx.low_water_bytes)
        if not self.is_downstream:
            return
        self.ctx.conns.add(self)
        self.ctx.counters.v[LS_CX_TOTAL] += 1
        self.ctx.counters.v[LS_CX_ACTIVE] += 1
        cluster = self.ctx.tcp_cluster
        if cluster is None:
            ep = None
        elif cluster.original_dst:
            if self.dst is None:
                self.dst = redirected_dst(transport)
            ep = cluster.pick_original(self.dst)
        else:
            ep = cluster.pick()
        if ep is None:
            self.ctx.counters.v[LS_ERR_NO_HEALTHY_UPSTREAM] += 1
            transport.abort()
            return
        self.cluster = cluster
        self.ep = ep
        self.cluster.counters.v[CS_RQ_TOTAL] += 1
        self.cluster.counters.v[CS_RQ_ACTIVE] += 1
        self.ep.active_requests += 1
        self.ep.rq_total += 1
        # client bytes wait in the buffer (reading pauses when it is full) until the upstream
        # is connected; pausing here would be lost: uvloop starts reading after this returns
        self.deadline_ms = now_ms() + cluster.connect_timeout_ms
        task = asyncio.ensure_future(self._connect(), loop=self.ctx.loop)
        self.connect_task = task
        task.add_done_callback(self._on_connected)

    async def _connect(self):
        self.cluster.counters.v[CS_CX_TOTAL] += 1
        ctx = self.ctx
        _, up = await open_connection(ctx.loop, lambda: TcpUpstreamProtocol(ctx, False),
                                      self.cluster, self.ep)
        return up

    def _on_connected(self, task):
        cdef TcpPipe up
        self.connect_task = None
        self.deadline_ms = 0
        if task.cancelled() or task.exception() is not None:
            self.cluster.counters.v[CS_CX_CONNECT_FAIL] += 1
            self.ctx.counters.v[LS_ERR_CONNECT_FAILED] += 1
            self.ep.cx_connect_fail += 1
            self.ep.connect_failing = True
            if not task.cancelled():
                rlog.warning((self.ctx.name, "connect"),
                             "listener %s: connect to %s:%s failed: %s", self.ctx.name,
                            self.ep.host, self.ep.port, task.exception())
            if not self.closed:
                self.transport.abort()
            return
        up = task.result()
        self.ep.connect_failing = False
        if self.closed:
            up.transport.close()
            return
        self.cluster.counters.v[CS_CX_ACTIVE] += 1
        up.cluster = self.cluster
        up.peer = self
        self.peer = up
        self._flush()
        if self.adopted is not None:
            up.transport.write(self.adopted)    # (after the buffer's part of them)
            self.adopted = None
        # a server-first upstream (SMTP, MySQL) may have spoken before this callback ran
        # (asyncio reads the new socket before the connect task's callbacks): its greeting
        # waits in its buffer and must go now, not with whatever it says next
        up._flush()
        # the client is read again, unless what went to the upstream just now filled its
        # transport: then its resume_writing does it (reading now would never stop)
        if not up.write_blocked:
            self._set_reading(True)

    cdef int received(self, Py_ssize_t nbytes) except -1:
        self.rbuf.advance(nbytes)
        self.last_io_ms = now_ms()
        if self.is_downstream:
            self.ctx.counters.v[LS_RX_BYTES] += nbytes
        if self.peer is not None and not self.peer.closed:
            self._flush()
            self.bulk_run_bytes = self.bulk_run_bytes + nbytes if nbytes >= BULK_READ_BYTES else 0
            if self.bulk_run_bytes >= SPLICE_AFTER_READ_BYTES and SPLICE_ON:
                self._try_splice()
        elif self.peer is not None or self.closed:
            self.rbuf.consume(self.rbuf.size())     # the other side is gone: nowhere to go
        elif self.rbuf.is_full():
            self._set_reading(False)                # upstream not connected yet: hold
        return 0

    cdef void _flush(self):
        cdef Py_ssize_t n = self.rbuf.size()
        if n and self.peer is not None and not self.peer.closed:
            self.peer.transport.write(self.rbuf.take_slice(n))
        if self.eof and self.peer is not None and not self.peer.closed:
            if self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()

    cdef int _try_splice(self) except -1:
        # hand both sockets to a SpliceRelay, if nothing is queued anywhere (a byte left in a
        # buffer here or in a transport would be lost or reordered) and both are plain TCP
        cdef TcpPipe d = self if self.is_downstream else self.peer
        cdef TcpPipe u = self.peer if self.is_downstream else self
        cdef int fd_d, fd_u
        if (d is None or u is None or d.closed or u.closed or d.eof or u.eof
                or d.relay is not None or d.handing_over or d.rbuf.size() or u.rbuf.size()):
            return 0
        fd_d = _socket_fd(d.transport)
        fd_u = _socket_fd(u.transport)
        if fd_d >= 0 and fd_u >= 0:
            if not (d.transport.get_write_buffer_size() or u.transport.get_write_buffer_size()):
                d._start_relay(fd_d, fd_u, b"", b"")
        elif _hands_over(d.transport) and _hands_over(u.transport):
            # (io_uring's sends are always queued until they complete: the hand-over waits
            # for them, with both sides' reading paused)
            d.handing_over = u.handing_over = True
            d.handover_tries = 0
            d._set_reading(False)
            u._set_reading(False)
            self.ctx.loop.call_soon(d._handover_step)
        return 0

    def _handover_step(self):
        # (the downstream side) io_uring: relay once both sockets are quiet, or give up
        cdef TcpPipe u = self.peer
        if not self.handing_over:
            return
        if self.closed or u is None or u.closed or self.relay is not None:
            self._end_handover()
        elif self.transport.handover_ready() and u.transport.handover_ready():
            if not self._start_relay(self.transport.fd, u.transport.fd,
                                     self.transport.stashed(), u.transport.stashed()):
                self._end_handover()
        else:
            self.handover_tries += 1
            if self.handover_tries > HANDOVER_TRIES:
                self._end_handover()
            else:
                self.ctx.loop.call_later(0.001, self._handover_step)

    cdef void _end_handover(self):
        # (the downstream side) no relay after all: both sides read again, as they would
        # have (a transport's stash is delivered first); another try needs another run of
        # big reads
        cdef TcpPipe u = self.peer
        self.handing_over = False
        self.bulk_run_bytes = 0
        if u is not None:
            u.handing_over = False
            u.bulk_run_bytes = 0
            if not self.write_blocked:
                u._set_reading(True)
            if not u.write_blocked:
                self._set_reading(True)
        else:
            self._set_reading(True)

    cdef bint _start_relay(self, int fd_d, int fd_u, bytes to_upstream,
                           bytes to_client) except -1:
        # (the downstream side) the relay gets dups of both sockets; the transports then
        # close their own descriptors, and their connection_lost finds the relay and leaves
        # the connection alone (it ends through _relay_ended). False: nothing changed.
        cdef TcpPipe u = self.peer
        cdef SpliceRelay relay
        try:
            fd_d = os.dup(fd_d)
        except OSError:                         # out of descriptors: stay on this path
            return False
        try:
            fd_u = os.dup(fd_u)
        except OSError:
            os.close(fd_d)
            return False
        try:
            relay = SpliceRelay(self.ctx.loop, fd_d, fd_u, self.ctx.counters, self._relay_ended)
        except OSError as exc:                  # out of descriptors: stay on this path
            os.close(fd_d)
            os.close(fd_u)
            rlog.warning((self.ctx.name, "splice"), "listener %s: no pipe for a bulk "
                         "stream (%s): relayed through user space", self.ctx.name, exc)
            return False
        relay.prefill(to_upstream, to_client)
        self.relay = u.relay = relay
        self.handing_over = u.handing_over = False
        self.ctx.counters.v[LS_CX_SPLICED] += 1
        self.last_io_ms = u.last_io_ms = now_ms()
        self.transport.abort()
        u.transport.abort()
        relay.start()
        return True

    def _relay_ended(self, exc):
        # the relay of this (downstream) side is over: end both sides as connection_lost
        # would have
        cdef TcpPipe up = self.peer
        self.peer = None
        if up is not None:
            up.peer = None
            up._lost(exc)
        self._lost(exc)

    cdef void _set_reading(self, bint on):
        if self.closed or self.transport is None or (on and self.handing_over):
            return
        if on and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        elif not on and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self):
        self.eof = True
        if self.peer is not None:
            self._flush()
            if self.peer.eof:
                return False
        return True                         # keep our write side for the peer's bytes

    def connection_lost(self, exc):
        if self.relay is not None:
            return                          # handed over: the relay ends it
        self._lost(exc)

    cdef int _lost(self, exc) except -1:
        cdef TcpPipe peer = self.peer
        if self.closed:
            return 0
        self.closed = True
        if self.is_downstream:
            self.ctx.conns.discard(self)
            self.ctx.counters.v[LS_CX_ACTIVE] -= 1
            if self.cluster is not None:
                self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
                self.ep.active_requests -= 1
            if self.connect_task is not None:
                self.connect_task.cancel()
        elif self.cluster is not None:
            self.cluster.counters.v[CS_CX_ACTIVE] -= 1
        self.peer = None
        if peer is not None and not peer.closed:
            peer.peer = None
            if exc is None:
                peer.transport.close()      # flushes what is queued, then closes
            else:
                peer.transport.abort()
        return 0

    def pause_writing(self):
        self.write_blocked = True
        if self.peer is not None:
            self.peer._set_reading(False)

    def resume_writing(self):
        self.write_blocked = False
        if self.peer is not None:
            self.peer._set_reading(True)

    def close_if_idle_for(self, int64_t now, int64_t idle_ms):
        pass                    # raw streams have no request boundary: migrated or drained

    def detach_for_migration(self, int64_t quiet_ms=500):
        """Hot restart: when neither direction has moved a byte for quiet_ms and nothing is
        queued, close the upstream side and give up the client connection without closing
        it: returns (dup'd fd, b"") for the new generation (which connects a new upstream)."""
        cdef TcpPipe up = self.peer
        cdef int64_t now = now_ms()
        if self.relay is not None:
            fd = self.relay.detach_client(quiet_ms)     # ends both sides when it gives it
            return None if fd is None else (fd, b"")
        if (self.closed or up is None or up.closed or self.rbuf.size() or up.rbuf.size()
                or self.transport.get_write_buffer_size() or up.transport.get_write_buffer_size()
                or now - self.last_io_ms < quiet_ms or now - up.last_io_ms < quiet_ms):
            if self.leaving:
                # bytes moved since an engine's transport stopped reading to leave: it
                # stays here (for now) and reads again, unless backpressure holds it
                self.leaving = False
                if not self.closed and not self.reading_paused:
                    self.transport.resume_reading()
            return None
        # (an I/O engine's transport may need a moment: its kernel operations cancelled;
        # it has stopped reading then, and we are asked again)
        detached = detach_transport(self.transport)
        if detached is None:
            self.leaving = True
            return None
        self.peer = None
        up.peer = None
        up.transport.close()
        return detached                     # (fd, bytes received here and never relayed)

    def set_original_dst(self, str host, int port):
        self.dst = (host, port)

    cdef bint connected(self):
        return not self.closed and (self.relay is not None or self.peer is not None)

    cdef int64_t last_moved_ms(self):
        # the last byte read on either side (what one side reads the other is sent)
        if self.relay is not None:
            return self.relay.last_io_ms()
        if self.peer is not None and self.peer.last_io_ms > self.last_io_ms:
            return self.peer.last_io_ms
        return self.last_io_ms

    cdef void close_idle(self):
        if self.relay is not None:
            self.relay.close_idle()
        elif not self.closed:
            self.transport.close()          # connection_lost closes the upstream side

    def adopt_bytes(self, data):
        """Continue a migrated connection: bytes the old generation received and never
        relayed go first, once the upstream is connected. What does not fit the buffer
        waits aside, and the client is not read until it is sent (order kept)."""
        cdef Py_ssize_t n
        if not data:
            return
        n = self.rbuf.py_feed(data)
        if n < len(data):
            self.adopted = bytes(data[n:])
            self._set_reading(False)

    def abort(self):
        if self.relay is not None:
            self.relay.abort()
            return
        if self.transport is not None and not self.closed:
            self.transport.abort()

    cpdef void on_deadline(self, int64_t now):
        self.deadline_ms = 0
        if self.connect_task is not None:
            self.connect_task.cancel()      # connect timeout: _on_connected aborts


class TcpDownstreamProtocol(TcpPipe, asyncio.BufferedProtocol):
    """A client connection on a tcp listener."""

    def __init__(self, ctx):
        TcpPipe.__init__(self, ctx, True)


class TcpUpstreamProtocol(TcpPipe, asyncio.BufferedProtocol):
    """Its upstream connection."""


def sweep_downstreams(ListenerCtx ctx, int64_t now):
    """Fire passed connect deadlines of a tcp listener's connections, and close those that
    moved no byte either way for the listener's idle_timeout_ms (Envoy's tcp_proxy
    idle_timeout: counted in downstream_cx_idle_closed)."""
    cdef TcpPipe p
    cdef int64_t idle_ms = ctx.idle_timeout_ms
    cdef list idle = []
    for p in ctx.conns:                     # quiet connections hold no receive memory
        p.rbuf.release_if_empty()
        if p.peer is not None:
            p.peer.rbuf.release_if_empty()
        if idle_ms > 0 and p.connected() and now - p.last_moved_ms() >= idle_ms:
            idle.append(p)
    due = [p for p in ctx.conns if p.deadline_ms and p.deadline_ms <= now]
    for p in due:
        p.on_deadline(now)
    for p in idle:
        ctx.counters.v[LS_CX_IDLE_CLOSED] += 1
        p.close_idle()


def debug_leak_counts():
    """Live objects (allocations minus frees) counted by this module, by kind. Counted only
    in a debug build (FASTMESH_DEBUG=1); a release build returns zeros."""
    return {"debug_build": bool(debug.FASTMESH_DEBUG), "blocks": debug.leaks[0],
            "downstream": debug.leaks[1], "upstream": debug.leaks[2], "inflight": debug.leaks[3]}
