# HTTP/2 (RFC 9113): one connection's framer and state machine, client or server side.
#
# The codec owns no socket. The session hands it its RecvBuffer after each read
# (`receive`): whole frames are parsed in place by offsets, DATA payloads go to the consumer
# as memoryviews of Slices of that buffer (never copied), header blocks are HPACK-decoded
# into one HeaderList each. What the codec has to say (SETTINGS/PING acks, WINDOW_UPDATEs,
# RST_STREAM, GOAWAY, and the frames the consumer asks for) collects in an output buffer the
# session takes with `take_output()` for one transport.writelines() per batch.
#
# Errors follow RFC 9113 §5.4: a connection error queues GOAWAY(last stream, code) and
# stops all further input (state H2_CLOSED; the session flushes and closes); a stream error
# queues RST_STREAM and the connection goes on. Every protection (rapid reset, CONTINUATION
# flood, control-frame flood, empty-DATA flood) is a bound with a counter; tripping one is a
# connection error ENHANCE_YOUR_CALM.
#
# Flow control: the peer's windows (what we may send) are enforced by send_data, which sends
# what the windows allow and says how much; the consumer resumes on on_window_open. Our
# windows (what the peer may send) are reopened only when the consumer says it is done with
# bytes (`consumed`), in batches of half a window: a slow consumer slows the peer down.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from fastmesh._core.buffer cimport RecvBuffer
from fastmesh._core.hpack cimport Decoder, Encoder, HeaderList
from fastmesh._core.outbuf cimport OutBuf

# ---------------------------------------------------------------- wire codes

cdef enum H2FrameType:
    H2_DATA = 0
    H2_HEADERS = 1
    H2_PRIORITY = 2                 # deprecated (RFC 9113 §5.3.2): validated, then ignored
    H2_RST_STREAM = 3
    H2_SETTINGS = 4
    H2_PUSH_PROMISE = 5             # we always send ENABLE_PUSH=0: receiving one is an error
    H2_PING = 6
    H2_GOAWAY = 7
    H2_WINDOW_UPDATE = 8
    H2_CONTINUATION = 9

cdef enum H2FrameFlags:
    H2_FLAG_END_STREAM = 0x1        # DATA, HEADERS
    H2_FLAG_ACK = 0x1               # SETTINGS, PING
    H2_FLAG_END_HEADERS = 0x4       # HEADERS, CONTINUATION
    H2_FLAG_PADDED = 0x8            # DATA, HEADERS
    H2_FLAG_PRIORITY = 0x20         # HEADERS

cdef enum H2ErrorCode:              # RFC 9113 §7
    H2_NO_ERROR = 0x0
    H2_PROTOCOL_ERROR = 0x1
    H2_INTERNAL_ERROR = 0x2
    H2_FLOW_CONTROL_ERROR = 0x3
    H2_SETTINGS_TIMEOUT = 0x4
    H2_STREAM_CLOSED = 0x5
    H2_FRAME_SIZE_ERROR = 0x6
    H2_REFUSED_STREAM = 0x7
    H2_CANCEL = 0x8
    H2_COMPRESSION_ERROR = 0x9
    H2_CONNECT_ERROR = 0xa
    H2_ENHANCE_YOUR_CALM = 0xb
    H2_INADEQUATE_SECURITY = 0xc
    H2_HTTP_1_1_REQUIRED = 0xd

cdef enum H2SettingId:
    H2_SETTINGS_HEADER_TABLE_SIZE = 0x1
    H2_SETTINGS_ENABLE_PUSH = 0x2
    H2_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
    H2_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
    H2_SETTINGS_MAX_FRAME_SIZE = 0x5
    H2_SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

cdef enum H2Sizes:
    H2_FRAME_HEADER_BYTES = 9
    H2_PREFACE_BYTES = 24           # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    H2_DEFAULT_WINDOW_BYTES = 65535
    H2_MIN_MAX_FRAME_BYTES = 16384  # SETTINGS_MAX_FRAME_SIZE range
    H2_MAX_MAX_FRAME_BYTES = 16777215
    H2_MAX_WINDOW_BYTES = 0x7fffffff
    H2_MAX_STREAM_ID = 0x7fffffff
    H2_RECENT_RESETS = 32           # streams we reset whose late frames are ignored

# ---------------------------------------------------------------- states

cdef enum H2ConnState:
    H2_AWAIT_PREFACE = 0            # server: the client's 24-byte preface is due
    H2_AWAIT_SETTINGS               # the peer's first frame must be SETTINGS (§3.4)
    H2_OPEN
    H2_CLOSED                       # a connection error (or the consumer) ended it; input dropped

cdef enum H2StreamState:            # RFC 9113 §5.1 (no push: no reserved states)
    H2S_IDLE = 0
    H2S_OPEN
    H2S_HALF_CLOSED_LOCAL           # we sent END_STREAM
    H2S_HALF_CLOSED_REMOTE          # the peer sent END_STREAM
    H2S_CLOSED

# ---------------------------------------------------------------- configuration

cdef struct H2Settings:             # one side's SETTINGS values
    uint32_t header_table_bytes
    uint32_t enable_push
    uint32_t max_concurrent_streams
    uint32_t initial_window_bytes
    uint32_t max_frame_bytes
    uint32_t max_header_list_bytes

cdef struct H2Limits:               # protections (ours; never sent)
    int64_t connection_window_bytes # our connection receive window
    int64_t max_header_block_bytes  # HEADERS + CONTINUATION payload bytes of one block
    int max_continuation_frames     # CONTINUATION frames in one block
    int max_pending_control_frames  # acks/RSTs we owe and the session has not taken yet
    int max_empty_data_frames       # consecutive DATA frames with no bytes and no END_STREAM
    int reset_burst                 # rapid reset: resets of live peer streams (theirs, or ours
    int reset_per_second            # provoked by bad frames) in a burst, refilled at this rate

cdef struct H2Counters:
    uint64_t frames_in
    uint64_t frames_out
    uint64_t data_bytes_in          # DATA payload bytes (padding excluded)
    uint64_t data_bytes_out
    uint64_t streams_opened         # by the peer (server) or by us (client)
    uint64_t streams_refused        # over max_concurrent_streams: REFUSED_STREAM
    uint64_t rst_in
    uint64_t rst_out
    uint64_t goaway_in
    uint64_t goaway_out
    uint64_t connection_errors      # GOAWAY with an error code sent
    uint64_t stream_errors          # RST_STREAM sent for a stream error
    uint64_t malformed_headers      # RFC 9113 §8.1.1 malformed messages
    uint64_t headers_too_large      # over SETTINGS_MAX_HEADER_LIST_SIZE
    uint64_t compression_errors
    uint64_t flow_control_errors
    uint64_t rapid_reset_trips      # protections tripped (ENHANCE_YOUR_CALM)
    uint64_t continuation_flood_trips
    uint64_t control_flood_trips
    uint64_t empty_data_flood_trips
    uint64_t window_stalls          # send_data stopped by a zero window
    uint64_t settings_in
    uint64_t pings_in
    uint64_t window_updates_out


# ---------------------------------------------------------------- the consumer

cdef class H2Consumer:
    # What the codec tells its owner. cpdef: a cdef subclass (the proxy session) is called
    # in C, a Python subclass (tests, tools) through Python. Exceptions end the connection
    # with INTERNAL_ERROR and are kept in H2Connection.callback_error.
    cpdef on_headers(self, uint32_t stream_id, HeaderList headers, bint end_stream)
                                    # request (server) or response, 1xx included (client)
    cpdef on_data(self, uint32_t stream_id, object data, bint end_stream)
                                    # data: memoryview over the receive buffer; call
                                    # H2Connection.consumed() once done with its bytes,
                                    # even if the stream was reset meanwhile (the
                                    # connection window counts them until then)
    cpdef on_trailers(self, uint32_t stream_id, HeaderList trailers)     # END_STREAM implied
    cpdef on_reset(self, uint32_t stream_id, uint32_t error_code, bint remote)
                                    # stream gone: RST_STREAM in (remote) or a stream error /
                                    # GOAWAY refusal here (not remote)
    cpdef on_goaway(self, uint32_t last_stream_id, uint32_t error_code, bytes debug_data)
    cpdef on_window_open(self, uint32_t stream_id)   # a stream send_data stopped can go on
    cpdef on_ping_ack(self, bytes payload)


# ---------------------------------------------------------------- streams

cdef class H2Stream:
    cdef:
        uint32_t stream_id
        int state                   # H2StreamState
        int64_t send_window         # bytes we may still send on it
        int64_t recv_window         # bytes the peer may still send on it
        int64_t recv_unacked        # consumed bytes not yet given back by WINDOW_UPDATE
        int64_t content_length      # from the headers, -1 if none
        int64_t data_bytes_in       # DATA bytes received (checked against content_length)
        int64_t blocked_since_ms    # send_data stopped by a window (0: not blocked)
        bint headers_in             # final (non-1xx) headers received: next HEADERS are trailers
        bint delivered              # the consumer has heard of this stream
        bint request_was_head       # client: the request was HEAD (response body must be empty)
        public object user          # the consumer's per-stream state


# ---------------------------------------------------------------- the connection

cdef class H2Connection:
    cdef:
        H2Consumer consumer
        bint is_client
        int state                   # H2ConnState
        H2Settings local            # what we sent
        H2Settings remote           # what the peer sent (defaults until its SETTINGS)
        H2Limits limits
        bint local_acked            # our SETTINGS acknowledged
        Decoder decoder
        Encoder encoder
        dict streams                # stream id → H2Stream (open and half-closed only)
        int peer_streams            # active streams the peer opened (≤ local.max_concurrent)
        int own_streams             # active streams we opened (≤ remote.max_concurrent)
        uint32_t last_peer_stream_id   # highest stream id the peer opened
        uint32_t next_stream_id     # next id we open (odd: client)
        uint32_t goaway_sent_last_id   # H2_MAX_STREAM_ID until we send GOAWAY
        uint32_t goaway_recv_last_id   # H2_MAX_STREAM_ID until the peer sends GOAWAY
        int64_t send_window         # connection: bytes we may still send
        int64_t recv_window         # connection: bytes the peer may still send
        int64_t recv_unacked        # connection: consumed bytes not yet WINDOW_UPDATEd
        list blocked                # stream ids send_data left waiting for a window
        # a header block in progress (HEADERS without END_HEADERS, then CONTINUATION)
        uint32_t cont_stream_id     # 0: none
        bint cont_end_stream
        int cont_frames
        OutBuf cont_block           # the fragments so far (bounded by max_header_block_bytes)
        # protections
        int pending_control         # control frames queued since the last take_output()
        int empty_data_run          # consecutive empty DATA frames
        double reset_tokens         # rapid-reset bucket
        int64_t reset_refill_ms     # last refill (monotonic ms)
        uint32_t recent_resets[32]  # H2_RECENT_RESETS: streams we reset, late frames ignored
        int recent_reset_next
        # output
        OutBuf out                  # frames not yet taken
        OutBuf scratch              # a header block being encoded
        list chunks                 # for writelines: bytes and DATA payload views, in order
        # outcome
        public H2Counters counters
        uint32_t error_code         # the connection error we sent (or the peer's GOAWAY code)
        const char *error_reason
        public object callback_error   # an exception a consumer callback raised
        RecvBuffer own_rbuf         # feed() (tests, tools) only

    # -- input --
    cdef int receive(self, RecvBuffer rb) except -1     # parse every whole frame in rb
    cdef int _frame(self, RecvBuffer rb, const unsigned char *p, uint32_t length,
                    uint8_t ftype, uint8_t flags, uint32_t stream_id) except -1
    cdef int _on_data(self, RecvBuffer rb, const unsigned char *p, uint32_t length,
                      uint8_t flags, uint32_t stream_id) except -1
    cdef int _on_headers(self, const unsigned char *p, uint32_t length, uint8_t flags,
                         uint32_t stream_id) except -1
    cdef int _on_continuation(self, const unsigned char *p, uint32_t length, uint8_t flags,
                              uint32_t stream_id) except -1
    cdef int _header_block(self, uint32_t stream_id, const unsigned char *p, Py_ssize_t n,
                           bint end_stream) except -1
    cdef int _on_rst(self, const unsigned char *p, uint32_t length, uint32_t stream_id) except -1
    cdef int _on_settings(self, const unsigned char *p, uint32_t length, uint8_t flags,
                          uint32_t stream_id) except -1
    cdef int _on_ping(self, const unsigned char *p, uint32_t length, uint8_t flags,
                      uint32_t stream_id) except -1
    cdef int _on_goaway(self, const unsigned char *p, uint32_t length, uint32_t stream_id) except -1
    cdef int _on_window_update(self, const unsigned char *p, uint32_t length,
                               uint32_t stream_id) except -1
    cdef int _on_priority(self, const unsigned char *p, uint32_t length,
                          uint32_t stream_id) except -1
    # stream bookkeeping
    cdef bint _is_idle(self, uint32_t stream_id) noexcept   # never opened by either side
    cdef bint _recently_reset(self, uint32_t stream_id) noexcept
    cdef int _close_stream(self, H2Stream s) except -1
    cdef int _remote_end(self, H2Stream s) except -1        # the peer sent END_STREAM
    cdef int _credit_connection(self, int64_t nbytes) except -1   # bytes nobody will consume
    cdef int _window_update(self, uint32_t stream_id, int64_t increment) except -1
    cdef int _wake(self, list stream_ids) except -1        # on_window_open for unblocked ones
    cdef int _local_end(self, H2Stream s) except -1        # we sent END_STREAM
    cdef int _start(self) except -1                        # preface, SETTINGS, window
    # errors: return 1 (connection error: stop) / 0 (stream error: go on)
    cdef int _connection_error(self, uint32_t code, const char *reason) except -1
    cdef int _stream_error(self, uint32_t stream_id, uint32_t code) except -1
    cdef int _control_queued(self) except -1                # the control-flood bound
    cdef int _reset_token(self) except -1   # rapid-reset bucket: 1 (and GOAWAY) when empty

    # -- output (what the consumer asks for) --
    cdef int _frame_header(self, uint32_t length, uint8_t ftype, uint8_t flags,
                           uint32_t stream_id) except -1
    cdef int _header_frames(self, uint32_t stream_id, bint end_stream) except -1
                                    # scratch → HEADERS + CONTINUATION by max frame size
    cdef int send_headers(self, uint32_t stream_id, object headers, bint end_stream) except -2
    cdef int send_header_list(self, uint32_t stream_id, HeaderList headers,
                              bint end_stream) except -2
    cdef int64_t start_request(self, object headers, bint end_stream) except -2
                                    # client: a new stream id, or -1 (no stream available)
    cdef int64_t send_data(self, uint32_t stream_id, object data, bint end_stream) except -2
                                    # bytes sent (≤ len(data)), or -1 (no such stream)
    cdef int reset_stream(self, uint32_t stream_id, uint32_t code) except -1
    cdef int consumed(self, uint32_t stream_id, int64_t nbytes) except -1
    cdef int set_max_concurrent_streams(self, uint32_t n) except -1
                                    # a SETTINGS frame; enforced at once (streams over it
                                    # before the peer's ack get REFUSED_STREAM: retry-safe)
    cdef int ping(self, bytes payload) except -1
    cdef int goaway(self, uint32_t code, bytes debug_data) except -1
    cdef list take_output(self)     # for transport.writelines; [] when nothing to send
                                    # (a session that cannot write must not take it: the
                                    # control-flood bound counts what waits here)
    cdef list stalled_streams(self, int64_t blocked_before_ms)
                                    # zero-window stalls: ids of streams send_data has been
                                    # unable to finish since before this time (the session's
                                    # sweeper resets them: a stall is bounded by its timeout)
    cdef int _flush_out(self) except -1
