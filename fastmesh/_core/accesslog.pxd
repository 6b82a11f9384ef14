# Per-listener HTTP/1 access log: lines formatted in C into one pending buffer, written with
# one write() per sweep (100 ms) or per 64 KiB. Format and fields: accesslog.pyx.

from libc.stdint cimport int64_t

from fastmesh._core.http1 cimport Writer

cdef class Exchange:
    # What only a configured format reads, gathered by the proxy when the log has one:
    # body bytes each way (Envoy's BYTES_RECEIVED / BYTES_SENT: HTTP bodies as decoded,
    # Bolt whole frames), the response head as sent (RESP(X)), the client's port
    cdef public int64_t bytes_received
    cdef public int64_t bytes_sent
    cdef public bytes rsp_head
    cdef public int client_port
    cdef public object transport    # the client connection's transport (TLS operators)


cdef class AccessLog:
    cdef:
        readonly str path
        int fd
        Writer pending              # formatted lines not yet written
        int64_t second              # the UTC second `stamp` holds
        char stamp[20]              # "YYYY-MM-DDTHH:MM:SS" for that second
        dict labels                 # cluster name / endpoint -> its bytes, formatted once
        public int64_t write_errors
        list ops                    # a configured format, compiled (None: the default line)
        bint json_lines             # ops render a JSON object per line
        readonly bint wants_exchange    # ops read an Exchange (bytes, RESP, client port)

    cdef int add(self, int64_t duration_us, bytes client, bytes request_line, int status,
                 bytes flag, object cluster_name, object endpoint, bytes request_id,
                 bytes head=*, Exchange ex=*, bytes protocol=*) except -1
    cdef int add_bolt(self, int64_t duration_us, bytes client, bytes service, bytes method,
                      int status, object cluster_name, object endpoint,
                      long long request_id, Exchange ex=*) except -1
    cdef void _put_start(self, Writer *w, int64_t start_us, bytes client)
    cdef int _add_default(self, int64_t duration_us, bytes client, bytes line, int status,
                          object cluster_name, object endpoint, bytes rid) except -1
    cdef int _add_formatted(self, int64_t duration_us, bytes client, bytes request_line,
                            bytes head, int status, bytes flag, object cluster_name,
                            object endpoint, bytes request_id, bytes protocol,
                            bytes service=*, bytes method=*, Exchange ex=*) except -1
    cdef bytes _label(self, object key)
