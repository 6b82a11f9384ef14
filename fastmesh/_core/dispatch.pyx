"""Listener filters and filter-chain selection: which of a listener's chains serves a new
connection, decided once per connection before any protocol work starts.

A listener with one chain and no listener filters never comes here: its protocol object is
made by the loop at accept. Otherwise the loop makes a `Dispatch` per connection, which:

1. reads the original destination (SO_ORIGINAL_DST) when the listener has the original_dst
   filter, else takes the socket's local address;
2. hands the connection to the listener bound to that address when the listener says so
   (Envoy's use_original_dst: Istio's virtual outbound listener on 15001);
3. reads the first bytes when a chain match needs them (server name, transport or
   application protocol), until `sniff` decides or the sniffing timeout passes;
4. picks the chain by Envoy's filter_chain_match rules and gives the transport, and the
   bytes read so far, to a new protocol object of that chain.

Each step is bounded: bytes read while sniffing are capped, and a connection that says
nothing is decided (as raw TCP) or closed at the timeout, and counted either way.
"""
import asyncio
import logging
import socket

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memcpy

from fastmesh._core.sniff cimport (SniffResult, sniff_bytes, original_dst_of, SNIFF_MORE,
                                   SNIFF_TCP, SNIFF_HTTP1, SNIFF_H2C, SNIFF_BOLT, SNIFF_TLS,
                                   SNIFF_MAX_CLIENT_HELLO_BYTES)
from fastmesh._core.stats cimport Counters

log = logging.getLogger("fastmesh.listener")

cdef Py_ssize_t SNIFF_BUFFER_BYTES = SNIFF_MAX_CLIENT_HELLO_BYTES + 1024

# Dispatch counters (listener slots are a C array in stats; these live on the Dispatcher and
# are reported with the listener's counters)
DISPATCH_COUNTERS = ("sniffed_http1", "sniffed_h2c", "sniffed_bolt", "sniffed_tls",
                     "sniffed_tcp", "sniff_timeout", "no_filter_chain_match",
                     "original_dst_restored", "handed_off")


# ------------------------------------------------------------------------ addresses

cdef tuple _ip_key(str ip):
    """(family bits 32|128, integer) of an IP literal; None if it is not one."""
    try:
        if ":" in ip:
            return (128, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big"))
        return (32, int.from_bytes(socket.inet_aton(ip), "big"))
    except (OSError, ValueError):
        return None


def cidr_key(str text):
    """"10.0.0.0/8" (or an address alone: a host prefix) -> (bits, network int, prefix len)."""
    ip, _, plen = text.partition("/")
    k = _ip_key(ip)
    if k is None:
        raise ValueError(f"{text!r}: not an IP address or CIDR")
    bits = k[0]
    n = bits if not plen else int(plen)
    if not 0 <= n <= bits:
        raise ValueError(f"{text!r}: prefix length out of range")
    mask = ((1 << n) - 1) << (bits - n) if n else 0
    return (bits, k[1] & mask, n)


cdef int _longest_prefix(tuple cidrs, tuple ip) except -2:
    """Length of the longest of cidrs holding ip; -1 when none does."""
    cdef int best = -1, n, bits
    if ip is None:
        return -1
    bits = ip[0]
    for c in cidrs:
        if c[0] != bits:
            # an IPv4 address arriving on an IPv6 socket reads as ::ffff:a.b.c.d: _ip_key
            # already unmapped it, so families compare as they are
            continue
        n = c[2]
        if n > best and (ip[1] >> (bits - n) if n else 0) == (c[1] >> (bits - n) if n else 0):
            best = n
    return best


# ------------------------------------------------------------------------ chain matching

cdef class ChainMatch:
    """One chain's filter_chain_match, compiled. Empty fields match anything."""
    cdef:
        readonly int destination_port          # 0: any
        readonly tuple destination_cidrs       # ((bits, net, plen), ...)
        readonly tuple server_names            # exact names and "*.suffix" wildcards
        readonly str transport_protocol        # "raw_buffer" | "tls" | None
        readonly tuple application_protocols
        readonly tuple source_cidrs
        readonly tuple source_ports

    def __init__(self, int destination_port=0, destination_cidrs=(), server_names=(),
                 transport_protocol=None, application_protocols=(), source_cidrs=(),
                 source_ports=()):
        self.destination_port = destination_port
        self.destination_cidrs = tuple(cidr_key(c) for c in destination_cidrs)
        self.server_names = tuple(s.lower() for s in server_names)
        self.transport_protocol = transport_protocol
        self.application_protocols = tuple(application_protocols)
        self.source_cidrs = tuple(cidr_key(c) for c in source_cidrs)
        self.source_ports = tuple(source_ports)

    @property
    def needs_bytes(self):
        return bool(self.server_names or self.transport_protocol or self.application_protocols)


cdef int _server_name_rank(tuple names, str sni):
    """How well a chain's server_names match: 1 << 20 for an exact name, else the length of
    the longest matching "*.suffix" wildcard (Envoy: the most specific wins); -1 none."""
    cdef int best = -1
    if sni is None:
        return -1
    for name in names:
        if name == sni:
            return 1 << 20
        if name.startswith("*.") and sni.endswith(name[1:]) and len(sni) > len(name) - 1:
            if len(name) > best:
                best = len(name)
        elif name.startswith(".") and sni.endswith(name):
            if len(name) > best:
                best = len(name)
    return best


cdef list _narrow(list cands, list ranks):
    """Envoy's rule at each step: the chains that state the criterion and match it best
    (highest rank >= 0); if none does, those that do not state it (rank None)."""
    cdef int best = -1
    out = []
    for i, r in enumerate(ranks):
        if r is not None and r >= 0 and r > best:
            best = r
    if best >= 0:
        for i, r in enumerate(ranks):
            if r is not None and r == best:
                out.append(cands[i])
        return out
    for i, r in enumerate(ranks):
        if r is None:
            out.append(cands[i])
    return out


cdef bint _any_in(tuple offered, tuple listed):
    for p in offered:
        if p in listed:
            return True
    return False


cpdef int select_chain(tuple matches, str dst_ip, int dst_port, str server_name,
                       str transport, tuple app_protocols, str src_ip, int src_port) except -2:
    """The index of the chain serving a connection, by Envoy's filter_chain_match order:
    destination port, destination IP, server name, transport protocol, application
    protocols, source IP, source port; at each step the most specific match wins and chains
    that do not state the criterion are the fallback. -1: no chain matches."""
    cdef list cands = list(range(len(matches)))
    cdef ChainMatch m
    cdef tuple dk = _ip_key(dst_ip) if dst_ip else None
    cdef tuple sk = _ip_key(src_ip) if src_ip else None
    if not cands:
        return -1
    # destination port
    cands = _narrow(cands, [None if (<ChainMatch>matches[i]).destination_port == 0 else
                            (0 if (<ChainMatch>matches[i]).destination_port == dst_port else -1)
                            for i in cands])
    # destination IP
    cands = _narrow(cands, [None if not (<ChainMatch>matches[i]).destination_cidrs else
                            _longest_prefix((<ChainMatch>matches[i]).destination_cidrs, dk)
                            for i in cands])
    # server names (TLS SNI)
    cands = _narrow(cands, [None if not (<ChainMatch>matches[i]).server_names else
                            _server_name_rank((<ChainMatch>matches[i]).server_names, server_name)
                            for i in cands])
    # transport protocol
    cands = _narrow(cands, [None if (<ChainMatch>matches[i]).transport_protocol is None else
                            (0 if (<ChainMatch>matches[i]).transport_protocol == transport else -1)
                            for i in cands])
    # application protocols (any offered one listed)
    ranks = []
    for i in cands:
        m = matches[i]
        if not m.application_protocols:
            ranks.append(None)
        else:
            ranks.append(0 if _any_in(app_protocols, m.application_protocols) else -1)
    cands = _narrow(cands, ranks)
    # source IP
    cands = _narrow(cands, [None if not (<ChainMatch>matches[i]).source_cidrs else
                            _longest_prefix((<ChainMatch>matches[i]).source_cidrs, sk)
                            for i in cands])
    # source port
    cands = _narrow(cands, [None if not (<ChainMatch>matches[i]).source_ports else
                            (0 if src_port in (<ChainMatch>matches[i]).source_ports else -1)
                            for i in cands])
    return cands[0] if cands else -1


# ------------------------------------------------------------------------ the dispatcher

cdef class Dispatcher:
    """A listener's connection dispatch: its chains, listener filters and counters. The
    control world (fastmesh.listener) builds it and replaces `chains` on a config change."""
    cdef:
        public str name
        public tuple matches            # ChainMatch per chain
        public tuple factories          # protocol factory per chain (each takes no argument)
        public object default_factory   # the default chain's (what no chain matches), or None
        public int inspect              # SniffWhich bits: inspectors the listener runs
        public bint needs_bytes         # some chain matches on what sniffing finds
        public bint original_dst        # the original_dst listener filter
        public object hand_off          # callable((ip, port)) -> Dispatcher or None
        public int sniff_timeout_ms     # 0: wait for ever
        public bint continue_on_timeout # at the timeout: decide with what is known (else close)
        public set pending              # connections being sniffed (for drain)
        public dict counters
        public object loop

    def __init__(self, str name, loop):
        self.name = name
        self.loop = loop
        self.matches = ()
        self.factories = ()
        self.default_factory = None
        self.inspect = 0
        self.needs_bytes = False
        self.original_dst = False
        self.hand_off = None
        self.sniff_timeout_ms = 0
        self.continue_on_timeout = True
        self.pending = set()
        self.counters = {k: 0 for k in DISPATCH_COUNTERS}

    def protocol(self):
        return DispatchProtocol(self)

    def abort_pending(self):
        cdef Dispatch c
        for c in list(self.pending):
            c._finish()
            if c.transport is not None:
                c.transport.abort()


cdef class Dispatch:
    """One connection from accept until its chain's protocol takes it."""
    cdef:
        Dispatcher d
        object transport
        bytearray buf
        Py_ssize_t n
        object timer
        str dst_ip
        int dst_port
        str src_ip
        int src_port
        bint done
        bint redirected             # the destination came from conntrack (not this socket)
        object proto                # the chain's protocol, once chosen
        object transport_after      # its transport, while an EOF may still be passed on

    def __init__(self, Dispatcher d):
        self.d = d

    def connection_made(self, transport):
        cdef Dispatcher d = self.d
        cdef Dispatcher target
        self.transport = transport
        sock = transport.get_extra_info("socket")
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self.dst_ip, self.dst_port = _unmap(local)
        self.src_ip, self.src_port = _unmap(peer)
        self.redirected = False
        if d.original_dst and sock is not None:
            od = original_dst_of(sock.fileno(), sock.family)
            if od is not None:
                self.dst_ip, self.dst_port = od
                self.redirected = True
                d.counters["original_dst_restored"] += 1
        if d.hand_off is not None:
            target = d.hand_off((self.dst_ip, self.dst_port))
            if target is not None and target is not d:
                d.counters["handed_off"] += 1
                self.d = d = target
        if not d.needs_bytes or not d.inspect:
            self._decide(None)
            return
        d.pending.add(self)
        self.buf = bytearray(1024)
        if d.sniff_timeout_ms > 0:
            self.timer = d.loop.call_later(d.sniff_timeout_ms / 1000.0, self._on_timeout)

    def get_buffer(self, Py_ssize_t sizehint):
        # grows by doubling up to the cap; _try decides once the cap is full, so a read
        # always has room
        if self.n == len(self.buf):
            self.buf.extend(bytes(min(len(self.buf), SNIFF_BUFFER_BYTES - len(self.buf))))
        return memoryview(self.buf)[self.n:]

    def buffer_updated(self, Py_ssize_t nbytes):
        self.n += nbytes
        self._try(False)

    def eof_received(self):
        # the client sent all it will: decide with that, and tell the chosen protocol
        if not self.done:
            self._try(True)
        if self.proto is not None and self.transport_after is not None:
            transport, self.transport_after = self.transport_after, None
            if not self.proto.eof_received():
                transport.close()
        return True

    def connection_lost(self, exc):
        if not self.done:
            self._finish()

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    cdef void _try(self, bint eof) except *:
        cdef const unsigned char *p = <const unsigned char *>(<char *>self.buf)
        cdef SniffResult r = sniff_bytes(p, self.n, self.d.inspect, eof)
        if r.kind != SNIFF_MORE:
            self._decide(r)
        elif self.n >= SNIFF_BUFFER_BYTES:
            self._decide(None)

    def _on_timeout(self):
        self.timer = None
        if self.done:
            return
        self.d.counters["sniff_timeout"] += 1
        if self.d.continue_on_timeout:
            self._decide(None)
        else:
            self._finish()
            self.transport.abort()

    cdef void _finish(self):
        self.done = True
        self.d.pending.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    cdef void _decide(self, SniffResult r) except *:
        cdef Dispatcher d = self.d
        cdef str transport_proto = "raw_buffer"
        cdef tuple apps = ()
        cdef str sni = None
        self._finish()
        if r is not None:
            if r.kind == SNIFF_TLS:
                transport_proto = "tls"
                apps = r.alpn
                sni = r.server_name
                d.counters["sniffed_tls"] += 1
            elif r.kind == SNIFF_HTTP1:
                apps = (r.http_version,)
                d.counters["sniffed_http1"] += 1
            elif r.kind == SNIFF_H2C:
                apps = ("h2c",)
                d.counters["sniffed_h2c"] += 1
            elif r.kind == SNIFF_BOLT:
                apps = ("bolt",)
                d.counters["sniffed_bolt"] += 1
            else:
                d.counters["sniffed_tcp"] += 1
        i = select_chain(d.matches, self.dst_ip, self.dst_port, sni, transport_proto, apps,
                         self.src_ip, self.src_port)
        if i < 0 and d.default_factory is None:
            d.counters["no_filter_chain_match"] += 1
            self.transport.abort()
            return
        proto = d.factories[i]() if i >= 0 else d.default_factory()
        if self.redirected:
            proto.set_original_dst(self.dst_ip, self.dst_port)
        transport = self.transport
        self.transport = None
        self.proto = proto
        self.transport_after = transport
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self.n:
            _feed(proto, self.buf, self.n)
        self.buf = None


class DispatchProtocol(Dispatch, asyncio.BufferedProtocol):
    pass


cdef tuple _unmap(addr):
    if not addr:
        return (None, 0)
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, addr[1])


cdef void _feed(proto, bytearray data, Py_ssize_t n) except *:
    """Give a protocol object bytes it did not read itself, through its own buffer."""
    cdef Py_ssize_t off = 0, k
    while off < n:
        buf = proto.get_buffer(n - off)
        mv = memoryview(buf)
        k = min(len(mv), n - off)
        mv[:k] = memoryview(data)[off:off + k]
        mv.release()
        proto.buffer_updated(k)
        off += k
