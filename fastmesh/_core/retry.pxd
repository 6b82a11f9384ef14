# A route's retry policy (Envoy's route.v3.RetryPolicy), compiled: which failures are retried,
# how many times, how long each try may take, and how long to wait between tries. Read by the
# HTTP/1 path only when a try has failed; a route without one costs a None check.

from libc.stdint cimport int64_t

cdef enum RetryOn:
    RETRY_5XX = 1                   # any 5xx, and no response at all (connect failure, reset)
    RETRY_GATEWAY_ERROR = 2         # 502, 503, 504, and no response at all
    RETRY_CONNECT_FAILURE = 4       # the connection could not be made (or timed out)
    RETRY_RESET = 8                 # no response: reset, disconnect, per-try timeout
    RETRY_RETRIABLE_4XX = 16        # 409
    RETRY_STATUS_CODES = 32         # retriable_status_codes
    RETRY_REFUSED_STREAM = 64       # HTTP/2 REFUSED_STREAM: never happens over HTTP/1

cdef class RetryPolicy:
    cdef:
        readonly int retry_on               # RetryOn bits
        readonly int num_retries
        readonly int per_try_timeout_ms     # 0: the route's timeout bounds each try
        readonly int backoff_base_ms
        readonly int backoff_max_ms
        readonly bint previous_hosts        # prefer an endpoint not tried yet
        readonly int host_selection_attempts
        readonly frozenset status_codes     # retriable_status_codes
        readonly frozenset bolt_statuses    # Bolt: response statuses retried (6, 7, ...)

    cdef bint retries_status(self, int status)
    cdef bint retries_no_response(self, bint connect_failure)
    cdef int64_t backoff_ms(self, int retry_number)
