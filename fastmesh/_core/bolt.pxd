# SOFARPC Bolt framing: peek, patch and build frames in place.
#
# A proxy forwards Bolt frames by offsets from its receive buffer; it never parses more than
# it needs. `frame_peek` answers "is a whole frame here, how long is it, what are its fixed
# fields?" from a `const unsigned char*` + length; `frame_set_id` rewrites the request id in
# place (fixing a v2 CRC32 trailer incrementally); `header_find` locates one header value
# inside the frame without building a dict. Encoders build the few frames the proxy makes
# itself (heartbeats, acks, error responses).
#
# Wire layout (all integers big-endian), v1 request then response; v2 adds ver1 after proto
# and a switch byte after codec:
#
#   v1 req  proto type cmdcode:2 ver2 id:4 codec timeout:4   classLen:2 headerLen:2 contentLen:4  (22)
#   v1 resp proto type cmdcode:2 ver2 id:4 codec status:2    classLen:2 headerLen:2 contentLen:4  (20)
#   v2 req  proto ver1 type cmdcode:2 ver2 id:4 codec switch timeout:4 classLen headerLen contentLen (24)
#   v2 resp proto ver1 type cmdcode:2 ver2 id:4 codec switch status:2  classLen headerLen contentLen (22)
#   ... then class name, header block, content, and for v2 a CRC32 trailer when
#   ver1 == 2 and switch bit 0 is set (the SOFABolt rule; see `frame_peek`).
#
# Header block: repeated [u32 keyLen][key][u32 valLen][val]; a length of 0xFFFFFFFF is a
# null (no bytes follow) and such a pair is skipped by lookups.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t


# -- wire codes ---------------------------------------------------------------------------

cdef enum BoltProto:
    BOLT_PROTO_V1 = 1               # Bolt v1 (the default of SOFARPC Java and sofa-rpc-node)
    BOLT_PROTO_V2 = 2               # Bolt v2: + ver1 byte, + switch byte, optional CRC32

cdef enum BoltVer1:
    BOLT_V2_VER1_PLAIN = 1          # v2 frame, never a CRC trailer
    BOLT_V2_VER1_CRC = 2            # v2 frame, CRC trailer if switch bit 0 is set

cdef enum BoltSwitchBits:
    BOLT_SWITCH_CRC = 0x01          # ProtocolSwitch bit 0: CRC32 wanted (counts with ver1 2 only)

cdef enum BoltCmdType:
    BOLT_TYPE_RESPONSE = 0
    BOLT_TYPE_REQUEST = 1
    BOLT_TYPE_ONEWAY = 2            # request that gets no response

cdef enum BoltCmdCode:
    BOLT_CMD_HEARTBEAT = 0          # heartbeat (type 1) or its ack (type 0); no body
    BOLT_CMD_REQUEST = 1            # RPC request
    BOLT_CMD_RESPONSE = 2           # RPC response
    # other codes (e.g. 100 GoAway in some meshes) pass through untouched

cdef enum BoltStatus:               # u16 in responses
    BOLT_STATUS_SUCCESS = 0x00
    BOLT_STATUS_ERROR = 0x01
    BOLT_STATUS_SERVER_EXCEPTION = 0x02         # business exception; body = serialized error
    BOLT_STATUS_UNKNOWN = 0x03
    BOLT_STATUS_SERVER_THREADPOOL_BUSY = 0x04   # proxy: overflow / circuit open
    BOLT_STATUS_ERROR_COMM = 0x05
    BOLT_STATUS_NO_PROCESSOR = 0x06             # proxy: no route / no healthy upstream
    BOLT_STATUS_TIMEOUT = 0x07                  # proxy: upstream timed out
    BOLT_STATUS_CLIENT_SEND_ERROR = 0x08
    BOLT_STATUS_CODEC_EXCEPTION = 0x09
    BOLT_STATUS_CONNECTION_CLOSED = 0x10        # proxy: upstream connection lost
    BOLT_STATUS_SERVER_SERIAL_EXCEPTION = 0x11
    BOLT_STATUS_SERVER_DESERIAL_EXCEPTION = 0x12

cdef enum BoltCodec:                # serialization byte; opaque to the proxy, passed through
    BOLT_CODEC_HESSIAN2 = 1
    BOLT_CODEC_PROTOBUF = 11

# -- sizes and offsets (bytes) ------------------------------------------------------------

cdef enum BoltSizes:
    BOLT_V1_REQ_HEADER_BYTES = 22   # fixed part of a v1 request
    BOLT_V1_RESP_HEADER_BYTES = 20  # fixed part of a v1 response
    BOLT_V2_REQ_HEADER_BYTES = 24   # fixed part of a v2 request
    BOLT_V2_RESP_HEADER_BYTES = 22  # fixed part of a v2 response
    BOLT_V1_ID_OFFSET = 5           # request id position, v1
    BOLT_V2_ID_OFFSET = 6           # request id position, v2
    BOLT_CRC_BYTES = 4              # v2 CRC32 trailer
    BOLT_MAX_HEADER_BYTES = 24      # the longest fixed part

# -- frame_peek results -------------------------------------------------------------------

cdef enum BoltError:                # negative results of frame_peek
    BOLT_ERR_PROTO = -1             # first byte not 1/2, or a v2 ver1 other than 1/2
    BOLT_ERR_TYPE = -2              # cmd type not 0/1/2, or type and cmd code disagree
    BOLT_ERR_TOO_BIG = -3           # total length over max_frame_bytes (known from the fixed part)
    BOLT_ERR_LENGTH = -4            # impossible lengths: heartbeat with a body, header block < 8
    BOLT_ERR_CRC = -5               # v2 CRC32 trailer does not match


cdef struct FrameInfo:
    uint8_t proto                   # BoltProto
    uint8_t ver1                    # v2 only (0 for v1)
    uint8_t type                    # BoltCmdType
    uint16_t cmdcode                # BoltCmdCode
    uint8_t ver2                    # command version, 1 in practice
    uint32_t request_id
    uint8_t codec                   # BoltCodec
    uint8_t proto_switch            # v2 switch byte (0 for v1); "switch" is a C keyword
    int32_t timeout_ms              # requests only (0 for responses); -1 = none
    uint16_t status                 # responses only (0 for requests); BoltStatus
    uint16_t class_len              # bytes
    uint16_t header_len             # bytes
    uint32_t content_len            # bytes
    Py_ssize_t header_size          # fixed part, bytes: 20/22/24
    Py_ssize_t frame_len            # whole frame incl. CRC trailer, bytes
    Py_ssize_t id_offset            # 5 (v1) or 6 (v2)
    bint has_crc                    # a CRC32 trailer follows the content


# -- framing ------------------------------------------------------------------------------

# >0: a whole frame of that many bytes is at p (out filled); 0: need more bytes (out partly
# filled: out.frame_len is set once the fixed part is in, so the caller knows how much to
# wait for); <0: a BoltError. The total is checked against max_frame_bytes as soon as the
# fixed part is in, before any body byte is awaited. A CRC trailer is verified.
cdef Py_ssize_t frame_peek(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_frame_bytes,
                           FrameInfo *out) noexcept
cdef const char *bolt_error_reason(int code) noexcept

# -- CRC32 (IEEE, as zlib.crc32) ----------------------------------------------------------

cdef uint32_t bolt_crc32(uint32_t crc, const unsigned char *p, Py_ssize_t n) noexcept
# fix the CRC trailer after the 4 id bytes changed from old_id to new_id: O(log frame_len)
cdef void frame_crc_patch_id(unsigned char *p, const FrameInfo *f, uint32_t old_id,
                             uint32_t new_id) noexcept

# -- big-endian helpers -------------------------------------------------------------------

cdef inline uint16_t load_be16(const unsigned char *p) noexcept:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])

cdef inline uint32_t load_be32(const unsigned char *p) noexcept:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) |
            (<uint32_t>p[2] << 8) | <uint32_t>p[3])

cdef inline void store_be16(unsigned char *p, uint16_t v) noexcept:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v

cdef inline void store_be32(unsigned char *p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v

# -- request id ---------------------------------------------------------------------------

cdef inline uint32_t frame_get_id(const unsigned char *p, const FrameInfo *f) noexcept:
    return load_be32(p + f.id_offset)

# p is a whole frame described by f (frame_peek > 0). Keeps a CRC trailer valid.
cdef inline void frame_set_id(unsigned char *p, const FrameInfo *f, uint32_t new_id) noexcept:
    cdef uint32_t old_id
    if f.has_crc:
        old_id = load_be32(p + f.id_offset)
        store_be32(p + f.id_offset, new_id)
        frame_crc_patch_id(p, f, old_id, new_id)
    else:
        store_be32(p + f.id_offset, new_id)

# -- frame parts (offsets from the frame start) -------------------------------------------

cdef inline Py_ssize_t frame_class_offset(const FrameInfo *f) noexcept:
    return f.header_size

cdef inline Py_ssize_t frame_headers_offset(const FrameInfo *f) noexcept:
    return f.header_size + f.class_len

cdef inline Py_ssize_t frame_content_offset(const FrameInfo *f) noexcept:
    return f.header_size + f.class_len + f.header_len

# -- header block -------------------------------------------------------------------------

# Offset of the value of the first non-null pair whose key equals key[:key_len], relative
# to block, with its length in *val_len; -1 if absent or if the block is malformed anywhere
# (the whole block is validated; nothing outside block[:block_len] is read).
cdef Py_ssize_t header_find(const unsigned char *block, Py_ssize_t block_len,
                            const char *key, Py_ssize_t key_len,
                            Py_ssize_t *val_len) noexcept
# header_find on a whole frame; the value as bytes, or None
cdef object header_lookup(const unsigned char *frame, const FrameInfo *f,
                          const char *key, Py_ssize_t key_len)

# -- encoders (frames the proxy makes itself) ---------------------------------------------

# The general builder: every field explicit. timeout_or_status is the i32 timeout for
# requests, the u16 status for responses. Appends a CRC when proto 2, ver1 2, switch bit 0.
cdef bytes encode_fields(int proto, int ver1, int type, int cmdcode, int ver2,
                         uint32_t request_id, int codec, int switch,
                         long long timeout_or_status,
                         const unsigned char *class_name, Py_ssize_t class_len,
                         const unsigned char *header_block, Py_ssize_t header_len,
                         const unsigned char *content, Py_ssize_t content_len)

cpdef bytes encode_request(int proto, int type, uint32_t request_id, int codec,
                           int32_t timeout_ms, bytes class_name=*, bytes header_block=*,
                           bytes content=*, int ver1=*, int switch=*, int cmdcode=*)
cpdef bytes encode_response(int proto, uint32_t request_id, int codec, int status,
                            bytes class_name=*, bytes header_block=*, bytes content=*,
                            int ver1=*, int switch=*)
cpdef bytes encode_heartbeat(int proto, uint32_t request_id, int codec=*,
                             int32_t timeout_ms=*, int ver1=*, int switch=*)
cpdef bytes encode_heartbeat_ack(int proto, uint32_t request_id, int codec=*,
                                 int ver1=*, int switch=*)
cpdef bytes encode_error_response(int proto, uint32_t request_id, int codec, int status,
                                  int ver1=*, int switch=*)
cpdef bytes encode_header_block(object pairs)
