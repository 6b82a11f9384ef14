# Clusters, endpoints and load balancing. The control world (fastmesh/cluster.py) builds a
# Cluster per configured cluster and keeps its endpoint list current (DNS); the data world
# asks it for an endpoint per request. Connection pools hang off each Endpoint and belong to
# the protocol modules (http_proxy: idle keep-alive list; bolt_proxy: multiplexed set).

from fastmesh._core.stats cimport Counters

cdef enum LbPolicy:
    LB_ROUND_ROBIN = 0      # next endpoint in turn
    LB_RANDOM = 1           # uniformly random
    LB_LEAST_REQUEST = 2    # fewer active requests of two random picks (P2C)

cdef class Endpoint:
    cdef:
        readonly str host           # resolved IP literal
        readonly int port
        readonly str origin         # the configured "name:port" it came from
        public int active_requests  # requests in flight to it now
        public list http_idle       # HTTP/1 idle keep-alive connections, most recent last
        public list mux             # Bolt multiplexed connections (size <= connections_per_endpoint)
        public bint removed         # dropped from the cluster: drain pools, take no new work


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
        readonly int heartbeat_interval_ms
        readonly int heartbeat_max_missed

    cdef Endpoint pick(self)        # None when there is no endpoint
