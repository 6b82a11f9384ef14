from libc.string cimport memset
from libc.stdint cimport int64_t

from fastmesh._core.clock cimport now_us

LISTENER_SLOTS = (
    "downstream_cx_total", "downstream_cx_active", "downstream_rq_total",
    "downstream_rq_active", "downstream_rsp_1xx", "downstream_rsp_2xx",
    "downstream_rsp_3xx", "downstream_rsp_4xx", "downstream_rsp_5xx",
    "error_bad_request", "error_head_too_large", "error_body_too_large", "error_no_route",
    "error_no_healthy_upstream", "error_connect_failed", "error_upstream_timeout",
    "error_upstream_reset", "error_upstream_protocol", "error_reset_mid_response",
    "error_downstream_reset", "error_head_timeout", "error_busy", "error_bad_frame",
    "error_stream_idle_timeout",
    "heartbeats", "downstream_rx_bytes", "downstream_tx_bytes", "downstream_cx_idle_closed",
    "error_overflow", "fault_aborts_injected", "fault_delays_injected",
    "local_rate_limit_enabled", "local_rate_limit_enforced", "local_rate_limit_rate_limited",
    "local_rate_limit_ok", "downstream_rq_max_duration_reached", "downstream_cx_spliced",
)
CLUSTER_SLOTS = (
    "upstream_rq_total", "upstream_rq_active", "upstream_rq_timeout", "upstream_rq_retry",
    "upstream_rsp_1xx", "upstream_rsp_2xx", "upstream_rsp_3xx", "upstream_rsp_4xx",
    "upstream_rsp_5xx", "upstream_cx_total", "upstream_cx_active",
    "upstream_cx_connect_fail", "upstream_cx_idle_closed", "no_healthy_endpoint",
    "bolt_status_other", "heartbeat_sent", "heartbeat_missed",
    "lb_healthy_panic", "outlier_ejections_enforced_total",
    "outlier_ejections_enforced_consecutive_5xx",
    "outlier_ejections_enforced_consecutive_gateway_failure", "outlier_ejections_overflow",
    "outlier_ejections_active", "upstream_cx_overflow", "upstream_rq_pending_total",
    "upstream_rq_pending_active", "upstream_rq_pending_overflow", "upstream_rq_active_overflow",
    "upstream_rq_retry_overflow", "upstream_rq_shadow", "upstream_rq_shadow_skipped",
    "outlier_ejections_enforced_consecutive_local_origin_failure",
)
# slots that describe the present (the rest only ever count up)
GAUGE_SLOTS = frozenset(("downstream_cx_active", "downstream_rq_active", "upstream_rq_active",
                         "upstream_cx_active", "outlier_ejections_active",
                         "upstream_rq_pending_active"))
assert GAUGE_SLOTS <= set(LISTENER_SLOTS) | set(CLUSTER_SLOTS)
assert len(LISTENER_SLOTS) == LS_SLOTS
assert len(CLUSTER_SLOTS) == CS_SLOTS
assert LS_SLOTS <= 48 and CS_SLOTS <= 48         # Counters.v


def _bounds_us():
    out = [1 << LAT_MIN_SHIFT]
    for msb in range(LAT_MIN_SHIFT, LAT_MAX_SHIFT):
        step = 1 << (msb - LAT_SUB_SHIFT)
        out.extend((1 << msb) + step * (k + 1) for k in range(LAT_SUB))
    return tuple(out)


# upper bounds (exclusive, µs) of the latency buckets but the last (the overflow bucket)
LAT_BOUNDS_US = _bounds_us()
LATENCY_BUCKETS = LAT_BUCKETS
assert len(LAT_BOUNDS_US) == LAT_BUCKETS - 1


def latency_bucket(long long us):
    """The bucket a latency of `us` µs falls in (for tests and the micro-benchmark)."""
    return lat_bucket(us)


cdef class Counters:
    def __cinit__(self, str kind):
        memset(self.v, 0, sizeof(self.v))
        memset(self.lat, 0, sizeof(self.lat))
        self.lat_sum_us = 0
        if kind == "listener":
            self.names = LISTENER_SLOTS
        elif kind == "cluster":
            self.names = CLUSTER_SLOTS
        else:
            raise ValueError(kind)
        self.nslots = len(self.names)

    def to_dict(self):
        return {self.names[i]: self.v[i] for i in range(self.nslots)}

    def histogram(self):
        """The latency histogram: bucket counts (LAT_BOUNDS_US, then overflow) + [sum µs];
        None while nothing was recorded (idle clusters cost nothing to report)."""
        cdef int i
        for i in range(LAT_BUCKETS):
            if self.lat[i]:
                return [self.lat[j] for j in range(LAT_BUCKETS)] + [self.lat_sum_us]
        return None

    def record_latency_us(self, long long us):
        """Record one latency (tests, micro-benchmark; the data world calls record_us)."""
        self.record_us(us)

    def get(self, str name):
        return self.v[self.names.index(name)]

    def add(self, str name, long long n):
        """Control world: adjust one slot by name (not for the data path)."""
        self.v[self.names.index(name)] += n


def bench_record_ns(long long n, bint with_clock=True):
    """Micro-benchmark: the cost of recording n latencies as the proxies do (with_clock:
    the two clock reads a request pays too, its start and its end); ns per record."""
    cdef Counters c = Counters("cluster")
    cdef long long i
    cdef int64_t t0, start, v = 0
    t0 = now_us()
    if with_clock:
        for i in range(n):
            start = now_us()
            c.record_us(now_us() - start + (i & 4095) * 37)
    else:
        for i in range(n):
            v = (i * <long long>40503) & 0xFFFFFF      # spread over every bucket
            c.record_us(v)
    return (now_us() - t0) * 1000.0 / n
