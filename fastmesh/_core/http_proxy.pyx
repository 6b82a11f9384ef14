"""HTTP/1.1 proxy sessions. See http_proxy.pxd for the states and fields."""
import asyncio
import ipaddress
import logging

from fastmesh.ratelog import RateLimitedLog

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp, memcpy

from fastmesh._core cimport debug
from fastmesh._core.buffer cimport Receiver, RecvBuffer, Slice
from fastmesh._core.accesslog cimport AccessLog, Exchange
from fastmesh._core.clock cimport now_ms, now_us
from fastmesh._core.context cimport ListenerCtx
from fastmesh._core.sockio cimport unread_bytes, redirected_dst
from fastmesh._core.http1 cimport (
    Head, HeadParser, ChunkedFramer, build_request_head, build_response_head,
    error_response, make_request_id, has_request_id, client_request_id,
    BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE,
    PARSE_INCOMPLETE, PARSE_ERROR, PARSE_TOO_LARGE, CH_DONE, CH_ERROR,
    TE_AS_RECEIVED, TE_ADD_CHUNKED, TE_NONE,
)
from fastmesh._core.router cimport Route, RouteTable, A_DIRECT
from fastmesh._core.stats cimport (
    Counters, status_class_slot,
    LS_CX_TOTAL, LS_CX_ACTIVE, LS_RQ_TOTAL, LS_RQ_ACTIVE, LS_RSP_1XX, LS_ERR_BAD_REQUEST,
    LS_ERR_HEAD_TOO_LARGE, LS_ERR_BODY_TOO_LARGE, LS_ERR_NO_ROUTE, LS_ERR_NO_HEALTHY_UPSTREAM,
    LS_ERR_CONNECT_FAILED, LS_ERR_UPSTREAM_TIMEOUT, LS_ERR_UPSTREAM_RESET,
    LS_ERR_UPSTREAM_PROTOCOL, LS_ERR_RESET_MID_RESPONSE, LS_ERR_DOWNSTREAM_RESET,
    LS_ERR_HEAD_TIMEOUT, LS_ERR_STREAM_IDLE, LS_RX_BYTES, LS_CX_IDLE_CLOSED, LS_ERR_OVERFLOW,
    CS_RQ_TOTAL, CS_RQ_ACTIVE, CS_RQ_TIMEOUT, CS_RQ_RETRY, CS_RSP_1XX, CS_CX_TOTAL,
    CS_CX_ACTIVE, CS_CX_CONNECT_FAIL, CS_CX_IDLE_CLOSED, CS_CX_OVERFLOW, CS_RQ_PENDING_TOTAL,
    CS_RQ_PENDING_ACTIVE, CS_RQ_PENDING_OVERFLOW, CS_RQ_ACTIVE_OVERFLOW, CS_RQ_RETRY_OVERFLOW,
    CS_RQ_SHADOW, CS_RQ_SHADOW_SKIPPED, LS_FAULT_ABORTS, LS_FAULT_DELAYS, LS_RL_ENABLED,
    LS_RL_ENFORCED, LS_RL_LIMITED, LS_RL_OK,
)
from fastmesh._core.upstream cimport Cluster, Endpoint, LB_RING_HASH, endpoint_latency_us
from fastmesh._core.upstream import open_connection
from fastmesh._core.xxhash64 cimport xxh64
from fastmesh._core.fastrand cimport fast_random
from fastmesh._core.filters cimport FaultPolicy, TokenBucket, F_FAULT

log = logging.getLogger("fastmesh.http")
rlog = RateLimitedLog(log)          # for warnings a peer can repeat at line rate

cdef bytes CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes LAST_CHUNK = b"0\r\n\r\n"
cdef Py_ssize_t BODY_COPY_MAX_BYTES = 1 << 20   # kept for mirrors and retries (Envoy's
                                                # default buffer limit)
cdef bytes OVERFLOW_BODY = b"upstream overflow: the cluster's circuit breaker is open\n"
cdef bytes CRLF = b"\r\n"
cdef int64_t LINGER_MS = 2000
cdef Py_ssize_t UPSTREAM_MAX_HEAD_BYTES = 65536


cdef object _h2_proxy = None    # fastmesh._core.h2_proxy once an HTTP/2 cluster was used

cdef Py_ssize_t SMALL_BODY_BYTES = 8192    # bodies up to this go out in one piece with the head


cdef inline int64_t min64(int64_t a, int64_t b) noexcept:
    return a if a < b else b


cdef bytes join_head_body(bytes head, const unsigned char *body, Py_ssize_t n):
    # One bytes object (one write() syscall, no buffer objects) for a head and a small body.
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(head)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hn + n)
    cdef char *p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), hn)
    memcpy(p + hn, body, n)
    return out


cdef inline void write_pieces(object transport, list pieces):
    if len(pieces) == 1:
        transport.write(pieces[0])
    elif pieces:
        transport.writelines(pieces)


# ===================================================================== downstream

cdef class HttpDownstream:
    def __init__(self, ListenerCtx ctx):
        self.ctx = ctx
        self.rbuf = RecvBuffer(16384, ctx.max_head_bytes + 65536)
        self.parser = HeadParser(True, ctx.max_head_bytes, ctx.max_headers)
        self.chunker = None         # made by the first chunked request (most never see one)
        self.state = DS_HEAD
        self.out = []
        debug.count_alloc(debug.LEAK_DOWNSTREAM)

    def __dealloc__(self):
        debug.count_free(debug.LEAK_DOWNSTREAM)

    # ------------------------------------------------------------ loop callbacks

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = (peer[0] if peer else "unknown").encode()
        if self.ctx.access_log is not None and peer:
            self.client_port = peer[1]
        transport.set_write_buffer_limits(self.ctx.high_water_bytes, self.ctx.low_water_bytes)
        self.ctx.conns.add(self)
        self.ctx.counters.v[LS_CX_TOTAL] += 1
        self.ctx.counters.v[LS_CX_ACTIVE] += 1
        self._set_deadline(DL_IDLE, self.ctx.idle_timeout_ms)

    cdef int received(self, Py_ssize_t nbytes) except -1:
        self.rbuf.advance(nbytes)
        self.reads += 1
        self.ctx.counters.v[LS_RX_BYTES] += nbytes
        try:
            self._process()
            self._flush()
            self._update_reading()
        except BaseException as exc:
            log.exception("listener %s: internal error on a client connection", self.ctx.name)
            self._abort()
        return 0

    def eof_received(self):
        # The client shut its write side. Between requests that is the end; after a whole
        # request it may still read the response (half-close); mid-request it is a reset.
        if self.state == DS_HEAD:
            if self.rbuf.size():
                self.ctx.counters.v[LS_ERR_DOWNSTREAM_RESET] += 1
            return False
        if self.state == DS_FORWARDING and self.req_done:
            self.close_after = True
            return True
        if self.state == DS_LINGER:
            return False
        self.ctx.counters.v[LS_ERR_DOWNSTREAM_RESET] += 1
        return False

    def connection_lost(self, exc):
        if self.state != DS_CLOSED:
            self.state = DS_CLOSED
        self.ctx.conns.discard(self)
        self.ctx.counters.v[LS_CX_ACTIVE] -= 1
        if self.req is not None:
            self.ctx.counters.v[LS_RQ_ACTIVE] -= 1
            if not self.resp_started:
                self.ctx.counters.v[LS_ERR_DOWNSTREAM_RESET] += 1
            if self.ctx.access_log is not None:
                if self.rsp_flag is None:
                    self.rsp_flag = b"downstream_reset"
                self._access_log()
        # the exchange cannot finish: its upstream connection is out of sync (and no longer
        # counts as a request in flight to that endpoint)
        self._drop_upstream()
        if self.cluster is not None:
            self._leave_pending()
            self._end_retry()
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.delay_timer is not None:
            self.delay_timer.cancel()
            self.delay_timer = None
            if self.fault_active is not None:
                self.fault_active.active -= 1
                self.fault_active = None
        self.req = None
        if self.connect_task is not None:
            self.connect_task = None         # the connection, when made, goes to the pool
        self.deadline_ms = 0

    def pause_writing(self):
        self.write_paused = True
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.up is not None:
            self.up.resume_reading()

    # --------------------------------------------------------- request lifecycle

    cdef void _process(self):
        cdef Py_ssize_t r
        if self.in_process:
            return
        self.in_process = True
        try:
            while True:
                if self.state == DS_HEAD:
                    if self.rbuf.size() == 0:
                        if self.deadline_kind != DL_IDLE:
                            self._set_deadline(DL_IDLE, self.ctx.idle_timeout_ms)
                        return
                    r = self.parser.feed(self.rbuf.head(), self.rbuf.size())
                    if r == PARSE_INCOMPLETE:
                        if self.deadline_kind != DL_HEAD:
                            self._set_deadline(DL_HEAD, self.ctx.request_head_timeout_ms)
                        return
                    if r < 0:
                        if (self.ctx.accept_h2c and not self.served and self.rbuf.size() >= 18
                                and memcmp(self.rbuf.head(), b"PRI * HTTP/2.0\r\n\r\n", 18) == 0):
                            self._to_http2()        # the HTTP/2 preface (codec: auto)
                            return
                        if r == PARSE_TOO_LARGE:
                            self._fail_and_linger(431, b"head_too_large", LS_ERR_HEAD_TOO_LARGE)
                        else:
                            self._fail_and_linger(400, b"bad_request", LS_ERR_BAD_REQUEST)
                        return
                    self.rbuf.consume(r)
                    self.req = self.parser.head
                    self.parser.reset()
                    if self.ctx.tls_http is not None:      # downstream TLS (tls.pyx)
                        self.ctx.tls_http.on_request(self.req, self.transport)
                    self._start_request()
                elif self.state == DS_FORWARDING:
                    if not self.req_done:
                        self._forward_body()
                    return
                elif self.state == DS_DISCARD:
                    self._discard_body()
                    if self.state == DS_DISCARD:
                        return
                elif self.state == DS_LINGER:
                    if self.rbuf.size():
                        self.rbuf.consume(self.rbuf.size())
                    return
                else:
                    return
        finally:
            self.in_process = False

    cdef void _to_http2(self):
        # Hand this connection, and what it sent, to the HTTP/2 session: it counts the
        # connection from now on
        from fastmesh._core import h2_proxy
        data = self.rbuf.py_peek()
        self.rbuf.consume(self.rbuf.size())
        self.state = DS_CLOSED
        self.deadline_ms = 0
        self.ctx.conns.discard(self)
        self.ctx.counters.v[LS_CX_ACTIVE] -= 1
        self.ctx.counters.v[LS_CX_TOTAL] -= 1
        h2_proxy.take_over(self.ctx, self.transport, data)
        self.transport = None

    cdef void _start_request(self):
        cdef Head h = self.req
        cdef RouteTable table = self.ctx.route_table
        cdef Route route
        cdef Cluster cluster
        cdef Endpoint ep
        self.served = True
        self.ctx.counters.v[LS_RQ_TOTAL] += 1
        self.ctx.counters.v[LS_RQ_ACTIVE] += 1
        self.rsp_status = 0
        self.rsp_flag = None
        self.rq_start_us = now_us()         # latency histogram (and access log)
        if self.ctx.access_log is not None:
            self.rq_id = None
            self.rsp_head = None
        self.rsp_body_bytes = 0
        self.deadline_ms = 0
        self.deadline_kind = DL_NONE
        self.close_after = h.conn_close or self.ctx.draining
        self.req_done = h.body_kind == BODY_NONE
        self.resp_started = False
        self.retried = False
        self.sent_continue = False
        self.body_left = h.content_length if h.body_kind == BODY_LENGTH else 0
        if h.body_kind == BODY_CHUNKED:
            if self.chunker is None:
                self.chunker = ChunkedFramer()
            else:
                self.chunker.reset()
        if (self.ctx.max_request_body_bytes and h.body_kind == BODY_LENGTH
                and h.content_length > self.ctx.max_request_body_bytes):
            self._fail_and_linger(413, b"body_too_large", LS_ERR_BODY_TOO_LARGE)
            return
        if h.minor == 0 and not self.ctx.accept_http_10:
            self._fail_and_linger(426, b"http10_refused", LS_ERR_BAD_REQUEST)
            return
        route = table.route_http(h) if table is not None else None
        if route is None:
            self._local_response(404, b"no_route", b"no route\n", LS_ERR_NO_ROUTE)
            return
        self.route = route
        if self.ctx.http_filters is not None:
            self.extra_rsp_headers = None
            if self._run_filters(h, route, 0, False):
                return                      # answered (abort, rate limited) or delayed
        self._route_on(h, route)

    cdef void _route_on(self, Head h, Route route):
        # The request, past the HTTP filters: the router's part.
        cdef Cluster cluster
        cdef Endpoint ep
        self.retry = route.retry
        if self.retry is not None:
            self.attempts = 1
            self.tried = None
            self.rq_deadline_ms = now_ms() + route.timeout_ms if route.timeout_ms > 0 else 0
            if h.body_kind != BODY_NONE:
                self._keep_body_for_retries(h)
        if route.action == A_DIRECT:
            self._local_response(route.direct_status, None, route.direct_body, -1)
            return
        cluster = route.pick_cluster()
        if cluster.counters.v[CS_RQ_ACTIVE] + cluster.pending >= cluster.max_requests:
            cluster.counters.v[CS_RQ_ACTIVE_OVERFLOW] += 1
            self.cluster = cluster
            self._local_response(503, b"overflow", OVERFLOW_BODY, LS_ERR_OVERFLOW)
            return
        if route.mirrors is not None:
            self._mirror(h, route)
        if cluster.original_dst:
            ep = self._pick_original(cluster, h)
        elif route.hash_policy is not None and cluster.lb_policy >= LB_RING_HASH:
            ep = _pick_by_hash(cluster, route.hash_policy, h, self.client_ip)
        else:
            ep = cluster.pick()
        if ep is None:
            self._local_response(503, b"no_healthy_upstream", b"no healthy upstream\n",
                                 LS_ERR_NO_HEALTHY_UPSTREAM)
            return
        self.cluster = cluster
        self.ep = ep
        if h.expect_continue and not self.req_done:
            self.out.append(CONTINUE_100)
            self._flush()
            self.sent_continue = True
        self._acquire_upstream()

    cdef void _acquire_upstream(self):
        cdef Endpoint ep = self.ep
        cdef HttpUpstream up
        cdef list idle = ep.http_idle
        while idle:
            up = idle.pop()
            if up.state == US_IDLE and not up.transport.is_closing():
                up._begin(self, True)
                self._bind(up)
                return
            up._close()
        # no idle connection: this request waits for one (being made, or freed), as an
        # Envoy pending request, within the cluster's circuit breakers
        cdef Cluster cl = self.cluster
        if cl.pending >= cl.max_pending_requests:
            cl.counters.v[CS_RQ_PENDING_OVERFLOW] += 1
            self._local_response(503, b"overflow", OVERFLOW_BODY, LS_ERR_OVERFLOW)
            return
        self.waiting_cx = True
        cl.pending += 1
        cl.counters.v[CS_RQ_PENDING_TOTAL] += 1
        cl.counters.v[CS_RQ_PENDING_ACTIVE] = cl.pending
        self.state = DS_CONNECTING
        if cl.counters.v[CS_CX_ACTIVE] + cl.cx_connecting >= cl.max_connections:
            cl.counters.v[CS_CX_OVERFLOW] += 1
            self.queued = True
            ep.http_pending.append(self)
            self._set_deadline(DL_PENDING, self.route.timeout_ms)
            return
        self._open_connection()

    cdef void _open_connection(self):
        self.cluster.cx_connecting += 1
        self._set_deadline(DL_CONNECT, self.cluster.connect_timeout_ms)
        if self.cluster.http2:
            # an HTTP/2 cluster: a "connection" that carries each request as a stream on
            # the endpoint's shared HTTP/2 connection (h2_proxy.H2Bridge)
            global _h2_proxy
            if _h2_proxy is None:
                from fastmesh._core import h2_proxy
                _h2_proxy = h2_proxy
            task = _h2_proxy.open_bridge(self.cluster, self.ep, self.ctx.loop)
        else:
            task = asyncio.ensure_future(
                _connect(self.ctx.loop, self.cluster, self.ep), loop=self.ctx.loop)
        self.connect_task = task
        task.add_done_callback(_ConnectDone(self, self.cluster, self.ep))

    cdef void _take_connection(self, HttpUpstream up, bint reused):
        # The connection this waiting request gets (just made, or freed by another
        # request): bind it and go on, from a callback (so flush and read here).
        self._leave_pending()
        try:
            up._begin(self, reused)
            self._bind(up)
            self._process()
            self._flush()
            self._update_reading()
        except BaseException:
            log.exception("internal error binding an upstream connection")
            self._abort()

    cdef void _leave_pending(self):
        cdef Cluster cl = self.cluster
        if self.queued:
            self.queued = False
            try:
                self.ep.http_pending.remove(self)
            except ValueError:
                pass
        if self.waiting_cx:
            self.waiting_cx = False
            cl.pending -= 1
            cl.counters.v[CS_RQ_PENDING_ACTIVE] = cl.pending

    cdef bint _run_filters(self, Head h, Route route, int start, bint after_delay):
        # The listener's HTTP filters in their order, from `start`; True when one answered
        # the request or holds it (a delay: _on_delay_done goes on from there).
        cdef tuple kinds = self.ctx.http_filters
        cdef int i, kind
        cdef FaultPolicy fp
        cdef TokenBucket tb
        for i in range(start, len(kinds)):
            kind = kinds[i]
            if kind == F_FAULT:
                fp = route.fault if route.fault is not None else self.ctx.fault
                if fp is not None and self._inject_fault(h, fp, i, after_delay and i == start):
                    return True
            else:
                tb = route.ratelimit if route.ratelimit is not None else self.ctx.ratelimit
                if tb is not None and self._rate_limited(tb):
                    return True
        return False

    cdef bint _inject_fault(self, Head h, FaultPolicy fp, int pos, bint delayed):
        # Envoy's order: the delay, then (after it) the abort. Headers may choose the delay,
        # the status and their shares when the policy says so.
        cdef int64_t delay_ms
        cdef int status
        if fp.max_active and fp.active >= fp.max_active and not delayed:
            return False
        if not delayed:
            delay_ms = fp.delay_for(h)
            if delay_ms > 0:
                self.ctx.counters.v[LS_FAULT_DELAYS] += 1
                fp.active += 1
                self.fault_active = fp
                self.filter_pos = pos
                self.state = DS_CONNECTING          # held: no next request, body waits
                self.deadline_ms = 0
                self.deadline_kind = DL_NONE
                self.delay_timer = self.ctx.loop.call_later(delay_ms / 1000.0,
                                                            self._on_delay_done)
                return True
        status = fp.abort_for(h)
        if status:
            self.ctx.counters.v[LS_FAULT_ABORTS] += 1
            self._local_response(status, b"fault_abort", b"fault filter abort", -1)
            return True
        return False

    def _on_delay_done(self):
        cdef FaultPolicy fp = self.fault_active
        self.delay_timer = None
        if fp is not None:
            fp.active -= 1
            self.fault_active = None
        if self.state != DS_CONNECTING or self.req is None:
            return
        try:
            if not self._run_filters(self.req, self.route, self.filter_pos, True):
                self._route_on(self.req, self.route)
            self._flush()
            self._update_reading()
        except BaseException:
            log.exception("internal error after a fault delay")
            self._abort()

    cdef bint _rate_limited(self, TokenBucket tb):
        cdef bint limited = tb.limits(self.ctx.counters, now_ms())
        if tb.extra is not None:
            self.extra_rsp_headers = tb.extra
        if limited:
            self._local_response(tb.status, b"local_rate_limited", b"local_rate_limited", -1)
        return limited

    cdef void _mirror(self, Head h, Route route):
        # Fire-and-forget copies for the route's mirror clusters, sent now, beside the
        # request: they share nothing with it (their own connections, answers dropped), so
        # they can neither slow nor fail it. A body must be all at hand already (a small
        # request's usually is); a streamed one is not mirrored.
        cdef bytes body = b""
        cdef Cluster cl
        head = build_request_head(h, self.client_ip, None, route.headers_to_add,
                                  route.headers_to_remove, True)
        if h.body_kind == BODY_LENGTH and self.rbuf.size() >= h.content_length:
            body = PyBytes_FromStringAndSize(<char *>self.rbuf.head(),
                                             <Py_ssize_t>h.content_length)
        elif h.body_kind != BODY_NONE:
            if h.body_kind == BODY_LENGTH and h.content_length > BODY_COPY_MAX_BYTES:
                for cl, _, _ in route.mirrors:
                    cl.counters.v[CS_RQ_SHADOW_SKIPPED] += 1
                return
            # the body streams upstream: a copy of it is kept as it goes, and the mirrors
            # leave once all of it has (_request_forwarded)
            self.mirror_head = head
            if self.body_copy is None:
                self.body_copy = []
                self.body_copy_bytes = 0
            return
        self._send_mirrors(route, head, body)

    cdef void _keep_body_for_retries(self, Head h):
        # A retry sends the body again: it is kept (up to the limit) as it goes upstream,
        # or taken at once when it is all here.
        if h.body_kind == BODY_LENGTH and self.rbuf.size() >= h.content_length:
            self.retry_body = PyBytes_FromStringAndSize(<char *>self.rbuf.head(),
                                                        <Py_ssize_t>h.content_length)
        elif h.body_kind == BODY_CHUNKED or h.content_length <= BODY_COPY_MAX_BYTES:
            if self.body_copy is None:
                self.body_copy = []
                self.body_copy_bytes = 0

    cdef void _send_mirrors(self, Route route, bytes head, bytes body):
        send_mirrors(self.ctx.loop, route, head, body)

    cdef void _keep_body_copy(self, list pieces, Py_ssize_t first):
        # A copy of the body bytes going upstream, for mirrors and retries, up to the limit
        # (beyond it: no mirror, no retry).
        cdef Cluster cl
        for i in range(first, len(pieces)):
            piece = bytes(pieces[i])
            self.body_copy_bytes += len(piece)
            self.body_copy.append(piece)
        if self.body_copy_bytes > BODY_COPY_MAX_BYTES:
            if self.mirror_head is not None:
                for cl, _, _ in self.route.mirrors:
                    cl.counters.v[CS_RQ_SHADOW_SKIPPED] += 1
            self.body_copy = None
            self.mirror_head = None

    cdef void _end_retry(self):
        if self.retry_active:
            self.retry_active = False
            self.cluster.retries_active -= 1

    cdef bint _try_retry(self, int status, bint no_response, bint connect_failure):
        # A try failed (a status, or no response at all) and nothing reached the client:
        # schedule the next try if the route's policy allows. Requests with a body are not
        # retried (their body streamed upstream and is not kept).
        cdef RetryPolicy rp = self.retry
        cdef Cluster cl = self.cluster
        cdef int64_t wait_ms
        if (self.attempts > rp.num_retries or self.resp_started or self.req is None
                or (self.req.body_kind != BODY_NONE
                    and (self.retry_body is None or not self.req_done))):
            return False                # (a body not all kept cannot be sent twice)
        if no_response:
            if not rp.retries_no_response(connect_failure):
                return False
        elif not rp.retries_status(status):
            return False
        if self.rq_deadline_ms and now_ms() >= self.rq_deadline_ms:
            return False
        if not self.retry_active:
            if cl.retries_active >= cl.max_retries:
                cl.counters.v[CS_RQ_RETRY_OVERFLOW] += 1
                return False
            self.retry_active = True
            cl.retries_active += 1
        cl.counters.v[CS_RQ_RETRY] += 1
        if rp.previous_hosts:
            if self.tried is None:
                self.tried = []
            self.tried.append(self.ep)
        self.attempts += 1
        self.state = DS_CONNECTING
        # the route timeout still runs over the wait; the try's own deadline comes later
        if self.rq_deadline_ms:
            self._set_deadline(DL_RETRY_WAIT, max(1, self.rq_deadline_ms - now_ms()))
        else:
            self.deadline_ms = 0
            self.deadline_kind = DL_NONE
        wait_ms = rp.backoff_ms(self.attempts - 1)
        self.retry_timer = self.ctx.loop.call_later(wait_ms / 1000.0, self._on_retry_timer)
        return True

    def _on_retry_timer(self):
        self.retry_timer = None
        if self.state != DS_CONNECTING or self.req is None:
            return
        try:
            self._retry_now()
            self._flush()
            self._update_reading()
        except BaseException:
            log.exception("internal error retrying a request")
            self._abort()

    cdef Endpoint _pick_original(self, Cluster cluster, Head h):
        # ORIGINAL_DST: where the client addressed the connection, or (use_http_header) the
        # "ip:port" a request header names; a header that is not one falls back
        cdef bytes v
        if cluster.origdst_header is not None:
            v = h.header_value(cluster.origdst_header, len(cluster.origdst_header))
            if v is not None:
                dst = _parse_ip_port(v)
                if dst is not None:
                    return cluster.pick_original(dst)
        if self.dst is None:
            self.dst = redirected_dst(self.transport)
        return cluster.pick_original(self.dst)

    def set_original_dst(self, str host, int port):
        self.dst = (host, port)

    cdef void _retry_now(self):
        cdef Cluster cl = self.cluster
        cdef Endpoint ep = self._pick_original(cl, self.req) if cl.original_dst else cl.pick()
        cdef int n = self.retry.host_selection_attempts
        if self.tried is not None:
            while ep is not None and n > 0 and ep in self.tried:
                ep = cl.pick()              # prefer an endpoint not tried yet
                n -= 1
        if ep is None:
            self._local_response(503, b"no_healthy_upstream", b"no healthy upstream\n",
                                 LS_ERR_NO_HEALTHY_UPSTREAM)
            return
        self.ep = ep
        self._acquire_upstream()

    def _on_connected(self, task, Cluster cl, Endpoint ep):
        # cl, ep: those the connection was for (self.cluster may have moved on since)
        cdef HttpUpstream up
        cl.cx_connecting -= 1
        if task.cancelled():                # the connect timed out (DL_CONNECT)
            if not cl.http2:                # (HTTP/2: the shared connection counts itself)
                cl.counters.v[CS_CX_CONNECT_FAIL] += 1
                ep.cx_connect_fail += 1
            ep.connect_failing = True
            _wake_pending(cl, ep)           # the room of the connection it would have been
            return
        exc = task.exception()
        if exc is not None:
            if not cl.http2:
                cl.counters.v[CS_CX_CONNECT_FAIL] += 1
                ep.cx_connect_fail += 1
            ep.connect_failing = True
            _wake_pending(cl, ep)
            if self.connect_task is task and self.state == DS_CONNECTING:
                self.connect_task = None
                self._leave_pending()
                if self.cluster.od_enabled:
                    self.cluster.observe_local(self.ep, 503)
                rlog.warning((self.cluster.name, "connect"),
                             "cluster %s: connect to %s:%s failed: %s", self.cluster.name,
                            self.ep.host, self.ep.port, exc)
                if self.retry is not None and self._try_retry(503, True, True):
                    return
                self._local_response(503, b"connect_failed", b"upstream connect failed\n",
                                     LS_ERR_CONNECT_FAILED)
                self._flush()
                self._update_reading()
            return
        up = task.result()
        ep.connect_failing = False
        if cl.od_split:
            ep.consecutive_local = 0            # a local-origin success
        if self.connect_task is task and self.state == DS_CONNECTING:
            self.connect_task = None
            self._take_connection(up, False)
        else:
            up._release()                    # nobody waits for it any more: pool it

    cdef void _bind(self, HttpUpstream up):
        cdef list pieces
        self.up = up
        self.state = DS_FORWARDING
        self._arm_stream_idle()
        self.cluster.counters.v[CS_RQ_TOTAL] += 1
        self.cluster.counters.v[CS_RQ_ACTIVE] += 1
        self.ep.active_requests += 1
        self.ep.rq_total += 1
        if self.write_paused:
            up.pause_reading()
        # an id is generated only for a request that has none (in a mesh most carry one);
        # every try of a retried request carries the same
        if self.retry is not None and self.attempts > 1:
            rid = self.retry_rid
        else:
            rid = None if has_request_id(self.req) else make_request_id()
            if self.retry is not None:
                self.retry_rid = rid
        add = self.route.headers_to_add
        if self.route.attempt_count_header:     # include_request_attempt_count
            add = add + ((b"x-envoy-attempt-count",
                          b"%d" % (self.attempts if self.retry is not None else 1)),)
        head = build_request_head(self.req, self.client_ip, rid, add,
                                  self.route.headers_to_remove, True)
        if self.ctx.access_log is not None:
            self.rq_id = rid if rid is not None else client_request_id(self.req)
        if self.req_done:
            if self.retry_body is not None and self.attempts > 1:
                up.transport.write(head + self.retry_body)      # another try, body and all
            else:
                up.transport.write(head)
            self._request_forwarded()
        else:
            self._forward_body_with(head)

    cdef void _forward_body(self):
        self._forward_body_with(None)

    cdef _forward_body_with(self, bytes head):
        # Move the request body bytes that are here to the upstream, one write.
        cdef list pieces = [head] if head is not None else []
        cdef Py_ssize_t n, used, off, ln, pos
        cdef int64_t limit = self.ctx.max_request_body_bytes
        cdef Head h = self.req
        if h.body_kind == BODY_LENGTH:
            n = <Py_ssize_t>min64(self.rbuf.size(), self.body_left)
            if (n and head is not None and n == self.body_left and n <= SMALL_BODY_BYTES
                    and self.body_copy is None):
                pieces[0] = join_head_body(head, self.rbuf.head(), n)   # whole small request
                self.rbuf.consume(n)
                self.body_left = 0
            elif n:
                pieces.append(self.rbuf.take_slice(n))
                self.body_left -= n
            if self.body_left == 0:
                self.req_done = True
        else:
            pos = 0
            while pos < self.rbuf.size() and self.chunker.state != CH_DONE:
                used = self.chunker.feed(self.rbuf.head() + pos, self.rbuf.size() - pos,
                                         &off, &ln)
                if self.chunker.state == CH_ERROR:
                    self._request_body_error(400, b"bad_request", LS_ERR_BAD_REQUEST)
                    return
                pos += used
            if limit and self.chunker.body_bytes > limit:
                self._request_body_error(413, b"body_too_large", LS_ERR_BODY_TOO_LARGE)
                return
            if pos:
                pieces.append(self.rbuf.take_slice(pos))
            if self.chunker.state == CH_DONE:
                self.req_done = True
        if self.body_copy is not None:
            self._keep_body_copy(pieces, 1 if head is not None else 0)
        write_pieces(self.up.transport, pieces)
        if self.req_done:
            self._request_forwarded()

    cdef _request_body_error(self, int status, bytes reason, int slot):
        # The request body turned out malformed or too large after forwarding began: the
        # upstream exchange is abandoned; the client gets an error if no response started.
        self._drop_upstream()
        if self.resp_started:
            self.ctx.counters.v[slot] += 1
            self._abort()
        else:
            self._fail_and_linger(status, reason, slot)

    cdef void _request_forwarded(self):
        # The whole request is upstream: the response timeout runs until its head arrives.
        cdef int64_t timeout_ms
        if self.body_copy is not None:          # the whole body went: its copy is complete
            body = b"".join(self.body_copy)
            self.body_copy = None
            if self.mirror_head is not None:
                self._send_mirrors(self.route, self.mirror_head, body)
                self.mirror_head = None
            if self.retry is not None:
                self.retry_body = body
        if self.route is not None and not self.resp_started:
            timeout_ms = self.route.timeout_ms
            if self.retry is not None:
                if self.rq_deadline_ms:                 # what is left of the route timeout
                    timeout_ms = max(1, self.rq_deadline_ms - now_ms())
                if self.retry.per_try_timeout_ms and (
                        timeout_ms <= 0 or self.retry.per_try_timeout_ms < timeout_ms):
                    timeout_ms = self.retry.per_try_timeout_ms
            if timeout_ms > 0:
                self._set_deadline(DL_RESPONSE, timeout_ms)

    cdef void _discard_body(self):
        # Drop the body of a request answered locally, then go on to the next request.
        cdef Py_ssize_t n, used, off, ln, pos
        cdef Head h = self.req
        if h.body_kind == BODY_LENGTH:
            n = <Py_ssize_t>min64(self.rbuf.size(), self.body_left)
            self.rbuf.consume(n)
            self.body_left -= n
            if self.body_left == 0:
                self.req_done = True
        elif h.body_kind == BODY_CHUNKED:
            pos = 0
            while pos < self.rbuf.size() and self.chunker.state != CH_DONE:
                used = self.chunker.feed(self.rbuf.head() + pos, self.rbuf.size() - pos,
                                         &off, &ln)
                if self.chunker.state == CH_ERROR:
                    self.rbuf.consume(self.rbuf.size())
                    self._close()
                    return
                pos += used
            self.rbuf.consume(pos)
            if self.chunker.state == CH_DONE:
                self.req_done = True
        else:
            self.req_done = True
        if self.req_done:
            self._finish_request()

    cdef void _finish_request(self):
        # The response is complete (and the request consumed): next request, or close.
        cdef int64_t latency_us
        if self.req is not None:
            self.ctx.counters.v[LS_RQ_ACTIVE] -= 1
            latency_us = now_us() - self.rq_start_us
            self.ctx.counters.record_us(latency_us)
            if self.cluster is not None:
                self.cluster.counters.record_us(latency_us)
            if self.ctx.access_log is not None:
                self._access_log()
        if self.cluster is not None:
            self._end_retry()
        if self.extra_rsp_headers is not None:
            self.extra_rsp_headers = None
        if self.body_copy is not None or self.retry_body is not None:
            self.body_copy = None               # (the body never all went: no mirror)
            self.mirror_head = None
            self.retry_body = None
        self.req = None
        self.route = None
        self.cluster = None
        self.ep = None
        self.up = None
        # Close only after a response that said `Connection: close` (close_after is set
        # whenever it did, draining included). A response whose head left before a drain
        # began promised keep-alive: the client may already be sending its next request,
        # which is answered (with `Connection: close`) rather than met by a closed socket.
        if self.close_after:
            if self.req_done:
                self._close()
            else:
                self._linger()          # unread request body: don't let it turn into an RST
            return
        self.state = DS_HEAD
        self._set_deadline(DL_IDLE, self.ctx.idle_timeout_ms)
        self._process()                     # pipelined requests already buffered

    # ---------------------------------------------------- called by the upstream

    cdef void _on_response_head(self, bytes head):
        if self.extra_rsp_headers is not None:  # from the HTTP filters (rate limit)
            head = head[:len(head) - 2] + self.extra_rsp_headers + b"\r\n"
        self.resp_started = True
        if self.deadline_kind == DL_RESPONSE:
            self._arm_stream_idle()
        if self.ctx.access_log is not None:
            self.rsp_head = head
        self.out.append(head)

    cdef void _on_response_body(self, list pieces):
        self.out.extend(pieces)

    cdef void _on_response_complete(self):
        self.up = None
        self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
        self.ep.active_requests -= 1
        # the endpoint's own latency: only what it answered (not local 503s on its behalf)
        endpoint_latency_us(self.ep, now_us() - self.rq_start_us)
        if not self.req_done:
            # answered before the request body was all here: cannot resynchronise
            self.close_after = True
        self._finish_request()
        self._update_reading()

    cdef void _on_upstream_lost(self, bint before_head, bint retriable, int reason_slot):
        # The upstream connection died while carrying our request. (An HTTP/2 cluster's
        # stream reset or connection lost before the response: 503, as Envoy answers.)
        cdef int status = 503 if self.cluster.http2 else 502
        self.up = None
        self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
        self.ep.active_requests -= 1
        if before_head:
            if retriable and not self.retried and self.req.body_kind == BODY_NONE:
                if self.cluster.retries_active >= self.cluster.max_retries:
                    self.cluster.counters.v[CS_RQ_RETRY_OVERFLOW] += 1
                else:
                    # a pooled connection the upstream had closed: once more on a fresh one
                    self.retried = True
                    self.retry_active = True
                    self.cluster.retries_active += 1
                    self.cluster.counters.v[CS_RQ_RETRY] += 1
                    self._acquire_upstream()
                    return
            if self.cluster.od_enabled:
                self.cluster.observe(self.ep, status)
            if self.retry is not None and self._try_retry(status, True, False):
                return
            if not self.req_done:
                self.close_after = True
            if reason_slot == LS_ERR_UPSTREAM_PROTOCOL:
                self._local_response(502, b"upstream_protocol",
                                     b"upstream sent a malformed response\n", reason_slot)
            else:
                # 503, as Envoy answers a reset before the response headers
                self._local_response(503, b"upstream_reset", b"upstream connection reset\n",
                                     reason_slot)
        else:
            # never pass off a truncated response as complete: the client sees a reset
            self.ctx.counters.v[reason_slot] += 1
            self.rsp_flag = (b"upstream_protocol" if reason_slot == LS_ERR_UPSTREAM_PROTOCOL
                             else b"reset_mid_response")
            self._abort()

    # ------------------------------------------------------ local answers, close

    cdef void _local_response(self, int status, bytes reason, bytes body, int err_slot):
        # Answer the current request from the proxy; the connection stays usable when the
        # request body can still be skipped, else it closes after this response.
        cdef Head h = self.req
        if err_slot >= 0:
            self.ctx.counters.v[err_slot] += 1
        self.rsp_flag = reason
        if not self.req_done and h.expect_continue and not self.sent_continue:
            self.close_after = True          # the client holds its body back: don't wait
        if self.ctx.draining:
            self.close_after = True
        self._count_response(status)
        self.resp_started = True
        self._arm_stream_idle()             # covers dropping the rest of the body
        resp = error_response(status, reason, body, self.close_after)
        if err_slot == LS_ERR_OVERFLOW:         # as Envoy marks a circuit breaker's 503
            resp = resp.replace(b"\r\n\r\n", b"\r\nx-envoy-overloaded: true\r\n\r\n", 1)
        if self.extra_rsp_headers is not None:  # from the HTTP filters (rate limit)
            resp = resp.replace(b"\r\n\r\n", b"\r\n" + self.extra_rsp_headers + b"\r\n", 1)
        if self.ctx.access_log is not None:
            self._note_local_response(resp)
        self.out.append(resp)
        if self.close_after and not self.req_done:
            self._linger()
            return
        self.state = DS_DISCARD
        if not self.in_process:
            self._process()

    cdef void _fail_and_linger(self, int status, bytes reason, int err_slot):
        # A malformed or oversized request: answer, shut our write side, drop the rest.
        self.ctx.counters.v[err_slot] += 1
        self._count_response(status)
        self.rsp_flag = reason
        self.resp_started = True
        resp = error_response(status, reason, b"", True)
        self.out.append(resp)
        if self.ctx.access_log is not None:
            self._note_local_response(resp)
            if self.req is None:
                self._access_log()          # a head that never parsed: logged as "-"
        self._linger()

    cdef _linger(self):
        if self.req is not None:
            self.ctx.counters.v[LS_RQ_ACTIVE] -= 1
            if self.ctx.access_log is not None:
                self._access_log()
            self.req = None
        self.state = DS_LINGER
        if self.rbuf.size():
            self.rbuf.consume(self.rbuf.size())
        self._set_deadline(DL_LINGER, LINGER_MS)
        self._flush()
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
        except (OSError, RuntimeError):
            self.transport.close()

    cdef void _flush(self):
        # Everything for the client goes through self.out: one write per event, in order.
        cdef list out = self.out
        if out:
            if self.state != DS_CLOSED or self.closing_flush:
                if len(out) == 1:
                    self.transport.write(out[0])
                else:
                    self.transport.writelines(out)
            out.clear()

    cdef void _close(self):
        if self.state != DS_CLOSED:
            self.closing_flush = True
            self._flush()
            self.state = DS_CLOSED
            self.deadline_ms = 0
            self.transport.close()

    cdef bint _close_idle(self):
        # Close a connection between requests without racing a request already on the
        # wire: only when nothing is buffered here or unread in the kernel, and as a
        # lingering close (FIN, then drop input until the peer closes), so a request that
        # crosses our FIN meets an orderly end of stream, never an RST. Returns False (and
        # leaves the connection alone) when a request has arrived.
        if self.state != DS_HEAD or self.rbuf.size() or unread_bytes(self.transport):
            return False
        self.ctx.counters.v[LS_CX_IDLE_CLOSED] += 1
        self._linger()
        return True

    cdef void _abort(self):
        cdef HttpUpstream up = self.up
        if up is not None:
            self.up = None
            up.ds = None
            up._close()
        self.state = DS_CLOSED
        self.deadline_ms = 0
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()

    cdef void _set_deadline(self, int kind, int64_t timeout_ms):
        self.deadline_kind = kind
        self.deadline_ms = now_ms() + timeout_ms if timeout_ms > 0 else 0

    cdef void _arm_stream_idle(self):
        # While an exchange is under way and no sharper deadline runs, it must move some
        # bytes every stream_idle_timeout_ms. Reads only bump a counter; the sweeper checks it
        # when the deadline passes and re-arms, so the hot path never touches the clock.
        self.reads_seen = self.reads
        self._set_deadline(DL_STREAM_IDLE, self.ctx.stream_idle_timeout_ms)

    cdef void _drop_upstream(self):
        # Give up on the upstream side of the request in progress (its connection closes).
        cdef HttpUpstream up = self.up
        self.up = None
        if up is not None:
            up.ds = None
            up._close()
            self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
            self.ep.active_requests -= 1

    cdef void _on_stream_idle(self):
        # Nothing moved either way for stream_idle_timeout_ms.
        self.ctx.counters.v[LS_ERR_STREAM_IDLE] += 1
        if self.state == DS_FORWARDING and not self.resp_started:
            self._drop_upstream()
            if self.req_done:               # the upstream never answered
                self._local_response(504, b"stream_idle_timeout",
                                     b"upstream sent nothing for too long\n", -1)
            else:                           # the client stopped sending its body
                self.close_after = True
                self._local_response(408, b"stream_idle_timeout",
                                     b"request body stalled\n", -1)
        else:                               # mid-response, or dropping a body: just close
            self.rsp_flag = b"stream_idle_timeout"
            self._drop_upstream()
            self._abort()

    cdef void _update_reading(self):
        cdef bint want_pause
        if self.state == DS_CLOSED:
            return
        if self.rbuf.is_full():
            self.pause_mask |= PAUSE_RBUF_FULL
        else:
            self.pause_mask &= ~PAUSE_RBUF_FULL
        want_pause = self.pause_mask != 0
        if want_pause != self.reading_paused:
            self.reading_paused = want_pause
            if want_pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    cdef void _count_response(self, int status):
        self.ctx.counters.v[status_class_slot(status, LS_RSP_1XX)] += 1
        self.rsp_status = status

    cdef void _note_local_response(self, bytes resp):
        # for the access log: a response the proxy made, head and body in one piece
        cdef Py_ssize_t end = resp.find(b"\r\n\r\n") + 4
        self.rsp_head = resp[:end]
        self.rsp_body_bytes = len(resp) - end

    cdef void _access_log(self):
        # One line for the request that ends now (the format: fastmesh/_core/accesslog.pyx).
        cdef AccessLog alog = <AccessLog>self.ctx.access_log
        cdef Head h = self.req
        cdef bytes request_line = None
        cdef Py_ssize_t eol
        cdef int64_t duration_us = 0
        cdef Exchange ex = None
        if h is not None:
            eol = h.raw.find(b"\r\n")
            if eol >= 0:
                request_line = h.raw[:eol]
            duration_us = now_us() - self.rq_start_us
        if alog.wants_exchange:
            ex = Exchange.__new__(Exchange)
            ex.client_port = self.client_port
            ex.transport = self.transport
            ex.rsp_head = self.rsp_head
            ex.bytes_sent = self.rsp_body_bytes
            if h is not None:
                if h.body_kind == BODY_LENGTH:
                    ex.bytes_received = h.content_length - self.body_left
                elif h.body_kind == BODY_CHUNKED and self.chunker is not None:
                    ex.bytes_received = self.chunker.body_bytes
        try:
            alog.add(
                duration_us, self.client_ip, request_line, self.rsp_status, self.rsp_flag,
                self.cluster.name if self.cluster is not None else None, self.ep, self.rq_id,
                h.raw if h is not None else None, ex)
        except Exception:
            log.exception("listener %s: access log failed", self.ctx.name)

    cpdef void on_deadline(self, int64_t now):
        # Called by the sweeper when deadline_ms has passed.
        cdef int kind = self.deadline_kind
        cdef HttpUpstream up
        self.deadline_ms = 0
        self.deadline_kind = DL_NONE
        if self.state == DS_CLOSED:
            return
        if kind == DL_IDLE:
            if not self._close_idle():
                self._set_deadline(DL_IDLE, self.ctx.idle_timeout_ms)
        elif kind == DL_HEAD:
            self._fail_and_linger(408, b"head_timeout", LS_ERR_HEAD_TIMEOUT)
        elif kind == DL_CONNECT:
            if self.connect_task is not None:
                self.connect_task.cancel()          # its callback counts the failure
                self.connect_task = None
            self._leave_pending()
            if self.cluster.od_enabled:
                self.cluster.observe_local(self.ep, 503)
            if self.retry is not None and self._try_retry(503, True, True):
                self._flush()
                self._update_reading()
                return
            self._local_response(503, b"connect_timeout", b"upstream connect timeout\n",
                                 LS_ERR_CONNECT_FAILED)
        elif kind == DL_RESPONSE:
            self.cluster.counters.v[CS_RQ_TIMEOUT] += 1
            if self.cluster.od_enabled:
                self.cluster.observe_local(self.ep, 504)
            self._drop_upstream()
            if self.retry is not None and self._try_retry(504, True, False):
                self._flush()
                self._update_reading()
                return
            if not self.req_done:
                self.close_after = True
            self._local_response(504, b"upstream_timeout", b"upstream timeout\n",
                                 LS_ERR_UPSTREAM_TIMEOUT)
        elif kind == DL_RETRY_WAIT:
            # the route timeout passed while waiting to retry
            if self.retry_timer is not None:
                self.retry_timer.cancel()
                self.retry_timer = None
            self._local_response(504, b"upstream_timeout", b"upstream timeout\n",
                                 LS_ERR_UPSTREAM_TIMEOUT)
        elif kind == DL_PENDING:
            # no connection came free within the route timeout (Envoy: 504)
            self._leave_pending()
            self.cluster.counters.v[CS_RQ_TIMEOUT] += 1
            self._local_response(504, b"upstream_timeout", b"upstream timeout\n",
                                 LS_ERR_UPSTREAM_TIMEOUT)
        elif kind == DL_LINGER:
            self._abort()
        elif kind == DL_STREAM_IDLE:
            if self.reads != self.reads_seen:
                self._arm_stream_idle()     # bytes moved since it was armed: not idle
                return
            self._on_stream_idle()
        self._flush()
        self._update_reading()

    # -- control world --
    def close_if_idle_for(self, int64_t now, int64_t idle_ms):
        """Drain: close if between requests and idle at least idle_ms (a busy connection
        is closed by the `Connection: close` on its next response instead)."""
        if (self.state == DS_HEAD and self.deadline_kind == DL_IDLE
                and self.deadline_ms - self.ctx.idle_timeout_ms <= now - idle_ms):
            self._close_idle()

    def abort(self):
        self._abort()

    # -- introspection for the admin API and tests --
    @property
    def state_name(self):
        return ("head", "connecting", "forwarding", "discard", "linger", "closed")[self.state]

    @property
    def deadline(self):
        return self.deadline_ms


# ======================================================================= upstream

cdef Endpoint _pick_by_hash(Cluster cluster, tuple policies, Head h, bytes client_ip):
    # No policy yields a value: a random endpoint.
    cdef uint64_t acc = 0
    if not request_hash(policies, h, client_ip, &acc):
        return cluster.pick()
    return cluster.pick_hash(acc)


cdef bint request_hash(tuple policies, Head h, bytes client_ip, uint64_t *out) except -1:
    # The request's hash under the route's hash policies (Envoy's: xxh64 of each value,
    # combined as rotl(hash, 1) ^ next; a terminal policy that yields a value ends the
    # list) into *out; False when no policy yields a value.
    cdef uint64_t acc = 0, one
    cdef bint have = False
    cdef int kind
    cdef bytes name, value
    for kind, name, terminal in policies:
        value = None
        if kind == 0:                       # header
            value = h.header_value(name, len(name))
        elif kind == 1:                     # cookie
            value = _cookie_value(h.header_value(b"cookie", 6), name)
        elif kind == 2:                     # source IP
            value = client_ip
        else:                               # query parameter
            value = _query_value(h, name)
        if value is None:
            continue
        one = xxh64(value, len(value), 0)
        acc = ((acc << 1) | (acc >> 63)) ^ one if have else one
        have = True
        if terminal:
            break
    out[0] = acc
    return have


cdef tuple _parse_ip_port(bytes v):
    # "10.0.0.1:80" or "[::1]:80" -> (ip, port); None for anything else
    cdef str text
    try:
        text = v.decode("ascii").strip()
        host, _, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:len(host) - 1]
        p = int(port)
        if not 0 < p < 65536:
            return None
        return (str(ipaddress.ip_address(host)), p)
    except (ValueError, UnicodeDecodeError):
        return None


cdef bytes _cookie_value(bytes header, bytes name):
    if header is None:
        return None
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            return v
    return None


cdef bytes _query_value(Head h, bytes name):
    target = h.raw[h.target_off:h.target_off + h.target_len]
    _, sep, query = target.partition(b"?")
    if not sep:
        return None
    for part in query.split(b"&"):
        k, eq, v = part.partition(b"=")
        if k == name:
            return v
    return None


cdef void send_mirrors(loop, Route route, bytes head, bytes body) except *:
    # the route's mirror clusters get a copy each (drawn by their share), HTTP/1.1
    cdef Cluster cl
    for cl, per_million, host_suffix in route.mirrors:
        if per_million < 1000000 and <int>(fast_random() % 1000000) >= per_million:
            continue
        send_shadow(loop, cl, shadow_head(head, host_suffix) + body, route.timeout_ms)


def shadow_head(bytes head, bint host_suffix):
    """A request head for a mirror: Host "name[:port]" becomes "name-shadow[:port]" (as
    Envoy's), and the connection closes after the answer (which is dropped)."""
    lines = head[:len(head) - 4].split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].lower()
        if name == b"connection":
            continue
        if name == b"host" and host_suffix:
            value = line.split(b":", 1)[1].strip()
            host, sep, port = value.rpartition(b":")
            if sep and port.isdigit() and not value.endswith(b"]"):
                value = host + b"-shadow:" + port
            else:
                value = value + b"-shadow"
            line = b"host: " + value
        out.append(line)
    out.append(b"connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def send_shadow(loop, Cluster cl, bytes data, int timeout_ms):
    cdef Endpoint ep
    if cl.http2:            # mirrors are HTTP/1.1 bytes: not sent to an HTTP/2 cluster
        cl.counters.v[CS_RQ_SHADOW_SKIPPED] += 1
        return
    ep = cl.pick()
    if ep is None:
        return
    cl.counters.v[CS_RQ_SHADOW] += 1
    cl.counters.v[CS_CX_TOTAL] += 1
    # (an asyncio.Protocol, not a BufferedProtocol: on the loop, never the engine)
    task = asyncio.ensure_future(open_connection(
        loop, lambda: _ShadowProtocol(cl, data, timeout_ms), cl, ep, engine=False), loop=loop)
    task.add_done_callback(_shadow_connected)


def _shadow_connected(task):
    if not task.cancelled() and task.exception() is not None:
        pass                # a mirror's failure is its own: nothing else to do


class _ShadowProtocol(asyncio.Protocol):
    """One mirrored request: send it, read the answer's status, drop the rest, close."""

    def __init__(self, Cluster cluster, bytes data, int timeout_ms):
        self.cluster, self.data, self.timeout_ms = cluster, data, timeout_ms
        self.transport, self.timer, self.counted = None, None, False

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.data)
        self.data = None
        if self.timeout_ms > 0:
            self.timer = asyncio.get_event_loop().call_later(self.timeout_ms / 1000.0,
                                                             transport.abort)

    def data_received(self, data):
        cdef Cluster cl = self.cluster
        if not self.counted and data.startswith(b"HTTP/1.") and len(data) >= 12:
            self.counted = True
            status = data[9:12]
            if status.isdigit():
                cl.counters.v[status_class_slot(int(status), CS_RSP_1XX)] += 1

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


cdef class _ConnectDone:
    # The done callback of a connection attempt: remembers what it was for.
    cdef HttpDownstream ds
    cdef Cluster cl
    cdef Endpoint ep

    def __cinit__(self, HttpDownstream ds, Cluster cl, Endpoint ep):
        self.ds, self.cl, self.ep = ds, cl, ep

    def __call__(self, task):
        self.ds._on_connected(task, self.cl, self.ep)


cdef void _wake_pending(Cluster cl, Endpoint ep):
    # Room for a connection came free (one closed, or a connect ended): requests queued at
    # max_connections for this endpoint get new connections while the limit allows.
    cdef HttpDownstream ds
    while ep.http_pending and cl.counters.v[CS_CX_ACTIVE] + cl.cx_connecting < cl.max_connections:
        ds = ep.http_pending.pop(0)
        ds.queued = False
        if ds.state != DS_CONNECTING:
            continue
        ds._open_connection()


async def _connect(loop, Cluster cluster, Endpoint ep):
    cluster.counters.v[CS_CX_TOTAL] += 1
    # (through the process's I/O engine when one is installed and the cluster is plain)
    _, proto = await open_connection(loop, lambda: HttpUpstreamProtocol(cluster, ep),
                                     cluster, ep)
    return proto


cdef class HttpUpstream:
    def __init__(self, Cluster cluster, Endpoint ep):
        self.cluster = cluster
        self.ep = ep
        self.rbuf = RecvBuffer(65536, UPSTREAM_MAX_HEAD_BYTES + 65536)   # big bodies: few reads
        self.parser = HeadParser(False, UPSTREAM_MAX_HEAD_BYTES, 200)
        self.chunker = ChunkedFramer()
        self.state = US_CONNECTING
        debug.count_alloc(debug.LEAK_UPSTREAM)

    def __dealloc__(self):
        debug.count_free(debug.LEAK_UPSTREAM)

    # ------------------------------------------------------------ loop callbacks

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(262144, 65536)
        self.state = US_IDLE
        if not self.bridged:
            self.cluster.counters.v[CS_CX_ACTIVE] += 1

    cdef int received(self, Py_ssize_t nbytes) except -1:
        cdef HttpDownstream ds
        self.rbuf.advance(nbytes)
        try:
            if self.state != US_ACTIVE or self.ds is None:
                # bytes nobody asked for: this connection is out of sync
                self._close()
                return 0
            self.got_bytes = True
            ds = self.ds
            ds.reads += 1
            self._process()
            ds._flush()
        except BaseException:
            log.exception("cluster %s: internal error on an upstream connection",
                          self.cluster.name)
            if self.ds is not None:
                self.ds._abort()
            self._close()
        return 0

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        cdef HttpDownstream ds = self.ds
        cdef int prev = self.state
        self.state = US_CLOSED
        if not self.bridged:
            self.cluster.counters.v[CS_CX_ACTIVE] -= 1
        if self.ep.http_pending:
            _wake_pending(self.cluster, self.ep)    # a connection's room came free
        if prev == US_IDLE:
            try:
                self.ep.http_idle.remove(self)
                self.cluster.counters.v[CS_CX_IDLE_CLOSED] += 1
            except ValueError:
                pass
        if ds is None:
            return
        self.ds = None
        try:
            if self.head_done and self.body_kind == BODY_CLOSE and exc is None:
                # close-delimited body: the close is its end
                if self.te_mode == TE_ADD_CHUNKED:
                    ds._on_response_body([LAST_CHUNK])
                self.reusable = False
                ds._on_response_complete()
            elif self.head_done:
                ds._on_upstream_lost(False, False, LS_ERR_RESET_MID_RESPONSE)
            else:
                ds._on_upstream_lost(True, self.reused and not self.got_bytes,
                                     LS_ERR_UPSTREAM_RESET)
            ds._flush()
        except BaseException:
            log.exception("internal error after an upstream connection closed")
            ds._abort()

    def pause_writing(self):
        if self.ds is not None:
            self.ds.pause_mask |= PAUSE_UPSTREAM
            self.ds._update_reading()

    def resume_writing(self):
        if self.ds is not None:
            self.ds.pause_mask &= ~PAUSE_UPSTREAM
            self.ds._update_reading()

    # ----------------------------------------------------------------- exchange

    cdef void _begin(self, HttpDownstream ds, bint reused):
        self.ds = ds
        self.state = US_ACTIVE
        self.reused = reused
        self.head_done = False
        self.got_bytes = False
        self.reusable = False
        self.parser.reset()
        self.parser.request_was_head = ds.req.is_head_method

    cdef void _process(self):
        if not self.head_done:
            if not self._response_head():
                return
        self._response_body()

    cdef bint _response_head(self):
        # Parse response heads until the final one; relay 1xx (except 100, which the proxy
        # answered itself). Returns True once the final head went to the client.
        cdef Py_ssize_t r
        cdef Head h
        cdef HttpDownstream ds = self.ds
        cdef bint client_10, close_client
        while True:
            r = self.parser.feed(self.rbuf.head(), self.rbuf.size())
            if r == PARSE_INCOMPLETE:
                return False
            if r < 0:
                rlog.warning((self.cluster.name, "bad response"),
                             "cluster %s: bad response from %s:%s: %s", self.cluster.name,
                             self.ep.host, self.ep.port, self.parser.error_reason.decode())
                self.ds = None
                self._close()
                ds._on_upstream_lost(True, False, LS_ERR_UPSTREAM_PROTOCOL)
                return False
            self.rbuf.consume(r)
            h = self.parser.head
            self.parser.reset()
            if h.status < 200:
                if h.status == 101:
                    self.ds = None
                    self._close()
                    ds._on_upstream_lost(True, False, LS_ERR_UPSTREAM_PROTOCOL)
                    return False
                if h.status != 100:
                    ds._on_response_head(build_response_head(h, TE_AS_RECEIVED, False, False))
                    ds.resp_started = False
                continue
            break
        client_10 = ds.req.minor == 0
        if client_10 and h.te_codings and h.body_kind != BODY_NONE:
            # a body in a transfer coding (gzip...) cannot be sent to an HTTP/1.0 client,
            # and relaying it uncoded-looking would hand the client corrupt content
            rlog.warning((self.cluster.name, "bad response"),
                         "cluster %s: %s:%s answered an HTTP/1.0 client with transfer "
                         "codings it cannot receive; 502", self.cluster.name, self.ep.host,
                         self.ep.port)
            self.ds = None
            self._close()
            ds._on_upstream_lost(True, False, LS_ERR_UPSTREAM_PROTOCOL)
            return False
        self.cluster.counters.v[status_class_slot(h.status, CS_RSP_1XX)] += 1
        if h.status >= 500:
            self.ep.rq_error += 1
        if self.cluster.od_enabled:
            self.cluster.observe(self.ep, h.status)
        if ds.retry is not None and ds._try_retry(h.status, False, False):
            # this answer is not the client's: another try follows (this connection, with
            # the rest of the answer on it, is closed)
            self.ds = None
            ds.up = None
            self._close()
            self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
            self.ep.active_requests -= 1
            return False
        ds._count_response(h.status)
        self.body_kind = h.body_kind
        self.body_left = h.content_length if h.body_kind == BODY_LENGTH else 0
        self.te_mode = TE_NONE if client_10 else TE_AS_RECEIVED     # no TE to 1.0 clients
        if h.body_kind == BODY_CLOSE:
            if client_10:
                ds.close_after = True
            else:
                self.te_mode = TE_ADD_CHUNKED
        elif h.body_kind == BODY_CHUNKED:
            self.chunker.reset()
            if client_10:
                ds.close_after = True
        self.reusable = not h.conn_close and h.body_kind != BODY_CLOSE
        if not ds.req_done:
            # answered before the request body was all forwarded: once this response is
            # done the client connection cannot be resynchronised, so say it closes
            ds.close_after = True
        close_client = ds.close_after or ds.ctx.draining
        ds.close_after = close_client       # what the head says is what happens after it
        ds._on_response_head(build_response_head(h, self.te_mode, close_client,
                                                  client_10 and not close_client))
        self.head_done = True
        return True

    cdef void _response_body(self):
        cdef list pieces = []
        cdef Py_ssize_t n, used, off, ln, pos, size, last
        cdef bint done = False
        cdef HttpDownstream ds = self.ds
        size = self.rbuf.size()
        if self.body_kind == BODY_NONE:
            done = True
        elif self.body_kind == BODY_LENGTH:
            n = <Py_ssize_t>min64(size, self.body_left)
            ds.rsp_body_bytes += n
            last = len(ds.out) - 1                  # (no negative indexing: wraparound off)
            if (n and n == self.body_left and n <= SMALL_BODY_BYTES and last >= 0
                    and type(ds.out[last]) is bytes):
                # the whole small body is here and the head is still queued: one piece
                ds.out[last] = join_head_body(ds.out[last], self.rbuf.head(), n)
                self.rbuf.consume(n)
                self.body_left = 0
            elif n:
                pieces.append(self.rbuf.take_slice(n))
                self.body_left -= n
            done = self.body_left == 0
        elif self.body_kind == BODY_CHUNKED:
            pos = 0
            while pos < size and self.chunker.state != CH_DONE:
                used = self.chunker.feed(self.rbuf.head() + pos, size - pos, &off, &ln)
                if self.chunker.state == CH_ERROR:
                    rlog.warning((self.cluster.name, "bad response"),
                                 "cluster %s: bad chunked body from %s:%s: %s",
                                 self.cluster.name, self.ep.host, self.ep.port,
                                 self.chunker.error_reason.decode())
                    if pos:
                        ds._on_response_body([self.rbuf.take_slice(pos)])
                    self.ds = None
                    self._close()
                    ds._on_upstream_lost(False, False, LS_ERR_UPSTREAM_PROTOCOL)
                    return
                if self.te_mode == TE_NONE:
                    # de-chunk for an HTTP/1.0 client: only the data spans go out
                    if ln:
                        self.rbuf.consume(pos + off)
                        pieces.append(self.rbuf.take_slice(ln))
                        self.rbuf.consume(used - off - ln)
                        size = self.rbuf.size()
                        pos = 0
                        continue
                pos += used
            if self.te_mode == TE_NONE:
                self.rbuf.consume(pos)
            elif pos:
                pieces.append(self.rbuf.take_slice(pos))
            ds.rsp_body_bytes = self.chunker.body_bytes
            done = self.chunker.state == CH_DONE
        else:
            if size:
                ds.rsp_body_bytes += size
                if self.te_mode == TE_ADD_CHUNKED:
                    pieces.append(b"%x\r\n" % size)
                    pieces.append(self.rbuf.take_slice(size))
                    pieces.append(CRLF)
                else:
                    pieces.append(self.rbuf.take_slice(size))
        if pieces:
            ds._on_response_body(pieces)
        if done:
            if self.rbuf.size():
                self.reusable = False        # bytes past the response: out of sync
            self._complete()

    cdef void _complete(self):
        cdef HttpDownstream ds = self.ds
        self._release()
        ds._on_response_complete()

    cdef void _release(self):
        # Back to the endpoint's idle list if it can carry another request, else closed.
        cdef Endpoint ep = self.ep
        self.ds = None
        if self.reading_paused:
            self.resume_reading()
        if (self.state == US_CLOSED or self.transport is None or self.transport.is_closing()
                or ep.removed or len(ep.http_idle) >= self.cluster.max_idle_per_endpoint
                or (self.state == US_ACTIVE and not self.reusable)):
            self._close()
            return
        cdef HttpDownstream waiting
        while ep.http_pending:
            # a request waits for a connection to this endpoint: it takes this one
            waiting = ep.http_pending.pop(0)
            waiting.queued = False
            if waiting.state != DS_CONNECTING:
                continue
            waiting._take_connection(self, True)
            return
        self.state = US_IDLE
        self.idle_since_ms = now_ms()
        ep.http_idle.append(self)

    cdef void _close(self):
        if self.state != US_CLOSED and self.transport is not None:
            self.state = US_CLOSED
            self.transport.close()              # connection_lost counts it

    cdef void pause_reading(self):
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    cdef void resume_reading(self):
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()


# ------------------------------------------------------------- Python shells

class HttpDownstreamProtocol(HttpDownstream, asyncio.BufferedProtocol):
    """A client connection on an http1 listener."""


class HttpUpstreamProtocol(HttpUpstream, asyncio.BufferedProtocol):
    """A connection to one upstream endpoint."""


def sweep_downstreams(ListenerCtx ctx, int64_t now):
    """Fire passed deadlines of a listener's connections (called every ~100 ms)."""
    cdef HttpDownstream ds
    cdef list due = []
    cdef bint h2 = False
    for c in ctx.conns:
        if not isinstance(c, HttpDownstream):
            h2 = True                       # an HTTP/2 session (codec: auto took it over)
            continue
        ds = c
        if ds.state == DS_HEAD:
            ds.rbuf.release_if_empty()      # between requests: no receive memory held
        if ds.deadline_ms and ds.deadline_ms <= now:
            due.append(ds)
    if h2:                                  # their timeouts, drains and stalls
        from fastmesh._core import h2_proxy
        h2_proxy.sweep_downstreams(ctx, now)
    elif _h2_proxy is not None:             # the HTTP/2 connections this worker's HTTP/1
        _h2_proxy.sweep_upstreams(now)      # sessions use (idle ones closed)
    for ds in due:
        try:
            ds.on_deadline(now)
        except BaseException:
            log.exception("listener %s: error in a deadline handler", ctx.name)
            ds._abort()


def sweep_idle_upstreams(Cluster cluster, int64_t now):
    """Close pooled HTTP/1 connections idle longer than the cluster's idle timeout."""
    cdef Endpoint ep
    cdef HttpUpstream up
    cdef int64_t limit = cluster.idle_timeout_ms
    for ep in cluster.get_endpoints():
        if ep.http_idle:
            for up in ep.http_idle:
                up.rbuf.release_if_empty()
            stale = [up for up in ep.http_idle if now - up.idle_since_ms >= limit]
            for up in stale:
                ep.http_idle.remove(up)
                cluster.counters.v[CS_CX_IDLE_CLOSED] += 1
                up._close()


def drain_endpoint(Endpoint ep):
    """Close the idle connections of an endpoint removed from its cluster."""
    cdef HttpUpstream up
    idle = list(ep.http_idle)
    ep.http_idle.clear()
    for up in idle:
        up._close()


def py_now_ms():
    return now_ms()


def debug_leak_counts():
    """Live objects (allocations minus frees) counted by this module, by kind. Counted only
    in a debug build (FASTMESH_DEBUG=1); a release build returns zeros."""
    return {"debug_build": bool(debug.FASTMESH_DEBUG), "blocks": debug.leaks[0],
            "downstream": debug.leaks[1], "upstream": debug.leaks[2], "inflight": debug.leaks[3]}
