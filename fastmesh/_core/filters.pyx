"""Fault injection and local rate limiting (HTTP). See filters.pxd."""
from libc.stdint cimport int64_t

from fastmesh._core.stats cimport (LS_RL_ENABLED, LS_RL_ENFORCED, LS_RL_LIMITED, LS_RL_OK)


cdef int64_t _header_int(Head h, bytes name, int64_t default):
    cdef bytes v = h.header_value(name, len(name))
    if v is None or not v.isdigit() or len(v) > 9:
        return default
    return int(v)


cdef int _header_share(Head h, bytes name, int default_ppm, int per_unit):
    # a percentage header: its number counts in the configured percentage's denominator
    cdef bytes v = h.header_value(name, len(name))
    if v is None or not v.isdigit() or len(v) > 9:
        return default_ppm
    return <int>min(1000000, int(v) * per_unit)

FAULT = F_FAULT
RATELIMIT = F_RATELIMIT


cdef class FaultPolicy:
    def __init__(self, int abort_status=0, int abort_ppm=0, bint abort_from_header=False,
                 int abort_denominator=10000, int64_t delay_ms=0, int delay_ppm=0,
                 bint delay_from_header=False, int delay_denominator=10000,
                 int max_active=0):
        # *_denominator: what one unit of a percentage header is worth per million
        self.abort_status = abort_status
        self.abort_ppm = abort_ppm
        self.abort_from_header = abort_from_header
        self.abort_denominator = abort_denominator
        self.delay_ms = delay_ms
        self.delay_ppm = delay_ppm
        self.delay_from_header = delay_from_header
        self.delay_denominator = delay_denominator
        self.max_active = max_active
        self.active = 0

    cdef int64_t delay_for(self, Head h):
        cdef int64_t delay_ms = self.delay_ms
        cdef int ppm = self.delay_ppm
        if self.delay_from_header:
            delay_ms = _header_int(h, b"x-envoy-fault-delay-request", delay_ms)
            ppm = _header_share(h, b"x-envoy-fault-delay-request-percentage", ppm,
                                self.delay_denominator)
        return delay_ms if delay_ms > 0 and drawn(ppm) else 0

    cdef int abort_for(self, Head h):
        cdef int status = self.abort_status
        cdef int ppm = self.abort_ppm
        if self.abort_from_header:
            status = <int>_header_int(h, b"x-envoy-fault-abort-request", status)
            if not 200 <= status < 600:
                status = self.abort_status
            ppm = _header_share(h, b"x-envoy-fault-abort-request-percentage", ppm,
                                self.abort_denominator)
        return status if status and drawn(ppm) else 0


cdef class TokenBucket:
    def __init__(self, int64_t max_tokens, int64_t tokens_per_fill, int64_t fill_interval_ms,
                 int enabled_ppm=1000000, int enforced_ppm=1000000, int status=429,
                 bint x_ratelimit_headers=False, bytes limited_headers=b"",
                 int64_t now=0):
        self.max_tokens = max_tokens
        self.tokens_per_fill = tokens_per_fill
        self.fill_interval_ms = fill_interval_ms
        self.enabled_ppm = enabled_ppm
        self.enforced_ppm = enforced_ppm
        self.status = status
        self.x_ratelimit_headers = x_ratelimit_headers
        self.limited_headers = limited_headers
        self.tokens = max_tokens                # a new bucket starts full
        self.last_fill_ms = now

    cdef bint take(self, int64_t now):
        # Whole fills since the last one (tokens_per_fill each, at most max_tokens), then
        # one token if there is one.
        cdef int64_t fills
        if now - self.last_fill_ms >= self.fill_interval_ms:
            fills = (now - self.last_fill_ms) // self.fill_interval_ms
            self.tokens = min(self.max_tokens, self.tokens + fills * self.tokens_per_fill)
            self.last_fill_ms += fills * self.fill_interval_ms
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    cdef bytes headers(self, int64_t now):
        # as Envoy's DRAFT_VERSION_03: the quota, what is left, and the seconds until a
        # token is there again (0 while some are)
        cdef int64_t reset_s = 0
        if self.tokens <= 0:
            reset_s = (self.last_fill_ms + self.fill_interval_ms - now + 999) // 1000
        return (b"x-ratelimit-limit: %d\r\nx-ratelimit-remaining: %d\r\nx-ratelimit-reset: %d\r\n"
                % (self.max_tokens, self.tokens, reset_s))

    cdef bint limits(self, Counters c, int64_t now) except -1:
        cdef bint ok
        self.extra = None
        if not drawn(self.enabled_ppm):
            return False
        c.v[LS_RL_ENABLED] += 1
        ok = self.take(now)
        if self.x_ratelimit_headers:
            self.extra = self.headers(now)
        if ok:
            c.v[LS_RL_OK] += 1
            return False
        if not drawn(self.enforced_ppm):
            return False
        c.v[LS_RL_ENFORCED] += 1
        c.v[LS_RL_LIMITED] += 1
        if self.limited_headers:
            self.extra = self.limited_headers + (self.extra or b"")
        return True

    def py_take(self, int64_t now):
        return self.take(now)

    @property
    def tokens_left(self):
        return self.tokens
