# The parts every I/O engine shares: the Transport, the slot table, Server. See engine.pxd.
import errno
import logging
import os
import socket

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdlib cimport free
from libc.string cimport memcpy
from posix.unistd cimport close as c_close
cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t

from fastmesh._core cimport debug

log = logging.getLogger("fastmesh.engine")

cdef extern from "<sys/uio.h>":
    struct iovec:
        void *iov_base
        size_t iov_len



cdef class Engine:
    def __init__(self, loop, str name):
        self.loop = loop
        self.name = name
        self.slots = []
        self.free_slots = []
        self.stash_max_bytes = 4194304

    cdef int take_slot(self, object owner) except -1:
        cdef int slot
        if self.free_slots:
            slot = self.free_slots.pop()
            self.slots[slot] = owner
        else:
            slot = len(self.slots)
            self.slots.append(owner)
        return slot

    cdef void free_slot(self, int slot):
        if 0 <= slot < len(self.slots):
            self.slots[slot] = None
            self.free_slots.append(slot)

    cdef int want_write(self, Transport t) except -1:
        raise NotImplementedError

    cdef int want_read(self, Transport t, bint on) except -1:
        raise NotImplementedError

    cdef int shut_write(self, Transport t) except -1:
        raise NotImplementedError

    cdef int release(self, Transport t, bint abort) except -1:
        raise NotImplementedError

    cdef int start_connect(self, Transport t) except -1:
        raise NotImplementedError

    def create_connection(self, factory, str host, int port):
        """Connect to (host, port), an IP literal: a non-blocking connect the engine sees
        through. Returns a future of (transport, protocol), as loop.create_connection;
        cancelling it aborts the attempt."""
        cdef Transport t
        fut = self.loop.create_future()
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                          socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = s.connect_ex((host, port))
        except OSError as exc:
            s.close()
            fut.set_exception(exc)
            return fut
        if err != 0 and err != errno.EINPROGRESS:
            s.close()
            fut.set_exception(OSError(err, os.strerror(err)))
            return fut
        t = Transport.__new__(Transport)
        t.init(self, s.detach())
        t.factory = factory
        t.connect_fut = fut
        fut.add_done_callback(t._connect_done)
        if err == 0:
            t.connected(0)
        else:
            self.start_connect(t)
        return fut

    cdef Transport adopt(self, object factory, int fd, object server):
        # A connection the engine accepted (or was handed): its protocol, connection_made.
        cdef Transport t = Transport.__new__(Transport)
        t.init(self, fd)
        try:
            t.use_protocol(factory())
        except BaseException:
            log.exception("engine: the protocol factory failed; connection closed")
            t.finish(None, True)
            return None
        t.start()
        return t

    def counters(self) -> dict:
        return {"engine.wakes": self.wakes, "engine.events": self.events,
                "engine.batched_max": self.batched_max,
                "engine.open_transports": self.open_transports}

    def connect_accepted_socket(self, factory, sock):
        """Serve a socket accepted elsewhere (a listener's accept queue taken by hand): the
        engine owns its descriptor from now on."""
        fd = sock.detach()
        t = self.adopt(factory, fd, None)
        return t, (t.protocol if t is not None else None)


cdef class Transport:
    def __cinit__(self):
        self.fd = -1
        self.slot = -1
        self.wq = []
        self.high_water_bytes = 65536
        self.low_water_bytes = 16384

    def __dealloc__(self):
        if self.iov_mem != NULL:
            free(self.iov_mem)
            self.iov_mem = NULL
        if self.engine is not None:
            debug.count_free(debug.LEAK_TRANSPORT)

    cdef init(self, Engine engine, int fd):
        self.engine = engine
        self.loop = engine.loop
        self.fd = fd
        self.state = TS_CONNECTING
        engine.open_transports += 1
        debug.count_alloc(debug.LEAK_TRANSPORT)

    cdef int start(self) except -1:
        self.state = TS_OPEN
        self.reading = True
        try:
            self.protocol.connection_made(self)
        except BaseException as exc:
            log.exception("engine: connection_made failed")
            self.fatal(exc)
            return 0
        if self.state == TS_OPEN and self.reading:
            self.engine.want_read(self, True)
        return 0

    # ------------------------------------------------------------ asyncio Transport

    def get_extra_info(self, name, default=None):
        # addresses asked for before the close stay known after it, as asyncio's do
        if name == "peername" and self.peername_cache:
            return self.peername_cache
        if name == "sockname" and self.sockname_cache:
            return self.sockname_cache
        if self.fd < 0:
            return default
        if name == "socket":
            if self.extra_socket is None:
                # a duplicate descriptor: closing or collecting it never closes ours
                self.extra_socket = socket.socket(fileno=os.dup(self.fd))
            return self.extra_socket
        if name == "peername":
            if self.peername_cache is None:
                self.peername_cache = _addr(self.fd, True)
            return self.peername_cache if self.peername_cache else default
        if name == "sockname":
            if self.sockname_cache is None:
                self.sockname_cache = _addr(self.fd, False)
            return self.sockname_cache if self.sockname_cache else default
        return default

    def get_protocol(self):
        return self.protocol

    def set_protocol(self, protocol):
        self.use_protocol(protocol)

    def is_reading(self):
        return self.state == TS_OPEN and self.reading

    def pause_reading(self):
        if self.state != TS_OPEN or not self.reading:
            return
        self.reading = False
        self.engine.want_read(self, False)

    def resume_reading(self):
        if self.state != TS_OPEN or self.reading:
            return
        self.reading = True
        self.engine.want_read(self, True)

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = 65536 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high_water_bytes, self.low_water_bytes = high, low
        self.check_high_water()

    def get_write_buffer_limits(self):
        return (self.low_water_bytes, self.high_water_bytes)

    def get_write_buffer_size(self):
        return self.wq_bytes

    def is_closing(self):
        return self.state >= TS_CLOSING

    def write(self, data):
        cdef Py_ssize_t n
        if self.state != TS_OPEN or self.eof_out_wanted:
            return                      # as asyncio: writes after close are dropped
        if PyBytes_CheckExact(data):
            n = PyBytes_GET_SIZE(data)
        elif isinstance(data, memoryview):
            data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
            n = len(data)
        elif isinstance(data, (bytearray, bytes)):
            data = bytes(data)          # the caller may change it after we return
            n = len(data)
        else:
            raise TypeError(f"data argument must be a bytes-like object, not "
                            f"{type(data).__name__!r}")
        if n == 0:
            return
        self.wq.append(data)
        self.wq_bytes += n
        self.engine.want_write(self)
        self.check_high_water()

    def writelines(self, list_of_data):
        cdef bint any_ = False
        cdef Py_ssize_t n
        if self.state != TS_OPEN or self.eof_out_wanted:
            return
        for data in list_of_data:
            if PyBytes_CheckExact(data):
                n = PyBytes_GET_SIZE(data)
            elif isinstance(data, memoryview):
                data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
                n = len(data)
            else:
                data = bytes(data)
                n = len(data)
            if n:
                self.wq.append(data)
                self.wq_bytes += n
                any_ = True
        if any_:
            self.engine.want_write(self)
            self.check_high_water()

    def can_write_eof(self):
        return True

    def write_eof(self):
        if self.state != TS_OPEN or self.eof_out_wanted:
            return
        self.eof_out_wanted = True
        if self.wq_bytes == 0:
            self.eof_out_done = True
            self.engine.shut_write(self)

    def close(self):
        if self.state != TS_OPEN and self.state != TS_CONNECTING:
            return
        self.state = TS_CLOSING
        if self.reading:
            self.reading = False
            self.engine.want_read(self, False)
        if self.wq_bytes == 0:
            self.finish(None, False)

    def abort(self):
        self.finish(None, True)

    def detach(self):
        """Hot restart (connection migration): give the connection up without ending it.

        Returns (fd, unread): a new descriptor of the socket (the caller's, to hand over and
        close) and the bytes received but not yet delivered to the protocol (io_uring's
        stash); or None while that cannot be done yet: reading is paused at once (io_uring:
        the multishot receive is cancelled; what arrives before the cancel lands is
        stashed), and None is returned until no kernel operation names the socket and
        nothing is queued to send. Ask again later (the caller keeps the protocol's side of
        the connection unchanged meanwhile).

        On success the transport is done as after close() with nothing queued:
        connection_lost(None) follows; its own descriptor is taken out of the engine (epoll:
        out of the nested set, whose registration would otherwise outlive it with the
        socket) and closed with no linger change, so nothing (no FIN, no RST) reaches the
        peer: the other descriptor keeps the connection."""
        if self.state != TS_OPEN or self.fd < 0:
            return None
        if self.reading:
            self.reading = False
            self.engine.want_read(self, False)
        if not self.quiet():
            return None
        fd = os.dup(self.fd)
        unread = self.stashed()
        self.stash = None
        self.finish(None, False)
        return fd, unread

    def handover_ready(self):
        """Whether the socket alone holds this connection now, so that something else (a
        SpliceRelay) may take it over: open, reading paused (by the protocol), no kernel
        operation naming it and nothing queued to send. Bytes received while pausing stay
        in the stash (stashed()); resume_reading() delivers them if the hand-over is dropped."""
        return self.state == TS_OPEN and self.fd >= 0 and not self.reading and self.quiet()

    def stashed(self):
        """The bytes received and not delivered (io_uring's stash)."""
        return bytes(self.stash) if self.stash is not None else b""

    def unread_bytes(self):
        """Bytes received and not yet given to the protocol: in the kernel (FIONREAD) and
        in the io_uring stash."""
        return _unread_of(self)

    # ------------------------------------------------------------ for the engines

    cdef Py_ssize_t deliver(self, const char *data, Py_ssize_t n):
        # Copy n received bytes into the protocol's buffers; returns how many it took (it
        # may pause reading or close on the way). An exception of the protocol aborts the
        # connection with it (as asyncio's transports do).
        cdef Py_ssize_t off = 0, k
        cdef Py_buffer view
        cdef Receiver rx
        cdef RecvBuffer rb
        try:
            while off < n and self.reading and self.state == TS_OPEN:
                rx = self.rx
                if rx is not None and rx.rbuf is not None:
                    # one of fastmesh's protocols: straight into its receive arena
                    rb = rx.rbuf
                    k = rb.free_tail()
                    if k > n - off:
                        k = n - off
                    if k <= 0:
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    memcpy(rb.block.data + rb.end, data + off, k)
                    off += k
                    self.rx_bytes += k
                    rx.received(k)
                    continue
                buf = self.protocol.get_buffer(n - off)
                PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE | PyBUF_SIMPLE)
                k = view.len if view.len < n - off else n - off
                if k > 0:
                    memcpy(view.buf, data + off, k)
                PyBuffer_Release(&view)
                if k <= 0:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                off += k
                self.rx_bytes += k
                self.protocol.buffer_updated(k)
        except BaseException as exc:
            log.exception("engine: protocol failed on received data")
            self.fatal(exc)
            return n
        return off

    cdef int deliver_stash(self) except -1:
        cdef Py_ssize_t took
        cdef bytearray s = self.stash
        if s is None or not s:
            return 0
        self.stash = None
        took = self.deliver(s, len(s))
        if took < len(s) and self.state == TS_OPEN:
            del s[:took]
            self.stash = s
        return 0

    cdef int stash_bytes(self, const char *data, Py_ssize_t n) except -1:
        if self.state != TS_OPEN:
            return 0                    # nobody will read them
        if self.stash is None:
            self.stash = bytearray()
        if len(self.stash) + n > self.engine.stash_max_bytes:
            log.warning("engine: fd %d: over %d bytes received while paused; cut",
                        self.fd, self.engine.stash_max_bytes)
            self.fatal(OSError("receive stash over its limit"))
            return 0
        self.stash += (<char *>data)[:n]
        return 0

    cdef int on_eof(self) except -1:
        # The peer shut its write side: the protocol decides whether ours stays open.
        cdef object keep
        if self.eof_in:
            return 0
        self.eof_in = True
        if self.state != TS_OPEN:
            return 0
        if self.reading:
            self.reading = False
            self.engine.want_read(self, False)
        try:
            keep = self.protocol.eof_received()
        except BaseException as exc:
            log.exception("engine: eof_received failed")
            self.fatal(exc)
            return 0
        if not keep:
            self.close()
        return 0

    cdef int connected(self, int err) except -1:
        fut, self.connect_fut = self.connect_fut, None
        if self.state != TS_CONNECTING:
            return 0                    # cancelled meanwhile: already released
        if err != 0 or fut is None or fut.done():
            self.finish(None, True)
            if err != 0 and fut is not None and not fut.done():
                fut.set_exception(OSError(err, os.strerror(err)))
            return 0
        factory, self.factory = self.factory, None
        try:
            self.use_protocol(factory())
        except BaseException as exc:
            self.finish(None, True)
            fut.set_exception(exc)
            return 0
        self.start()
        if self.state == TS_DEAD:
            fut.set_exception(ConnectionError("connection lost in connection_made"))
        else:
            fut.set_result((self, self.protocol))
        return 0

    def _connect_done(self, fut):
        if fut.cancelled() and self.state == TS_CONNECTING:
            self.connect_fut = None
            self.finish(None, True)

    cdef int sent(self, Py_ssize_t n) except -1:
        # n bytes from the head of the queue are in the kernel: drop what is done.
        cdef Py_ssize_t first_left
        self.tx_bytes += n
        self.wq_bytes -= n
        while n > 0 and self.wq:
            first_left = len(self.wq[0]) - self.wq_off
            if n >= first_left:
                n -= first_left
                del self.wq[0]
                self.wq_off = 0
            else:
                self.wq_off += n
                n = 0
        self.check_low_water()          # (as asyncio: resume_writing, then the close)
        if self.wq_bytes == 0:
            if self.state == TS_CLOSING:
                self.finish(None, False)
                return 0
            if self.eof_out_wanted and not self.eof_out_done and self.state == TS_OPEN:
                self.eof_out_done = True
                self.engine.shut_write(self)
        self.check_low_water()
        return 0

    cdef int fill_iov(self, void *iovp, int max_iov) except -1:
        cdef iovec *iov = <iovec *>iovp
        cdef int i = 0
        cdef Py_buffer view
        cdef Py_ssize_t skip = self.wq_off
        for obj in self.wq:
            if i >= max_iov:
                break
            PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
            # the queue holds the object (and a memoryview its export): the memory stays put
            iov[i].iov_base = <char *>view.buf + skip
            iov[i].iov_len = <size_t>(view.len - skip)
            PyBuffer_Release(&view)
            skip = 0
            i += 1
        return i

    cdef void fatal(self, object exc):
        log.debug("engine: fd %d lost: %r", self.fd, exc)
        try:
            self.finish(exc, True)
        except BaseException:
            log.exception("engine: error while aborting a connection")

    cdef int finish(self, object exc, bint abort) except -1:
        if self.state == TS_DEAD:
            return 0
        self.state = TS_DEAD
        self.reading = False
        self.wq_bytes = 0
        self.stash = None
        if self.extra_socket is not None:
            self.extra_socket.close()
            self.extra_socket = None
        if not self.lost_scheduled and self.protocol is not None:
            self.lost_scheduled = True
            self.loop.call_soon(self._call_lost, exc)
        self.engine.open_transports -= 1
        self.engine.release(self, abort)
        return 0

    def _call_lost(self, exc):
        protocol = self.protocol
        self.use_protocol(None)
        if protocol is None:
            return
        try:
            protocol.connection_lost(exc)
        except BaseException:
            log.exception("engine: connection_lost failed")

    cdef int check_low_water(self) except -1:
        if self.write_paused and self.wq_bytes <= self.low_water_bytes \
                and self.state != TS_DEAD:      # (closing too, as asyncio)
            self.write_paused = False
            try:
                self.protocol.resume_writing()
            except BaseException as exc:
                log.exception("engine: resume_writing failed")
                self.fatal(exc)
        return 0

    cdef int check_high_water(self) except -1:
        if not self.write_paused and self.wq_bytes > self.high_water_bytes \
                and self.state == TS_OPEN:
            self.write_paused = True
            try:
                self.protocol.pause_writing()
            except BaseException as exc:
                log.exception("engine: pause_writing failed")
                self.fatal(exc)
        return 0

    def __repr__(self):
        return f"<engine.Transport {self.engine.name} fd={self.fd} state={self.state}>"


cdef extern from *:
    """
    #include <arpa/inet.h>
    #include <netinet/in.h>
    #include <sys/socket.h>
    /* one end of a socket: its family (AF_INET / AF_INET6, 0 if neither or unknown), host
       text, port, and for IPv6 its flow info and scope id; one system call */
    static int fm_sock_addr(int fd, int peer, char *host, size_t host_len, int *port,
                            unsigned *flow, unsigned *scope)
    {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int rc = peer ? getpeername(fd, (struct sockaddr *)&ss, &len)
                      : getsockname(fd, (struct sockaddr *)&ss, &len);
        if (rc < 0)
            return 0;
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            if (!inet_ntop(AF_INET, &a->sin_addr, host, (socklen_t)host_len))
                return 0;
            *port = ntohs(a->sin_port);
            return AF_INET;
        }
        if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            if (!inet_ntop(AF_INET6, &a->sin6_addr, host, (socklen_t)host_len))
                return 0;
            *port = ntohs(a->sin6_port);
            *flow = ntohl(a->sin6_flowinfo);
            *scope = a->sin6_scope_id;
            return AF_INET6;
        }
        return 0;
    }
    """
    int fm_sock_addr(int fd, int peer, char *host, size_t host_len, int *port,
                     unsigned *flow, unsigned *scope)
    enum:
        AF_INET
        AF_INET6


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    unsigned long FIONREAD


cdef int _unread_of(Transport t):
    # 1 (something, as far as anyone can tell) when the socket is gone or cannot be asked
    cdef int n = 0
    if t.fd < 0 or ioctl(t.fd, FIONREAD, &n) != 0:
        return 1
    if t.stash is not None:
        n += len(t.stash)
    return n


def detach_transport(transport):
    """Hot restart: (fd, unread bytes) of a connection handed to the next generation, or
    None while not possible yet (ask again later); whatever serves it: an engine Transport
    (Transport.detach) or one of the loop's (uvloop reads straight into the protocol's
    buffer: nothing is left unread outside the kernel; its descriptor is closed by abort(),
    which on uvloop sends nothing)."""
    if isinstance(transport, Transport):
        return (<Transport>transport).detach()
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    fd = os.dup(sock.fileno())
    transport.pause_reading()
    transport.abort()                   # our descriptor only: the connection lives on
    return fd, b""


cdef object _addr(int fd, bint peer):
    # (host, port) of a socket's either end, as asyncio gives it (IPv6: (host, port,
    # flowinfo, scope_id)); () if unknown. One getpeername/getsockname, no socket object.
    cdef char host[64]
    cdef int port = 0
    cdef unsigned flow = 0, scope = 0
    cdef int fam = fm_sock_addr(fd, peer, host, sizeof(host), &port, &flow, &scope)
    if fam == AF_INET:
        return (host.decode("ascii"), port)
    if fam == AF_INET6:
        return (host.decode("ascii"), port, flow, scope)
    return ()


cdef class Server:
    def __init__(self, Engine engine, sock, factory):
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.factory = factory
        self.slot = -1

    def close(self):
        """Stop accepting: the listening socket (a dup) is closed; connections go on."""
        if not self.active:
            return
        self.active = False
        (<object>self.engine).stop_server(self)

    def is_serving(self):
        return self.active

    def close_socket(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def leaks() -> dict:
    """Debug builds: transports alive (made and not yet collected)."""
    return {"debug_build": bool(debug.FASTMESH_DEBUG), "transports": debug.leaks[4]}


cdef object _installed = None


def install(engine):
    """The process's engine (None: uvloop), for the protocols that open connections."""
    global _installed
    _installed = engine


def installed():
    return _installed
