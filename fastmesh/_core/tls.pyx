"""Downstream TLS termination: a memory-BIO engine. See tls.pxd.

Why a memory BIO and not the loop's own TLS transport (`create_server(ssl=...)` or
`loop.start_tls`): the tls_inspector has already read the ClientHello from the socket to
choose the filter chain (and so the certificate); the loop's TLS transports can only start
from the socket, not from bytes already read. Here those bytes are simply fed first.

Cost per read event: one MemoryBIO.write (a copy of the ciphertext), one SSLObject.read per
TLS record straight into the inner protocol's buffer (no plaintext copy), and the inner
protocol's get_buffer/buffer_updated as without TLS. Per write call: SSLObject.write per
buffer, one MemoryBIO.read and one raw write. No Python object per record beyond the
bytes of the ciphertext written.
"""
import asyncio as _asyncio
import hashlib
import logging
import re
import ssl
from urllib.parse import quote

from fastmesh._core.http1 cimport Head, head_hide_header, head_append_header
from fastmesh._core.stats cimport Counters, LS_CX_TOTAL, LS_CX_ACTIVE

log = logging.getLogger("fastmesh.tls")

# Envoy's names (listener stats "ssl.*"), plus the handshake timeout
TLS_COUNTERS = ("ssl.handshake", "ssl.connection_error", "ssl.fail_verify_no_cert",
                "ssl.fail_verify_error", "ssl.fail_verify_san", "ssl.no_certificate",
                "downstream_cx_transport_socket_connect_timeout",
                "ssl.certificate_rotations")     # new pairs from file-based SDS

cdef Py_ssize_t RECV_BYTES = 65536          # ciphertext read per read event, at most
# One receive buffer for every connection of this process: the loop reads into it and calls
# buffer_updated at once, which copies it into the connection's incoming BIO before the loop
# reads anything else; so no connection keeps a receive buffer of its own while idle.
cdef bytearray _RECV_BUF = bytearray(RECV_BYTES)
cdef object _RECV_VIEW = memoryview(_RECV_BUF)
cdef Py_ssize_t READ_CHUNK_BYTES = 65536    # plaintext asked of SSL_read per call, at most

# ssl.SSLObject is a Python class whose every method (do_handshake, read, write, pending,
# ...) calls the same method of the C-level object it holds: the engine holds that object
# itself (made by SSLContext._wrap_bio, as SSLObject makes it) and calls it directly, a
# Python frame less per call (~10% of a full handshake's CPU here was CPython, measured)
_RAW_WRAP = hasattr(ssl.SSLContext, "_wrap_bio")


cdef object _wrap(ctx, incoming, outgoing, bint server_side, str hostname, session):
    if _RAW_WRAP:
        return ctx._wrap_bio(incoming, outgoing, server_side, hostname, owner=None,
                             session=session)
    return ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                        server_hostname=hostname, session=session)


_SSLWantRead = ssl.SSLWantReadError
_SSLWantWrite = ssl.SSLWantWriteError
_SSLZeroReturn = ssl.SSLZeroReturnError
_SSLError = ssl.SSLError
_SSLCertVerificationError = ssl.SSLCertVerificationError


def new_counters():
    return {k: 0 for k in TLS_COUNTERS}


# ------------------------------------------------------------------------ configuration

cdef bint _string_match(tuple m, str value):
    cdef str kind = m[1]
    target = m[2]
    if m[3] and kind != "safe_regex":
        value = value.lower()
    if kind == "exact":
        return value == target
    if kind == "prefix":
        return value.startswith(target)
    if kind == "suffix":
        return value.endswith(target)
    if kind == "contains":
        return target in value
    if kind == "safe_regex":
        return target.fullmatch(value) is not None
    return False


cdef tuple _compile_san_matchers(san_matchers):
    out = []
    for san_type, kind, value, ignore_case in san_matchers:
        if kind == "safe_regex":
            value = re.compile(value)
        elif ignore_case:
            value = value.lower()
        out.append((san_type, kind, value, bool(ignore_case)))
    return tuple(out)


cdef class TlsConfig:
    def __init__(self, str name, context, san_matchers=(), int handshake_timeout_ms=0,
                 counters=None):
        self.name = name
        self.context = context
        self.san_matchers = _compile_san_matchers(san_matchers)
        self.handshake_timeout_ms = handshake_timeout_ms
        self.counters = counters if counters is not None else new_counters()

    cdef bint san_ok(self, dict cert):
        """Envoy's match_typed_subject_alt_names: accepted when any matcher matches any
        SAN of its type."""
        sans = cert.get("subjectAltName", ()) if cert else ()
        for m in self.san_matchers:
            for typ, value in sans:
                if typ == m[0] and _string_match(m, value):
                    return True
        return False


cdef class TlsServerConfig(TlsConfig):
    def __init__(self, str name, context, san_matchers=(), int handshake_timeout_ms=10000,
                 counters=None, int xfcc_mode=XFCC_SANITIZE, int xfcc_details=0,
                 local_uri_sans=()):
        TlsConfig.__init__(self, name, context, san_matchers, handshake_timeout_ms, counters)
        self.xfcc_mode = xfcc_mode
        self.xfcc_details = xfcc_details
        self.xfcc_by = b"".join(b"By=" + _xfcc_escape(u).encode() + b";"
                                for u in local_uri_sans)

    def factory(self, inner_factory):
        """The protocol factory of a TLS chain: each connection gets a TlsTransport that
        makes the chain's protocol once the handshake has succeeded."""
        cfg = self
        return lambda: TlsProtocol(cfg, inner_factory)


# Envoy's cluster stats "ssl.*" (the upstream side)
TLS_CLIENT_COUNTERS = ("ssl.handshake", "ssl.connection_error", "ssl.fail_verify_error",
                       "ssl.fail_verify_san", "ssl.session_reused")

cdef int SESSION_TRIES = 4     # reads of a new connection that may bring a TLS 1.3 ticket


cdef class TlsClientConfig(TlsConfig):
    def __init__(self, str name, context, str sni=None, san_matchers=(), bint resume=True):
        TlsConfig.__init__(self, name, context, san_matchers, 0,
                           {k: 0 for k in TLS_CLIENT_COUNTERS})
        self.sni = sni
        self.resume = resume


async def open_tls(loop, factory, TlsClientConfig cfg, str host, int port):
    """Connect to host:port and do the TLS handshake; then make the protocol `factory`
    makes, with the TLS transport as its transport. Returns (transport, protocol), as
    loop.create_connection does; fails (ConnectionError, ssl.SSLError) when the upstream
    refuses us or its certificate does not pass. Cancelling it (the connect timeout)
    aborts the connection."""
    waiter = loop.create_future()
    proto = TlsProtocol(cfg, factory, waiter)
    try:
        await loop.create_connection(lambda: proto, host, port)
        return await waiter
    except BaseException:
        proto.abort()
        raise


# ------------------------------------------------------------------------ the engine

cdef class TlsTransport:
    """Protocol of the raw transport, transport of the chain's protocol."""

    def __init__(self, TlsConfig cfg, inner_factory, waiter=None):
        self.cfg = cfg
        self.inner_factory = inner_factory
        self.state = TLS_HANDSHAKE
        self.client = isinstance(cfg, TlsClientConfig)
        self.waiter = waiter

    # -- as the raw transport's protocol ------------------------------------------------

    def connection_made(self, transport):
        self.raw = transport
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        cdef TlsClientConfig ccfg
        if self.client:
            ccfg = <TlsClientConfig>self.cfg
            self.sslobj = _wrap(ccfg.context, self.incoming, self.outgoing, False, ccfg.sni,
                                ccfg.session if ccfg.resume else None)
            self.session_tries = SESSION_TRIES if ccfg.resume else 0
            try:
                self._handshake()           # the ClientHello
            except BaseException as exc:
                self._fatal(exc)
            return
        self.sslobj = _wrap(self.cfg.context, self.incoming, self.outgoing, True, None, None)
        cdef Counters cx = (<TlsServerConfig>self.cfg).cx_counters
        if cx is not None:
            cx.v[LS_CX_TOTAL] += 1
            cx.v[LS_CX_ACTIVE] += 1
            self.counted = True
        if self.cfg.handshake_timeout_ms > 0:
            if self.cfg.loop is None:       # (Python 3.11's get_running_loop is a getpid())
                self.cfg.loop = _asyncio.get_running_loop()
            self.timer = self.cfg.loop.call_later(self.cfg.handshake_timeout_ms / 1000.0,
                                                  self._on_handshake_timeout)

    def set_original_dst(self, str host, int port):
        self.original_dst = (host, port)

    def get_buffer(self, Py_ssize_t sizehint):
        return _RECV_VIEW

    def buffer_updated(self, Py_ssize_t nbytes):
        self.got_bytes = True
        try:
            self.incoming.write(_RECV_VIEW[:nbytes])
            if self.state == TLS_HANDSHAKE:
                self._handshake()
            if self.state == TLS_OPEN:
                self._decrypt()
                if self.outgoing.pending:       # post-handshake messages (key update)
                    self._flush()
        except BaseException as exc:
            self._fatal(exc)

    def eof_received(self):
        self.eof = True
        if self.state == TLS_HANDSHAKE:
            if self.got_bytes:
                self._refuse("ssl.connection_error", "the peer closed during the handshake")
            else:                       # a TCP connect-and-close (a port probe): no TLS error
                self._close_quietly()
            return False
        if self.state != TLS_OPEN or self.inner is None:
            return False
        try:
            self._decrypt()
            if self.inner_paused:
                return True                     # the rest is given on resume_reading
            return bool(self.inner.eof_received())
        except BaseException as exc:
            self._fatal(exc)
            return False

    def connection_lost(self, exc):
        cdef int was = self.state
        self.state = TLS_CLOSED
        self._uncount()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._fail_waiter(exc or ConnectionResetError("connection closed in the TLS handshake"))
        if self.inner is not None and was != TLS_HANDSHAKE:
            inner, self.inner = self.inner, None
            inner.connection_lost(exc)

    def pause_writing(self):
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self):
        if self.inner is not None:
            self.inner.resume_writing()

    # -- handshake -------------------------------------------------------------------

    def _on_handshake_timeout(self):
        self.timer = None
        if self.state == TLS_HANDSHAKE:
            self.cfg.counters["downstream_cx_transport_socket_connect_timeout"] += 1
            log.debug("tls %s: handshake timed out", self.cfg.name)
            self.state = TLS_CLOSED
            self.raw.abort()

    cdef void _handshake(self) except *:
        try:
            self.sslobj.do_handshake()
        except _SSLWantRead:
            if self.outgoing.pending:
                self._flush()
            return
        except _SSLCertVerificationError as exc:
            self._flush()               # the alert
            self._refuse("ssl.fail_verify_error", str(exc.verify_message or exc))
            return
        except _SSLError as exc:
            self._flush()
            if exc.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE",
                              "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
                self._refuse("ssl.fail_verify_no_cert", exc.reason)
            else:
                self._refuse("ssl.connection_error", exc.reason or str(exc))
            return
        cert = self.sslobj.getpeercert()
        if self.cfg.san_matchers and cert and not self.cfg.san_ok(cert):
            # TLS 1.2: our Finished is still in the outgoing BIO and is never sent, so the
            # client's handshake fails; TLS 1.3: the client sees the close at its first read
            self._refuse("ssl.fail_verify_san", "no subject alt name matched")
            return
        self._flush()
        self.cfg.counters["ssl.handshake"] += 1
        if cert:
            self.peer_cert = cert
        elif not self.client:
            self.cfg.counters["ssl.no_certificate"] += 1
        if self.client and self.sslobj.session_reused:
            self.cfg.counters["ssl.session_reused"] += 1
        self._established()

    cdef void _refuse(self, str reason, str detail) except *:
        self.cfg.counters[reason] += 1
        log.debug("tls %s: handshake refused: %s (%s)", self.cfg.name, reason, detail)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = TLS_CLOSED
        self._fail_waiter(ConnectionRefusedError(f"TLS handshake with the upstream failed: "
                                                 f"{reason[4:]}: {detail}"))
        self.raw.close()                # what is queued (an alert) goes out, then FIN

    def _fail_waiter(self, exc):
        # client: the connect fails with exc (once; after the handshake it is done)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            if not waiter.done():
                waiter.set_exception(exc)

    cdef void _close_quietly(self) except *:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = TLS_CLOSED
        self.raw.close()

    cdef void _established(self) except *:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = TLS_OPEN
        if self.client:
            self._save_session()
            inner = self.inner_factory()
            self.inner = inner
            inner.connection_made(self)
            if self.waiter is not None:
                waiter, self.waiter = self.waiter, None
                if not waiter.done():
                    waiter.set_result((self, inner))
        else:
            if (<TlsServerConfig>self.cfg).h2_factory is not None and \
                    self.sslobj.selected_alpn_protocol() == "h2":
                inner = (<TlsServerConfig>self.cfg).h2_factory()   # ALPN chose HTTP/2
            else:
                inner = self.inner_factory()
            self.inner = inner
            if self.original_dst is not None:
                inner.set_original_dst(*self.original_dst)
            if self.counted:                    # the inner protocol counts it from here
                self._uncount()
                (<TlsServerConfig>self.cfg).cx_counters.v[LS_CX_TOTAL] -= 1
            inner.connection_made(self)
        if self.state == TLS_OPEN:
            self._decrypt()             # application data that came with the Finished
            if self.eof and self.inner is not None and not self.inner_paused:
                if not self.inner.eof_received():
                    self.close()

    cdef void _uncount(self):
        if self.counted:
            self.counted = False
            (<TlsServerConfig>self.cfg).cx_counters.v[LS_CX_ACTIVE] -= 1

    cdef void _save_session(self) except *:
        # client: keep the session for the next connection to resume (Envoy's
        # max_session_keys: 1). A TLS 1.3 session is resumable only once the server's
        # ticket has come, after the handshake: so looked for again on the first reads.
        cdef TlsClientConfig c = <TlsClientConfig>self.cfg
        if self.session_tries <= 0:
            return
        self.session_tries -= 1
        sess = self.sslobj.session
        if sess is None:
            return
        if sess.has_ticket or self.sslobj.version() != "TLSv1.3":
            c.session = sess
            self.session_tries = 0

    # -- data ------------------------------------------------------------------------

    cdef void _decrypt(self) except *:
        """Everything decryptable now, into the inner protocol's buffer, until it pauses."""
        cdef Py_ssize_t n
        sslobj = self.sslobj
        incoming = self.incoming
        while self.inner is not None and not self.inner_paused and self.state == TLS_OPEN:
            if not incoming.pending and not sslobj.pending():
                return
            buf = self.inner.get_buffer(READ_CHUNK_BYTES)
            try:
                n = sslobj.read(min(len(buf), READ_CHUNK_BYTES), buf)
            except _SSLWantRead:
                return                  # a partial record: the rest comes later
            except _SSLZeroReturn:
                # close_notify: the peer will send no more; as an EOF to the inner protocol
                if self.outgoing.pending:
                    self._flush()
                inner = self.inner
                if inner is not None and not inner.eof_received():
                    self.close()
                return
            if n == 0:
                return
            if self.session_tries > 0:
                self._save_session()
            self.inner.buffer_updated(n)

    cdef void _flush(self) except *:
        if self.outgoing.pending and not self.raw.is_closing():
            self.raw.write(self.outgoing.read())

    cdef void _fatal(self, exc) except *:
        self._fail_waiter(exc)
        if isinstance(exc, _SSLError):
            self.cfg.counters["ssl.connection_error"] += 1
            log.debug("tls %s: %s", self.cfg.name, exc)
        else:
            log.error("tls %s: internal error on a %s connection", self.cfg.name,
                      "server" if self.client else "client", exc_info=exc)
        self.state = TLS_CLOSED
        if self.raw is not None:
            self.raw.abort()

    # -- as the inner protocol's transport --------------------------------------------

    def write(self, data):
        if self.state != TLS_OPEN:
            return
        try:
            self.sslobj.write(data)
        except _SSLError as exc:
            self._fatal(exc)
            return
        self._flush()

    def writelines(self, list_of_data):
        if self.state != TLS_OPEN:
            return
        try:
            for data in list_of_data:
                if len(data):
                    self.sslobj.write(data)
        except _SSLError as exc:
            self._fatal(exc)
            return
        self._flush()

    def can_write_eof(self):
        return False                    # TLS has close_notify, no half-close

    def write_eof(self):
        raise NotImplementedError("TLS connections cannot half-close")

    def close(self):
        if self.state == TLS_OPEN:
            self.state = TLS_CLOSING
            try:
                self.sslobj.shutdown()  # queues our close_notify
            except (_SSLWantRead, _SSLWantWrite, _SSLError):
                pass
            self._flush()
        self.raw.close()

    def abort(self):
        if self.state == TLS_OPEN:
            self.state = TLS_CLOSING
        if self.raw is not None:
            self.raw.abort()

    def is_closing(self):
        return self.state != TLS_OPEN or self.raw.is_closing()

    def pause_reading(self):
        if not self.inner_paused:
            self.inner_paused = True
            if self.raw.is_reading():
                self.raw.pause_reading()

    def resume_reading(self):
        if self.inner_paused:
            self.inner_paused = False
            if self.state != TLS_OPEN:
                return
            try:
                self._decrypt()         # what was decryptable before the pause
                if self.eof and not self.inner_paused and self.inner is not None:
                    if not self.inner.eof_received():
                        self.close()
                    return
            except BaseException as exc:
                self._fatal(exc)
                return
            if not self.inner_paused and not self.raw.is_closing():
                self.raw.resume_reading()

    def is_reading(self):
        return not self.inner_paused and self.state == TLS_OPEN

    def set_write_buffer_limits(self, high=None, low=None):
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self):
        return self.raw.get_write_buffer_size() + self.outgoing.pending

    def get_write_buffer_limits(self):
        return self.raw.get_write_buffer_limits()

    def get_protocol(self):
        return self.inner

    def set_protocol(self, protocol):
        self.inner = protocol

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self.sslobj
        if name == "peercert":
            return self.peer_cert
        if name == "cipher":
            return self.sslobj.cipher()
        if name == "sslcontext":
            return self.cfg.context
        if name == "tls_version":
            return self.sslobj.version()
        if name == "peer_uri_san":
            return _sans_of(self.peer_cert, "URI")
        return self.raw.get_extra_info(name, default)

    # -- downstream identity (XFCC) ----------------------------------------------------

    cpdef bytes xfcc(self):
        """This hop's x-forwarded-client-cert element (Envoy's format), or None when the
        peer presented no certificate."""
        cdef TlsServerConfig cfg = <TlsServerConfig>self.cfg
        cdef int d = cfg.xfcc_details
        if self.xfcc_element is not None or self.peer_cert is None or self.client:
            return self.xfcc_element
        der = self.sslobj.getpeercert(True)
        parts = [cfg.xfcc_by, b"Hash=", hashlib.sha256(der).hexdigest().encode()]
        if d & XFCC_CERT:
            parts += [b";Cert=", quote(ssl.DER_cert_to_PEM_cert(der), safe="").encode()]
        if d & XFCC_CHAIN:
            parts += [b";Chain=", quote(ssl.DER_cert_to_PEM_cert(der), safe="").encode()]
        if d & XFCC_SUBJECT:
            parts += [b';Subject="', _rfc2253(der).replace('"', '\\"').encode(), b'"']
        if d & XFCC_URI:
            for u in _sans_of(self.peer_cert, "URI"):
                parts += [b";URI=", _xfcc_escape(u).encode()]
        if d & XFCC_DNS:
            for u in _sans_of(self.peer_cert, "DNS"):
                parts += [b";DNS=", _xfcc_escape(u).encode()]
        self.xfcc_element = b"".join(parts)
        return self.xfcc_element


class TlsProtocol(TlsTransport, _asyncio.BufferedProtocol):
    """The loop calls get_buffer/buffer_updated on BufferedProtocols only."""
    pass


cdef tuple _sans_of(cert, str typ):
    if not cert:
        return ()
    return tuple(v for t, v in cert.get("subjectAltName", ()) if t == typ)


cdef str _xfcc_escape(str v):
    # Envoy quotes a value holding , ; = or " (the element's own separators)
    if any(ch in v for ch in ',;="'):
        return '"' + v.replace('"', '\\"') + '"'
    return v


def _rfc2253(bytes der):
    from cryptography import x509
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


# ------------------------------------------------------------------------ HTTP hook

cdef class TlsHttpHook:
    """Per-request HTTP work on a TLS chain (ListenerCtx.tls_http): x-forwarded-proto:
    https, and forward_client_cert_details (XFCC) applied to the parsed head before routing,
    so routes can match on the header (as Envoy's HCM does it before its router)."""
    cdef readonly int mode
    cdef readonly bint https

    def __init__(self, int mode=XFCC_SANITIZE, bint https=True):
        self.mode = mode
        self.https = https

    def on_request(self, Head h, transport):
        cdef TlsTransport t = transport if isinstance(transport, TlsTransport) else None
        cdef bytes mine
        h.https = self.https
        if self.mode == XFCC_ALWAYS_FORWARD_ONLY:
            return
        mine = t.xfcc() if t is not None else None
        if mine is None:                # not mTLS: sanitized, whatever the mode
            head_hide_header(h, b"x-forwarded-client-cert", 23)
            return
        if self.mode == XFCC_FORWARD_ONLY:
            return
        if self.mode == XFCC_SANITIZE:
            head_hide_header(h, b"x-forwarded-client-cert", 23)
            return
        if self.mode == XFCC_APPEND_FORWARD:
            old = h.header_value(b"x-forwarded-client-cert", 23)
            if old:
                mine = old + b"," + mine
        head_hide_header(h, b"x-forwarded-client-cert", 23)
        head_append_header(h, b"x-forwarded-client-cert", mine)
