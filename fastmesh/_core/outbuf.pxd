# A growable C byte buffer for encoders (HPACK blocks, HTTP/2 frames): append, reserve and
# back-fill, then hand the bytes out once. Growth doubles; callers bound what they append.

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport realloc, free
from libc.string cimport memcpy

cdef struct OutBuf:
    unsigned char *data          # malloc'd, cap bytes (NULL until the first append)
    Py_ssize_t len               # bytes written
    Py_ssize_t cap               # bytes allocated

cdef inline int ob_reserve(OutBuf *b, Py_ssize_t extra_bytes) except -1:
    # make room for extra_bytes more; data may move
    cdef Py_ssize_t want = b.len + extra_bytes, cap = b.cap if b.cap else 256
    cdef unsigned char *p
    if want <= b.cap:
        return 0
    while cap < want:
        cap *= 2
    p = <unsigned char *>realloc(b.data, cap)
    if p is NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0

cdef inline int ob_put(OutBuf *b, const void *src, Py_ssize_t n) except -1:
    if n == 0:
        return 0
    if b.len + n > b.cap:
        ob_reserve(b, n)
    memcpy(b.data + b.len, src, n)
    b.len += n
    return 0

cdef inline int ob_byte(OutBuf *b, unsigned char c) except -1:
    if b.len + 1 > b.cap:
        ob_reserve(b, 1)
    b.data[b.len] = c
    b.len += 1
    return 0

cdef inline bytes ob_take(OutBuf *b):
    # the bytes written so far; the buffer is emptied (its memory kept for reuse)
    cdef bytes out = PyBytes_FromStringAndSize(<char *>b.data, b.len) if b.len else b""
    b.len = 0
    return out

cdef inline void ob_free(OutBuf *b) noexcept:
    free(b.data)
    b.data = NULL
    b.len = 0
    b.cap = 0
