# cython: language_level=3
"""HTTP/2 codec measurements: fastmesh's Cython codec and libnghttp2 driven the same way from
C loops (no Python per frame or per header block on either side). Built by run.py; needs
libnghttp2-dev. Benchmark-only: nothing in fastmesh/ links libnghttp2."""
from libc.stdint cimport uint8_t, int32_t, int64_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastmesh._core.buffer cimport RecvBuffer
from fastmesh._core.clock cimport now_us
from fastmesh._core.h2 cimport H2Connection, H2Consumer
from fastmesh._core.hpack cimport Decoder, Encoder, HeaderList
from fastmesh._core.outbuf cimport OutBuf, ob_free

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

cdef inline double now_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1e9 + ts.tv_nsec

cdef extern from "nghttp2/nghttp2.h" nogil:
    ctypedef struct nghttp2_session
    ctypedef struct nghttp2_session_callbacks
    ctypedef struct nghttp2_hd_inflater
    ctypedef struct nghttp2_hd_deflater
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags
    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
    ctypedef struct nghttp2_data_provider
    ctypedef struct nghttp2_settings_entry
    enum:
        NGHTTP2_HD_INFLATE_FINAL
        NGHTTP2_HD_INFLATE_EMIT
        NGHTTP2_FLAG_END_STREAM
        NGHTTP2_HEADERS
        NGHTTP2_DATA
        NGHTTP2_FLAG_NONE
    ctypedef int (*on_frame_recv_cb)(nghttp2_session *, const nghttp2_frame *, void *)
    ctypedef int (*on_header_cb)(nghttp2_session *, const nghttp2_frame *, const uint8_t *,
                                 size_t, const uint8_t *, size_t, uint8_t, void *)
    ctypedef int (*on_data_chunk_cb)(nghttp2_session *, uint8_t, int32_t, const uint8_t *,
                                     size_t, void *)
    int nghttp2_hd_inflate_new(nghttp2_hd_inflater **p)
    void nghttp2_hd_inflate_del(nghttp2_hd_inflater *p)
    ssize_t nghttp2_hd_inflate_hd2(nghttp2_hd_inflater *inflater, nghttp2_nv *nv_out,
                                   int *inflate_flags, const uint8_t *inp, size_t inlen, int in_final)
    int nghttp2_hd_inflate_end_headers(nghttp2_hd_inflater *inflater)
    int nghttp2_hd_deflate_new(nghttp2_hd_deflater **p, size_t max_table)
    void nghttp2_hd_deflate_del(nghttp2_hd_deflater *p)
    ssize_t nghttp2_hd_deflate_hd(nghttp2_hd_deflater *d, uint8_t *buf, size_t buflen,
                                  const nghttp2_nv *nva, size_t nvlen)
    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **p)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *p)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, on_frame_recv_cb)
    void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, on_header_cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *, on_data_chunk_cb)
    int nghttp2_session_server_new(nghttp2_session **p, const nghttp2_session_callbacks *cb, void *user)
    void nghttp2_session_del(nghttp2_session *s)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *s, const uint8_t *inp, size_t inlen)
    ssize_t nghttp2_session_mem_send(nghttp2_session *s, const uint8_t **data_ptr)
    int nghttp2_submit_response(nghttp2_session *s, int32_t stream_id, const nghttp2_nv *nva,
                                size_t nvlen, const nghttp2_data_provider *dp)
    int nghttp2_submit_settings(nghttp2_session *s, uint8_t flags, const nghttp2_settings_entry *iv, size_t niv)


# ------------------------------------------------------------------ HPACK alone

def ours_decode(list blocks, int rounds):
    """ns per header block: a fresh Decoder per round, the blocks in order (their dynamic
    table references hold), each into a new HeaderList as the connection does."""
    cdef double t0, total = 0
    cdef Decoder d
    cdef HeaderList out
    cdef bytes b
    cdef int r, i, nfields = 0
    for r in range(rounds):
        d = Decoder(4096, 65536)
        t0 = now_ns()
        for b in blocks:
            out = HeaderList.__new__(HeaderList)
            if d.decode(<const unsigned char *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), out) != 0:
                raise ValueError("decode")
            nfields += out.count
        total += now_ns() - t0
    return total / (rounds * len(blocks)), nfields // rounds


def ng_decode(list blocks, int rounds):
    cdef double t0, total = 0
    cdef nghttp2_hd_inflater *inf
    cdef nghttp2_nv nv
    cdef int flags, r, nfields = 0
    cdef ssize_t rv
    cdef const uint8_t *p
    cdef size_t n
    cdef bytes b
    cdef char *copy
    for r in range(rounds):
        nghttp2_hd_inflate_new(&inf)
        t0 = now_ns()
        for b in blocks:
            p = <const uint8_t *>PyBytes_AS_STRING(b)
            n = PyBytes_GET_SIZE(b)
            # nghttp2 hands out name/value pointers (refcounted buffers); copying them out,
            # as our HeaderList holds its own copy, would add a memcpy: not done (favours it)
            while True:
                flags = 0
                rv = nghttp2_hd_inflate_hd2(inf, &nv, &flags, p, n, 1)
                if rv < 0:
                    raise ValueError("inflate")
                p += rv
                n -= rv
                if flags & NGHTTP2_HD_INFLATE_EMIT:
                    nfields += 1
                if flags & NGHTTP2_HD_INFLATE_FINAL:
                    nghttp2_hd_inflate_end_headers(inf)
                    break
                if rv == 0 and n == 0:
                    break
        total += now_ns() - t0
        nghttp2_hd_inflate_del(inf)
    return total / (rounds * len(blocks)), nfields // rounds


def ours_encode(list header_lists, int rounds):
    cdef double t0, total = 0
    cdef Encoder e
    cdef OutBuf out
    cdef Py_ssize_t nbytes = 0
    out.data = NULL
    out.len = out.cap = 0
    for r in range(rounds):
        e = Encoder(4096, True)
        t0 = now_ns()
        for hl in header_lists:
            out.len = 0
            e.begin_block(&out)
            e.encode_pairs(&out, hl)
            nbytes += out.len
        total += now_ns() - t0
    ob_free(&out)
    return total / (rounds * len(header_lists)), nbytes // rounds


def ng_encode(list header_lists, int rounds):
    # the nghttp2_nv arrays are built before timing (nghttp2 takes C arrays)
    cdef double t0, total = 0
    cdef nghttp2_hd_deflater *d
    cdef int i, j, k, r
    cdef int nlists = len(header_lists)
    cdef nghttp2_nv **nvs = <nghttp2_nv **>malloc(nlists * sizeof(void *))
    cdef int *counts = <int *>malloc(nlists * sizeof(int))
    cdef uint8_t buf[16384]
    cdef ssize_t rv
    cdef Py_ssize_t nbytes = 0
    keep = []
    for i, hl in enumerate(header_lists):
        counts[i] = len(hl)
        nvs[i] = <nghttp2_nv *>malloc(len(hl) * sizeof(nghttp2_nv))
        for j, (nm, v) in enumerate(hl):
            keep.append((nm, v))
            nvs[i][j].name = <uint8_t *>PyBytes_AS_STRING(nm)
            nvs[i][j].namelen = len(nm)
            nvs[i][j].value = <uint8_t *>PyBytes_AS_STRING(v)
            nvs[i][j].valuelen = len(v)
            nvs[i][j].flags = 0
    for r in range(rounds):
        nghttp2_hd_deflate_new(&d, 4096)
        t0 = now_ns()
        for i in range(nlists):
            rv = nghttp2_hd_deflate_hd(d, buf, sizeof(buf), nvs[i], counts[i])
            if rv < 0:
                raise ValueError("deflate")
            nbytes += rv
        total += now_ns() - t0
        nghttp2_hd_deflate_del(d)
    for i in range(nlists):
        free(nvs[i])
    free(nvs)
    free(counts)
    return total / (rounds * nlists), nbytes // rounds


# ------------------------------------------------------------------ whole connection
# A server connection fed a client's bytes in bursts (10 gRPC requests each: HEADERS, DATA
# with END_STREAM); it answers each request with a headers-only response (:status 200,
# content-type, grpc-status: END_STREAM) as it completes, and its output is drained after
# every burst (mem_send / take_output). Both sides give request bytes back to the window.

cdef class BenchConsumer(H2Consumer):
    cdef H2Connection conn
    cdef int requests
    cdef list response

    cpdef on_data(self, uint32_t stream_id, object data, bint end_stream):
        self.conn.consumed(stream_id, len(data))
        if end_stream:
            self.requests += 1
            self.conn.send_headers(stream_id, self.response, True)


def ours_session(list bursts, int rounds):
    cdef double t0, total = 0
    cdef BenchConsumer cons
    cdef H2Connection conn
    cdef RecvBuffer rb
    cdef bytes b
    cdef int r, requests = 0
    cdef Py_ssize_t n, out_bytes = 0
    response = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")]
    for r in range(rounds):
        cons = BenchConsumer()
        cons.response = response
        conn = H2Connection(cons, max_concurrent_streams=1000)
        cons.conn = conn
        rb = RecvBuffer(65536, 1 << 20)
        conn.take_output()
        t0 = now_ns()
        for b in bursts:
            rb.py_feed(b)                       # the kernel's copy into the buffer
            conn.receive(rb)
            for c in conn.take_output():
                out_bytes += len(c)
        total += now_ns() - t0
        if conn.state == 3:
            raise ValueError("connection error %r" % (conn.last_error,))
        requests += cons.requests
    return total / rounds, requests // rounds, out_bytes // rounds


cdef struct NgState:
    nghttp2_session *session
    int requests
    nghttp2_nv *response
    size_t nresponse
    bint copy_headers               # a wrapper's minimum: each name/value copied out
    char *arena                     # (into one buffer, as our HeaderList holds them)
    size_t arena_len

cdef int ng_on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                      size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                      void *user) noexcept nogil:
    cdef NgState *st = <NgState *>user
    if st.copy_headers:
        if st.arena_len + namelen + valuelen > 65536:
            st.arena_len = 0
        memcpy(st.arena + st.arena_len, name, namelen)
        memcpy(st.arena + st.arena_len + namelen, value, valuelen)
        st.arena_len += namelen + valuelen
    return 0

cdef int ng_on_data(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data,
                    size_t n, void *user) noexcept nogil:
    return 0

cdef int ng_on_frame(nghttp2_session *s, const nghttp2_frame *f, void *user) noexcept nogil:
    cdef NgState *st = <NgState *>user
    if (f.hd.type == NGHTTP2_DATA or f.hd.type == NGHTTP2_HEADERS) and (f.hd.flags & NGHTTP2_FLAG_END_STREAM):
        st.requests += 1
        nghttp2_submit_response(s, f.hd.stream_id, st.response, st.nresponse, NULL)
    return 0


def ng_session(list bursts, int rounds, bint copy_headers=False):
    cdef double t0, total = 0
    cdef nghttp2_session_callbacks *cbs
    cdef NgState st
    cdef bytes b
    cdef ssize_t rv
    cdef const uint8_t *out
    cdef int r, requests = 0
    cdef Py_ssize_t out_bytes = 0
    cdef uint8_t scratch[65536]
    cdef nghttp2_nv resp[3]
    names = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")]
    for i in range(3):
        resp[i].name = <uint8_t *>PyBytes_AS_STRING(names[i][0])
        resp[i].namelen = len(names[i][0])
        resp[i].value = <uint8_t *>PyBytes_AS_STRING(names[i][1])
        resp[i].valuelen = len(names[i][1])
        resp[i].flags = 0
    nghttp2_session_callbacks_new(&cbs)
    nghttp2_session_callbacks_set_on_header_callback(cbs, ng_on_header)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, ng_on_data)
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, ng_on_frame)
    for r in range(rounds):
        st.requests = 0
        st.copy_headers = copy_headers
        st.arena = <char *>malloc(65536)
        st.arena_len = 0
        st.response = resp
        st.nresponse = 3
        nghttp2_session_server_new(&st.session, cbs, &st)
        nghttp2_submit_settings(st.session, NGHTTP2_FLAG_NONE, NULL, 0)
        t0 = now_ns()
        for b in bursts:
            # the same copy as ours: bytes land in a receive buffer first
            memcpy(scratch, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
            rv = nghttp2_session_mem_recv(st.session, scratch, PyBytes_GET_SIZE(b))
            if rv < 0:
                raise ValueError("mem_recv %d" % rv)
            while True:
                rv = nghttp2_session_mem_send(st.session, &out)
                if rv <= 0:
                    break
                out_bytes += rv
        total += now_ns() - t0
        nghttp2_session_del(st.session)
        free(st.arena)
        requests += st.requests
    nghttp2_session_callbacks_del(cbs)
    return total / rounds, requests // rounds, out_bytes // rounds
