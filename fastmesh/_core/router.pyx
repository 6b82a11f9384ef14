"""Compiled route tables. See router.pxd."""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp
from libc.stdint cimport uint64_t


from fastmesh._core.http1 cimport Head
from fastmesh._core.upstream cimport Cluster
from fastmesh._core.fastrand cimport fast_random



cdef class HeaderMatcher:
    def __init__(self, bytes name, int kind, bytes value=None, regex=None):
        self.name = name
        self.kind = kind
        self.value = value
        self.regex = regex

    cdef bint matches(self, bytes value):
        if self.kind == M_ABSENT:
            return value is None
        if value is None:
            return False
        if self.kind == M_ANY:
            return True
        if self.kind == M_EXACT:
            return value == self.value
        if self.kind == M_PREFIX:
            return value.startswith(self.value)
        return self.regex.fullmatch(value) is not None

    cdef bint matches_raw(self, const unsigned char *v, Py_ssize_t n, bint present):
        # The same test on bytes in place (no object unless a regex needs one).
        cdef Py_ssize_t k
        if self.kind == M_ABSENT:
            return not present
        if not present:
            return False
        if self.kind == M_ANY:
            return True
        k = PyBytes_GET_SIZE(self.value) if self.value is not None else 0
        if self.kind == M_EXACT:
            return n == k and memcmp(v, PyBytes_AS_STRING(self.value), k) == 0
        if self.kind == M_PREFIX:
            return n >= k and memcmp(v, PyBytes_AS_STRING(self.value), k) == 0
        return self.regex.fullmatch(PyBytes_FromStringAndSize(<const char *>v, n)) is not None

    def py_matches(self, value):
        return self.matches(value)


cdef class Route:
    def __init__(self, str name, int path_kind, bytes path, path_regex, tuple headers,
                 int action, Cluster cluster, tuple weighted, tuple weights,
                 int direct_status, bytes direct_body, int timeout_ms,
                 tuple headers_to_add, tuple headers_to_remove):
        cdef int i, acc = 0
        self.name = name
        self.path_kind = path_kind
        self.path = path
        self.path_regex = path_regex
        self.headers = headers
        self.action = action
        self.cluster = cluster
        self.weighted = weighted
        self.direct_status = direct_status
        self.direct_body = direct_body
        self.timeout_ms = timeout_ms
        self.grpc_timeout_max_ms = -1
        self.headers_to_add = headers_to_add
        self.headers_to_remove = headers_to_remove
        if weighted:
            self.cum_weights = <int *>malloc(len(weights) * sizeof(int))
            if self.cum_weights is NULL:
                raise MemoryError()
            for i in range(len(weights)):
                acc += weights[i]
                self.cum_weights[i] = acc
            self.total_weight = acc

    def __dealloc__(self):
        if self.cum_weights is not NULL:
            free(self.cum_weights)

    cdef bint match_http(self, Head h):
        cdef const char *raw
        cdef Py_ssize_t n
        cdef HeaderMatcher m
        if self.path_kind != M_ANY:
            raw = PyBytes_AS_STRING(h.raw) + h.target_off
            n = PyBytes_GET_SIZE(self.path)
            if self.path_kind == M_PREFIX:
                if h.path_len < n or memcmp(raw, PyBytes_AS_STRING(self.path), n) != 0:
                    return False
            elif self.path_kind == M_EXACT:
                if h.path_len != n or memcmp(raw, PyBytes_AS_STRING(self.path), n) != 0:
                    return False
            elif self.path_regex.fullmatch(h.path()) is None:
                return False
        for m in self.headers:
            if not m.matches(h.header_value(PyBytes_AS_STRING(m.name),
                                            PyBytes_GET_SIZE(m.name))):
                return False
        return True

    cdef Cluster pick_cluster(self):
        cdef unsigned int r
        cdef int i
        if self.action == A_CLUSTER:
            return self.cluster
        r = fast_random() % <unsigned int>self.total_weight
        for i in range(len(self.weighted)):
            if r < <unsigned int>self.cum_weights[i]:
                return self.weighted[i]
        return self.weighted[len(self.weighted) - 1]

    def py_pick_cluster(self):
        return self.pick_cluster()


cdef class VirtualHost:
    def __init__(self, str name, tuple routes):
        self.name = name
        self.routes = routes


cdef class RouteTable:
    def __init__(self, str name, tuple virtual_hosts, list domains, bint strip_port=True):
        """domains: [(bytes domain, VirtualHost)] in config order. strip_port: a Host with a
        port that matches no domain as sent is matched again without its port (native
        configs); False matches the Host only as sent (Envoy's default)."""
        self.name = name
        self.strip_port = strip_port
        self.virtual_hosts = virtual_hosts
        self.exact = {}
        self.suffixes = []
        self.default = None
        for domain, vh in domains:
            if domain == b"*":
                self.default = vh
            elif domain.startswith(b"*."):
                self.suffixes.append((domain[1:], vh))
            else:
                self.exact[domain] = vh
        self.suffixes.sort(key=lambda item: -len(item[0]))

    cdef VirtualHost select(self, bytes host):
        cdef VirtualHost vh
        cdef Py_ssize_t colon
        if self.exact:
            vh = self.exact.get(host)
            if vh is not None:
                return vh
        if self.strip_port:
            colon = host.rfind(b":")
            if colon > 0 and host.find(b"]", colon) < 0:
                host = host[:colon]
                if self.exact:
                    vh = self.exact.get(host)
                    if vh is not None:
                        return vh
        for suffix, vh in self.suffixes:
            if host.endswith(suffix) and len(host) > len(suffix):
                return vh
        return self.default

    cdef Route route_http(self, Head h):
        cdef VirtualHost vh
        cdef Route r
        if self.exact or self.suffixes:
            vh = self.select(h.host())
        else:
            vh = self.default
        if vh is None:
            return None
        for r in vh.routes:
            if r.match_http(h):
                return r
        return None

    def py_select(self, bytes host):
        vh = self.select(host.lower())
        return None if vh is None else vh.name
