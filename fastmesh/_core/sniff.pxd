# What a connection is, from its first bytes and its socket: the listener filters.
#
# `sniff` reads the bytes a client sent first and says which protocol they open, as soon as
# that is certain: a TLS ClientHello (its SNI and ALPN), an HTTP/1.x request line, a Bolt
# frame header, or anything else (raw TCP). It never keeps state between calls: the caller
# passes everything received so far, and calls again with more when told SNIFF_MORE.
#
# `original_dst` reads where a connection was going before an iptables REDIRECT sent it
# here (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, both served by conntrack).

cdef enum SniffKind:
    SNIFF_MORE = 0          # not decided yet: wait for more bytes (or the timeout)
    SNIFF_TCP = 1           # none of the below: raw bytes
    SNIFF_HTTP1 = 2         # an HTTP/1.0 or HTTP/1.1 request line
    SNIFF_H2C = 3           # the HTTP/2 connection preface (prior knowledge)
    SNIFF_BOLT = 4          # a Bolt v1/v2 request or heartbeat header
    SNIFF_TLS = 5           # a TLS ClientHello (server_name / alpn filled when present)

cdef enum SniffWhich:       # which inspectors a listener runs (bits)
    INSPECT_HTTP = 1        # Envoy's http_inspector
    INSPECT_TLS = 2         # Envoy's tls_inspector
    INSPECT_BOLT = 4        # fastmesh's own Bolt inspector

cdef enum SniffLimits:
    SNIFF_MAX_HTTP_LINE_BYTES = 8192     # an HTTP request line longer than this: not HTTP
    SNIFF_MAX_CLIENT_HELLO_BYTES = 65536 # a ClientHello longer than this: TLS, no SNI read

cdef class SniffResult:
    cdef:
        readonly int kind               # SniffKind
        readonly str server_name        # TLS SNI (lower-cased), or None
        readonly tuple alpn             # TLS ALPN protocols offered, or ()
        readonly str http_version       # "http/1.0" | "http/1.1" | "h2c" for HTTP

cdef SniffResult sniff_bytes(const unsigned char *p, Py_ssize_t n, int which, bint eof)
cdef tuple original_dst_of(int fd, int family)
