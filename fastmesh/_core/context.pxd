# What a listener's connections share: its counters, limits and the current routing view.
# The control world swaps route_table / tcp_cluster when a new snapshot is applied; a
# session reads them at the start of each request and keeps what it picked until the end.

from fastmesh._core.stats cimport Counters
from fastmesh._core.router cimport RouteTable
from fastmesh._core.upstream cimport Cluster
from fastmesh._core.filters cimport FaultPolicy, TokenBucket

cdef class ListenerCtx:
    cdef:
        readonly str name
        readonly Counters counters
        public RouteTable route_table     # http1 / bolt
        public Cluster tcp_cluster        # tcp
        public tuple h2_settings          # HTTP/2: (max streams, stream window, connection
                                          # window, HPACK table bytes) it announces
        public object loop
        public set conns                  # live downstream sessions (for sweeps and drain)
        public object access_log          # fastmesh.accesslog.AccessLog, or None (HTTP/1)
        public bint draining              # finish current requests, then close
        # limits (from the config's listener section)
        public int max_head_bytes
        public int max_headers
        public long long max_request_body_bytes   # 0 = unlimited
        public int max_frame_bytes
        public int idle_timeout_ms
        public int request_head_timeout_ms
        public int stream_idle_timeout_ms
        public int high_water_bytes
        public int low_water_bytes
        public int max_in_flight
        public bint accept_http_10        # HTTP/1: False answers HTTP/1.0 requests 426
        public bint accept_h2c            # HTTP/1: the HTTP/2 preface hands the connection
                                          # to the HTTP/2 session (codec: auto)
        # HTTP filters in chain order (FilterKind), None when the listener has none
        public tuple http_filters
        public FaultPolicy fault          # the listener's own configs (routes may replace)
        public TokenBucket ratelimit
        # HTTP/1 over downstream TLS: fastmesh._core.tls.TlsHttpHook (x-forwarded-proto,
        # x-forwarded-client-cert), called on each request head before routing; else None
        public object tls_http
