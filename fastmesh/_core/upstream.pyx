"""Clusters, endpoints, load balancing. See upstream.pxd."""
from fastmesh._core.stats cimport Counters, CS_NO_HEALTHY
from fastmesh._core.fastrand cimport fast_random

_POLICIES = {"round_robin": LB_ROUND_ROBIN, "random": LB_RANDOM,
             "least_request": LB_LEAST_REQUEST}


cdef class Endpoint:
    def __init__(self, str host, int port, str origin=None):
        self.host = host
        self.port = port
        self.origin = origin or f"{host}:{port}"
        self.active_requests = 0
        self.http_idle = []
        self.mux = []
        self.removed = False

    @property
    def address(self):
        return (self.host, self.port)

    def __repr__(self):
        return f"Endpoint({self.host}:{self.port} from {self.origin})"


cdef class Cluster:
    def __init__(self, str name, str lb_policy="round_robin", int connect_timeout_ms=5000,
                 int max_idle_per_endpoint=64, int idle_timeout_ms=60000,
                 int connections_per_endpoint=1, int heartbeat_interval_ms=15000,
                 int heartbeat_max_missed=3, Counters counters=None):
        self.name = name
        self.lb_policy = _POLICIES[lb_policy]
        self.connect_timeout_ms = connect_timeout_ms
        self.max_idle_per_endpoint = max_idle_per_endpoint
        self.idle_timeout_ms = idle_timeout_ms
        self.connections_per_endpoint = connections_per_endpoint
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_max_missed = heartbeat_max_missed
        self.counters = counters if counters is not None else Counters("cluster")
        self.endpoints = ()
        self.rr_next = 0

    cdef Endpoint pick(self):
        cdef tuple eps = self.endpoints
        cdef Py_ssize_t n = len(eps)
        cdef Endpoint a, b
        if n == 0:
            self.counters.v[CS_NO_HEALTHY] += 1
            return None
        if n == 1:
            return eps[0]
        if self.lb_policy == LB_ROUND_ROBIN:
            self.rr_next += 1
            return eps[self.rr_next % n]
        if self.lb_policy == LB_RANDOM:
            return eps[fast_random() % n]
        a = eps[fast_random() % n]
        b = eps[fast_random() % n]
        return a if a.active_requests <= b.active_requests else b

    def set_endpoints(self, new_endpoints):
        """Replace the endpoint set (control world, after DNS). Endpoints whose address is
        unchanged keep their pools; the removed ones are returned so the caller can drain."""
        old = {(e.host, e.port): e for e in self.endpoints}
        keep = []
        for e in new_endpoints:
            prev = old.pop((e.host, e.port), None)
            keep.append(prev if prev is not None else e)
        self.endpoints = tuple(keep)
        for e in old.values():
            e.removed = True
        return list(old.values())

    def get_endpoints(self):
        return self.endpoints

    def py_pick(self):
        return self.pick()
