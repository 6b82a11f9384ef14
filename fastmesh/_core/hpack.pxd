# HPACK (RFC 7541): the header compression of HTTP/2.
#
#   HeaderList  one decoded header block: every name and value copied once into one malloc'd
#               buffer, fields as offsets (the HTTP/1 Head's shape). One Python object per
#               block, none per field.
#   DynTable    the dynamic table: entries' bytes in a byte ring of limit_bytes (an entry's
#               name and value may wrap), entries in a ring of offsets; eviction is moving a
#               tail index. No allocation per entry; size accounted per RFC 7541 §4.1.
#   Decoder     header block → HeaderList. Bounded: string lengths are checked against the
#               block, integers against 2^31, the decoded list against max_list_bytes (fields
#               past it are dropped but the block is still decoded, so the table stays in
#               sync and the error is a stream error, not a connection error).
#   Encoder     (name, value) pairs → header block, Huffman when shorter, with an indexing
#               policy that never indexes credentials.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from fastmesh._core.outbuf cimport OutBuf

# ---------------------------------------------------------------- results

cdef enum HpackResult:
    HPACK_OK = 0
    HPACK_ERR_COMPRESSION = -1       # malformed block: a connection error (COMPRESSION_ERROR)
    HPACK_LIST_TOO_LARGE = -2        # decoded (table in sync) but over max_list_bytes: the
                                     # stream is refused (431 / RST_STREAM), the connection lives

cdef enum HpackSizes:
    HPACK_ENTRY_OVERHEAD_BYTES = 32  # RFC 7541 §4.1, also RFC 9113 header list size
    HPACK_STATIC_COUNT = 61          # static table entries (Appendix A)
    HPACK_DEFAULT_TABLE_BYTES = 4096 # SETTINGS_HEADER_TABLE_SIZE initial value
    HPACK_MAX_INT = 0x7fffffff       # larger integers in a block are a decoding error

cdef enum HeaderFlags:
    HF_NEVER_INDEX = 1               # arrived as "never indexed" (or is a credential): a
                                     # proxy must re-encode it the same way (RFC 7541 §7.1.3)
    HF_PSEUDO = 2                    # name starts with ':'

cdef struct HField:
    uint32_t name_off                # offsets into HeaderList.buf
    uint32_t name_len
    uint32_t value_off
    uint32_t value_len
    uint32_t flags                   # HeaderFlags


cdef class HeaderList:
    cdef:
        char *buf                    # names and values, back to back
        Py_ssize_t buf_len           # bytes used
        Py_ssize_t buf_cap           # bytes allocated
        HField *fields
        int count                    # fields decoded
        int fields_cap
        Py_ssize_t list_bytes        # RFC 9113 size: sum of name + value + 32 per field
        bint truncated               # fields were dropped (over the list limit)

    cdef void reset(self) noexcept
    cdef int reserve(self, Py_ssize_t extra_bytes) except -1
    cdef int add(self, Py_ssize_t name_off, Py_ssize_t name_len, Py_ssize_t value_off,
                 Py_ssize_t value_len, uint32_t flags) except -1
    cdef int find(self, const char *name, Py_ssize_t name_len) noexcept   # first index or -1
    cdef bytes name(self, int i)
    cdef bytes value(self, int i)


cdef struct DynEntry:
    uint32_t off                     # first byte in the byte ring (name, then value)
    uint32_t name_len
    uint32_t value_len
    uint32_t name_hash               # encoder tables only (lookups compare these first)
    uint32_t value_hash


cdef class DynTable:
    cdef:
        char *ring                   # limit_bytes bytes: entries' names and values (NULL
                                     # until the first insert)
        Py_ssize_t limit_bytes       # hard cap on max_bytes (the ring's capacity)
        Py_ssize_t write_off         # where the next entry's bytes go in the ring
        DynEntry *entries            # ring of entries_cap (power of two)
        Py_ssize_t entries_mask      # entries_cap - 1
        Py_ssize_t newest            # slot of the newest entry (dynamic index 1)
        Py_ssize_t count             # live entries
        Py_ssize_t size_bytes        # RFC 7541 size of the live entries
        Py_ssize_t max_bytes         # current maximum size (after size updates)
        uint32_t inserted            # entries ever inserted: entry number k (1-based)
                                     # lives in slot k & entries_mask while
                                     # inserted - k < count

    cdef void set_max(self, Py_ssize_t max_bytes) noexcept    # evicts to fit; <= limit_bytes
    cdef void evict_oldest(self) noexcept
    cdef int insert(self, const char *name, Py_ssize_t name_len,
                    const char *value, Py_ssize_t value_len) except -1
    cdef int insert_hashed(self, const char *name, Py_ssize_t name_len, uint32_t name_hash,
                           const char *value, Py_ssize_t value_len, uint32_t value_hash) except -1
    cdef int _allocate(self) except -1      # ring and entries, at the first insert: an idle
                                            # connection's tables cost nothing
    cdef DynEntry *get(self, Py_ssize_t index) noexcept        # 1 = newest; NULL if absent
    cdef void copy_out(self, char *dst, Py_ssize_t off, Py_ssize_t n) noexcept  # ring → flat
    cdef bint equals(self, Py_ssize_t off, const char *s, Py_ssize_t n) noexcept


cdef class Decoder:
    cdef:
        DynTable table
        Py_ssize_t settings_table_bytes   # SETTINGS_HEADER_TABLE_SIZE in force (acked)
        Py_ssize_t max_list_bytes         # SETTINGS_MAX_HEADER_LIST_SIZE we enforce
        bint size_update_due              # we lowered the setting: the next block must
                                          # start with a size update (RFC 7541 §4.2)
        const char *error_reason          # static string, after an error
        # counters
        uint64_t blocks                   # header blocks decoded
        uint64_t errors                   # COMPRESSION_ERRORs
        uint64_t lists_too_large          # blocks over max_list_bytes

    cdef int decode(self, const unsigned char *p, Py_ssize_t n, HeaderList out) except -3
    cdef void set_settings_table_bytes(self, Py_ssize_t table_bytes) noexcept
    cdef int _fail(self, const char *reason) noexcept
    cdef int _emit_indexed(self, Py_ssize_t index, HeaderList out, uint32_t flags) except -3
    cdef Py_ssize_t _name_from_table(self, Py_ssize_t index, HeaderList out) except -3
    cdef Py_ssize_t _string(self, const unsigned char *p, Py_ssize_t n, Py_ssize_t *pos,
                            HeaderList out) except -3


cdef class Encoder:
    cdef:
        DynTable table
        Py_ssize_t peer_table_bytes       # the peer's SETTINGS_HEADER_TABLE_SIZE
        Py_ssize_t min_table_bytes        # smallest size chosen since the last block
        bint size_update_due              # emit size update(s) at the next block's start
        bint huffman                      # Huffman-code strings when shorter
        Py_ssize_t max_indexed_value_bytes   # longer values are not indexed
        # lookup caches over the dynamic table (direct-mapped, a collision only costs
        # compression): hash → entry number (DynTable.inserted numbering), 0 = empty
        uint32_t *by_field           # hash(name, value)
        uint32_t *by_name            # hash(name)
        uint32_t cache_mask          # (both allocated at the first insert)

    cdef void set_peer_table_bytes(self, Py_ssize_t table_bytes) noexcept
    cdef int begin_block(self, OutBuf *out) except -1   # emits pending size updates
    cdef int _put_string(self, OutBuf *out, const char *s, Py_ssize_t n) except -1
    cdef Py_ssize_t _live_index(self, uint32_t number) noexcept   # dynamic index or 0
    cdef int encode_field(self, OutBuf *out, const char *name, Py_ssize_t name_len,
                          const char *value, Py_ssize_t value_len, uint32_t flags) except -1
    cdef int encode_list(self, OutBuf *out, HeaderList headers) except -1
    cdef int encode_pairs(self, OutBuf *out, object pairs) except -1
                                          # iterable of (name, value[, sensitive]) bytes


# -- primitives (RFC 7541 §5) ---------------------------------------------------------------

cdef int put_int(OutBuf *out, uint8_t first_bits, int prefix_bits, uint64_t value) except -1
cdef int read_int(const unsigned char *p, Py_ssize_t n, Py_ssize_t *pos, int prefix_bits,
                  Py_ssize_t *value) noexcept                # 0 or -1 (truncated / too big)
cdef inline uint32_t fnv1a(const char *s, Py_ssize_t n) noexcept:
    cdef uint32_t h = 2166136261u
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>s[i]) * 16777619u
    return h

cdef Py_ssize_t huffman_encoded_bytes(const unsigned char *s, Py_ssize_t n) noexcept
cdef int huffman_encode(OutBuf *out, const unsigned char *s, Py_ssize_t n) except -1
cdef Py_ssize_t huffman_decode(const unsigned char *src, Py_ssize_t n,
                               unsigned char *dst) noexcept  # bytes written, or -1 (invalid)
