# HTTP filters that run before routing sends a request anywhere: fault injection (Envoy's
# envoy.filters.http.fault) and a local token-bucket rate limit (envoy.filters.http.
# local_ratelimit). A listener lists the ones in its chain (ListenerCtx.http_filters); a
# route may carry its own config for one (Route.fault / Route.ratelimit), replacing the
# listener's for that route. A listener without them costs one None check per request.

from libc.stdint cimport int64_t

from fastmesh._core.fastrand cimport fast_random
from fastmesh._core.http1 cimport Head
from fastmesh._core.stats cimport Counters

cdef enum FilterKind:
    F_FAULT = 1
    F_RATELIMIT = 2

cdef class FaultPolicy:
    cdef:
        readonly int abort_status           # 0: no fixed status
        readonly int abort_ppm              # share of requests aborted, per million
        readonly bint abort_from_header     # x-envoy-fault-abort-request gives the status
        readonly int abort_denominator      # per-million factor of the percentage header
        readonly int64_t delay_ms           # 0: no fixed delay
        readonly int delay_ppm
        readonly bint delay_from_header     # x-envoy-fault-delay-request gives the delay
        readonly int delay_denominator
        readonly int max_active             # faults at once (0: no limit)
        public int active                   # faults in progress now (this worker)

    # the decisions for one request (each draws its share; headers may set them when the
    # policy says so): Envoy's order is the delay, then, after it, the abort
    cdef int64_t delay_for(self, Head h)     # ms to hold the request (0: none)
    cdef int abort_for(self, Head h)         # the status to answer (0: none)

cdef class TokenBucket:
    cdef:
        readonly int64_t max_tokens
        readonly int64_t tokens_per_fill
        readonly int64_t fill_interval_ms
        readonly int enabled_ppm            # filter_enabled: share of requests checked
        readonly int enforced_ppm           # filter_enforced: share of those refused
        readonly int status                 # the answer when limited (429)
        readonly bint x_ratelimit_headers   # x-ratelimit-limit/-remaining/-reset
        readonly bytes limited_headers      # response_headers_to_add, on limited answers
        int64_t tokens
        int64_t last_fill_ms
        bytes extra                         # limits(): the header lines the request's
                                            # answer carries (None: none)

    cdef bint take(self, int64_t now)       # a token was there (and is taken)
    cdef bytes headers(self, int64_t now)   # the x-ratelimit-* lines after a take
    # one request through the filter, counted in the listener's counters: True when it is
    # refused; then `extra` holds the header lines its answer carries (x-ratelimit-*,
    # configured ones), read at once by the caller
    cdef bint limits(self, Counters c, int64_t now) except -1


cdef inline bint drawn(int ppm):
    # True for ppm in a million requests
    return ppm >= 1000000 or (ppm > 0 and <int>(fast_random() % 1000000) < ppm)
