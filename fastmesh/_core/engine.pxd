# The data-plane I/O engine: data sockets (client connections of the listeners that use it,
# upstream connections of the HTTP/1 proxy) served by fastmesh itself instead of uvloop's
# transports, with uvloop still driving the process (timers, control, admin, IPC).
#
# This module is the part every engine shares:
#   Transport   the subset of asyncio's Transport that fastmesh's protocols use, with the
#               same semantics (close() flushes, abort() does not, connection_lost once, from
#               the loop; pause_writing / resume_writing at the write-buffer water marks),
#               feeding an asyncio.BufferedProtocol (get_buffer / buffer_updated).
#   Engine      the base of the engines: a table of slots (transports and servers by a small
#               integer, what a kernel event names), the operations a transport asks of it.
#   Server      what Listener keeps for a listening socket the engine accepts on.
# The engines themselves: engine_epoll (a nested epoll set watched by uvloop) and
# engine_uring (io_uring: multishot accept and receive, batched sends). The control world's
# fastmesh/ioengine.py picks one per process (`engine: auto | io_uring | epoll | uvloop`) and
# install()s it here for the protocols that open connections (http_proxy's upstreams).

from libc.stdint cimport int64_t, uint64_t

from fastmesh._core.buffer cimport Receiver, RecvBuffer

cdef enum TransportState:
    TS_CONNECTING = 0       # an upstream connect in progress (no protocol callbacks yet)
    TS_OPEN                 # connected: reads and writes
    TS_CLOSING              # close() called: pending writes are flushed, then TS_DEAD
    TS_DEAD                 # shut; connection_lost scheduled (once); fd closed by the engine
                            # when no kernel operation names it any more

cdef enum:
    WQ_MAX_IOV = 64         # pieces of the write queue handed to one send


cdef class Engine:
    cdef:
        object loop
        readonly str name           # "io_uring" / "epoll"
        list slots                  # slot -> Transport / Server (None: free)
        list free_slots             # slots free for reuse
        readonly int open_transports    # transports not yet released (a leak check)
        bint closed
        Py_ssize_t stash_max_bytes  # most bytes a paused transport may hold (io_uring: what
                                    # the buffer ring can deliver before a cancel lands)
        # counters (per process; exposed by counters())
        uint64_t wakes              # reader callbacks from uvloop (one per batch)
        uint64_t events             # completions / readiness events handled
        uint64_t batched_max        # most events handled in one wake

    # -- slots
    cdef int take_slot(self, object owner) except -1
    cdef void free_slot(self, int slot)
    # -- what a Transport asks of its engine (each engine overrides these)
    cdef int want_write(self, Transport t) except -1     # the write queue grew
    cdef int want_read(self, Transport t, bint on) except -1     # pause / resume reading
    cdef int shut_write(self, Transport t) except -1     # write_eof, the queue flushed
    cdef int release(self, Transport t, bint abort) except -1    # TS_DEAD: let go of it
    cdef int start_connect(self, Transport t) except -1  # wait for a connect to complete
    # -- shared
    cdef Transport adopt(self, object factory, int fd, object server)


cdef class Transport:
    cdef:
        Engine engine
        object loop
        object protocol
        Receiver rx                 # the protocol, when it is one of fastmesh's Receivers:
                                    # received bytes go to its rbuf with no Python call
        readonly int fd             # the socket; -1 once closed
        int slot                    # the engine's slot for it, -1 none
        readonly int state          # TransportState
        bint reading                # the protocol wants data (not paused, not closing)
        bint eof_in                 # the peer shut its side (or we stopped reading for good)
        bint eof_out_wanted         # write_eof(): shut the write side once flushed
        bint eof_out_done
        bint write_paused           # we called protocol.pause_writing()
        bint lost_scheduled         # connection_lost is on its way
        Py_ssize_t high_water_bytes
        Py_ssize_t low_water_bytes
        # the write queue: bytes / memoryview objects, the first sent up to wq_off
        list wq
        Py_ssize_t wq_off           # bytes of wq[0] already sent
        Py_ssize_t wq_bytes         # unsent bytes in the queue
        # io_uring: received while reading was paused (delivered on resume), bounded
        bytearray stash
        bint eof_pending            # io_uring: the peer's EOF came while paused or behind the
                                    # stash: reported once the stash is delivered
        int inflight                # kernel operations naming this transport (io_uring)
        bint recv_armed             # a multishot receive is armed (io_uring)
        bint cancel_sent            # its cancel was asked (io_uring)
        bint send_in_flight         # one send at a time keeps bytes in order (io_uring)
        bint queued_send            # in the engine's list of sends to submit (io_uring)
        bint queued_resume          # in the engine's list of receives to re-arm (io_uring)
        unsigned int ev_mask        # events registered with the nested epoll set (epoll)
        bint in_epoll               # registered there (epoll)
        void *iov_mem               # io_uring: the sendmsg header and pieces in flight
        # upstream connect
        object connect_fut          # resolves to (transport, protocol)
        object factory              # makes the protocol once connected
        object extra_socket         # get_extra_info("socket"): a dup, made on demand
        object peername_cache
        object sockname_cache
        uint64_t rx_bytes
        uint64_t tx_bytes

    # -- used by the engines
    cdef inline void use_protocol(self, object protocol):
        self.protocol = protocol
        self.rx = protocol if isinstance(protocol, Receiver) else None

    cdef inline bint quiet(self):
        # nothing of the connection in flight: no kernel operation names the socket and
        # nothing is queued to send (it may change hands)
        return not (self.inflight or self.wq_bytes or self.recv_armed or self.send_in_flight)

    cdef init(self, Engine engine, int fd)
    cdef int start(self) except -1                          # connection_made, reading on
    cdef Py_ssize_t deliver(self, const char *data, Py_ssize_t n)   # copy into get_buffer
    cdef int deliver_stash(self) except -1
    cdef int stash_bytes(self, const char *data, Py_ssize_t n) except -1
    cdef int on_eof(self) except -1
    cdef int connected(self, int err) except -1            # an upstream connect ended
    cdef int sent(self, Py_ssize_t n) except -1            # n bytes of the queue went out
    cdef int fill_iov(self, void *iov, int max_iov) except -1  # the queue as an iovec array
    cdef void fatal(self, object exc)                        # reset / error: abort, report exc
    cdef int finish(self, object exc, bint abort) except -1
    cdef int check_low_water(self) except -1
    cdef int check_high_water(self) except -1


cdef class Server:
    cdef:
        Engine engine
        object sock                 # the listening socket (a dup Listener gave us)
        readonly int fd
        object factory              # the listener's protocol factory
        int slot
        bint active                 # accepting
        bint armed                  # io_uring: the multishot accept is in flight
        uint64_t accepted
