# HTTP/1.x codec: a strict head parser (requests and responses), a chunked-body framer,
# and the head writers a proxy needs (forwarded request, relayed response, own errors).
#
# A parsed head is one `bytes` copy of the head plus offsets: no per-header Python objects.
# Bodies are never copied here: the framers say how many bytes of the receive buffer belong
# to the body, and the session forwards those bytes as they are.

from libc.stdint cimport int64_t, uint8_t

# ---------------------------------------------------------------- results and errors

cdef enum ParseResult:
    PARSE_INCOMPLETE = 0         # need more bytes
    PARSE_ERROR = -1             # malformed: 400 (request) / 502 (response); see error_reason
    PARSE_TOO_LARGE = -2         # head over max_head_bytes or max_headers: 431 / 502

# -------------------------------------------------------------- header classification

cdef enum HeaderKind:
    HK_OTHER = 0
    HK_HOST                      # host
    HK_CONTENT_LENGTH            # content-length
    HK_TRANSFER_ENCODING         # transfer-encoding (hop-by-hop; re-emitted when chunked)
    HK_CONNECTION                # connection (hop-by-hop)
    HK_KEEP_ALIVE                # keep-alive (hop-by-hop)
    HK_TE                        # te (hop-by-hop)
    HK_TRAILER                   # trailer (hop-by-hop)
    HK_UPGRADE                   # upgrade (hop-by-hop)
    HK_PROXY                     # proxy-* (hop-by-hop)
    HK_EXPECT                    # expect (answered by the proxy)
    HK_XFF                       # x-forwarded-for (appended to)
    HK_XFP                       # x-forwarded-proto (replaced)
    HK_REQUEST_ID                # x-request-id (generated when absent)

cdef struct HeaderField:
    int name_off                 # offsets into Head.raw
    int name_len
    int value_off                # value with surrounding whitespace trimmed
    int value_len
    uint8_t kind                 # HeaderKind
    uint8_t drop                 # 1: not forwarded (hop-by-hop, or named by Connection)

# Body framing of a message, decided from its head.
cdef enum BodyKind:
    BODY_NONE = 0                # no body (GET without length, HEAD response, 1xx/204/304)
    BODY_LENGTH = 1              # content_length bytes
    BODY_CHUNKED = 2             # chunked transfer coding
    BODY_CLOSE = 3               # until the connection closes (responses only)


cdef class Head:
    cdef:
        bytes raw                # the head bytes, request/status line through the blank line
        bint is_request
        int minor                # HTTP/1.<minor>: 0 or 1
        # request line
        int method_off, method_len
        int target_off, target_len
        int path_len             # target bytes before '?' (origin-form)
        bint is_head_method      # method is HEAD: its response has no body
        # status line
        int status
        int reason_off, reason_len
        # headers
        HeaderField *fields      # nfields entries, malloc'd up to max_headers
        int nfields
        int host_idx             # index of the Host field, -1 if none
        int request_id_idx       # index of x-request-id, -1 if none
        int te_idx               # index of Transfer-Encoding, -1 if none (responses)
        bint te_codings          # Transfer-Encoding names codings besides a final chunked
        bint has_xff             # at least one x-forwarded-for
        # framing and connection semantics
        int body_kind            # BodyKind
        int64_t content_length   # BODY_LENGTH: body size in bytes; else -1
        bint conn_close          # Connection: close (or HTTP/1.0 without keep-alive)
        bint conn_keep_alive     # Connection: keep-alive (meaningful for HTTP/1.0)
        bint expect_continue     # Expect: 100-continue
        bint has_upgrade         # Upgrade header present (never honoured: stripped)
        bint https               # came over downstream TLS: x-forwarded-proto: https

    cdef bytes header_value(self, const char *lname, Py_ssize_t lname_len)  # first match or None
    cdef bint has_header(self, const char *lname, Py_ssize_t lname_len)
    cdef bytes method(self)
    cdef bytes path(self)        # target up to '?'
    cdef bytes host(self)        # Host value (port kept), lower-cased; b"" when absent


# Edits of a parsed request head before routing (downstream TLS: forward_client_cert)
cdef int head_hide_header(Head h, const char *lname, Py_ssize_t lname_len) except -1
# every field of that name, out of the raw head: not forwarded, not seen by lookups; -> how many
cdef int head_append_header(Head h, bytes name, bytes value) except -1
# one more field (at the end of the head), seen by routing and forwarded


cdef class HeadParser:
    # Reusable per connection: finds the end of a head across reads without rescanning,
    # then parses it strictly into a Head.
    cdef:
        bint is_request
        int max_head_bytes       # 431 / too large above this
        int max_headers          # 431 / too large above this many header fields
        Py_ssize_t scanned       # bytes already searched for the blank line
        const char *error_reason # set on PARSE_ERROR / PARSE_TOO_LARGE (static string)
        Head head                # the last head parsed (PARSE_OK)
        bint request_was_head    # responses: the request was HEAD (no body)

    cdef Py_ssize_t feed(self, const unsigned char *p, Py_ssize_t n) except -3
    # >0: a whole head of that many bytes was parsed into self.head; 0: incomplete;
    # PARSE_ERROR / PARSE_TOO_LARGE: see error_reason. Call reset() after a head is taken.
    cdef void reset(self)
    # internals
    cdef Py_ssize_t _fail(self, Py_ssize_t code, const char *reason)
    cdef Py_ssize_t _parse(self, const unsigned char *p, Py_ssize_t n, Py_ssize_t skipped) except -3
    cdef int _request_line(self, Head h, const unsigned char *p, Py_ssize_t le) except -3
    cdef int _status_line(self, Head h, const unsigned char *p, Py_ssize_t le) except -3
    cdef int _field(self, Head h, const unsigned char *p, Py_ssize_t ls, Py_ssize_t le) except -3
    cdef int _semantics(self, Head h, const unsigned char *p) except -3
    cdef void _connection_tokens(self, Head h, const unsigned char *p, HeaderField *f)


cdef enum ChunkState:
    CH_SIZE = 0                  # reading hex digits of a chunk size
    CH_EXT                       # reading a chunk extension up to CR
    CH_SIZE_LF                   # expecting LF after the size line's CR
    CH_DATA                      # inside chunk data (remaining bytes in `remaining`)
    CH_DATA_CR                   # expecting CR after data
    CH_DATA_LF                   # expecting LF after data
    CH_TRAILER_START             # at the start of a trailer line (or the final CRLF)
    CH_TRAILER_NAME              # inside a trailer field name, up to its ':'
    CH_TRAILER                   # inside a trailer field value
    CH_TRAILER_LF                # expecting LF after a trailer line's CR
    CH_FINAL_LF                  # expecting LF of the final empty line
    CH_DONE                      # body complete
    CH_ERROR                     # malformed


cdef class ChunkedFramer:
    # Validates a chunked body as it streams and finds its end; the bytes themselves are
    # forwarded unchanged by the caller (or, with data spans, de-chunked).
    cdef:
        int state                # ChunkState
        int64_t remaining        # bytes left in the current chunk
        int size_digits          # hex digits read for this size (at most 15)
        int line_bytes           # bytes in the current size/trailer line (bounded)
        int64_t body_bytes       # data bytes seen so far (for body limits)
        int max_line_bytes       # chunk-size line and trailer line limit
        int trailer_bytes        # trailer section size so far
        int max_trailer_bytes
        const char *error_reason

    cdef Py_ssize_t feed(self, const unsigned char *p, Py_ssize_t n,
                         Py_ssize_t *data_off, Py_ssize_t *data_len)
    # Consumes up to n bytes; stops after the first data span so callers can de-chunk.
    # Returns bytes consumed (the data span, if any, lies within them); state tells the rest.
    cdef void reset(self)
    cdef Py_ssize_t _error(self, Py_ssize_t i, const char *reason)


# ------------------------------------------------------------------------ writers

cdef struct Writer:
    char *buf
    Py_ssize_t len
    Py_ssize_t cap

cdef int w_init(Writer *w, Py_ssize_t cap) except -1
cdef int w_put(Writer *w, const char *s, Py_ssize_t n) except -1
cdef bytes w_finish(Writer *w)
cdef void w_free(Writer *w)

cdef bint has_request_id(Head h)
cdef bytes client_request_id(Head h)
cdef bytes build_request_head(Head h, bytes client_ip, bytes request_id,
                              tuple headers_to_add, tuple headers_to_remove,
                              bint strip_expect)
cdef enum TeMode:
    TE_AS_RECEIVED = 0           # chunked out iff chunked in
    TE_ADD_CHUNKED = 1           # close-delimited in, chunked out (HTTP/1.1 client)
    TE_NONE = 2                  # chunked in, de-chunked and close-delimited out (HTTP/1.0)

cdef bytes build_response_head(Head h, int te_mode, bint close_client,
                               bint keep_alive_10)
cdef bytes error_response(int status, bytes reason_code, bytes body, bint close)
cdef bytes make_request_id()
