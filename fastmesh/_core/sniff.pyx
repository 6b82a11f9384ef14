"""Protocol sniffing and the original destination of a redirected connection. See sniff.pxd."""
from libc.string cimport memcmp, memset
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)

cdef extern from "<netinet/in.h>" nogil:
    ctypedef struct sockaddr_storage:
        unsigned short ss_family
    int AF_INET
    int AF_INET6
    int SOL_IP
    int SOL_IPV6
    uint16_t ntohs(uint16_t)

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from *:
    """
    #include <netinet/in.h>
    #ifndef SO_ORIGINAL_DST
    #define SO_ORIGINAL_DST 80           /* linux/netfilter_ipv4.h */
    #endif
    #ifndef IP6T_SO_ORIGINAL_DST
    #define IP6T_SO_ORIGINAL_DST 80      /* linux/netfilter_ipv6/ip6_tables.h */
    #endif
    static inline unsigned short fm_sin_port(const void *sa) {
        return ((const struct sockaddr_in *)sa)->sin_port; }
    static inline const void *fm_sin_addr(const void *sa) {
        return &((const struct sockaddr_in *)sa)->sin_addr; }
    static inline unsigned short fm_sin6_port(const void *sa) {
        return ((const struct sockaddr_in6 *)sa)->sin6_port; }
    static inline const void *fm_sin6_addr(const void *sa) {
        return &((const struct sockaddr_in6 *)sa)->sin6_addr; }
    """
    int SO_ORIGINAL_DST
    int IP6T_SO_ORIGINAL_DST
    unsigned short fm_sin_port(const void *sa)
    const void *fm_sin_addr(const void *sa)
    unsigned short fm_sin6_port(const void *sa)
    const void *fm_sin6_addr(const void *sa)


cdef class SniffResult:
    def __repr__(self):
        return (f"SniffResult({KIND_NAMES[self.kind]}, server_name={self.server_name!r}, "
                f"alpn={self.alpn!r}, http_version={self.http_version!r})")


KIND_NAMES = ("more", "tcp", "http1", "h2c", "bolt", "tls")

cdef SniffResult _result(int kind):
    cdef SniffResult r = SniffResult.__new__(SniffResult)
    r.kind = kind
    r.alpn = ()
    return r


# ------------------------------------------------------------------------------ HTTP/1

# RFC 9110 tchar: what a method token may be made of
cdef bint _is_tchar(unsigned char c) noexcept:
    if c >= b'0' and c <= b'9' or c >= b'A' and c <= b'Z' or c >= b'a' and c <= b'z':
        return True
    return c in b"!#$%&'*+-.^_`|~"

cdef const char *H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
cdef Py_ssize_t H2_PREFACE_LEN = 24


cdef int _sniff_http(const unsigned char *p, Py_ssize_t n, bint eof, SniffResult r) except -1:
    # An HTTP/1 request line: METHOD SP target SP HTTP/1.x CRLF. Returns SNIFF_HTTP1 / SNIFF_H2C / SNIFF_TCP / SNIFF_MORE; the
    # version goes in r.http_version.
    cdef Py_ssize_t i = 0, m, rest
    cdef unsigned char c
    cdef int more = SNIFF_TCP if eof else SNIFF_MORE
    m = n if n < H2_PREFACE_LEN else H2_PREFACE_LEN
    if memcmp(p, H2_PREFACE, m) == 0:
        if n >= H2_PREFACE_LEN:
            r.http_version = "h2c"
            return SNIFF_H2C
        return more
    # method: an upper-case letter first (every registered method has one), then tchars
    if not (p[0] >= b'A' and p[0] <= b'Z'):
        return SNIFF_TCP
    while i < n and p[i] != b' ':
        if not _is_tchar(p[i]) or i >= 32:
            return SNIFF_TCP
        i += 1
    if i == n:
        return more
    i += 1
    # request target: visible ASCII, at least one byte
    m = i
    while i < n and p[i] != b' ':
        c = p[i]
        if c <= 0x20 or c == 0x7f:
            return SNIFF_TCP
        i += 1
        if i > SNIFF_MAX_HTTP_LINE_BYTES:
            return SNIFF_TCP
    if i == n:
        return more
    if i == m:
        return SNIFF_TCP
    i += 1
    # version: exactly HTTP/1.0 or HTTP/1.1, then CRLF or LF
    rest = n - i
    if memcmp(p + i, b"HTTP/1.", rest if rest < 7 else 7) != 0:
        return SNIFF_TCP
    if rest < 8:
        return more
    c = p[i + 7]
    if c != b'0' and c != b'1':
        return SNIFF_TCP
    if rest < 9:
        return more
    if p[i + 8] != b'\r':              # CRLF only, as llhttp and fastmesh's codec
        return SNIFF_TCP
    if rest < 10:
        return more
    if p[i + 9] != b'\n':
        return SNIFF_TCP
    r.http_version = "http/1.0" if c == b'0' else "http/1.1"
    return SNIFF_HTTP1


# ------------------------------------------------------------------------------ Bolt

cdef int _sniff_bolt(const unsigned char *p, Py_ssize_t n, bint eof) noexcept:
    # A Bolt frame a client opens with: a request, a oneway or a heartbeat. v1: proto 1,
    # type, cmdcode:2; v2: proto 2, ver1 (1|2), type, cmdcode:2.
    cdef Py_ssize_t t
    if p[0] == 1:
        t = 1
    elif p[0] == 2:
        if n < 2:
            return SNIFF_TCP if eof else SNIFF_MORE
        if p[1] != 1 and p[1] != 2:
            return SNIFF_TCP
        t = 2
    else:
        return SNIFF_TCP
    if n < t + 3:
        if n > t and p[t] != 1 and p[t] != 2:
            return SNIFF_TCP
        return SNIFF_TCP if eof else SNIFF_MORE
    if p[t] != 1 and p[t] != 2:                       # request or oneway
        return SNIFF_TCP
    if p[t + 1] != 0 or (p[t + 2] != 0 and p[t + 2] != 1):   # heartbeat or request
        return SNIFF_TCP
    return SNIFF_BOLT


# ------------------------------------------------------------------------------ TLS

cdef inline uint32_t _u16(const unsigned char *p) noexcept:
    return (<uint32_t>p[0] << 8) | p[1]

cdef inline uint32_t _u24(const unsigned char *p) noexcept:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]


cdef int _sniff_tls(const unsigned char *p, Py_ssize_t n, bint eof, SniffResult r) except -1:
    # A TLS record of type handshake (22) with a 3.x version, holding a ClientHello. The
    # ClientHello may span records; it is gathered (at most SNIFF_MAX_CLIENT_HELLO_BYTES)
    # and its server_name and ALPN extensions read. Anything malformed after the record
    # header reads as TLS without SNI or ALPN.
    if p[0] != 22:
        return SNIFF_TCP
    if n < 3:
        if n == 2 and p[1] != 3:
            return SNIFF_TCP
        return SNIFF_TCP if eof else SNIFF_MORE
    if p[1] != 3 or p[2] > 4:
        return SNIFF_TCP
    # gather the handshake bytes from consecutive handshake records
    cdef bytearray hs = bytearray()
    cdef Py_ssize_t off = 0, rec_len, need = -1, end
    while off + 5 <= n:
        if p[off] != 22 or p[off + 1] != 3:
            return _tls_done(r, None)
        rec_len = _u16(p + off + 3)
        if rec_len == 0 or rec_len > 16384 + 2048:
            return _tls_done(r, None)
        end = off + 5 + rec_len if off + 5 + rec_len <= n else n
        hs += p[off + 5:end]
        off = end
        if need < 0 and len(hs) >= 4:
            if hs[0] != 1:                      # not a ClientHello
                return _tls_done(r, None)
            need = 4 + _u24(<const unsigned char *>(<char *>hs) + 1)
            if need > SNIFF_MAX_CLIENT_HELLO_BYTES:
                return _tls_done(r, None)
        if need >= 0 and len(hs) >= need:
            return _tls_done(r, bytes(hs[:need]))
    if eof or n >= SNIFF_MAX_CLIENT_HELLO_BYTES + 1024:
        return _tls_done(r, None)
    return SNIFF_MORE


cdef int _tls_done(SniffResult r, bytes hello) except -1:
    if hello is not None:
        _read_client_hello(r, hello)
    return SNIFF_TLS


cdef void _read_client_hello(SniffResult r, bytes hello) except *:
    # handshake: type(1) length(3) | version(2) random(32) session_id<1> cipher_suites<2>
    # compression_methods<1> extensions<2>: [type(2) length(2) data]
    cdef const unsigned char *p = <const unsigned char *>(<char *>hello)
    cdef Py_ssize_t n = len(hello), i = 4 + 2 + 32, end, ext_end, t, l, j, k, ln
    if i + 1 > n:
        return
    i += 1 + p[i]
    if i + 2 > n:
        return
    i += 2 + _u16(p + i)
    if i + 1 > n:
        return
    i += 1 + p[i]
    if i + 2 > n:
        return
    end = i + 2 + _u16(p + i)
    i += 2
    if end > n:
        return
    alpn = []
    while i + 4 <= end:
        t = _u16(p + i)
        l = _u16(p + i + 2)
        i += 4
        ext_end = i + l
        if ext_end > end:
            return
        if t == 0 and l >= 2:                   # server_name: list<2> of type(1) name<2>
            j = i + 2
            while j + 3 <= ext_end:
                ln = _u16(p + j + 1)
                if j + 3 + ln > ext_end:
                    break
                if p[j] == 0 and ln:
                    try:
                        r.server_name = hello[j + 3:j + 3 + ln].decode("ascii").lower()
                    except UnicodeDecodeError:
                        pass
                    break
                j += 3 + ln
        elif t == 16 and l >= 2:                # ALPN: list<2> of protocol<1>
            j = i + 2
            while j + 1 <= ext_end:
                ln = p[j]
                if ln == 0 or j + 1 + ln > ext_end:
                    break
                alpn.append(hello[j + 1:j + 1 + ln].decode("latin-1"))
                j += 1 + ln
        i = ext_end
    r.alpn = tuple(alpn)


# ------------------------------------------------------------------------------ entry

cdef SniffResult sniff_bytes(const unsigned char *p, Py_ssize_t n, int which, bint eof):
    cdef SniffResult r = _result(SNIFF_MORE)
    cdef int k
    if n == 0:
        r.kind = SNIFF_TCP if eof else SNIFF_MORE
        return r
    if which & INSPECT_TLS and p[0] == 22:
        r.kind = _sniff_tls(p, n, eof, r)
        return r
    if which & INSPECT_BOLT and (p[0] == 1 or p[0] == 2):
        r.kind = _sniff_bolt(p, n, eof)
        return r
    if which & INSPECT_HTTP and (p[0] >= b'A' and p[0] <= b'Z'):
        r.kind = _sniff_http(p, n, eof, r)
        return r
    r.kind = SNIFF_TCP
    return r


def sniff(data, int which=INSPECT_HTTP | INSPECT_TLS | INSPECT_BOLT, bint eof=False):
    """Python entry (tests): what `data`, all a client sent so far, opens."""
    cdef const unsigned char[:] v = memoryview(bytes(data))
    if len(v) == 0:
        return sniff_bytes(NULL, 0, which, eof)
    return sniff_bytes(&v[0], len(v), which, eof)


# --------------------------------------------------------------------- original destination

cdef tuple original_dst_of(int fd, int family):
    """(ip, port) a REDIRECTed connection was addressed to, from conntrack; None when the
    connection was not redirected (or the kernel has no netfilter)."""
    cdef unsigned char sa[128]
    cdef socklen_t sl = sizeof(sa)
    cdef char text[64]
    memset(sa, 0, sizeof(sa))
    if family == AF_INET6 and getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, sa, &sl) == 0:
        if inet_ntop(AF_INET6, fm_sin6_addr(sa), text, sizeof(text)) == NULL:
            return None
        host = (<bytes>text).decode()
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return (host, ntohs(fm_sin6_port(sa)))
    # IPv4 (on a dual-stack IPv6 socket too: an IPv4 client arrives v4-mapped, and
    # conntrack holds its IPv4 original destination)
    sl = sizeof(sa)
    if getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, sa, &sl) != 0:
        return None
    if inet_ntop(AF_INET, fm_sin_addr(sa), text, sizeof(text)) == NULL:
        return None
    return ((<bytes>text).decode(), ntohs(fm_sin_port(sa)))


def original_dst(sock):
    """Python entry: a socket's original destination (ip, port), or None."""
    return original_dst_of(sock.fileno(), sock.family)


INSPECT_ALL = INSPECT_HTTP | INSPECT_TLS | INSPECT_BOLT
HTTP, TLS, BOLT = INSPECT_HTTP, INSPECT_TLS, INSPECT_BOLT
MORE, TCP, HTTP1, H2C, BOLT_KIND, TLS_KIND = (SNIFF_MORE, SNIFF_TCP, SNIFF_HTTP1, SNIFF_H2C,
                                              SNIFF_BOLT, SNIFF_TLS)
