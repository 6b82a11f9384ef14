# The epoll engine: data sockets in a nested epoll set whose descriptor uvloop watches
# (loop.add_reader: one Python callback per batch of ready sockets, not per socket);
# non-blocking recv straight into the protocol's get_buffer() memory and send / sendmsg
# from Cython. Level-triggered: a socket is registered for EPOLLIN while its protocol
# reads, for EPOLLOUT while its write queue is not empty (after a send came up short).
# The fallback when io_uring is unavailable (seccomp, kernel.io_uring_disabled, old kernels).

from libc.stdint cimport uint64_t

from fastmesh._core.engine cimport Engine, Transport, Server

cdef enum:
    EPOLL_BATCH = 256           # readiness events taken per epoll_wait
    EPOLL_ROUNDS = 4            # most epoll_wait calls per wake (a full batch asks again)
    ACCEPT_PER_WAKE = 128       # connections accepted per listening socket per wake

cdef class EpollEngine(Engine):
    cdef:
        readonly int epfd           # the nested epoll set
        bint in_wake                # handling a batch of events
        list pending_free           # slots released during a batch: freed at its end (a
                                    # later event of the batch may still name the slot)

    # -- registration
    cdef int update_events(self, Transport t) except -1     # EPOLLIN/EPOLLOUT as needed
    # -- readiness
    cdef int on_readable(self, Transport t) except -1
    cdef int on_writable(self, Transport t) except -1
    cdef int on_connected(self, Transport t) except -1
    cdef int on_accept(self, Server s) except -1
    cdef int flush(self, Transport t) except -1             # send what the queue holds
    cdef void _batch(self, uint64_t *handled_out)           # one wake's epoll_wait rounds
