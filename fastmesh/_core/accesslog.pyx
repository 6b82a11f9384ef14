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

Bolt listeners log one line per call answered (or failed), the same way:

    2026-11-26T05:20:01.123Z 127.0.0.1 "com.example.EchoService:1.0 echo" 0 - 1.204 rpc 10.0.0.5:12200 17

    start  client  "service method"  status (Bolt response status, `-` if none)  flag
    duration_ms  cluster  upstream  request_id (the client's Bolt request id)

A listener may name its own format instead (`access_log: {path, format}`): Envoy's command
operators (`%START_TIME%`, `%REQ(X)%` with `:METHOD`, `:PATH`, `:AUTHORITY` and `:PROTOCOL`,
`%RESP(X)%`, `%RESPONSE_CODE%`, `%RESPONSE_FLAGS%` (Envoy's codes: UH, UF, NR, ...),
`%RESPONSE_FLAGS_LONG%`, `%RESPONSE_CODE_DETAILS%` (fastmesh's reason word, or
via_upstream), `%BYTES_RECEIVED%`, `%BYTES_SENT%` (HTTP: body bytes, as Envoy counts them;
Bolt: whole frames), `%DURATION%`, `%UPSTREAM_HOST%`, `%UPSTREAM_CLUSTER%`,
`%DOWNSTREAM_REMOTE_ADDRESS%` (ip:port) and `..._WITHOUT_PORT`, `%PROTOCOL%`,
`%REQUEST_ID%`, `%HOSTNAME%`, and for Bolt `%RPC_SERVICE%`, `%RPC_METHOD%`) between literal
text, or `json_format` (a map of key -> operator: one JSON object per line). A configured
format is rendered per request by Python code (a few µs); the default line stays in C. The
byte counts, response head and client port reach the log in an `Exchange` the proxy fills
only for a format that reads them.

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

# format operators: name -> takes an argument (REQ(X))
OPERATORS = {
    "START_TIME": False, "REQ": True, "RESP": True, "RESPONSE_CODE": False,
    "RESPONSE_FLAGS": False, "RESPONSE_FLAGS_LONG": False, "RESPONSE_CODE_DETAILS": False,
    "BYTES_RECEIVED": False, "BYTES_SENT": False,
    "DURATION": False, "UPSTREAM_HOST": False, "UPSTREAM_CLUSTER": False,
    "DOWNSTREAM_REMOTE_ADDRESS": False, "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": False,
    "PROTOCOL": False, "REQUEST_ID": False, "RPC_SERVICE": False, "RPC_METHOD": False,
    "HOSTNAME": False,
    # the client connection's TLS (Envoy's; `-` on plain connections)
    "DOWNSTREAM_TLS_VERSION": False, "DOWNSTREAM_TLS_CIPHER": False,
    "DOWNSTREAM_PEER_URI_SAN": False, "DOWNSTREAM_PEER_DNS_SAN": False,
    "DOWNSTREAM_PEER_SUBJECT": False,
}
# the operators that read an Exchange: the proxy gathers one only for formats using them
EXCHANGE_OPERATORS = frozenset(("RESP", "BYTES_RECEIVED", "BYTES_SENT",
                                "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_TLS_VERSION",
                                "DOWNSTREAM_TLS_CIPHER", "DOWNSTREAM_PEER_URI_SAN",
                                "DOWNSTREAM_PEER_DNS_SAN", "DOWNSTREAM_PEER_SUBJECT"))

def _tls_value(str op, transport):
    # Envoy's TLS operators, from the client connection's TLS transport (None: plain)
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return None
    if op == "DOWNSTREAM_TLS_VERSION":
        return sslobj.version()
    if op == "DOWNSTREAM_TLS_CIPHER":
        c = sslobj.cipher()
        return c[0] if c else None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    if op == "DOWNSTREAM_PEER_SUBJECT":
        from fastmesh._core.tls import _rfc2253
        return _rfc2253(sslobj.getpeercert(True))
    kind = "URI" if op == "DOWNSTREAM_PEER_URI_SAN" else "DNS"
    return ",".join(v for t, v in cert.get("subjectAltName", ()) if t == kind) or None


# Envoy's default access-log line, written for an Envoy bootstrap's file access log that
# names no format (RESP(X-ENVOY-UPSTREAM-SERVICE-TIME) is `-`: fastmesh does not add it)
ENVOY_DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    '%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n')

# fastmesh's reason word (the x-fastmesh-error header, the default line's flag) -> Envoy's
# response flag, short and long; reasons Envoy marks with no flag map to none
RESPONSE_FLAGS = {
    b"no_route": ("NR", "NoRouteFound"),
    b"no_healthy_upstream": ("UH", "NoHealthyUpstream"),
    b"connect_failed": ("UF", "UpstreamConnectionFailure"),
    b"connect_timeout": ("UF", "UpstreamConnectionFailure"),
    b"upstream_timeout": ("UT", "UpstreamRequestTimeout"),
    b"upstream_reset": ("UC", "UpstreamConnectionTermination"),
    b"reset_mid_response": ("UC", "UpstreamConnectionTermination"),
    b"upstream_protocol": ("UPE", "UpstreamProtocolError"),
    b"downstream_reset": ("DC", "DownstreamConnectionTermination"),
    b"overflow": ("UO", "UpstreamOverflow"),
    b"local_rate_limited": ("RL", "RateLimited"),
    b"fault_abort": ("FI", "FaultInjected"),
    b"stream_idle_timeout": ("SI", "StreamIdleTimeout"),
    b"bad_request": ("DPE", "DownstreamProtocolError"),
    b"head_too_large": ("DPE", "DownstreamProtocolError"),
}


def compile_format(str text):
    """A format string -> [literal str | (operator, argument)]. ValueError names what is
    wrong (an unknown operator, an unclosed %)."""
    import re
    out = []
    pos = 0
    for m in re.finditer(r"%([A-Z_]+)(?:\(([^)]*)\))?(?::\d+)?%|%%", text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        pos = m.end()
        if m.group(0) == "%%":
            out.append("%")
            continue
        op, arg = m.group(1), m.group(2)
        if op not in OPERATORS:
            raise ValueError(f"unknown operator %{op}% (known: "
                             f"{', '.join('%' + k + '%' for k in sorted(OPERATORS))})")
        if OPERATORS[op] and not arg:
            raise ValueError(f"%{op}(...)% needs an argument, e.g. %REQ(USER-AGENT)%")
        out.append((op, arg))
    rest = text[pos:]
    if "%" in rest:
        raise ValueError(f"unclosed or unknown operator at {rest[rest.index('%'):][:30]!r}")
    if rest:
        out.append(rest)
    return out


def sofa_method_name(bytes content):
    """The method of a SOFARPC hessian2 SofaRequest (its first field, `methodName`), read
    from the start of the body when the peer does not send it as a header; None when the
    body is not in that shape. Only called for the access log."""
    cdef Py_ssize_t i = 0, n = len(content), ln, k, nfields
    if n < 4 or content[0] not in (0x4f, 0x43):     # 'O' / 'C': a class definition
        return None

    def read_len(Py_ssize_t j):
        b = content[j]
        if b < 0x20:
            return b, j + 1                             # short string
        if 0x80 <= b <= 0xbf:
            return b - 0x90, j + 1                      # compact int (a type's length)
        if 0x30 <= b <= 0x33 and j + 1 < n:
            return ((b - 0x30) << 8) | content[j + 1], j + 2
        return -1, j
    try:
        ln, i = read_len(1)
        if ln < 0:
            return None
        i += ln
        nfields = content[i] - 0x90
        i += 1
        names = []
        for k in range(nfields):
            ln, i = read_len(i)
            if ln < 0:
                return None
            names.append(content[i:i + ln])
            i += ln
        if not names or names[0] != b"methodName" or content[i] not in (0x6f, 0x4f):
            return None
        i += 2                                          # 'o' + the class reference
        ln, i = read_len(i)
        if ln < 0 or i + ln > n:
            return None
        return content[i:i + ln]
    except IndexError:
        return None


cdef object _req_header(bytes head, str name):
    # (also a response header from a response head: the first line is skipped either way)
    # one request header's value from the raw head (first match, case-insensitive)
    cdef bytes key = name.lower().encode("latin-1") + b":"
    cdef Py_ssize_t klen = len(key)
    if head is None:
        return None
    for line in head.split(b"\r\n")[1:]:
        if len(line) >= klen and line[:klen].lower() == key:
            return line[klen:].strip()
    return None


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
    def __cinit__(self, str path, str fmt=None, object json_fields=None):
        self.path = path
        self.ops = None
        self.json_lines = False
        self.wants_exchange = False
        if json_fields:
            self.ops = [(k, compile_format(v)) for k, v in json_fields]
            self.json_lines = True
            used = [o for _, ops in self.ops for o in ops]
        elif fmt:
            self.ops = compile_format(fmt if fmt.endswith("\n") else fmt + "\n")
            used = self.ops
        if self.ops is not None:
            self.wants_exchange = any(isinstance(o, tuple) and o[0] in EXCHANGE_OPERATORS
                                      for o in used)
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
                 bytes request_id, bytes head=None, Exchange ex=None,
                 bytes protocol=b"HTTP/1.1") except -1:
        cdef Writer *w = &self.pending
        cdef char num[48]
        cdef int n
        if self.ops is not None:
            return self._add_formatted(duration_us, client, request_line, head, status, flag,
                                       cluster_name, endpoint, request_id, protocol,
                                       None, None, ex)
        self._put_start(w, wall_us() - duration_us, client)
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

    cdef int add_bolt(self, int64_t duration_us, bytes client, bytes service, bytes method,
                      int status, object cluster_name, object endpoint,
                      long long request_id, Exchange ex=None) except -1:
        # one Bolt call: the default line reuses the HTTP one, "service method" in quotes
        cdef bytes rid = str(request_id).encode() if request_id >= 0 else None
        cdef bytes line = (service or b"-") + (b" " + method if method else b"")
        if self.ops is not None:
            return self._add_formatted(duration_us, client, line, None, status, None,
                                       cluster_name, endpoint, rid, b"bolt",
                                       service, method, ex)
        # Bolt status 0 is success: logged as 0 (the field means "none" only when absent)
        return self._add_default(duration_us, client, line, status, cluster_name, endpoint,
                                 rid)

    cdef void _put_start(self, Writer *w, int64_t start_us, bytes client):
        # a line's start: the request's start time (UTC, ms; the second's text is cached),
        # the client, and the quote opening the request field
        cdef time_t sec = <time_t>(start_us // 1000000)
        cdef tm t
        cdef char num[16]
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

    cdef int _add_default(self, int64_t duration_us, bytes client, bytes line, int status,
                          object cluster_name, object endpoint, bytes rid) except -1:
        cdef Writer *w = &self.pending
        cdef char num[48]
        cdef int n
        self._put_start(w, wall_us() - duration_us, client)
        put_bytes(w, line)
        n = snprintf(num, sizeof(num), "\" %d - %lld.%03d ", status,
                     <long long>(duration_us // 1000), <int>(duration_us % 1000))
        w_put(w, num, n)
        put_bytes(w, self._label(cluster_name) if cluster_name is not None else None)
        w_put(w, b" ", 1)
        put_bytes(w, self._label(endpoint) if endpoint is not None else None)
        w_put(w, b" ", 1)
        put_bytes(w, rid)
        w_put(w, b"\n", 1)
        if w.len >= FLUSH_BYTES:
            self.flush()
        return 0

    cdef int _add_formatted(self, int64_t duration_us, bytes client, bytes request_line,
                            bytes head, int status, bytes flag, object cluster_name,
                            object endpoint, bytes request_id, bytes protocol,
                            bytes service=None, bytes method=None,
                            Exchange ex=None) except -1:
        cdef Writer *w = &self.pending
        cdef bytes out
        import json
        start_us = wall_us() - duration_us
        parts = (request_line or b"").split(b" ")
        is_http = protocol != b"bolt"

        def value(op, arg):
            if op == "START_TIME":
                import time as _t
                sec = start_us // 1000000
                return _t.strftime("%Y-%m-%dT%H:%M:%S", _t.gmtime(sec)) + \
                    ".%03dZ" % ((start_us // 1000) % 1000)
            if op == "DURATION":
                return str(duration_us // 1000)
            if op == "RESPONSE_CODE":
                return str(status) if (status or not is_http) else "0"
            if op in ("RESPONSE_FLAGS", "RESPONSE_FLAGS_LONG"):
                envoy = RESPONSE_FLAGS.get(flag) if flag else None
                return envoy[op == "RESPONSE_FLAGS_LONG"] if envoy is not None else "-"
            if op == "RESPONSE_CODE_DETAILS":
                if flag:
                    return flag.decode()
                return "via_upstream" if status and endpoint is not None else None
            if op in ("BYTES_RECEIVED", "BYTES_SENT"):
                if ex is None:
                    return "0"
                return str(ex.bytes_received if op == "BYTES_RECEIVED" else ex.bytes_sent)
            if op == "RESP":
                if ex is None or ex.rsp_head is None:
                    return None
                for alt in arg.split("?"):
                    v = _req_header(ex.rsp_head, alt.strip())
                    if v is not None:
                        return v.decode("latin-1")
                return None
            if op == "HOSTNAME":
                import socket
                return socket.gethostname()
            if op.startswith("DOWNSTREAM_TLS_") or op.startswith("DOWNSTREAM_PEER_"):
                return _tls_value(op, ex.transport if ex is not None else None)
            if op == "UPSTREAM_HOST":
                return self._label(endpoint).decode() if endpoint is not None else None
            if op == "UPSTREAM_CLUSTER":
                return cluster_name if cluster_name is not None else None
            if op == "DOWNSTREAM_REMOTE_ADDRESS":     # ip:port ([ip]:port for IPv6)
                if not client:
                    return None
                ip = client.decode()
                if ex is None or not ex.client_port:
                    return ip
                return f"[{ip}]:{ex.client_port}" if ":" in ip else f"{ip}:{ex.client_port}"
            if op == "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT":
                return client.decode() if client else None
            if op == "PROTOCOL":
                if is_http:
                    return parts[2].decode() if len(parts) == 3 else None
                return "bolt"
            if op == "REQUEST_ID":
                return request_id.decode() if request_id else None
            if op == "RPC_SERVICE":
                return service.decode("utf-8", "replace") if service else None
            if op == "RPC_METHOD":
                return method.decode("utf-8", "replace") if method else None
            if op == "REQ":                    # X?Y: Y when X is absent (Envoy's syntax)
                for alt in arg.split("?"):
                    v = req(alt.strip().upper(), alt.strip())
                    if v is not None:
                        return v
                return None
            return None

        def req(name, arg):
            if is_http:
                if name == ":METHOD":
                    return parts[0].decode() if len(parts) == 3 else None
                if name == ":PATH":
                    return parts[1].decode("latin-1") if len(parts) == 3 else None
                if name == ":PROTOCOL":
                    return parts[2].decode() if len(parts) == 3 else None
                if name in (":AUTHORITY", "HOST"):
                    v = _req_header(head, "host")
                elif name == "X-REQUEST-ID" and request_id:
                    return request_id.decode()
                else:
                    v = _req_header(head, arg)
                return v.decode("latin-1") if v is not None else None
            if name in ("SERVICE", "SOFA_HEAD_TARGET_SERVICE"):
                return service.decode("utf-8", "replace") if service else None
            if name in ("METHOD", "SOFA_HEAD_METHOD_NAME", ":METHOD"):
                return method.decode("utf-8", "replace") if method else None
            return None

        def render(ops):
            if len(ops) == 1 and isinstance(ops[0], tuple):
                return value(*ops[0])           # a lone operator keeps its JSON null
            return "".join(o if isinstance(o, str) else (value(*o) or "-") for o in ops)

        if self.json_lines:
            out = (json.dumps({k: render(ops) for k, ops in self.ops},
                              separators=(",", ":")) + "\n").encode()
        else:
            out = render(self.ops).encode("utf-8", "replace")
        w_put(w, PyBytes_AS_STRING(out), PyBytes_GET_SIZE(out))
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
               endpoint=None, request_id=None, head=None):
        """add() for tests."""
        self.add(duration_us, client, request_line, status, flag, cluster_name, endpoint,
                 request_id, head)

    def py_add_bolt(self, duration_us, client, service, method, status, cluster_name=None,
                    endpoint=None, request_id=-1):
        """add_bolt() for tests."""
        self.add_bolt(duration_us, client, service, method, status, cluster_name, endpoint,
                      request_id)
