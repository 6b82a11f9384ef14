# Zero-copy relaying for the TCP proxy's bulk streams: splice(2) through one pipe per
# direction, so the bytes of a tcp_proxy connection never come up to user space.
#
# A TcpPipe pair hands its two sockets over to a SpliceRelay once a stream shows it is bulk
# (a read that filled a large part of the receive buffer) and nothing is queued on either
# side; from then on:
#
#   client fd --splice--> pipe (up) --splice--> upstream fd
#   client fd <--splice-- pipe (down) <--splice-- upstream fd
#
# The loop watches the two descriptors (add_reader / add_writer): a side is read only once
# its direction's pipe is empty, written while its pipe holds bytes the socket did not take
# (back-pressure: a pipe not yet drained stops the reading). EOF on one side shuts the write side of
# the other once its pipe is empty (half-close, as before); both directions shut, or an
# error on either socket, ends the relay, which then tells its owner (the client's TcpPipe).

from libc.stdint cimport int64_t, uint64_t

from fastmesh._core.stats cimport Counters


cdef class Leg:
    # one direction: src -> pipe -> dst
    cdef:
        int src
        int dst
        int pipe_r
        int pipe_w
        Py_ssize_t pipe_bytes       # the pipe's capacity
        Py_ssize_t in_pipe          # bytes in the pipe, not yet taken by dst
        bytes first                 # bytes src gave before the relay (a transport read and
        Py_ssize_t first_off        # never passed on): sent to dst first, from here
        bint src_eof                # src said EOF (or failed)
        bint dst_shut               # dst's write side shut after the pipe emptied
        uint64_t moved_bytes        # bytes that came from src
        int64_t last_io_ms

    cdef int read_in(self) except -2        # 1 moved, 0 EOF, -1 would block; raises on error
    cdef int pump_out(self) except -2       # 1 drained, -1 dst full; raises on error
    cdef inline bint holding(self):     # bytes for dst not yet sent: src is not read
        return self.in_pipe > 0 or self.first is not None
    cdef void close_pipe(self)


cdef class SpliceRelay:
    cdef:
        object loop
        readonly int client_fd
        readonly int upstream_fd
        Leg up                      # client -> upstream
        Leg down                    # upstream -> client
        Counters rx_counters        # the listener's: client bytes (LS_RX_BYTES)
        object on_end               # on_end(exc or None), once, when the relay is over
        readonly bint finished
        # what the loop is asked to watch, as registered
        bint reading_client
        bint reading_upstream
        bint writing_client
        bint writing_upstream

    cpdef int64_t last_io_ms(self)
    cdef int _step(self, Leg leg) except -1
    cdef int _watch(self) except -1
    cdef int _finish(self, object exc, bint keep_client) except -1
