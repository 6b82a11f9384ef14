# HTTP/1.1 proxying: the downstream session (a client connection on an http1 listener),
# the upstream connection (to one endpoint, pooled keep-alive), and the pool operations.
#
# One request at a time per client connection: its head is parsed, routed, the head is
# rewritten and sent upstream with the body streamed behind it; the response streams back;
# then the next (possibly pipelined) request is parsed. Responses are therefore in order.
# Bytes move as Slices of the receive buffers, never copied in Python.

from libc.stdint cimport int64_t, uint64_t

from fastmesh._core.buffer cimport Receiver, RecvBuffer
from fastmesh._core.http1 cimport Head, HeadParser, ChunkedFramer
from fastmesh._core.router cimport Route
from fastmesh._core.retry cimport RetryPolicy
from fastmesh._core.filters cimport FaultPolicy, TokenBucket
from fastmesh._core.upstream cimport Cluster, Endpoint
from fastmesh._core.context cimport ListenerCtx

cdef enum DsState:
    DS_HEAD = 0             # waiting for (the rest of) a request head
    DS_CONNECTING           # routed; waiting for a new upstream connection
    DS_FORWARDING           # bound to an upstream: body streaming, then the response
    DS_DISCARD              # answered locally; dropping the request body, then next request
    DS_LINGER               # error sent and write side shut: dropping input until the peer closes
    DS_CLOSED

cdef enum PauseReason:
    PAUSE_RBUF_FULL = 1     # receive buffer at its cap (pipelined bytes, body waiting)
    PAUSE_UPSTREAM = 2      # upstream write buffer above its high-water mark

cdef enum DeadlineKind:
    DL_NONE = 0
    DL_IDLE                 # no request in progress: close quietly
    DL_HEAD                 # request head started but not complete: 408
    DL_CONNECT              # upstream connect: 503
    DL_RESPONSE             # upstream response head: 504
    DL_LINGER               # lingering close: abort
    DL_STREAM_IDLE          # an exchange with no bytes either way: 408 / 504 / close
    DL_PENDING              # waiting for an upstream connection (circuit breaker): 504
    DL_RETRY_WAIT           # backing off before a retry; the route timeout: 504

cdef enum UsState:
    US_CONNECTING = 0
    US_IDLE                 # in the pool (or just connected, not yet bound)
    US_ACTIVE               # carrying a request
    US_CLOSED


cdef class HttpDownstream(Receiver):
    cdef:
        ListenerCtx ctx
        object transport
        HeadParser parser
        ChunkedFramer chunker       # request body framing (chunked requests)
        bytes client_ip             # for x-forwarded-for
        tuple dst                   # (host, port) the client addressed (ORIGINAL_DST)
        int state                   # DsState
        int pause_mask              # PauseReason bits; reading paused while non-zero
        bint reading_paused         # what we last told the transport
        bint write_paused           # client's write buffer above high water
        bint in_process             # inside the head loop (no re-entry)
        bint served                 # a request was started on this connection
        list out                    # bytes for the client, written once per event (_flush)
        bint closing_flush          # _close() flushes before closing
        # the request in progress
        Head req
        Route route
        Cluster cluster
        Endpoint ep
        HttpUpstream up
        object connect_task
        int64_t body_left           # BODY_LENGTH: request body bytes not yet forwarded
        bint req_done               # request fully forwarded (or dropped)
        bint resp_started           # response head written to the client
        bint close_after            # close once this response is complete
        bint retried                # already retried once on a fresh connection
        bint retry_active           # counted in cluster.retries_active
        bint waiting_cx             # counted in cluster.pending (waiting for a connection)
        bint queued                 # in ep.http_pending (max_connections reached)
        # route retries (only when the route has a retry policy)
        RetryPolicy retry
        int attempts                # tries made for this request (1 = the first)
        list tried                  # endpoints tried (previous_hosts)
        int64_t rq_deadline_ms      # the route timeout over all tries; 0 = none
        object retry_timer          # back-off before the next try
        bytes retry_rid             # the x-request-id the first try was given (if generated)
        # HTTP filters (only when the listener has some)
        bytes extra_rsp_headers     # added to this request's response (x-ratelimit-*)
        object delay_timer          # a fault delay holding the request
        object fault_active         # the FaultPolicy whose delay holds it
        int filter_pos              # the filter that delayed it
        # a copy of a streamed request body, for mirrors and retries (only when needed)
        list body_copy
        Py_ssize_t body_copy_bytes
        bytes mirror_head           # mirrors waiting for the whole body
        bytes retry_body            # the whole body, for another try
        bint sent_continue          # we answered Expect: 100-continue
        # timers
        int64_t deadline_ms         # 0 = none
        int deadline_kind           # DeadlineKind
        # access log (filled only when the listener has one)
        int64_t rq_start_us         # when the request head was complete (now_us)
        int rsp_status              # status sent to the client, 0 = none yet
        bytes rsp_flag              # the proxy's reason when it answered or cut it, or None
        bytes rq_id                 # x-request-id as forwarded
        bytes rsp_head              # the response head as sent (a format's RESP(X))
        int64_t rsp_body_bytes      # response body bytes sent, decoded (BYTES_SENT)
        int client_port
        uint64_t reads              # read events on this exchange's two connections ...
        uint64_t reads_seen         # ... when the stream-idle deadline was last armed

    # -- loop callbacks (def): connection_made, eof_received, connection_lost,
    #    pause_writing, resume_writing (get_buffer / buffer_updated: Receiver's)
    cdef int received(self, Py_ssize_t nbytes) except -1
    # -- request lifecycle
    cdef void _process(self)
    cdef void _to_http2(self)
    cdef void _start_request(self)
    cdef void _acquire_upstream(self)
    cdef void _open_connection(self)
    cdef void _leave_pending(self)
    cdef void _take_connection(self, HttpUpstream up, bint reused)
    cdef void _end_retry(self)
    cdef void _mirror(self, Head h, Route route)
    cdef void _send_mirrors(self, Route route, bytes head, bytes body)
    cdef void _keep_body_copy(self, list pieces, Py_ssize_t first)
    cdef void _keep_body_for_retries(self, Head h)
    cdef void _route_on(self, Head h, Route route)
    cdef bint _run_filters(self, Head h, Route route, int start, bint after_delay)
    cdef bint _inject_fault(self, Head h, FaultPolicy fp, int pos, bint delayed)
    cdef bint _rate_limited(self, TokenBucket tb)
    cdef bint _try_retry(self, int status, bint no_response, bint connect_failure)
    cdef void _retry_now(self)
    cdef Endpoint _pick_original(self, Cluster cluster, Head h)
    cdef void _bind(self, HttpUpstream up)
    cdef void _forward_body(self)
    cdef _forward_body_with(self, bytes head)
    cdef _request_body_error(self, int status, bytes reason, int slot)
    cdef void _discard_body(self)
    cdef void _request_forwarded(self)
    cdef void _finish_request(self)
    # -- called by the upstream connection
    cdef void _on_response_head(self, bytes head)
    cdef void _on_response_body(self, list pieces)
    cdef void _on_response_complete(self)
    cdef void _on_upstream_lost(self, bint before_head, bint retriable, int reason_slot)
    # -- local answers and closing
    cdef void _local_response(self, int status, bytes reason, bytes body, int err_slot)
    cdef void _fail_and_linger(self, int status, bytes reason, int err_slot)
    cdef _linger(self)
    cdef void _flush(self)
    cdef void _close(self)
    cdef bint _close_idle(self)
    cdef void _abort(self)
    cdef void _set_deadline(self, int kind, int64_t timeout_ms)
    cdef void _arm_stream_idle(self)
    cdef void _drop_upstream(self)
    cdef void _on_stream_idle(self)
    cdef void _update_reading(self)
    cdef void _count_response(self, int status)
    cdef void _note_local_response(self, bytes resp)
    cdef void _access_log(self)
    cpdef void on_deadline(self, int64_t now)


cdef class HttpUpstream(Receiver):
    cdef:
        Cluster cluster
        Endpoint ep
        object transport
        HeadParser parser
        ChunkedFramer chunker
        HttpDownstream ds           # bound session, None when idle
        int state                   # UsState
        int body_kind               # BodyKind of the response in progress
        int64_t body_left
        int te_mode                 # how its body goes out (TeMode)
        bint head_done              # final response head received
        bint got_bytes              # any response byte for the current request
        bint reusable               # keep-alive allowed after this response
        bint reused                 # taken from the pool for this request
        bint reading_paused
        bint bridged                # its transport is an h2_proxy.H2Bridge (an HTTP/2
                                    # cluster): not a connection of its own (not counted)
        int64_t idle_since_ms

    cdef int received(self, Py_ssize_t nbytes) except -1
    cdef void _begin(self, HttpDownstream ds, bint reused)
    cdef void _process(self)
    cdef bint _response_head(self)
    cdef void _response_body(self)
    cdef void _complete(self)
    cdef void _release(self)
    cdef void _close(self)
    cdef void pause_reading(self)
    cdef void resume_reading(self)


# the request's hash under a route's hash policies (HTTP/2 streams use it too)
cdef bint request_hash(tuple policies, Head h, bytes client_ip, uint64_t *out) except -1
# copies of a request for a route's mirror clusters (HTTP/2 streams use it too)
cdef void send_mirrors(loop, Route route, bytes head, bytes body) except *
