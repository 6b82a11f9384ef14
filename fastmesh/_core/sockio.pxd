# Socket facts the sessions need outside the hot path (drain and idle closes, original
# destinations).

from fastmesh._core.sniff cimport original_dst_of
from fastmesh._core.engine cimport Transport as EngineTransport

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    unsigned long FIONREAD

cdef inline int unread_bytes(object transport) except -1:
    # Bytes the kernel has received on the transport's socket that the loop has not read
    # yet: a request already on the wire. A connection is only closed as idle when this is
    # 0 (and its own receive buffer is empty). -1 never escapes: an unknown socket reads
    # as "something pending", so nothing is closed on a guess.
    cdef int n = 0
    if isinstance(transport, EngineTransport):
        # the engine's socket asked directly (no dup'd socket object), its stash counted
        return transport.unread_bytes()
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 1
    if ioctl(sock.fileno(), FIONREAD, &n) != 0:
        return 1
    return n


cdef inline tuple redirected_dst(object transport):
    # Where a connection was going before an iptables REDIRECT sent it here (conntrack's
    # SO_ORIGINAL_DST), for a session whose listener did not say (a single-chain listener,
    # or a connection adopted in a hot restart). (None, 0) when it was not redirected: its
    # destination is this proxy itself, and an ORIGINAL_DST cluster would loop back into it
    # (Envoy would; fastmesh refuses: no endpoint, counted). Cached by the caller, so the
    # lookup is made once per connection.
    sock = transport.get_extra_info("socket") if transport is not None else None
    dst = original_dst_of(sock.fileno(), sock.family) if sock is not None else None
    return dst if dst is not None else (None, 0)
