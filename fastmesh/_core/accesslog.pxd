# Per-listener HTTP/1 access log: lines formatted in C into one pending buffer, written with
# one write() per sweep (100 ms) or per 64 KiB. Format and fields: accesslog.pyx.

from libc.stdint cimport int64_t

from fastmesh._core.http1 cimport Writer

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

    cdef int add(self, int64_t duration_us, bytes client, bytes request_line, int status,
                 bytes flag, object cluster_name, object endpoint, bytes request_id,
                 bytes head=*) except -1
    cdef int add_bolt(self, int64_t duration_us, bytes client, bytes service, bytes method,
                      int status, object cluster_name, object endpoint,
                      long long request_id) except -1
    cdef void _put_start(self, Writer *w, int64_t start_us, bytes client)
    cdef int _add_default(self, int64_t duration_us, bytes client, bytes line, int status,
                          object cluster_name, object endpoint, bytes rid) except -1
    cdef int _add_formatted(self, int64_t duration_us, bytes client, bytes request_line,
                            bytes head, int status, bytes flag, object cluster_name,
                            object endpoint, bytes request_id, bytes protocol,
                            bytes service=*, bytes method=*) except -1
    cdef bytes _label(self, object key)
