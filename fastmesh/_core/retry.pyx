"""Route retry policies. See retry.pxd."""
from libc.stdint cimport int64_t

from fastmesh._core.fastrand cimport fast_random

RETRY_ON = {"5xx": RETRY_5XX, "gateway-error": RETRY_GATEWAY_ERROR,
            "connect-failure": RETRY_CONNECT_FAILURE, "reset": RETRY_RESET,
            "retriable-4xx": RETRY_RETRIABLE_4XX,
            "retriable-status-codes": RETRY_STATUS_CODES,
            "refused-stream": RETRY_REFUSED_STREAM}


cdef class RetryPolicy:
    def __init__(self, retry_on, int num_retries, int per_try_timeout_ms=0,
                 int backoff_base_ms=25, int backoff_max_ms=250, bint previous_hosts=False,
                 int host_selection_attempts=1, status_codes=(), bolt_statuses=()):
        cdef int bits = 0
        for name in retry_on:
            bits |= RETRY_ON[name]
        self.retry_on = bits
        self.num_retries = num_retries
        self.per_try_timeout_ms = per_try_timeout_ms
        self.backoff_base_ms = backoff_base_ms
        self.backoff_max_ms = backoff_max_ms
        self.previous_hosts = previous_hosts
        self.host_selection_attempts = host_selection_attempts
        self.status_codes = frozenset(status_codes)
        self.bolt_statuses = frozenset(bolt_statuses)

    cdef bint retries_status(self, int status):
        cdef int on = self.retry_on
        if on & RETRY_5XX and status >= 500:
            return True
        if on & RETRY_GATEWAY_ERROR and 502 <= status <= 504:
            return True
        if on & RETRY_RETRIABLE_4XX and status == 409:
            return True
        return bool(on & RETRY_STATUS_CODES) and status in self.status_codes

    cdef bint retries_no_response(self, bint connect_failure):
        cdef int on = self.retry_on
        if on & (RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET):
            return True
        return connect_failure and on & RETRY_CONNECT_FAILURE

    cdef int64_t backoff_ms(self, int retry_number):
        # Envoy's fully jittered exponential back-off: a random wait in
        # [0, min(max, base x (2^n - 1))] before retry n (1, 2, ...)
        cdef int64_t ceiling = <int64_t>self.backoff_base_ms * ((1 << min(retry_number, 20)) - 1)
        if ceiling > self.backoff_max_ms:
            ceiling = self.backoff_max_ms
        if ceiling <= 0:
            return 0
        return fast_random() % (ceiling + 1)

    def py_retries_status(self, int status):
        return self.retries_status(status)
