# HTTP/2 proxying (gRPC's way): an HTTP/2 client connection whose streams are routed like
# HTTP/1 requests, each forwarded as a stream over an HTTP/2 connection to an endpoint of
# the chosen cluster (prior knowledge, many streams per connection). Messages go through as
# they come (DATA frames are slices of the receive buffers), flow control is end to end:
# bytes are given back to the sender's window only once the other side took them.

from libc.stdint cimport int64_t, uint32_t, uint64_t

from fastmesh._core.buffer cimport RecvBuffer
from fastmesh._core.context cimport ListenerCtx
from fastmesh._core.h2 cimport H2Connection, H2Consumer
from fastmesh._core.hpack cimport HeaderList
from fastmesh._core.http1 cimport Head, HeadParser, ChunkedFramer
from fastmesh._core.filters cimport FaultPolicy
from fastmesh._core.http_proxy cimport HttpUpstream
from fastmesh._core.router cimport Route
from fastmesh._core.upstream cimport Cluster, Endpoint


cdef class ProxyStream:
    # one request/response exchange: a downstream stream and the upstream stream it became
    cdef:
        H2Downstream ds
        uint32_t ds_id
        H2Upstream up               # None until an endpoint is chosen (HTTP/2 clusters)
        H1Upstream h1up             # ... or the HTTP/1 connection carrying it (HTTP/1 ones)
        int64_t us_id               # -1 until the upstream stream is open
        Cluster cluster
        Endpoint ep
        Route route
        list request_headers        # (name, value) pairs sent upstream
        bint body_sent              # request DATA went upstream (it cannot be sent again)
        bint request_ended          # the client sent END_STREAM (or its trailers)
        list to_up                  # request DATA (and trailers) waiting for the upstream
        list to_down                # response DATA (and trailers) waiting for the client
        bint response_started       # response headers went to the client
        bint grpc                   # content-type application/grpc*: local replies are gRPC
        int status                  # the response status sent to the client (0: none)
        int64_t start_ms
        int64_t deadline_ms         # until the response headers: the route timeout (0: none)
        int64_t grpc_timeout_ms     # a gRPC request's grpc-timeout, as the route takes it
                                    # (-1: none given or not taken)
        int64_t max_duration_ms     # the whole stream: from a gRPC request's grpc-timeout
                                    # (routes with grpc_timeout_header_max_ms; 0: none)
        bint done
        # retries (only when the route has a retry policy): the request body so far, kept
        # while it is small enough to send again (None: too large, no more tries)
        int attempts
        list body_copy
        Py_ssize_t body_copy_bytes
        list tried                  # endpoints tried
        # the access log's (kept only when the listener has one)
        int64_t start_us
        bytes head_raw              # the routing head (%REQ(X)%), its first line rewritten
        bytes flag                  # why the proxy answered itself (local replies)
        int64_t bytes_in            # request DATA bytes from the client
        int64_t bytes_out           # response DATA bytes to the client
        bytes request_id
        bint hashed                 # the route's hash policies gave the request a hash:
        uint64_t hash               # ring_hash / maglev clusters pick by it
        # the HTTP filters'
        FaultPolicy fault           # a fault delay holding the stream (None: none)
        int fault_abort             # the abort drawn with it (0: none)
        object delay_timer
        list extra_headers          # on a local answer (x-ratelimit-*, configured ones)
        # the route's mirrors, while the request body comes (None: sent, or none)
        bytes mirror_head
        list mirror_body
        Py_ssize_t mirror_bytes

    cdef void start_upstream(self) except *
    cdef void pump_up(self) except *
    cdef void pump_down(self) except *
    cdef void finish(self) except *
    cdef void log_access(self) except *
    cdef void mirror_data(self, data, bint end) except *


cdef class H2Downstream(H2Consumer):
    cdef:
        ListenerCtx ctx
        object transport
        bytes client_ip             # the access log's (when the listener has one)
        int client_port
        RecvBuffer rbuf
        H2Connection codec
        HeadParser parser           # the routing heads of its streams (one per connection)
        dict streams                # downstream stream id -> ProxyStream
        bint closed
        bint goaway_sent
        int64_t idle_since_ms

    cdef void flush(self) except *
    cdef void route_stream(self, ProxyStream ps, HeaderList headers) except *
    cdef void forward(self, ProxyStream ps) except *      # to an endpoint of ps.cluster
    cdef void route_again(self, ProxyStream ps) except *  # its upstream did not process it
    cdef void local_reply(self, ProxyStream ps, int status, bytes reason) except *
    cdef void route_on(self, ProxyStream ps, int64_t now) except *
    cdef void forward_h1(self, ProxyStream ps) except *
    cdef void prepare(self, ProxyStream ps, Route route, Head h, HeaderList headers) except *
    cdef bint run_filters(self, ProxyStream ps, Route route, Head h) except -1
    cdef void fault_abort(self, ProxyStream ps, int status) except *
    cdef void max_duration_reached(self, ProxyStream ps) except *
    cdef void reset_stalled(self, int64_t now) except *
    cdef void respond_local(self, ProxyStream ps, int status, bytes body,
                            bytes reason) except *
    cdef void maybe_done(self, ProxyStream ps) except *
    cdef bint try_again(self, ProxyStream ps, int status, bint no_response,
                        bint connect_failure) except *
    cdef void begin_drain(self) except *


cdef class H1Upstream:
    # An HTTP/1.1 connection to an endpoint carrying one translated stream at a time:
    # the request head is made from the HTTP/2 headers, the body goes with its
    # content-length or chunked (trailers in the last chunk), the response head becomes
    # HTTP/2 headers (connection-specific fields dropped) and its body DATA, de-chunked.
    cdef:
        Cluster cluster
        Endpoint ep
        object loop
        object transport
        RecvBuffer rbuf
        HeadParser parser
        ChunkedFramer chunker
        ProxyStream ps              # the stream it carries, or None (idle)
        int body_kind               # BodyKind of the response
        int64_t body_left
        bint head_done
        bint response_done
        bint request_done
        bint chunked_request        # the request body goes chunked
        bint connected
        bint closed
        bint reusable
        bint write_paused
        bint reading_paused
        int64_t uncredited          # request bytes written while the socket was full
        int64_t idle_since_ms

    cdef void begin(self, ProxyStream ps) except *
    cdef void write_body(self, object data, bint end) except *
    cdef void write_trailers(self, list trailers) except *
    cdef void process(self) except *
    cdef bint response_head(self) except *
    cdef void response_body(self) except *
    cdef void maybe_release(self) except *
    cdef void set_reading(self, bint on) except *


cdef class H2Upstream(H2Consumer):
    cdef:
        Cluster cluster
        Endpoint ep
        object loop
        object transport
        RecvBuffer rbuf
        H2Connection codec
        dict streams                # upstream stream id -> ProxyStream
        list waiting                # ProxyStreams (and H2Bridges) waiting for the connection
                                    # or a free stream
        list bridge_waiters         # futures of HTTP/1 sessions waiting for it to connect
        bint connected
        bint closed
        int64_t idle_since_ms

    cdef void flush(self) except *
    cdef void open_waiting(self) except *
    cdef void fail_all(self, int status, bytes reason) except *


cdef class H2Bridge:
    # HTTP/1.1 clients to HTTP/2 clusters. The HTTP/1 session (http_proxy.HttpDownstream)
    # talks to an HttpUpstream as to any upstream connection (pooled, keep-alive, retries,
    # timeouts, access log all unchanged); this object is that HttpUpstream's transport.
    # Each request written to it becomes a stream on the endpoint's shared HTTP/2
    # connection (H2Upstream): its head becomes :method/:scheme/:authority/:path and the
    # fields that are not connection-specific, its body DATA (de-chunked; chunked trailers
    # become HTTP/2 trailers). The stream's response is given back to the HttpUpstream as
    # HTTP/1.1 bytes: a status line and fields, the body with the upstream's content-length
    # or chunked (upstream trailers in the last chunk). Flow control is end to end: request
    # DATA waiting for a window pauses the client's reads (pause_writing), and the stream's
    # window is given back only for response bytes the HttpUpstream has taken (its
    # pause_reading holds them).
    cdef:
        Cluster cluster
        Endpoint ep
        object loop
        HttpUpstream proto
        H2Upstream up               # the connection of the current stream (None: none)
        int64_t sid                 # its stream id (-1: not open)
        HeadParser parser           # the request heads the HTTP/1 session writes
        ChunkedFramer chunker       # a chunked request body
        bytes head_part             # a request head not yet complete
        bytes chunk_tail            # chunked framing since the last data span (trailers)
        list request_headers
        bint head_request           # the request is HEAD (its response has no body)
        int body_kind               # BodyKind of the request
        int64_t body_left
        bint in_request             # a request head was taken; its body may follow
        bint request_ended          # the request's end is queued (or sent)
        bint body_sent              # request DATA went up (it cannot be sent again)
        list to_up                  # request DATA (data, end) and trailers (list) waiting
        Py_ssize_t to_up_bytes
        bint writing_paused         # we told the HttpUpstream to stop writing
        bint chunked_response       # the response goes chunked (no content-length)
        bint head_delivered         # the response head went to the HttpUpstream
        bint response_ended
        list to_proto               # response (data, end) held while reading is paused
        bint reading_paused
        bint closed

    cdef void open_stream(self) except *
    cdef void start_upstream(self) except *
    cdef void feed(self, object data) except *
    cdef void begin_request(self, Head h) except *
    cdef void feed_body(self, object data) except *
    cdef void pump_up(self) except *
    cdef void deliver(self, list pieces) except *
    cdef void on_head(self, HeaderList headers, bint end_stream) except *
    cdef void on_body(self, object data, bint end_stream) except *
    cdef void on_trailers(self, HeaderList trailers) except *
    cdef void response_done(self) except *
    cdef void on_reset(self, uint32_t code) except *
    cdef void not_processed(self) except *
    cdef void lost(self, bint connection) except *
    cdef void detach(self) except *
