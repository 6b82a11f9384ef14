"""Per-listener access log for HTTP/1 listeners (`access_log: PATH` in the listener config).

One line per request, written when the request ends (response complete, answered locally,
rejected, or cut off), fields separated by single spaces:

    2026-11-26T05:20:01.123Z 127.0.0.1 "GET /v1/users HTTP/1.1" 200 - 3.412 web 10.0.0.5:8080 4f1c...

    start (UTC, ms)  client  "request line"  status  flag  duration_ms  cluster  upstream
    request_id

`status` is the status sent to the client (`-` if none was sent); `flag` is the proxy's reason
when it answered or cut the exchange itself (the word of the `x-fastmesh-error` header:
`no_route`, `upstream_timeout`, `reset_mid_response`, `downstream_reset`, ...) or `-`; the
duration runs from the complete request head to the end, in milliseconds with microsecond
digits; cluster, upstream and request id are `-` when there were none; a request line that
never parsed is `"-"`.

Lines are formatted in C into one pending buffer and written by the worker's sweeper every
100 ms (and whenever 64 KiB are waiting, and at close) with one write() to a file opened
O_APPEND, so several workers can share one file. A write that fails drops those lines and
counts `write_errors` (with a log line), never blocks the proxy for long: the file is a
regular file or a pipe the reader keeps up with.
"""
import logging
import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t
from libc.stdio cimport snprintf

from fastmesh._core.clock cimport wall_us
from fastmesh._core.http1 cimport Writer, w_init, w_put, w_free

log = logging.getLogger("fastmesh.accesslog")

cdef Py_ssize_t FLUSH_BYTES = 65536


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct tm:
        pass
    tm *gmtime_r(const time_t *timep, tm *result)
    size_t strftime(char *s, size_t max, const char *fmt, const tm *t)


cdef inline int put_bytes(Writer *w, bytes b) except -1:
    if b is None or PyBytes_GET_SIZE(b) == 0:
        return w_put(w, b"-", 1)
    return w_put(w, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


cdef class AccessLog:
    def __cinit__(self, str path):
        self.path = path
        self.fd = -1
        w_init(&self.pending, 4096)
        self.second = -1
        self.labels = {}
        self.write_errors = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __dealloc__(self):
        w_free(&self.pending)
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass

    cdef bytes _label(self, object key):
        cdef bytes b = self.labels.get(key)
        if b is None:
            if isinstance(key, str):
                b = (<str>key).encode()
            else:
                b = f"{key.host}:{key.port}".encode()
            if len(self.labels) > 4096:
                self.labels.clear()             # bounded: endpoints come and go with DNS
            self.labels[key] = b
        return b

    cdef int add(self, int64_t duration_us, bytes client, bytes request_line, int status,
                 bytes flag, object cluster_name, object endpoint,
                 bytes request_id) except -1:
        cdef Writer *w = &self.pending
        cdef int64_t start_us = wall_us() - duration_us
        cdef time_t sec = <time_t>(start_us // 1000000)
        cdef tm t
        cdef char num[48]
        cdef int n
        if sec != self.second:
            gmtime_r(&sec, &t)
            strftime(self.stamp, sizeof(self.stamp), "%Y-%m-%dT%H:%M:%S", &t)
            self.second = sec
        w_put(w, self.stamp, 19)
        n = snprintf(num, sizeof(num), ".%03dZ ", <int>((start_us // 1000) % 1000))
        w_put(w, num, n)
        put_bytes(w, client)
        w_put(w, b" \"", 2)
        put_bytes(w, request_line)
        w_put(w, b"\" ", 2)
        if status:
            n = snprintf(num, sizeof(num), "%d ", status)
            w_put(w, num, n)
        else:
            w_put(w, b"- ", 2)
        put_bytes(w, flag)
        n = snprintf(num, sizeof(num), " %lld.%03d ", <long long>(duration_us // 1000),
                     <int>(duration_us % 1000))
        w_put(w, num, n)
        put_bytes(w, self._label(cluster_name) if cluster_name is not None else None)
        w_put(w, b" ", 1)
        put_bytes(w, self._label(endpoint) if endpoint is not None else None)
        w_put(w, b" ", 1)
        put_bytes(w, request_id)
        w_put(w, b"\n", 1)
        if w.len >= FLUSH_BYTES:
            self.flush()
        return 0

    def flush(self):
        """Write what is pending (one write(), more only if the kernel takes less)."""
        cdef Py_ssize_t off = 0
        if self.pending.len == 0 or self.fd < 0:
            return
        data = (<char *>self.pending.buf)[:self.pending.len]
        self.pending.len = 0
        try:
            while off < len(data):
                off += os.write(self.fd, data[off:])
        except OSError as exc:
            self.write_errors += 1
            log.warning("access log %s: write failed (%s); %d bytes of lines lost",
                        self.path, exc.strerror or exc, len(data) - off)

    def close(self):
        self.flush()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def py_add(self, duration_us, client, request_line, status, flag, cluster_name=None,
               endpoint=None, request_id=None):
        """add() for tests."""
        self.add(duration_us, client, request_line, status, flag, cluster_name, endpoint,
                 request_id)
