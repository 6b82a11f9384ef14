# Compiled routing: what a request matches, and where it goes. Built once per config
# snapshot by the control world (fastmesh/snapshot.py) from the typed model; immutable after.

from libc.stdint cimport int64_t

from fastmesh._core.http1 cimport Head
from fastmesh._core.upstream cimport Cluster
from fastmesh._core.retry cimport RetryPolicy
from fastmesh._core.filters cimport FaultPolicy, TokenBucket

cdef enum MatchKind:
    M_ANY = 0               # no path condition / present (header)
    M_EXACT                 # equal
    M_PREFIX                # starts with
    M_REGEX                 # Python re, full match
    M_ABSENT                # header must be absent

cdef enum ActionKind:
    A_CLUSTER = 0           # forward to one cluster
    A_WEIGHTED              # forward to a cluster drawn by weight
    A_DIRECT                # answer from the proxy itself

cdef class HeaderMatcher:
    cdef:
        readonly bytes name     # lower-cased header name (Bolt: header key)
        int kind                # MatchKind: M_ANY means "present"
        bytes value             # M_EXACT / M_PREFIX operand
        object regex            # M_REGEX: compiled bytes pattern

    cdef bint matches(self, bytes value)      # value None = header absent
    cdef bint matches_raw(self, const unsigned char *v, Py_ssize_t n, bint present)


cdef class Route:
    cdef:
        readonly str name           # "vhost/index", for logs and config dumps
        int path_kind               # MatchKind
        bytes path                  # M_EXACT / M_PREFIX operand
        object path_regex           # M_REGEX
        tuple headers               # HeaderMatcher, all must match
        readonly int action         # ActionKind
        readonly Cluster cluster    # A_CLUSTER
        tuple weighted              # A_WEIGHTED: Cluster per slot
        int *cum_weights            # A_WEIGHTED: cumulative weights
        int total_weight
        readonly int direct_status  # A_DIRECT
        readonly bytes direct_body
        readonly int timeout_ms     # upstream response timeout; 0 = none
        public int64_t grpc_timeout_max_ms      # -1: grpc-timeout ignored; else it is the
                                                # stream's timeout, capped (0: no cap) ...
        public int64_t grpc_timeout_offset_ms   # ... minus this
        readonly tuple headers_to_add     # ((name, value) bytes pairs)
        readonly tuple headers_to_remove  # (lower-cased name bytes)
        public RetryPolicy retry    # None: a failed try is the answer
        public tuple hash_policy    # ((kind, name bytes, terminal), ...) or None
        public tuple mirrors        # ((Cluster, per_million, host_suffix), ...) or None
        public bint attempt_count_header  # send x-envoy-attempt-count upstream
        public FaultPolicy fault    # this route's fault / rate limit config (replacing the
        public TokenBucket ratelimit    # listener's), or None
    cdef bint match_http(self, Head h)
    cdef Cluster pick_cluster(self)


cdef class VirtualHost:
    cdef:
        readonly str name
        readonly tuple routes       # Route, first match wins


cdef class RouteTable:
    cdef:
        readonly str name
        dict exact                  # bytes domain (may carry :port) -> VirtualHost
        list suffixes               # [(bytes suffix incl. leading '.', VirtualHost)], longest first
        VirtualHost default         # "*" or None
        readonly tuple virtual_hosts
        readonly bint strip_port    # a Host's :port is dropped when the full Host has no match

    cdef VirtualHost select(self, bytes host)
    cdef Route route_http(self, Head h)

