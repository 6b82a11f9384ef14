"""The typed configuration model: what a config file means, after validation.

Every class here is a frozen dataclass built only by ``fastmesh.config.load``; the data
world never sees these objects, only the snapshot compiled from them (``fastmesh.snapshot``).
Defaults live here and nowhere else; the README's config reference is written from this file.
Units are in the names: ``*_ms`` milliseconds, ``*_bytes`` bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PROTOCOLS = ("http1", "http2", "bolt", "tcp")   # http2: h2c with prior knowledge
LISTENER_PROTOCOLS = PROTOCOLS + ("auto",)         # auto: sniffed per connection
INSPECTORS = ("http", "tls", "bolt")               # what a listener reads first bytes for
TRANSPORT_PROTOCOLS = ("raw_buffer", "tls")
LB_POLICIES = ("round_robin", "random", "least_request", "ring_hash", "maglev")
HASH_POLICY_KINDS = ("header", "cookie", "source_ip", "query_parameter")

DEFAULT_ADMIN_ADDRESS = "127.0.0.1:9901"
DEFAULT_ROUTE_TIMEOUT_MS = 15000


@dataclass(frozen=True)
class Address:
    host: str          # IP literal or hostname ("" never: validated)
    port: int          # 0..65535 (0 = let the kernel choose; listeners only)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """"host:port" or "[v6]:port" as to_dict writes it (already validated) -> Address."""
    host, _, port = text.rpartition(":")
    return Address(host[1:-1] if host.startswith("[") else host, int(port))


@dataclass(frozen=True)
class HeaderMatch:
    name: str                          # lower-cased header name (Bolt: header key, as given)
    exact: Optional[str] = None        # exactly one of exact / prefix / regex / present is set
    prefix: Optional[str] = None
    regex: Optional[str] = None        # Python `re` syntax, full match
    present: Optional[bool] = None     # True: header must exist; False: must be absent


@dataclass(frozen=True)
class RouteMatch:
    path: Optional[str] = None         # exact path (query string excluded)
    prefix: Optional[str] = None       # path prefix (query string excluded)
    regex: Optional[str] = None        # full match on the path (query string excluded)
    headers: tuple[HeaderMatch, ...] = ()
    # none of path/prefix/regex set: matches every path (Bolt routes use headers only)


@dataclass(frozen=True)
class WeightedCluster:
    cluster: str
    weight: int                        # > 0; share = weight / sum(weights)


@dataclass(frozen=True)
class DirectResponse:
    status: int                        # 200..599
    body: str = ""


RETRY_ON = ("5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx",
            "retriable-status-codes", "refused-stream")


@dataclass(frozen=True)
class RetryPolicy:
    """Envoy's route.v3.RetryPolicy, for HTTP/1 requests without a body (their body is
    streamed upstream, not kept, so they are never retried); on a Bolt route, calls are
    retried (a copy of each call is kept while it is in flight)."""
    retry_on: tuple[str, ...]                     # names from RETRY_ON
    num_retries: int = 1
    per_try_timeout_ms: int = 0                   # 0: the route timeout bounds each try
    retriable_status_codes: tuple[int, ...] = ()
    backoff_base_ms: int = 25                     # jittered exponential back-off between tries
    backoff_max_ms: Optional[int] = None          # default 10 x base
    previous_hosts: bool = False                  # retry on an endpoint not tried yet
    host_selection_retry_max_attempts: int = 1
    # Bolt routes: the response statuses retried (6 no processor, 7 timeout, ...); a lost
    # connection is retried under reset / connect-failure / 5xx / gateway-error
    bolt_statuses: tuple[int, ...] = ()


@dataclass(frozen=True)
class HashPolicy:
    """What of a request a ring_hash / maglev cluster hashes (Envoy's route hash_policy)."""
    kind: str                                     # one of HASH_POLICY_KINDS
    name: str = ""                                # header / cookie / query parameter name
    terminal: bool = False                        # a hash from this one: the later ones skipped


HTTP_FILTERS = ("fault", "local_rate_limit")


@dataclass(frozen=True)
class Fault:
    """Fault injection (Envoy's envoy.filters.http.fault): delay, then abort, a share of the
    requests. Shares are per million; the *_header ones let a request's
    x-envoy-fault-{delay,abort}-request header choose (and its -percentage header the
    share, counted in units worth *_header_unit per million)."""
    abort_status: int = 0                         # 0: none (unless a header gives one)
    abort_per_million: int = 0
    abort_from_header: bool = False
    abort_header_unit: int = 10000                # a percentage of HUNDRED: 1 = 10,000 ppm
    delay_ms: int = 0
    delay_per_million: int = 0
    delay_from_header: bool = False
    delay_header_unit: int = 10000
    max_active_faults: int = 0                    # faults in progress at once; 0: no limit


@dataclass(frozen=True)
class LocalRateLimit:
    """A token bucket (Envoy's envoy.filters.http.local_ratelimit): starts full, gains
    tokens_per_fill every fill_interval_ms up to max_tokens; a request without a token gets
    `status`. Shares per million: checked (enabled), then refused when limited (enforced)."""
    max_tokens: int
    tokens_per_fill: int = 1
    fill_interval_ms: int = 1000
    enabled_per_million: int = 1000000
    enforced_per_million: int = 1000000
    status: int = 429
    x_ratelimit_headers: bool = False             # x-ratelimit-limit/-remaining/-reset
    response_headers_to_add: tuple[tuple[str, str], ...] = ()   # on limited answers


@dataclass(frozen=True)
class Mirror:
    """A copy of the request sent to another cluster (Envoy's request_mirror_policies): its
    answer is dropped; the Host gets "-shadow" appended unless told otherwise."""
    cluster: str
    per_million: int = 1000000                    # share of requests mirrored
    host_suffix: bool = True


@dataclass(frozen=True)
class Route:
    match: RouteMatch
    # exactly one action: cluster, weighted_clusters or direct_response
    cluster: Optional[str] = None
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    direct_response: Optional[DirectResponse] = None
    timeout_ms: int = DEFAULT_ROUTE_TIMEOUT_MS     # upstream response timeout; 0 = none
    # gRPC requests' grpc-timeout header (Envoy: max_stream_duration.grpc_timeout_header_*):
    # None = ignored; else it replaces timeout_ms for gRPC requests, capped by this (0: no
    # cap), minus the offset
    grpc_timeout_header_max_ms: Optional[int] = None
    grpc_timeout_header_offset_ms: Optional[int] = None  # None: 0
    request_headers_to_add: tuple[tuple[str, str], ...] = ()   # (name, value), appended
    request_headers_to_remove: tuple[str, ...] = ()            # lower-cased names
    retry_policy: Optional[RetryPolicy] = None
    hash_policy: tuple[HashPolicy, ...] = ()
    mirrors: tuple[Mirror, ...] = ()
    attempt_count_header: bool = False            # x-envoy-attempt-count: N to the upstream
    fault: Optional[Fault] = None                 # replaces the listener's for this route
    local_rate_limit: Optional[LocalRateLimit] = None   # this route's own bucket


@dataclass(frozen=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]           # "host", "*.suffix" or "*"; lower-cased
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class RouteTable:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    strip_host_port: bool = True       # a Host with a port also matches the domain without it
                                       # (False: matched as sent, as Envoy does by default)
    # a table given with `routes:` becomes one virtual host named "default", domains ("*",)


@dataclass(frozen=True)
class ZookeeperPublish:
    """SOFARPC services this (Bolt) listener serves, registered in ZooKeeper as
    sofa-rpc-node providers do: an ephemeral node under <root>/<interface>/providers named
    by the URL-encoded provider URL, pointing at this listener; removed on drain/stop."""
    servers: str                                  # "host:port[,host:port...]"
    services: tuple[str, ...]                     # "interface:version" each
    group: str = "SOFA"
    root: str = "/sofa-rpc"
    advertise_host: Optional[str] = None          # default: the listener's host (required
                                                  # when it listens on every address)
    advertise_port: int = 0                       # 0: the listener's bound port
    weight: int = 100
    app_name: str = ""
    session_timeout_ms: int = 5000


@dataclass(frozen=True)
class Publish:
    zookeeper: ZookeeperPublish


TLS_VERSIONS = ("1.2", "1.3")
SAN_TYPES = ("uri", "dns", "email", "ip")               # subject alt name kinds matched
STRING_MATCH_KINDS = ("exact", "prefix", "suffix", "contains", "regex")
XFCC_MODES = ("sanitize", "forward_only", "append_forward", "sanitize_set",
              "always_forward_only")
XFCC_DETAILS = ("subject", "uri", "dns", "cert", "chain")
# Envoy's TLS 1.2 defaults (TLS 1.3 suites are not configurable, as in Envoy)
DEFAULT_TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305",
                         "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305",
                         "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384")


@dataclass(frozen=True)
class SanMatch:
    """One subject-alt-name matcher of a peer certificate (Envoy's SubjectAltNameMatcher)."""
    san_type: str                      # SAN_TYPES
    kind: str                          # STRING_MATCH_KINDS
    value: str                         # regex: Python `re` syntax, full match
    ignore_case: bool = False


@dataclass(frozen=True)
class TlsContext:
    """Downstream TLS of a listener or filter chain (Envoy's DownstreamTlsContext)."""
    cert_chain_file: Optional[str]     # PEM: the certificate, then its intermediates
    private_key_file: Optional[str]    # PEM (both None when the pair comes from SDS)
    min_version: str = "1.2"           # TLS_VERSIONS
    max_version: str = "1.3"
    ciphers: tuple[str, ...] = DEFAULT_TLS12_CIPHERS   # TLS 1.2 suites, OpenSSL names
    ecdh_curve: Optional[str] = None   # one curve (None: OpenSSL's defaults, X25519 first)
    alpn: tuple[str, ...] = ()         # offered by the server in its order; () = no ALPN
    require_client_certificate: bool = False
    trusted_ca_file: Optional[str] = None     # PEM CAs a client certificate must chain to
    crl_file: Optional[str] = None            # PEM CRLs (every CA of the chain needs one)
    crl_leaf_only: bool = False               # only the leaf's CRL is checked
    match_subject_alt_names: tuple[SanMatch, ...] = ()  # any matching: accepted
    handshake_timeout_ms: int = 10000         # 0: none (Envoy: transport_socket_connect_timeout)
    forward_client_cert: str = "sanitize"     # HTTP: XFCC_MODES (Envoy's default)
    forward_client_cert_details: tuple[str, ...] = ()   # XFCC_DETAILS in the element
    # the certificate and key from a file-based SDS source instead (Envoy's
    # tls_certificate_sds_secret_configs with path_config_source): the file holding the
    # Secret resources, the secret's name, the directory whose moves are watched
    sds_path: Optional[str] = None
    sds_secret: Optional[str] = None
    sds_watched_directory: Optional[str] = None
    # PEM text instead of files (inline in the config, or a secret a control plane sent
    # over ADS): the certificate chain, its key, the trusted CAs
    cert_chain_pem: Optional[str] = field(default=None, repr=False)
    private_key_pem: Optional[str] = field(default=None, repr=False)
    trusted_ca_pem: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class Http2Settings:
    """What fastmesh announces and allows on an HTTP/2 connection (a listener's to its
    clients, a cluster's to its endpoints); Envoy: http2_protocol_options. The defaults are
    fastmesh's (bounded: Envoy's are 2^31-1 streams and 256 MiB windows)."""
    max_concurrent_streams: int = 100             # streams the peer may open at once
    initial_stream_window_bytes: int = 262144     # each stream's receive window
    initial_connection_window_bytes: int = 1048576    # the connection's receive window
    hpack_table_bytes: int = 4096                 # the peer's encoder's table, at most


HTTP2_LIMITS = {"max_concurrent_streams": (1, 2**31 - 1),
                "initial_stream_window_bytes": (65535, 2**31 - 1),
                "initial_connection_window_bytes": (65535, 2**31 - 1),
                "hpack_table_bytes": (0, 65536)}    # (a decoder's memory per connection)


@dataclass(frozen=True)
class UpstreamTls:
    """TLS to a cluster's endpoints (Envoy's UpstreamTlsContext), with Envoy's client
    defaults: TLS 1.2 only (set max_version: "1.3" for TLS 1.3), no SNI, and the upstream's
    certificate not verified unless trusted_ca_file is set."""
    sni: Optional[str] = None                  # server name sent in the ClientHello
    trusted_ca_file: Optional[str] = None      # PEM CAs the upstream's certificate must
                                               # chain to (None: not verified)
    crl_file: Optional[str] = None
    crl_leaf_only: bool = False
    match_subject_alt_names: tuple[SanMatch, ...] = ()   # any matching: accepted
    cert_chain_file: Optional[str] = None      # our client certificate (mTLS upstream)
    private_key_file: Optional[str] = None
    min_version: str = "1.2"                   # TLS_VERSIONS
    max_version: str = "1.2"                   # Envoy's client default
    ciphers: tuple[str, ...] = DEFAULT_TLS12_CIPHERS
    ecdh_curve: Optional[str] = None
    alpn: tuple[str, ...] = ()                 # offered in this order (() : none, or "h2"
                                               # for an http2 cluster)
    max_session_keys: int = 1                  # sessions kept to resume (0: never resume)
    # PEM text instead of files (inline, or an SDS secret from the control plane)
    cert_chain_pem: Optional[str] = field(default=None, repr=False)
    private_key_pem: Optional[str] = field(default=None, repr=False)
    trusted_ca_pem: Optional[str] = field(default=None, repr=False)


@dataclass(frozen=True)
class ChainMatch:
    """Which connections a filter chain takes (Envoy's filter_chain_match): every field set
    must match; at each field in this order the most specific match wins, and chains that do
    not set it are the fallback."""
    destination_port: int = 0                     # 0: any (the original port after REDIRECT)
    destination_cidrs: tuple[str, ...] = ()       # "10.0.0.0/8", "10.1.2.3/32", "fd00::/8"
    server_names: tuple[str, ...] = ()            # TLS SNI: "host" or "*.suffix"
    transport_protocol: Optional[str] = None      # raw_buffer | tls (needs the tls inspector)
    application_protocols: tuple[str, ...] = ()   # http/1.0, http/1.1, h2c, bolt, TLS ALPN
    source_cidrs: tuple[str, ...] = ()
    source_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class FilterChain:
    """One way a listener serves a connection: a protocol and where it goes."""
    name: str
    protocol: str                                 # http1 | http2 | bolt | tcp
    match: ChainMatch = ChainMatch()
    route_table: Optional[str] = None             # http1 and bolt
    cluster: Optional[str] = None                 # tcp
    default: bool = False                         # takes what no chain matches
    tls: Optional[TlsContext] = None              # terminate TLS on this chain
    access_log: bool = True                       # false: the listener's access log leaves
                                                  # this chain's requests out


@dataclass(frozen=True)
class Listener:
    name: str
    address: Address
    protocol: str = "http1"                       # http1 | http2 | bolt | tcp
    route_table: Optional[str] = None             # http1, http2 and bolt: required
    cluster: Optional[str] = None                 # tcp: required (where bytes go)
    http2: Http2Settings = Http2Settings()        # HTTP/2 connections' SETTINGS
    max_head_bytes: int = 65536                   # HTTP/1 request head limit (431 above)
    max_headers: int = 100                        # HTTP/1 header count limit (431 above)
    max_request_body_bytes: int = 0               # 413 above; 0 = unlimited (streamed)
    max_frame_bytes: int = 16 * 1024 * 1024       # Bolt frame limit (connection closed above)
    idle_timeout_ms: int = 60000                  # close a downstream connection idle this long
    request_head_timeout_ms: int = 10000          # a started request head must complete in this
    stream_idle_timeout_ms: int = 300000          # HTTP/1: an exchange moving no bytes this long
                                                  # ends (408/504, or close); 0 = never
    high_water_bytes: int = 262144                # pause the other side above this many queued
    low_water_bytes: int = 65536                  # ... and resume below this
    max_in_flight: int = 10000                    # Bolt requests in flight per connection (busy)
    access_log: Optional[str] = None              # HTTP/1, Bolt: append a line per request to this file
    access_log_format: Optional[str] = None       # Envoy-style %OPERATOR% text (None: the default line)
    access_log_json: tuple[tuple[str, str], ...] = ()   # JSON lines: (key, operator text) pairs
    codec: str = "http1"                          # http1 listeners: http1 | auto (HTTP/2 with
                                                  # prior knowledge too, by its preface)
    accept_http_10: bool = True                   # HTTP/1: serve HTTP/1.0 requests; False
                                                  # answers them 426 (Envoy's default)
    http_filters: tuple[str, ...] = ()            # HTTP/1: HTTP_FILTERS in chain order
    fault: Optional[Fault] = None                 # the listener's configs for them (routes
    local_rate_limit: Optional[LocalRateLimit] = None   # may carry their own)
    publish: Optional[Publish] = None             # Bolt: register its services (registry)
    # sidecar interception (protocol "auto", or filter_chains set: the chain is chosen per
    # connection; protocol/route_table/cluster above then describe no chain)
    filter_chains: tuple[FilterChain, ...] = ()
    original_dst: bool = False                    # read the pre-REDIRECT destination
    use_original_dst: bool = False                # hand each connection to the listener bound
                                                  # to its original destination, if any
    bind_to_port: bool = True                     # False: only takes handed-off connections
    inspectors: tuple[str, ...] = ()              # INSPECTORS run on the first bytes
    sniff_timeout_ms: int = 1000                  # inspectors wait this long for bytes (0: for
    sniff_timeout_continue: bool = True           # ever), then go on as raw TCP (False: close)
    tls: Optional[TlsContext] = None              # terminate TLS (a plain listener's chain)

    def chains(self) -> tuple[FilterChain, ...]:
        """The filter chains connections are served by (a plain listener has one)."""
        if self.filter_chains:
            return self.filter_chains
        return (FilterChain(name=self.name, protocol=self.protocol,
                            route_table=self.route_table, cluster=self.cluster, tls=self.tls),)


@dataclass(frozen=True)
class HealthCheck:
    """Active health checking (Envoy's config.core.v3.HealthCheck): one prober per proxy, in
    the supervisor; every worker gets its verdicts. Envoy's defaults where Envoy has one."""
    type: str                                     # http | tcp | bolt (heartbeat)
    timeout_ms: int
    interval_ms: int
    unhealthy_threshold: int = 1                  # failures in a row to mark unhealthy
    healthy_threshold: int = 1                    # successes in a row to mark healthy again
    interval_jitter_ms: int = 0                   # up to this much added to each interval
    interval_jitter_pct: int = 0                  # ... or this % of the interval
    initial_jitter_ms: int = 0                    # the first check waits up to this long
    no_traffic_interval_ms: int = 60000           # the interval while the cluster has no traffic
    unhealthy_interval_ms: Optional[int] = None   # the interval for unhealthy hosts
    # http
    path: Optional[str] = None
    host: Optional[str] = None                    # Host header (default: the cluster's name)
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)   # [start, end) ranges
    # tcp: bytes to send (hex), and to expect in the reply (hex); none: connect only
    send_hex: Optional[str] = None
    receive_hex: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutlierDetection:
    """Passive health (Envoy's cluster.v3.OutlierDetection): results are counted in each
    worker, which ejects by the same rule; ejected endpoints come back after their time."""
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_5xx_pct: int = 100
    enforcing_consecutive_gateway_failure_pct: int = 0     # Envoy: detected, not enforced
    interval_ms: int = 10000
    base_ejection_time_ms: int = 30000
    max_ejection_time_ms: int = 300000
    max_ejection_pct: int = 10                    # of the endpoints, the one to eject included
    # local-origin failures (connect failures and timeouts) counted apart from responses
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_local_origin_failure_pct: int = 100


@dataclass(frozen=True)
class CircuitBreakers:
    """Limits on what a cluster is asked for at once (Envoy's thresholds for the DEFAULT
    priority); None: no limit. Applied in each worker. Overflow: 503 at once."""
    max_connections: Optional[int] = None         # upstream connections, open or opening
    max_pending_requests: Optional[int] = None    # requests waiting for a connection
    max_requests: Optional[int] = None            # requests in flight (waiting ones included)
    max_retries: Optional[int] = None             # retries in flight


@dataclass(frozen=True)
class ZookeeperDiscovery:
    """Endpoints from a ZooKeeper registry as SOFARPC providers publish them: the children
    of <root>/<interface>/providers, each a URL-encoded provider URL (fastmesh.registry)."""
    servers: str                                  # "host:port[,host:port...]"
    service: str                                  # "interface:version" (Bolt `service` header)
    group: str = "SOFA"
    root: str = "/sofa-rpc"
    protocol: str = "bolt"                        # providers of another protocol are skipped
    # also bounds kazoo's wait for a session handshake (a server half started after a
    # restart can leave one unanswered)
    session_timeout_ms: int = 5000
    initial_fetch_timeout_ms: int = 3000          # start/reload waits this long for the list


@dataclass(frozen=True)
class Discovery:
    zookeeper: ZookeeperDiscovery


@dataclass(frozen=True)
class OriginalDst:
    """An ORIGINAL_DST cluster (Envoy's, with CLUSTER_PROVIDED balancing): each connection
    goes where its client addressed it (the listener's original_dst filter restores that
    after an iptables REDIRECT); destinations unused for cleanup_interval_ms are forgotten."""
    use_http_header: bool = False                 # HTTP: this header's "ip:port" chooses
    http_header_name: str = "x-envoy-original-dst-host"
    port_override: int = 0                        # 0: the destination's own port
    cleanup_interval_ms: int = 5000


@dataclass(frozen=True)
class Cluster:
    name: str
    endpoints: tuple[Address, ...]
    # load-balancing weight of each endpoint, in order; () = all 1 (round_robin: smooth
    # weighted round robin; least_request and ring_hash weigh by it too)
    weights: tuple[int, ...] = ()
    lb_policy: str = "round_robin"                # round_robin | random | least_request
    connect_timeout_ms: int = 5000
    dns_refresh_ms: int = 30000                   # re-resolve hostnames this often
    max_idle_per_endpoint: int = 64               # HTTP/1 idle pooled connections kept
    idle_timeout_ms: int = 60000                  # close a pooled upstream connection idle this long
    connections_per_endpoint: int = 1             # Bolt: multiplexed connections per endpoint
    http_protocol: str = "http1"                  # HTTP to the endpoints: http1 | http2 (h2c)
    heartbeat_interval_ms: int = 15000            # Bolt: heartbeat an idle upstream this often
    heartbeat_max_missed: int = 3                 # Bolt: close the upstream after this many misses
    health_check: Optional[HealthCheck] = None
    outlier_detection: Optional[OutlierDetection] = None
    circuit_breakers: Optional[CircuitBreakers] = None
    # below this % of healthy endpoints (x 1.4, Envoy's overprovisioning), balance over all
    healthy_panic_threshold_pct: int = 50
    # ring_hash / maglev (Envoy's RingHashLbConfig / MaglevLbConfig defaults)
    min_ring_size: int = 1024
    max_ring_size: int = 8388608
    maglev_table_size: int = 65537                # a prime
    # endpoints from a registry (endpoints then holds the providers last known)
    discovery: Optional[Discovery] = None
    original_dst: Optional[OriginalDst] = None    # type original_dst: no endpoints listed
    http2: Http2Settings = Http2Settings()        # http2 clusters' connections
    tls: Optional[UpstreamTls] = None             # TLS to the endpoints (None: plain TCP)


@dataclass(frozen=True)
class Admin:
    address: Address


@dataclass(frozen=True)
class Xds:
    """A control plane over ADS (Envoy bootstrap ``dynamic_resources``)."""
    cluster: str                                  # the static cluster naming the control plane
    server: str                                   # "host:port" of the ADS gRPC server
    retry_base_ms: int = 500                      # reconnect back-off: jittered, doubling from
    retry_max_ms: int = 30000                     # ... base up to max (Envoy's defaults)
    lds: bool = True                              # listeners from the control plane (LDS)
    cds: bool = True                              # clusters from the control plane (CDS)
    node: dict = field(default_factory=dict, compare=False, hash=False)   # sent as is
    # the bootstrap as read: its static resources are composed with the dynamic ones
    document: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class Config:
    admin: Optional[Admin]                        # None: no admin API (`admin: null`)
    listeners: tuple[Listener, ...]
    route_tables: dict = field(default_factory=dict)   # name -> RouteTable
    clusters: dict = field(default_factory=dict)       # name -> Cluster
    workers: int = 1                              # worker processes; "auto" = CPU count; 0:
                                                  # the supervisor serves (one process)
    drain_timeout_ms: int = 30000                 # graceful drain limit (SIGTERM, upgrade)
    engine: str = "uvloop"                        # data-socket I/O engine of each worker
                                                  # process: auto | io_uring | epoll | uvloop
                                                  # (env FASTMESH_ENGINE overrides; see
                                                  # fastmesh/ioengine.py)
    source: str = "<string>"                      # the file it came from, for messages
    xds: Optional[Xds] = None                     # a control plane (bootstrap files only)
