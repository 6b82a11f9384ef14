# SOFARPC Bolt framing (see bolt.pxd for the layout and the API).
#
# Nothing here allocates from a length read off the wire: frame_peek checks the announced
# total against max_frame_bytes as soon as the fixed part is in, and every other reader is
# bounded by the bytes actually present.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from libc.string cimport memcmp, memcpy


# -- CRC32 (reflected IEEE polynomial, the one zlib and java.util.zip.CRC32 use) ----------

cdef extern from *:
    """
    #define FM_BOLT_CRC_POLY 0xEDB88320u  /* x^32 + x^26 + ... + 1, bit-reversed */
    #define FM_BOLT_NULL_LEN 0xFFFFFFFFu  /* header block: a null key or value */
    """
    const uint32_t _CRC_POLY "FM_BOLT_CRC_POLY"
    const uint32_t _NULL_LEN "FM_BOLT_NULL_LEN"   # no bytes follow

cdef uint32_t _crc_table[256]       # one-byte steps from a zero register
cdef uint32_t _x2n_table[64]        # x^(2^i) mod P, reflected (bit 31 is x^0)


cdef uint32_t _gf2_mulmod(uint32_t a, uint32_t b) noexcept:
    # a * b mod P over GF(2), both reflected: bit 31 holds the x^0 coefficient
    cdef uint32_t prod = 0
    cdef uint32_t m = 0x80000000
    while m:
        if a & m:
            prod ^= b
        # b *= x: the x^31 coefficient sits in bit 0 and wraps through the polynomial
        if b & 1:
            b = (b >> 1) ^ _CRC_POLY
        else:
            b >>= 1
        m >>= 1
    return prod


cdef uint32_t _x_pow_8k(uint64_t k) noexcept:
    # x^(8k) mod P: the effect of appending k zero bytes to a register
    cdef uint32_t r = 0x80000000     # x^0
    cdef int i = 3                   # x^(2^3) = x^8, one byte
    while k and i < 64:
        if k & 1:
            r = _gf2_mulmod(_x2n_table[i], r)
        k >>= 1
        i += 1
    return r


cdef void _crc_init_tables() noexcept:
    cdef uint32_t c
    cdef int i, bit
    for i in range(256):
        c = <uint32_t>i
        for bit in range(8):
            if c & 1:
                c = (c >> 1) ^ _CRC_POLY
            else:
                c >>= 1
        _crc_table[i] = c
    _x2n_table[0] = 0x40000000       # x^1
    for i in range(1, 64):
        _x2n_table[i] = _gf2_mulmod(_x2n_table[i - 1], _x2n_table[i - 1])


_crc_init_tables()


cdef uint32_t bolt_crc32(uint32_t crc, const unsigned char *p, Py_ssize_t n) noexcept:
    # same contract as zlib.crc32(data, crc)
    cdef uint32_t c = crc ^ 0xFFFFFFFF
    cdef Py_ssize_t i
    for i in range(n):
        c = _crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


cdef void frame_crc_patch_id(unsigned char *p, const FrameInfo *f, uint32_t old_id,
                             uint32_t new_id) noexcept:
    # CRC is affine: crc(M ^ D) = crc(M) ^ raw(D), raw = the register run from zero over D.
    # D is zero but for the 4 id bytes, so raw(D) = raw(id xor) * x^(8 * bytes after the id).
    cdef uint32_t diff = old_id ^ new_id
    cdef uint32_t reg = 0
    cdef int shift
    cdef Py_ssize_t after, trailer
    if not f.has_crc or diff == 0:
        return
    for shift in range(24, -8, -8):
        reg = _crc_table[(reg ^ (diff >> shift)) & 0xFF] ^ (reg >> 8)
    trailer = f.frame_len - BOLT_CRC_BYTES
    after = trailer - (f.id_offset + 4)
    reg = _gf2_mulmod(_x_pow_8k(<uint64_t>after), reg)
    store_be32(p + trailer, load_be32(p + trailer) ^ reg)


# -- framing ------------------------------------------------------------------------------

cdef Py_ssize_t frame_peek(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_frame_bytes,
                           FrameInfo *out) noexcept:
    cdef uint8_t proto, ver1 = 0, cmd_type, sw = 0
    cdef uint16_t cmdcode
    cdef Py_ssize_t q, hs
    cdef uint64_t total

    out.header_size = 0
    out.frame_len = 0
    out.has_crc = False
    if n < 1:
        return 0
    proto = p[0]
    out.proto = proto
    if proto == BOLT_PROTO_V1:
        q = 1                                   # type byte
        out.id_offset = BOLT_V1_ID_OFFSET
    elif proto == BOLT_PROTO_V2:
        if n < 2:
            return 0
        ver1 = p[1]
        if ver1 != BOLT_V2_VER1_PLAIN and ver1 != BOLT_V2_VER1_CRC:
            return BOLT_ERR_PROTO
        q = 2
        out.id_offset = BOLT_V2_ID_OFFSET
    else:
        return BOLT_ERR_PROTO
    out.ver1 = ver1

    if n <= q:
        return 0
    cmd_type = p[q]
    if cmd_type > BOLT_TYPE_ONEWAY:
        return BOLT_ERR_TYPE
    out.type = cmd_type
    if proto == BOLT_PROTO_V1:
        hs = BOLT_V1_RESP_HEADER_BYTES if cmd_type == BOLT_TYPE_RESPONSE else BOLT_V1_REQ_HEADER_BYTES
    else:
        hs = BOLT_V2_RESP_HEADER_BYTES if cmd_type == BOLT_TYPE_RESPONSE else BOLT_V2_REQ_HEADER_BYTES
    out.header_size = hs
    if n < hs:
        return 0

    cmdcode = load_be16(p + q + 1)
    out.cmdcode = cmdcode
    out.ver2 = p[q + 3]
    out.request_id = load_be32(p + q + 4)
    out.codec = p[q + 8]
    q += 9
    if proto == BOLT_PROTO_V2:
        sw = p[q]
        q += 1
    out.proto_switch = sw
    if cmd_type == BOLT_TYPE_RESPONSE:
        out.status = load_be16(p + q)
        out.timeout_ms = 0
        q += 2
    else:
        out.timeout_ms = <int32_t>load_be32(p + q)
        out.status = 0
        q += 4
    out.class_len = load_be16(p + q)
    out.header_len = load_be16(p + q + 2)
    out.content_len = load_be32(p + q + 4)
    out.has_crc = (proto == BOLT_PROTO_V2 and ver1 == BOLT_V2_VER1_CRC
                   and (sw & BOLT_SWITCH_CRC) != 0)

    if cmd_type == BOLT_TYPE_RESPONSE:
        if cmdcode == BOLT_CMD_REQUEST:
            return BOLT_ERR_TYPE
    elif cmdcode == BOLT_CMD_RESPONSE:
        return BOLT_ERR_TYPE
    if cmdcode == BOLT_CMD_HEARTBEAT and (out.class_len or out.header_len or out.content_len):
        return BOLT_ERR_LENGTH
    if 0 < out.header_len < 8:                  # not even one [u32][u32] pair fits
        return BOLT_ERR_LENGTH

    total = (<uint64_t>hs + out.class_len + out.header_len + out.content_len
             + (BOLT_CRC_BYTES if out.has_crc else 0))
    if max_frame_bytes < 0 or total > <uint64_t>max_frame_bytes:
        return BOLT_ERR_TOO_BIG
    out.frame_len = <Py_ssize_t>total
    if n < out.frame_len:
        return 0
    if out.has_crc:
        if bolt_crc32(0, p, out.frame_len - BOLT_CRC_BYTES) != load_be32(p + out.frame_len - BOLT_CRC_BYTES):
            return BOLT_ERR_CRC
    return out.frame_len


cdef const char *bolt_error_reason(int code) noexcept:
    if code == BOLT_ERR_PROTO:
        return b"bolt: unknown protocol code or v2 version"
    if code == BOLT_ERR_TYPE:
        return b"bolt: bad command type (or type and command code disagree)"
    if code == BOLT_ERR_TOO_BIG:
        return b"bolt: frame larger than max_frame_bytes"
    if code == BOLT_ERR_LENGTH:
        return b"bolt: impossible lengths in the fixed header"
    if code == BOLT_ERR_CRC:
        return b"bolt: CRC32 mismatch"
    return b"bolt: no error"


# -- header block -------------------------------------------------------------------------

cdef inline Py_ssize_t _header_field(const unsigned char *block, Py_ssize_t block_len,
                                     Py_ssize_t *pos, Py_ssize_t *length) noexcept:
    # read one [u32 len][bytes] field at *pos; its offset, -1 for null, -2 if malformed
    cdef uint32_t raw
    cdef Py_ssize_t off
    if block_len - pos[0] < 4:
        return -2
    raw = load_be32(block + pos[0])
    pos[0] += 4
    if raw == _NULL_LEN:
        length[0] = 0
        return -1
    if <uint64_t>raw > <uint64_t>(block_len - pos[0]):
        return -2
    off = pos[0]
    length[0] = <Py_ssize_t>raw
    pos[0] += length[0]
    return off


cdef Py_ssize_t header_find(const unsigned char *block, Py_ssize_t block_len,
                            const char *key, Py_ssize_t key_len,
                            Py_ssize_t *val_len) noexcept:
    cdef Py_ssize_t pos = 0, koff, klen, voff, vlen
    cdef Py_ssize_t found = -1, found_len = 0
    val_len[0] = 0
    while pos < block_len:
        koff = _header_field(block, block_len, &pos, &klen)
        if koff == -2:
            return -1
        voff = _header_field(block, block_len, &pos, &vlen)
        if voff == -2:
            return -1
        if (found < 0 and koff >= 0 and voff >= 0 and klen == key_len
                and memcmp(block + koff, key, <size_t>key_len) == 0):
            found = voff
            found_len = vlen
    val_len[0] = found_len
    return found


cdef object header_lookup(const unsigned char *frame, const FrameInfo *f,
                          const char *key, Py_ssize_t key_len):
    cdef const unsigned char *block = frame + frame_headers_offset(f)
    cdef Py_ssize_t vlen
    cdef Py_ssize_t off
    if f.header_len == 0:
        return None
    off = header_find(block, f.header_len, key, key_len, &vlen)
    if off < 0:
        return None
    return PyBytes_FromStringAndSize(<const char *>block + off, vlen)


cdef dict _decode_block(const unsigned char *block, Py_ssize_t block_len):
    # every non-null pair as str -> str; first occurrence wins (as in header_find)
    cdef dict out = {}
    cdef Py_ssize_t pos = 0, koff, klen, voff, vlen
    while pos < block_len:
        koff = _header_field(block, block_len, &pos, &klen)
        if koff == -2:
            raise ValueError("bolt: malformed header block")
        voff = _header_field(block, block_len, &pos, &vlen)
        if voff == -2:
            raise ValueError("bolt: malformed header block")
        if koff < 0 or voff < 0:
            continue
        k = (<const char *>block)[koff:koff + klen].decode("utf-8", "surrogateescape")
        if k not in out:
            out[k] = (<const char *>block)[voff:voff + vlen].decode("utf-8", "surrogateescape")
    return out


# -- encoders -----------------------------------------------------------------------------

cdef inline bytes _or_empty(bytes b):
    return b"" if b is None else b


cdef bytes encode_fields(int proto, int ver1, int type, int cmdcode, int ver2,
                         uint32_t request_id, int codec, int switch,
                         long long timeout_or_status,
                         const unsigned char *class_name, Py_ssize_t class_len,
                         const unsigned char *header_block, Py_ssize_t header_len,
                         const unsigned char *content, Py_ssize_t content_len):
    cdef Py_ssize_t hs, total, q
    cdef bint has_crc
    cdef bytes out
    cdef unsigned char *b

    if proto != BOLT_PROTO_V1 and proto != BOLT_PROTO_V2:
        raise ValueError(f"bolt: proto must be 1 or 2, not {proto}")
    if proto == BOLT_PROTO_V2 and ver1 != BOLT_V2_VER1_PLAIN and ver1 != BOLT_V2_VER1_CRC:
        raise ValueError(f"bolt: v2 ver1 must be 1 or 2, not {ver1}")
    if type < 0 or type > BOLT_TYPE_ONEWAY:
        raise ValueError(f"bolt: cmd type must be 0, 1 or 2, not {type}")
    if not (0 <= cmdcode <= 0xFFFF and 0 <= ver2 <= 0xFF and 0 <= codec <= 0xFF
            and 0 <= switch <= 0xFF):
        raise ValueError("bolt: cmdcode, ver2, codec or switch out of range")
    if type == BOLT_TYPE_RESPONSE:
        if not 0 <= timeout_or_status <= 0xFFFF:
            raise ValueError(f"bolt: status must fit u16, not {timeout_or_status}")
    elif not -0x80000000 <= timeout_or_status <= 0x7FFFFFFF:
        raise ValueError(f"bolt: timeout_ms must fit i32, not {timeout_or_status}")
    if class_len > 0xFFFF or header_len > 0xFFFF:
        raise ValueError("bolt: class name and header block must be < 64 KiB each")
    if <uint64_t>content_len > 0xFFFFFFFF:
        raise ValueError("bolt: content must be < 4 GiB")

    has_crc = (proto == BOLT_PROTO_V2 and ver1 == BOLT_V2_VER1_CRC
               and (switch & BOLT_SWITCH_CRC) != 0)
    if proto == BOLT_PROTO_V1:
        hs = BOLT_V1_RESP_HEADER_BYTES if type == BOLT_TYPE_RESPONSE else BOLT_V1_REQ_HEADER_BYTES
    else:
        hs = BOLT_V2_RESP_HEADER_BYTES if type == BOLT_TYPE_RESPONSE else BOLT_V2_REQ_HEADER_BYTES
    total = hs + class_len + header_len + content_len + (BOLT_CRC_BYTES if has_crc else 0)
    out = PyBytes_FromStringAndSize(NULL, total)
    b = <unsigned char *>PyBytes_AS_STRING(out)

    b[0] = <unsigned char>proto
    q = 1
    if proto == BOLT_PROTO_V2:
        b[1] = <unsigned char>ver1
        q = 2
    b[q] = <unsigned char>type
    store_be16(b + q + 1, <uint16_t>cmdcode)
    b[q + 3] = <unsigned char>ver2
    store_be32(b + q + 4, request_id)
    b[q + 8] = <unsigned char>codec
    q += 9
    if proto == BOLT_PROTO_V2:
        b[q] = <unsigned char>switch
        q += 1
    if type == BOLT_TYPE_RESPONSE:
        store_be16(b + q, <uint16_t>timeout_or_status)
        q += 2
    else:
        store_be32(b + q, <uint32_t><int32_t>timeout_or_status)
        q += 4
    store_be16(b + q, <uint16_t>class_len)
    store_be16(b + q + 2, <uint16_t>header_len)
    store_be32(b + q + 4, <uint32_t>content_len)
    q += 8
    if class_len:
        memcpy(b + q, class_name, <size_t>class_len)
        q += class_len
    if header_len:
        memcpy(b + q, header_block, <size_t>header_len)
        q += header_len
    if content_len:
        memcpy(b + q, content, <size_t>content_len)
        q += content_len
    if has_crc:
        store_be32(b + q, bolt_crc32(0, b, q))
    return out


cpdef bytes encode_request(int proto, int type, uint32_t request_id, int codec,
                           int32_t timeout_ms, bytes class_name=b"", bytes header_block=b"",
                           bytes content=b"", int ver1=1, int switch=0,
                           int cmdcode=BOLT_CMD_REQUEST):
    """A request (type 1) or oneway request (type 2); cmdcode 0 makes a heartbeat."""
    if type == BOLT_TYPE_RESPONSE:
        raise ValueError("bolt: encode_request needs type 1 (request) or 2 (oneway)")
    class_name = _or_empty(class_name)
    header_block = _or_empty(header_block)
    content = _or_empty(content)
    return encode_fields(proto, ver1, type, cmdcode, 1, request_id, codec, switch, timeout_ms,
                         <const unsigned char *>PyBytes_AS_STRING(class_name), PyBytes_GET_SIZE(class_name),
                         <const unsigned char *>PyBytes_AS_STRING(header_block), PyBytes_GET_SIZE(header_block),
                         <const unsigned char *>PyBytes_AS_STRING(content), PyBytes_GET_SIZE(content))


cpdef bytes encode_response(int proto, uint32_t request_id, int codec, int status,
                            bytes class_name=b"", bytes header_block=b"", bytes content=b"",
                            int ver1=1, int switch=0):
    """An RPC response (type 0, cmdcode 2)."""
    class_name = _or_empty(class_name)
    header_block = _or_empty(header_block)
    content = _or_empty(content)
    return encode_fields(proto, ver1, BOLT_TYPE_RESPONSE, BOLT_CMD_RESPONSE, 1, request_id,
                         codec, switch, status,
                         <const unsigned char *>PyBytes_AS_STRING(class_name), PyBytes_GET_SIZE(class_name),
                         <const unsigned char *>PyBytes_AS_STRING(header_block), PyBytes_GET_SIZE(header_block),
                         <const unsigned char *>PyBytes_AS_STRING(content), PyBytes_GET_SIZE(content))


cpdef bytes encode_heartbeat(int proto, uint32_t request_id, int codec=BOLT_CODEC_HESSIAN2,
                             int32_t timeout_ms=-1, int ver1=1, int switch=0):
    """A heartbeat request: type 1, cmdcode 0, no body."""
    return encode_fields(proto, ver1, BOLT_TYPE_REQUEST, BOLT_CMD_HEARTBEAT, 1, request_id,
                         codec, switch, timeout_ms, NULL, 0, NULL, 0, NULL, 0)


cpdef bytes encode_heartbeat_ack(int proto, uint32_t request_id, int codec=BOLT_CODEC_HESSIAN2,
                                 int ver1=1, int switch=0):
    """A heartbeat ack: type 0, cmdcode 0, status SUCCESS, no body."""
    return encode_fields(proto, ver1, BOLT_TYPE_RESPONSE, BOLT_CMD_HEARTBEAT, 1, request_id,
                         codec, switch, BOLT_STATUS_SUCCESS, NULL, 0, NULL, 0, NULL, 0)


cpdef bytes encode_error_response(int proto, uint32_t request_id, int codec, int status,
                                  int ver1=1, int switch=0):
    """A proxy-made error response: the status alone, no class name, headers or content.

    SOFABolt peers map a non-zero status to an exception without needing a body
    (sofa-bolt-node rejects the call with "Server exception ... check the server log").
    Use the codec of the request being answered.
    """
    if status == BOLT_STATUS_SUCCESS:
        raise ValueError("bolt: an error response needs a non-zero status")
    return encode_fields(proto, ver1, BOLT_TYPE_RESPONSE, BOLT_CMD_RESPONSE, 1, request_id,
                         codec, switch, status, NULL, 0, NULL, 0, NULL, 0)


cdef inline bytes _as_header_bytes(object s):
    if s is None:
        return None
    if isinstance(s, str):
        return (<str>s).encode("utf-8")
    return bytes(s)


cpdef bytes encode_header_block(object pairs):
    """Encode a dict, or an iterable of (key, value) pairs, as a Bolt header block.

    Keys and values may be str (UTF-8) or bytes; None encodes the null marker 0xFFFFFFFF.
    """
    cdef bytearray out = bytearray()
    cdef bytes kb, vb
    if isinstance(pairs, dict):
        pairs = (<dict>pairs).items()
    for k, v in pairs:
        for part in (k, v):
            kb = _as_header_bytes(part)
            if kb is None:
                out += b"\xff\xff\xff\xff"
            else:
                if PyBytes_GET_SIZE(kb) > 0xFFFFFFFE:
                    raise ValueError("bolt: header field too long")
                out += (<uint32_t>PyBytes_GET_SIZE(kb)).to_bytes(4, "big")
                out += kb
    if len(out) > 0xFFFF:
        raise ValueError("bolt: header block must be < 64 KiB")
    return bytes(out)


# -- Python surface for tests and tools ---------------------------------------------------

PROTO_V1 = BOLT_PROTO_V1
PROTO_V2 = BOLT_PROTO_V2
TYPE_RESPONSE = BOLT_TYPE_RESPONSE
TYPE_REQUEST = BOLT_TYPE_REQUEST
TYPE_ONEWAY = BOLT_TYPE_ONEWAY
CMD_HEARTBEAT = BOLT_CMD_HEARTBEAT
CMD_REQUEST = BOLT_CMD_REQUEST
CMD_RESPONSE = BOLT_CMD_RESPONSE
CODEC_HESSIAN2 = BOLT_CODEC_HESSIAN2
CODEC_PROTOBUF = BOLT_CODEC_PROTOBUF
SWITCH_CRC = BOLT_SWITCH_CRC
V1_REQ_HEADER_BYTES = BOLT_V1_REQ_HEADER_BYTES
V1_RESP_HEADER_BYTES = BOLT_V1_RESP_HEADER_BYTES
V2_REQ_HEADER_BYTES = BOLT_V2_REQ_HEADER_BYTES
V2_RESP_HEADER_BYTES = BOLT_V2_RESP_HEADER_BYTES

STATUS_SUCCESS = BOLT_STATUS_SUCCESS
STATUS_ERROR = BOLT_STATUS_ERROR
STATUS_SERVER_EXCEPTION = BOLT_STATUS_SERVER_EXCEPTION
STATUS_UNKNOWN = BOLT_STATUS_UNKNOWN
STATUS_SERVER_THREADPOOL_BUSY = BOLT_STATUS_SERVER_THREADPOOL_BUSY
STATUS_ERROR_COMM = BOLT_STATUS_ERROR_COMM
STATUS_NO_PROCESSOR = BOLT_STATUS_NO_PROCESSOR
STATUS_TIMEOUT = BOLT_STATUS_TIMEOUT
STATUS_CLIENT_SEND_ERROR = BOLT_STATUS_CLIENT_SEND_ERROR
STATUS_CODEC_EXCEPTION = BOLT_STATUS_CODEC_EXCEPTION
STATUS_CONNECTION_CLOSED = BOLT_STATUS_CONNECTION_CLOSED
STATUS_SERVER_SERIAL_EXCEPTION = BOLT_STATUS_SERVER_SERIAL_EXCEPTION
STATUS_SERVER_DESERIAL_EXCEPTION = BOLT_STATUS_SERVER_DESERIAL_EXCEPTION
STATUS_NAMES = {
    BOLT_STATUS_SUCCESS: "SUCCESS",
    BOLT_STATUS_ERROR: "ERROR",
    BOLT_STATUS_SERVER_EXCEPTION: "SERVER_EXCEPTION",
    BOLT_STATUS_UNKNOWN: "UNKNOWN",
    BOLT_STATUS_SERVER_THREADPOOL_BUSY: "SERVER_THREADPOOL_BUSY",
    BOLT_STATUS_ERROR_COMM: "ERROR_COMM",
    BOLT_STATUS_NO_PROCESSOR: "NO_PROCESSOR",
    BOLT_STATUS_TIMEOUT: "TIMEOUT",
    BOLT_STATUS_CLIENT_SEND_ERROR: "CLIENT_SEND_ERROR",
    BOLT_STATUS_CODEC_EXCEPTION: "CODEC_EXCEPTION",
    BOLT_STATUS_CONNECTION_CLOSED: "CONNECTION_CLOSED",
    BOLT_STATUS_SERVER_SERIAL_EXCEPTION: "SERVER_SERIAL_EXCEPTION",
    BOLT_STATUS_SERVER_DESERIAL_EXCEPTION: "SERVER_DESERIAL_EXCEPTION",
}

ERR_PROTO = BOLT_ERR_PROTO
ERR_TYPE = BOLT_ERR_TYPE
ERR_TOO_BIG = BOLT_ERR_TOO_BIG
ERR_LENGTH = BOLT_ERR_LENGTH
ERR_CRC = BOLT_ERR_CRC

DEFAULT_MAX_FRAME_BYTES = 16 << 20


class BoltFrameError(ValueError):
    """A frame_peek error; .code is the BOLT_ERR_* value."""

    def __init__(self, code):
        super().__init__(error_reason(code))
        self.code = code


def error_reason(int code):
    return bolt_error_reason(code).decode("ascii")


cdef const unsigned char _EMPTY[1]


cdef inline const unsigned char *_ptr(const unsigned char[::1] view) noexcept:
    # a valid pointer even for an empty view (never dereferenced then)
    if view.shape[0] == 0:
        return _EMPTY
    return &view[0]


def crc32(data, uint32_t value=0):
    """CRC32 as zlib.crc32(data, value): the table-driven implementation the codec uses."""
    cdef const unsigned char[::1] view = data
    return bolt_crc32(value, _ptr(view), view.shape[0])


def py_frame_peek(data, Py_ssize_t max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
    """frame_peek on a bytes-like object: >0 frame length, 0 need more, <0 BOLT_ERR_*."""
    cdef const unsigned char[::1] view = data
    cdef FrameInfo f
    return frame_peek(_ptr(view), view.shape[0], max_frame_bytes, &f)


def py_frame_needed(data, Py_ssize_t max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
    """(rc, frame_len_or_0): frame_len is known once the fixed part is in, even if rc == 0."""
    cdef const unsigned char[::1] view = data
    cdef FrameInfo f
    cdef Py_ssize_t rc = frame_peek(_ptr(view), view.shape[0], max_frame_bytes, &f)
    return rc, f.frame_len


cdef dict _info_dict(const unsigned char *p, const FrameInfo *f):
    cdef Py_ssize_t c0 = frame_class_offset(f)
    cdef Py_ssize_t h0 = frame_headers_offset(f)
    cdef Py_ssize_t b0 = frame_content_offset(f)
    cdef const char *s = <const char *>p
    return {
        "proto": f.proto,
        "ver1": f.ver1,
        "type": f.type,
        "cmdcode": f.cmdcode,
        "ver2": f.ver2,
        "request_id": f.request_id,
        "codec": f.codec,
        "switch": f.proto_switch,
        "timeout_ms": f.timeout_ms,
        "status": f.status,
        "class_len": f.class_len,
        "header_len": f.header_len,
        "content_len": f.content_len,
        "header_size": f.header_size,
        "frame_len": f.frame_len,
        "id_offset": f.id_offset,
        "has_crc": bool(f.has_crc),
        "class_name": s[c0:c0 + f.class_len],
        "header_block": s[h0:h0 + f.header_len],
        "content": s[b0:b0 + f.content_len],
    }


def parse_frame(data, Py_ssize_t max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
    """The first frame in data as a dict of every FrameInfo field plus the raw class_name,
    header_block and content bytes; None if more bytes are needed; BoltFrameError
    (a ValueError) on a bad frame."""
    cdef const unsigned char[::1] view = data
    cdef FrameInfo f
    cdef const unsigned char *p = _ptr(view)
    cdef Py_ssize_t rc = frame_peek(p, view.shape[0], max_frame_bytes, &f)
    if rc < 0:
        raise BoltFrameError(rc)
    if rc == 0:
        return None
    return _info_dict(p, &f)


def encode_frame(d):
    """Re-encode a frame from parse_frame's fields (proto, ver1, type, cmdcode, ver2,
    request_id, codec, switch, timeout_ms or status, class_name, header_block, content).
    Length fields and the CRC trailer are computed, not taken from d."""
    cdef bytes cls = bytes(d.get("class_name") or b"")
    cdef bytes hdr = bytes(d.get("header_block") or b"")
    cdef bytes body = bytes(d.get("content") or b"")
    cdef int cmd_type = d["type"]
    tos = d.get("status", 0) if cmd_type == BOLT_TYPE_RESPONSE else d.get("timeout_ms", 0)
    return encode_fields(d["proto"], d.get("ver1", 1) or 1, cmd_type, d["cmdcode"],
                         d.get("ver2", 1), d["request_id"], d["codec"], d.get("switch", 0),
                         tos,
                         <const unsigned char *>PyBytes_AS_STRING(cls), PyBytes_GET_SIZE(cls),
                         <const unsigned char *>PyBytes_AS_STRING(hdr), PyBytes_GET_SIZE(hdr),
                         <const unsigned char *>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))


cdef Py_ssize_t _whole_frame(const unsigned char *p, Py_ssize_t n, FrameInfo *f) except -1:
    cdef Py_ssize_t rc = frame_peek(p, n, n, f)
    if rc < 0:
        raise BoltFrameError(rc)
    if rc == 0:
        raise ValueError("bolt: incomplete frame")
    return rc


def py_frame_get_id(data):
    cdef const unsigned char[::1] view = data
    cdef FrameInfo f
    _whole_frame(_ptr(view), view.shape[0], &f)
    return frame_get_id(_ptr(view), &f)


def py_frame_set_id(buf, uint32_t new_id):
    """Patch the request id of the frame at the start of a writable buffer (bytearray)."""
    cdef unsigned char[::1] view = buf
    cdef FrameInfo f
    if view.shape[0] == 0:
        raise ValueError("bolt: incomplete frame")
    _whole_frame(&view[0], view.shape[0], &f)
    frame_set_id(&view[0], &f, new_id)


def py_header_lookup(frame, key):
    """header_lookup on a whole frame: the first value of key as bytes, or None."""
    cdef const unsigned char[::1] view = frame
    cdef FrameInfo f
    cdef bytes k = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    _whole_frame(_ptr(view), view.shape[0], &f)
    return header_lookup(_ptr(view), &f, PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k))


def py_header_find(block, key):
    """header_find on a raw header block: (offset, length) of the value, or None."""
    cdef const unsigned char[::1] view = block
    cdef bytes k = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    cdef Py_ssize_t vlen
    cdef Py_ssize_t off = header_find(_ptr(view), view.shape[0], PyBytes_AS_STRING(k),
                                      PyBytes_GET_SIZE(k), &vlen)
    if off < 0:
        return None
    return off, vlen


def decode_header_block(block):
    """A raw header block as {str: str} (null pairs skipped, first occurrence wins);
    ValueError if malformed."""
    cdef const unsigned char[::1] view = block
    return _decode_block(_ptr(view), view.shape[0])


def decode_headers(frame):
    """The header map of a whole frame as {str: str}; ValueError if malformed."""
    cdef const unsigned char[::1] view = frame
    cdef FrameInfo f
    cdef const unsigned char *p = _ptr(view)
    _whole_frame(p, view.shape[0], &f)
    return _decode_block(p + frame_headers_offset(&f), f.header_len)
