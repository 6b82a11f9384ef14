# The io_uring engine: one ring per process, its completions announced on an eventfd that
# uvloop watches (loop.add_reader: one Python callback per batch, not per connection).
#
#   accept   one multishot accept per listening socket
#   receive  one multishot receive per connection into a provided buffer ring (group 1,
#            ring_buffers x ring_buffer_bytes); each completion is copied into the
#            protocol's get_buffer() memory and the buffer goes straight back to the ring.
#            Out of buffers (ENOBUFS) the receive ends and is re-armed at the end of the
#            batch (back-pressure, no loss). Pausing cancels it; what arrives before the
#            cancel lands is kept (Transport.stash) and delivered on resume.
#   send     one send (or sendmsg of up to WQ_MAX_IOV queued pieces) in flight per
#            connection; a short send is resumed from where it stopped.
#   connect  a non-blocking connect, its completion seen by a POLLOUT poll on the ring.
#   completions  cooperative task work (IORING_SETUP_COOP_TASKRUN + TASKRUN_FLAG): no IPI
#            interrupts the worker; deferred (DEFER_TASKRUN) and plain on request
#            (FASTMESH_URING_MODE=0 / 2) and as fallbacks; a 100 ms backstop look.
# Every submission made while a batch is handled (and by callbacks between wakes, through
# one call_soon) goes to the kernel in one io_uring_enter.
#
# A transport's slot (the high bits of user_data) and its descriptor stay taken until no
# operation names it (Transport.inflight == 0): a late completion never reaches a reused
# slot, a closed descriptor number is never reused under a live operation.

from libc.stdint cimport uint64_t

from fastmesh._core.engine cimport Engine, Transport, Server

cdef extern from *:
    """
    typedef struct fm_ring fm_ring;
    """
    ctypedef struct fm_ring:
        pass

cdef enum UringOp:              # the low 3 bits of user_data
    OP_ACCEPT = 1               # multishot accept (slot: a Server)
    OP_RECV = 2                 # multishot receive (slot: a Transport)
    OP_SEND = 3                 # send / sendmsg
    OP_POLL = 4                 # POLLOUT on a connecting socket
    OP_CANCEL = 5               # a cancel request (no slot: its completion is ignored)

cdef enum:
    URING_ENTRIES = 2048        # submission queue entries
    URING_CQ_ENTRIES = 16384    # completion queue entries (multishot: many per submission)
    URING_BATCH = 256           # completions copied out per round
    URING_ROUNDS = 8            # most rounds (handle, submit) per wake

cdef class UringEngine(Engine):
    cdef:
        fm_ring *r
        readonly int efd                # the eventfd uvloop watches
        readonly unsigned int ring_buffers          # provided buffers (a power of two)
        readonly unsigned int ring_buffer_bytes     # bytes each
        bint in_wake                    # handling a batch: submissions wait for its end
        bint flush_scheduled            # a call_soon will submit
        list send_list                  # transports with bytes to send, no send in flight
        list rearm_list                 # transports whose receive must be (re-)armed
        list accept_rearm               # servers whose multishot accept ended
        object tick_handle              # the 100 ms backstop look
        # counters
        readonly uint64_t enobufs       # receives ended for want of buffers
        readonly uint64_t submits       # io_uring_enter calls that submitted
        readonly uint64_t partial_sends # sends the kernel took only part of
        readonly uint64_t ticks         # backstop looks
        readonly uint64_t tick_finds    # ... that found completions nobody announced

    cdef int ensure_slot(self, Transport t) except -1
    cdef int op_done(self, Transport t) except -1
    cdef int close_now(self, Transport t) except -1
    cdef int cancel(self, int slot, int op) except -1
    cdef int schedule(self) except -1
    cdef int prep_sends(self) except -1
    cdef int prep_rearms(self) except -1
    cdef int submit(self) except -1
    cdef int handle(self, uint64_t ud, int res, unsigned int flags) except -1
    cdef int on_accept(self, Server s, int res, unsigned int flags) except -1
    cdef int on_recv(self, Transport t, int res, unsigned int flags) except -1
    cdef int on_send(self, Transport t, int res) except -1
    cdef int on_poll(self, Transport t, int res) except -1
    cdef int drain(self) except -1
