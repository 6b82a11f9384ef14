# Clusters, endpoints and load balancing. The control world (fastmesh/cluster.py) builds a
# Cluster per configured cluster and keeps its endpoint list current (DNS); the data world
# asks it for an endpoint per request. Connection pools hang off each Endpoint and belong to
# the protocol modules (http_proxy: idle keep-alive list; bolt_proxy: multiplexed set).

from libc.stdint cimport int64_t, uint64_t

from fastmesh._core.stats cimport Counters

cdef enum LbPolicy:
    LB_ROUND_ROBIN = 0      # next endpoint in turn
    LB_RANDOM = 1           # uniformly random
    LB_LEAST_REQUEST = 2    # fewer active requests of two random picks (P2C)
    LB_RING_HASH = 3        # consistent hashing on a ring (Envoy's ketama-style ring)
    LB_MAGLEV = 4           # consistent hashing with a Maglev lookup table

cdef class Endpoint:
    cdef:
        readonly str host           # resolved IP literal
        readonly int port
        readonly str origin         # the configured "name:port" it came from
        public int active_requests  # requests in flight to it now
        public int weight           # load-balancing weight (>= 1)
        int64_t current_weight      # smooth weighted round robin state
        public list http_idle       # HTTP/1 idle keep-alive connections, most recent last
        public list mux             # Bolt multiplexed connections (size <= connections_per_endpoint)
        public list http_pending    # HTTP/1 requests waiting for a connection to come free
        public bint removed         # dropped from the cluster: drain pools, take no new work
        # health: a host with any bit of `unhealthy` set gets no new requests (unless the
        # cluster is in panic); Cluster.refresh_health() must follow a change of it
        public int unhealthy        # UnhealthyBits
        # outlier detection (the data world observes results; see Cluster.observe)
        public int consecutive_5xx
        public int consecutive_gateway
        public int consecutive_local        # local-origin failures (split mode)
        public int ejections        # how many times ejected: the ejection time grows with it
        public int64_t ejected_at_ms
        public bint used            # ORIGINAL_DST: picked since the last cleanup
        # dashboard figures (counted by the proxies; the supervisor takes rates from deltas)
        public int64_t rq_total         # requests sent to it
        public int64_t rq_error         # answered 5xx / a Bolt error status
        public int64_t cx_connect_fail  # connection attempts that failed or timed out
        public bint connect_failing     # the latest connection attempt failed
        public Counters latency         # its latency histogram, made by its first answer
                                        # (endpoints that never served one cost nothing)


cdef inline void endpoint_latency_us(Endpoint ep, int64_t us) except *:
    # the endpoint's share of the latency histograms (the dashboard's p50/p99 per endpoint)
    if ep.latency is None:
        ep.latency = Counters("cluster")
    ep.latency.record_us(us)


cdef enum UnhealthyBits:
    UNHEALTHY_HC = 1            # failing its active health check (the supervisor's prober)
    UNHEALTHY_EJECTED = 2       # ejected by outlier detection


cdef class Cluster:
    cdef:
        readonly str name
        readonly Counters counters
        tuple endpoints             # current Endpoint set, replaced whole on re-resolution
        unsigned int rr_next        # round-robin cursor
        int lb_policy               # LbPolicy
        readonly int connect_timeout_ms
        readonly int max_idle_per_endpoint
        readonly int idle_timeout_ms
        readonly int connections_per_endpoint
        public bint http2           # HTTP/2 (h2c, prior knowledge) to the endpoints
        public object tls           # TlsClientConfig: TLS to the endpoints (None: plain TCP)
        public tuple h2_settings    # http2: (max streams, stream window, connection window,
                                    # HPACK table bytes) its connections announce
        readonly int heartbeat_interval_ms
        readonly int heartbeat_max_missed
        # health
        tuple healthy               # the endpoints with no unhealthy bit, in order
        bint panic                  # too few healthy: balance over all (Envoy's panic mode)
        bint weighted               # the endpoints' weights differ
        public int panic_threshold_pct   # healthy_panic_threshold; 0 = never panic
        readonly set hc_failed      # (host, port) the prober finds failing (kept across DNS)
        # outlier detection (0 = that detector is off); counted per worker
        public bint od_enabled
        public int od_consecutive_5xx
        public int od_consecutive_gateway
        public int od_enforcing_5xx_pct
        public int od_enforcing_gateway_pct
        public int od_interval_ms
        public int od_base_ejection_ms
        public int od_max_ejection_ms
        public int od_max_ejection_pct
        public bint od_split                # split_external_local_origin_errors
        public int od_consecutive_local
        public int od_enforcing_local_pct
        int64_t od_next_tick_ms
        # circuit breakers (Envoy's DEFAULT-priority thresholds), applied in each worker
        public int64_t max_connections
        public int64_t max_pending_requests
        public int64_t max_requests
        public int64_t max_retries
        public int cx_connecting    # connections being made now (count toward max_connections)
        public int pending          # requests waiting for a connection, all endpoints
        public int retries_active   # retried requests in flight
        # consistent hashing (LB_RING_HASH / LB_MAGLEV): rebuilt with the healthy set
        readonly int min_ring_size
        readonly int max_ring_size
        readonly int maglev_table_size
        tuple hash_hosts            # the endpoints the ring or table was built over
        uint64_t *ring_hashes       # sorted; ring_slots[i]: index in hash_hosts
        int *ring_slots
        Py_ssize_t ring_len
        int *maglev                 # maglev_table_size entries: index in hash_hosts
        # ORIGINAL_DST (Envoy's cluster type with CLUSTER_PROVIDED balancing): an endpoint per
        # original destination, made on first use, dropped when unused for a cleanup interval
        readonly bint original_dst
        public bytes origdst_header         # this request header ("host:port") chooses, or None
        public int origdst_port_override    # 0: the destination's own port
        public int origdst_cleanup_ms
        dict origdst_hosts                  # (host, port) -> Endpoint
        int64_t origdst_next_cleanup_ms

    cdef Endpoint pick(self)        # None when there is no endpoint
    cdef Endpoint pick_original(self, tuple dst)    # ORIGINAL_DST; dst: (host, port) or None
    cdef Endpoint _pick_weighted(self, tuple eps, Py_ssize_t n)
    cdef Endpoint _draw_by_weight(self, tuple eps)
    cdef Endpoint pick_hash(self, uint64_t h)   # by a request's hash (hash policies)
    cdef void _build_hash_table(self) except *
    cpdef refresh_health(self)
    cdef void observe(self, Endpoint ep, int status)
    cdef void observe_local(self, Endpoint ep, int status)
    cdef void _eject(self, Endpoint ep, int slot)
