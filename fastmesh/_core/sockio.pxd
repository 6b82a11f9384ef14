# Socket facts the sessions need outside the hot path (drain and idle closes).

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    unsigned long FIONREAD

cdef inline int unread_bytes(object transport) except -1:
    # Bytes the kernel has received on the transport's socket that the loop has not read
    # yet: a request already on the wire. A connection is only closed as idle when this is
    # 0 (and its own receive buffer is empty). -1 never escapes: an unknown socket reads
    # as "something pending", so nothing is closed on a guess.
    cdef int n = 0
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 1
    if ioctl(sock.fileno(), FIONREAD, &n) != 0:
        return 1
    return n


cdef inline tuple local_dst(object transport):
    # Where a connection was addressed, as far as the socket knows: its local address (an
    # IPv4-mapped IPv6 address unmapped). A listener with the original_dst filter tells the
    # session the address from before the REDIRECT instead (set_original_dst).
    addr = transport.get_extra_info("sockname") if transport is not None else None
    if not addr:
        return None
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, addr[1])
