"""SOFARPC Bolt proxying with multiplexed upstreams.

    client conn (BoltDownstream)                     upstream conn (BoltUpstream), shared
    ───────────────────────────                      ─────────────────────────────────────
    frames peeked in the receive buffer  ──route──►  fresh upstream id patched in place,
    heartbeats answered here                         frame queued; one write per batch
    responses get the client's id back  ◄──────────  responses matched by id in `inflight`

Every downstream connection routes each request on its own (load balancing per request);
all of them share a few upstream connections per endpoint (`connections_per_endpoint`).
Errors the proxy makes are Bolt responses with the client's id: no route 6, busy 4,
timeout 7, upstream connection lost 0x10. Oneway requests are forwarded, never answered.
"""
import asyncio
import logging
import os

from fastmesh.ratelog import RateLimitedLog

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint32_t

cimport cython

from fastmesh._core cimport debug
from fastmesh._core.filters cimport TokenBucket
from fastmesh._core.retry cimport RetryPolicy
from fastmesh._core.bolt import py_frame_set_id
from fastmesh._core.bolt cimport (
    FrameInfo, frame_peek, frame_set_id, bolt_error_reason, header_find, frame_headers_offset,
    header_lookup,
    encode_error_response, encode_heartbeat, encode_heartbeat_ack,
    BOLT_TYPE_RESPONSE, BOLT_TYPE_REQUEST, BOLT_TYPE_ONEWAY, BOLT_CMD_HEARTBEAT,
    BOLT_CMD_REQUEST, BOLT_CMD_RESPONSE, BOLT_STATUS_SUCCESS,
    BOLT_STATUS_SERVER_THREADPOOL_BUSY, BOLT_STATUS_NO_PROCESSOR, BOLT_STATUS_TIMEOUT,
    BOLT_STATUS_CONNECTION_CLOSED,
)
from fastmesh._core.accesslog cimport AccessLog, Exchange
from fastmesh._core.buffer cimport Receiver, RecvBuffer
from fastmesh._core.clock cimport now_ms, now_us
from fastmesh._core.context cimport ListenerCtx
from fastmesh._core.sockio cimport unread_bytes, redirected_dst
from fastmesh._core.router cimport RouteTable, VirtualHost, Route, HeaderMatcher, A_DIRECT
from fastmesh._core.stats cimport (
    Counters, LS_CX_TOTAL, LS_CX_ACTIVE, LS_RQ_TOTAL, LS_RQ_ACTIVE, LS_RSP_2XX, LS_RSP_5XX,
    LS_ERR_NO_ROUTE, LS_ERR_NO_HEALTHY_UPSTREAM, LS_ERR_UPSTREAM_TIMEOUT,
    LS_ERR_UPSTREAM_RESET, LS_ERR_BUSY, LS_ERR_BAD_FRAME, LS_HEARTBEATS, LS_RX_BYTES,
    LS_ERR_OVERFLOW, CS_RQ_ACTIVE_OVERFLOW, LS_RL_LIMITED, CS_RQ_RETRY, CS_RQ_RETRY_OVERFLOW,
    LS_CX_IDLE_CLOSED,
    CS_RQ_TOTAL, CS_RQ_ACTIVE, CS_RQ_TIMEOUT, CS_RSP_2XX, CS_RSP_5XX, CS_CX_TOTAL,
    CS_CX_ACTIVE, CS_CX_CONNECT_FAIL, CS_BOLT_STATUS_OTHER, CS_HEARTBEAT_SENT,
    CS_HEARTBEAT_MISSED,
)
from fastmesh._core.upstream cimport Cluster, Endpoint, endpoint_latency_us
from fastmesh._core.upstream import open_connection
from fastmesh._core.engine import detach_transport

from fastmesh._core.stats import Counters as PyCounters
from fastmesh._core.accesslog import sofa_method_name

log = logging.getLogger("fastmesh.bolt")
rlog = RateLimitedLog(log)          # for warnings a peer can repeat at line rate

cdef enum UpState:
    UP_CONNECTING = 0
    UP_READY = 1
    UP_CLOSED = 2

cdef int64_t _last_upstream_sweep_ms = 0
cdef set _live_upstreams = set()        # every BoltUpstream not yet closed (for sweeps)


@cython.freelist(4096)
cdef class InFlight:
    """One forwarded request waiting for its response."""
    cdef:
        BoltDownstream ds
        uint32_t client_id          # the id the client chose; restored on the response
        int64_t deadline_ms         # 0 = none
        int64_t start_us            # when the request was forwarded (latency histograms)
        bytes service, method       # only with an access log: its fields
        int64_t rq_bytes, rsp_bytes # ... and the frames' sizes (BYTES_RECEIVED / _SENT)
        unsigned char proto, ver1, codec
        # only when its route retries: what another try needs
        RetryPolicy retry
        bytes frame                 # the request as first forwarded
        Cluster cluster
        Endpoint ep                 # of the try in flight
        int attempts
        int64_t timeout_ms


cdef bint _retry_call(InFlight e, int status):
    # A try of a call on a retrying route ended with `status` (0x10 when its connection was
    # lost, 7 when it timed out): send it again, to another endpoint when one is offered,
    # if the policy retries that. The failed try's counters were already taken back.
    cdef RetryPolicy rp = e.retry
    cdef Cluster cl = e.cluster
    cdef Endpoint ep
    cdef BoltUpstream up
    cdef uint32_t new_id
    cdef int n
    if e.attempts > rp.num_retries or e.ds.closed:
        return False
    if status == BOLT_STATUS_CONNECTION_CLOSED:
        if not rp.retries_no_response(True):
            return False
    elif status not in rp.bolt_statuses:
        return False
    if cl.retries_active >= cl.max_retries:
        cl.counters.v[CS_RQ_RETRY_OVERFLOW] += 1
        return False
    ep = cl.pick_original(e.ep.address) if cl.original_dst else cl.pick()
    n = rp.host_selection_attempts
    while rp.previous_hosts and ep is e.ep and n > 0 and not cl.original_dst:
        ep = cl.pick()
        n -= 1
    if ep is None:
        return False
    up = _mux_for(e.ds.ctx, cl, ep, e.ds.affinity)
    new_id = up.next_id()
    frame = bytearray(e.frame)
    py_frame_set_id(frame, new_id)
    e.attempts += 1
    e.ep = ep
    e.deadline_ms = now_ms() + e.timeout_ms if e.timeout_ms > 0 else 0
    up.inflight[new_id] = e
    cl.counters.v[CS_RQ_RETRY] += 1
    cl.counters.v[CS_RQ_TOTAL] += 1
    cl.counters.v[CS_RQ_ACTIVE] += 1
    ep.active_requests += 1
    ep.rq_total += 1
    up.out.append(bytes(frame))
    up.flush()                              # (a connection still being made sends on connect)
    return True


# Upstream writes wait for the end of the loop's current batch of events: the requests of
# every client read in one batch that go to one upstream connection leave in one write
# (many callers, one service: one send instead of one per caller). call_soon runs after the
# batch's I/O callbacks and before the loop polls again, so nothing waits for a timer.
cdef list _flush_queue = []
cdef bint _flush_scheduled = False
cdef object _flush_loop = None         # the loop the flush is scheduled on


cdef void _flush_later(object loop, list dirty) except *:
    global _flush_queue, _flush_scheduled, _flush_loop
    if loop is not _flush_loop:         # a new loop in this process (tests): what was queued
        _flush_queue = []               # for the old one can never be sent
        _flush_scheduled = False
        _flush_loop = loop
    _flush_queue.extend(dirty)
    if not _flush_scheduled:
        _flush_scheduled = True
        loop.call_soon(_flush_queued)


def _flush_queued():
    global _flush_queue, _flush_scheduled
    cdef BoltUpstream up
    cdef list q = _flush_queue
    _flush_queue = []
    _flush_scheduled = False
    for up in q:
        up.flush()


cdef inline void flush(object transport, list out):
    if len(out) == 1:
        transport.write(out[0])
    else:
        transport.writelines(out)
    out.clear()


# ===================================================================== downstream

cdef class BoltDownstream(Receiver):
    cdef:
        ListenerCtx ctx
        object transport
        list out                    # frames for the client, written once per batch
        readonly int inflight       # requests forwarded, not yet answered
        bint closed
        bint reading_paused
        bint held                   # reading paused for a congested upstream
        int64_t last_rx_ms
        unsigned int affinity       # picks the same mux connection index per client
        tuple dst                   # (host, port) the client addressed (ORIGINAL_DST)
        bytes client_ip             # only with an access log
        int client_port

    def __init__(self, ListenerCtx ctx):
        self.ctx = ctx
        self.rbuf = RecvBuffer(16384, ctx.max_frame_bytes + 65536)
        self.out = []
        debug.count_alloc(debug.LEAK_DOWNSTREAM)

    def __dealloc__(self):
        debug.count_free(debug.LEAK_DOWNSTREAM)

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(self.ctx.high_water_bytes, self.ctx.low_water_bytes)
        self.ctx.conns.add(self)
        self.ctx.counters.v[LS_CX_TOTAL] += 1
        self.ctx.counters.v[LS_CX_ACTIVE] += 1
        self.affinity = <unsigned int>((id(self) >> 4) & 0xFFFFFFFF)
        self.last_rx_ms = now_ms()
        if self.ctx.access_log is not None:
            peer = transport.get_extra_info("peername")
            self.client_ip = (peer[0] if peer else "unknown").encode()
            self.client_port = peer[1] if peer else 0

    def set_original_dst(self, str host, int port):
        self.dst = (host, port)

    cdef int received(self, Py_ssize_t nbytes) except -1:
        cdef list dirty = []
        cdef BoltUpstream up
        self.rbuf.advance(nbytes)
        self.ctx.counters.v[LS_RX_BYTES] += nbytes
        self.last_rx_ms = now_ms()
        try:
            self._process(dirty)
        except BaseException:
            log.exception("listener %s: internal error on a Bolt connection", self.ctx.name)
            self.transport.abort()
        if dirty:
            _flush_later(self.ctx.loop, dirty)
        if self.out and not self.closed:
            flush(self.transport, self.out)
        if self.rbuf.is_full() and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        return 0

    cdef _process(self, list dirty):
        # Frames are handled where they lie. Consecutive requests bound for the same upstream
        # connection form a run that leaves as one slice (one iovec, one buffer object): the
        # common case of one client and one upstream sends a whole read in one piece.
        cdef FrameInfo fi
        cdef Py_ssize_t r, pos = 0, run = 0, size
        cdef unsigned char *p
        cdef BoltUpstream up, run_up = None
        while not self.closed:
            size = self.rbuf.size()
            if pos >= size:
                break
            p = <unsigned char *>self.rbuf.head() + pos
            r = frame_peek(p, size - pos, self.ctx.max_frame_bytes, &fi)
            if r == 0:
                break
            if r < 0:
                if run:
                    self._emit(run_up, run, dirty)
                    run = 0
                self.ctx.counters.v[LS_ERR_BAD_FRAME] += 1
                rlog.warning((self.ctx.name, "bad frame"),
                             "listener %s: bad Bolt frame from %s: %s; closing the connection",
                            self.ctx.name, self.transport.get_extra_info("peername"),
                            bolt_error_reason(<int>r).decode())
                self.closed = True
                self.transport.abort()
                return
            up = None
            if fi.cmdcode == BOLT_CMD_HEARTBEAT:
                if fi.type == BOLT_TYPE_REQUEST:
                    self.ctx.counters.v[LS_HEARTBEATS] += 1
                    self.out.append(encode_heartbeat_ack(fi.proto, fi.request_id, fi.codec,
                                                         fi.ver1 or 1, 0))
            elif fi.type != BOLT_TYPE_RESPONSE:     # (responses from a client: dropped)
                up = self._request(p, &fi)
            if up is not None and up is run_up:
                run += r                            # contiguous with the run: extend it
                pos += r
                continue
            if run:
                self._emit(run_up, run, dirty)      # everything before this frame leaves
                pos -= run
                run = 0
            if up is None:
                self.rbuf.consume(r)                # answered here: drop the frame
                run_up = None
            else:
                run_up = up
                run = r
                pos += r
        if run:
            self._emit(run_up, run, dirty)

    cdef _emit(self, BoltUpstream up, Py_ssize_t n, list dirty):
        up.out.append(self.rbuf.take_slice(n))
        if not up.dirty:
            up.dirty = True
            dirty.append(up)
        if up.congested and not self.held:
            self.held = True                   # backpressure: read no more from this client
            up.paused_clients.append(self)
            self.transport.pause_reading()

    cdef void release_hold(self):
        if self.held and not self.closed:
            self.held = False
            if not self.reading_paused:
                self.transport.resume_reading()
        self.held = False

    cdef BoltUpstream _request(self, unsigned char *p, FrameInfo *fi):
        # Route one request; on success its id is patched and it is in flight upstream (the
        # caller moves the bytes); None when it was answered here.
        cdef RouteTable table = self.ctx.route_table
        cdef Route route = None, r
        cdef VirtualHost vh
        cdef HeaderMatcher m
        cdef bint ok, oneway = fi.type == BOLT_TYPE_ONEWAY
        cdef Cluster cluster
        cdef Endpoint ep
        cdef BoltUpstream up
        cdef InFlight e
        cdef uint32_t new_id
        cdef int timeout_ms
        cdef const unsigned char *block = p + frame_headers_offset(fi)
        cdef Py_ssize_t voff, vlen = 0
        self.ctx.counters.v[LS_RQ_TOTAL] += 1
        if not oneway and self.inflight >= self.ctx.max_in_flight:
            self.ctx.counters.v[LS_ERR_BUSY] += 1
            self._reply_error(fi, BOLT_STATUS_SERVER_THREADPOOL_BUSY)
            return None
        vh = table.default if table is not None else None
        if vh is not None:
            for r in vh.routes:
                ok = True
                for m in r.headers:
                    voff = header_find(block, fi.header_len, PyBytes_AS_STRING(m.name),
                                       PyBytes_GET_SIZE(m.name), &vlen)
                    if not m.matches_raw(block + voff if voff >= 0 else NULL, vlen, voff >= 0):
                        ok = False
                        break
                if ok:
                    route = r
                    break
        if route is None or route.action == A_DIRECT:
            self.ctx.counters.v[LS_ERR_NO_ROUTE] += 1
            self._reply_error(fi, BOLT_STATUS_NO_PROCESSOR)
            return None
        if route.ratelimit is not None and not route.ratelimit.take(now_ms()):
            # the route's (the service's) token bucket is empty: "server busy" at once
            self.ctx.counters.v[LS_RL_LIMITED] += 1
            self._reply_error(fi, BOLT_STATUS_SERVER_THREADPOOL_BUSY)
            return None
        cluster = route.pick_cluster()
        if cluster.counters.v[CS_RQ_ACTIVE] >= cluster.max_requests:
            # the cluster's circuit breaker: "server busy" at once
            cluster.counters.v[CS_RQ_ACTIVE_OVERFLOW] += 1
            self.ctx.counters.v[LS_ERR_OVERFLOW] += 1
            self._reply_error(fi, BOLT_STATUS_SERVER_THREADPOOL_BUSY)
            return None
        if cluster.original_dst:
            if self.dst is None:
                self.dst = redirected_dst(self.transport)
            ep = cluster.pick_original(self.dst)
        else:
            ep = cluster.pick()
        if ep is None:
            self.ctx.counters.v[LS_ERR_NO_HEALTHY_UPSTREAM] += 1
            self._reply_error(fi, BOLT_STATUS_NO_PROCESSOR)
            return None
        up = _mux_for(self.ctx, cluster, ep, self.affinity)
        cluster.counters.v[CS_RQ_TOTAL] += 1
        new_id = up.next_id()
        frame_set_id(p, fi, new_id)
        if not oneway:
            e = InFlight.__new__(InFlight)
            e.ds = self
            e.client_id = fi.request_id
            e.start_us = now_us()
            if self.ctx.access_log is not None:
                e.cluster = cluster
                e.ep = ep
                e.rq_bytes = fi.frame_len
                e.service = header_lookup(p, fi, b"service", 7)
                if e.service is None:
                    e.service = header_lookup(p, fi, b"sofa_head_target_service", 24)
                e.method = header_lookup(p, fi, b"sofa_head_method_name", 21)
                if e.method is None:
                    e.method = header_lookup(p, fi, b"method", 6)
                if e.method is None and fi.codec == 1:      # hessian2: from the body
                    voff = frame_headers_offset(fi) + fi.header_len
                    e.method = sofa_method_name(PyBytes_FromStringAndSize(
                        <char *>p + voff, min(fi.content_len, 512)))
            timeout_ms = fi.timeout_ms if fi.timeout_ms > 0 else route.timeout_ms
            e.deadline_ms = now_ms() + timeout_ms if timeout_ms > 0 else 0
            e.proto = fi.proto
            e.ver1 = fi.ver1
            e.codec = fi.codec
            if route.retry is not None:
                e.retry = route.retry
                e.frame = PyBytes_FromStringAndSize(<char *>p, fi.frame_len)
                e.cluster = cluster
                e.ep = ep
                e.attempts = 1
                e.timeout_ms = timeout_ms
            up.inflight[new_id] = e
            self.inflight += 1
            self.ctx.counters.v[LS_RQ_ACTIVE] += 1
            cluster.counters.v[CS_RQ_ACTIVE] += 1
            ep.active_requests += 1
            ep.rq_total += 1
        return up

    cdef _reply_error(self, FrameInfo *fi, int status):
        if fi.type == BOLT_TYPE_ONEWAY:
            return
        self.ctx.counters.v[LS_RSP_5XX] += 1
        self.out.append(encode_error_response(fi.proto, fi.request_id, fi.codec, status,
                                              fi.ver1 or 1, 0))

    cdef void answered(self, InFlight e, object frame, int status):
        # A response (or a proxy-made error) for one of our requests.
        self.inflight -= 1
        self.ctx.counters.v[LS_RQ_ACTIVE] -= 1
        cdef int64_t latency_us = now_us() - e.start_us
        self.ctx.counters.record_us(latency_us)
        cdef AccessLog alog = <AccessLog>self.ctx.access_log
        cdef Exchange ex = None
        if alog is not None:
            if alog.wants_exchange:
                ex = Exchange.__new__(Exchange)
                ex.client_port = self.client_port
                ex.transport = self.transport
                ex.bytes_received = e.rq_bytes
                ex.bytes_sent = len(frame) if frame is not None else e.rsp_bytes
            try:
                alog.add_bolt(
                    latency_us, self.client_ip, e.service, e.method, status,
                    e.cluster.name if e.cluster is not None else None, e.ep, e.client_id,
                    ex)
            except Exception:
                log.exception("listener %s: access log failed", self.ctx.name)
        if status == BOLT_STATUS_SUCCESS:
            self.ctx.counters.v[LS_RSP_2XX] += 1
        else:
            self.ctx.counters.v[LS_RSP_5XX] += 1
        if frame is not None and not self.closed:
            self.out.append(frame)              # (None: it comes in a run of responses)

    cdef void fail(self, InFlight e, int status, int err_slot):
        self.ctx.counters.v[err_slot] += 1
        self.answered(e, encode_error_response(e.proto, e.client_id, e.codec, status,
                                               e.ver1 or 1, 0), status)

    cdef void flush_out(self):
        if self.out and not self.closed:
            flush(self.transport, self.out)
        self.out.clear()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        self.ctx.conns.discard(self)
        self.ctx.counters.v[LS_CX_ACTIVE] -= 1
        self.out.clear()

    def pause_writing(self):
        pass                            # responses are bounded by the in-flight limit

    def resume_writing(self):
        pass

    def abort(self):
        if not self.closed:
            self.transport.abort()

    def close_if_idle_for(self, int64_t now, int64_t idle_ms):
        # Drain: a client with nothing in flight and quiet for idle_ms is closed, unless a
        # request is on the wire (part of a frame buffered here, or unread in the kernel).
        if (self.inflight == 0 and not self.closed and now - self.last_rx_ms >= idle_ms
                and self.rbuf.size() == 0 and unread_bytes(self.transport) == 0):
            self.closed = True
            self.ctx.counters.v[LS_CX_IDLE_CLOSED] += 1
            self.transport.close()

    # -- hot restart: connection migration --

    def detach_for_migration(self):
        """If nothing is in flight or queued, give up this connection without closing the
        TCP connection: returns (dup'd fd, unread bytes) for the new generation, else None.

        A client that always has a call in flight would never be idle: the first refusal
        stops reading from it, so the calls in flight finish while its next requests wait
        in the kernel and go to the new generation with the connection (a new call waits
        at most as long as the slowest one in flight)."""
        if self.closed:
            return None
        if self.inflight or self.out or self.transport.get_write_buffer_size():
            self._stop_reading_to_leave()
            return None
        # (an I/O engine's transport may need a moment: its kernel operations cancelled;
        # it has stopped reading then, and we are asked again)
        detached = detach_transport(self.transport)
        if detached is None:
            self._stop_reading_to_leave()
            return None
        fd, unread = detached
        data = self.rbuf.py_peek()          # read but not used: a partial frame
        if unread:
            data += unread                  # received after it, never delivered
        self.closed = True
        return fd, data

    cdef void _stop_reading_to_leave(self):
        if not self.reading_paused:
            self.reading_paused = True      # (never resumed: this connection leaves)
            if not self.held:
                self.transport.pause_reading()

    def cancel_migration(self):
        """The new generation cannot take connections: read again (the connection drains
        here instead)."""
        if self.reading_paused and not self.closed and not self.rbuf.is_full():
            self.reading_paused = False
            if not self.held:
                self.transport.resume_reading()

    def adopt_bytes(self, data):
        """Continue a migrated connection: bytes the old generation had read but not used."""
        cdef list dirty = []
        cdef BoltUpstream up
        cdef Py_ssize_t n
        data = memoryview(data)
        while len(data) and not self.closed:
            n = self.rbuf.py_feed(data)     # (what fits: frames are used, then the rest)
            data = data[n:]
            self._process(dirty)
            if n == 0:
                # a frame larger than the buffer can hold: as a read would find it
                self.ctx.counters.v[LS_ERR_BAD_FRAME] += 1
                self.closed = True
                self.transport.abort()
                return
        for up in dirty:
            up.flush()
        if self.out and not self.closed:
            flush(self.transport, self.out)

    cpdef void on_idle_check(self, int64_t now):
        self.rbuf.release_if_empty()        # no partial frame: no receive memory held
        if (self.inflight == 0 and not self.closed and self.ctx.idle_timeout_ms > 0
                and now - self.last_rx_ms >= self.ctx.idle_timeout_ms
                and self.rbuf.size() == 0 and unread_bytes(self.transport) == 0):
            self.ctx.counters.v[LS_CX_IDLE_CLOSED] += 1
            self.transport.close()


# ======================================================================= upstream

cdef BoltUpstream _mux_for(ListenerCtx ctx, Cluster cluster, Endpoint ep, unsigned int affinity):
    # The endpoint's multiplexed connections: open one more while under the configured
    # number, else share the one this client is pinned to.
    cdef list mux = ep.mux
    cdef BoltUpstream up
    if len(mux) < cluster.connections_per_endpoint:
        up = BoltUpstreamProtocol(ctx.loop, cluster, ep)
        mux.append(up)
        up.start_connect()
        return up
    return mux[affinity % len(mux)]


cdef class BoltUpstream(Receiver):
    cdef:
        object loop
        Cluster cluster
        Endpoint ep
        object transport
        int state                   # UpState
        uint32_t last_id            # last id given out; wraps at 2^32
        dict inflight               # upstream id -> InFlight
        list out                    # frames to send, one write per batch
        bint dirty                  # queued in a batch's flush list
        int64_t last_rx_ms
        uint32_t heartbeat_id       # outstanding heartbeat, 0 = none
        int64_t heartbeat_sent_ms
        int missed_heartbeats
        bint congested              # write buffer above high water (pause_writing)
        list paused_clients         # clients whose reading we paused for it
        object connect_task         # while UP_CONNECTING
        int64_t connect_started_ms  # for the cluster's connect_timeout_ms

    def __init__(self, loop, Cluster cluster, Endpoint ep):
        self.loop = loop
        self.cluster = cluster
        self.ep = ep
        self.rbuf = RecvBuffer(65536, (16 << 20) + 65536)
        self.state = UP_CONNECTING
        self.inflight = {}
        self.out = []
        self.paused_clients = []
        debug.count_alloc(debug.LEAK_UPSTREAM)

    def __dealloc__(self):
        debug.count_free(debug.LEAK_UPSTREAM)

    cdef uint32_t next_id(self):
        self.last_id += 1                       # uint32_t: wraps to 0
        while self.last_id == 0 or self.last_id in self.inflight:
            self.last_id += 1
        return self.last_id

    cdef start_connect(self):
        _live_upstreams.add(self)
        self.cluster.counters.v[CS_CX_TOTAL] += 1
        task = asyncio.ensure_future(
            open_connection(self.loop, lambda: self, self.cluster, self.ep),
            loop=self.loop)
        self.connect_task = task
        self.connect_started_ms = now_ms()
        task.add_done_callback(self._on_connected)

    def _on_connected(self, task):
        self.connect_task = None
        if task.cancelled() or task.exception() is not None:
            self.cluster.counters.v[CS_CX_CONNECT_FAIL] += 1
            self.ep.cx_connect_fail += 1
            self.ep.connect_failing = True
            if not task.cancelled():
                rlog.warning((self.cluster.name, "connect"),
                             "cluster %s: connect to %s:%s failed: %s", self.cluster.name,
                            self.ep.host, self.ep.port, task.exception())
            self._closed(LS_ERR_UPSTREAM_RESET)

    cdef void flush(self):
        self.dirty = False
        if self.state == UP_READY and self.out:
            flush(self.transport, self.out)

    # -- loop callbacks --

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(1 << 20, 256 << 10)
        self.state = UP_READY
        self.last_rx_ms = now_ms()
        self.ep.connect_failing = False
        self.cluster.counters.v[CS_CX_ACTIVE] += 1
        if self.out:
            flush(transport, self.out)

    cdef int received(self, Py_ssize_t nbytes) except -1:
        cdef list dirty = []
        cdef BoltDownstream ds
        self.rbuf.advance(nbytes)
        self.last_rx_ms = now_ms()
        try:
            self._process(dirty)
        except BaseException:
            log.exception("cluster %s: internal error on a Bolt upstream", self.cluster.name)
            self.transport.abort()
        for ds in dirty:
            ds.flush_out()
        return 0

    cdef _process(self, list dirty):
        # Responses are matched to their requests where they lie; consecutive responses for
        # the same client form a run that goes to it as one slice.
        cdef FrameInfo fi
        cdef Py_ssize_t r, pos = 0, run = 0, size
        cdef unsigned char *p
        cdef InFlight e
        cdef int64_t latency_us
        cdef BoltDownstream ds, run_ds = None
        while True:
            size = self.rbuf.size()
            if pos >= size:
                break
            p = <unsigned char *>self.rbuf.head() + pos
            r = frame_peek(p, size - pos, 16 << 20, &fi)
            if r == 0:
                break
            if r < 0:
                if run:
                    self._emit(run_ds, run, dirty)
                rlog.warning((self.cluster.name, "bad frame"),
                             "cluster %s: bad Bolt frame from %s:%s: %s; closing", self.cluster.name,
                            self.ep.host, self.ep.port, bolt_error_reason(<int>r).decode())
                self.transport.abort()
                return
            ds = None
            if fi.type != BOLT_TYPE_RESPONSE:
                if fi.cmdcode == BOLT_CMD_HEARTBEAT:
                    # the server checks on us: answer
                    self.out.append(encode_heartbeat_ack(fi.proto, fi.request_id, fi.codec,
                                                         fi.ver1 or 1, 0))
                    self.flush()
                # (requests from a server: not supported, dropped)
            elif fi.cmdcode == BOLT_CMD_HEARTBEAT and fi.request_id == self.heartbeat_id:
                self.heartbeat_id = 0
                self.missed_heartbeats = 0
            else:
                e = self.inflight.pop(fi.request_id, None)
                if e is not None:               # (None: late, timed out or unknown: dropped)
                    self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
                    self.ep.active_requests -= 1
                    latency_us = now_us() - e.start_us
                    self.cluster.counters.record_us(latency_us)
                    endpoint_latency_us(self.ep, latency_us)
                    if fi.status == BOLT_STATUS_SUCCESS:
                        self.cluster.counters.v[CS_RSP_2XX] += 1
                    else:
                        self.cluster.counters.v[CS_BOLT_STATUS_OTHER] += 1
                        self.ep.rq_error += 1
                    if self.cluster.od_enabled:
                        # outlier detection: an error status is a failure (a 5xx),
                        # a business exception included
                        self.cluster.observe(self.ep, 200 if fi.status == BOLT_STATUS_SUCCESS
                                             else 500)
                    if (e.retry is not None and fi.status != BOLT_STATUS_SUCCESS
                            and _retry_call(e, fi.status)):
                        pass                    # another try: this answer is dropped
                    else:
                        frame_set_id(p, &fi, e.client_id)
                        ds = e.ds
                        e.rsp_bytes = fi.frame_len
                        ds.answered(e, None, fi.status)
            if ds is not None and ds is run_ds:
                run += r
                pos += r
                continue
            if run:
                self._emit(run_ds, run, dirty)
                pos -= run
                run = 0
            if ds is None:
                self.rbuf.consume(r)
                run_ds = None
            else:
                run_ds = ds
                run = r
                pos += r
        if run:
            self._emit(run_ds, run, dirty)

    cdef _emit(self, BoltDownstream ds, Py_ssize_t n, list dirty):
        if ds.closed:
            self.rbuf.consume(n)
            return
        ds.out.append(self.rbuf.take_slice(n))
        if len(ds.out) == 1:
            dirty.append(ds)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self._closed(LS_ERR_UPSTREAM_RESET)

    cdef void _closed(self, int err_slot):
        # Fail everything in flight on this connection with 0x10, with the clients' ids.
        cdef InFlight e
        cdef list dirty = []
        cdef BoltDownstream ds
        if self.state == UP_READY:
            self.cluster.counters.v[CS_CX_ACTIVE] -= 1
        self.state = UP_CLOSED
        self.resume_writing()                   # held clients go on (their next requests fail fast)
        _live_upstreams.discard(self)
        try:
            self.ep.mux.remove(self)
        except ValueError:
            pass
        entries = list(self.inflight.values())
        self.inflight.clear()
        self.out.clear()
        if entries and self.cluster.od_enabled:
            self.cluster.observe(self.ep, 502)          # the connection died under requests
        for e in entries:
            self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
            self.ep.active_requests -= 1
            if e.retry is not None and _retry_call(e, BOLT_STATUS_CONNECTION_CLOSED):
                continue
            e.ds.fail(e, BOLT_STATUS_CONNECTION_CLOSED, err_slot)
            if e.ds not in dirty:
                dirty.append(e.ds)
        for ds in dirty:
            ds.flush_out()

    def pause_writing(self):
        # The upstream is not keeping up: clients that send to it stop being read (see
        # BoltDownstream._hold_for) until it drains below its low-water mark.
        self.congested = True

    def resume_writing(self):
        cdef BoltDownstream ds
        self.congested = False
        paused, self.paused_clients = self.paused_clients, []
        for ds in paused:
            ds.release_hold()

    cpdef void sweep(self, int64_t now):
        # Timeouts of in-flight requests, and heartbeats on an idle connection.
        cdef InFlight e
        cdef list dirty = []
        cdef BoltDownstream ds
        cdef uint32_t k
        expired = [k for k, e in self.inflight.items() if e.deadline_ms and e.deadline_ms <= now]
        for k in expired:
            e = self.inflight.pop(k)
            self.cluster.counters.v[CS_RQ_TIMEOUT] += 1
            if self.cluster.od_enabled:
                self.cluster.observe_local(self.ep, 504)    # a timeout of our making
            self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
            self.ep.active_requests -= 1
            if e.retry is not None and _retry_call(e, BOLT_STATUS_TIMEOUT):
                continue
            e.ds.fail(e, BOLT_STATUS_TIMEOUT, LS_ERR_UPSTREAM_TIMEOUT)
            if e.ds not in dirty:
                dirty.append(e.ds)
        for ds in dirty:
            ds.flush_out()
        if (self.state == UP_CONNECTING and self.connect_task is not None
                and now - self.connect_started_ms >= self.cluster.connect_timeout_ms):
            rlog.warning((self.cluster.name, "connect"),
                         "cluster %s: connect to %s:%s timed out after %d ms", self.cluster.name,
                        self.ep.host, self.ep.port, self.cluster.connect_timeout_ms)
            self.connect_task.cancel()      # _on_connected: connect_fail, in-flight get 0x10
            self.connect_task = None
            return
        if self.state != UP_READY:
            return
        if self.ep.removed and not self.inflight:
            # the endpoint left its cluster (registry, EDS, DNS) and its last call is
            # answered: nothing will be sent here again
            self.transport.close()
            return
        if self.heartbeat_id:
            if now - self.heartbeat_sent_ms >= self.cluster.heartbeat_interval_ms:
                self.cluster.counters.v[CS_HEARTBEAT_MISSED] += 1
                self.missed_heartbeats += 1
                self.heartbeat_id = 0
                if self.missed_heartbeats >= self.cluster.heartbeat_max_missed:
                    log.warning("cluster %s: %s:%s missed %d heartbeats; closing",
                                self.cluster.name, self.ep.host, self.ep.port,
                                self.missed_heartbeats)
                    self.transport.abort()
                    return
        if (not self.heartbeat_id
                and now - self.last_rx_ms >= self.cluster.heartbeat_interval_ms):
            self.heartbeat_id = self.next_id()
            self.heartbeat_sent_ms = now
            self.last_rx_ms = now                # next one after another interval
            self.cluster.counters.v[CS_HEARTBEAT_SENT] += 1
            self.out.append(encode_heartbeat(1, self.heartbeat_id))
            self.flush()

    @property
    def in_flight(self):
        return len(self.inflight)


class BoltDownstreamProtocol(BoltDownstream, asyncio.BufferedProtocol):
    """A client connection on a bolt listener."""


class BoltUpstreamProtocol(BoltUpstream, asyncio.BufferedProtocol):
    """A multiplexed connection to one Bolt endpoint."""


def sweep_downstreams(ListenerCtx ctx, int64_t now):
    """Per-tick work for a bolt listener: idle clients, and (once per tick for all
    listeners) request timeouts and heartbeats of the upstream connections."""
    global _last_upstream_sweep_ms
    cdef BoltDownstream ds
    cdef BoltUpstream up
    for ds in list(ctx.conns):
        ds.on_idle_check(now)
    if now != _last_upstream_sweep_ms:
        _last_upstream_sweep_ms = now
        for up in list(_live_upstreams):
            up.sweep(now)


def debug_leak_counts():
    """Live objects (allocations minus frees) counted by this module, by kind. Counted only
    in a debug build (FASTMESH_DEBUG=1); a release build returns zeros."""
    return {"debug_build": bool(debug.FASTMESH_DEBUG), "blocks": debug.leaks[0],
            "downstream": debug.leaks[1], "upstream": debug.leaks[2], "inflight": debug.leaks[3]}
