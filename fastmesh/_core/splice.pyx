"""Zero-copy relaying for the TCP proxy's bulk streams. See splice.pxd.

Why: a tcp_proxy stream read into user space and written out again costs two copies per
byte; through a pipe, splice(2) moves page references instead (socket -> pipe takes the
received pages, pipe -> socket hands them to the outgoing segments). Measured with the
tcp-bulk benchmark's source and sink around a bare relay on this machine: ~430 CPU µs/MB
with read/write and 256 KiB buffers, ~290 with splice and a 1 MiB pipe.

Why only bulk streams: a spliced connection holds six descriptors (two sockets, two pipes)
instead of two, and an interactive stream gains nothing. TcpPipe switches when a read fills
a large part of its buffer (tcp_proxy.pyx).

The relay keeps no bytes of its own: what the sockets do not take stays in the pipe, whose
capacity is the back-pressure bound (PIPE_BYTES per direction).

Why a source is read only once its pipe is empty (not whenever the pipe has room): what
arrives meanwhile waits in the socket, and the next splice takes all of it at once. Reading
into a half-full pipe took each arrival as it came: on the tcp-bulk benchmark that cost 342
CPU µs/MB against 244 for read-when-empty, which is what the C splice relay floor
(benchmarks/floor/relay_splice.c, 251) costs in the same run.
"""
import os

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint64_t

from fastmesh._core.clock cimport now_ms
from fastmesh._core.stats cimport Counters, LS_RX_BYTES

cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t length,
                   unsigned int flags)
    unsigned int SPLICE_F_MOVE
    unsigned int SPLICE_F_NONBLOCK
    int F_SETPIPE_SZ
    int F_GETPIPE_SZ
    int O_NONBLOCK
    int O_CLOEXEC

# fcntl() itself is fcntl64@GLIBC_2.28 in new glibc headers, too recent for the manylinux2014
# wheel (glibc 2.17): the system call, as old glibc made it
cdef extern from "<sys/syscall.h>" nogil:
    long SYS_fcntl

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)
    int close(int fd)

cdef extern from "<sys/socket.h>" nogil:
    int shutdown(int fd, int how)
    int SHUT_WR
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

# the pipe of each direction: up to this many bytes in flight between the two sockets
# (the kernel's limit for an unprivileged process is /proc/sys/fs/pipe-max-size, 1 MiB by
# default; a smaller pipe than asked for still works, only with more system calls)
cdef Py_ssize_t PIPE_BYTES = 1048576
cdef unsigned int FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
cdef int MAX_ROUNDS = 4             # pipe fills and drains per loop callback, at most


cdef int _pipe(int *fds, Py_ssize_t *capacity) except -1:
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
        raise OSError(errno, os.strerror(errno))
    syscall(SYS_fcntl, fds[1], F_SETPIPE_SZ, <int>PIPE_BYTES)     # best effort
    cdef int got = <int>syscall(SYS_fcntl, fds[1], F_GETPIPE_SZ)
    capacity[0] = got if got > 0 else 65536
    return 0


cdef class Leg:

    def __cinit__(self):
        self.src = self.dst = self.pipe_r = self.pipe_w = -1

    cdef int read_in(self) except -2:
        # 2: the pipe was filled (src may have more), 1: src gave what it had, 0: EOF,
        # -1: nothing to read, or the pipe not yet drained (see the module's docstring)
        cdef Py_ssize_t room = self.pipe_bytes - self.in_pipe
        cdef ssize_t n
        if self.holding() or self.src_eof:
            return -1
        while True:
            n = splice(self.src, NULL, self.pipe_w, NULL, <size_t>room, FLAGS)
            if n > 0:
                self.in_pipe += n
                self.moved_bytes += <uint64_t>n
                self.last_io_ms = now_ms()
                return 2 if n == room else 1
            if n == 0:
                self.src_eof = True
                return 0
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return -1
            raise ConnectionResetError(errno, os.strerror(errno))

    cdef int pump_out(self) except -2:
        cdef ssize_t n
        cdef Py_ssize_t left
        while self.first is not None:       # (the pipe is empty meanwhile: src is not read)
            left = len(self.first) - self.first_off
            n = send(self.dst, <const char *>self.first + self.first_off, <size_t>left,
                     MSG_NOSIGNAL | MSG_DONTWAIT)
            if n == left:
                self.first = None
            elif n > 0:
                self.first_off += n
            elif n < 0 and errno == EINTR:
                continue
            elif n < 0 and errno == EAGAIN:
                return -1
            else:
                raise BrokenPipeError(errno, os.strerror(errno) if n < 0 else "no progress")
        while self.in_pipe > 0:
            n = splice(self.pipe_r, NULL, self.dst, NULL, <size_t>self.in_pipe, FLAGS)
            if n > 0:
                self.in_pipe -= n
                continue
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and (errno == EAGAIN):
                return -1
            raise BrokenPipeError(errno, os.strerror(errno) if n < 0 else "no progress")
        if self.src_eof and not self.dst_shut:
            self.dst_shut = True
            shutdown(self.dst, SHUT_WR)     # (an error here shows on the next read)
        return 1

    cdef void close_pipe(self):
        if self.pipe_r >= 0:
            close(self.pipe_r)
            self.pipe_r = -1
        if self.pipe_w >= 0:
            close(self.pipe_w)
            self.pipe_w = -1


cdef class SpliceRelay:
    """Owns client_fd and upstream_fd (descriptors of its own: dups of the transports') once
    made (if making it fails, they are still the caller's); start() begins relaying. on_end(exc) is called once, from a loop callback,
    when it is over (exc None: both directions ended with EOF)."""

    def __init__(self, loop, int client_fd, int upstream_fd, Counters rx_counters, on_end):
        cdef int fds[2]
        self.loop = loop
        self.client_fd = client_fd
        self.upstream_fd = upstream_fd
        self.rx_counters = rx_counters
        self.on_end = on_end
        self.up = Leg()
        self.down = Leg()
        self.up.src = self.down.dst = client_fd
        self.up.dst = self.down.src = upstream_fd
        self.up.last_io_ms = self.down.last_io_ms = now_ms()
        try:
            _pipe(fds, &self.up.pipe_bytes)
            self.up.pipe_r, self.up.pipe_w = fds[0], fds[1]
            _pipe(fds, &self.down.pipe_bytes)
            self.down.pipe_r, self.down.pipe_w = fds[0], fds[1]
        except OSError:
            self.up.close_pipe()
            self.down.close_pipe()
            self.client_fd = self.upstream_fd = -1      # not taken: the caller keeps them
            raise

    def prefill(self, bytes to_upstream, bytes to_client):
        """Before start(): bytes each side's transport received and never relayed; they
        are sent first (from user space), then the relay splices."""
        if to_upstream:
            self.up.first = to_upstream
            self.up.moved_bytes += <uint64_t>len(to_upstream)
            self.rx_counters.v[LS_RX_BYTES] += len(to_upstream)
        if to_client:
            self.down.first = to_client
            self.down.moved_bytes += <uint64_t>len(to_client)

    def start(self):
        self._watch()

    # -- loop callbacks ----------------------------------------------------------------

    def _client_readable(self):
        self._step(self.up)

    def _upstream_readable(self):
        self._step(self.down)

    def _client_writable(self):
        self._step(self.down)

    def _upstream_writable(self):
        self._step(self.up)

    cdef int _step(self, Leg leg) except -1:
        # move what src has into the pipe and what the pipe has into dst, until one of them
        # would block; then watch for whichever can make progress
        cdef uint64_t before = leg.moved_bytes
        cdef int r, rounds = 0
        cdef bint blocked
        if self.finished:
            return 0
        try:
            while rounds < MAX_ROUNDS:          # then the loop's other work; the descriptors
                rounds += 1                     # are level-triggered: it comes back here
                blocked = leg.pump_out() < 0    # dst full: its writability resumes us
                r = leg.read_in()               # only into a drained pipe (_watch
                if r == 0:                      # watches src exactly then)
                    leg.pump_out()
                    break                       # EOF: the rest out, then dst shut
                if r < 0 or blocked:
                    break                       # src had nothing, or dst is full
                if leg.pump_out() < 0 or r == 1:
                    break                       # dst full, or src drained (a short read: no
                                                # splice that would only say EAGAIN)
        except OSError as exc:
            self._finish(exc, False)
            return 0
        if leg is self.up and leg.moved_bytes != before:
            self.rx_counters.v[LS_RX_BYTES] += <int64_t>(leg.moved_bytes - before)
        if self.up.dst_shut and self.down.dst_shut:
            self._finish(None, False)
            return 0
        self._watch()
        return 0

    cdef int _watch(self) except -1:
        cdef bint rc = not self.up.src_eof and not self.up.holding()
        cdef bint ru = not self.down.src_eof and not self.down.holding()
        cdef bint wc = self.down.holding()
        cdef bint wu = self.up.holding()
        if rc != self.reading_client:
            self.reading_client = rc
            if rc:
                self.loop.add_reader(self.client_fd, self._client_readable)
            else:
                self.loop.remove_reader(self.client_fd)
        if ru != self.reading_upstream:
            self.reading_upstream = ru
            if ru:
                self.loop.add_reader(self.upstream_fd, self._upstream_readable)
            else:
                self.loop.remove_reader(self.upstream_fd)
        if wc != self.writing_client:
            self.writing_client = wc
            if wc:
                self.loop.add_writer(self.client_fd, self._client_writable)
            else:
                self.loop.remove_writer(self.client_fd)
        if wu != self.writing_upstream:
            self.writing_upstream = wu
            if wu:
                self.loop.add_writer(self.upstream_fd, self._upstream_writable)
            else:
                self.loop.remove_writer(self.upstream_fd)
        return 0

    cdef int _finish(self, object exc, bint keep_client) except -1:
        if self.finished:
            return 0
        self.finished = True
        if self.reading_client:
            self.loop.remove_reader(self.client_fd)
        if self.writing_client:
            self.loop.remove_writer(self.client_fd)
        if self.reading_upstream:
            self.loop.remove_reader(self.upstream_fd)
        if self.writing_upstream:
            self.loop.remove_writer(self.upstream_fd)
        self.reading_client = self.writing_client = False
        self.reading_upstream = self.writing_upstream = False
        self.up.close_pipe()
        self.down.close_pipe()
        close(self.upstream_fd)
        self.upstream_fd = -1
        if not keep_client:
            close(self.client_fd)
            self.client_fd = -1
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            self.loop.call_soon(on_end, exc)
        return 0

    # -- the owner's requests ----------------------------------------------------------

    def abort(self):
        """Close both connections now (drain's end, listener removal)."""
        self._finish(ConnectionAbortedError("closed by the proxy"), False)

    def close_idle(self):
        """The idle timeout: close both connections (nothing is in flight)."""
        self._finish(None, False)

    def detach_client(self, int64_t quiet_ms):
        """Hot restart: when neither direction has moved a byte for quiet_ms and both pipes
        are empty, close the upstream side and give up the client's descriptor without
        closing it (returned; None when the stream is not quiet)."""
        cdef int64_t now = now_ms()
        cdef int fd
        if (self.finished or self.up.holding() or self.down.holding()
                or self.up.src_eof or self.down.src_eof
                or now - self.up.last_io_ms < quiet_ms or now - self.down.last_io_ms < quiet_ms):
            return None
        fd = self.client_fd
        self._finish(None, True)
        self.client_fd = -1
        return fd

    cpdef int64_t last_io_ms(self):
        return max(self.up.last_io_ms, self.down.last_io_ms)

    def moved(self):
        """(client -> upstream, upstream -> client) bytes so far."""
        return self.up.moved_bytes, self.down.moved_bytes

    def __dealloc__(self):
        # never started, or collected without finishing (the loop went away): no leaks
        if not self.finished:
            self.up.close_pipe()
            self.down.close_pipe()
            if self.upstream_fd >= 0:
                close(self.upstream_fd)
            if self.client_fd >= 0:
                close(self.client_fd)
