"""HTTP/1.x codec: strict head parsing, chunked framing, head writers. See http1.pxd."""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memchr, memcmp

cimport cython

import os

cdef extern from "strings.h":
    int strncasecmp(const char *a, const char *b, size_t n) nogil

# --------------------------------------------------------------- character classes

cdef uint8_t TCHAR[256]        # 1: token character (RFC 9110 tchar)
cdef uint8_t VCHAR[256]        # 1: allowed in a field value (VCHAR, obs-text, SP, HTAB)
cdef uint8_t TARGET[256]       # 1: allowed in a request target (visible ASCII but '#')
cdef uint8_t HOSTCH[256]       # Host value bytes (RFC 3986 3.2.2), see valid_host
cdef uint8_t LOWER[256]

cdef enum:                     # HOSTCH bits
    H_REG = 1                  # reg-name (and IPv4address): unreserved / sub-delims
    H_HEX = 2                  # a hex digit (after '%', and in an IP-literal)
    H_LIT = 4                  # allowed inside an IP-literal's brackets: HEXDIG ":" "."

cdef void _init_tables():
    cdef int c
    for c in range(256):
        TCHAR[c] = 0
        VCHAR[c] = 1 if (c == 9 or c == 32 or (0x21 <= c <= 0x7E) or c >= 0x80) else 0
        # '#': a fragment is never sent (RFC 9112 3.2); a hop that cut the target there
        # would route, or see, a different path than we do
        TARGET[c] = 1 if (0x21 <= c <= 0x7E and c != 35) else 0
        HOSTCH[c] = 0
        LOWER[c] = c + 32 if (65 <= c <= 90) else c
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        TCHAR[c] = 1
    # reg-name = *( unreserved / pct-encoded / sub-delims ); '%' is checked apart
    for c in b"-._~!$&'()*+,;=ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ":
        HOSTCH[c] = H_REG
    for c in b"0123456789abcdefABCDEF":
        HOSTCH[c] = H_REG | H_HEX | H_LIT
    HOSTCH[46] |= H_LIT                               # '.'
    HOSTCH[58] = H_LIT                                # ':'

_init_tables()

cdef extern from *:
    """
    static void *fm_memmem(const void *h, size_t hl, const void *n, size_t nl) {
        return memmem(h, hl, n, nl);
    }
    """
    void *fm_memmem(const void *h, size_t hl, const void *n, size_t nl) nogil


cdef inline bint ieq(const unsigned char *a, const char *lower_b, Py_ssize_t n) noexcept:
    # case-insensitive compare of a against an already lower-case b
    cdef Py_ssize_t i
    for i in range(n):
        if LOWER[a[i]] != <unsigned char>lower_b[i]:
            return False
    return True


cdef int classify(const unsigned char *name, int n) noexcept:
    if n == 4 and ieq(name, b"host", 4):
        return HK_HOST
    if n == 14 and ieq(name, b"content-length", 14):
        return HK_CONTENT_LENGTH
    if n == 17:
        if ieq(name, b"transfer-encoding", 17):
            return HK_TRANSFER_ENCODING
        if ieq(name, b"x-forwarded-proto", 17):
            return HK_XFP
    if n == 10:
        if ieq(name, b"connection", 10):
            return HK_CONNECTION
        if ieq(name, b"keep-alive", 10):
            return HK_KEEP_ALIVE
    if n == 2 and ieq(name, b"te", 2):
        return HK_TE
    if n == 7:
        if ieq(name, b"trailer", 7):
            return HK_TRAILER
        if ieq(name, b"upgrade", 7):
            return HK_UPGRADE
    if n >= 6 and ieq(name, b"proxy-", 6):
        return HK_PROXY
    if n == 6 and ieq(name, b"expect", 6):
        return HK_EXPECT
    if n == 15 and ieq(name, b"x-forwarded-for", 15):
        return HK_XFF
    if n == 12 and ieq(name, b"x-request-id", 12):
        return HK_REQUEST_ID
    return HK_OTHER


cdef bint valid_host(const unsigned char *p, Py_ssize_t n) noexcept:
    # Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2-3.2.3), one pass over a
    # table. uri-host is a reg-name (unreserved / pct-encoded / sub-delims; an IPv4 address
    # is one too) or an IP-literal "[" ... "]" checked for IPv6 characters only (HEXDIG ":"
    # ".", two ':' at least; no IPvFuture, no zone id). port is 1 to 5 digits, at most 65535.
    # Routing and the upstream both read Host: a space, '/', '@', '?', '#', a second ':' or
    # an odd port lets two parsers see two different hosts (or paths), so all are refused.
    # An empty host is refused: the proxy routes by Host, an "http" URI with an empty host is
    # invalid and MUST be rejected (RFC 9110 4.2.1); nginx answers it with 400 too, as does
    # Envoy's dynamic forward proxy (llhttp does not look at Host at all). An empty port ("a:") is refused although the
    # ABNF allows it (port = *DIGIT; RFC 3986 3.2.3 says to omit the ':'): the router strips
    # ":port" and would route "a:" as "a", while the upstream gets "a:" unchanged.
    cdef Py_ssize_t i = 0, colons = 0, port_start
    cdef int port = 0
    cdef uint8_t k
    if n == 0:
        return False
    if p[0] == 91:                                   # '[': IP-literal
        i = 1
        while i < n and HOSTCH[p[i]] & H_LIT:
            colons += p[i] == 58
            i += 1
        if i >= n or p[i] != 93 or colons < 2:       # ']'
            return False
        i += 1
    else:
        while i < n:
            k = HOSTCH[p[i]]
            if k & H_REG:
                i += 1
            elif p[i] == 37:                         # '%' HEXDIG HEXDIG
                if i + 2 >= n or not (HOSTCH[p[i + 1]] & HOSTCH[p[i + 2]] & H_HEX):
                    return False
                i += 3
            else:
                break
        if i == 0:
            return False                             # empty host (":80")
    if i == n:
        return True
    if p[i] != 58:                                   # ':'
        return False
    port_start = i + 1
    if n - port_start < 1 or n - port_start > 5:
        return False
    for i in range(port_start, n):
        if not (48 <= p[i] <= 57):
            return False
        port = port * 10 + (p[i] - 48)
    return port <= 65535


cdef inline bint is_hop_by_hop(int kind) noexcept:
    return (kind == HK_CONNECTION or kind == HK_KEEP_ALIVE or kind == HK_TE
            or kind == HK_TRAILER or kind == HK_UPGRADE or kind == HK_PROXY
            or kind == HK_TRANSFER_ENCODING)


# ------------------------------------------------------------------------------ Head

@cython.freelist(64)
cdef class Head:
    def __cinit__(self):
        self.fields = NULL
        self.nfields = 0
        self.host_idx = -1
        self.request_id_idx = -1
        self.te_idx = -1
        self.content_length = -1

    def __dealloc__(self):
        if self.fields is not NULL:
            free(self.fields)
            self.fields = NULL

    cdef bytes header_value(self, const char *lname, Py_ssize_t lname_len):
        cdef int i
        cdef const unsigned char *raw = <const unsigned char *>PyBytes_AS_STRING(self.raw)
        for i in range(self.nfields):
            if (self.fields[i].name_len == lname_len
                    and ieq(raw + self.fields[i].name_off, lname, lname_len)):
                return PyBytes_FromStringAndSize(<const char *>raw + self.fields[i].value_off,
                                                 self.fields[i].value_len)
        return None

    cdef bint has_header(self, const char *lname, Py_ssize_t lname_len):
        cdef int i
        cdef const unsigned char *raw = <const unsigned char *>PyBytes_AS_STRING(self.raw)
        for i in range(self.nfields):
            if (self.fields[i].name_len == lname_len
                    and ieq(raw + self.fields[i].name_off, lname, lname_len)):
                return True
        return False

    cdef bytes method(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.raw) + self.method_off,
                                         self.method_len)

    cdef bytes path(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.raw) + self.target_off,
                                         self.path_len)

    cdef bytes host(self):
        if self.host_idx < 0:
            return b""
        cdef HeaderField *f = &self.fields[self.host_idx]
        cdef bytes v = PyBytes_FromStringAndSize(PyBytes_AS_STRING(self.raw) + f.value_off,
                                                 f.value_len)
        return v.lower()

    # -- Python view, for tests and tools --
    def as_dict(self):
        cdef int i
        cdef HeaderField *f
        raw = self.raw
        headers = []
        for i in range(self.nfields):
            f = &self.fields[i]
            headers.append((raw[f.name_off:f.name_off + f.name_len],
                            raw[f.value_off:f.value_off + f.value_len]))
        d = {"minor": self.minor, "headers": headers, "body_kind": self.body_kind,
             "content_length": self.content_length, "conn_close": self.conn_close,
             "conn_keep_alive": self.conn_keep_alive,
             "expect_continue": self.expect_continue, "has_upgrade": self.has_upgrade}
        if self.is_request:
            d["method"] = raw[self.method_off:self.method_off + self.method_len]
            d["target"] = raw[self.target_off:self.target_off + self.target_len]
            d["path"] = raw[self.target_off:self.target_off + self.path_len]
        else:
            d["status"] = self.status
            d["reason"] = raw[self.reason_off:self.reason_off + self.reason_len]
        return d


# ------------------------------------------------------------------------ HeadParser

cdef class HeadParser:
    def __cinit__(self, bint is_request, int max_head_bytes=65536, int max_headers=100):
        self.is_request = is_request
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.scanned = 0
        self.error_reason = NULL
        self.head = None
        self.request_was_head = False

    cdef void reset(self):
        self.scanned = 0
        self.error_reason = NULL
        self.head = None        # taken by the caller: an idle connection keeps no old head

    cdef Py_ssize_t feed(self, const unsigned char *p, Py_ssize_t n) except -3:
        # Find the blank line ending the head, line by line from where the last call
        # stopped; every line must end in CRLF (a bare LF is an error at once).
        cdef Py_ssize_t i = self.scanned, line_start, lf, lines = 0, start = 0
        cdef Py_ssize_t limit = n if n < self.max_head_bytes else self.max_head_bytes
        cdef const unsigned char *hit
        # skip empty lines before a request line (RFC 9112 2.2), but only a few
        while self.is_request and start + 1 < n and p[start] == 13 and p[start + 1] == 10:
            start += 2
            if start > 8:
                return self._fail(PARSE_ERROR, b"too many empty lines before request")
        if i < start:
            i = start
        line_start = i
        # never look past max_head_bytes, so the outcome can't depend on how reads split
        while i < limit:
            hit = <const unsigned char *>memchr(p + i, 10, limit - i)
            if hit is NULL:
                break
            lf = hit - p
            if lf == 0 or p[lf - 1] != 13:
                return self._fail(PARSE_ERROR, b"bare LF in head")
            lines += 1
            if lf - line_start == 1 and line_start > start:
                # empty line: end of head
                if lf + 1 > self.max_head_bytes:
                    return self._fail(PARSE_TOO_LARGE, b"head too large")
                return self._parse(p + start, lf + 1 - start, start)
            line_start = lf + 1
            i = lf + 1
        self.scanned = line_start          # resume at the start of the unfinished line
        if n >= self.max_head_bytes:
            return self._fail(PARSE_TOO_LARGE, b"head too large")
        return PARSE_INCOMPLETE

    cdef Py_ssize_t _fail(self, Py_ssize_t code, const char *reason):
        self.error_reason = reason
        return code

    cdef Py_ssize_t _parse(self, const unsigned char *p, Py_ssize_t n, Py_ssize_t skipped) except -3:
        # p[0:n] is a whole head ending in CRLF CRLF. Returns n + skipped, or an error.
        cdef Head h = Head.__new__(Head)
        cdef Py_ssize_t i, le, nlines = 0, ls
        cdef int rc
        h.raw = PyBytes_FromStringAndSize(<const char *>p, n)
        h.is_request = self.is_request
        p = <const unsigned char *>PyBytes_AS_STRING(h.raw)
        # count header lines to size the field table exactly
        for i in range(n):
            if p[i] == 10:
                nlines += 1
        nlines -= 2                            # start line and the blank line
        if nlines > self.max_headers:
            return self._fail(PARSE_TOO_LARGE, b"too many headers")
        if nlines > 0:
            h.fields = <HeaderField *>malloc(nlines * sizeof(HeaderField))
            if h.fields is NULL:
                raise MemoryError()
        # start line
        le = <const unsigned char *>memchr(p, 13, n) - p
        if p[le + 1] != 10:
            return self._fail(PARSE_ERROR, b"bare CR in start line")
        if self.is_request:
            rc = self._request_line(h, p, le)
        else:
            rc = self._status_line(h, p, le)
        if rc < 0:
            return rc
        ls = le + 2
        while True:
            le = <const unsigned char *>memchr(p + ls, 13, n - ls) - p
            if p[le + 1] != 10:
                return self._fail(PARSE_ERROR, b"bare CR in header")
            if le == ls:
                if le + 2 != n:
                    return self._fail(PARSE_ERROR, b"bad blank line")
                break                          # the blank line
            rc = self._field(h, p, ls, le)
            if rc < 0:
                return rc
            ls = le + 2
        rc = self._semantics(h, p)
        if rc < 0:
            return rc
        self.head = h
        return n + skipped

    cdef int _request_line(self, Head h, const unsigned char *p, Py_ssize_t le) except -3:
        cdef Py_ssize_t i = 0
        while i < le and TCHAR[p[i]]:
            i += 1
        if i == 0 or i >= le or p[i] != 32:
            return <int>self._fail(PARSE_ERROR, b"bad method")
        h.method_off = 0
        h.method_len = <int>i
        h.is_head_method = (i == 4 and memcmp(p, b"HEAD", 4) == 0)
        i += 1
        if le - i > 7 and ieq(p + i, b"http://", 7):
            # absolute-form: route and forward the origin-form path; Host must agree
            i += 7
            while i < le and p[i] != 47 and TARGET[p[i]]:   # to the first '/'
                i += 1
            if i >= le or p[i] != 47 or i == h.method_len + 8:
                return <int>self._fail(PARSE_ERROR, b"bad request target")
        elif p[i] != 47 and not (p[i] == 42 and p[i + 1] == 32):
            # neither origin-form ('/'), absolute-form nor a lone '*': "GET admin" or
            # "GET https://x/admin" would slip past path routes, the upstream may not agree
            return <int>self._fail(PARSE_ERROR, b"bad request target")
        elif p[i] == 42 and not (i == 8 and memcmp(p, b"OPTIONS", 7) == 0):
            # asterisk-form is for OPTIONS only (RFC 9112 3.2.4); "GET *" names no resource
            return <int>self._fail(PARSE_ERROR, b"bad request target")
        h.target_off = <int>i
        h.path_len = -1
        while i < le and TARGET[p[i]]:
            if p[i] == 63 and h.path_len < 0:          # '?'
                h.path_len = <int>(i - h.target_off)
            i += 1
        h.target_len = <int>(i - h.target_off)
        if h.path_len < 0:
            h.path_len = h.target_len
        if h.target_len == 0 or i >= le or p[i] != 32:
            return <int>self._fail(PARSE_ERROR, b"bad request target")
        i += 1
        if le - i != 8 or memcmp(p + i, b"HTTP/1.", 7) != 0 or p[i + 7] not in (48, 49):
            return <int>self._fail(PARSE_ERROR, b"bad http version")
        h.minor = p[i + 7] - 48
        return 0

    cdef int _status_line(self, Head h, const unsigned char *p, Py_ssize_t le) except -3:
        cdef Py_ssize_t i
        if le < 12 or memcmp(p, b"HTTP/1.", 7) != 0 or p[7] not in (48, 49) or p[8] != 32:
            return <int>self._fail(PARSE_ERROR, b"bad status line")
        h.minor = p[7] - 48
        for i in range(9, 12):
            if not (48 <= p[i] <= 57):
                return <int>self._fail(PARSE_ERROR, b"bad status code")
        h.status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
        if h.status < 100:
            return <int>self._fail(PARSE_ERROR, b"bad status code")
        h.reason_off = 12
        h.reason_len = 0
        if le > 12:
            if p[12] != 32:
                return <int>self._fail(PARSE_ERROR, b"bad status line")
            h.reason_off = 13
            h.reason_len = <int>(le - 13)
            for i in range(13, le):
                if not VCHAR[p[i]]:
                    return <int>self._fail(PARSE_ERROR, b"bad reason phrase")
        return 0

    cdef int _field(self, Head h, const unsigned char *p, Py_ssize_t ls, Py_ssize_t le) except -3:
        cdef Py_ssize_t i = ls, vs, ve
        cdef HeaderField *f
        if p[i] == 32 or p[i] == 9:
            return <int>self._fail(PARSE_ERROR, b"obsolete line folding")
        while i < le and TCHAR[p[i]]:
            i += 1
        if i == ls or i >= le or p[i] != 58:            # ':'
            return <int>self._fail(PARSE_ERROR, b"bad header name")
        f = &h.fields[h.nfields]
        f.name_off = <int>ls
        f.name_len = <int>(i - ls)
        i += 1
        while i < le and (p[i] == 32 or p[i] == 9):
            i += 1
        vs = i
        ve = le
        while ve > vs and (p[ve - 1] == 32 or p[ve - 1] == 9):
            ve -= 1
        for i in range(vs, ve):
            if not VCHAR[p[i]]:
                return <int>self._fail(PARSE_ERROR, b"bad header value")
        f.value_off = <int>vs
        f.value_len = <int>(ve - vs)
        f.kind = <uint8_t>classify(p + ls, f.name_len)
        f.drop = 1 if is_hop_by_hop(f.kind) else 0
        h.nfields += 1
        return 0

    cdef int _semantics(self, Head h, const unsigned char *p) except -3:
        cdef int i, j, ncl = 0, nte = 0, nhost = 0
        cdef int64_t cl = -1, v
        cdef HeaderField *f
        cdef bint chunked = False, te_other = False
        cdef Py_ssize_t a, b, e
        for i in range(h.nfields):
            f = &h.fields[i]
            if f.kind == HK_CONTENT_LENGTH:
                if f.value_len == 0 or f.value_len > 18:
                    return <int>self._fail(PARSE_ERROR, b"bad content-length")
                v = 0
                for j in range(f.value_len):
                    if not (48 <= p[f.value_off + j] <= 57):
                        return <int>self._fail(PARSE_ERROR, b"bad content-length")
                    v = v * 10 + (p[f.value_off + j] - 48)
                if ncl and v != cl:
                    return <int>self._fail(PARSE_ERROR, b"conflicting content-length")
                cl = v
                ncl += 1
            elif f.kind == HK_TRANSFER_ENCODING:
                nte += 1
                h.te_idx = i
                # the last coding decides; anything but a final "chunked" is not framing
                e = f.value_off + f.value_len
                a = e
                while a > f.value_off and p[a - 1] != 44:     # ','
                    a -= 1
                while a < e and (p[a] == 32 or p[a] == 9):
                    a += 1
                if e - a == 7 and ieq(p + a, b"chunked", 7):
                    chunked = True
                    if a != f.value_off:
                        te_other = True                     # "gzip, chunked"
                else:
                    chunked = False
                    te_other = True
            elif f.kind == HK_HOST:
                nhost += 1
                h.host_idx = i
                if self.is_request and not valid_host(p + f.value_off, f.value_len):
                    return <int>self._fail(PARSE_ERROR, b"bad host")
            elif f.kind == HK_CONNECTION:
                self._connection_tokens(h, p, f)
            elif f.kind == HK_EXPECT:
                if f.value_len == 12 and ieq(p + f.value_off, b"100-continue", 12):
                    h.expect_continue = True
            elif f.kind == HK_XFF:
                h.has_xff = True
            elif f.kind == HK_REQUEST_ID:
                h.request_id_idx = i
            elif f.kind == HK_UPGRADE:
                h.has_upgrade = True
        if h.minor == 0 and not h.conn_keep_alive:
            h.conn_close = True
        if self.is_request:
            if nte:
                if ncl:
                    return <int>self._fail(PARSE_ERROR, b"both content-length and transfer-encoding")
                if nte > 1 or te_other or not chunked:
                    return <int>self._fail(PARSE_ERROR, b"unsupported transfer-encoding")
                if h.minor == 0:
                    return <int>self._fail(PARSE_ERROR, b"transfer-encoding in HTTP/1.0")
                h.body_kind = BODY_CHUNKED
            elif ncl:
                h.content_length = cl
                h.body_kind = BODY_LENGTH if cl > 0 else BODY_NONE
            else:
                h.body_kind = BODY_NONE
            if h.minor == 1 and nhost != 1:
                return <int>self._fail(PARSE_ERROR, b"missing host" if nhost == 0 else b"duplicate host")
            if nhost > 1:
                return <int>self._fail(PARSE_ERROR, b"duplicate host")
            if h.target_off != h.method_len + 1:
                # absolute-form: routing uses Host, so it must name the target's authority
                a = h.method_len + 8                        # after "METHOD http://"
                f = &h.fields[h.host_idx] if nhost else NULL
                if (f is NULL or f.value_len != h.target_off - a
                        or strncasecmp(<const char *>p + a, <const char *>p + f.value_off,
                                       f.value_len) != 0):
                    return <int>self._fail(PARSE_ERROR, b"host does not match request target")
        else:
            if nte and ncl:
                return <int>self._fail(PARSE_ERROR, b"both content-length and transfer-encoding")
            if nte > 1:
                return <int>self._fail(PARSE_ERROR, b"repeated transfer-encoding")
            h.te_codings = te_other
            if h.status < 200 or h.status == 204 or h.status == 304 or self.request_was_head:
                h.body_kind = BODY_NONE
                if ncl:
                    h.content_length = cl
            elif nte:
                h.body_kind = BODY_CHUNKED if chunked else BODY_CLOSE
            elif ncl:
                h.content_length = cl
                h.body_kind = BODY_LENGTH if cl > 0 else BODY_NONE
            else:
                h.body_kind = BODY_CLOSE
        return 0

    cdef void _connection_tokens(self, Head h, const unsigned char *p, HeaderField *f):
        cdef Py_ssize_t a = f.value_off, e = f.value_off + f.value_len, b, t
        cdef int i
        cdef HeaderField *g
        while a < e:
            while a < e and (p[a] == 32 or p[a] == 9 or p[a] == 44):
                a += 1
            b = a
            while b < e and p[b] != 44:
                b += 1
            t = b
            while t > a and (p[t - 1] == 32 or p[t - 1] == 9):
                t -= 1
            if t > a:
                if t - a == 5 and ieq(p + a, b"close", 5):
                    h.conn_close = True
                elif t - a == 10 and ieq(p + a, b"keep-alive", 10):
                    h.conn_keep_alive = True
                else:
                    # a header named by Connection is hop-by-hop (never Host or framing)
                    for i in range(h.nfields):
                        g = &h.fields[i]
                        if (g.name_len == t - a and t - a <= 255 and g.kind != HK_HOST
                                and g.kind != HK_CONTENT_LENGTH
                                and ieq(p + g.name_off, <const char *>_lower(p + a, t - a), t - a)):
                            g.drop = 1
            a = b

    # -- Python entry point, for tests and tools --
    def parse(self, data):
        """Parse one head from data. Returns (consumed, dict) or (0, None) if incomplete;
        raises ValueError(reason, code) on errors."""
        cdef const unsigned char[:] mv = data
        cdef Py_ssize_t r
        if mv.shape[0] == 0:
            return 0, None
        r = self.feed(&mv[0], mv.shape[0])
        if r == PARSE_INCOMPLETE:
            return 0, None
        if r < 0:
            reason = self.error_reason.decode()
            self.reset()
            raise ValueError(reason, "too_large" if r == PARSE_TOO_LARGE else "bad")
        h = self.head
        self.reset()
        self.head = h           # (Python callers read it after: py_build_*_head)
        return r, h.as_dict()

    property expect_head_response:
        def __set__(self, value):
            self.request_was_head = bool(value)


cdef char _lowbuf[256]

cdef const char *_lower(const unsigned char *s, Py_ssize_t n) noexcept:
    # lower-case a short token into a static scratch buffer (single-threaded use)
    cdef Py_ssize_t i
    if n > 255:
        n = 255
    for i in range(n):
        _lowbuf[i] = <char>LOWER[s[i]]
    return _lowbuf


# -------------------------------------------------------------------- ChunkedFramer

cdef inline int hexval(unsigned char c) noexcept:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef class ChunkedFramer:
    def __cinit__(self, int max_line_bytes=4096, int max_trailer_bytes=65536):
        self.max_line_bytes = max_line_bytes
        self.max_trailer_bytes = max_trailer_bytes
        self.reset()

    cdef void reset(self):
        self.state = CH_SIZE
        self.remaining = 0
        self.size_digits = 0
        self.line_bytes = 0
        self.body_bytes = 0
        self.trailer_bytes = 0
        self.error_reason = NULL

    cdef Py_ssize_t feed(self, const unsigned char *p, Py_ssize_t n,
                         Py_ssize_t *data_off, Py_ssize_t *data_len):
        cdef Py_ssize_t i = 0, take
        cdef unsigned char c
        cdef int hv, st
        data_len[0] = 0
        while i < n:
            st = self.state
            if st == CH_DATA:
                take = n - i
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                data_off[0] = i
                data_len[0] = take
                self.remaining -= take
                self.body_bytes += take
                i += take
                if self.remaining == 0:
                    self.state = CH_DATA_CR
                return i
            c = p[i]
            i += 1
            if st == CH_SIZE:
                hv = hexval(c)
                if hv >= 0:
                    if self.size_digits >= 15:
                        return self._error(i, b"chunk size too large")
                    self.remaining = self.remaining * 16 + hv
                    self.size_digits += 1
                elif self.size_digits == 0:
                    return self._error(i, b"bad chunk size")
                elif c == 13:
                    self.state = CH_SIZE_LF
                elif c == 59:                        # ';': no BWS (llhttp rejects it too)
                    self.state = CH_EXT
                    self.line_bytes = self.size_digits + 1
                else:
                    return self._error(i, b"bad chunk size")
            elif st == CH_EXT:
                if c == 13:
                    self.state = CH_SIZE_LF
                elif not VCHAR[c]:
                    return self._error(i, b"bad chunk extension")
                else:
                    self.line_bytes += 1
                    if self.line_bytes > self.max_line_bytes:
                        return self._error(i, b"chunk extension too long")
            elif st == CH_SIZE_LF:
                if c != 10:
                    return self._error(i, b"bad chunk size line ending")
                self.size_digits = 0
                self.line_bytes = 0
                if self.remaining == 0:
                    self.state = CH_TRAILER_START
                else:
                    self.state = CH_DATA
            elif st == CH_DATA_CR:
                if c != 13:
                    return self._error(i, b"chunk data longer than its size")
                self.state = CH_DATA_LF
            elif st == CH_DATA_LF:
                if c != 10:
                    return self._error(i, b"bad chunk data ending")
                self.state = CH_SIZE
            elif st == CH_TRAILER_START:
                if c == 13:
                    self.state = CH_FINAL_LF
                elif TCHAR[c]:
                    self.state = CH_TRAILER_NAME
                    self.trailer_bytes += 1
                else:
                    return self._error(i, b"bad trailer")
            elif st == CH_TRAILER_NAME:
                self.trailer_bytes += 1
                if self.trailer_bytes > self.max_trailer_bytes:
                    return self._error(i, b"trailers too large")
                if c == 58:                         # ':'
                    self.state = CH_TRAILER
                elif not TCHAR[c]:
                    return self._error(i, b"bad trailer name")
            elif st == CH_TRAILER:
                self.trailer_bytes += 1
                if self.trailer_bytes > self.max_trailer_bytes:
                    return self._error(i, b"trailers too large")
                if c == 13:
                    self.state = CH_TRAILER_LF
                elif not VCHAR[c]:
                    return self._error(i, b"bad trailer")
            elif st == CH_TRAILER_LF:
                if c != 10:
                    return self._error(i, b"bad trailer line ending")
                self.state = CH_TRAILER_START
            elif st == CH_FINAL_LF:
                if c != 10:
                    return self._error(i, b"bad final line ending")
                self.state = CH_DONE
                return i
            else:
                return i - 1                       # DONE or ERROR: consume nothing more
        return i

    cdef Py_ssize_t _error(self, Py_ssize_t i, const char *reason):
        self.state = CH_ERROR
        self.error_reason = reason
        return i

    # -- Python entry point, for tests --
    def py_feed(self, data):
        """Feed bytes; returns (consumed, [data pieces], done). Raises ValueError on errors."""
        cdef const unsigned char[:] mv = data
        cdef Py_ssize_t n = mv.shape[0], pos = 0, used, off, ln
        pieces = []
        while pos < n and self.state != CH_DONE:
            used = self.feed(&mv[pos], n - pos, &off, &ln)
            if self.state == CH_ERROR:
                raise ValueError(self.error_reason.decode())
            if ln:
                pieces.append(bytes(mv[pos + off:pos + off + ln]))
            pos += used
        return pos, pieces, self.state == CH_DONE


# --------------------------------------------------------------------------- writers

cdef int w_init(Writer *w, Py_ssize_t cap) except -1:
    w.buf = <char *>malloc(cap)
    if w.buf is NULL:
        raise MemoryError()
    w.len = 0
    w.cap = cap
    return 0

cdef int w_put(Writer *w, const char *s, Py_ssize_t n) except -1:
    cdef Py_ssize_t cap
    cdef char *nb
    if w.len + n > w.cap:
        cap = w.cap * 2
        while cap < w.len + n:
            cap *= 2
        nb = <char *>realloc(w.buf, cap)
        if nb is NULL:
            raise MemoryError()
        w.buf = nb
        w.cap = cap
    memcpy(w.buf + w.len, s, n)
    w.len += n
    return 0

cdef inline int w_bytes(Writer *w, bytes b) except -1:
    return w_put(w, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

cdef bytes w_finish(Writer *w):
    cdef bytes out = PyBytes_FromStringAndSize(w.buf, w.len)
    w_free(w)
    return out

cdef void w_free(Writer *w):
    if w.buf is not NULL:
        free(w.buf)
        w.buf = NULL

cdef inline int w_field(Writer *w, const char *raw, HeaderField *f) except -1:
    w_put(w, raw + f.name_off, f.name_len)
    w_put(w, b": ", 2)
    w_put(w, raw + f.value_off, f.value_len)
    return w_put(w, b"\r\n", 2)


cdef bint _named_in(const char *raw, HeaderField *f, tuple names):
    cdef bytes name
    for name in names:
        if (PyBytes_GET_SIZE(name) == f.name_len
                and ieq(<const unsigned char *>raw + f.name_off, PyBytes_AS_STRING(name),
                        f.name_len)):
            return True
    return False


cdef int head_hide_header(Head h, const char *lname, Py_ssize_t lname_len) except -1:
    # The lines go from the raw head too (so nothing reading it, the access log's %REQ()%
    # included, sees them); their field entries stay, empty and dropped, so that indices
    # such as host_idx keep pointing at the same fields.
    cdef int i, n = 0
    cdef Py_ssize_t pos = 0, shift = 0, ls, le
    cdef HeaderField *f
    cdef bytes raw = h.raw
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(raw)
    pieces = []
    for i in range(h.nfields):
        f = &h.fields[i]
        if f.name_len == 0:
            continue
        if f.name_len == lname_len and ieq(p + f.name_off, lname, lname_len):
            ls = f.name_off
            le = raw.find(b"\r\n", f.value_off + f.value_len) + 2
            pieces.append(raw[pos:ls])
            pos = le
            shift += le - ls
            f.drop = 1
            f.name_len = 0
            f.value_len = 0
            f.name_off = f.value_off = 0
            n += 1
        elif shift:
            f.name_off -= <int>shift
            f.value_off -= <int>shift
    if n:
        pieces.append(raw[pos:])
        h.raw = b"".join(pieces)
    return n


cdef int head_append_header(Head h, bytes name, bytes value) except -1:
    # the head ends in CRLF CRLF: the new field goes before the last CRLF, so the offsets of
    # the fields already parsed stay valid
    cdef Py_ssize_t base = PyBytes_GET_SIZE(h.raw) - 2
    cdef HeaderField *f
    fields = <HeaderField *>realloc(h.fields, (h.nfields + 1) * sizeof(HeaderField))
    if fields is NULL:
        raise MemoryError()
    h.fields = fields
    h.raw = h.raw[:base] + name + b": " + value + b"\r\n\r\n"
    f = &h.fields[h.nfields]
    f.name_off = <int>base
    f.name_len = <int>len(name)
    f.value_off = <int>(base + len(name) + 2)
    f.value_len = <int>len(value)
    f.kind = HK_OTHER
    f.drop = 0
    h.nfields += 1
    return 0


cdef bytes build_request_head(Head h, bytes client_ip, bytes request_id,
                              tuple headers_to_add, tuple headers_to_remove,
                              bint strip_expect):
    cdef Writer w
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef HeaderField *f
    cdef int i
    cdef bint first_xff = True
    w_init(&w, PyBytes_GET_SIZE(h.raw) + 256)
    try:
        w_put(&w, raw + h.method_off, h.method_len)
        w_put(&w, b" ", 1)
        w_put(&w, raw + h.target_off, h.target_len)
        if h.host_idx < 0:
            # HTTP/1.0 without Host: as HTTP/1.1 it would be invalid (RFC 9112 3.2), and an
            # empty Host is refused by common servers (nginx): stay HTTP/1.0 (no reuse)
            w_put(&w, b" HTTP/1.0\r\n", 11)
        else:
            w_put(&w, b" HTTP/1.1\r\n", 11)
        for i in range(h.nfields):
            f = &h.fields[i]
            if f.drop or f.kind == HK_XFF or f.kind == HK_XFP:
                continue
            if f.kind == HK_EXPECT and strip_expect:
                continue
            if headers_to_remove and _named_in(raw, f, headers_to_remove):
                continue
            w_field(&w, raw, f)
        w_put(&w, b"x-forwarded-for: ", 17)
        if h.has_xff:
            for i in range(h.nfields):
                f = &h.fields[i]
                if f.kind == HK_XFF and f.value_len:
                    w_put(&w, raw + f.value_off, f.value_len)
                    w_put(&w, b", ", 2)
        w_bytes(&w, client_ip)
        if h.https:
            w_put(&w, b"\r\nx-forwarded-proto: https\r\n", 28)
        else:
            w_put(&w, b"\r\nx-forwarded-proto: http\r\n", 27)
        # absent, or dropped because Connection named it: the upstream still gets an id
        if not has_request_id(h) and request_id is not None:
            w_put(&w, b"x-request-id: ", 14)
            w_bytes(&w, request_id)
            w_put(&w, b"\r\n", 2)
        for name, value in headers_to_add:
            w_bytes(&w, name)
            w_put(&w, b": ", 2)
            w_bytes(&w, value)
            w_put(&w, b"\r\n", 2)
        if h.body_kind == BODY_CHUNKED:
            w_put(&w, b"transfer-encoding: chunked\r\n", 28)
        w_put(&w, b"\r\n", 2)
        return w_finish(&w)
    except BaseException:
        w_free(&w)
        raise


cdef bytes build_response_head(Head h, int te_mode, bint close_client,
                               bint keep_alive_10):
    # te_mode: TE_AS_RECEIVED (chunked out iff chunked in), TE_ADD_CHUNKED (a
    # close-delimited body re-framed as chunked), TE_NONE (de-chunked for an HTTP/1.0 client).
    # Transfer codings other than chunked are kept: the body stays coded as the upstream sent
    # it, so the client must be told.
    cdef Writer w
    cdef const char *raw = PyBytes_AS_STRING(h.raw)
    cdef HeaderField *f
    cdef HeaderField *te
    cdef int i
    cdef char code[4]
    w_init(&w, PyBytes_GET_SIZE(h.raw) + 96)
    try:
        code[0] = <char>(48 + h.status // 100)
        code[1] = <char>(48 + (h.status // 10) % 10)
        code[2] = <char>(48 + h.status % 10)
        code[3] = 32
        w_put(&w, b"HTTP/1.1 ", 9)
        w_put(&w, code, 4)
        w_put(&w, raw + h.reason_off, h.reason_len)
        w_put(&w, b"\r\n", 2)
        for i in range(h.nfields):
            f = &h.fields[i]
            if f.drop:
                continue
            w_field(&w, raw, f)
        if h.status >= 200:
            te = &h.fields[h.te_idx] if h.te_idx >= 0 else NULL
            if h.body_kind == BODY_CHUNKED and te_mode == TE_AS_RECEIVED:
                w_field(&w, raw, te)            # as received: "chunked", "gzip, chunked"
            elif te_mode == TE_ADD_CHUNKED:
                if te is not NULL:              # "gzip" (close-delimited) -> "gzip, chunked"
                    w_put(&w, b"transfer-encoding: ", 19)
                    w_put(&w, raw + te.value_off, te.value_len)
                    w_put(&w, b", chunked\r\n", 11)
                else:
                    w_put(&w, b"transfer-encoding: chunked\r\n", 28)
            elif (h.body_kind == BODY_NONE and te is not NULL and h.status != 204
                    and te_mode != TE_NONE):
                # a HEAD or 304 response: says how a GET's body would have been coded
                w_field(&w, raw, te)
            if close_client:
                w_put(&w, b"connection: close\r\n", 19)
            elif keep_alive_10:
                w_put(&w, b"connection: keep-alive\r\n", 24)
        w_put(&w, b"\r\n", 2)
        return w_finish(&w)
    except BaseException:
        w_free(&w)
        raise


_REASONS = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 404: b"Not Found",
    408: b"Request Timeout", 413: b"Content Too Large", 426: b"Upgrade Required", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def reason_phrase(int status):
    return _REASONS.get(status, b"Unknown")


cdef bytes error_response(int status, bytes reason_code, bytes body, bint close):
    # A response the proxy writes itself: its own errors and direct responses.
    # reason_code (may be None) goes in x-fastmesh-error, the short reason for logs/clients.
    parts = [b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n" % (
        status, _REASONS.get(status, b"Unknown"), len(body))]
    if body:
        parts.append(b"content-type: text/plain\r\n")
    if reason_code is not None:
        parts.append(b"x-fastmesh-error: " + reason_code + b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


# ----------------------------------------------------------------------- request ids

cdef uint64_t _rid_seed = 0
cdef uint64_t _rid_counter = 0
cdef long _rid_pid = -1
cdef const char *HEXDIGITS = b"0123456789abcdef"

cdef inline uint64_t splitmix64(uint64_t *state) noexcept:
    state[0] += <uint64_t>0x9E3779B97F4A7C15
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)

cdef bytes make_request_id():
    # A random-looking UUIDv4 string, unique per process (seeded from os.urandom, reseeded
    # after fork), without a syscall per request.
    global _rid_seed, _rid_pid
    cdef long pid = os.getpid() if _rid_pid < 0 else _rid_pid
    if _rid_pid < 0:
        _rid_seed = int.from_bytes(os.urandom(8), "little")
        _rid_pid = pid
    cdef uint64_t a = splitmix64(&_rid_seed), b = splitmix64(&_rid_seed)
    cdef char out[36]
    cdef int i, j = 0
    cdef unsigned char byte
    cdef unsigned char raw[16]
    for i in range(8):
        raw[i] = <unsigned char>(a >> (8 * i))
        raw[8 + i] = <unsigned char>(b >> (8 * i))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    for i in range(16):
        if i == 4 or i == 6 or i == 8 or i == 10:
            out[j] = 45
            j += 1
        byte = raw[i]
        out[j] = HEXDIGITS[byte >> 4]
        out[j + 1] = HEXDIGITS[byte & 15]
        j += 2
    return PyBytes_FromStringAndSize(out, 36)


cdef bint has_request_id(Head h):
    # The request carries an x-request-id that is forwarded (not named by Connection).
    return h.request_id_idx >= 0 and not h.fields[h.request_id_idx].drop


cdef bytes client_request_id(Head h):
    # That x-request-id's value (call only when has_request_id).
    cdef HeaderField *f = &h.fields[h.request_id_idx]
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(h.raw) + f.value_off, f.value_len)


def reseed_request_ids():
    """Call in a child after fork so two workers never generate the same ids."""
    global _rid_pid
    _rid_pid = -1


def py_make_request_id():
    return make_request_id()


def py_build_request_head(bytes head, bytes client_ip=b"127.0.0.1", bytes request_id=b"rid",
                          tuple add=(), tuple remove=(), bint strip_expect=True):
    """Parse a request head and build the forwarded head (tests)."""
    cdef HeadParser hp = HeadParser(True)
    n, _ = hp.parse(head)
    if not n:
        raise ValueError("incomplete head")
    return build_request_head(hp.head, client_ip, request_id, add, remove, strip_expect)


def py_build_response_head(bytes head, int te_mode=TE_AS_RECEIVED, bint close=False,
                           bint keep_alive_10=False, bint request_was_head=False):
    cdef HeadParser hp = HeadParser(False)
    hp.request_was_head = request_was_head
    n, _ = hp.parse(head)
    if not n:
        raise ValueError("incomplete head")
    return build_response_head(hp.head, te_mode, close, keep_alive_10)


def py_error_response(int status, bytes reason_code, bytes body=b"", bint close=False):
    return error_response(status, reason_code, body, close)
