# The io_uring engine (see engine_uring.pxd). liburing is linked statically (the wheel
# stays self-contained); only the few calls below are used.
import logging
import os

from libc.errno cimport errno, ENOBUFS, EMFILE, ENFILE, EINTR, EAGAIN, EBUSY

cdef extern from "<errno.h>":
    enum:
        ECANCELED
from libc.stdint cimport uint64_t
from posix.unistd cimport close as c_close, read as c_read
cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t

from fastmesh._core cimport debug
from fastmesh._core.engine cimport (
    Engine, Transport, Server, TS_CONNECTING, TS_OPEN, TS_CLOSING, TS_DEAD, WQ_MAX_IOV)

log = logging.getLogger("fastmesh.engine")


cdef extern from *:
    """
    #include <sys/socket.h>
    static inline int fm_so_error(int fd)
    {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            return errno;
        return err;
    }
    """
    int _so_error "fm_so_error"(int fd)


cdef extern from *:
    """
    #include <errno.h>
    #include <poll.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/eventfd.h>
    #include <sys/socket.h>
    #include <liburing.h>

    #define FM_BGID 1

    struct fm_ring {
        struct io_uring ring;
        struct io_uring_buf_ring *br;
        char *bufs;
        unsigned nbufs, buf_bytes;
        int efd;
        unsigned mode;                  /* 0 deferred task work, 1 cooperative, 2 plain */
    };

    typedef struct {                    /* a sendmsg's header and pieces, per transport */
        struct msghdr m;
        struct iovec iov[64];
    } fm_msg;

    static void fm_ring_free(struct fm_ring *r)
    {
        if (!r)
            return;
        if (r->ring.ring_fd >= 0)
            io_uring_queue_exit(&r->ring);
        if (r->efd >= 0)
            close(r->efd);
        free(r->br);
        free(r->bufs);
        free(r);
    }

    /* 0 or -errno; *out set on success */
    static int fm_ring_open(struct fm_ring **out, unsigned entries, unsigned cq_entries,
                            unsigned nbufs, unsigned buf_bytes)
    {
        struct io_uring_params p;
        struct io_uring_buf_reg reg;
        struct fm_ring *r = calloc(1, sizeof(*r));
        unsigned i;
        int rc;
        if (!r)
            return -ENOMEM;
        r->ring.ring_fd = -1;
        r->efd = -1;
        r->nbufs = nbufs;
        r->buf_bytes = buf_bytes;
        /* How completions reach us. Plain (2): task work forced on the worker by an IPI
           from the CPU the packets arrived on; perf: 13% of the worker's time in
           irqentry_exit_to_user_mode and 9% in a spin lock's slow path, 25 CPU µs per
           http1-small request. Cooperative (1, the default): the work runs at the worker's
           next kernel entry, no IPI (a sleeping worker is still woken): ~10 µs. Deferred
           (0, FASTMESH_URING_MODE=0): the work runs only when we ask, in batches: 12-15 µs
           here (its zero-timeout waits cost), kept to compare. Each falls back to the next
           on a kernel that refuses it (EINVAL). */
        static const unsigned modes[] = {
            IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
                IORING_SETUP_TASKRUN_FLAG,
            IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
            IORING_SETUP_CQSIZE,
        };
        const char *env = getenv("FASTMESH_URING_MODE");     /* tests: force a mode */
        unsigned m = env && env[0] >= '0' && env[0] <= '2' ? (unsigned)(env[0] - '0') : 1;
        rc = -EINVAL;
        for (; m < 3 && rc == -EINVAL; m++) {
            memset(&p, 0, sizeof(p));
            p.flags = modes[m];
            p.cq_entries = cq_entries;
            rc = io_uring_queue_init_params(entries, &r->ring, &p);
            if (rc == 0)
                r->mode = m;
        }
        if (rc < 0) {
            r->ring.ring_fd = -1;
            fm_ring_free(r);
            return rc;
        }
        if (posix_memalign((void **)&r->br, 4096, nbufs * sizeof(struct io_uring_buf)) ||
            posix_memalign((void **)&r->bufs, 4096, (size_t)nbufs * buf_bytes)) {
            fm_ring_free(r);
            return -ENOMEM;
        }
        memset(&reg, 0, sizeof(reg));
        reg.ring_addr = (unsigned long)r->br;
        reg.ring_entries = nbufs;
        reg.bgid = FM_BGID;
        rc = io_uring_register_buf_ring(&r->ring, &reg, 0);
        if (rc < 0) {
            fm_ring_free(r);
            return rc;
        }
        io_uring_buf_ring_init(r->br);
        for (i = 0; i < nbufs; i++)
            io_uring_buf_ring_add(r->br, r->bufs + (size_t)i * buf_bytes, buf_bytes,
                                  (unsigned short)i, io_uring_buf_ring_mask(nbufs), (int)i);
        io_uring_buf_ring_advance(r->br, (int)nbufs);
        r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (r->efd < 0) {
            rc = -errno;
            fm_ring_free(r);
            return rc;
        }
        rc = io_uring_register_eventfd(&r->ring, r->efd);
        if (rc < 0) {
            fm_ring_free(r);
            return rc;
        }
        *out = r;
        return 0;
    }

    static inline struct io_uring_sqe *fm_sqe(struct fm_ring *r)
    {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
        if (!sqe) {                     /* the submission queue is full: hand it over first */
            io_uring_submit(&r->ring);
            sqe = io_uring_get_sqe(&r->ring);
        }
        return sqe;
    }

    static inline int fm_arm_accept(struct fm_ring *r, int fd, unsigned long long ud)
    {
        struct io_uring_sqe *sqe = fm_sqe(r);
        if (!sqe)
            return -EBUSY;
        io_uring_prep_multishot_accept(sqe, fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        io_uring_sqe_set_data64(sqe, ud);
        return 0;
    }

    static inline int fm_arm_recv(struct fm_ring *r, int fd, unsigned long long ud)
    {
        struct io_uring_sqe *sqe = fm_sqe(r);
        if (!sqe)
            return -EBUSY;
        io_uring_prep_recv_multishot(sqe, fd, NULL, 0, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = FM_BGID;
        io_uring_sqe_set_data64(sqe, ud);
        return 0;
    }

    static inline int fm_send(struct fm_ring *r, int fd, fm_msg *msg, int cnt,
                              unsigned long long ud)
    {
        struct io_uring_sqe *sqe = fm_sqe(r);
        if (!sqe)
            return -EBUSY;
        if (cnt == 1) {
            io_uring_prep_send(sqe, fd, msg->iov[0].iov_base, msg->iov[0].iov_len,
                               MSG_NOSIGNAL);
        } else {
            memset(&msg->m, 0, sizeof(msg->m));
            msg->m.msg_iov = msg->iov;
            msg->m.msg_iovlen = (size_t)cnt;
            io_uring_prep_sendmsg(sqe, fd, &msg->m, MSG_NOSIGNAL);
        }
        io_uring_sqe_set_data64(sqe, ud);
        return 0;
    }

    static inline int fm_poll_out(struct fm_ring *r, int fd, unsigned long long ud)
    {
        struct io_uring_sqe *sqe = fm_sqe(r);
        if (!sqe)
            return -EBUSY;
        io_uring_prep_poll_add(sqe, fd, POLLOUT);
        io_uring_sqe_set_data64(sqe, ud);
        return 0;
    }

    static inline int fm_cancel(struct fm_ring *r, unsigned long long target,
                                unsigned long long ud)
    {
        struct io_uring_sqe *sqe = fm_sqe(r);
        if (!sqe)
            return -EBUSY;
        io_uring_prep_cancel64(sqe, target, 0);
        io_uring_sqe_set_data64(sqe, ud);
        return 0;
    }

    static inline const char *fm_buf(struct fm_ring *r, unsigned bid)
    {
        return r->bufs + (size_t)bid * r->buf_bytes;
    }

    static inline void fm_give_back(struct fm_ring *r, unsigned bid)
    {
        io_uring_buf_ring_add(r->br, r->bufs + (size_t)bid * r->buf_bytes, r->buf_bytes,
                              (unsigned short)bid, io_uring_buf_ring_mask(r->nbufs), 0);
        io_uring_buf_ring_advance(r->br, 1);
    }

    static inline int fm_pending_sqes(struct fm_ring *r)
    {
        return io_uring_sq_ready(&r->ring) > 0;
    }

    static inline int fm_submit(struct fm_ring *r)
    {
        return io_uring_submit(&r->ring);
    }

    /* submit what is queued and post the completions waiting as task work (one
       io_uring_enter; none when there is nothing to submit and no work is pending) */
    #define FM_TW_BUDGET 4096
    static inline int fm_enter(struct fm_ring *r)
    {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec zero = {0, 0};
        if (r->mode == 0) {
            /* Deferred task work: ask for many completions with a zero timeout. A plain
               GETEVENTS enter runs at most 20 items of task work (IO_LOCAL_TW_DEFAULT_MAX)
               and may leave the rest pending with no flag and no eventfd signal (work added
               to a non-empty list signals nothing): the worker would never wake again.
               Asking for FM_TW_BUDGET completions runs the pending work until that many
               completions exist or none is left; the zero timeout returns at once. */
            int rc = io_uring_submit_and_wait_timeout(&r->ring, &cqe, FM_TW_BUDGET, &zero,
                                                      NULL);
            return rc == -ETIME ? 0 : rc;
        }
        if (r->mode == 2 || !(IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_TASKRUN))
            return io_uring_sq_ready(&r->ring) ? io_uring_submit(&r->ring) : 0;
        return io_uring_submit_and_get_events(&r->ring);
    }

    /* completions ready, or work the kernel holds for us to run */
    static inline int fm_work_pending(struct fm_ring *r)
    {
        return io_uring_cq_ready(&r->ring) ||
            (r->mode != 2 && (IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_TASKRUN));
    }

    static inline unsigned fm_mode(struct fm_ring *r) { return r->mode; }

    /* copy out up to n completions (user_data, res, flags) and mark them seen */
    static unsigned fm_take(struct fm_ring *r, unsigned long long *ud, int *res,
                            unsigned *flags, unsigned n)
    {
        struct io_uring_cqe *cqe;
        unsigned head, i = 0;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            if (i == n)
                break;
            ud[i] = cqe->user_data;
            res[i] = cqe->res;
            flags[i] = cqe->flags;
            i++;
        }
        io_uring_cq_advance(&r->ring, i);
        return i;
    }

    static inline unsigned fm_ready(struct fm_ring *r)
    {
        return io_uring_cq_ready(&r->ring);
    }

    static inline void fm_eventfd_on(struct fm_ring *r, int on)
    {
        io_uring_cq_eventfd_toggle(&r->ring, on ? true : false);
    }

    static inline struct iovec *fm_msg_iov(fm_msg *m) { return m->iov; }
    static inline int fm_efd(struct fm_ring *r) { return r->efd; }
    static inline int fm_ring_fd(struct fm_ring *r) { return r->ring.ring_fd; }
    """
    ctypedef struct fm_msg:
        pass
    int fm_ring_open(fm_ring **out, unsigned entries, unsigned cq_entries, unsigned nbufs,
                     unsigned buf_bytes)
    void fm_ring_free(fm_ring *r)
    int fm_arm_accept(fm_ring *r, int fd, unsigned long long ud)
    int fm_arm_recv(fm_ring *r, int fd, unsigned long long ud)
    int fm_send(fm_ring *r, int fd, fm_msg *msg, int cnt, unsigned long long ud)
    int fm_poll_out(fm_ring *r, int fd, unsigned long long ud)
    int fm_cancel(fm_ring *r, unsigned long long target, unsigned long long ud)
    const char *fm_buf(fm_ring *r, unsigned bid)
    void fm_give_back(fm_ring *r, unsigned bid)
    int fm_pending_sqes(fm_ring *r)
    int fm_submit(fm_ring *r)
    int fm_enter(fm_ring *r)
    int fm_work_pending(fm_ring *r)
    unsigned fm_mode(fm_ring *r)
    unsigned fm_take(fm_ring *r, unsigned long long *ud, int *res, unsigned *flags, unsigned n)
    unsigned fm_ready(fm_ring *r)
    void fm_eventfd_on(fm_ring *r, int on)
    int fm_efd(fm_ring *r)
    void *fm_msg_iov(fm_msg *m)
    int fm_ring_fd(fm_ring *r)
    enum:
        IORING_CQE_F_MORE
        IORING_CQE_F_BUFFER
        IORING_CQE_BUFFER_SHIFT

cdef extern from "<sys/socket.h>":
    struct linger:
        int l_onoff
        int l_linger
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    enum:
        SHUT_WR
        SOL_SOCKET
        SO_LINGER

cdef extern from "<netinet/in.h>":
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>":
    enum:
        TCP_NODELAY

cdef extern from "<stdlib.h>":
    void *calloc(size_t n, size_t size)
    void free(void *p)

cdef extern from "<sys/uio.h>":
    struct iovec:
        void *iov_base
        size_t iov_len


cdef inline unsigned long long ud_of(int slot, int op) noexcept:
    return (<unsigned long long>slot << 3) | <unsigned long long>op


def probe(unsigned int ring_buffers=8, unsigned int ring_buffer_bytes=4096):
    """None if this process can run the engine (a ring with a provided buffer ring and an
    eventfd could be made), else why not (an OSError's text)."""
    cdef fm_ring *r = NULL
    cdef int rc = fm_ring_open(&r, 8, 16, ring_buffers, ring_buffer_bytes)
    if rc < 0:
        return f"io_uring_setup: {os.strerror(-rc)} (errno {-rc})"
    fm_ring_free(r)
    return None


cdef class UringEngine(Engine):
    def __init__(self, loop, unsigned int ring_buffers=512,
                 unsigned int ring_buffer_bytes=16384):
        cdef int rc
        Engine.__init__(self, loop, "io_uring")
        if ring_buffers == 0 or ring_buffers & (ring_buffers - 1) or ring_buffers > 32768:
            raise ValueError("ring_buffers: a power of two up to 32768")
        if ring_buffer_bytes < 512:
            raise ValueError("ring_buffer_bytes: at least 512")
        rc = fm_ring_open(&self.r, URING_ENTRIES, URING_CQ_ENTRIES, ring_buffers,
                          ring_buffer_bytes)
        if rc < 0:
            raise OSError(-rc, "io_uring: " + os.strerror(-rc))
        self.ring_buffers = ring_buffers
        self.ring_buffer_bytes = ring_buffer_bytes
        self.efd = fm_efd(self.r)
        # multishot receives drain a socket as fast as buffers allow: until a pause's cancel
        # lands, a paused connection may be handed the whole ring's worth (twice, as a
        # margin); past that something is wrong and the connection is cut
        self.stash_max_bytes = 2 * <Py_ssize_t>ring_buffers * ring_buffer_bytes
        self.send_list = []
        self.rearm_list = []
        self.accept_rearm = []
        loop.add_reader(self.efd, self._on_wake)
        # a backstop: should completions ever wait in the kernel with no eventfd signal
        # (deferred task work can: see fm_enter), a look every 100 ms finds them and counts
        # it (engine.tick_finds); the worker would stall 100 ms at most, never for good
        self.tick_handle = loop.call_later(0.1, self._tick)

    def __dealloc__(self):
        if self.r != NULL:
            fm_ring_free(self.r)
            self.r = NULL

    def close(self):
        """Abort every connection, stop every server, free the ring."""
        if self.closed:
            return
        for owner in list(self.slots):
            if isinstance(owner, Transport):
                (<Transport>owner).finish(None, True)
            elif isinstance(owner, Server):
                owner.close()
        self.closed = True
        if self.tick_handle is not None:
            self.tick_handle.cancel()
            self.tick_handle = None
        try:
            self.loop.remove_reader(self.efd)
        except Exception:
            pass
        for owner in list(self.slots):
            if isinstance(owner, Transport) and (<Transport>owner).fd >= 0:
                c_close((<Transport>owner).fd)
                (<Transport>owner).fd = -1
        fm_ring_free(self.r)            # cancels what is in flight
        self.r = NULL
        self.slots = []

    @property
    def mode(self) -> str:
        """How completions reach us: "defer_taskrun", "coop_taskrun" or "plain"."""
        return ("defer_taskrun", "coop_taskrun", "plain")[fm_mode(self.r)] \
            if self.r != NULL else "closed"

    def counters(self) -> dict:
        d = Engine.counters(self)
        d.update({"engine.enobufs": self.enobufs, "engine.submits": self.submits,
                  "engine.ticks": self.ticks, "engine.tick_finds": self.tick_finds,
                  "engine.partial_sends": self.partial_sends})
        return d

    # -------------------------------------------------------------- servers

    def serve(self, sock, factory):
        """Accept on a listening socket (the engine's from now on) for `factory`."""
        cdef Server s = Server(self, sock, factory)
        sock.setblocking(False)
        s.slot = self.take_slot(s)
        s.active = True
        self.accept_rearm.append(s)
        self.schedule()
        return s

    def stop_server(self, Server s):
        if s.armed:
            self.cancel(s.slot, OP_ACCEPT)      # its last completion frees the slot
            self.schedule()
        else:
            self.free_slot(s.slot)
            s.slot = -1
            s.close_socket()

    cdef int on_accept(self, Server s, int res, unsigned int flags) except -1:
        cdef int one = 1
        if not flags & IORING_CQE_F_MORE:
            s.armed = False
            if not s.active:
                self.free_slot(s.slot)
                s.slot = -1
                s.close_socket()
            elif res == -EMFILE or res == -ENFILE:
                log.error("engine: accept on fd %d failed: %s; again in 100 ms", s.fd,
                          os.strerror(-res))
                self.loop.call_later(0.1, self._rearm_accept, s)
            else:
                self.accept_rearm.append(s)
        if res < 0:
            return 0
        # (taken before a stop_server's cancel landed: served like any other, as uvloop
        # serves what it accepted before its server closed)
        setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        s.accepted += 1
        self.adopt(s.factory, res, s)
        return 0

    def _rearm_accept(self, Server s):
        if s.active and not s.armed and not self.closed:
            self.accept_rearm.append(s)
            self.schedule()

    # -------------------------------------------------------------- transports

    cdef int ensure_slot(self, Transport t) except -1:
        if t.slot < 0:
            t.slot = self.take_slot(t)
        return 0

    cdef int want_write(self, Transport t) except -1:
        if not t.send_in_flight and not t.queued_send:
            t.queued_send = True
            self.send_list.append(t)
            self.schedule()
        return 0

    cdef int want_read(self, Transport t, bint on) except -1:
        self.ensure_slot(t)
        if on:
            if not t.queued_resume:
                t.queued_resume = True
                self.rearm_list.append(t)
                self.schedule()
        elif t.recv_armed and not t.cancel_sent:
            t.cancel_sent = True
            self.cancel(t.slot, OP_RECV)
            self.schedule()
        return 0

    cdef int shut_write(self, Transport t) except -1:
        shutdown(t.fd, SHUT_WR)
        return 0

    cdef int start_connect(self, Transport t) except -1:
        cdef int rc
        self.ensure_slot(t)
        rc = fm_poll_out(self.r, t.fd, ud_of(t.slot, OP_POLL))
        if rc < 0:
            t.connected(-rc)
            return 0
        t.inflight += 1
        debug.count_alloc(debug.LEAK_URING_OP)
        self.schedule()
        return 0

    cdef int release(self, Transport t, bint abort) except -1:
        # abort(): what is queued here is dropped and the socket closed, as asyncio's
        # transports do (no forced RST; see engine_epoll)
        if t.inflight == 0:
            self.close_now(t)
            return 0
        # operations still name it: cancel them; the last completion closes it
        if t.recv_armed and not t.cancel_sent:
            t.cancel_sent = True
            self.cancel(t.slot, OP_RECV)
        if t.send_in_flight:
            self.cancel(t.slot, OP_SEND)
        self.cancel(t.slot, OP_POLL)
        self.schedule()
        return 0

    cdef int close_now(self, Transport t) except -1:
        t.wq = []
        t.wq_off = 0
        if t.fd >= 0:
            c_close(t.fd)
            t.fd = -1
        if t.slot >= 0:
            self.free_slot(t.slot)
            t.slot = -1
        if t.iov_mem != NULL:
            free(t.iov_mem)
            t.iov_mem = NULL
        return 0

    cdef int op_done(self, Transport t) except -1:
        t.inflight -= 1
        debug.count_free(debug.LEAK_URING_OP)
        if t.inflight == 0 and t.state == TS_DEAD:
            self.close_now(t)
        return 0

    cdef int cancel(self, int slot, int op) except -1:
        fm_cancel(self.r, ud_of(slot, op), OP_CANCEL)
        return 0

    cdef int schedule(self) except -1:
        # submissions made outside a wake go out from one call_soon
        if not self.in_wake and not self.flush_scheduled and not self.closed:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_soon)
        return 0

    def _flush_soon(self):
        self.flush_scheduled = False
        if self.closed:
            return
        try:
            self.in_wake = True
            self.prep_rearms()
            self.prep_sends()
            self.submit()
        finally:
            self.in_wake = False

    cdef int prep_sends(self) except -1:
        cdef Transport t
        cdef int cnt, rc
        cdef list todo
        while self.send_list:
            todo, self.send_list = self.send_list, []
            for t in todo:
                t.queued_send = False
                if t.send_in_flight or t.wq_bytes <= 0 or t.fd < 0 or t.state == TS_DEAD:
                    continue
                self.ensure_slot(t)
                if t.iov_mem == NULL:
                    t.iov_mem = calloc(1, sizeof(fm_msg))
                    if t.iov_mem == NULL:
                        t.fatal(MemoryError())
                        continue
                cnt = t.fill_iov(fm_msg_iov(<fm_msg *>t.iov_mem), WQ_MAX_IOV)
                rc = fm_send(self.r, t.fd, <fm_msg *>t.iov_mem, cnt, ud_of(t.slot, OP_SEND))
                if rc < 0:
                    t.fatal(OSError(-rc, os.strerror(-rc)))
                    continue
                t.send_in_flight = True
                t.inflight += 1
                debug.count_alloc(debug.LEAK_URING_OP)
        return 0

    cdef int prep_rearms(self) except -1:
        cdef Transport t
        cdef Server s
        cdef list todo
        cdef int rc
        if self.accept_rearm:
            todo, self.accept_rearm = self.accept_rearm, []
            for s in todo:
                if s.active and not s.armed and s.slot >= 0:
                    if fm_arm_accept(self.r, s.fd, ud_of(s.slot, OP_ACCEPT)) == 0:
                        s.armed = True
        while self.rearm_list:
            todo, self.rearm_list = self.rearm_list, []
            for t in todo:
                t.queued_resume = False
                if t.state != TS_OPEN or not t.reading:
                    continue
                if t.stash is not None:
                    t.deliver_stash()       # what came while paused goes first
                    if t.state != TS_OPEN or not t.reading:
                        continue
                if t.eof_pending:
                    if t.stash is None:     # (every byte before it delivered: now the EOF)
                        t.eof_pending = False
                        t.on_eof()
                    continue
                if t.recv_armed or t.eof_in:
                    continue            # (a cancel in flight: its completion re-arms)
                rc = fm_arm_recv(self.r, t.fd, ud_of(t.slot, OP_RECV))
                if rc < 0:
                    t.fatal(OSError(-rc, os.strerror(-rc)))
                    continue
                t.recv_armed = True
                t.cancel_sent = False
                t.inflight += 1
                debug.count_alloc(debug.LEAK_URING_OP)
        return 0

    cdef int submit(self) except -1:
        cdef int rc
        if fm_pending_sqes(self.r):
            rc = fm_submit(self.r)
            self.submits += 1
            if rc < 0 and rc != -EINTR and rc != -EAGAIN:
                log.error("engine: io_uring_enter: %s", os.strerror(-rc))
        return 0

    # -------------------------------------------------------------- completions

    cdef int handle(self, uint64_t ud, int res, unsigned int flags) except -1:
        cdef int op = <int>(ud & 7)
        cdef Py_ssize_t slot = <Py_ssize_t>(ud >> 3)
        cdef object owner
        if op == OP_CANCEL or slot >= len(self.slots):
            return 0
        owner = self.slots[slot]
        if owner is None:
            if op == OP_RECV and flags & IORING_CQE_F_BUFFER:
                fm_give_back(self.r, flags >> IORING_CQE_BUFFER_SHIFT)
            return 0
        if op == OP_ACCEPT:
            return self.on_accept(<Server>owner, res, flags)
        if op == OP_RECV:
            return self.on_recv(<Transport>owner, res, flags)
        if op == OP_SEND:
            return self.on_send(<Transport>owner, res)
        if op == OP_POLL:
            return self.on_poll(<Transport>owner, res)
        return 0

    cdef int on_recv(self, Transport t, int res, unsigned int flags) except -1:
        cdef unsigned int bid
        cdef const char *data
        cdef Py_ssize_t took
        if flags & IORING_CQE_F_BUFFER:
            bid = flags >> IORING_CQE_BUFFER_SHIFT
            if res > 0 and t.state == TS_OPEN:
                data = fm_buf(self.r, bid)
                if t.reading and t.stash is None:
                    took = t.deliver(data, res)
                else:
                    took = 0
                if took < res and t.state == TS_OPEN:
                    t.stash_bytes(data + took, res - took)      # paused: keep, in order
            fm_give_back(self.r, bid)
        if flags & IORING_CQE_F_MORE:
            return 0
        # this receive is over
        t.recv_armed = False
        t.cancel_sent = False
        if t.state == TS_DEAD:
            self.op_done(t)
            return 0
        self.op_done(t)
        if res == 0:
            if t.reading and t.stash is None:
                t.on_eof()
            else:
                # paused (or bytes before it still stashed): as a paused asyncio transport
                # reads nothing, the EOF waits behind them until reading resumes
                t.eof_pending = True
                if t.reading:
                    self.want_read(t, True)     # (the stash's delivery: then the EOF)
        elif res == -ENOBUFS:
            self.enobufs += 1           # out of buffers: again once this batch gave them back
            if t.reading:
                self.want_read(t, True)
        elif res > 0 or res == -ECANCELED:
            if t.reading:
                self.want_read(t, True)
        else:
            t.fatal(OSError(-res, os.strerror(-res)))
        return 0

    cdef int on_send(self, Transport t, int res) except -1:
        t.send_in_flight = False
        if t.state == TS_DEAD:
            self.op_done(t)
            return 0
        self.op_done(t)
        if res < 0:
            if res == -EINTR or res == -EAGAIN:
                self.want_write(t)
            else:
                t.fatal(OSError(-res, os.strerror(-res)))
            return 0
        t.sent(res)
        if t.wq_bytes > 0 and t.state != TS_DEAD:
            self.partial_sends += 1 if res > 0 else 0
            self.want_write(t)
        return 0

    cdef int on_poll(self, Transport t, int res) except -1:
        self.op_done(t)
        if t.state != TS_CONNECTING:
            return 0
        if res < 0:
            t.connected(-res)
            return 0
        t.connected(_so_error(t.fd))
        return 0

    cdef int drain(self) except -1:
        cdef unsigned long long uds[URING_BATCH]
        cdef int res[URING_BATCH]
        cdef unsigned int flags[URING_BATCH]
        cdef unsigned int n, i
        # One bounded batch: a receive refills the buffers given back while we work, so
        # "until the queue is empty" might never end, and a pause's cancel would wait
        n = fm_take(self.r, uds, res, flags, URING_BATCH)
        for i in range(n):
            try:
                self.handle(uds[i], res[i], flags[i])
            except BaseException:
                log.exception("engine: internal error on a completion")
        self.events += n
        return n

    def _on_wake(self):
        cdef char tmp[8]
        if self.closed:
            return
        c_read(self.efd, tmp, 8)
        self.wakes += 1
        self.run()

    def _tick(self):
        if self.closed:
            return
        cdef uint64_t before = self.events
        cdef char tmp[8]
        cdef bint announced
        if not self.in_wake:
            self.ticks += 1
            # completions the eventfd announced (or a batch cut short and continued by
            # call_soon) are uvloop's to report; count only others (a lost wake-up the
            # backstop saved). Cooperative task work waits
            # for a kernel entry, which the first read is: its completions signal the
            # eventfd on the way out, and the second read sees that.
            announced = self.flush_scheduled or c_read(self.efd, tmp, 8) == 8
            if not announced:
                announced = c_read(self.efd, tmp, 8) == 8
            self.run()
            if self.events != before and not announced:
                self.tick_finds += 1
        self.tick_handle = self.loop.call_later(0.1, self._tick)

    def _again(self):
        self.flush_scheduled = False
        if not self.closed:
            self.run()

    def run(self):
        # One batch: the completions the kernel holds posted and handled, then what they
        # asked for submitted with the next look for completions (one io_uring_enter per
        # round); again while rounds find completions (sends often complete at submit).
        cdef int rounds, n, rc
        cdef uint64_t handled = 0
        self.in_wake = True
        fm_eventfd_on(self.r, 0)        # our own submissions' completions: no extra wake
        try:
            n = 1
            for rounds in range(URING_ROUNDS):
                # deferred task work: enter again while rounds find completions (work may
                # wait in the kernel without a flag saying so)
                if fm_work_pending(self.r) or fm_pending_sqes(self.r) or \
                        (n > 0 and fm_mode(self.r) == 0):
                    rc = fm_enter(self.r)
                    self.submits += 1
                    if rc < 0 and rc != -EINTR and rc != -EAGAIN and rc != -EBUSY:
                        log.error("engine: io_uring_enter: %s", os.strerror(-rc))
                n = self.drain()
                handled += n
                self.prep_rearms()
                self.prep_sends()
                if n == 0 and not fm_pending_sqes(self.r) and not fm_work_pending(self.r):
                    break
        finally:
            fm_eventfd_on(self.r, 1)
            self.in_wake = False
        # work that came while the eventfd was off (its signal suppressed): next turn
        if fm_work_pending(self.r) or self.send_list or self.rearm_list or \
                self.accept_rearm or fm_pending_sqes(self.r):
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self._again)
        if handled > self.batched_max:
            self.batched_max = handled


def leaks() -> dict:
    """Debug builds: io_uring operations in flight."""
    return {"debug_build": bool(debug.FASTMESH_DEBUG), "uring_ops": debug.leaks[5]}
