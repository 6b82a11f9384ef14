"""Clusters, endpoints, load balancing. See upstream.pxd."""
from libc.math cimport ceil
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, qsort

from fastmesh._core.clock cimport now_ms
from fastmesh._core import engine as engine_mod
from fastmesh._core.stats cimport (
    Counters, CS_NO_HEALTHY, CS_LB_HEALTHY_PANIC, CS_OD_EJECTIONS, CS_OD_EJECTIONS_5XX,
    CS_OD_EJECTIONS_GATEWAY, CS_OD_EJECTIONS_OVERFLOW, CS_OD_EJECTIONS_ACTIVE,
    CS_OD_EJECTIONS_LOCAL)
from fastmesh._core.fastrand cimport fast_random
from fastmesh._core.xxhash64 cimport xxh64

# Envoy's overprovisioning factor (1.4): a priority level with 5 of 7 hosts healthy counts as
# fully healthy; panic mode starts below healthy_panic_threshold of that
cdef enum:
    OVERPROVISIONING_PCT = 140
cdef int64_t UNLIMITED = 1 << 62

_POLICIES = {"round_robin": LB_ROUND_ROBIN, "random": LB_RANDOM,
             "least_request": LB_LEAST_REQUEST, "ring_hash": LB_RING_HASH,
             "maglev": LB_MAGLEV}


cdef struct RingEntry:
    uint64_t hash
    int slot


cdef int _cmp_ring(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const RingEntry *>a).hash, y = (<const RingEntry *>b).hash
    return -1 if x < y else (1 if x > y else 0)


cdef bytes hash_key_of(Endpoint e):
    # what Envoy hashes for a host: its address as "ip:port" ("[v6]:port")
    return (f"[{e.host}]:{e.port}" if ":" in e.host else f"{e.host}:{e.port}").encode()


cdef class Endpoint:
    def __init__(self, str host, int port, str origin=None, int weight=1):
        self.host = host
        self.port = port
        self.weight = weight if weight > 0 else 1
        self.current_weight = 0
        self.origin = origin or f"{host}:{port}"
        self.active_requests = 0
        self.rq_total = 0
        self.rq_error = 0
        self.cx_connect_fail = 0
        self.connect_failing = False
        self.http_idle = []
        self.mux = []
        self.http_pending = []
        self.removed = False
        self.unhealthy = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ejections = 0
        self.ejected_at_ms = 0
        self.used = False

    @property
    def address(self):
        return (self.host, self.port)

    def __repr__(self):
        return f"Endpoint({self.host}:{self.port} from {self.origin})"


cdef class Cluster:
    def __init__(self, str name, str lb_policy="round_robin", int connect_timeout_ms=5000,
                 int max_idle_per_endpoint=64, int idle_timeout_ms=60000,
                 int connections_per_endpoint=1, int heartbeat_interval_ms=15000,
                 int heartbeat_max_missed=3, Counters counters=None,
                 int min_ring_size=1024, int max_ring_size=8388608,
                 int maglev_table_size=65537):
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
        self.healthy = ()
        self.panic = False
        self.panic_threshold_pct = 50
        self.hc_failed = set()
        self.rr_next = 0
        self.od_enabled = False
        self.od_next_tick_ms = 0
        self.max_connections = UNLIMITED
        self.max_pending_requests = UNLIMITED
        self.max_requests = UNLIMITED
        self.max_retries = UNLIMITED
        self.cx_connecting = 0
        self.pending = 0
        self.retries_active = 0
        self.min_ring_size = min_ring_size
        self.max_ring_size = max_ring_size
        self.maglev_table_size = maglev_table_size
        self.hash_hosts = ()
        self.original_dst = False
        self.origdst_header = None
        self.origdst_port_override = 0
        self.origdst_cleanup_ms = 5000
        self.origdst_hosts = {}
        self.origdst_next_cleanup_ms = 0

    def __dealloc__(self):
        free(self.ring_hashes)
        free(self.ring_slots)
        free(self.maglev)

    cdef Endpoint pick(self):
        cdef tuple eps = self.healthy
        cdef Py_ssize_t n
        cdef Endpoint a, b
        if self.panic:
            eps = self.endpoints
            if len(eps):
                self.counters.v[CS_LB_HEALTHY_PANIC] += 1
        n = len(eps)
        if n == 0:
            self.counters.v[CS_NO_HEALTHY] += 1
            return None
        if n == 1:
            return eps[0]
        if self.weighted:
            return self._pick_weighted(eps, n)
        if self.lb_policy == LB_ROUND_ROBIN:
            self.rr_next += 1
            return eps[self.rr_next % n]
        if self.lb_policy == LB_RANDOM or self.lb_policy >= LB_RING_HASH:
            # (a hashing policy without a hash from the request: a random endpoint, as Envoy)
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
            if prev is None:
                prev = e
                if (e.host, e.port) in self.hc_failed:
                    prev.unhealthy |= UNHEALTHY_HC
            else:
                prev.weight = e.weight          # a kept endpoint takes its new weight
            keep.append(prev)
        self.endpoints = tuple(keep)
        for e in old.values():
            e.removed = True
        self.refresh_health()
        return list(old.values())

    cdef Endpoint _pick_weighted(self, tuple eps, Py_ssize_t n):
        # Unequal weights. Round robin: smooth weighted round robin (each pick, every
        # endpoint gains its weight, the richest is chosen and pays the total), which gives
        # each endpoint its share spread evenly, as Envoy's EDF scheduler does. Least request:
        # two picks drawn by weight, the one with fewer active requests per unit of weight.
        # Random: drawn by weight.
        cdef Endpoint e, best = None, a, b
        cdef int64_t total = 0
        if self.lb_policy == LB_ROUND_ROBIN:
            for e in eps:
                e.current_weight += e.weight
                total += e.weight
                if best is None or e.current_weight > best.current_weight:
                    best = e
            best.current_weight -= total
            return best
        if self.lb_policy == LB_LEAST_REQUEST:
            a = self._draw_by_weight(eps)
            b = self._draw_by_weight(eps)
            return a if a.active_requests * b.weight <= b.active_requests * a.weight else b
        return self._draw_by_weight(eps)

    cdef Endpoint _draw_by_weight(self, tuple eps):
        cdef Endpoint e
        cdef int64_t total = 0, r
        for e in eps:
            total += e.weight
        r = fast_random() % total
        for e in eps:
            r -= e.weight
            if r < 0:
                return e
        return eps[len(eps) - 1]

    cpdef refresh_health(self):
        """Recompute the healthy set and panic mode after a change of endpoints or health.
        Panic (balance over every endpoint, healthy or not) as Envoy: when the healthy share,
        scaled by the overprovisioning factor 1.4, is below panic_threshold_pct."""
        cdef Endpoint e
        cdef Py_ssize_t total = len(self.endpoints), ejected = 0
        healthy = []
        for e in self.endpoints:
            if e.unhealthy == 0:
                healthy.append(e)
            if e.unhealthy & UNHEALTHY_EJECTED:
                ejected += 1
        self.healthy = tuple(healthy)
        self.counters.v[CS_OD_EJECTIONS_ACTIVE] = ejected
        self.weighted = False
        for e in self.endpoints:
            if e.weight != (<Endpoint>self.endpoints[0]).weight:
                self.weighted = True
                break
        self.panic = (total > 0 and self.panic_threshold_pct > 0 and
                      min(100, OVERPROVISIONING_PCT * len(healthy) // total)
                      < self.panic_threshold_pct)
        if self.lb_policy >= LB_RING_HASH:
            self._build_hash_table()

    cdef void _build_hash_table(self) except *:
        # Over the endpoints requests may go to (the healthy ones; all in panic mode).
        cdef tuple hosts = self.endpoints if self.panic else self.healthy
        cdef Py_ssize_t n = len(hosts), i, j, k
        cdef double scale, target = 0.0, current = 0.0, norm_min
        cdef int64_t wsum, wmin
        cdef uint64_t m, c, offset, skip
        cdef RingEntry *ring
        cdef bytes key
        cdef int *table
        cdef uint64_t *offsets
        cdef uint64_t *skips
        cdef uint64_t *nexts
        free(self.ring_hashes)
        free(self.ring_slots)
        free(self.maglev)
        self.ring_hashes = NULL
        self.ring_slots = NULL
        self.maglev = NULL
        self.ring_len = 0
        self.hash_hosts = hosts
        if n == 0:
            return
        if self.lb_policy == LB_RING_HASH:
            # Every endpoint gets points in proportion to its weight: scale = the ring size
            # at which the lightest has a whole number (at least min_ring_size, at most
            # max_ring_size); point j of an endpoint sits at xxh64("ip:port_j"). A request
            # goes to the first point at or after its hash, wrapping around.
            wsum = 0
            wmin = -1
            for i in range(n):
                wsum += (<Endpoint>hosts[i]).weight
                if wmin < 0 or (<Endpoint>hosts[i]).weight < wmin:
                    wmin = (<Endpoint>hosts[i]).weight
            norm_min = <double>wmin / wsum
            scale = min(ceil(norm_min * self.min_ring_size) / norm_min,
                        <double>self.max_ring_size)
            ring = <RingEntry *>malloc(<size_t>(ceil(scale) + n + 1) * sizeof(RingEntry))
            if ring is NULL:
                raise MemoryError()
            k = 0
            for i in range(n):
                key = hash_key_of(hosts[i])
                target += scale * (<Endpoint>hosts[i]).weight / wsum
                j = 0
                while current < target:
                    point = key + b"_" + str(j).encode()
                    ring[k].hash = xxh64(point, len(point), 0)
                    ring[k].slot = <int>i
                    k += 1
                    j += 1
                    current += 1
            qsort(ring, k, sizeof(RingEntry), _cmp_ring)
            self.ring_hashes = <uint64_t *>malloc(k * sizeof(uint64_t))
            self.ring_slots = <int *>malloc(k * sizeof(int))
            if self.ring_hashes is NULL or self.ring_slots is NULL:
                free(ring)
                raise MemoryError()
            for i in range(k):
                self.ring_hashes[i] = ring[i].hash
                self.ring_slots[i] = ring[i].slot
            self.ring_len = k
            free(ring)
            return
        # Maglev: each endpoint walks the table from xxh64(key) % M in steps of
        # xxh64(key, seed 1) % (M - 1) + 1, taking the first free entry, in turn, until the
        # table (a prime size M) is full.
        m = self.maglev_table_size
        table = <int *>malloc(m * sizeof(int))
        offsets = <uint64_t *>malloc(n * sizeof(uint64_t))
        skips = <uint64_t *>malloc(n * sizeof(uint64_t))
        nexts = <uint64_t *>malloc(n * sizeof(uint64_t))
        if table is NULL or offsets is NULL or skips is NULL or nexts is NULL:
            free(table); free(offsets); free(skips); free(nexts)
            raise MemoryError()
        for i in range(n):
            key = hash_key_of(hosts[i])
            offsets[i] = xxh64(key, len(key), 0) % m
            skips[i] = xxh64(key, len(key), 1) % (m - 1) + 1
            nexts[i] = 0
        for c in range(m):
            table[c] = -1
        c = 0
        k = 0
        while <uint64_t>k < m:
            for i in range(n):
                c = (offsets[i] + nexts[i] * skips[i]) % m
                while table[c] >= 0:
                    nexts[i] += 1
                    c = (offsets[i] + nexts[i] * skips[i]) % m
                table[c] = <int>i
                nexts[i] += 1
                k += 1
                if <uint64_t>k == m:
                    break
        free(offsets); free(skips); free(nexts)
        self.maglev = table

    cdef Endpoint pick_hash(self, uint64_t h):
        cdef Py_ssize_t lo, hi, mid
        if self.panic and len(self.endpoints):
            self.counters.v[CS_LB_HEALTHY_PANIC] += 1
        if self.lb_policy == LB_MAGLEV and self.maglev is not NULL:
            return self.hash_hosts[self.maglev[h % <uint64_t>self.maglev_table_size]]
        if self.ring_len == 0:
            return self.pick()          # no endpoint: counted there
        lo, hi = 0, self.ring_len       # the first point whose hash is >= h, else the first
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.ring_hashes[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        if lo == self.ring_len:
            lo = 0
        return self.hash_hosts[self.ring_slots[lo]]

    def py_pick_hash(self, uint64_t h):
        return self.pick_hash(h)

    def hash_table_info(self):
        """Tests: the ring's (hash, endpoint address) points, or the Maglev table."""
        cdef Py_ssize_t i
        if self.lb_policy == LB_RING_HASH:
            return [(self.ring_hashes[i], self.hash_hosts[self.ring_slots[i]].address)
                    for i in range(self.ring_len)]
        if self.maglev is not NULL:
            return [self.hash_hosts[self.maglev[i]].address
                    for i in range(self.maglev_table_size)]
        return []

    def configure_outlier(self, int consecutive_5xx=0, int consecutive_gateway=0,
                          int enforcing_5xx_pct=100, int enforcing_gateway_pct=0,
                          int interval_ms=10000, int base_ejection_ms=30000,
                          int max_ejection_ms=300000, int max_ejection_pct=10,
                          bint split=False, int consecutive_local=5,
                          int enforcing_local_pct=100):
        """Outlier detection (Envoy's names and defaults); all detectors 0: off. split:
        local-origin failures (connect failures and timeouts) have their own detector."""
        self.od_consecutive_5xx = consecutive_5xx
        self.od_consecutive_gateway = consecutive_gateway
        self.od_enforcing_5xx_pct = enforcing_5xx_pct
        self.od_enforcing_gateway_pct = enforcing_gateway_pct
        self.od_interval_ms = interval_ms
        self.od_base_ejection_ms = base_ejection_ms
        self.od_max_ejection_ms = max_ejection_ms
        self.od_max_ejection_pct = max_ejection_pct
        self.od_split = split
        self.od_consecutive_local = consecutive_local if split else 0
        self.od_enforcing_local_pct = enforcing_local_pct
        self.od_enabled = (consecutive_5xx > 0 or consecutive_gateway > 0
                           or self.od_consecutive_local > 0)
        cdef Endpoint e
        if not self.od_enabled:
            for e in self.endpoints:            # detection off: nothing stays ejected
                e.unhealthy &= ~UNHEALTHY_EJECTED
                e.ejections = 0
            self.refresh_health()

    cdef void observe(self, Endpoint ep, int status):
        # One result of a request to `ep` (an HTTP status; a connect failure, a reset or a
        # timeout arrive as the 503/502/504 the client gets, as Envoy maps local-origin
        # errors when it does not split them). Only called when od_enabled.
        if status < 500:
            ep.consecutive_5xx = 0
            ep.consecutive_gateway = 0
            return
        ep.consecutive_5xx += 1
        if 502 <= status <= 504:
            ep.consecutive_gateway += 1
        else:
            ep.consecutive_gateway = 0
        if ep.unhealthy & UNHEALTHY_EJECTED or ep.removed:
            return
        if self.od_consecutive_gateway and ep.consecutive_gateway >= self.od_consecutive_gateway:
            ep.consecutive_gateway = 0
            if <int>(fast_random() % 100) < self.od_enforcing_gateway_pct:
                ep.consecutive_5xx = 0
                self._eject(ep, CS_OD_EJECTIONS_GATEWAY)
                return
        if self.od_consecutive_5xx and ep.consecutive_5xx >= self.od_consecutive_5xx:
            ep.consecutive_5xx = 0
            if <int>(fast_random() % 100) < self.od_enforcing_5xx_pct:
                self._eject(ep, CS_OD_EJECTIONS_5XX)

    cdef void observe_local(self, Endpoint ep, int status):
        # A failure of the proxy's own making (connect failure or timeout, response
        # timeout): as the status the client gets, unless local-origin errors are split,
        # when they count apart (a connection made resets the count: success_local).
        if not self.od_split:
            self.observe(ep, status)
            return
        ep.consecutive_local += 1
        if ep.unhealthy & UNHEALTHY_EJECTED or ep.removed or not self.od_consecutive_local:
            return
        if ep.consecutive_local >= self.od_consecutive_local:
            ep.consecutive_local = 0
            if <int>(fast_random() % 100) < self.od_enforcing_local_pct:
                self._eject(ep, CS_OD_EJECTIONS_LOCAL)

    cdef void _eject(self, Endpoint ep, int slot):
        cdef Py_ssize_t total = len(self.endpoints)
        cdef int64_t active = self.counters.v[CS_OD_EJECTIONS_ACTIVE]
        # up to max_ejection_pct of the endpoints, this one included (as Envoy 1.40, which
        # ejects none of two hosts at the default 10%)
        if 100 * (active + 1) > self.od_max_ejection_pct * total:
            self.counters.v[CS_OD_EJECTIONS_OVERFLOW] += 1
            return
        ep.unhealthy |= UNHEALTHY_EJECTED
        ep.ejections += 1
        ep.ejected_at_ms = now_ms()
        self.counters.v[CS_OD_EJECTIONS] += 1
        self.counters.v[slot] += 1
        self.refresh_health()

    def outlier_tick(self, int64_t now):
        """Control world, from the worker's sweeper: on each detection interval, endpoints
        whose ejection time (base x times ejected, at most max) has passed come back, and an
        endpoint not ejected has its count of ejections lowered by one (Envoy's backoff)."""
        cdef Endpoint e
        cdef int64_t hold
        cdef bint changed = False
        if not self.od_enabled or now < self.od_next_tick_ms:
            return
        self.od_next_tick_ms = now + self.od_interval_ms
        for e in self.endpoints:
            if e.unhealthy & UNHEALTHY_EJECTED:
                hold = min(<int64_t>self.od_base_ejection_ms * e.ejections,
                           max(self.od_base_ejection_ms, self.od_max_ejection_ms))
                if now >= e.ejected_at_ms + hold:
                    e.unhealthy &= ~UNHEALTHY_EJECTED
                    changed = True
            elif e.ejections > 0:
                e.ejections -= 1
        if changed:
            self.refresh_health()

    def configure_breakers(self, max_connections=None, max_pending_requests=None,
                           max_requests=None, max_retries=None):
        """Circuit breakers; None: no limit."""
        self.max_connections = UNLIMITED if max_connections is None else max_connections
        self.max_pending_requests = (UNLIMITED if max_pending_requests is None
                                     else max_pending_requests)
        self.max_requests = UNLIMITED if max_requests is None else max_requests
        self.max_retries = UNLIMITED if max_retries is None else max_retries

    def set_health_check_failed(self, str host, int port, bint failed):
        """Control world: the prober's verdict for one endpoint (all workers get it)."""
        cdef Endpoint e
        if failed:
            self.hc_failed.add((host, port))
        else:
            self.hc_failed.discard((host, port))
        for e in self.endpoints:
            if e.host == host and e.port == port:
                if failed:
                    e.unhealthy |= UNHEALTHY_HC
                else:
                    e.unhealthy &= ~UNHEALTHY_HC
        self.refresh_health()

    def health_info(self):
        """/clusters: each endpoint's health."""
        cdef Endpoint e
        return {"panic": self.panic, "healthy": len(self.healthy), "endpoints": [
            {"address": f"{e.host}:{e.port}", "origin": e.origin,
             "health_check_failed": bool(e.unhealthy & UNHEALTHY_HC),
             "ejected": bool(e.unhealthy & UNHEALTHY_EJECTED), "ejections": e.ejections,
             "active_requests": e.active_requests} for e in self.endpoints]}

    def get_endpoints(self):
        if self.original_dst:
            return tuple(self.origdst_hosts.values())
        return self.endpoints

    # -- ORIGINAL_DST ------------------------------------------------------------------

    def configure_original_dst(self, header=None, int port_override=0,
                               int cleanup_interval_ms=5000):
        """Make this an ORIGINAL_DST cluster: each connection (or request, by `header`) goes
        to where it was addressed."""
        self.original_dst = True
        self.origdst_header = header.lower().encode() if header else None
        self.origdst_port_override = port_override
        self.origdst_cleanup_ms = cleanup_interval_ms

    cdef Endpoint pick_original(self, tuple dst):
        cdef Endpoint ep
        if dst is None or dst[0] is None:
            self.counters.v[CS_NO_HEALTHY] += 1
            return None
        if self.origdst_port_override:
            dst = (dst[0], self.origdst_port_override)
        ep = self.origdst_hosts.get(dst)
        if ep is None:
            ep = Endpoint(dst[0], dst[1])
            self.origdst_hosts[dst] = ep
        ep.used = True
        return ep

    def py_pick_original(self, dst):
        return self.pick_original(tuple(dst) if dst is not None else None)

    def origdst_cleanup(self, int64_t now):
        """Drop the destinations not picked since the last cleanup and idle now; returns
        them (their pooled connections are closed by the caller)."""
        cdef Endpoint e
        if not self.original_dst or now < self.origdst_next_cleanup_ms:
            return ()
        self.origdst_next_cleanup_ms = now + self.origdst_cleanup_ms
        gone = []
        for key, e in list(self.origdst_hosts.items()):
            if e.used or e.active_requests or e.http_pending:
                e.used = False
                continue
            del self.origdst_hosts[key]
            e.removed = True
            gone.append(e)
        return gone

    def py_pick(self):
        return self.pick()


def py_xxh64(bytes data, uint64_t seed=0):
    """XXH64 of data (tests compare it with the `xxhash` package)."""
    return xxh64(data, len(data), seed)


def open_connection(loop, factory, Cluster cluster, Endpoint ep, bint engine=True):
    """The awaitable (a coroutine) connecting to `ep` for the protocol `factory` makes, as
    loop.create_connection: plain TCP, or TLS when the cluster originates it (then the
    handshake, and the upstream certificate's checks, are done before the protocol is
    made, so a failed handshake is a failed connect).

    Plain TCP goes through the process's I/O engine when one is installed (fastmesh.ioengine)
    and `engine` is true: the factory must then make an asyncio.BufferedProtocol (the
    engine's Transport feeds get_buffer / buffer_updated only). Callers whose protocol is
    not one, or was never tried on the engine (HTTP/2's upstreams, mirrors), pass
    engine=False. TLS clusters stay on the loop (the TLS layer is uvloop's transport's)."""
    cdef object eng
    if cluster.tls is None:
        eng = engine_mod.installed() if engine else None
        if eng is not None:
            return _engine_connect(eng, factory, ep.host, ep.port)
        return loop.create_connection(factory, ep.host, ep.port)
    from fastmesh._core.tls import open_tls
    return open_tls(loop, factory, cluster.tls, ep.host, ep.port)


async def _engine_connect(eng, factory, str host, int port):
    # A coroutine (as loop.create_connection's), so callers may create_task() it.
    # Cancelled while connecting: the engine's future is cancelled, which aborts the
    # attempt. Cancelled after the engine resolved it but before this task resumed (a
    # client gone in between; loop.create_connection has no such gap): the connection
    # was made for nobody, so it is closed here, not left open for good.
    fut = eng.create_connection(factory, host, port)
    try:
        return await fut
    except BaseException:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result()[0].close()
        raise
