"""HPACK (RFC 7541): decoder, encoder, Huffman code. See hpack.pxd."""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memcmp

cimport cython

from fastmesh._core.outbuf cimport OutBuf, ob_reserve, ob_put, ob_byte, ob_take, ob_free


class HpackError(ValueError):
    """A header block that is not valid HPACK (a COMPRESSION_ERROR)."""


# ------------------------------------------------------------------ constant tables

cdef extern from *:
    """
    /* RFC 7541 Appendix A: the static table (index 1..61). */
    typedef struct { const char *name; int name_len; const char *value; int value_len; } fm_hpack_static_t;
    #define FM_S(n, v) { n, (int)sizeof(n) - 1, v, (int)sizeof(v) - 1 }
    static const fm_hpack_static_t fm_hpack_static[62] = {
        FM_S("", ""),
        FM_S(":authority", ""), FM_S(":method", "GET"), FM_S(":method", "POST"),
        FM_S(":path", "/"), FM_S(":path", "/index.html"), FM_S(":scheme", "http"),
        FM_S(":scheme", "https"), FM_S(":status", "200"), FM_S(":status", "204"),
        FM_S(":status", "206"), FM_S(":status", "304"), FM_S(":status", "400"),
        FM_S(":status", "404"), FM_S(":status", "500"), FM_S("accept-charset", ""),
        FM_S("accept-encoding", "gzip, deflate"), FM_S("accept-language", ""),
        FM_S("accept-ranges", ""), FM_S("accept", ""), FM_S("access-control-allow-origin", ""),
        FM_S("age", ""), FM_S("allow", ""), FM_S("authorization", ""),
        FM_S("cache-control", ""), FM_S("content-disposition", ""),
        FM_S("content-encoding", ""), FM_S("content-language", ""),
        FM_S("content-length", ""), FM_S("content-location", ""), FM_S("content-range", ""),
        FM_S("content-type", ""), FM_S("cookie", ""), FM_S("date", ""), FM_S("etag", ""),
        FM_S("expect", ""), FM_S("expires", ""), FM_S("from", ""), FM_S("host", ""),
        FM_S("if-match", ""), FM_S("if-modified-since", ""), FM_S("if-none-match", ""),
        FM_S("if-range", ""), FM_S("if-unmodified-since", ""), FM_S("last-modified", ""),
        FM_S("link", ""), FM_S("location", ""), FM_S("max-forwards", ""),
        FM_S("proxy-authenticate", ""), FM_S("proxy-authorization", ""), FM_S("range", ""),
        FM_S("referer", ""), FM_S("refresh", ""), FM_S("retry-after", ""), FM_S("server", ""),
        FM_S("set-cookie", ""), FM_S("strict-transport-security", ""),
        FM_S("transfer-encoding", ""), FM_S("user-agent", ""), FM_S("vary", ""),
        FM_S("via", ""), FM_S("www-authenticate", ""),
    };
    #undef FM_S

    /* RFC 7541 Appendix B: the Huffman code, {code (right-aligned), length in bits}, for
       symbols 0..255 and EOS (256). */
    typedef struct { uint32_t code; uint8_t bits; } fm_huff_code_t;
    static const fm_huff_code_t fm_huff_code[257] = {
    {0x1ff8,13}, {0x7fffd8,23}, {0xfffffe2,28}, {0xfffffe3,28}, {0xfffffe4,28}, {0xfffffe5,28},
    {0xfffffe6,28}, {0xfffffe7,28}, {0xfffffe8,28}, {0xffffea,24}, {0x3ffffffc,30}, {0xfffffe9,28},
    {0xfffffea,28}, {0x3ffffffd,30}, {0xfffffeb,28}, {0xfffffec,28}, {0xfffffed,28}, {0xfffffee,28},
    {0xfffffef,28}, {0xffffff0,28}, {0xffffff1,28}, {0xffffff2,28}, {0x3ffffffe,30}, {0xffffff3,28},
    {0xffffff4,28}, {0xffffff5,28}, {0xffffff6,28}, {0xffffff7,28}, {0xffffff8,28}, {0xffffff9,28},
    {0xffffffa,28}, {0xffffffb,28}, {0x14,6}, {0x3f8,10}, {0x3f9,10}, {0xffa,12},
    {0x1ff9,13}, {0x15,6}, {0xf8,8}, {0x7fa,11}, {0x3fa,10}, {0x3fb,10},
    {0xf9,8}, {0x7fb,11}, {0xfa,8}, {0x16,6}, {0x17,6}, {0x18,6},
    {0x0,5}, {0x1,5}, {0x2,5}, {0x19,6}, {0x1a,6}, {0x1b,6},
    {0x1c,6}, {0x1d,6}, {0x1e,6}, {0x1f,6}, {0x5c,7}, {0xfb,8},
    {0x7ffc,15}, {0x20,6}, {0xffb,12}, {0x3fc,10}, {0x1ffa,13}, {0x21,6},
    {0x5d,7}, {0x5e,7}, {0x5f,7}, {0x60,7}, {0x61,7}, {0x62,7},
    {0x63,7}, {0x64,7}, {0x65,7}, {0x66,7}, {0x67,7}, {0x68,7},
    {0x69,7}, {0x6a,7}, {0x6b,7}, {0x6c,7}, {0x6d,7}, {0x6e,7},
    {0x6f,7}, {0x70,7}, {0x71,7}, {0x72,7}, {0xfc,8}, {0x73,7},
    {0xfd,8}, {0x1ffb,13}, {0x7fff0,19}, {0x1ffc,13}, {0x3ffc,14}, {0x22,6},
    {0x7ffd,15}, {0x3,5}, {0x23,6}, {0x4,5}, {0x24,6}, {0x5,5},
    {0x25,6}, {0x26,6}, {0x27,6}, {0x6,5}, {0x74,7}, {0x75,7},
    {0x28,6}, {0x29,6}, {0x2a,6}, {0x7,5}, {0x2b,6}, {0x76,7},
    {0x2c,6}, {0x8,5}, {0x9,5}, {0x2d,6}, {0x77,7}, {0x78,7},
    {0x79,7}, {0x7a,7}, {0x7b,7}, {0x7ffe,15}, {0x7fc,11}, {0x3ffd,14},
    {0x1ffd,13}, {0xffffffc,28}, {0xfffe6,20}, {0x3fffd2,22}, {0xfffe7,20}, {0xfffe8,20},
    {0x3fffd3,22}, {0x3fffd4,22}, {0x3fffd5,22}, {0x7fffd9,23}, {0x3fffd6,22}, {0x7fffda,23},
    {0x7fffdb,23}, {0x7fffdc,23}, {0x7fffdd,23}, {0x7fffde,23}, {0xffffeb,24}, {0x7fffdf,23},
    {0xffffec,24}, {0xffffed,24}, {0x3fffd7,22}, {0x7fffe0,23}, {0xffffee,24}, {0x7fffe1,23},
    {0x7fffe2,23}, {0x7fffe3,23}, {0x7fffe4,23}, {0x1fffdc,21}, {0x3fffd8,22}, {0x7fffe5,23},
    {0x3fffd9,22}, {0x7fffe6,23}, {0x7fffe7,23}, {0xffffef,24}, {0x3fffda,22}, {0x1fffdd,21},
    {0xfffe9,20}, {0x3fffdb,22}, {0x3fffdc,22}, {0x7fffe8,23}, {0x7fffe9,23}, {0x1fffde,21},
    {0x7fffea,23}, {0x3fffdd,22}, {0x3fffde,22}, {0xfffff0,24}, {0x1fffdf,21}, {0x3fffdf,22},
    {0x7fffeb,23}, {0x7fffec,23}, {0x1fffe0,21}, {0x1fffe1,21}, {0x3fffe0,22}, {0x1fffe2,21},
    {0x7fffed,23}, {0x3fffe1,22}, {0x7fffee,23}, {0x7fffef,23}, {0xfffea,20}, {0x3fffe2,22},
    {0x3fffe3,22}, {0x3fffe4,22}, {0x7ffff0,23}, {0x3fffe5,22}, {0x3fffe6,22}, {0x7ffff1,23},
    {0x3ffffe0,26}, {0x3ffffe1,26}, {0xfffeb,20}, {0x7fff1,19}, {0x3fffe7,22}, {0x7ffff2,23},
    {0x3fffe8,22}, {0x1ffffec,25}, {0x3ffffe2,26}, {0x3ffffe3,26}, {0x3ffffe4,26}, {0x7ffffde,27},
    {0x7ffffdf,27}, {0x3ffffe5,26}, {0xfffff1,24}, {0x1ffffed,25}, {0x7fff2,19}, {0x1fffe3,21},
    {0x3ffffe6,26}, {0x7ffffe0,27}, {0x7ffffe1,27}, {0x3ffffe7,26}, {0x7ffffe2,27}, {0xfffff2,24},
    {0x1fffe4,21}, {0x1fffe5,21}, {0x3ffffe8,26}, {0x3ffffe9,26}, {0xffffffd,28}, {0x7ffffe3,27},
    {0x7ffffe4,27}, {0x7ffffe5,27}, {0xfffec,20}, {0xfffff3,24}, {0xfffed,20}, {0x1fffe6,21},
    {0x3fffe9,22}, {0x1fffe7,21}, {0x1fffe8,21}, {0x7ffff3,23}, {0x3fffea,22}, {0x3fffeb,22},
    {0x1ffffee,25}, {0x1ffffef,25}, {0xfffff4,24}, {0xfffff5,24}, {0x3ffffea,26}, {0x7ffff4,23},
    {0x3ffffeb,26}, {0x7ffffe6,27}, {0x3ffffec,26}, {0x3ffffed,26}, {0x7ffffe7,27}, {0x7ffffe8,27},
    {0x7ffffe9,27}, {0x7ffffea,27}, {0x7ffffeb,27}, {0xffffffe,28}, {0x7ffffec,27}, {0x7ffffed,27},
    {0x7ffffee,27}, {0x7ffffef,27}, {0x7fffff0,27}, {0x3ffffee,26}, {0x3fffffff,30},
    };
    """
    ctypedef struct fm_hpack_static_t:
        const char *name
        int name_len
        const char *value
        int value_len
    const fm_hpack_static_t fm_hpack_static[62]
    ctypedef struct fm_huff_code_t:
        uint32_t code
        uint8_t bits
    const fm_huff_code_t fm_huff_code[257]


# Huffman decoding is a state machine over 4-bit nibbles: a state is an internal node of the
# code tree (256 of them, 0 = root); each (state, nibble) entry gives the next state and at
# most one symbol (codes are 5 bits or longer). Built once at import from the code table.
cdef struct HuffStep:
    uint8_t next_state
    uint8_t flags                # HUFF_EMIT, HUFF_FAIL
    uint8_t symbol

cdef enum:
    HUFF_EMIT = 1                # this nibble completes `symbol`
    HUFF_FAIL = 2                # this nibble completes EOS: a decoding error (§5.2)
    HUFF_NODES = 256

cdef HuffStep HUFF_STEPS[HUFF_NODES * 16]
cdef uint8_t HUFF_ACCEPT[HUFF_NODES]   # 1: may end here (padding: < 8 bits, all ones)

# per static name length, the first static index with a name of that length (encoder lookup)
cdef uint8_t STATIC_BY_LEN[32][8]
cdef uint8_t STATIC_BY_LEN_N[32]


cdef void _build_tables() except *:
    cdef int child[HUFF_NODES][2]      # >= 0 internal node, < 0: -(symbol + 1)
    cdef int nodes = 1, sym, i, bit, cur, s, nib, depth, emitted, fail
    cdef uint32_t code
    cdef int v
    for i in range(HUFF_NODES):
        child[i][0] = child[i][1] = 0
    for sym in range(257):
        code = fm_huff_code[sym].code
        cur = 0
        for i in range(fm_huff_code[sym].bits - 1, -1, -1):
            bit = (code >> i) & 1
            if i == 0:
                child[cur][bit] = -(sym + 1)
            else:
                if child[cur][bit] == 0:
                    if nodes >= HUFF_NODES:
                        raise RuntimeError("hpack: Huffman tree overflow")
                    child[cur][bit] = nodes
                    nodes += 1
                cur = child[cur][bit]
    for s in range(HUFF_NODES):
        HUFF_ACCEPT[s] = 0
        for nib in range(16):
            cur = s
            emitted = -1
            fail = 0
            for i in range(3, -1, -1):
                v = child[cur][(nib >> i) & 1]
                if v < 0:
                    if -v - 1 == 256:
                        fail = 1
                    emitted = -v - 1
                    cur = 0
                else:
                    cur = v
            HUFF_STEPS[s * 16 + nib].next_state = <uint8_t>cur
            HUFF_STEPS[s * 16 + nib].symbol = <uint8_t>(emitted if emitted >= 0 else 0)
            HUFF_STEPS[s * 16 + nib].flags = (HUFF_FAIL if fail else
                                              (HUFF_EMIT if emitted >= 0 else 0))
    # valid endings: the root and the all-ones path below it, up to 7 bits deep
    cur = 0
    for depth in range(8):
        HUFF_ACCEPT[cur] = 1
        cur = child[cur][1]
    for i in range(32):
        STATIC_BY_LEN_N[i] = 0
    for i in range(1, HPACK_STATIC_COUNT + 1):
        v = fm_hpack_static[i].name_len
        if i > 1 and v == fm_hpack_static[i - 1].name_len and memcmp(
                fm_hpack_static[i].name, fm_hpack_static[i - 1].name, v) == 0:
            continue                                   # same name: found via the first
        STATIC_BY_LEN[v][STATIC_BY_LEN_N[v]] = <uint8_t>i
        STATIC_BY_LEN_N[v] += 1

_build_tables()


# ------------------------------------------------------------------ primitives

cdef int read_int(const unsigned char *p, Py_ssize_t n, Py_ssize_t *pos, int prefix_bits,
                  Py_ssize_t *value) noexcept:
    cdef Py_ssize_t i = pos[0]
    cdef uint64_t mask = (1 << prefix_bits) - 1, v, b
    cdef int shift = 0
    if i >= n:
        return -1
    v = p[i] & mask
    i += 1
    if v == mask:
        while True:
            if i >= n or shift > 28:                   # truncated, or past 2^31 for sure
                return -1
            b = p[i]
            i += 1
            v += (b & 0x7f) << shift
            if v > HPACK_MAX_INT:
                return -1
            if not (b & 0x80):
                break
            shift += 7
    pos[0] = i
    value[0] = <Py_ssize_t>v
    return 0


cdef int put_int(OutBuf *out, uint8_t first_bits, int prefix_bits, uint64_t value) except -1:
    cdef uint64_t mask = (1 << prefix_bits) - 1
    if out.len + 11 > out.cap:
        ob_reserve(out, 11)
    if value < mask:
        out.data[out.len] = first_bits | <uint8_t>value
        out.len += 1
        return 0
    out.data[out.len] = first_bits | <uint8_t>mask
    out.len += 1
    value -= mask
    while value >= 128:
        out.data[out.len] = <uint8_t>(value & 0x7f) | 0x80
        out.len += 1
        value >>= 7
    out.data[out.len] = <uint8_t>value
    out.len += 1
    return 0


cdef Py_ssize_t huffman_encoded_bytes(const unsigned char *s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i, bits = 0
    for i in range(n):
        bits += fm_huff_code[s[i]].bits
    return (bits + 7) >> 3


cdef int huffman_encode(OutBuf *out, const unsigned char *s, Py_ssize_t n) except -1:
    cdef uint64_t acc = 0
    cdef int pending = 0                               # bits in acc not yet written
    cdef Py_ssize_t i
    cdef unsigned char *d
    ob_reserve(out, huffman_encoded_bytes(s, n))
    d = out.data + out.len
    for i in range(n):
        acc = (acc << fm_huff_code[s[i]].bits) | fm_huff_code[s[i]].code
        pending += fm_huff_code[s[i]].bits
        while pending >= 8:
            pending -= 8
            d[0] = <unsigned char>(acc >> pending)
            d += 1
    if pending:                                        # pad with the EOS prefix (ones)
        d[0] = <unsigned char>((acc << (8 - pending)) | (0xff >> pending))
        d += 1
    out.len = d - out.data
    return 0


cdef Py_ssize_t huffman_decode(const unsigned char *src, Py_ssize_t n,
                               unsigned char *dst) noexcept:
    cdef Py_ssize_t i, o = 0
    cdef unsigned int state = 0
    cdef const HuffStep *st
    for i in range(n):
        st = &HUFF_STEPS[state * 16 + (src[i] >> 4)]
        if st.flags:
            if st.flags & HUFF_FAIL:
                return -1
            dst[o] = st.symbol
            o += 1
        state = st.next_state
        st = &HUFF_STEPS[state * 16 + (src[i] & 15)]
        if st.flags:
            if st.flags & HUFF_FAIL:
                return -1
            dst[o] = st.symbol
            o += 1
        state = st.next_state
    if not HUFF_ACCEPT[state]:
        return -1                                      # padding longer than 7 bits or not EOS
    return o


# ------------------------------------------------------------------ HeaderList

@cython.freelist(64)
cdef class HeaderList:
    """One decoded header block. See hpack.pxd."""

    def __cinit__(self):
        self.buf = NULL
        self.buf_len = self.buf_cap = 0
        self.fields = NULL
        self.count = self.fields_cap = 0
        self.list_bytes = 0
        self.truncated = False

    def __dealloc__(self):
        free(self.buf)
        free(self.fields)

    cdef void reset(self) noexcept:
        self.buf_len = 0
        self.count = 0
        self.list_bytes = 0
        self.truncated = False

    cdef int reserve(self, Py_ssize_t extra_bytes) except -1:
        cdef Py_ssize_t cap = self.buf_cap if self.buf_cap else 512
        cdef char *p
        if self.buf_len + extra_bytes <= self.buf_cap and self.buf is not NULL:
            return 0                                   # (memcpy of 0 bytes needs a pointer too)
        while cap < self.buf_len + extra_bytes:
            cap *= 2
        p = <char *>realloc(self.buf, cap)
        if p is NULL:
            raise MemoryError()
        self.buf = p
        self.buf_cap = cap
        return 0

    cdef int add(self, Py_ssize_t name_off, Py_ssize_t name_len, Py_ssize_t value_off,
                 Py_ssize_t value_len, uint32_t flags) except -1:
        cdef HField *f
        cdef int cap
        if self.count == self.fields_cap:
            cap = self.fields_cap * 2 if self.fields_cap else 16
            f = <HField *>realloc(self.fields, cap * sizeof(HField))
            if f is NULL:
                raise MemoryError()
            self.fields = f
            self.fields_cap = cap
        f = &self.fields[self.count]
        f.name_off = <uint32_t>name_off
        f.name_len = <uint32_t>name_len
        f.value_off = <uint32_t>value_off
        f.value_len = <uint32_t>value_len
        if name_len and self.buf[name_off] == 58:      # ':'
            flags |= HF_PSEUDO
        f.flags = flags
        self.count += 1
        return 0

    cdef int find(self, const char *name, Py_ssize_t name_len) noexcept:
        cdef int i
        for i in range(self.count):
            if (self.fields[i].name_len == name_len and
                    memcmp(self.buf + self.fields[i].name_off, name, name_len) == 0):
                return i
        return -1

    cdef bytes name(self, int i):
        return PyBytes_FromStringAndSize(self.buf + self.fields[i].name_off,
                                         self.fields[i].name_len)

    cdef bytes value(self, int i):
        return PyBytes_FromStringAndSize(self.buf + self.fields[i].value_off,
                                         self.fields[i].value_len)

    # -- Python view (tests, tools, slow paths) --
    def __len__(self):
        return self.count

    def items(self):
        """[(name, value), ...] as bytes."""
        return [(self.name(i), self.value(i)) for i in range(self.count)]

    def sensitive(self):
        """[bool, ...]: which fields arrived never-indexed."""
        return [bool(self.fields[i].flags & HF_NEVER_INDEX) for i in range(self.count)]

    def get(self, bytes name, default=None):
        cdef int i = self.find(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        return default if i < 0 else self.value(i)

    @property
    def size_bytes(self):
        return self.list_bytes

    @property
    def buffer_bytes(self):
        return self.buf_cap

    @property
    def was_truncated(self):
        return self.truncated

    def __repr__(self):
        return "HeaderList(%r)" % (self.items(),)


# ------------------------------------------------------------------ DynTable

cdef class DynTable:
    """The dynamic table. See hpack.pxd."""

    def __cinit__(self, Py_ssize_t limit_bytes=HPACK_DEFAULT_TABLE_BYTES):
        cdef Py_ssize_t cap = 1
        if limit_bytes < 0 or limit_bytes > (1 << 24):
            raise ValueError("hpack table limit out of range")
        while cap < limit_bytes // HPACK_ENTRY_OVERHEAD_BYTES + 1:
            cap *= 2
        self.ring = NULL
        self.entries = NULL
        self.limit_bytes = limit_bytes
        self.entries_mask = cap - 1
        self.write_off = 0
        self.newest = 0
        self.count = 0
        self.size_bytes = 0
        self.max_bytes = limit_bytes
        self.inserted = 0

    def __dealloc__(self):
        free(self.ring)
        free(self.entries)

    cdef int _allocate(self) except -1:
        self.ring = <char *>malloc(self.limit_bytes if self.limit_bytes else 1)
        self.entries = <DynEntry *>malloc((self.entries_mask + 1) * sizeof(DynEntry))
        if self.ring is NULL or self.entries is NULL:
            raise MemoryError()
        return 0

    cdef void evict_oldest(self) noexcept:
        cdef DynEntry *e = &self.entries[(self.newest - self.count + 1) & self.entries_mask]
        self.size_bytes -= e.name_len + e.value_len + HPACK_ENTRY_OVERHEAD_BYTES
        self.count -= 1
        if self.count == 0:
            self.write_off = 0

    cdef void set_max(self, Py_ssize_t max_bytes) noexcept:
        if max_bytes > self.limit_bytes:
            max_bytes = self.limit_bytes
        self.max_bytes = max_bytes
        while self.size_bytes > max_bytes:
            self.evict_oldest()

    cdef int insert(self, const char *name, Py_ssize_t name_len,
                    const char *value, Py_ssize_t value_len) except -1:
        return self.insert_hashed(name, name_len, 0, value, value_len, 0)

    cdef int insert_hashed(self, const char *name, Py_ssize_t name_len, uint32_t name_hash,
                           const char *value, Py_ssize_t value_len, uint32_t value_hash) except -1:
        # RFC 7541 §4.4: evict until it fits; an entry larger than the table empties it.
        # name/value must not point into the ring (the decoder copies them out first).
        cdef Py_ssize_t size = name_len + value_len + HPACK_ENTRY_OVERHEAD_BYTES
        cdef Py_ssize_t first, off
        cdef DynEntry *e
        while self.count and self.size_bytes + size > self.max_bytes:
            self.evict_oldest()
        if size > self.max_bytes:
            return 0
        if self.ring is NULL:
            self._allocate()
        # the raw bytes of all entries are < size_bytes <= max_bytes <= limit_bytes, so the
        # new bytes never overwrite a live entry's
        off = self.write_off
        first = self.limit_bytes - off
        if first >= name_len:
            memcpy(self.ring + off, name, name_len)
        else:
            memcpy(self.ring + off, name, first)
            memcpy(self.ring, name + first, name_len - first)
        off = (off + name_len) % self.limit_bytes if self.limit_bytes else 0
        first = self.limit_bytes - off
        if first >= value_len:
            memcpy(self.ring + off, value, value_len)
        else:
            memcpy(self.ring + off, value, first)
            memcpy(self.ring, value + first, value_len - first)
        self.inserted += 1
        self.newest = self.inserted & self.entries_mask
        e = &self.entries[self.newest]
        e.off = <uint32_t>self.write_off
        e.name_len = <uint32_t>name_len
        e.value_len = <uint32_t>value_len
        e.name_hash = name_hash
        e.value_hash = value_hash
        self.write_off = (off + value_len) % self.limit_bytes
        self.count += 1
        self.size_bytes += size
        return 0

    cdef DynEntry *get(self, Py_ssize_t index) noexcept:
        if index < 1 or index > self.count:
            return NULL
        return &self.entries[(self.newest - index + 1) & self.entries_mask]

    cdef void copy_out(self, char *dst, Py_ssize_t off, Py_ssize_t n) noexcept:
        cdef Py_ssize_t first
        if n == 0:
            return
        off %= self.limit_bytes
        first = self.limit_bytes - off
        if first >= n:
            memcpy(dst, self.ring + off, n)
        else:
            memcpy(dst, self.ring + off, first)
            memcpy(dst + first, self.ring, n - first)

    cdef bint equals(self, Py_ssize_t off, const char *s, Py_ssize_t n) noexcept:
        cdef Py_ssize_t first
        if n == 0:
            return True
        off %= self.limit_bytes
        first = self.limit_bytes - off
        if first >= n:
            return memcmp(self.ring + off, s, n) == 0
        return (memcmp(self.ring + off, s, first) == 0 and
                memcmp(self.ring, s + first, n - first) == 0)

    # -- tests --
    def py_entries(self):
        """[(name, value), ...] newest first."""
        cdef list out = []
        cdef DynEntry *e
        cdef bytes b
        cdef Py_ssize_t i
        for i in range(1, self.count + 1):
            e = self.get(i)
            b = PyBytes_FromStringAndSize(NULL, e.name_len + e.value_len)
            self.copy_out(PyBytes_AS_STRING(b), e.off, e.name_len + e.value_len)
            out.append((b[:e.name_len], b[e.name_len:]))
        return out

    @property
    def size(self):
        return self.size_bytes

    @property
    def max_size(self):
        return self.max_bytes


# ------------------------------------------------------------------ Decoder

cdef class Decoder:
    """Header block decoder. See hpack.pxd.

    Decoder(limit_table_bytes=4096, max_list_bytes=65536): limit_table_bytes is the largest
    SETTINGS_HEADER_TABLE_SIZE this side will ever advertise (the ring's size)."""

    def __cinit__(self, Py_ssize_t limit_table_bytes=HPACK_DEFAULT_TABLE_BYTES,
                  Py_ssize_t max_list_bytes=65536):
        self.table = DynTable(limit_table_bytes)
        self.settings_table_bytes = limit_table_bytes
        self.table.set_max(limit_table_bytes)
        self.max_list_bytes = max_list_bytes
        self.size_update_due = False
        self.error_reason = NULL
        self.blocks = self.errors = self.lists_too_large = 0

    cdef void set_settings_table_bytes(self, Py_ssize_t table_bytes) noexcept:
        # our SETTINGS_HEADER_TABLE_SIZE was acknowledged: the encoder may use up to this
        if table_bytes > self.table.limit_bytes:
            table_bytes = self.table.limit_bytes
        if table_bytes < self.table.max_bytes:
            self.size_update_due = True            # it must tell us it shrank (§4.2)
        self.settings_table_bytes = table_bytes

    cdef int _fail(self, const char *reason) noexcept:
        self.error_reason = reason
        self.errors += 1
        return HPACK_ERR_COMPRESSION

    cdef Py_ssize_t _name_from_table(self, Py_ssize_t index, HeaderList out) except -3:
        # copies entry `index`'s name to out.buf's end; its length, or -1 if no such entry
        cdef DynEntry *e
        cdef Py_ssize_t n
        if 1 <= index <= HPACK_STATIC_COUNT:
            n = fm_hpack_static[index].name_len
            out.reserve(n)
            memcpy(out.buf + out.buf_len, fm_hpack_static[index].name, n)
            return n
        e = self.table.get(index - HPACK_STATIC_COUNT)
        if e is NULL:
            return -1
        out.reserve(e.name_len)
        self.table.copy_out(out.buf + out.buf_len, e.off, e.name_len)
        return e.name_len

    cdef int _emit_indexed(self, Py_ssize_t index, HeaderList out, uint32_t flags) except -3:
        cdef DynEntry *e
        cdef Py_ssize_t nlen, vlen, at = out.buf_len
        if 1 <= index <= HPACK_STATIC_COUNT:
            nlen = fm_hpack_static[index].name_len
            vlen = fm_hpack_static[index].value_len
            out.list_bytes += nlen + vlen + HPACK_ENTRY_OVERHEAD_BYTES
            if out.list_bytes > self.max_list_bytes:
                out.truncated = True
                return 0
            out.reserve(nlen + vlen)
            memcpy(out.buf + at, fm_hpack_static[index].name, nlen)
            memcpy(out.buf + at + nlen, fm_hpack_static[index].value, vlen)
        else:
            e = self.table.get(index - HPACK_STATIC_COUNT)
            if e is NULL:
                return self._fail("hpack: index past the tables")
            nlen = e.name_len
            vlen = e.value_len
            out.list_bytes += nlen + vlen + HPACK_ENTRY_OVERHEAD_BYTES
            if out.list_bytes > self.max_list_bytes:
                out.truncated = True
                return 0
            out.reserve(nlen + vlen)
            self.table.copy_out(out.buf + at, e.off, nlen + vlen)
        out.buf_len = at + nlen + vlen
        out.add(at, nlen, at + nlen, vlen, flags)
        return 0

    cdef Py_ssize_t _string(self, const unsigned char *p, Py_ssize_t n, Py_ssize_t *pos,
                            HeaderList out) except -3:
        # a string literal (§5.2) appended at out.buf + out.buf_len (buf_len not moved);
        # its decoded length, or -1. The length field is checked against the block before
        # anything is allocated, so memory is bounded by the block's size (x 8/5 for Huffman).
        cdef Py_ssize_t length, got
        cdef bint huff
        if pos[0] >= n:
            return -1
        huff = (p[pos[0]] & 0x80) != 0
        if read_int(p, n, pos, 7, &length) < 0 or length > n - pos[0]:
            return -1
        if huff:
            out.reserve((length * 8) // 5 + 1)
            got = huffman_decode(p + pos[0], length, <unsigned char *>out.buf + out.buf_len)
            if got < 0:
                return -1
        else:
            out.reserve(length)
            memcpy(out.buf + out.buf_len, p + pos[0], length)
            got = length
        pos[0] += length
        return got

    cdef int decode(self, const unsigned char *p, Py_ssize_t n, HeaderList out) except -3:
        """Decodes one whole header block into out (reset first). HPACK_OK, HPACK_LIST_TOO_LARGE
        (fields past the limit dropped; the table is in sync) or HPACK_ERR_COMPRESSION."""
        cdef Py_ssize_t pos = 0, index, at, nlen, vlen, new_max
        cdef unsigned char b
        cdef bint fields_started = False
        cdef uint32_t flags
        out.reset()
        self.blocks += 1
        if self.size_update_due and (n == 0 or (p[0] & 0xe0) != 0x20):
            return self._fail("hpack: the first block after a smaller table setting "
                              "lacks a size update")
        while pos < n:
            b = p[pos]
            if b & 0x80:                                   # indexed field (§6.1)
                if read_int(p, n, &pos, 7, &index) < 0 or index == 0:
                    return self._fail("hpack: bad index")
                if self._emit_indexed(index, out, 0) < 0:
                    return HPACK_ERR_COMPRESSION
                fields_started = True
                continue
            if (b & 0xe0) == 0x20:                         # dynamic table size update (§6.3)
                if fields_started:
                    return self._fail("hpack: size update after a field")
                if read_int(p, n, &pos, 5, &new_max) < 0 or new_max > self.settings_table_bytes:
                    return self._fail("hpack: size update past SETTINGS_HEADER_TABLE_SIZE")
                self.table.set_max(new_max)
                self.size_update_due = False
                continue
            fields_started = True
            # literal (§6.2): 01 incremental indexing, 0000 without, 0001 never indexed
            if b & 0x40:
                if read_int(p, n, &pos, 6, &index) < 0:
                    return self._fail("hpack: bad name index")
                flags = 0
            else:
                if read_int(p, n, &pos, 4, &index) < 0:
                    return self._fail("hpack: bad name index")
                flags = HF_NEVER_INDEX if b & 0x10 else 0
            at = out.buf_len
            if index:
                nlen = self._name_from_table(index, out)
                if nlen < 0:
                    return self._fail("hpack: name index past the tables")
            else:
                nlen = self._string(p, n, &pos, out)
                if nlen < 0:
                    return self._fail("hpack: bad name string")
            out.buf_len = at + nlen
            vlen = self._string(p, n, &pos, out)
            if vlen < 0:
                out.buf_len = at
                return self._fail("hpack: bad value string")
            if b & 0x40:
                self.table.insert(out.buf + at, nlen, out.buf + at + nlen, vlen)
            out.list_bytes += nlen + vlen + HPACK_ENTRY_OVERHEAD_BYTES
            if out.list_bytes > self.max_list_bytes:
                out.truncated = True
                out.buf_len = at                           # dropped; keep decoding
            else:
                out.buf_len = at + nlen + vlen
                out.add(at, nlen, at + nlen, vlen, flags)
        if out.truncated:
            self.lists_too_large += 1
            return HPACK_LIST_TOO_LARGE
        return HPACK_OK

    # -- Python entry points (tests, tools) --
    def py_decode(self, data):
        """(result, HeaderList): result is 0, -1 (COMPRESSION_ERROR) or -2 (list too large)."""
        cdef const unsigned char[:] mv = data
        cdef HeaderList out = HeaderList.__new__(HeaderList)
        cdef int r
        if mv.shape[0] == 0:
            r = self.decode(<const unsigned char *>b"", 0, out)
        else:
            r = self.decode(&mv[0], mv.shape[0], out)
        return r, out

    def decode_list(self, data):
        """[(name, value), ...]; raises HpackError on a COMPRESSION_ERROR."""
        r, out = self.py_decode(data)
        if r == HPACK_ERR_COMPRESSION:
            raise HpackError(self.error_reason.decode())
        return out.items()

    def py_set_settings_table_bytes(self, Py_ssize_t n):
        self.set_settings_table_bytes(n)

    @property
    def dynamic_table(self):
        return self.table

    @property
    def counters(self):
        return {"blocks": self.blocks, "errors": self.errors,
                "lists_too_large": self.lists_too_large}


# ------------------------------------------------------------------ Encoder

cdef inline bint _is_credential(const char *name, Py_ssize_t n, Py_ssize_t value_len) noexcept:
    # never indexed (RFC 7541 §7.1.3): a table entry would let a compression oracle guess it
    if n == 13 and memcmp(name, b"authorization", 13) == 0:
        return True
    if n == 19 and memcmp(name, b"proxy-authorization", 19) == 0:
        return True
    if n == 6 and memcmp(name, b"cookie", 6) == 0 and value_len < 20:
        return True                                        # short cookies are guessable
    return False


cdef class Encoder:
    """Header block encoder. See hpack.pxd.

    Encoder(limit_table_bytes=4096, huffman=True): the table never grows past
    limit_table_bytes even if the peer allows more."""

    def __cinit__(self, Py_ssize_t limit_table_bytes=HPACK_DEFAULT_TABLE_BYTES,
                  bint huffman=True):
        self.table = DynTable(limit_table_bytes)
        self.table.set_max(min(limit_table_bytes, HPACK_DEFAULT_TABLE_BYTES))
        self.peer_table_bytes = HPACK_DEFAULT_TABLE_BYTES
        self.min_table_bytes = self.table.max_bytes
        # the peer's decoder starts at 4096: if our cap is smaller, say so in the first block
        self.size_update_due = self.table.max_bytes != HPACK_DEFAULT_TABLE_BYTES
        self.huffman = huffman
        self.max_indexed_value_bytes = 1024
        self.cache_mask = <uint32_t>(2 * (self.table.entries_mask + 1) - 1)
        self.by_field = NULL
        self.by_name = NULL

    def __dealloc__(self):
        free(self.by_field)
        free(self.by_name)

    cdef Py_ssize_t _live_index(self, uint32_t number) noexcept:
        cdef uint32_t age
        if number == 0:
            return 0
        age = self.table.inserted - number
        if age >= <uint32_t>self.table.count:
            return 0
        return age + 1

    cdef void set_peer_table_bytes(self, Py_ssize_t table_bytes) noexcept:
        # the peer's SETTINGS_HEADER_TABLE_SIZE: we use min(it, our limit)
        cdef Py_ssize_t use = table_bytes if table_bytes < self.table.limit_bytes else self.table.limit_bytes
        self.peer_table_bytes = table_bytes
        if use == self.table.max_bytes:
            return
        if use < self.min_table_bytes:
            self.min_table_bytes = use
        self.table.set_max(use)
        self.size_update_due = True

    cdef int begin_block(self, OutBuf *out) except -1:
        if self.size_update_due:
            if self.min_table_bytes < self.table.max_bytes:
                put_int(out, 0x20, 5, self.min_table_bytes)
            put_int(out, 0x20, 5, self.table.max_bytes)
            self.size_update_due = False
        self.min_table_bytes = self.table.max_bytes
        return 0

    cdef int _put_string(self, OutBuf *out, const char *s, Py_ssize_t n) except -1:
        cdef Py_ssize_t h
        if self.huffman and n > 0:
            h = huffman_encoded_bytes(<const unsigned char *>s, n)
            if h < n:
                put_int(out, 0x80, 7, h)
                return huffman_encode(out, <const unsigned char *>s, n)
        put_int(out, 0, 7, n)
        return ob_put(out, s, n)

    cdef int encode_field(self, OutBuf *out, const char *name, Py_ssize_t name_len,
                          const char *value, Py_ssize_t value_len, uint32_t flags) except -1:
        cdef Py_ssize_t name_index = 0, i, k
        cdef int si
        cdef DynEntry *e
        cdef bint never = (flags & HF_NEVER_INDEX) or _is_credential(name, name_len, value_len)
        cdef uint32_t nh = 0, vh = 0, number
        # static table: same-name entries are adjacent, STATIC_BY_LEN holds the first
        if name_len < 32:
            for k in range(STATIC_BY_LEN_N[name_len]):
                si = STATIC_BY_LEN[name_len][k]
                if memcmp(fm_hpack_static[si].name, name, name_len) != 0:
                    continue
                name_index = si
                if not never:
                    while (si <= HPACK_STATIC_COUNT and fm_hpack_static[si].name_len == name_len
                           and memcmp(fm_hpack_static[si].name, name, name_len) == 0):
                        if (fm_hpack_static[si].value_len == value_len and
                                memcmp(fm_hpack_static[si].value, value, value_len) == 0):
                            return put_int(out, 0x80, 7, si)
                        si += 1
                break
        # dynamic table, through the caches
        if not never and self.table.count:
            nh = fnv1a(name, name_len)
            vh = fnv1a(value, value_len) ^ (nh * 0x9e3779b1u)
            i = self._live_index(self.by_field[vh & self.cache_mask])
            if i:
                e = self.table.get(i)
                if (e.value_hash == vh and e.name_len == name_len and e.value_len == value_len
                        and self.table.equals(e.off, name, name_len)
                        and self.table.equals(e.off + name_len, value, value_len)):
                    return put_int(out, 0x80, 7, HPACK_STATIC_COUNT + i)
            if name_index == 0:
                i = self._live_index(self.by_name[nh & self.cache_mask])
                if i:
                    e = self.table.get(i)
                    if (e.name_hash == nh and e.name_len == name_len and
                            self.table.equals(e.off, name, name_len)):
                        name_index = HPACK_STATIC_COUNT + i
        if never:
            put_int(out, 0x10, 4, name_index)
        elif (value_len <= self.max_indexed_value_bytes and
              name_len + value_len + HPACK_ENTRY_OVERHEAD_BYTES <= self.table.max_bytes):
            put_int(out, 0x40, 6, name_index)
            if name_index == 0:
                self._put_string(out, name, name_len)
            self._put_string(out, value, value_len)
            if nh == 0 and vh == 0:                     # the caches were skipped above
                nh = fnv1a(name, name_len)
                vh = fnv1a(value, value_len) ^ (nh * 0x9e3779b1u)
            number = self.table.inserted
            self.table.insert_hashed(name, name_len, nh, value, value_len, vh)
            if self.table.inserted != number:           # not too big for the table
                if self.by_field is NULL:
                    self.by_field = <uint32_t *>calloc(self.cache_mask + 1, sizeof(uint32_t))
                    self.by_name = <uint32_t *>calloc(self.cache_mask + 1, sizeof(uint32_t))
                    if self.by_field is NULL or self.by_name is NULL:
                        raise MemoryError()
                self.by_field[vh & self.cache_mask] = self.table.inserted
                self.by_name[nh & self.cache_mask] = self.table.inserted
            return 0
        else:
            put_int(out, 0x00, 4, name_index)
        if name_index == 0:
            self._put_string(out, name, name_len)
        return self._put_string(out, value, value_len)

    cdef int encode_list(self, OutBuf *out, HeaderList headers) except -1:
        cdef int i
        cdef HField *f
        for i in range(headers.count):
            f = &headers.fields[i]
            self.encode_field(out, headers.buf + f.name_off, f.name_len,
                              headers.buf + f.value_off, f.value_len, f.flags)
        return 0

    cdef int encode_pairs(self, OutBuf *out, object pairs) except -1:
        cdef bytes name, value
        cdef uint32_t flags
        for pair in pairs:
            name = pair[0]
            value = pair[1]
            flags = HF_NEVER_INDEX if len(pair) > 2 and pair[2] else 0
            self.encode_field(out, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name),
                              PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), flags)
        return 0

    # -- Python entry points (tests, tools) --
    def encode(self, pairs):
        """One header block (bytes) from (name, value[, sensitive]) bytes pairs."""
        cdef OutBuf out
        out.data = NULL
        out.len = out.cap = 0
        try:
            self.begin_block(&out)
            self.encode_pairs(&out, pairs)
            return ob_take(&out)
        finally:
            ob_free(&out)

    def py_set_peer_table_bytes(self, Py_ssize_t n):
        self.set_peer_table_bytes(n)

    @property
    def dynamic_table(self):
        return self.table


# ------------------------------------------------------------------ module helpers (tests)

def py_huffman_encode(bytes s):
    cdef OutBuf out
    out.data = NULL
    out.len = out.cap = 0
    try:
        huffman_encode(&out, <const unsigned char *>PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))
        return ob_take(&out)
    finally:
        ob_free(&out)


def py_huffman_decode(bytes s):
    """The decoded bytes, or None if s is not a valid Huffman string (§5.2)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s), got
    cdef unsigned char *dst = <unsigned char *>malloc(n * 8 // 5 + 1)
    if dst is NULL:
        raise MemoryError()
    try:
        got = huffman_decode(<const unsigned char *>PyBytes_AS_STRING(s), n, dst)
        if got < 0:
            return None
        return PyBytes_FromStringAndSize(<char *>dst, got)
    finally:
        free(dst)


def static_table():
    """RFC 7541 Appendix A as [(name, value), ...] (index 1 first)."""
    return [(fm_hpack_static[i].name[:fm_hpack_static[i].name_len],
             fm_hpack_static[i].value[:fm_hpack_static[i].value_len])
            for i in range(1, HPACK_STATIC_COUNT + 1)]
