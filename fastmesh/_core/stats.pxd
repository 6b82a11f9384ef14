# Counters in C arrays. Each listener and each cluster owns one Counters object; the data
# world bumps slots by index (`c.v[LS_RQ_TOTAL] += 1`), the control world reads them as a
# dict for /stats. Slot names live in stats.pyx beside the enums' order.

from libc.stdint cimport int64_t

cdef enum:  # ListenerSlot
    LS_CX_TOTAL             # downstream connections accepted
    LS_CX_ACTIVE            # downstream connections open now (gauge)
    LS_RQ_TOTAL             # requests received (HTTP requests, Bolt frames except heartbeats)
    LS_RQ_ACTIVE            # requests in progress (gauge)
    LS_RSP_1XX              # responses sent by class (HTTP) / Bolt statuses folded below
    LS_RSP_2XX
    LS_RSP_3XX
    LS_RSP_4XX
    LS_RSP_5XX
    LS_ERR_BAD_REQUEST      # errors by reason: malformed request (400)
    LS_ERR_HEAD_TOO_LARGE   # 431
    LS_ERR_BODY_TOO_LARGE   # 413
    LS_ERR_NO_ROUTE         # 404 / Bolt status 6
    LS_ERR_NO_HEALTHY_UPSTREAM  # 503 / Bolt status 6
    LS_ERR_CONNECT_FAILED   # 503
    LS_ERR_UPSTREAM_TIMEOUT # 504 / Bolt status 7
    LS_ERR_UPSTREAM_RESET   # 502 before a response / Bolt status 0x10
    LS_ERR_UPSTREAM_PROTOCOL  # 502: upstream sent a malformed response
    LS_ERR_RESET_MID_RESPONSE # upstream died mid-response: client connection closed
    LS_ERR_DOWNSTREAM_RESET   # client went away mid-request
    LS_ERR_HEAD_TIMEOUT     # 408: request head not complete in time
    LS_ERR_BUSY             # Bolt status 4: in-flight limit
    LS_ERR_BAD_FRAME        # Bolt: bad proto, lengths, size: connection closed
    LS_ERR_STREAM_IDLE      # HTTP: an exchange moved no bytes for stream_idle_timeout_ms
    LS_HEARTBEATS           # Bolt heartbeats answered by the proxy
    LS_RX_BYTES             # bytes read from clients
    LS_TX_BYTES             # bytes written to clients (queued)
    LS_CX_IDLE_CLOSED       # connections closed between requests (idle timeout, drain)
    LS_ERR_OVERFLOW         # 503: a cluster's circuit breaker refused the request
    LS_FAULT_ABORTS         # fault filter: requests aborted
    LS_FAULT_DELAYS         # fault filter: requests delayed
    LS_RL_ENABLED           # local rate limit: requests checked (filter_enabled)
    LS_RL_ENFORCED          # ... limited and refused (filter_enforced)
    LS_RL_LIMITED           # ... found no token
    LS_RL_OK                # ... took a token
    LS_RQ_MAX_DURATION      # HTTP/2: a gRPC request's grpc-timeout passed (Envoy's name)
    LS_CX_SPLICED           # TCP: connections whose bulk bytes went through splice(2)
    LS_SLOTS                # number of slots (keep last)

cdef enum:  # ClusterSlot
    CS_RQ_TOTAL             # requests forwarded upstream
    CS_RQ_ACTIVE            # requests in flight upstream (gauge)
    CS_RQ_TIMEOUT           # requests that timed out upstream
    CS_RQ_RETRY             # requests retried on a fresh connection (stale pooled one)
    CS_RSP_1XX              # upstream responses by class
    CS_RSP_2XX
    CS_RSP_3XX
    CS_RSP_4XX
    CS_RSP_5XX
    CS_CX_TOTAL             # upstream connections opened
    CS_CX_ACTIVE            # upstream connections open now (gauge)
    CS_CX_CONNECT_FAIL      # connection attempts that failed or timed out
    CS_CX_IDLE_CLOSED       # pooled connections closed for idleness or by the upstream
    CS_NO_HEALTHY           # picks that found no endpoint
    CS_BOLT_STATUS_OTHER    # Bolt responses with a status not counted below
    CS_HEARTBEAT_SENT       # Bolt heartbeats the proxy sent upstream
    CS_HEARTBEAT_MISSED     # Bolt heartbeats unanswered
    CS_LB_HEALTHY_PANIC     # picks made over all endpoints: too few were healthy
    CS_OD_EJECTIONS         # outlier ejections enforced (all detectors)
    CS_OD_EJECTIONS_5XX     # ... by consecutive 5xx
    CS_OD_EJECTIONS_GATEWAY # ... by consecutive gateway failures (502/503/504, connect, reset)
    CS_OD_EJECTIONS_OVERFLOW  # ejections not made: max_ejection_percent reached
    CS_OD_EJECTIONS_ACTIVE  # endpoints ejected now (gauge)
    CS_CX_OVERFLOW          # a connection was needed beyond max_connections
    CS_RQ_PENDING_TOTAL     # requests that waited for a connection (being made, or freed)
    CS_RQ_PENDING_ACTIVE    # requests waiting for a connection now (gauge)
    CS_RQ_PENDING_OVERFLOW  # requests refused at once (503): max_pending_requests
    CS_RQ_ACTIVE_OVERFLOW   # requests refused at once (503): max_requests
    CS_RQ_RETRY_OVERFLOW    # retries not made: max_retries in flight
    CS_RQ_SHADOW            # copies of requests sent here by a route's mirror policy
    CS_RQ_SHADOW_SKIPPED    # ... not sent: the body was too large to keep
    CS_OD_EJECTIONS_LOCAL   # outlier ejections by consecutive local-origin failures (split)
    CS_SLOTS

# Latency histogram: fixed log-linear buckets over microseconds. Bucket 0 holds < 64 µs;
# then each power of two from 2^6 to 2^23 µs is cut in LAT_SUB equal parts; the last
# bucket holds >= 2^24 µs (16.8 s). Recording is a count-leading-zeros, two shifts and two
# adds: no Python object, no branch beyond the range checks. Bounds: stats.pyx LAT_BOUNDS_US.
cdef enum:
    LAT_MIN_SHIFT = 6           # 64 µs: the first bucket's upper bound
    LAT_MAX_SHIFT = 24          # 16.8 s: beyond it, the overflow bucket
    LAT_SUB_SHIFT = 2
    LAT_SUB = 4                 # linear parts per power of two
    LAT_BUCKETS = 2 + (LAT_MAX_SHIFT - LAT_MIN_SHIFT) * LAT_SUB    # 74

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil

cdef inline int lat_bucket(int64_t us) noexcept nogil:
    cdef int msb
    if us < (1 << LAT_MIN_SHIFT):
        return 0
    if us >= (1 << LAT_MAX_SHIFT):
        return LAT_BUCKETS - 1
    msb = 63 - __builtin_clzll(<unsigned long long>us)
    return 1 + (msb - LAT_MIN_SHIFT) * LAT_SUB + \
        <int>((us >> (msb - LAT_SUB_SHIFT)) & (LAT_SUB - 1))

cdef class Counters:
    cdef:
        int64_t v[48]            # slot values; index by ListenerSlot or ClusterSlot
        tuple names              # slot names for export, in slot order
        int nslots
        int64_t lat[LAT_BUCKETS] # request latency histogram (counts per bucket)
        int64_t lat_sum_us       # sum of the latencies recorded, µs

    cdef inline void inc(self, int slot):
        self.v[slot] += 1

    cdef inline void record_us(self, int64_t us) noexcept:
        # one request's latency (request head received -> response complete)
        if us < 0:
            us = 0
        self.lat[lat_bucket(us)] += 1
        self.lat_sum_us += us

cdef inline int status_class_slot(int status, int base_1xx):
    # slot of the 1xx..5xx counter for an HTTP status, given the slot of the 1xx counter
    if status < 200:
        return base_1xx
    if status >= 500:
        return base_1xx + 4
    return base_1xx + (status // 100) - 1
