# TLS both ways: a memory-BIO engine between the loop's raw transport and a protocol.
#
# Downstream (server side): a chain's protocol (HTTP/1, HTTP/2, Bolt, TCP proxy) over a client
# connection. Upstream (client side, a cluster's UpstreamTlsContext): an upstream protocol
# (HttpUpstream, H2Upstream, Bolt's, the TCP proxy's) over a connection to an endpoint; the
# handshake is done before that protocol is made, so a connect "succeeds" only once the
# upstream's certificate has been verified (as Envoy counts it).
#
# `TlsTransport` is the protocol of the raw (TCP) transport and, once the handshake is done,
# the transport of the chain's protocol (HTTP/1, Bolt, TCP proxy), which does not know it is
# TLS. It owns an ssl.SSLObject over two ssl.MemoryBIOs: ciphertext read from the socket goes
# into `incoming`, plaintext is decrypted straight into the inner protocol's own receive
# buffer; plaintext written by the inner protocol is encrypted into `outgoing`, which is
# flushed to the socket once per write call. The bytes the tls_inspector already read (the
# ClientHello) are fed first, through the same get_buffer/buffer_updated path. The raw
# transport reads into one buffer shared by all connections (copied into `incoming` at once).
#
# `TlsServerConfig` is one filter chain's TLS, built once by the control world
# (fastmesh.tls): the SSLContext, the subject-alt-name matchers applied after the handshake,
# the handshake timeout, the client-cert header policy and the listener's TLS counters.
# `TlsClientConfig` is one cluster's: the SSLContext, SNI, the SAN matchers the upstream's
# certificate must pass, and the session kept for resumption.

from fastmesh._core.stats cimport Counters

cdef enum TlsState:
    TLS_HANDSHAKE = 0           # ClientHello .. Finished; the inner protocol not made yet
    TLS_OPEN = 1                # application data both ways
    TLS_CLOSING = 2             # close() called: close_notify sent, raw transport closing
    TLS_CLOSED = 3              # connection lost (or refused in the handshake)

cdef enum XfccMode:             # Envoy's HCM forward_client_cert_details
    XFCC_SANITIZE = 0           # drop the header (Envoy's default)
    XFCC_FORWARD_ONLY = 1       # pass it on as received (mTLS only; else sanitized)
    XFCC_APPEND_FORWARD = 2     # append this hop's element to it (mTLS only)
    XFCC_SANITIZE_SET = 3       # replace it with this hop's element (mTLS only)
    XFCC_ALWAYS_FORWARD_ONLY = 4  # pass it on as received, whatever the connection

cdef enum XfccDetail:           # set_current_client_cert_details bits
    XFCC_SUBJECT = 1
    XFCC_URI = 2
    XFCC_DNS = 4
    XFCC_CERT = 8
    XFCC_CHAIN = 16


cdef class TlsConfig:
    cdef:
        readonly str name               # the chain's or the cluster's name (logs)
        readonly object context         # ssl.SSLContext, made once
        readonly tuple san_matchers     # ((san_type, kind, value, ignore_case), ...); any
                                        # matching any SAN of its type accepts the peer
        readonly int handshake_timeout_ms   # 0: none
        public dict counters            # "ssl.*": the listener's (shared by its chains) or
                                        # the cluster's
        object loop                     # the worker's event loop (handshake timers), once
                                        # known

    cdef bint san_ok(self, dict cert)


cdef class TlsServerConfig(TlsConfig):
    cdef:
        readonly int xfcc_mode          # XfccMode (HTTP chains)
        readonly int xfcc_details       # XfccDetail bits
        readonly bytes xfcc_by          # b"By=<local URI SAN>;" for each local URI SAN
        public object h2_factory        # the HTTP/2 session's factory, when ALPN may
                                        # choose h2 (None: the chain's protocol only)
        public Counters cx_counters     # the listener's: a connection counts from its
                                        # accept (downstream_cx_total / _active, as Envoy),
                                        # not from the end of its handshake (None: uncounted)


cdef class TlsClientConfig(TlsConfig):
    cdef:
        readonly str sni                # server name sent (None: no SNI, Envoy's default)
        readonly bint resume            # keep a session to resume (max_session_keys > 0)
        public object session           # ssl.SSLSession of the latest handshake, or None


cdef class TlsTransport:
    cdef:
        TlsConfig cfg
        bint client                     # the upstream side (cfg is a TlsClientConfig)
        object waiter                   # client: the connect's future, (self, inner) when
                                        # the handshake is done
        int session_tries               # client: reads left to look for a resumable session
        object inner_factory            # makes the chain's protocol once the handshake is done
        object inner                    # that protocol (BufferedProtocol), or None
        object raw                      # the loop's TCP transport
        object sslobj                   # the C-level SSL object an ssl.SSLObject holds
        object incoming                 # ssl.MemoryBIO: ciphertext from the peer
        object outgoing                 # ssl.MemoryBIO: ciphertext to the peer
        int state                       # TlsState
        bint inner_paused               # the inner protocol paused reading
        bint eof                        # the peer closed its side (TCP FIN)
        bint got_bytes                  # the peer sent something (else an EOF is a probe)
        object timer                    # the handshake timeout, while handshaking
        object original_dst             # (host, port) from the dispatcher, for the inner
        readonly object peer_cert       # the verified peer's certificate (dict), or None
        readonly bytes peer_der         # ... and its DER, or None
        bytes xfcc_element              # this hop's XFCC element, made on first use
        bint counted                    # server: counted in cx_counters until the inner
                                        # protocol (which counts itself) is made, or lost

    # handshake
    cdef void _handshake(self) except *
    cdef void _refuse(self, str reason, str detail) except *
    cdef void _close_quietly(self) except *
    cdef void _established(self) except *
    cdef void _save_session(self) except *
    cdef void _uncount(self)
    # data
    cdef void _decrypt(self) except *
    cdef void _flush(self) except *
    cdef void _fatal(self, exc) except *
    cpdef bytes xfcc(self)
