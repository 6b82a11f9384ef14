"""HTTP/2 proxying: see h2_proxy.pxd.

A stream's life: the client's HEADERS are routed by the listener's route table exactly as an
HTTP/1 request would be (the same Route objects; the pseudo-headers stand for the request
line and Host); the cluster picks an endpoint; the endpoint's HTTP/2 connection (made on
first use, shared by every stream to it from this worker) opens a stream with the same
headers (the route's additions and removals applied); DATA and trailers follow both ways as
they arrive. Each direction moves only what the receiving side's windows allow: the rest
waits (as views of the receive buffer, never copied) and the sender's window is given back
only for what was passed on, so a slow reader slows the writer down end to end.

Answers the proxy makes itself (no route, no healthy endpoint, connect failure, timeout,
upstream reset before the response) are HTTP answers with `x-fastmesh-error`, or for a gRPC
request (content-type application/grpc...) a trailers-only gRPC answer (HTTP 200 with
grpc-status and grpc-message) carrying Envoy's mapping of the HTTP status: 404 ->
UNIMPLEMENTED (12), 429/502/503/504 -> UNAVAILABLE (14), 400 -> INTERNAL (13), else UNKNOWN.

A drain sends GOAWAY (graceful: streams already open finish) and closes the connection once
its streams are done.

Timeouts, from the listener's sweep: the route timeout until the response headers; on routes
with grpc_timeout_header_max_ms, a gRPC request's grpc-timeout for the whole stream instead
(DEADLINE_EXCEEDED, as Envoy's max_stream_duration); and a response stream stalled on the
client's flow-control window for the listener's stream idle timeout is reset both ways.

HTTP/1.1 clients reach HTTP/2 clusters through H2Bridge (see h2_proxy.pxd): the transport of
an http_proxy.HttpUpstream, so the HTTP/1 session's machinery stays as it is, each request a
stream on the same per-endpoint H2Upstream connections HTTP/2 clients use.
"""
import asyncio
import logging

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memcmp, memcpy

from libc.stdint cimport int64_t, uint32_t

from fastmesh._core.buffer cimport RecvBuffer
from fastmesh._core.clock cimport now_ms, now_us
from fastmesh._core.accesslog cimport AccessLog, Exchange
from fastmesh._core.context cimport ListenerCtx
from fastmesh._core.h2 cimport (H2Connection, H2Consumer, H2Stream, H2_NO_ERROR, H2_CANCEL,
                                 H2_REFUSED_STREAM, H2_INTERNAL_ERROR, H2S_HALF_CLOSED_LOCAL)
from fastmesh._core.hpack cimport HeaderList, HField, HF_PSEUDO
from fastmesh._core.http1 cimport (Head, HeadParser, ChunkedFramer, BODY_NONE, BODY_LENGTH,
                                   BODY_CHUNKED, BODY_CLOSE, PARSE_INCOMPLETE, CH_DONE,
                                   CH_ERROR)
from fastmesh._core.router cimport Route, RouteTable, A_DIRECT
from fastmesh._core.http_proxy cimport HttpUpstream, HttpDownstream
from fastmesh._core.retry cimport RetryPolicy
from fastmesh._core.http1 cimport (make_request_id, build_request_head, Writer, w_init, w_put,
                                   w_free)
from fastmesh._core.stats cimport (Counters, LS_CX_TOTAL, LS_CX_ACTIVE, LS_RQ_TOTAL,
                                   LS_RQ_ACTIVE, LS_RSP_1XX, LS_ERR_NO_ROUTE,
                                   LS_ERR_NO_HEALTHY_UPSTREAM, LS_ERR_CONNECT_FAILED,
                                   LS_ERR_UPSTREAM_TIMEOUT, LS_ERR_UPSTREAM_RESET,
                                   LS_ERR_BAD_REQUEST, LS_RX_BYTES, LS_CX_IDLE_CLOSED,
                                   CS_RQ_TOTAL, CS_RQ_ACTIVE,
                                   CS_RSP_1XX, CS_CX_TOTAL, CS_CX_ACTIVE, CS_CX_CONNECT_FAIL,
                                   CS_NO_HEALTHY, CS_RQ_TIMEOUT, CS_CX_IDLE_CLOSED,
                                   CS_RQ_ACTIVE_OVERFLOW, CS_RQ_RETRY, CS_RQ_RETRY_OVERFLOW,
                                   LS_ERR_OVERFLOW, LS_FAULT_ABORTS, LS_FAULT_DELAYS,
                                   CS_RQ_SHADOW_SKIPPED, LS_RQ_MAX_DURATION, LS_ERR_STREAM_IDLE,
                                   status_class_slot)
from fastmesh._core.upstream cimport Cluster, Endpoint, LB_RING_HASH
from fastmesh._core.filters cimport FaultPolicy, TokenBucket, F_FAULT
from fastmesh._core.http_proxy cimport request_hash, send_mirrors
from fastmesh._core.upstream import open_connection

log = logging.getLogger("fastmesh.h2")

cdef int RECV_BUFFER_BYTES = 65536
cdef int RECV_BUFFER_CAP_BYTES = 1 << 20
# (max streams, stream window, connection window, HPACK table bytes): model.Http2Settings'
cdef tuple DEFAULT_SETTINGS = (100, 262144, 1048576, 4096)


cdef Py_ssize_t recv_cap_bytes(tuple settings):
    # DATA not yet taken by the other side stays in the receive buffer, and the connection
    # window we announce bounds it: room for all of it, and the frames around it
    cdef int64_t window = settings[2] if settings is not None else 1048576
    return max(RECV_BUFFER_CAP_BYTES, window + 65536)
cdef Py_ssize_t RETRY_BODY_BYTES = 65536  # a request body kept for retries up to this size
cdef Py_ssize_t MIRROR_BODY_BYTES = 1 << 20     # ... for mirrors (as HTTP/1 requests')
cdef bytes TE_TRAILERS = b"trailers"

# HTTP status of a local answer -> gRPC status (Envoy's mapping)
cdef dict GRPC_STATUS = {400: b"13", 401: b"16", 403: b"7", 404: b"12", 429: b"14",
                         502: b"14", 503: b"14", 504: b"14"}

# the endpoints' HTTP/2 connections in this worker: Endpoint -> H2Upstream
cdef dict _pool = {}
# connections that were an endpoint's newest until all the streams their peer allows were in
# use and another was made: they finish their streams, then close (the upstream sweep)
cdef set _full = set()
# idle HTTP/1 connections (translated streams), per endpoint: Endpoint -> [H1Upstream]
cdef dict _h1_idle = {}
# connections with output waiting, flushed once per read event of any of them
cdef set _dirty_up = set()
cdef set _dirty_ds = set()


cdef int64_t grpc_timeout_ms(bytes v):
    """A grpc-timeout value (1-8 digits and a unit: H M S m u n) in ms, rounded up; -1 if
    absent or malformed (then ignored, as Envoy does)."""
    cdef int64_t n = 0
    cdef Py_ssize_t i, k
    cdef int unit
    if v is None:
        return -1
    k = len(v)
    if k < 2 or k > 9:
        return -1
    for i in range(k - 1):
        if not 48 <= v[i] <= 57:
            return -1
        n = n * 10 + (v[i] - 48)
    unit = v[k - 1]
    if unit == 72:          # H
        return n * 3600000
    if unit == 77:          # M
        return n * 60000
    if unit == 83:          # S
        return n * 1000
    if unit == 109:         # m
        return n
    if unit == 117:         # u
        return (n + 999) // 1000
    if unit == 110:         # n
        return (n + 999999) // 1000000
    return -1


def py_grpc_timeout_ms(v):
    return grpc_timeout_ms(v)


cdef list header_pairs(HeaderList h):
    cdef int i
    return [(h.name(i), h.value(i)) for i in range(h.count)]


cdef inline bint _named(HeaderList h, int i, const char *name, Py_ssize_t n) noexcept:
    return h.fields[i].name_len == n and memcmp(h.buf + h.fields[i].name_off, name, n) == 0


cdef inline int _put_field(Writer *w, HeaderList h, int i, bint value) except -1:
    cdef HField *f = &h.fields[i]
    if value:
        return w_put(w, h.buf + f.value_off, f.value_len)
    return w_put(w, h.buf + f.name_off, f.name_len)


cdef Head routing_head(HeaderList h, HeadParser parser):
    """The request as an HTTP/1 head, so that the listener's routes (compiled for Head) match
    it exactly as they match HTTP/1 requests; None if the pseudo-headers are unusable.
    Written straight from the decoded header block (no object per field)."""
    cdef int i, method = -1, path = -1, authority = -1
    cdef Writer w
    cdef bytes raw
    for i in range(h.count):
        if h.fields[i].flags & HF_PSEUDO:
            if _named(h, i, b":method", 7):
                method = i
            elif _named(h, i, b":path", 5):
                path = i
            elif _named(h, i, b":authority", 10):
                authority = i
    if method < 0 or path < 0:
        return None
    w_init(&w, h.buf_len + 4 * h.count + 32)
    try:
        _put_field(&w, h, method, True)
        w_put(&w, b" ", 1)
        _put_field(&w, h, path, True)
        w_put(&w, b" HTTP/1.1\r\n", 11)
        if authority >= 0:
            w_put(&w, b"host: ", 6)
            _put_field(&w, h, authority, True)
            w_put(&w, b"\r\n", 2)
        for i in range(h.count):
            if h.fields[i].flags & HF_PSEUDO or (authority >= 0 and _named(h, i, b"host", 4)):
                continue
            _put_field(&w, h, i, False)
            w_put(&w, b": ", 2)
            _put_field(&w, h, i, True)
            w_put(&w, b"\r\n", 2)
        w_put(&w, b"\r\n", 2)
        raw = PyBytes_FromStringAndSize(w.buf, w.len)
    finally:
        w_free(&w)
    parser.reset()
    if parser.feed(raw, len(raw)) <= 0:
        return None
    return parser.head


cdef class ProxyStream:
    def __cinit__(self):
        self.us_id = -1
        self.grpc_timeout_ms = -1
        self.to_up = []
        self.to_down = []

    cdef void start_upstream(self) except *:
        # open the upstream stream (the connection is up and has a free stream)
        cdef H2Upstream up = self.up
        cdef int64_t sid
        sid = up.codec.start_request(self.request_headers,
                                     self.request_ended and not self.to_up)
        if sid < 0:
            up.waiting.append(self)
            return
        self.us_id = sid
        up.streams[sid] = self
        self.cluster.counters.v[CS_RQ_TOTAL] += 1
        self.cluster.counters.v[CS_RQ_ACTIVE] += 1
        self.ep.active_requests += 1
        self.ep.rq_total += 1
        self.pump_up()

    cdef void pump_up(self) except *:
        # request DATA / trailers to the upstream, as far as its windows allow
        cdef H2Upstream up = self.up
        if self.h1up is not None:
            while self.to_up and self.h1up.ps is self:
                item = self.to_up.pop(0)
                if isinstance(item, list):
                    self.h1up.write_trailers(item)
                else:
                    self.h1up.write_body(item[0], item[1])
            return
        cdef int64_t sent
        cdef Py_ssize_t n
        cdef bint last
        if up is not None:
            _dirty_up.add(up)
        while self.to_up and self.us_id >= 0:
            item = self.to_up[0]
            if isinstance(item, list):                      # trailers
                up.codec.send_headers(<uint32_t>self.us_id, item, True)
                self.to_up.pop(0)
                continue
            data, end = item
            n = len(data)
            last = end and len(self.to_up) == 1
            sent = up.codec.send_data(<uint32_t>self.us_id, data, last)
            if sent < 0:
                self.to_up.clear()
                return
            if sent:
                self.body_sent = True
                if self.body_copy is not None:
                    self.keep_copy(data[:sent])
                self.ds.codec.consumed(self.ds_id, sent)   # the client may send as much again
                _dirty_ds.add(self.ds)
            if sent < n:
                self.to_up[0] = (data[sent:], end)
                return                                      # on_window_open resumes
            self.to_up.pop(0)

    cdef void pump_down(self) except *:
        # response DATA / trailers to the client, as far as its windows allow
        cdef H2Downstream ds = self.ds
        cdef int64_t sent
        cdef Py_ssize_t n
        _dirty_ds.add(ds)
        while self.to_down:
            item = self.to_down[0]
            if isinstance(item, HeaderList):                # trailers
                ds.codec.send_header_list(self.ds_id, <HeaderList>item, True)
                self.to_down.pop(0)
                continue
            data, end = item
            n = len(data)
            sent = ds.codec.send_data(self.ds_id, data, end and len(self.to_down) == 1)
            if sent < 0:
                self.to_down.clear()
                return
            self.bytes_out += sent
            if sent and self.up is not None and self.us_id >= 0:
                self.up.codec.consumed(<uint32_t>self.us_id, sent)
                _dirty_up.add(self.up)
            if sent < n:
                self.to_down[0] = (data[sent:], end)
                break
            self.to_down.pop(0)
        if self.h1up is not None and self.h1up.ps is self:
            self.h1up.set_reading(not self.to_down)     # the client's window is the limit

    def keep_copy(self, data):
        # a copy of request bytes sent upstream, for another try (bounded)
        self.body_copy_bytes += len(data)
        if self.body_copy_bytes > RETRY_BODY_BYTES:
            self.body_copy = None
        else:
            self.body_copy.append(bytes(data))

    cdef void finish(self) except *:
        # the exchange is over (both ends closed, or reset): counters and the maps
        if self.done:
            return
        self.done = True
        if self.delay_timer is not None:            # reset in a fault delay
            self.delay_timer.cancel()
            self.delay_timer = None
            self.fault.active -= 1
            self.fault = None
        if self.ds.ctx.access_log is not None:
            self.log_access()
        self.ds.ctx.counters.v[LS_RQ_ACTIVE] -= 1
        self.ds.streams.pop(self.ds_id, None)
        if not self.ds.streams:
            self.ds.idle_since_ms = now_ms()
        if self.up is not None and self.us_id >= 0:
            if self.up.streams.pop(self.us_id, None) is not None:
                self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
                self.ep.active_requests -= 1
            if not self.up.streams:
                self.up.idle_since_ms = now_ms()
            self.up.open_waiting()
        elif self.up is not None and self in self.up.waiting:
            self.up.waiting.remove(self)
        if self.h1up is not None and self.h1up.ps is self:
            if self.h1up.response_done and self.h1up.request_done:
                self.h1up.maybe_release()
            else:
                self.h1up.ps = None         # cut short: the connection is out of step
                self.h1up.closed = True
                if self.h1up.connected:
                    self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
                    self.ep.active_requests -= 1
                    self.h1up.transport.abort()


    cdef void mirror_data(self, data, bint end) except *:
        # request DATA for the mirrors: kept until the end (then sent), or dropped (counted)
        # once it outgrows MIRROR_BODY_BYTES
        cdef Cluster cl
        cdef bytes head
        self.mirror_bytes += len(data)
        if self.mirror_bytes > MIRROR_BODY_BYTES:
            for cl, _, _ in self.route.mirrors:
                cl.counters.v[CS_RQ_SHADOW_SKIPPED] += 1
            self.mirror_head = self.mirror_body = None
            return
        if len(data):
            self.mirror_body.append(bytes(data))
        if not end:
            return
        head = self.mirror_head
        if b"\r\ncontent-length:" not in head.lower():
            head = head[:len(head) - 2] + b"content-length: %d\r\n\r\n" % self.mirror_bytes
        send_mirrors(self.ds.ctx.loop, self.route, head, b"".join(self.mirror_body))
        self.mirror_head = self.mirror_body = None

    cdef void log_access(self) except *:
        # one line for the stream, as for an HTTP/1 request (fastmesh/_core/accesslog.pyx);
        # %PROTOCOL% is HTTP/2, as Envoy logs it
        cdef AccessLog alog = <AccessLog>self.ds.ctx.access_log
        cdef Exchange ex = None
        cdef bytes line = None
        cdef Py_ssize_t eol
        if self.head_raw is not None:
            eol = self.head_raw.find(b"\r\n")
            line = self.head_raw[:eol] if eol >= 0 else None
        if alog.wants_exchange:
            ex = Exchange.__new__(Exchange)
            ex.client_port = self.ds.client_port
            ex.transport = self.ds.transport
            ex.bytes_received = self.bytes_in
            ex.bytes_sent = self.bytes_out
        try:
            alog.add(now_us() - self.start_us, self.ds.client_ip, line, self.status,
                     self.flag, self.cluster.name if self.cluster is not None else None,
                     self.ep, self.request_id, self.head_raw, ex, b"HTTP/2")
        except Exception:
            log.exception("listener %s: access log failed", self.ds.ctx.name)


cdef class H2Downstream(H2Consumer):
    def __init__(self, ListenerCtx ctx):
        self.ctx = ctx
        self.rbuf = RecvBuffer(RECV_BUFFER_BYTES, recv_cap_bytes(ctx.h2_settings))
        self.streams = {}

    # -- loop callbacks --

    def connection_made(self, transport):
        self.transport = transport
        s = self.ctx.h2_settings or DEFAULT_SETTINGS
        self.codec = H2Connection(self, False, max_concurrent_streams=s[0],
                                  initial_window_bytes=s[1], connection_window_bytes=s[2],
                                  header_table_bytes=s[3],
                                  max_header_list_bytes=max(self.ctx.max_head_bytes, 16384))
        peer = transport.get_extra_info("peername")      # (hash policies, access log)
        self.client_ip = (peer[0] if peer else "unknown").encode()
        self.client_port = peer[1] if peer else 0
        transport.set_write_buffer_limits(self.ctx.high_water_bytes, self.ctx.low_water_bytes)
        self.ctx.conns.add(self)
        self.ctx.counters.v[LS_CX_TOTAL] += 1
        self.ctx.counters.v[LS_CX_ACTIVE] += 1
        self.idle_since_ms = now_ms()
        if self.ctx.draining:
            self.begin_drain()
        self.flush()

    def get_buffer(self, Py_ssize_t sizehint):
        return self.rbuf.get_buffer(sizehint)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rbuf.advance(nbytes)
        self.ctx.counters.v[LS_RX_BYTES] += nbytes
        try:
            receive(self.codec, self.rbuf, "listener " + self.ctx.name)
            self.flush()
            flush_dirty()
        except BaseException:
            log.exception("listener %s: internal error on an HTTP/2 connection", self.ctx.name)
            self.transport.abort()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        cdef ProxyStream ps
        self.closed = True
        self.ctx.conns.discard(self)
        self.ctx.counters.v[LS_CX_ACTIVE] -= 1
        for ps in list(self.streams.values()):
            if ps.up is not None and ps.us_id >= 0:
                ps.up.codec.reset_stream(<uint32_t>ps.us_id, H2_CANCEL)
                _dirty_up.add(ps.up)
            ps.finish()
        flush_dirty()

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    cdef void flush(self) except *:
        if self.closed or self.codec is None:
            return
        out = self.codec.take_output()
        if out:
            self.transport.writelines(out)
        if self.codec.closed or (self.goaway_sent and not self.streams):
            self.closed = True
            self.transport.close()

    # -- drain and timeouts (the listener's sweeps) --

    cdef void begin_drain(self) except *:
        # GOAWAY, graceful: the streams already open finish, then the connection closes
        if not self.goaway_sent and self.codec is not None and not self.closed:
            self.goaway_sent = True
            self.codec.goaway(H2_NO_ERROR, b"draining")
            self.flush()

    def close_if_idle_for(self, int64_t now, int64_t idle_ms):
        self.begin_drain()

    def abort(self):
        if not self.closed:
            self.transport.abort()

    def on_idle_check(self, int64_t now):
        cdef ProxyStream ps
        if self.ctx.draining:
            self.begin_drain()
        elif (not self.streams and self.ctx.idle_timeout_ms > 0
                and now - self.idle_since_ms >= self.ctx.idle_timeout_ms):
            self.ctx.counters.v[LS_CX_IDLE_CLOSED] += 1
            self.begin_drain()              # GOAWAY; no stream open: closed at once
        for ps in list(self.streams.values()):
            if ps.max_duration_ms and now >= ps.max_duration_ms and not ps.done:
                if (ps.us_id < 0 and ps.h1up is None and not ps.request_ended
                        and now - ps.max_duration_ms < 1000):
                    # never forwarded (over before it began): answered once the client has
                    # sent all of its request (up to a second), so that no RST_STREAM
                    # follows the answer while it still uploads (curl fails the stream then)
                    continue
                ps.max_duration_ms = 0
                self.ctx.counters.v[LS_RQ_MAX_DURATION] += 1
                self.max_duration_reached(ps)
                continue
            if ps.deadline_ms and now >= ps.deadline_ms and not ps.response_started:
                ps.deadline_ms = 0
                if ps.cluster is not None:
                    ps.cluster.counters.v[CS_RQ_TIMEOUT] += 1
                if ps.up is not None and ps.us_id >= 0:
                    ps.up.codec.reset_stream(<uint32_t>ps.us_id, H2_CANCEL)
                    _dirty_up.add(ps.up)
                self.ctx.counters.v[LS_ERR_UPSTREAM_TIMEOUT] += 1
                self.local_reply(ps, 504, b"upstream_timeout")
        if self.codec.blocked and self.ctx.stream_idle_timeout_ms > 0:
            self.reset_stalled(now)
        self.flush()
        flush_dirty()

    cdef void reset_stalled(self, int64_t now) except *:
        # Streams whose response has waited for the client's flow-control window for the
        # listener's stream idle timeout (a client that advertises a zero window and never
        # opens it would pin the stream, its upstream stream and their buffers for ever):
        # reset both ways, counted as stream idle timeouts (Envoy: stream_idle_timeout).
        cdef ProxyStream ps
        cdef uint32_t sid
        for sid in self.codec.stalled_streams(now - self.ctx.stream_idle_timeout_ms):
            ps = self.streams.get(sid)
            self.ctx.counters.v[LS_ERR_STREAM_IDLE] += 1
            self.codec.reset_stream(sid, H2_CANCEL)
            if ps is None:
                continue
            ps.to_down.clear()
            if ps.up is not None and ps.us_id >= 0:
                ps.up.codec.reset_stream(<uint32_t>ps.us_id, H2_CANCEL)
                _dirty_up.add(ps.up)
            ps.finish()

    cdef void max_duration_reached(self, ProxyStream ps) except *:
        # a gRPC request's grpc-timeout passed: before the response, a trailers-only gRPC
        # answer DEADLINE_EXCEEDED (4) as Envoy sends ("downstream duration timeout"); after
        # it started, the stream is reset. The upstream stream is cancelled either way.
        cdef list hdrs
        _dirty_ds.add(self)
        if ps.up is not None and ps.us_id >= 0:
            ps.up.codec.reset_stream(<uint32_t>ps.us_id, H2_CANCEL)
            _dirty_up.add(ps.up)
        if ps.response_started:
            ps.to_down.clear()
            self.codec.reset_stream(ps.ds_id, H2_CANCEL)
            ps.finish()
            return
        ps.response_started = True
        ps.status = 200
        hdrs = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                (b"grpc-status", b"4"), (b"grpc-message", b"downstream duration timeout"),
                (b"x-fastmesh-error", b"max_duration")]
        self.codec.send_headers(ps.ds_id, hdrs, True)
        self.ctx.counters.v[status_class_slot(200, LS_RSP_1XX)] += 1
        ps.to_up.clear()
        if not ps.request_ended:
            self.codec.reset_stream(ps.ds_id, H2_NO_ERROR)
        ps.finish()

    # -- the codec's callbacks --

    cpdef on_headers(self, uint32_t stream_id, HeaderList headers, bint end_stream):
        cdef ProxyStream ps = self.streams.get(stream_id)
        if ps is not None:                  # a client sends no 1xx; trailers come elsewhere
            return
        ps = ProxyStream.__new__(ProxyStream)
        ps.ds = self
        ps.ds_id = stream_id
        ps.request_ended = end_stream
        ps.start_ms = now_ms()
        ctype = headers.get(b"content-type")
        ps.grpc = ctype is not None and ctype[:16] == b"application/grpc"
        if self.ctx.access_log is not None:
            ps.start_us = now_us()
        self.streams[stream_id] = ps
        self.ctx.counters.v[LS_RQ_TOTAL] += 1
        self.ctx.counters.v[LS_RQ_ACTIVE] += 1
        self.route_stream(ps, headers)

    cdef void route_stream(self, ProxyStream ps, HeaderList headers) except *:
        cdef RouteTable table = self.ctx.route_table
        cdef Route route
        cdef Head h
        if self.parser is None:
            self.parser = HeadParser(True, max(self.ctx.max_head_bytes, 65536), 1000)
        h = routing_head(headers, self.parser)
        if self.ctx.access_log is not None and h is not None:
            eol = h.raw.find(b" HTTP/1.1\r\n")
            ps.head_raw = h.raw[:eol] + b" HTTP/2" + h.raw[eol + 9:] if eol > 0 else h.raw
            rid = headers.get(b"x-request-id")
            ps.request_id = rid
        if h is None:
            self.ctx.counters.v[LS_ERR_BAD_REQUEST] += 1
            self.local_reply(ps, 400, b"bad_request")
            return
        route = table.route_http(h) if table is not None else None
        if route is None:
            self.ctx.counters.v[LS_ERR_NO_ROUTE] += 1
            self.local_reply(ps, 404, b"no_route")
            return
        ps.route = route
        if route.action != A_DIRECT:
            self.prepare(ps, route, h, headers)
        if self.ctx.http_filters is not None and self.run_filters(ps, route, h):
            return                          # answered (abort, rate limited), or delayed
        self.route_on(ps, ps.start_ms)

    cdef void route_on(self, ProxyStream ps, int64_t now) except *:
        # the stream, past the HTTP filters (now: when it got past them): a direct response,
        # or to its cluster
        cdef Route route = ps.route
        if route.action == A_DIRECT:
            self.respond_local(ps, route.direct_status, route.direct_body or b"", None)
            return
        if route.timeout_ms > 0:
            ps.deadline_ms = now + route.timeout_ms
        if route.grpc_timeout_max_ms >= 0 and ps.grpc:
            ps.deadline_ms = 0                  # the grpc-timeout's (none: no limit)
            if ps.grpc_timeout_ms == 0:
                # already over: not forwarded, answered by the next sweep (Envoy answers
                # at once; a tick later the client has usually sent its whole request, so
                # the answer needs no RST_STREAM after it, which curl takes badly while it
                # is still uploading)
                ps.max_duration_ms = ps.start_ms
                return
            if ps.grpc_timeout_ms > 0:
                ps.max_duration_ms = ps.start_ms + ps.grpc_timeout_ms
        self.forward(ps)

    cdef void prepare(self, ProxyStream ps, Route route, Head h, HeaderList headers) except *:
        # what the routing head decides for the upstream request, while it is at hand (the
        # head is the connection's parser's: the next stream reuses it)
        ps.cluster = route.pick_cluster()
        if route.hash_policy is not None and ps.cluster.lb_policy >= LB_RING_HASH:
            ps.hashed = request_hash(route.hash_policy, h, self.client_ip, &ps.hash)
        pairs = header_pairs(headers)
        if route.headers_to_remove:
            pairs = [p for p in pairs if p[0] not in route.headers_to_remove]
        if route.headers_to_add:
            pairs.extend(route.headers_to_add)
        if headers.find(b"x-request-id", 12) < 0:
            rid = make_request_id()
            pairs.append((b"x-request-id", rid))     # as Envoy generates one
            if self.ctx.access_log is not None:
                ps.request_id = rid
        ps.request_headers = pairs
        ps.attempts = 1
        if route.retry is not None:
            ps.body_copy = []
            ps.tried = []
        if route.grpc_timeout_max_ms >= 0 and ps.grpc:
            # Envoy's max_stream_duration.grpc_timeout_header_max: for a gRPC request the
            # grpc-timeout header (none: no limit) replaces the route timeout (route_on)
            t = grpc_timeout_ms(headers.get(b"grpc-timeout"))
            if t >= 0:
                if 0 < route.grpc_timeout_max_ms < t:
                    t = route.grpc_timeout_max_ms
                t -= route.grpc_timeout_offset_ms
                ps.grpc_timeout_ms = t if t > 0 else 0
        if route.mirrors is not None:
            # copies for the mirror clusters, as HTTP/1.1 requests: now, or once the body
            # (up to MIRROR_BODY_BYTES) has all come
            head = build_request_head(h, self.client_ip, None, route.headers_to_add,
                                      route.headers_to_remove, True)
            if ps.request_ended:
                send_mirrors(self.ctx.loop, route, head, b"")
            else:
                ps.mirror_head = head
                ps.mirror_body = []

    cdef bint run_filters(self, ProxyStream ps, Route route, Head h) except -1:
        # The listener's HTTP filters in their order, as for HTTP/1 requests (the
        # decisions are fastmesh._core.filters'): True when one answered the stream or holds
        # it. A delay's abort, if any, is drawn now and applied after it.
        cdef FaultPolicy fp
        cdef TokenBucket tb
        cdef int64_t delay_ms
        cdef int status
        for kind in self.ctx.http_filters:
            if kind == F_FAULT:
                fp = route.fault if route.fault is not None else self.ctx.fault
                if fp is None or (fp.max_active and fp.active >= fp.max_active):
                    continue
                delay_ms = fp.delay_for(h)
                status = fp.abort_for(h)
                if delay_ms > 0:
                    self.ctx.counters.v[LS_FAULT_DELAYS] += 1
                    fp.active += 1
                    ps.fault = fp
                    ps.fault_abort = status
                    ps.delay_timer = self.ctx.loop.call_later(delay_ms / 1000.0,
                                                              self.on_delay_done, ps)
                    return True
                if status:
                    self.fault_abort(ps, status)
                    return True
            else:
                tb = route.ratelimit if route.ratelimit is not None else self.ctx.ratelimit
                if tb is not None and tb.limits(self.ctx.counters, now_ms()):
                    if tb.extra:
                        ps.extra_headers = [tuple(line.split(b": ", 1)) for line in
                                            tb.extra.split(b"\r\n") if b": " in line]
                    ps.flag = b"local_rate_limited"
                    self.respond_local(ps, tb.status, b"local_rate_limited",
                                       b"local_rate_limited")
                    return True
        return False

    cdef void fault_abort(self, ProxyStream ps, int status) except *:
        self.ctx.counters.v[LS_FAULT_ABORTS] += 1
        ps.flag = b"fault_abort"
        self.respond_local(ps, status, b"fault filter abort", b"fault_abort")

    def on_delay_done(self, ProxyStream ps):
        # a fault delay has passed: its abort, or on to the router (after the filters that
        # follow in the chain: not re-run, as the head is gone; fault first is Envoy's order)
        cdef FaultPolicy fp = ps.fault
        ps.delay_timer = None
        if fp is not None:
            fp.active -= 1
            ps.fault = None
        if ps.done:
            return
        try:
            if ps.fault_abort:
                self.fault_abort(ps, ps.fault_abort)
            else:
                self.route_on(ps, now_ms())
            self.flush()
            flush_dirty()
        except BaseException:
            log.exception("listener %s: internal error after a fault delay", self.ctx.name)
            self.transport.abort()

    cdef void forward(self, ProxyStream ps) except *:
        cdef Cluster cluster = ps.cluster
        cdef Endpoint ep = None
        cdef H2Upstream up
        cdef int n
        if cluster is not None and \
                cluster.counters.v[CS_RQ_ACTIVE] + cluster.pending >= cluster.max_requests:
            cluster.counters.v[CS_RQ_ACTIVE_OVERFLOW] += 1     # the circuit breaker
            self.ctx.counters.v[LS_ERR_OVERFLOW] += 1
            self.local_reply(ps, 503, b"overflow")
            return
        if cluster is not None:
            ep = cluster.pick_hash(ps.hash) if ps.hashed else cluster.pick()
            if ps.tried and ep is not None and ep in ps.tried and ps.route.retry is not None:
                for n in range(ps.route.retry.host_selection_attempts):
                    ep = cluster.pick()     # another try: prefer an endpoint not tried yet
                    if ep is None or ep not in ps.tried:
                        break
        if ep is None:
            if cluster is not None:
                cluster.counters.v[CS_NO_HEALTHY] += 1
            self.ctx.counters.v[LS_ERR_NO_HEALTHY_UPSTREAM] += 1
            self.local_reply(ps, 503, b"no_healthy_upstream")
            return
        ps.ep = ep
        if ps.tried is not None:
            ps.tried.append(ep)
        if not cluster.http2:
            self.forward_h1(ps)
            return
        up = pool_connection(cluster, ep, self.ctx.loop)
        ps.up = up
        if up.connected:
            ps.start_upstream()
            _dirty_up.add(up)
        else:
            up.waiting.append(ps)

    cdef void forward_h1(self, ProxyStream ps) except *:
        # an HTTP/1 connection of the endpoint: an idle pooled one, else a new one
        cdef H1Upstream h1
        cdef list idle = _h1_idle.get(ps.ep)
        while idle:
            h1 = idle.pop()
            if not h1.closed and not h1.transport.is_closing():
                ps.h1up = h1
                h1.begin(ps)
                return
        h1 = H1UpstreamProtocol(ps.cluster, ps.ep, self.ctx.loop)
        ps.h1up = h1
        h1.ps = ps
        h1.connect()

    cdef void route_again(self, ProxyStream ps) except *:
        # the upstream refused the stream or went away before processing it: another
        # connection may take it, unless part of its body already went (the client may
        # retry it then: REFUSED_STREAM says it was not processed)
        ps.up = None
        ps.us_id = -1
        if ps.done:
            return
        if ps.body_sent or ps.response_started:
            self.codec.reset_stream(ps.ds_id, H2_REFUSED_STREAM)
            ps.finish()
            _dirty_ds.add(self)
            return
        self.forward(ps)

    cdef bint try_again(self, ProxyStream ps, int status, bint no_response,
                        bint connect_failure) except *:
        # A try failed before anything of its answer went to the client: go again if the
        # route's retry policy says so and the request can be sent whole again (its body,
        # if any, was kept). True when another try is under way.
        cdef RetryPolicy rp = ps.route.retry if ps.route is not None else None
        cdef Cluster cl = ps.cluster
        if rp is None or ps.done or ps.response_started or ps.attempts > rp.num_retries:
            return False
        if ps.body_sent and ps.body_copy is None:
            return False                    # too much of the body went: it cannot be resent
        if no_response:
            if not rp.retries_no_response(connect_failure):
                return False
        elif not rp.retries_status(status):
            return False
        if cl.retries_active >= cl.max_retries:
            cl.counters.v[CS_RQ_RETRY_OVERFLOW] += 1
            return False
        cl.counters.v[CS_RQ_RETRY] += 1
        ps.attempts += 1
        if ps.body_copy:                    # what went with the last try goes first
            ps.to_up[:0] = [(b, False) for b in ps.body_copy]
            last = ps.to_up[len(ps.to_up) - 1]      # (no negative indexing: wraparound off)
            if ps.request_ended and not isinstance(last, list) and not last[1]:
                ps.to_up.append((b"", True))
            ps.body_copy = []
            ps.body_copy_bytes = 0
        ps.body_sent = False
        ps.up = None
        ps.h1up = None
        ps.us_id = -1
        self.forward(ps)
        return True

    def try_again_after(self, ProxyStream ps, int status):
        # a response head that the route retries: the try is abandoned (not counted in
        # flight any more) and another one made; False to relay the answer
        cdef H1Upstream h1 = ps.h1up
        cdef H2Upstream up = ps.up
        cdef int64_t sid = ps.us_id
        cdef RetryPolicy rp = ps.route.retry
        if ps.done or ps.attempts > rp.num_retries or not rp.retries_status(status) or \
                (ps.body_sent and ps.body_copy is None) or \
                ps.cluster.retries_active >= ps.cluster.max_retries:
            return False
        ps.cluster.counters.v[CS_RQ_ACTIVE] -= 1
        ps.ep.active_requests -= 1
        if up is not None and sid >= 0:
            up.streams.pop(sid, None)
        if h1 is not None:
            h1.ps = None
        return self.try_again(ps, status, False, False)    # (its checks passed above)

    cdef void local_reply(self, ProxyStream ps, int status, bytes reason) except *:
        ps.flag = reason
        self.respond_local(ps, status, reason + b"\n", reason)

    cdef void respond_local(self, ProxyStream ps, int status, bytes body,
                            bytes reason) except *:
        cdef list hdrs
        _dirty_ds.add(self)
        if ps.done:
            return
        if ps.response_started:             # a response is under way: it can only be cut
            self.codec.reset_stream(ps.ds_id, H2_INTERNAL_ERROR)
            ps.finish()
            return
        ps.response_started = True
        if ps.grpc and reason is not None:
            hdrs = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                    (b"grpc-status", GRPC_STATUS.get(status, b"2")),
                    (b"grpc-message", reason), (b"x-fastmesh-error", reason)]
            ps.status = 200
            self.codec.send_headers(ps.ds_id, hdrs, True)
        else:
            hdrs = [(b":status", str(status).encode()), (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode())]
            if reason is not None:
                hdrs.append((b"x-fastmesh-error", reason))
            if ps.extra_headers:
                hdrs.extend(ps.extra_headers)
            ps.status = status
            self.codec.send_headers(ps.ds_id, hdrs, not body)
            if body:
                ps.to_down.append((body, True))
                ps.pump_down()
        self.ctx.counters.v[status_class_slot(ps.status, LS_RSP_1XX)] += 1
        ps.to_up.clear()
        if not ps.request_ended:
            # the rest of the request is not wanted (RFC 9113 §8.1: NO_ERROR after a
            # complete response)
            self.codec.reset_stream(ps.ds_id, H2_NO_ERROR)
        ps.finish()

    cdef void maybe_done(self, ProxyStream ps) except *:
        # the exchange is over once the response is all sent; a client still sending is
        # told to stop (NO_ERROR), and the upstream stream, if still open, is cancelled
        cdef H2Stream s
        if ps.done or not ps.response_started or ps.to_down:
            return
        s = self.codec.streams.get(ps.ds_id)
        if s is not None and s.state != H2S_HALF_CLOSED_LOCAL:
            return                          # the response has not ended yet
        if s is not None:
            if ps.request_ended and ps.to_up:
                return                      # the request's end is still on its way up
            self.codec.reset_stream(ps.ds_id, H2_NO_ERROR)
            if ps.up is not None and ps.us_id >= 0 and ps.us_id in ps.up.codec.streams:
                ps.up.codec.reset_stream(<uint32_t>ps.us_id, H2_CANCEL)
                _dirty_up.add(ps.up)
        _dirty_ds.add(self)
        ps.finish()

    cpdef on_data(self, uint32_t stream_id, object data, bint end_stream):
        cdef ProxyStream ps = self.streams.get(stream_id)
        if ps is None or ps.done:
            self.codec.consumed(stream_id, len(data))       # nobody takes it: give it back
            return
        if end_stream:
            ps.request_ended = True
        ps.bytes_in += len(data)
        if ps.mirror_head is not None:
            ps.mirror_data(data, end_stream)
        if len(data) or end_stream:
            ps.to_up.append((data, end_stream))
        if ps.us_id >= 0:
            ps.pump_up()
            _dirty_up.add(ps.up)
        elif ps.h1up is not None and ps.h1up.ps is ps and ps.h1up.connected:
            ps.pump_up()
        self.maybe_done(ps)

    cpdef on_trailers(self, uint32_t stream_id, HeaderList trailers):
        cdef ProxyStream ps = self.streams.get(stream_id)
        if ps is None or ps.done:
            return
        ps.request_ended = True
        if ps.mirror_head is not None:
            ps.mirror_data(b"", True)               # (trailers are not mirrored)
        ps.to_up.append(header_pairs(trailers))
        if ps.us_id >= 0:
            ps.pump_up()
            _dirty_up.add(ps.up)
        elif ps.h1up is not None and ps.h1up.ps is ps and ps.h1up.connected:
            ps.pump_up()
        self.maybe_done(ps)

    cpdef on_reset(self, uint32_t stream_id, uint32_t error_code, bint remote):
        cdef ProxyStream ps = self.streams.get(stream_id)
        if ps is None:
            return
        if ps.up is not None and ps.us_id >= 0:
            ps.up.codec.reset_stream(<uint32_t>ps.us_id, H2_CANCEL)
            _dirty_up.add(ps.up)
        ps.finish()

    cpdef on_goaway(self, uint32_t last_stream_id, uint32_t error_code, bytes debug_data):
        self.goaway_sent = True             # the client leaves: close once its streams end

    cpdef on_window_open(self, uint32_t stream_id):
        cdef ProxyStream ps = self.streams.get(stream_id)
        if ps is not None:
            ps.pump_down()
            self.maybe_done(ps)

    cpdef on_ping_ack(self, bytes payload):
        pass


# connection-specific fields: never carried between HTTP/1 and HTTP/2 (RFC 9113 §8.2.2)
cdef frozenset HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                                       b"transfer-encoding", b"upgrade", b"te", b"host"))


cdef class H1Upstream:
    def __init__(self, Cluster cluster, Endpoint ep, loop):
        self.cluster = cluster
        self.ep = ep
        self.loop = loop
        self.rbuf = RecvBuffer(RECV_BUFFER_BYTES, RECV_BUFFER_CAP_BYTES)
        self.parser = HeadParser(False)
        self.chunker = ChunkedFramer()

    def connect(self):
        connect(self, self.cluster, self.ep, self.loop)

    def _connected(self, task):
        cdef ProxyStream ps
        if task.cancelled() or task.exception() is not None:
            self.cluster.counters.v[CS_CX_CONNECT_FAIL] += 1
            self.ep.cx_connect_fail += 1
            self.ep.connect_failing = True
            self.closed = True
            ps = self.ps
            self.ps = None
            if self.cluster.od_enabled:
                self.cluster.observe_local(self.ep, 503)
            if ps is not None and not ps.done and not ps.ds.try_again(ps, 503, True, True):
                ps.ds.ctx.counters.v[LS_ERR_CONNECT_FAILED] += 1
                ps.ds.local_reply(ps, 503, b"connect_failed")
            flush_dirty()

    def connection_made(self, transport):
        cdef ProxyStream ps = self.ps
        self.transport = transport
        self.connected = True
        self.ep.connect_failing = False
        self.cluster.counters.v[CS_CX_ACTIVE] += 1
        transport.set_write_buffer_limits(65536, 16384)
        if ps is None or ps.done:           # the stream ended while this was connecting
            self.ps = None
            self.closed = True
            transport.close()
            return
        self.begin(ps)
        flush_dirty()

    cdef void begin(self, ProxyStream ps) except *:
        # the request head, then whatever of the body is here
        cdef list lines = []
        cdef bytes method = b"GET", path = b"/", authority = None, name
        cdef bint has_length = False
        self.ps = ps
        self.head_done = self.response_done = self.request_done = False
        self.reusable = True
        self.uncredited = 0
        self.parser.reset()
        for name, value in ps.request_headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name in HOP_BY_HOP and not (name == b"te" and value == TE_TRAILERS):
                if name != b"host" or authority is not None:
                    continue
            if name == b"content-length":
                has_length = True
            lines.append(name + b": " + value)
        if authority is not None:
            lines.insert(0, b"host: " + authority)
        self.parser.request_was_head = method == b"HEAD"
        self.chunked_request = not ps.request_ended and not has_length
        if self.chunked_request:
            lines.append(b"transfer-encoding: chunked")
        self.transport.write(method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(lines)
                             + (b"\r\n\r\n" if lines else b"\r\n"))
        ps.cluster.counters.v[CS_RQ_TOTAL] += 1
        ps.cluster.counters.v[CS_RQ_ACTIVE] += 1
        self.ep.active_requests += 1
        self.ep.rq_total += 1
        if ps.request_ended and not ps.to_up:
            self.request_done = True
        ps.pump_up()

    cdef void write_body(self, object data, bint end) except *:
        cdef Py_ssize_t n = len(data)
        cdef ProxyStream ps = self.ps
        if n:
            if self.chunked_request:
                self.transport.writelines([b"%x\r\n" % n, data, b"\r\n"])
            else:
                self.transport.write(data)
            ps.body_sent = True
            if ps.body_copy is not None:
                ps.keep_copy(data)
            if self.write_paused:
                self.uncredited += n        # given back to the client when the socket drains
            else:
                ps.ds.codec.consumed(ps.ds_id, n)
                _dirty_ds.add(ps.ds)
        if end:
            if self.chunked_request:
                self.transport.write(b"0\r\n\r\n")
            self.request_done = True
            self.maybe_release()

    cdef void write_trailers(self, list trailers) except *:
        # HTTP/2 request trailers: in the last chunk when the body is chunked, else dropped
        cdef list lines = []
        if self.chunked_request:
            for name, value in trailers:
                lines.append(name + b": " + value + b"\r\n")
            self.transport.write(b"0\r\n" + b"".join(lines) + b"\r\n")
        self.request_done = True
        self.maybe_release()

    def get_buffer(self, Py_ssize_t sizehint):
        return self.rbuf.get_buffer(sizehint)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rbuf.advance(nbytes)
        try:
            self.process()
            flush_dirty()
        except BaseException:
            log.exception("cluster %s: internal error on a translated HTTP/1 upstream",
                          self.cluster.name)
            self.transport.abort()

    def eof_received(self):
        cdef ProxyStream ps = self.ps
        if ps is not None and self.head_done and self.body_kind == BODY_CLOSE \
                and not self.response_done:
            self.response_done = True       # the end of a close-delimited body
            self.reusable = False
            ps.to_down.append((b"", True))
            ps.pump_down()
            ps.ds.maybe_done(ps)
            flush_dirty()
        return False

    def connection_lost(self, exc):
        cdef ProxyStream ps = self.ps
        was = self.connected
        self.closed = True
        self.connected = False
        if was:
            self.cluster.counters.v[CS_CX_ACTIVE] -= 1
        self.ps = None
        if ps is not None and was:
            ps.cluster.counters.v[CS_RQ_ACTIVE] -= 1
            self.ep.active_requests -= 1
            ps.h1up = None
            if not ps.done and not self.response_done and \
                    not ps.ds.try_again(ps, 502, True, False):
                ps.ds.ctx.counters.v[LS_ERR_UPSTREAM_RESET] += 1
                # (a reset once it started); 503 as Envoy answers a reset before headers
                ps.ds.local_reply(ps, 503, b"upstream_reset")
            flush_dirty()

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        cdef ProxyStream ps = self.ps
        self.write_paused = False
        if ps is not None and self.uncredited and not ps.done:
            ps.ds.codec.consumed(ps.ds_id, self.uncredited)
            _dirty_ds.add(ps.ds)
            flush_dirty()
        self.uncredited = 0

    cdef void set_reading(self, bint on) except *:
        if self.transport is None or self.closed or on != self.reading_paused:
            return
        self.reading_paused = not on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    cdef void process(self) except *:
        if self.ps is None:
            if self.rbuf.size():                # bytes nobody asked for: out of step
                self.closed = True
                self.transport.abort()
            return
        if not self.head_done and not self.response_head():
            return
        self.response_body()

    cdef bint response_head(self) except *:
        cdef ProxyStream ps = self.ps
        cdef Py_ssize_t r
        cdef Head h
        cdef list pairs
        cdef int i
        cdef bytes name
        while True:
            r = self.parser.feed(self.rbuf.head(), self.rbuf.size())
            if r == PARSE_INCOMPLETE:
                return False
            if r < 0:
                log.warning("cluster %s: bad response from %s:%s: %s", self.cluster.name,
                            self.ep.host, self.ep.port, self.parser.error_reason.decode())
                self.reusable = False
                self.closed = True
                self.transport.abort()          # connection_lost answers the stream (502)
                return False
            self.rbuf.consume(r)
            h = self.parser.head
            self.parser.reset()
            if h.status >= 200:
                break                           # 1xx: not relayed (as for HTTP/2 upstreams)
        if self.cluster.od_enabled:
            self.cluster.observe(self.ep, h.status)
        if ps.route is not None and ps.route.retry is not None and \
                ps.ds.try_again_after(ps, h.status):
            self.closed = True                  # its answer is not read: out of step
            self.transport.abort()
            return False
        pairs = [(b":status", str(h.status).encode())]
        for i in range(h.nfields):
            if h.fields[i].drop:
                continue
            name = h.raw[h.fields[i].name_off:h.fields[i].name_off + h.fields[i].name_len].lower()
            if name in HOP_BY_HOP:
                continue
            pairs.append((name, h.raw[h.fields[i].value_off:
                                      h.fields[i].value_off + h.fields[i].value_len]))
        self.head_done = True
        self.body_kind = h.body_kind
        self.body_left = h.content_length if h.body_kind == BODY_LENGTH else 0
        self.reusable = not h.conn_close and h.body_kind != BODY_CLOSE
        if h.body_kind == BODY_CHUNKED:
            self.chunker.reset()
        ps.response_started = True
        ps.status = h.status
        ps.deadline_ms = 0
        self.cluster.counters.v[status_class_slot(h.status, CS_RSP_1XX)] += 1
        ps.ds.ctx.counters.v[status_class_slot(h.status, LS_RSP_1XX)] += 1
        if h.status >= 500:
            self.ep.rq_error += 1
        ps.ds.codec.send_headers(ps.ds_id, pairs, h.body_kind == BODY_NONE)
        _dirty_ds.add(ps.ds)
        if h.body_kind == BODY_NONE:
            self.response_done = True
            self.maybe_release()
            ps.ds.maybe_done(ps)
        return True

    cdef void response_body(self) except *:
        cdef ProxyStream ps = self.ps
        cdef Py_ssize_t n, used, off, ln, size
        if ps is None or self.response_done:
            return
        size = self.rbuf.size()
        if self.body_kind == BODY_LENGTH:
            n = <Py_ssize_t>min(size, self.body_left)
            if n:
                self.body_left -= n
                ps.to_down.append((self.rbuf.take_slice(n), self.body_left == 0))
            elif self.body_left == 0:
                ps.to_down.append((b"", True))
            self.response_done = self.body_left == 0
        elif self.body_kind == BODY_CHUNKED:
            while self.rbuf.size() and self.chunker.state != CH_DONE:
                used = self.chunker.feed(self.rbuf.head(), self.rbuf.size(), &off, &ln)
                if self.chunker.state == CH_ERROR:
                    log.warning("cluster %s: bad chunked body from %s:%s", self.cluster.name,
                                self.ep.host, self.ep.port)
                    self.closed = True
                    self.reusable = False
                    self.transport.abort()
                    return
                if ln:
                    self.rbuf.consume(off)
                    ps.to_down.append((self.rbuf.take_slice(ln), False))
                    self.rbuf.consume(used - off - ln)
                else:
                    self.rbuf.consume(used)
            if self.chunker.state == CH_DONE:
                ps.to_down.append((b"", True))
                self.response_done = True
        elif size:                              # BODY_CLOSE: until the connection ends
            ps.to_down.append((self.rbuf.take_slice(size), False))
        ps.pump_down()
        if self.response_done:
            if self.rbuf.size():
                self.reusable = False
            self.maybe_release()
            ps.ds.maybe_done(ps)

    cdef void maybe_release(self) except *:
        # both directions done: back to the endpoint's idle list (or closed)
        cdef ProxyStream ps = self.ps
        if not (self.response_done and self.request_done):
            return
        if ps is not None:
            ps.cluster.counters.v[CS_RQ_ACTIVE] -= 1
            self.ep.active_requests -= 1
            self.ps = None
        if not self.connected or self.closed:
            return
        if not self.reusable or self.ep.removed:
            self.closed = True
            self.transport.close()
            return
        self.set_reading(True)
        self.idle_since_ms = now_ms()
        _h1_idle.setdefault(self.ep, []).append(self)


cdef class H2Upstream(H2Consumer):
    def __init__(self, Cluster cluster, Endpoint ep, loop):
        self.cluster = cluster
        self.ep = ep
        self.loop = loop
        self.rbuf = RecvBuffer(RECV_BUFFER_BYTES, recv_cap_bytes(cluster.h2_settings))
        self.streams = {}
        self.waiting = []
        self.bridge_waiters = []
        s = self.cluster.h2_settings or DEFAULT_SETTINGS
        self.codec = H2Connection(self, True, max_concurrent_streams=s[0],
                                  initial_window_bytes=s[1], connection_window_bytes=s[2],
                                  header_table_bytes=s[3])

    def connect(self):
        connect(self, self.cluster, self.ep, self.loop)

    def _connected(self, task):
        if task.cancelled() or task.exception() is not None:
            self.cluster.counters.v[CS_CX_CONNECT_FAIL] += 1
            self.ep.cx_connect_fail += 1
            self.ep.connect_failing = True
            self.closed = True
            if _pool.get(self.ep) is self:
                del _pool[self.ep]
            resolve_bridge_waiters(self, False)
            self.fail_all(503, b"connect_failed")
            flush_dirty()

    def connection_made(self, transport):
        self.transport = transport
        self.connected = True
        self.ep.connect_failing = False
        self.cluster.counters.v[CS_CX_ACTIVE] += 1
        self.idle_since_ms = now_ms()
        self.open_waiting()
        resolve_bridge_waiters(self, True)
        self.flush()
        flush_dirty()

    def get_buffer(self, Py_ssize_t sizehint):
        return self.rbuf.get_buffer(sizehint)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rbuf.advance(nbytes)
        try:
            receive(self.codec, self.rbuf, "cluster " + self.cluster.name)
            self.flush()
            flush_dirty()
        except BaseException:
            log.exception("cluster %s: internal error on an HTTP/2 upstream", self.cluster.name)
            self.transport.abort()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        was_connected = self.connected
        self.closed = True
        self.connected = False
        if _pool.get(self.ep) is self:
            del _pool[self.ep]
        if was_connected:
            self.cluster.counters.v[CS_CX_ACTIVE] -= 1
        resolve_bridge_waiters(self, False)
        self.fail_all(502, b"upstream_reset")
        flush_dirty()

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    cdef void flush(self) except *:
        if not self.connected or self.closed:
            return
        out = self.codec.take_output()
        if out:
            self.transport.writelines(out)
        if self.codec.closed:
            self.transport.close()

    def retire(self):
        """Out of the pool; GOAWAY, then closed."""
        if _pool.get(self.ep) is self:
            del _pool[self.ep]
        if self.connected and not self.closed:
            self.cluster.counters.v[CS_CX_IDLE_CLOSED] += 1
            self.codec.goaway(H2_NO_ERROR, b"idle")
            self.flush()
            self.closed = True
            self.transport.close()

    cdef void open_waiting(self) except *:
        cdef ProxyStream ps
        if not self.connected:
            return
        while self.waiting:
            item = self.waiting.pop(0)
            n = len(self.waiting)
            if type(item) is H2Bridge:
                if (<H2Bridge>item).closed:
                    continue
                (<H2Bridge>item).start_upstream()
            else:
                ps = item
                if ps.done:
                    continue
                ps.start_upstream()
            if len(self.waiting) > n:        # no free stream: it went back to the queue
                break

    cdef void fail_all(self, int status, bytes reason) except *:
        # the connection is gone: streams without a response get a local answer, the others
        # are reset (their response was cut short). `status` is the failure as the retry
        # policy sees it: 503 a failed connect, 502 a reset
        cdef ProxyStream ps
        cdef bint connect_failure = status == 503
        cdef int slot = LS_ERR_CONNECT_FAILED if connect_failure else LS_ERR_UPSTREAM_RESET
        streams = list(self.streams.values()) + self.waiting
        self.streams.clear()
        self.waiting = []
        if connect_failure and self.cluster.od_enabled:
            self.cluster.observe_local(self.ep, 503)
        for item in streams:
            if type(item) is H2Bridge:      # an HTTP/1 session's: its "connection" is lost
                (<H2Bridge>item).sid = -1
                (<H2Bridge>item).lost(True)
                continue
            ps = item
            if ps.done:
                continue
            if ps.us_id >= 0:               # it was counted in flight here
                ps.cluster.counters.v[CS_RQ_ACTIVE] -= 1
                self.ep.active_requests -= 1
                ps.us_id = -1
            if ps.ds.try_again(ps, status, True, connect_failure):
                continue
            ps.ds.ctx.counters.v[slot] += 1
            ps.ds.local_reply(ps, 503, reason)     # either way, as Envoy answers it

    # -- the codec's callbacks --

    cpdef on_headers(self, uint32_t stream_id, HeaderList headers, bint end_stream):
        cdef ProxyStream ps
        cdef int status
        item = self.streams.get(stream_id)
        if type(item) is H2Bridge:
            (<H2Bridge>item).on_head(headers, end_stream)
            return
        ps = item
        if ps is None or ps.done:
            return
        st = headers.get(b":status")
        status = int(st) if st is not None and st.isdigit() else 0
        if 100 <= status < 200:
            return                              # informational: not relayed
        if self.cluster.od_enabled:
            self.cluster.observe(self.ep, status)
        if ps.route is not None and ps.route.retry is not None and \
                ps.ds.try_again_after(ps, status):
            self.codec.reset_stream(stream_id, H2_CANCEL)
            return
        ps.response_started = True
        ps.status = status
        ps.deadline_ms = 0
        self.cluster.counters.v[status_class_slot(status, CS_RSP_1XX)] += 1
        ps.ds.ctx.counters.v[status_class_slot(status, LS_RSP_1XX)] += 1
        if status >= 500:
            self.ep.rq_error += 1
        ps.ds.codec.send_header_list(ps.ds_id, headers, end_stream)
        _dirty_ds.add(ps.ds)
        if end_stream:
            ps.ds.maybe_done(ps)

    cpdef on_data(self, uint32_t stream_id, object data, bint end_stream):
        cdef ProxyStream ps
        item = self.streams.get(stream_id)
        if type(item) is H2Bridge:
            (<H2Bridge>item).on_body(data, end_stream)
            return
        ps = item
        if ps is None or ps.done:
            self.codec.consumed(stream_id, len(data))
            return
        if len(data) or end_stream:
            ps.to_down.append((data, end_stream))
        ps.pump_down()
        if end_stream:
            ps.ds.maybe_done(ps)

    cpdef on_trailers(self, uint32_t stream_id, HeaderList trailers):
        cdef ProxyStream ps
        item = self.streams.get(stream_id)
        if type(item) is H2Bridge:
            (<H2Bridge>item).on_trailers(trailers)
            return
        ps = item
        if ps is None or ps.done:
            return
        ps.to_down.append(trailers)
        ps.pump_down()
        ps.ds.maybe_done(ps)

    cpdef on_reset(self, uint32_t stream_id, uint32_t error_code, bint remote):
        cdef ProxyStream ps
        item = self.streams.pop(stream_id, None)
        if type(item) is H2Bridge:
            (<H2Bridge>item).on_reset(error_code)
            self.open_waiting()
            return
        ps = item
        if ps is None or ps.done:
            return
        self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
        self.ep.active_requests -= 1
        ps.us_id = -1
        if error_code == H2_REFUSED_STREAM and not ps.response_started:
            ps.ds.route_again(ps)           # not processed: it may go again elsewhere
        elif not ps.response_started and ps.ds.try_again(ps, 502, True, False):
            pass
        elif not ps.response_started:
            ps.ds.ctx.counters.v[LS_ERR_UPSTREAM_RESET] += 1
            ps.ds.local_reply(ps, 502, b"upstream_reset")
        else:
            ps.ds.codec.reset_stream(ps.ds_id, error_code)
            _dirty_ds.add(ps.ds)
            ps.finish()
        self.open_waiting()

    cpdef on_goaway(self, uint32_t last_stream_id, uint32_t error_code, bytes debug_data):
        # no new streams here; those above last_stream_id were not processed: they go again
        cdef ProxyStream ps
        if _pool.get(self.ep) is self:
            del _pool[self.ep]
        for sid in [s for s in self.streams if s > last_stream_id]:
            item = self.streams.pop(sid)
            if type(item) is H2Bridge:
                (<H2Bridge>item).not_processed()
                continue
            ps = item
            self.cluster.counters.v[CS_RQ_ACTIVE] -= 1
            self.ep.active_requests -= 1
            if not ps.done:
                ps.ds.route_again(ps)
        waiting, self.waiting = self.waiting, []
        for item in waiting:
            if type(item) is H2Bridge:
                (<H2Bridge>item).not_processed()
                continue
            ps = item
            if not ps.done:
                ps.ds.route_again(ps)

    cpdef on_window_open(self, uint32_t stream_id):
        cdef ProxyStream ps
        item = self.streams.get(stream_id)
        if type(item) is H2Bridge:
            (<H2Bridge>item).pump_up()
            return
        ps = item
        if ps is not None:
            ps.pump_up()
            ps.ds.maybe_done(ps)

    cpdef on_ping_ack(self, bytes payload):
        pass


cdef void receive(H2Connection codec, RecvBuffer rbuf, str who) except *:
    # one read's frames through the codec; a consumer callback's failure ends the
    # connection (the codec sends GOAWAY INTERNAL_ERROR) and is logged here
    codec.receive(rbuf)
    if codec.callback_error is not None:
        log.error("%s: HTTP/2 session failed: %r", who, codec.callback_error)
        codec.callback_error = None


def connect(proto, Cluster cluster, Endpoint ep, loop):
    """Open a connection to ep for proto (an upstream protocol object, its own factory):
    counted, bounded by the cluster's connect timeout; proto._connected hears the outcome."""
    cluster.counters.v[CS_CX_TOTAL] += 1
    # HTTP/2 upstreams stay on the loop's transports (not tried on the I/O engine yet)
    task = loop.create_task(open_connection(loop, lambda: proto, cluster, ep, engine=False))
    task.add_done_callback(proto._connected)
    if cluster.connect_timeout_ms > 0:
        loop.call_later(cluster.connect_timeout_ms / 1000.0, _cancel_if_pending, task)


def _cancel_if_pending(task):
    if not task.done():
        task.cancel()




cdef void flush_dirty() except *:
    cdef H2Upstream up
    cdef H2Downstream ds
    while _dirty_up or _dirty_ds:
        while _dirty_up:
            up = _dirty_up.pop()
            up.flush()
        while _dirty_ds:
            ds = _dirty_ds.pop()
            ds.flush()


class H2DownstreamProtocol(H2Downstream, asyncio.BufferedProtocol):
    """The loop's protocol object (asyncio recognises buffered protocols by class)."""


class H2UpstreamProtocol(H2Upstream, asyncio.BufferedProtocol):
    pass


class H1UpstreamProtocol(H1Upstream, asyncio.BufferedProtocol):
    pass


def take_over(ListenerCtx ctx, transport, bytes data):
    """An HTTP/1 connection opened with the HTTP/2 preface (codec: auto): an HTTP/2 session
    takes the transport and the bytes read so far."""
    cdef H2Downstream ds = H2DownstreamProtocol(ctx)
    transport.set_protocol(ds)
    ds.connection_made(transport)
    ds.rbuf.py_feed(data)
    try:
        receive(ds.codec, ds.rbuf, "listener " + ctx.name)
        ds.flush()
        flush_dirty()
    except BaseException:
        log.exception("listener %s: internal error on an HTTP/2 connection", ctx.name)
        transport.abort()


cdef int64_t _last_upstream_sweep_ms = 0


def sweep_downstreams(ListenerCtx ctx, int64_t now):
    """Per-tick work of an http2 listener: drains (GOAWAY) and response timeouts; once per
    tick for all listeners, upstream connections with no stream for the cluster's idle
    timeout, or to an endpoint no longer in its cluster, are closed (GOAWAY first)."""
    for c in list(ctx.conns):
        if isinstance(c, H2Downstream):     # (an http1 listener's HTTP/1 sessions: not here)
            (<H2Downstream>c).on_idle_check(now)
    sweep_upstreams(now)


cdef H2Upstream pool_connection(Cluster cluster, Endpoint ep, loop):
    """The endpoint's HTTP/2 connection for one more stream: its newest one (made if there is
    none, or it closed); when that one is up and every stream its peer allows
    (SETTINGS_MAX_CONCURRENT_STREAMS) is in use, another, as Envoy's pool makes one (within
    the cluster's max_connections); the full one finishes its streams, then closes."""
    cdef H2Upstream up = _pool.get(ep)
    if up is not None and not up.closed and up.connected and \
            up.codec.own_streams >= up.codec.remote.max_concurrent_streams and \
            cluster.counters.v[CS_CX_ACTIVE] < cluster.max_connections:
        _full.add(up)
        up = None
    if up is None or up.closed:
        up = H2UpstreamProtocol(cluster, ep, loop)
        _pool[ep] = up
        up.connect()
    return up


def sweep_upstreams(int64_t now):
    """Once per tick (any listener's sweep may call it: HTTP/1 sessions use these connections
    too): upstream HTTP/2 connections idle for the cluster's idle timeout, or to an endpoint
    no longer in its cluster, are closed (GOAWAY first); request streams an HTTP/2 client
    sent that the upstream has kept at a zero window for that client listener's stream idle
    timeout are reset (504 before a response, else the client's stream is reset)."""
    global _last_upstream_sweep_ms
    cdef H2Upstream up
    if now == _last_upstream_sweep_ms:
        return
    _last_upstream_sweep_ms = now
    for up in list(_full):
        if up.codec.blocked:
            reset_stalled_upstream(up, now)
        if up.closed or not (up.streams or up.waiting):
            _full.discard(up)
            up.retire()                     # (nothing left on it: GOAWAY, closed)
    for up in list(_pool.values()):
        if up.codec.blocked:
            reset_stalled_upstream(up, now)
        if up.streams or up.waiting or not up.connected:
            continue
        if up.ep.removed or (up.cluster.idle_timeout_ms > 0 and
                             now - up.idle_since_ms >= up.cluster.idle_timeout_ms):
            up.retire()
    flush_dirty()


cdef void reset_stalled_upstream(H2Upstream up, int64_t now) except *:
    cdef ProxyStream ps
    cdef H2Stream s
    cdef int64_t limit
    for sid in up.codec.stalled_streams(now):
        item = up.streams.get(sid)
        if type(item) is not ProxyStream:   # HTTP/1 sessions' streams: their own stream
            continue                        # idle timeout ends them (the client stalls too)
        ps = item
        s = up.codec.streams.get(sid)
        limit = ps.ds.ctx.stream_idle_timeout_ms
        if ps.done or s is None or limit <= 0 or now - s.blocked_since_ms < limit:
            continue
        ps.ds.ctx.counters.v[LS_ERR_STREAM_IDLE] += 1
        ps.to_up.clear()
        up.codec.reset_stream(<uint32_t>sid, H2_CANCEL)
        _dirty_up.add(up)
        if ps.response_started:
            ps.ds.codec.reset_stream(ps.ds_id, H2_CANCEL)
            _dirty_ds.add(ps.ds)
            ps.finish()
        else:
            ps.ds.local_reply(ps, 504, b"stream_idle_timeout")


# ======================================================= HTTP/1.1 clients, HTTP/2 clusters

cdef Py_ssize_t BRIDGE_HIGH_WATER_BYTES = 262144   # request bytes waiting for a window:
cdef Py_ssize_t BRIDGE_LOW_WATER_BYTES = 65536     # the client's reads pause above this
cdef frozenset REQUEST_DROPPED = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                                            b"transfer-encoding", b"upgrade", b"host",
                                            b"te", b"trailer"))
cdef bytes CRLF = b"\r\n"
cdef bytes LAST_CHUNK = b"0\r\n\r\n"
cdef dict REASONS = {}


cdef bytes reason_of(int status):
    cdef bytes r = REASONS.get(status)
    if r is None:
        try:
            import http
            r = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            r = b"Unknown"
        REASONS[status] = r
    return r


cdef list trailer_fields(bytes tail):
    # the trailer section of a chunked body: what follows the last-chunk line (the framer
    # has checked its syntax) -> HTTP/2 trailer pairs
    cdef list out = []
    cdef bint after_last = False
    cdef bytes line, name
    cdef Py_ssize_t colon
    for line in tail.split(CRLF):
        if not after_last:
            after_last = line[:1] == b"0"
            continue
        if not line:
            break
        colon = line.find(b":")
        if colon <= 0:
            continue
        name = line[:colon].strip().lower()
        if name in REQUEST_DROPPED or name == b"content-length":
            continue
        out.append((name, line[colon + 1:].strip()))
    return out


def open_bridge(Cluster cluster, Endpoint ep, loop):
    """For an HTTP/1 session's request to an HTTP/2 cluster: a future of an HttpUpstream
    whose transport is an H2Bridge, done once the endpoint's HTTP/2 connection is up
    (shared by every stream to it from this worker), failed if it cannot be made."""
    cdef H2Upstream up = pool_connection(cluster, ep, loop)
    fut = loop.create_future()
    if up.connected:
        fut.set_result(new_bridge(cluster, ep, loop))
    else:
        up.bridge_waiters.append(fut)
    return fut


cdef object new_bridge(Cluster cluster, Endpoint ep, loop):
    from fastmesh._core.http_proxy import HttpUpstreamProtocol
    cdef HttpUpstream proto = HttpUpstreamProtocol(cluster, ep)
    cdef H2Bridge br = H2Bridge(cluster, ep, loop)
    br.proto = proto
    proto.bridged = True
    proto.connection_made(br)
    return proto


cdef void resolve_bridge_waiters(H2Upstream up, bint ok) except *:
    waiters, up.bridge_waiters = up.bridge_waiters, []
    for fut in waiters:
        if fut.done():
            continue
        if ok:
            fut.set_result(new_bridge(up.cluster, up.ep, up.loop))
        else:
            fut.set_exception(ConnectionError(
                "HTTP/2 connection to %s:%s failed" % (up.ep.host, up.ep.port)))


cdef class H2Bridge:
    def __init__(self, Cluster cluster, Endpoint ep, loop):
        self.cluster = cluster
        self.ep = ep
        self.loop = loop
        self.sid = -1
        self.parser = HeadParser(True, 262144, 2000)
        self.to_up = []
        self.to_proto = []

    # -- the transport the HttpUpstream writes to --

    def write(self, data):
        try:
            self.feed(data)
        except BaseException:
            log.exception("cluster %s: internal error translating a request to HTTP/2",
                          self.cluster.name)
            self.lost(False)
        flush_dirty()

    def writelines(self, pieces):
        try:
            for data in pieces:
                self.feed(data)
        except BaseException:
            log.exception("cluster %s: internal error translating a request to HTTP/2",
                          self.cluster.name)
            self.lost(False)
        flush_dirty()

    def is_closing(self):
        return self.closed

    def close(self):
        # the HTTP/1 session is done with this "connection" (or gave up on its request:
        # timeout, client gone): a stream still open is cancelled
        if self.closed:
            return
        self.detach()
        self.closed = True
        self.loop.call_soon(self.proto.connection_lost, None)
        flush_dirty()

    def abort(self):
        self.close()

    def pause_reading(self):
        self.reading_paused = True

    def resume_reading(self):
        if self.reading_paused:
            self.reading_paused = False
            if self.to_proto:
                self.loop.call_soon(self._deliver_held)

    def _deliver_held(self):
        held, self.to_proto = self.to_proto, []
        try:
            for item in held:
                if self.closed:
                    break
                if self.reading_paused or self.to_proto:
                    self.to_proto.append(item)
                elif isinstance(item, HeaderList):
                    self.on_trailers(<HeaderList>item)
                else:
                    self.on_body(item[0], item[1])
        except BaseException:
            log.exception("cluster %s: internal error relaying an HTTP/2 response",
                          self.cluster.name)
            self.lost(False)
        flush_dirty()

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return self.to_up_bytes

    def can_write_eof(self):
        return False

    def get_extra_info(self, name, default=None):
        return default

    # -- request: HTTP/1 bytes in, a stream out --

    cdef void feed(self, object data) except *:
        cdef Py_ssize_t r
        cdef const unsigned char[:] mv
        cdef bytes raw
        if self.closed:
            return
        if not self.in_request:
            raw = bytes(data) if self.head_part is None else self.head_part + bytes(data)
            self.head_part = None
            r = self.parser.feed(<const unsigned char *><char *>raw, len(raw))
            if r == PARSE_INCOMPLETE:
                self.head_part = raw
                return
            if r < 0:
                log.error("cluster %s: a request head the HTTP/1 session built did not "
                          "parse: %s", self.cluster.name, self.parser.error_reason.decode())
                self.lost(False)
                return
            self.begin_request(self.parser.head)
            self.parser.reset()
            if r < len(raw):
                self.feed_body(memoryview(raw)[r:])
            return
        self.feed_body(data)

    cdef void begin_request(self, Head h) except *:
        # the head of the next request: its HTTP/2 fields, then a stream
        cdef list pairs
        cdef int i
        cdef bytes name, value, authority = None
        cdef HttpUpstream proto = self.proto
        if self.sid >= 0:                   # the last response ended early (by its length)
            self.detach()
        raw = h.raw
        pairs = [(b":method", h.method()), (b":scheme", b"http"), (b":authority", b""),
                 (b":path", raw[h.target_off:h.target_off + h.target_len])]
        for i in range(h.nfields):
            if h.fields[i].drop:
                continue
            name = raw[h.fields[i].name_off:h.fields[i].name_off + h.fields[i].name_len].lower()
            value = raw[h.fields[i].value_off:h.fields[i].value_off + h.fields[i].value_len]
            if name == b"host":
                if authority is None:
                    authority = value
                continue
            if name in REQUEST_DROPPED:
                continue
            pairs.append((name, value))
        # te: trailers is the one te value HTTP/2 allows; the HTTP/1 head written here no
        # longer has it (hop-by-hop), the client's request says whether it was there
        if proto.ds is not None and proto.ds.req is not None:
            te = proto.ds.req.header_value(b"te", 2)
            if te is not None and b"trailers" in te.lower():
                pairs.append((b"te", TE_TRAILERS))
        if authority is None:
            authority = ("%s:%d" % (self.ep.host, self.ep.port)).encode()
        pairs[2] = (b":authority", authority)
        self.request_headers = pairs
        self.head_request = h.is_head_method
        self.body_kind = h.body_kind
        self.body_left = h.content_length if h.body_kind == BODY_LENGTH else 0
        if h.body_kind == BODY_CHUNKED:
            if self.chunker is None:
                self.chunker = ChunkedFramer()
            else:
                self.chunker.reset()
            self.chunk_tail = b""
        self.in_request = h.body_kind != BODY_NONE
        self.request_ended = not self.in_request
        self.body_sent = False
        self.head_delivered = False
        self.response_ended = False
        self.chunked_response = False
        self.to_up = []
        self.to_up_bytes = 0
        self.to_proto = []
        self.open_stream()

    cdef void open_stream(self) except *:
        # on the endpoint's HTTP/2 connection (made again if it went away meanwhile)
        cdef H2Upstream up = pool_connection(self.cluster, self.ep, self.loop)
        self.up = up
        if up.connected:
            self.start_upstream()
        else:
            up.waiting.append(self)

    cdef void start_upstream(self) except *:
        cdef H2Upstream up = self.up
        cdef int64_t sid
        sid = up.codec.start_request(self.request_headers,
                                     self.request_ended and not self.to_up)
        if sid < 0:
            up.waiting.append(self)         # no free stream: when one ends
            return
        self.sid = sid
        up.streams[sid] = self
        _dirty_up.add(up)
        self.pump_up()

    cdef void feed_body(self, object data) except *:
        cdef Py_ssize_t n, pos, used, off, ln
        cdef Py_buffer view
        cdef const unsigned char *p
        n = len(data)
        if not self.in_request or n == 0:
            return
        if self.body_kind == BODY_LENGTH:
            if n > self.body_left:
                n = <Py_ssize_t>self.body_left
                data = memoryview(data)[:n]
            self.body_left -= n
            self.to_up.append((data, self.body_left == 0))
            self.to_up_bytes += n
            if self.body_left == 0:
                self.in_request = False
                self.request_ended = True
        elif self.body_kind == BODY_CHUNKED:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                p = <const unsigned char *>view.buf
                pos = 0
                while pos < n and self.chunker.state != CH_DONE:
                    used = self.chunker.feed(p + pos, n - pos, &off, &ln)
                    if self.chunker.state == CH_ERROR:
                        raise ValueError("bad chunked request body")   # checked before
                    if ln:
                        self.to_up.append((memoryview(data)[pos + off:pos + off + ln], False))
                        self.to_up_bytes += ln
                        self.chunk_tail = b""
                    else:
                        self.chunk_tail += PyBytes_FromStringAndSize(<char *>p + pos, used)
                    pos += used
            finally:
                PyBuffer_Release(&view)
            if self.chunker.state == CH_DONE:
                self.in_request = False
                self.request_ended = True
                trailers = trailer_fields(self.chunk_tail)
                self.chunk_tail = None
                self.to_up.append(trailers if trailers else (b"", True))
        if self.to_up_bytes > BRIDGE_HIGH_WATER_BYTES and not self.writing_paused:
            self.writing_paused = True
            self.proto.pause_writing()      # the client's reads pause
        if self.sid >= 0:
            self.pump_up()

    cdef void pump_up(self) except *:
        cdef H2Upstream up = self.up
        cdef int64_t sent
        cdef Py_ssize_t n
        while self.to_up and self.sid >= 0:
            item = self.to_up[0]
            if isinstance(item, list):                      # trailers
                up.codec.send_headers(<uint32_t>self.sid, item, True)
                self.to_up.pop(0)
                continue
            data, end = item
            n = len(data)
            sent = up.codec.send_data(<uint32_t>self.sid, data, end and len(self.to_up) == 1)
            if sent < 0:
                self.to_up.clear()
                self.to_up_bytes = 0
                break
            if sent:
                self.body_sent = True
                self.to_up_bytes -= sent
            if sent < n:
                self.to_up[0] = (memoryview(data)[sent:], end)
                break                                       # on_window_open resumes
            self.to_up.pop(0)
        _dirty_up.add(up)
        if self.writing_paused and self.to_up_bytes <= BRIDGE_LOW_WATER_BYTES:
            self.writing_paused = False
            self.proto.resume_writing()

    # -- response: stream events in, HTTP/1 bytes to the HttpUpstream --

    cdef void deliver(self, list pieces) except *:
        # as if the connection had read these bytes
        cdef HttpUpstream proto = self.proto
        cdef RecvBuffer rb = proto.rbuf
        cdef Py_buffer view
        cdef Py_ssize_t n, off, room
        for piece in pieces:
            PyObject_GetBuffer(piece, &view, PyBUF_SIMPLE)
            try:
                n = view.len
                off = 0
                while off < n:
                    rb.reserve(n - off)
                    room = rb.block.capacity - rb.end
                    if room <= 0:
                        raise ValueError("HTTP/1 upstream receive buffer full")
                    if room > n - off:
                        room = n - off
                    memcpy(rb.block.data + rb.end, <char *>view.buf + off, room)
                    rb.end += room
                    off += room
                    if off < n:
                        proto.buffer_updated(0)     # let it take what is there
                        if self.closed:
                            return
            finally:
                PyBuffer_Release(&view)
        proto.buffer_updated(0)

    cdef void on_head(self, HeaderList headers, bint end_stream) except *:
        cdef int status, i
        cdef bytes name, st
        cdef list lines
        cdef bint has_length = False
        st = headers.get(b":status")
        status = int(st) if st is not None and st.isdigit() else 0
        if 100 <= status < 200:
            return                          # informational: not relayed (as HTTP/2 clients)
        if status < 200 or status > 999:
            self.lost(False)
            return
        lines = [b"HTTP/1.1 %d %s" % (status, reason_of(status))]
        for i in range(headers.count):
            name = headers.name(i)
            if name[:1] == b":" or name in REQUEST_DROPPED:
                continue
            if name == b"content-length":
                has_length = True
            lines.append(name + b": " + headers.value(i))
        if status != 204 and status != 304 and not has_length and \
                not self.head_request:
            if end_stream:
                lines.append(b"content-length: 0")
            else:
                lines.append(b"transfer-encoding: chunked")
                self.chunked_response = True
        lines.append(CRLF)
        self.head_delivered = True
        if end_stream:
            self.response_ended = True
        self.deliver([CRLF.join(lines)])
        if end_stream:
            self.response_done()

    cdef void on_body(self, object data, bint end_stream) except *:
        cdef Py_ssize_t n = len(data)
        cdef int64_t sid = self.sid
        cdef H2Upstream up = self.up
        if self.reading_paused or self.to_proto:
            self.to_proto.append((data, end_stream))    # the window stays closed meanwhile
            return
        if end_stream:
            self.response_ended = True
        if self.chunked_response:
            if n:
                pieces = [b"%x\r\n" % n, data, CRLF]
                if end_stream:
                    pieces.append(LAST_CHUNK)
            else:
                pieces = [LAST_CHUNK] if end_stream else []
        else:
            pieces = [data] if n else []
        if pieces:
            self.deliver(pieces)
        if n and sid >= 0 and up is not None:
            up.codec.consumed(<uint32_t>sid, n)  # the HttpUpstream took them
            _dirty_up.add(up)
        if end_stream and self.sid == sid:
            self.response_done()

    cdef void on_trailers(self, HeaderList trailers) except *:
        cdef list lines
        cdef int i
        if self.reading_paused or self.to_proto:
            self.to_proto.append(trailers)
            return
        self.response_ended = True
        if self.chunked_response:
            lines = [b"0"]
            for i in range(trailers.count):
                lines.append(trailers.name(i) + b": " + trailers.value(i))
            lines.append(CRLF)
            self.deliver([CRLF.join(lines)])
        # (length-delimited: the body is complete already; trailers have no place in it)
        self.response_done()

    cdef void response_done(self) except *:
        # the response's END_STREAM came: a request still going up is not wanted any more
        cdef H2Upstream up = self.up
        if self.sid < 0 or up is None:
            return
        if up.streams.get(self.sid) is self:
            del up.streams[self.sid]
        if not self.request_ended or self.to_up:
            up.codec.reset_stream(<uint32_t>self.sid, H2_NO_ERROR)
            _dirty_up.add(up)
            self.to_up.clear()
            self.to_up_bytes = 0
            self.in_request = False
        self.sid = -1
        up.open_waiting()

    cdef void on_reset(self, uint32_t code) except *:
        # the upstream reset the stream (or the codec did)
        self.sid = -1
        if self.proto.ds is None:
            return                          # its response was complete already (by length)
        if code == H2_REFUSED_STREAM and not self.head_delivered:
            self.not_processed()
        else:
            self.lost(False)

    cdef void not_processed(self) except *:
        # REFUSED_STREAM, or above a GOAWAY's last stream: the upstream did not process it;
        # it goes again on a (new) connection unless part of its body is gone
        self.sid = -1
        if self.closed:
            return
        if self.body_sent:
            self.lost(False)
            return
        self.open_stream()

    cdef void lost(self, bint connection) except *:
        # the stream failed: to the HttpUpstream (and so the HTTP/1 session) it is its
        # connection closing; before the response head that is a 503 (and retries, outlier
        # detection as for HTTP/1), after it the client connection is closed (never a
        # truncated response that looks complete)
        cdef HttpUpstream proto = self.proto
        if self.closed:
            return
        self.detach()
        self.closed = True
        if not connection:
            proto.got_bytes = True          # a stream's own failure: no "stale connection" retry
        proto.connection_lost(ConnectionResetError("HTTP/2 stream reset"))

    cdef void detach(self) except *:
        # stop carrying the current stream (cancelled if still open)
        cdef H2Upstream up = self.up
        if up is not None:
            if self.sid >= 0 and up.streams.get(self.sid) is self:
                del up.streams[self.sid]
                if self.sid in up.codec.streams:
                    up.codec.reset_stream(<uint32_t>self.sid, H2_CANCEL)
                _dirty_up.add(up)
                up.open_waiting()
            elif self in up.waiting:
                up.waiting.remove(self)
        self.sid = -1
        self.to_up = []
        self.to_up_bytes = 0
        self.to_proto = []
        self.in_request = False
