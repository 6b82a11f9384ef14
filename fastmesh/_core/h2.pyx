"""HTTP/2 connection codec: framer, stream states, flow control, protections. See h2.pxd."""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp, strlen

cimport cython

from fastmesh._core.buffer cimport RecvBuffer, Slice
from fastmesh._core.clock cimport now_ms
from fastmesh._core.hpack cimport (Decoder, Encoder, HeaderList, HField, HF_PSEUDO,
                                   HPACK_OK, HPACK_ERR_COMPRESSION, HPACK_LIST_TOO_LARGE)
from fastmesh._core.outbuf cimport OutBuf, ob_reserve, ob_put, ob_take, ob_free

cdef const char *PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
cdef object EMPTY_VIEW = memoryview(b"")


# ------------------------------------------------------------------ big-endian helpers

cdef inline uint32_t be24(const unsigned char *p) noexcept:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]

cdef inline uint32_t be32(const unsigned char *p) noexcept:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) |
            (<uint32_t>p[2] << 8) | <uint32_t>p[3])

cdef inline void put_be32(unsigned char *p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


# ------------------------------------------------------------------ header validation
# RFC 9113 §8.2-8.3: a malformed request or response is a stream error PROTOCOL_ERROR.
# Strict on purpose: a proxy that forwards to HTTP/1 must not pass on what a hop could read
# differently (uppercase or odd bytes in names, CR/LF/NUL in values, connection headers).

cdef uint8_t NAME_OK[256]         # lower-case tchar
cdef uint8_t VALUE_BAD[256]       # NUL, CR, LF

cdef void _init_tables():
    cdef int c
    for c in range(256):
        NAME_OK[c] = 0
        VALUE_BAD[c] = 1 if (c == 0 or c == 10 or c == 13) else 0
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz":
        NAME_OK[c] = 1

_init_tables()

cdef enum PseudoBits:
    PS_METHOD = 1
    PS_SCHEME = 2
    PS_AUTHORITY = 4
    PS_PATH = 8
    PS_STATUS = 16
    PS_PROTOCOL = 32

cdef enum MessageKind:
    MSG_REQUEST = 0
    MSG_RESPONSE = 1
    MSG_TRAILERS = 2

cdef inline bint _is(const char *p, Py_ssize_t n, const char *lit, Py_ssize_t lit_len) noexcept:
    return n == lit_len and memcmp(p, lit, n) == 0


cdef int _validate(HeaderList h, int kind, int64_t *content_length, int *status,
                   bint *is_connect) noexcept:
    # 0: well-formed (content_length -1 if absent; status for responses); -1: malformed
    cdef int i, seen = 0, bit
    cdef Py_ssize_t j, nlen, vlen
    cdef const char *name
    cdef const unsigned char *value
    cdef bint regular_seen = False
    cdef int64_t cl = -1, v
    cdef HField *f
    content_length[0] = -1
    status[0] = 0
    is_connect[0] = False
    for i in range(h.count):
        f = &h.fields[i]
        name = h.buf + f.name_off
        nlen = f.name_len
        value = <const unsigned char *>h.buf + f.value_off
        vlen = f.value_len
        if nlen == 0:
            return -1
        for j in range(vlen):
            if VALUE_BAD[value[j]]:
                return -1
        if vlen and (value[0] == 32 or value[0] == 9 or value[vlen - 1] == 32 or
                     value[vlen - 1] == 9):
            return -1
        if f.flags & HF_PSEUDO:
            if regular_seen or kind == MSG_TRAILERS:
                return -1
            if kind == MSG_REQUEST:
                if _is(name, nlen, b":method", 7):
                    bit = PS_METHOD
                    if _is(<const char *>value, vlen, b"CONNECT", 7):
                        is_connect[0] = True
                elif _is(name, nlen, b":scheme", 7):
                    bit = PS_SCHEME
                elif _is(name, nlen, b":authority", 10):
                    bit = PS_AUTHORITY
                elif _is(name, nlen, b":path", 5):
                    bit = PS_PATH
                    if vlen == 0:
                        return -1
                elif _is(name, nlen, b":protocol", 9):
                    bit = PS_PROTOCOL
                else:
                    return -1
            else:
                if not _is(name, nlen, b":status", 7) or vlen != 3:
                    return -1
                bit = PS_STATUS
                for j in range(3):
                    if not (48 <= value[j] <= 57):
                        return -1
                status[0] = (value[0] - 48) * 100 + (value[1] - 48) * 10 + value[2] - 48
            if seen & bit:
                return -1                                # duplicated pseudo-header
            seen |= bit
            continue
        regular_seen = True
        for j in range(nlen):
            if not NAME_OK[<unsigned char>name[j]]:
                return -1
        # connection-specific fields are malformed in HTTP/2 (§8.2.2)
        if (_is(name, nlen, b"connection", 10) or _is(name, nlen, b"keep-alive", 10) or
                _is(name, nlen, b"proxy-connection", 16) or
                _is(name, nlen, b"transfer-encoding", 17) or _is(name, nlen, b"upgrade", 7)):
            return -1
        if _is(name, nlen, b"te", 2) and not _is(<const char *>value, vlen, b"trailers", 8):
            return -1
        if _is(name, nlen, b"content-length", 14) and kind != MSG_TRAILERS:
            if vlen == 0 or vlen > 15:
                return -1
            v = 0
            for j in range(vlen):
                if not (48 <= value[j] <= 57):
                    return -1
                v = v * 10 + value[j] - 48
            if cl >= 0 and cl != v:
                return -1                                # disagreeing duplicates
            cl = v
    if kind == MSG_REQUEST:
        if not (seen & PS_METHOD):
            return -1
        if is_connect[0] and not (seen & PS_PROTOCOL):
            if (seen & (PS_SCHEME | PS_PATH)) or not (seen & PS_AUTHORITY):
                return -1
        elif (seen & (PS_SCHEME | PS_PATH)) != (PS_SCHEME | PS_PATH):
            return -1
        if (seen & PS_PROTOCOL) and not is_connect[0]:
            return -1
    elif kind == MSG_RESPONSE:
        if not (seen & PS_STATUS):
            return -1
    content_length[0] = cl
    return 0


# ------------------------------------------------------------------ consumer

cdef class H2Consumer:
    """Receives what an H2Connection decodes. Override what you need; see h2.pxd."""

    cpdef on_headers(self, uint32_t stream_id, HeaderList headers, bint end_stream):
        pass

    cpdef on_data(self, uint32_t stream_id, object data, bint end_stream):
        pass

    cpdef on_trailers(self, uint32_t stream_id, HeaderList trailers):
        pass

    cpdef on_reset(self, uint32_t stream_id, uint32_t error_code, bint remote):
        pass

    cpdef on_goaway(self, uint32_t last_stream_id, uint32_t error_code, bytes debug_data):
        pass

    cpdef on_window_open(self, uint32_t stream_id):
        pass

    cpdef on_ping_ack(self, bytes payload):
        pass


@cython.freelist(64)
cdef class H2Stream:
    def __cinit__(self):
        self.content_length = -1

    @property
    def id(self):
        return self.stream_id

    @property
    def stream_state(self):
        return self.state

    @property
    def send_window_bytes(self):
        return self.send_window

    @property
    def recv_window_bytes(self):
        return self.recv_window


cdef H2Stream new_stream(uint32_t stream_id, int64_t send_window, int64_t recv_window):
    cdef H2Stream s = H2Stream.__new__(H2Stream)
    s.stream_id = stream_id
    s.state = H2S_OPEN
    s.send_window = send_window
    s.recv_window = recv_window
    return s


# ------------------------------------------------------------------ the connection

cdef class H2Connection:
    """One HTTP/2 connection's codec. See h2.pxd.

    H2Connection(consumer, client=False, *, max_concurrent_streams=100,
                 initial_window_bytes=262144, connection_window_bytes=1048576,
                 max_frame_bytes=16384, max_header_list_bytes=65536, header_table_bytes=4096,
                 max_header_block_bytes=None, max_continuation_frames=64,
                 max_pending_control_frames=1000, max_empty_data_frames=100,
                 reset_burst=200, reset_per_second=100)

    A client queues the preface; both sides queue their SETTINGS (and a connection
    WINDOW_UPDATE when connection_window_bytes > 65535) at once: take_output() has them."""

    def __cinit__(self, H2Consumer consumer, bint client=False, *,
                  uint32_t max_concurrent_streams=100, uint32_t initial_window_bytes=262144,
                  int64_t connection_window_bytes=1048576, uint32_t max_frame_bytes=16384,
                  uint32_t max_header_list_bytes=65536, uint32_t header_table_bytes=4096,
                  max_header_block_bytes=None, int max_continuation_frames=64,
                  int max_pending_control_frames=1000, int max_empty_data_frames=100,
                  int reset_burst=200, int reset_per_second=100):
        cdef int i
        if not (H2_MIN_MAX_FRAME_BYTES <= max_frame_bytes <= H2_MAX_MAX_FRAME_BYTES):
            raise ValueError("max_frame_bytes out of range (RFC 9113 §6.5.2)")
        if initial_window_bytes > H2_MAX_WINDOW_BYTES or not (
                H2_DEFAULT_WINDOW_BYTES <= connection_window_bytes <= H2_MAX_WINDOW_BYTES):
            raise ValueError("window size out of range")
        self.consumer = consumer
        self.is_client = client
        self.state = H2_AWAIT_SETTINGS if client else H2_AWAIT_PREFACE
        self.local.header_table_bytes = header_table_bytes
        self.local.enable_push = 0
        self.local.max_concurrent_streams = max_concurrent_streams
        self.local.initial_window_bytes = initial_window_bytes
        self.local.max_frame_bytes = max_frame_bytes
        self.local.max_header_list_bytes = max_header_list_bytes
        self.remote.header_table_bytes = 4096
        self.remote.enable_push = 1
        self.remote.max_concurrent_streams = 0xffffffff
        self.remote.initial_window_bytes = H2_DEFAULT_WINDOW_BYTES
        self.remote.max_frame_bytes = H2_MIN_MAX_FRAME_BYTES
        self.remote.max_header_list_bytes = 0xffffffff
        self.limits.connection_window_bytes = connection_window_bytes
        # a header block may be a little larger than the list it decodes to is allowed to be
        # (Huffman is < 8/5, indexed fields are smaller still): twice the list, at least 16 KiB
        self.limits.max_header_block_bytes = (max_header_block_bytes if max_header_block_bytes
                                              is not None else
                                              max(2 * <int64_t>max_header_list_bytes, 16384))
        self.limits.max_continuation_frames = max_continuation_frames
        self.limits.max_pending_control_frames = max_pending_control_frames
        self.limits.max_empty_data_frames = max_empty_data_frames
        self.limits.reset_burst = reset_burst
        self.limits.reset_per_second = reset_per_second
        self.local_acked = False
        # until our SETTINGS is acknowledged the peer's encoder may use the default 4096
        self.decoder = Decoder(max(header_table_bytes, 4096), max_header_list_bytes)
        self.decoder.set_settings_table_bytes(4096)
        self.encoder = Encoder(4096)
        self.streams = {}
        self.peer_streams = self.own_streams = 0
        self.last_peer_stream_id = 0
        self.next_stream_id = 1 if client else 2
        self.goaway_sent_last_id = H2_MAX_STREAM_ID
        self.goaway_recv_last_id = H2_MAX_STREAM_ID
        self.send_window = H2_DEFAULT_WINDOW_BYTES
        self.recv_window = connection_window_bytes
        self.recv_unacked = 0
        self.blocked = []
        self.cont_stream_id = 0
        self.cont_frames = 0
        self.pending_control = 0
        self.empty_data_run = 0
        self.reset_tokens = reset_burst
        self.reset_refill_ms = now_ms()
        self.recent_reset_next = 0
        for i in range(<int>H2_RECENT_RESETS):
            self.recent_resets[i] = 0
        self.chunks = []
        self.error_code = H2_NO_ERROR
        self.error_reason = NULL
        self.callback_error = None
        self.own_rbuf = None
        self._start()

    def __dealloc__(self):
        ob_free(&self.out)
        ob_free(&self.scratch)
        ob_free(&self.cont_block)

    cdef int _start(self) except -1:
        cdef unsigned char entry[6]
        cdef int ids[5]
        cdef uint32_t vals[5]
        cdef int i, n = 0
        if self.is_client:
            ob_put(&self.out, PREFACE, H2_PREFACE_BYTES)
        ids[0] = H2_SETTINGS_ENABLE_PUSH; vals[0] = 0
        ids[1] = H2_SETTINGS_MAX_CONCURRENT_STREAMS; vals[1] = self.local.max_concurrent_streams
        ids[2] = H2_SETTINGS_INITIAL_WINDOW_SIZE; vals[2] = self.local.initial_window_bytes
        ids[3] = H2_SETTINGS_MAX_FRAME_SIZE; vals[3] = self.local.max_frame_bytes
        ids[4] = H2_SETTINGS_MAX_HEADER_LIST_SIZE; vals[4] = self.local.max_header_list_bytes
        n = 5
        self._frame_header(6 * (n + (self.local.header_table_bytes != 4096)), H2_SETTINGS, 0, 0)
        for i in range(n):
            entry[0] = <unsigned char>(ids[i] >> 8)
            entry[1] = <unsigned char>ids[i]
            put_be32(entry + 2, vals[i])
            ob_put(&self.out, entry, 6)
        if self.local.header_table_bytes != 4096:
            entry[0] = 0
            entry[1] = H2_SETTINGS_HEADER_TABLE_SIZE
            put_be32(entry + 2, self.local.header_table_bytes)
            ob_put(&self.out, entry, 6)
        if self.limits.connection_window_bytes > H2_DEFAULT_WINDOW_BYTES:
            self._frame_header(4, H2_WINDOW_UPDATE, 0, 0)
            put_be32(entry, <uint32_t>(self.limits.connection_window_bytes - H2_DEFAULT_WINDOW_BYTES))
            ob_put(&self.out, entry, 4)
        return 0

    # ============================================================== input

    cdef int receive(self, RecvBuffer rb) except -1:
        """Parses every whole frame in rb (consuming it); a partial frame stays for the next
        read. Never raises for bad input: see state / error_code."""
        cdef const unsigned char *p
        cdef Py_ssize_t avail
        cdef uint32_t length
        cdef int r
        while True:
            avail = rb.size()
            if self.state == H2_CLOSED:
                if avail:
                    rb.consume(avail)                   # nothing more is read
                return 0
            if avail == 0:
                return 0
            p = rb.head()
            if self.state == H2_AWAIT_PREFACE:
                if memcmp(p, PREFACE, avail if avail < H2_PREFACE_BYTES else H2_PREFACE_BYTES):
                    self._connection_error(H2_PROTOCOL_ERROR, "h2: bad connection preface")
                    continue
                if avail < H2_PREFACE_BYTES:
                    return 0
                rb.consume(H2_PREFACE_BYTES)
                self.state = H2_AWAIT_SETTINGS
                continue
            if avail < H2_FRAME_HEADER_BYTES:
                return 0
            length = be24(p)
            if length > self.local.max_frame_bytes:
                self._connection_error(H2_FRAME_SIZE_ERROR, "h2: frame over SETTINGS_MAX_FRAME_SIZE")
                continue
            if self.state == H2_AWAIT_SETTINGS and (p[3] != H2_SETTINGS or p[4] & H2_FLAG_ACK):
                self._connection_error(H2_PROTOCOL_ERROR, "h2: first frame is not SETTINGS")
                continue
            if avail < H2_FRAME_HEADER_BYTES + length:
                if rb.block.capacity < H2_FRAME_HEADER_BYTES + length + rb.start:
                    rb.reserve(H2_FRAME_HEADER_BYTES + length - avail)
                return 0
            self.counters.frames_in += 1
            try:
                r = self._frame(rb, p + H2_FRAME_HEADER_BYTES, length, p[3], p[4],
                                be32(p + 5) & 0x7fffffff)
            except Exception as exc:                    # a consumer callback raised
                self.callback_error = exc
                self._connection_error(H2_INTERNAL_ERROR, "h2: consumer callback raised")
            if rb.size() >= H2_FRAME_HEADER_BYTES + length:
                rb.consume(H2_FRAME_HEADER_BYTES + length)

    cdef int _frame(self, RecvBuffer rb, const unsigned char *p, uint32_t length,
                    uint8_t ftype, uint8_t flags, uint32_t stream_id) except -1:
        if self.cont_stream_id and ftype != H2_CONTINUATION:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: header block interrupted")
        if ftype == H2_DATA:
            return self._on_data(rb, p, length, flags, stream_id)
        if ftype == H2_HEADERS:
            return self._on_headers(p, length, flags, stream_id)
        if ftype == H2_CONTINUATION:
            return self._on_continuation(p, length, flags, stream_id)
        if ftype == H2_SETTINGS:
            return self._on_settings(p, length, flags, stream_id)
        if ftype == H2_WINDOW_UPDATE:
            return self._on_window_update(p, length, stream_id)
        if ftype == H2_RST_STREAM:
            return self._on_rst(p, length, stream_id)
        if ftype == H2_PING:
            return self._on_ping(p, length, flags, stream_id)
        if ftype == H2_GOAWAY:
            return self._on_goaway(p, length, stream_id)
        if ftype == H2_PRIORITY:
            return self._on_priority(p, length, stream_id)
        if ftype == H2_PUSH_PROMISE:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: PUSH_PROMISE with push disabled")
        return 0                                        # unknown types are ignored (§5.5)

    # ---------------------------------------------------------- stream bookkeeping

    cdef bint _is_idle(self, uint32_t stream_id) noexcept:
        if (stream_id & 1) == (1 if self.is_client else 0):
            return stream_id >= self.next_stream_id     # ours, never opened
        return stream_id > self.last_peer_stream_id

    cdef bint _recently_reset(self, uint32_t stream_id) noexcept:
        cdef int i
        for i in range(<int>H2_RECENT_RESETS):
            if self.recent_resets[i] == stream_id:
                return True
        return False

    cdef int _close_stream(self, H2Stream s) except -1:
        if s.state == H2S_CLOSED:
            return 0
        s.state = H2S_CLOSED
        del self.streams[s.stream_id]
        if (s.stream_id & 1) == (1 if self.is_client else 0):
            self.own_streams -= 1
        else:
            self.peer_streams -= 1
        if s.blocked_since_ms:
            s.blocked_since_ms = 0
            try:
                self.blocked.remove(s.stream_id)
            except ValueError:
                pass
        # what the peer sent and nobody will consume still counts against the connection
        if s.recv_unacked:
            s.recv_unacked = 0
        return 0

    cdef int _remote_end(self, H2Stream s) except -1:
        if s.state == H2S_OPEN:
            s.state = H2S_HALF_CLOSED_REMOTE
        elif s.state == H2S_HALF_CLOSED_LOCAL:
            self._close_stream(s)
        return 0

    cdef int _credit_connection(self, int64_t nbytes) except -1:
        # bytes that count against the connection window but reach no consumer (padding,
        # DATA on closed or reset streams): given back at once
        self.recv_unacked += nbytes
        if self.recv_unacked >= self.limits.connection_window_bytes // 2:
            self._window_update(0, self.recv_unacked)
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0
        return 0

    cdef int _window_update(self, uint32_t stream_id, int64_t increment) except -1:
        cdef unsigned char b[4]
        self._frame_header(4, H2_WINDOW_UPDATE, 0, stream_id)
        put_be32(b, <uint32_t>increment)
        ob_put(&self.out, b, 4)
        self.counters.window_updates_out += 1
        return 0

    # ---------------------------------------------------------- errors

    cdef int _connection_error(self, uint32_t code, const char *reason) except -1:
        # GOAWAY(last peer stream, code, reason) and no more input
        cdef unsigned char b[8]
        cdef Py_ssize_t rlen = strlen(reason) if reason is not NULL else 0
        if self.state == H2_CLOSED:
            return 1
        self.state = H2_CLOSED
        self.error_code = code
        self.error_reason = reason
        self.counters.connection_errors += 1
        if code == H2_FLOW_CONTROL_ERROR:
            self.counters.flow_control_errors += 1
        elif code == H2_COMPRESSION_ERROR:
            self.counters.compression_errors += 1
        self._frame_header(8 + rlen, H2_GOAWAY, 0, 0)
        put_be32(b, self.last_peer_stream_id)
        put_be32(b + 4, code)
        ob_put(&self.out, b, 8)
        if rlen:
            ob_put(&self.out, reason, rlen)
        self.counters.goaway_out += 1
        self.goaway_sent_last_id = self.last_peer_stream_id
        return 1

    cdef int _stream_error(self, uint32_t stream_id, uint32_t code) except -1:
        cdef H2Stream s = self.streams.get(stream_id)
        cdef bint tell = s is not None and s.delivered
        self.counters.stream_errors += 1
        if code == H2_FLOW_CONTROL_ERROR:
            self.counters.flow_control_errors += 1
        self.reset_stream(stream_id, code)
        if self.state == H2_CLOSED:
            return 1
        if tell:
            self.consumer.on_reset(stream_id, code, False)
            if not self.is_client and self._reset_token():
                return 1                                # a live request cancelled by us
        return self._control_queued()

    cdef int _reset_token(self) except -1:
        # Rapid reset (CVE-2023-44487): streams the peer opens and cancels cost us work it
        # does not wait for. The same goes for streams it makes us reset with bad frames
        # (MadeYouReset, CVE-2025-8671). One token bucket bounds both.
        cdef int64_t t = now_ms()
        self.reset_tokens += (t - self.reset_refill_ms) * self.limits.reset_per_second / 1000.0
        self.reset_refill_ms = t
        if self.reset_tokens > self.limits.reset_burst:
            self.reset_tokens = self.limits.reset_burst
        self.reset_tokens -= 1
        if self.reset_tokens < 0:
            self.counters.rapid_reset_trips += 1
            return self._connection_error(H2_ENHANCE_YOUR_CALM, "h2: rapid reset")
        return 0

    cdef int _control_queued(self) except -1:
        # a frame we owe the peer in answer to its input: bounded until the session takes
        # output (it does not while the peer does not read: the SETTINGS/PING/RST floods)
        self.pending_control += 1
        if self.pending_control > self.limits.max_pending_control_frames:
            self.counters.control_flood_trips += 1
            return self._connection_error(H2_ENHANCE_YOUR_CALM, "h2: control frame flood")
        return 0

    # ---------------------------------------------------------- frames

    cdef int _on_data(self, RecvBuffer rb, const unsigned char *p, uint32_t length,
                      uint8_t flags, uint32_t stream_id) except -1:
        cdef uint32_t pad = 0, off = 0, dlen
        cdef H2Stream s
        cdef bint end = (flags & H2_FLAG_END_STREAM) != 0
        cdef object view
        if stream_id == 0:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: DATA on stream 0")
        if flags & H2_FLAG_PADDED:
            if length < 1:
                return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: DATA padding length missing")
            pad = p[0]
            off = 1
            if pad >= length:
                return self._connection_error(H2_PROTOCOL_ERROR, "h2: DATA padding too long")
        dlen = length - off - pad
        # the whole frame counts against the windows (§6.9.1)
        if length > self.recv_window:
            self.counters.flow_control_errors += 1
            return self._connection_error(H2_FLOW_CONTROL_ERROR, "h2: connection window exceeded")
        self.recv_window -= length
        s = self.streams.get(stream_id)
        if s is None:
            if self._is_idle(stream_id):
                return self._connection_error(H2_PROTOCOL_ERROR, "h2: DATA on an idle stream")
            self._credit_connection(length)
            if self._recently_reset(stream_id):
                return 0
            return self._stream_error(stream_id, H2_STREAM_CLOSED)
        if s.state != H2S_OPEN and s.state != H2S_HALF_CLOSED_LOCAL:
            self._credit_connection(length)
            return self._stream_error(stream_id, H2_STREAM_CLOSED)
        if length > s.recv_window:
            self._credit_connection(length)
            return self._stream_error(stream_id, H2_FLOW_CONTROL_ERROR)
        s.recv_window -= length
        if length - dlen:
            self._credit_connection(length - dlen)     # padding: consumed here
            s.recv_unacked += length - dlen
        if dlen == 0 and not end:
            self.empty_data_run += 1
            if self.empty_data_run > self.limits.max_empty_data_frames:
                self.counters.empty_data_flood_trips += 1
                return self._connection_error(H2_ENHANCE_YOUR_CALM, "h2: empty DATA flood")
        else:
            self.empty_data_run = 0
        s.data_bytes_in += dlen
        self.counters.data_bytes_in += dlen
        if s.content_length >= 0 and (s.data_bytes_in > s.content_length or
                                      (end and s.data_bytes_in != s.content_length)):
            self.counters.malformed_headers += 1
            self._credit_connection(dlen)
            return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
        if not s.headers_in:                            # DATA before the final headers
            self._credit_connection(dlen)
            return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
        if end:
            self._remote_end(s)
        if dlen:
            view = PyMemoryView_FromObject(Slice.new(
                rb.block, rb.start + H2_FRAME_HEADER_BYTES + off, dlen))
        else:
            view = EMPTY_VIEW
        self.consumer.on_data(stream_id, view, end)
        return 0

    cdef int _on_headers(self, const unsigned char *p, uint32_t length, uint8_t flags,
                         uint32_t stream_id) except -1:
        cdef uint32_t off = 0, pad = 0
        if stream_id == 0:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: HEADERS on stream 0")
        if flags & H2_FLAG_PADDED:
            if length < 1:
                return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: HEADERS padding length missing")
            pad = p[0]
            off = 1
        if flags & H2_FLAG_PRIORITY:
            if length < off + 5:
                return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: HEADERS priority truncated")
            if (be32(p + off) & 0x7fffffff) == stream_id:
                # a stream depending on itself (§5.3.1): still decode the block (HPACK state)
                off += 5
                if pad > length - off:
                    return self._connection_error(H2_PROTOCOL_ERROR, "h2: HEADERS padding too long")
                if flags & H2_FLAG_END_HEADERS:
                    self._header_block(stream_id, p + off, length - off - pad, False)
                    return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
                return self._connection_error(H2_PROTOCOL_ERROR, "h2: stream depends on itself")
            off += 5
        if pad > length - off:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: HEADERS padding too long")
        if flags & H2_FLAG_END_HEADERS:
            return self._header_block(stream_id, p + off, length - off - pad,
                                      (flags & H2_FLAG_END_STREAM) != 0)
        if length - off - pad > self.limits.max_header_block_bytes:
            self.counters.continuation_flood_trips += 1
            return self._connection_error(H2_ENHANCE_YOUR_CALM, "h2: header block too large")
        self.cont_stream_id = stream_id
        self.cont_end_stream = (flags & H2_FLAG_END_STREAM) != 0
        self.cont_frames = 0
        self.cont_block.len = 0
        ob_put(&self.cont_block, p + off, length - off - pad)
        return 0

    cdef int _on_continuation(self, const unsigned char *p, uint32_t length, uint8_t flags,
                              uint32_t stream_id) except -1:
        cdef int r
        if self.cont_stream_id == 0 or stream_id != self.cont_stream_id:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: CONTINUATION without HEADERS")
        self.cont_frames += 1
        if (self.cont_frames > self.limits.max_continuation_frames or
                self.cont_block.len + length > self.limits.max_header_block_bytes):
            self.counters.continuation_flood_trips += 1
            return self._connection_error(H2_ENHANCE_YOUR_CALM, "h2: CONTINUATION flood")
        ob_put(&self.cont_block, p, length)
        if not (flags & H2_FLAG_END_HEADERS):
            return 0
        self.cont_stream_id = 0
        r = self._header_block(stream_id, self.cont_block.data, self.cont_block.len,
                               self.cont_end_stream)
        self.cont_block.len = 0
        return r

    cdef int _header_block(self, uint32_t stream_id, const unsigned char *p, Py_ssize_t n,
                           bint end_stream) except -1:
        cdef HeaderList h = HeaderList.__new__(HeaderList)
        cdef int r, kind, status = 0
        cdef int64_t content_length = -1
        cdef bint is_connect = False, ours
        cdef H2Stream s
        # HPACK first, whatever becomes of the stream: the tables must stay in step
        r = self.decoder.decode(p, n, h)
        if r == HPACK_ERR_COMPRESSION:
            return self._connection_error(H2_COMPRESSION_ERROR, self.decoder.error_reason)
        s = self.streams.get(stream_id)
        ours = (stream_id & 1) == (1 if self.is_client else 0)
        if s is None:
            if ours or not self._is_idle(stream_id):
                if self._is_idle(stream_id):
                    return self._connection_error(H2_PROTOCOL_ERROR, "h2: HEADERS on an idle stream of ours")
                if self._recently_reset(stream_id):
                    return 0
                # RFC 9113 §5.1 allows a connection error; a stream error is kinder to a
                # peer whose trailers crossed a reset older than our recent-resets memory
                return self._stream_error(stream_id, H2_STREAM_CLOSED)
            if self.is_client:
                return self._connection_error(H2_PROTOCOL_ERROR, "h2: server opened a stream")
            # the peer opens a stream
            self.last_peer_stream_id = stream_id
            if stream_id > self.goaway_sent_last_id:
                return 0                                # after our GOAWAY: ignored (§6.8)
            if self.peer_streams >= <int>self.local.max_concurrent_streams:
                self.counters.streams_refused += 1
                return self._stream_error(stream_id, H2_REFUSED_STREAM)
            s = new_stream(stream_id, self.remote.initial_window_bytes,
                           self.local.initial_window_bytes if self.local_acked else
                           max(self.local.initial_window_bytes, H2_DEFAULT_WINDOW_BYTES))
            self.streams[stream_id] = s
            self.peer_streams += 1
            self.counters.streams_opened += 1
        elif s.state == H2S_HALF_CLOSED_REMOTE or s.state == H2S_CLOSED:
            return self._stream_error(stream_id, H2_STREAM_CLOSED)
        if r == HPACK_LIST_TOO_LARGE:
            self.counters.headers_too_large += 1
            if not self.is_client and not s.headers_in:
                # answer 431 ourselves (RFC 9113 §10.5.1), then stop the request
                self.send_headers(stream_id, ((b":status", b"431"),), True)
                if self.streams.get(stream_id) is not None:
                    self.reset_stream(stream_id, H2_NO_ERROR)
                return self._control_queued()
            return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
        if s.headers_in:
            kind = MSG_TRAILERS
        else:
            kind = MSG_RESPONSE if self.is_client else MSG_REQUEST
        if _validate(h, kind, &content_length, &status, &is_connect) < 0:
            self.counters.malformed_headers += 1
            return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
        if kind == MSG_TRAILERS:
            if not end_stream:
                self.counters.malformed_headers += 1
                return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
            if s.content_length >= 0 and s.data_bytes_in != s.content_length:
                self.counters.malformed_headers += 1
                return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
            self._remote_end(s)
            self.consumer.on_trailers(stream_id, h)
            return 0
        if kind == MSG_RESPONSE and 100 <= status < 200:
            if status == 101 or end_stream:             # no 101 in HTTP/2 (§8.6)
                self.counters.malformed_headers += 1
                return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
            s.delivered = True
            self.consumer.on_headers(stream_id, h, False)
            return 0
        s.headers_in = True
        if kind == MSG_RESPONSE and (s.request_was_head or status == 204 or status == 304):
            s.content_length = 0                        # no content, whatever the headers say
        else:
            s.content_length = content_length
        if end_stream:
            if s.content_length > 0:
                self.counters.malformed_headers += 1
                return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
            self._remote_end(s)
        s.delivered = True
        self.consumer.on_headers(stream_id, h, end_stream)
        return 0

    cdef int _on_rst(self, const unsigned char *p, uint32_t length, uint32_t stream_id) except -1:
        cdef H2Stream s
        cdef int64_t t
        cdef uint32_t code
        if stream_id == 0:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: RST_STREAM on stream 0")
        if length != 4:
            return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: RST_STREAM length")
        if self._is_idle(stream_id):
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: RST_STREAM on an idle stream")
        self.counters.rst_in += 1
        s = self.streams.get(stream_id)
        if s is None:
            return 0
        code = be32(p)
        self._close_stream(s)
        if not self.is_client and self._reset_token():
            return 1
        if s.delivered:
            self.consumer.on_reset(stream_id, code, True)
        return 0

    cdef int _on_settings(self, const unsigned char *p, uint32_t length, uint8_t flags,
                          uint32_t stream_id) except -1:
        cdef uint32_t i, ident, value
        cdef int64_t delta
        cdef H2Stream s
        cdef list opened = None
        if stream_id != 0:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: SETTINGS on a stream")
        if flags & H2_FLAG_ACK:
            if length != 0:
                return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: SETTINGS ack with a payload")
            if not self.local_acked:
                self.local_acked = True
                self.decoder.set_settings_table_bytes(self.local.header_table_bytes)
                delta = <int64_t>self.local.initial_window_bytes - H2_DEFAULT_WINDOW_BYTES
                if delta < 0:                           # streams opened before the ack
                    for s in self.streams.values():
                        s.recv_window += delta
            return 0
        if length % 6:
            return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: SETTINGS length")
        self.counters.settings_in += 1
        for i in range(0, length, 6):
            ident = (<uint32_t>p[i] << 8) | p[i + 1]
            value = be32(p + i + 2)
            if ident == H2_SETTINGS_HEADER_TABLE_SIZE:
                self.remote.header_table_bytes = value
                self.encoder.set_peer_table_bytes(value if value < 0x7fffffff else 0x7fffffff)
            elif ident == H2_SETTINGS_ENABLE_PUSH:
                if value > 1 or (self.is_client and value != 0):
                    return self._connection_error(H2_PROTOCOL_ERROR, "h2: bad SETTINGS_ENABLE_PUSH")
                self.remote.enable_push = value
            elif ident == H2_SETTINGS_MAX_CONCURRENT_STREAMS:
                self.remote.max_concurrent_streams = value
            elif ident == H2_SETTINGS_INITIAL_WINDOW_SIZE:
                if value > H2_MAX_WINDOW_BYTES:
                    self.counters.flow_control_errors += 1
                    return self._connection_error(H2_FLOW_CONTROL_ERROR, "h2: SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = <int64_t>value - self.remote.initial_window_bytes
                self.remote.initial_window_bytes = value
                for s in self.streams.values():
                    if s.send_window + delta > H2_MAX_WINDOW_BYTES:
                        self.counters.flow_control_errors += 1
                        return self._connection_error(H2_FLOW_CONTROL_ERROR, "h2: stream window overflow")
                    if delta > 0 and s.send_window <= 0 < s.send_window + delta and s.blocked_since_ms:
                        if opened is None:
                            opened = []
                        opened.append(s.stream_id)
                    s.send_window += delta
            elif ident == H2_SETTINGS_MAX_FRAME_SIZE:
                if not (H2_MIN_MAX_FRAME_BYTES <= value <= H2_MAX_MAX_FRAME_BYTES):
                    return self._connection_error(H2_PROTOCOL_ERROR, "h2: bad SETTINGS_MAX_FRAME_SIZE")
                self.remote.max_frame_bytes = value
            elif ident == H2_SETTINGS_MAX_HEADER_LIST_SIZE:
                self.remote.max_header_list_bytes = value
            # unknown settings are ignored (§6.5.2)
        self._frame_header(0, H2_SETTINGS, H2_FLAG_ACK, 0)
        if self.state == H2_AWAIT_SETTINGS:
            self.state = H2_OPEN
        if self._control_queued():
            return 1
        if opened is not None and self.send_window > 0:
            self._wake(opened)
        return 0

    cdef int _wake(self, list stream_ids) except -1:
        cdef H2Stream s
        for sid in stream_ids:
            s = self.streams.get(sid)
            if s is not None and s.blocked_since_ms and s.send_window > 0:
                s.blocked_since_ms = 0
                try:
                    self.blocked.remove(sid)
                except ValueError:
                    pass
                self.consumer.on_window_open(sid)
        return 0

    cdef int _on_ping(self, const unsigned char *p, uint32_t length, uint8_t flags,
                      uint32_t stream_id) except -1:
        if stream_id != 0:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: PING on a stream")
        if length != 8:
            return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: PING length")
        if flags & H2_FLAG_ACK:
            self.consumer.on_ping_ack(PyBytes_FromStringAndSize(<const char *>p, 8))
            return 0
        self.counters.pings_in += 1
        self._frame_header(8, H2_PING, H2_FLAG_ACK, 0)
        ob_put(&self.out, p, 8)
        return self._control_queued()

    cdef int _on_goaway(self, const unsigned char *p, uint32_t length, uint32_t stream_id) except -1:
        cdef uint32_t last_id, code
        cdef list refused
        cdef H2Stream s
        if stream_id != 0:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: GOAWAY on a stream")
        if length < 8:
            return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: GOAWAY length")
        last_id = be32(p) & 0x7fffffff
        code = be32(p + 4)
        if last_id > self.goaway_recv_last_id:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: GOAWAY last stream id grew")
        self.counters.goaway_in += 1
        self.goaway_recv_last_id = last_id
        if code != H2_NO_ERROR:
            self.error_code = code
        # our streams past last_id were never processed: safe to retry elsewhere
        refused = [s for s in self.streams.values()
                   if (s.stream_id & 1) == (1 if self.is_client else 0) and s.stream_id > last_id]
        for s in refused:
            self._close_stream(s)
        self.consumer.on_goaway(last_id, code,
                                PyBytes_FromStringAndSize(<const char *>p + 8, min(length - 8, 256)))
        for s in refused:
            self.consumer.on_reset(s.stream_id, H2_REFUSED_STREAM, False)
        return 0

    cdef int _on_window_update(self, const unsigned char *p, uint32_t length,
                               uint32_t stream_id) except -1:
        cdef uint32_t inc
        cdef H2Stream s
        if length != 4:
            return self._connection_error(H2_FRAME_SIZE_ERROR, "h2: WINDOW_UPDATE length")
        inc = be32(p) & 0x7fffffff
        if stream_id == 0:
            if inc == 0:
                return self._connection_error(H2_PROTOCOL_ERROR, "h2: WINDOW_UPDATE of 0")
            if self.send_window + inc > H2_MAX_WINDOW_BYTES:
                self.counters.flow_control_errors += 1
                return self._connection_error(H2_FLOW_CONTROL_ERROR, "h2: connection window overflow")
            self.send_window += inc
            if self.blocked and self.send_window > 0:
                self._wake(list(self.blocked))
            return 0
        if self._is_idle(stream_id):
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: WINDOW_UPDATE on an idle stream")
        s = self.streams.get(stream_id)
        if s is None:
            return 0                                    # closed: late updates are fine
        if inc == 0:
            return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
        if s.send_window + inc > H2_MAX_WINDOW_BYTES:
            return self._stream_error(stream_id, H2_FLOW_CONTROL_ERROR)
        s.send_window += inc
        if s.blocked_since_ms and s.send_window > 0 and self.send_window > 0:
            self._wake([stream_id])
        return 0

    cdef int _on_priority(self, const unsigned char *p, uint32_t length,
                          uint32_t stream_id) except -1:
        if stream_id == 0:
            return self._connection_error(H2_PROTOCOL_ERROR, "h2: PRIORITY on stream 0")
        if length != 5:
            return self._stream_error(stream_id, H2_FRAME_SIZE_ERROR)
        if (be32(p) & 0x7fffffff) == stream_id:
            return self._stream_error(stream_id, H2_PROTOCOL_ERROR)
        return 0

    # ============================================================== output

    cdef int _frame_header(self, uint32_t length, uint8_t ftype, uint8_t flags,
                           uint32_t stream_id) except -1:
        cdef unsigned char *h
        if self.out.len + H2_FRAME_HEADER_BYTES > self.out.cap:
            ob_reserve(&self.out, H2_FRAME_HEADER_BYTES + length)
        h = self.out.data + self.out.len
        h[0] = <unsigned char>(length >> 16)
        h[1] = <unsigned char>(length >> 8)
        h[2] = <unsigned char>length
        h[3] = ftype
        h[4] = flags
        put_be32(h + 5, stream_id)
        self.out.len += H2_FRAME_HEADER_BYTES
        self.counters.frames_out += 1
        return 0

    cdef int _header_frames(self, uint32_t stream_id, bint end_stream) except -1:
        cdef Py_ssize_t off = 0, n = self.scratch.len, part
        cdef uint32_t max_frame = self.remote.max_frame_bytes
        cdef uint8_t flags
        cdef bint first = True
        while True:
            part = n - off if n - off <= max_frame else max_frame
            flags = H2_FLAG_END_HEADERS if off + part == n else 0
            if first:
                if end_stream:
                    flags |= H2_FLAG_END_STREAM
                self._frame_header(part, H2_HEADERS, flags, stream_id)
            else:
                self._frame_header(part, H2_CONTINUATION, flags, stream_id)
            ob_put(&self.out, self.scratch.data + off, part)
            off += part
            first = False
            if off >= n:
                break
        self.scratch.len = 0
        return 0

    cdef int _local_end(self, H2Stream s) except -1:
        if s.state == H2S_OPEN:
            s.state = H2S_HALF_CLOSED_LOCAL
        elif s.state == H2S_HALF_CLOSED_REMOTE:
            self._close_stream(s)
        return 0

    cdef int send_headers(self, uint32_t stream_id, object headers, bint end_stream) except -2:
        """Response headers, 1xx, or (with end_stream) trailers. 0, or -1: no such stream."""
        cdef H2Stream s = self.streams.get(stream_id)
        if s is None or s.state == H2S_HALF_CLOSED_LOCAL or self.state == H2_CLOSED:
            return -1
        self.scratch.len = 0
        self.encoder.begin_block(&self.scratch)
        self.encoder.encode_pairs(&self.scratch, headers)
        self._header_frames(stream_id, end_stream)
        if end_stream:
            self._local_end(s)
        return 0

    cdef int send_header_list(self, uint32_t stream_id, HeaderList headers,
                              bint end_stream) except -2:
        cdef H2Stream s = self.streams.get(stream_id)
        if s is None or s.state == H2S_HALF_CLOSED_LOCAL or self.state == H2_CLOSED:
            return -1
        self.scratch.len = 0
        self.encoder.begin_block(&self.scratch)
        self.encoder.encode_list(&self.scratch, headers)
        self._header_frames(stream_id, end_stream)
        if end_stream:
            self._local_end(s)
        return 0

    cdef int64_t start_request(self, object headers, bint end_stream) except -2:
        cdef uint32_t sid = self.next_stream_id
        cdef H2Stream s
        if (not self.is_client or self.state == H2_CLOSED or sid > H2_MAX_STREAM_ID or
                sid > self.goaway_recv_last_id or
                self.own_streams >= <int64_t>self.remote.max_concurrent_streams):
            return -1
        self.next_stream_id += 2
        s = new_stream(sid, self.remote.initial_window_bytes,
                       self.local.initial_window_bytes if self.local_acked else
                       max(self.local.initial_window_bytes, H2_DEFAULT_WINDOW_BYTES))
        s.delivered = True
        self.streams[sid] = s
        self.own_streams += 1
        self.counters.streams_opened += 1
        for pair in headers:
            if pair[0] == b":method":
                s.request_was_head = pair[1] == b"HEAD"
                break
        self.send_headers(sid, headers, end_stream)
        return sid

    cdef int64_t send_data(self, uint32_t stream_id, object data, bint end_stream) except -2:
        cdef H2Stream s = self.streams.get(stream_id)
        cdef Py_ssize_t n, sent = 0, part
        cdef int64_t allowed
        cdef uint8_t flags
        cdef object view
        if s is None or s.state == H2S_HALF_CLOSED_LOCAL or self.state == H2_CLOSED:
            return -1
        n = len(data)
        allowed = min(self.send_window, s.send_window)
        if allowed < 0:
            allowed = 0
        if n > allowed:
            self.counters.window_stalls += 1
            if not s.blocked_since_ms:
                s.blocked_since_ms = now_ms() or 1
                self.blocked.append(stream_id)
        elif s.blocked_since_ms:
            s.blocked_since_ms = 0
            self.blocked.remove(stream_id)
        if n == 0 or allowed == 0:
            if n == 0 and end_stream:
                self._frame_header(0, H2_DATA, H2_FLAG_END_STREAM, stream_id)
                self._local_end(s)
            return 0
        view = data if isinstance(data, memoryview) else memoryview(data)
        while sent < n and sent < allowed:
            part = min(n - sent, allowed - sent, <Py_ssize_t>self.remote.max_frame_bytes)
            flags = H2_FLAG_END_STREAM if (end_stream and sent + part == n) else 0
            self._frame_header(part, H2_DATA, flags, stream_id)
            if part <= 1024:                            # small: copy into the frame run
                ob_put(&self.out, PyBytes_AS_STRING(bytes(view[sent:sent + part])), part)
            else:                                       # large: pass the view on
                self._flush_out()
                self.chunks.append(view[sent:sent + part])
            sent += part
        self.send_window -= sent
        s.send_window -= sent
        self.counters.data_bytes_out += sent
        if end_stream and sent == n:
            self._local_end(s)
        return sent

    cdef int reset_stream(self, uint32_t stream_id, uint32_t code) except -1:
        cdef unsigned char b[4]
        cdef H2Stream s = self.streams.get(stream_id)
        if self.state == H2_CLOSED:
            return 0
        self._frame_header(4, H2_RST_STREAM, 0, stream_id)
        put_be32(b, code)
        ob_put(&self.out, b, 4)
        self.counters.rst_out += 1
        self.recent_resets[self.recent_reset_next] = stream_id
        self.recent_reset_next = (self.recent_reset_next + 1) % H2_RECENT_RESETS
        if s is not None:
            self._close_stream(s)
        return 0

    cdef int consumed(self, uint32_t stream_id, int64_t nbytes) except -1:
        """The consumer is done with nbytes of DATA on stream_id: reopen windows in batches."""
        cdef H2Stream s
        if self.state == H2_CLOSED or nbytes <= 0:
            return 0
        self._credit_connection(nbytes)
        s = self.streams.get(stream_id)
        if s is None or s.state == H2S_HALF_CLOSED_REMOTE:
            return 0                                    # nothing more will come on it
        s.recv_unacked += nbytes
        if s.recv_unacked >= self.local.initial_window_bytes // 2:
            self._window_update(stream_id, s.recv_unacked)
            s.recv_window += s.recv_unacked
            s.recv_unacked = 0
        return 0

    cdef int set_max_concurrent_streams(self, uint32_t n) except -1:
        cdef unsigned char entry[6]
        if self.state == H2_CLOSED:
            return 0
        self.local.max_concurrent_streams = n
        self._frame_header(6, H2_SETTINGS, 0, 0)
        entry[0] = 0
        entry[1] = H2_SETTINGS_MAX_CONCURRENT_STREAMS
        put_be32(entry + 2, n)
        ob_put(&self.out, entry, 6)
        return 0

    cdef int ping(self, bytes payload) except -1:
        if len(payload) != 8:
            raise ValueError("PING payload is 8 bytes")
        self._frame_header(8, H2_PING, 0, 0)
        ob_put(&self.out, PyBytes_AS_STRING(payload), 8)
        return 0

    cdef int goaway(self, uint32_t code, bytes debug_data) except -1:
        """Graceful (NO_ERROR: streams up to the last peer stream finish) or not."""
        cdef unsigned char b[8]
        if self.state == H2_CLOSED:
            return 0
        self._frame_header(8 + len(debug_data), H2_GOAWAY, 0, 0)
        put_be32(b, self.last_peer_stream_id)
        put_be32(b + 4, code)
        ob_put(&self.out, b, 8)
        ob_put(&self.out, PyBytes_AS_STRING(debug_data), len(debug_data))
        self.goaway_sent_last_id = self.last_peer_stream_id
        self.counters.goaway_out += 1
        if code != H2_NO_ERROR:
            self.state = H2_CLOSED
            self.error_code = code
        return 0

    cdef int _flush_out(self) except -1:
        if self.out.len:
            self.chunks.append(ob_take(&self.out))
        return 0

    cdef list take_output(self):
        cdef list chunks
        self._flush_out()
        self.pending_control = 0
        if not self.chunks:
            return []
        chunks = self.chunks
        self.chunks = []
        return chunks

    cdef list stalled_streams(self, int64_t blocked_before_ms):
        cdef list out = []
        cdef H2Stream s
        for sid in self.blocked:
            s = self.streams.get(sid)
            if s is not None and s.blocked_since_ms and s.blocked_since_ms < blocked_before_ms:
                out.append(sid)
        return out

    # ============================================================== Python API
    # (tests, tools, the demo server; the proxy calls the cdef methods)

    def feed(self, data):
        """Receive bytes as if read from the socket (an internal RecvBuffer)."""
        cdef Py_ssize_t off = 0, n = len(data), took
        cdef object mv = memoryview(data)
        if self.own_rbuf is None:
            self.own_rbuf = RecvBuffer(16384, 2 * (self.local.max_frame_bytes + 9) + 16384)
        while True:
            took = self.own_rbuf.py_feed(mv[off:]) if off < n else 0
            off += took
            self.receive(self.own_rbuf)
            if off >= n or (took == 0 and self.state == H2_CLOSED):
                break

    def py_receive(self, RecvBuffer rb):
        self.receive(rb)

    def data_to_send(self):
        """Everything queued, joined (tests); sessions use take_output() via writelines."""
        return b"".join([bytes(c) for c in self.take_output()])

    def output_chunks(self):
        return self.take_output()

    def py_send_headers(self, uint32_t stream_id, headers, bint end_stream=False):
        return self.send_headers(stream_id, headers, end_stream)

    def py_start_request(self, headers, bint end_stream=False):
        return self.start_request(headers, end_stream)

    def py_send_data(self, uint32_t stream_id, data, bint end_stream=False):
        return self.send_data(stream_id, data, end_stream)

    def py_reset_stream(self, uint32_t stream_id, uint32_t code=H2_CANCEL):
        self.reset_stream(stream_id, code)

    def py_consumed(self, uint32_t stream_id, int64_t nbytes):
        self.consumed(stream_id, nbytes)

    def py_set_max_concurrent_streams(self, uint32_t n):
        self.set_max_concurrent_streams(n)

    def py_ping(self, bytes payload):
        self.ping(payload)

    def py_goaway(self, uint32_t code=H2_NO_ERROR, bytes debug_data=b""):
        self.goaway(code, debug_data)

    def py_stalled_streams(self, int64_t stalled_ms, now=None):
        """Streams waiting for a window longer than stalled_ms (monotonic ms clock)."""
        return self.stalled_streams((now_ms() if now is None else now) - stalled_ms)

    @property
    def settings_acked(self):
        """Our SETTINGS acknowledged (a session times this out: SETTINGS_TIMEOUT)."""
        return self.local_acked

    def stream(self, uint32_t stream_id):
        return self.streams.get(stream_id)

    @property
    def closed(self):
        return self.state == H2_CLOSED

    @property
    def connection_state(self):
        return self.state

    @property
    def last_error(self):
        return (self.error_code,
                None if self.error_reason is NULL else (<bytes>self.error_reason).decode())

    @property
    def send_window_bytes(self):
        return self.send_window

    @property
    def recv_window_bytes(self):
        return self.recv_window

    @property
    def remote_settings(self):
        return self.remote

    @property
    def active_streams(self):
        return len(self.streams)
