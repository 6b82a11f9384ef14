# The epoll engine (see engine_epoll.pxd).
import logging
import os

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from libc.errno cimport errno, EAGAIN, EINTR, ECONNABORTED
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset
from posix.unistd cimport close as c_close
cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t

from fastmesh._core.buffer cimport Receiver, RecvBuffer
from fastmesh._core.engine cimport (
    Engine, Transport, Server, TS_CONNECTING, TS_OPEN, TS_CLOSING, TS_DEAD, WQ_MAX_IOV)

log = logging.getLogger("fastmesh.engine")

cdef extern from "<sys/epoll.h>":
    union epoll_data_t "epoll_data":
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *ev)
    int epoll_wait(int epfd, epoll_event *evs, int maxevents, int timeout) nogil
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP

cdef extern from "<sys/uio.h>":
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>":
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct linger:
        int l_onoff
        int l_linger
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int accept4(int fd, void *addr, socklen_t *len, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    enum:
        MSG_NOSIGNAL
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SHUT_WR
        SHUT_RDWR
        SOL_SOCKET
        SO_LINGER
        SO_ERROR

cdef extern from "<netinet/in.h>":
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>":
    enum:
        TCP_NODELAY

# the slot of the nested set's own events carry no transport: the top bit marks a server
cdef enum:
    SERVER_BIT = 1 << 31


cdef class EpollEngine(Engine):
    def __init__(self, loop):
        Engine.__init__(self, loop, "epoll")
        self.pending_free = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        loop.add_reader(self.epfd, self._on_wake)

    def close(self):
        if self.closed:
            return
        self.closed = True
        for owner in list(self.slots):
            if isinstance(owner, Transport):
                (<Transport>owner).finish(None, True)
            elif isinstance(owner, Server):
                owner.close()
        try:
            self.loop.remove_reader(self.epfd)
        except Exception:
            pass
        c_close(self.epfd)
        self.epfd = -1

    # -------------------------------------------------------------- servers

    def serve(self, sock, factory):
        """Accept on a listening socket (the engine's from now on) for `factory`."""
        cdef Server s = Server(self, sock, factory)
        cdef epoll_event ev
        sock.setblocking(False)
        s.slot = self.take_slot(s)
        memset(&ev, 0, sizeof(ev))
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>s.slot
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, s.fd, &ev) < 0:
            self.free_slot(s.slot)
            raise OSError(errno, os.strerror(errno))
        s.active = True
        return s

    def stop_server(self, Server s):
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, s.fd, NULL)
        if self.in_wake:
            self.slots[s.slot] = None
            self.pending_free.append(s.slot)
        else:
            self.free_slot(s.slot)
        s.slot = -1
        s.close_socket()

    cdef int on_accept(self, Server s) except -1:
        cdef int fd, one = 1, i
        for i in range(ACCEPT_PER_WAKE):
            if not s.active:
                return 0
            fd = accept4(s.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EAGAIN or errno == EINTR \
                        or errno == ECONNABORTED:
                    return 0
                # EMFILE / ENFILE / ENOBUFS: the connection waits in the queue; say so
                log.error("engine: accept on fd %d failed: %s", s.fd, os.strerror(errno))
                return 0
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            s.accepted += 1
            self.adopt(s.factory, fd, s)
        return 0

    # -------------------------------------------------------------- transports

    cdef int update_events(self, Transport t) except -1:
        cdef unsigned int want = 0
        cdef epoll_event ev
        cdef int rc
        if t.fd < 0 or t.state == TS_DEAD:
            return 0
        if t.state == TS_CONNECTING:
            want = EPOLLOUT
        else:
            if t.reading and not t.eof_in:
                want |= EPOLLIN
            if t.wq_bytes > 0:
                want |= EPOLLOUT
        if t.in_epoll and want == t.ev_mask:
            return 0
        memset(&ev, 0, sizeof(ev))
        ev.events = want
        ev.data.u64 = <uint64_t>t.slot
        if not t.in_epoll:
            rc = epoll_ctl(self.epfd, EPOLL_CTL_ADD, t.fd, &ev)
            t.in_epoll = rc == 0
        else:
            rc = epoll_ctl(self.epfd, EPOLL_CTL_MOD, t.fd, &ev)
        if rc < 0:
            t.fatal(OSError(errno, os.strerror(errno)))
            return 0
        t.ev_mask = want
        return 0

    cdef int want_write(self, Transport t) except -1:
        if t.ev_mask & EPOLLOUT:
            return 0                    # waiting for room: the queue goes out then
        self.flush(t)
        return 0

    cdef int want_read(self, Transport t, bint on) except -1:
        if t.slot < 0:
            t.slot = self.take_slot(t)
        self.update_events(t)
        return 0

    cdef int shut_write(self, Transport t) except -1:
        shutdown(t.fd, SHUT_WR)
        return 0

    cdef int start_connect(self, Transport t) except -1:
        t.slot = self.take_slot(t)
        self.update_events(t)
        return 0

    cdef int release(self, Transport t, bint abort) except -1:
        # abort(): what is queued here is dropped and the socket closed, as asyncio's
        # transports do (the kernel sends what it already has, then FIN; no forced RST:
        # clients see the same close on every engine and on uvloop)
        t.wq = []
        t.wq_off = 0
        if t.fd >= 0:
            if t.in_epoll:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, t.fd, NULL)
                t.in_epoll = False
            c_close(t.fd)
            t.fd = -1
        if t.slot >= 0:
            if self.in_wake:
                self.slots[t.slot] = None           # events of this batch find nobody
                self.pending_free.append(t.slot)
            else:
                self.free_slot(t.slot)
            t.slot = -1
        return 0

    cdef int flush(self, Transport t) except -1:
        cdef iovec iov[WQ_MAX_IOV]
        cdef msghdr msg
        cdef ssize_t n
        cdef int cnt
        while t.wq_bytes > 0 and t.fd >= 0 and t.state != TS_DEAD:
            cnt = t.fill_iov(iov, WQ_MAX_IOV)
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = iov
            msg.msg_iovlen = cnt
            n = sendmsg(t.fd, &msg, MSG_NOSIGNAL)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                t.fatal(OSError(errno, os.strerror(errno)))
                return 0
            t.sent(n)
        if t.state != TS_DEAD:
            if t.slot < 0 and t.wq_bytes > 0:
                t.slot = self.take_slot(t)
            if t.slot >= 0:
                self.update_events(t)
        return 0

    cdef int on_readable(self, Transport t) except -1:
        # One recv into the protocol's memory: a Receiver's arena directly, else the buffer
        # its get_buffer() gives (held only for the recv).
        cdef Py_buffer view
        cdef bint viewed = False
        cdef char *into
        cdef Py_ssize_t room
        cdef ssize_t n
        cdef Receiver rx = t.rx
        cdef RecvBuffer rb
        if t.state != TS_OPEN or not t.reading:
            return 0
        try:
            if rx is not None and rx.rbuf is not None:
                rb = rx.rbuf
                room = rb.free_tail()
                into = rb.block.data + rb.end if room > 0 else NULL
            else:
                buf = t.protocol.get_buffer(-1)
                PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE | PyBUF_SIMPLE)
                viewed = True
                into = <char *>view.buf
                room = view.len
        except BaseException as exc:
            log.exception("engine: get_buffer failed")
            t.fatal(exc)
            return 0
        if room <= 0:
            if viewed:
                PyBuffer_Release(&view)
            t.fatal(RuntimeError("get_buffer() returned an empty buffer"))
            return 0
        n = recv(t.fd, into, <size_t>room, 0)
        if viewed:
            PyBuffer_Release(&view)
        if n > 0:
            t.rx_bytes += n
            try:
                if rx is not None:
                    rx.received(n)
                else:
                    t.protocol.buffer_updated(n)
            except BaseException as exc:
                log.exception("engine: buffer_updated failed")
                t.fatal(exc)
        elif n == 0:
            t.on_eof()
        elif errno != EAGAIN and errno != EINTR:
            t.fatal(OSError(errno, os.strerror(errno)))
        return 0

    cdef int on_writable(self, Transport t) except -1:
        self.flush(t)
        return 0

    cdef int on_connected(self, Transport t) except -1:
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if getsockopt(t.fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0:
            err = errno
        t.connected(err)
        if t.state == TS_OPEN:
            self.update_events(t)
        return 0

    # -------------------------------------------------------------- the wake

    def _on_wake(self):
        cdef uint64_t handled = 0
        self.wakes += 1
        self.in_wake = True
        try:
            self._batch(&handled)
        finally:
            self.in_wake = False
            if self.pending_free:
                for slot in self.pending_free:
                    self.free_slots.append(slot)
                self.pending_free = []
        self.events += handled
        if handled > self.batched_max:
            self.batched_max = handled

    cdef void _batch(self, uint64_t *handled_out):
        cdef epoll_event evs[EPOLL_BATCH]
        cdef int n, i, rounds, slot
        cdef uint32_t e
        cdef object owner
        cdef Transport t
        cdef uint64_t handled = 0
        for rounds in range(EPOLL_ROUNDS):
            n = epoll_wait(self.epfd, evs, EPOLL_BATCH, 0)
            if n <= 0:
                break
            for i in range(n):
                slot = <int>evs[i].data.u64
                e = evs[i].events
                if slot >= len(self.slots):
                    continue
                owner = self.slots[slot]
                if owner is None:
                    continue
                handled += 1
                try:
                    if isinstance(owner, Server):
                        self.on_accept(<Server>owner)
                        continue
                    t = <Transport>owner
                    if t.state == TS_CONNECTING:
                        self.on_connected(t)
                        continue
                    if e & (EPOLLIN | EPOLLHUP | EPOLLERR) and t.reading:
                        self.on_readable(t)
                    if e & (EPOLLOUT | EPOLLERR) and t.state != TS_DEAD and t.wq_bytes > 0:
                        self.on_writable(t)
                    elif e & (EPOLLHUP | EPOLLERR) and t.state != TS_DEAD and not t.reading:
                        if e & EPOLLERR:
                            t.fatal(ConnectionResetError("connection reset by peer"))
                        elif t.in_epoll:
                            # hung up while its reader is paused: out of the set (a level-
                            # triggered HUP would wake us forever); resume_reading re-adds it
                            epoll_ctl(self.epfd, EPOLL_CTL_DEL, t.fd, NULL)
                            t.in_epoll = False
                            t.ev_mask = 0
                except BaseException:
                    log.exception("engine: internal error on a socket event")
            if n < EPOLL_BATCH:
                break
        handled_out[0] = handled
