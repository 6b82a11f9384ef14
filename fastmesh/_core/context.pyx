"""Per-listener shared state. See context.pxd."""
from fastmesh._core.stats cimport Counters


cdef class ListenerCtx:
    def __init__(self, str name, loop, *, route_table=None, tcp_cluster=None,
                 int max_head_bytes=65536, int max_headers=100,
                 long long max_request_body_bytes=0, int max_frame_bytes=16 << 20,
                 int idle_timeout_ms=60000, int request_head_timeout_ms=10000,
                 int stream_idle_timeout_ms=300000,
                 int high_water_bytes=262144, int low_water_bytes=65536,
                 int max_in_flight=10000, bint accept_http_10=True, Counters counters=None):
        self.name = name
        self.loop = loop
        # a listener's filter chains each have a context; they share the listener's counters
        self.counters = counters if counters is not None else Counters("listener")
        self.route_table = route_table
        self.tcp_cluster = tcp_cluster
        self.conns = set()
        self.access_log = None
        self.draining = False
        self.tls_http = None
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_request_body_bytes = max_request_body_bytes
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_ms = idle_timeout_ms
        self.request_head_timeout_ms = request_head_timeout_ms
        self.stream_idle_timeout_ms = stream_idle_timeout_ms
        self.high_water_bytes = high_water_bytes
        self.low_water_bytes = low_water_bytes
        self.max_in_flight = max_in_flight
        self.accept_http_10 = accept_http_10
