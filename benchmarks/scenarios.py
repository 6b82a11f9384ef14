"""The benchmark scenarios: one definition each, from which every proxy's config and the
load are derived.

kind        load generator                     upstream            figure of merit
http        wrk (or httpload closed), N conns  HTTP (nginx/bundled) requests/s
http-open   httpload open-loop at a fixed rate HTTP                p99 / p99.9 latency
idle        httpload idle: N idle keep-alives  HTTP                RSS of the proxy
tcp         tcpbulk source, one stream         tcpbulk sink        MB/s
bolt        boltload client                    boltload echo       calls/s
tls-handshake  openssl s_time -new (x4)         HTTP (unused)       handshakes/s
h2          h2load (h2c), N conns x M streams  HTTP                requests/s
grpc        h2load (h2c) POSTing a gRPC call,   gRPC echo (C,       requests/s, CPU/request
            N conns x M streams                 libnghttp2, h2c)

`mode` is what the proxy is configured as: "http" (an HTTP/1 proxy with one route to the
upstream), "tcp" (a byte pipe), or "bolt" (fastmesh's Bolt listener; the peers have no Bolt
support and run as a TCP pipe, which is less work than routing each frame).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str                       # http | http-open | idle | tcp | bolt
    mode: str                       # http | tcp | bolt  (how the proxies are configured)
    description: str
    unit: str                       # of the throughput figure
    cost_unit: str                  # CPU microseconds per ... (request, call, MB)
    better: str                     # the headline figure: throughput | p99 | rss
    resource: str = "small"         # http: what to fetch (small | post | 64k)
    connections: int = 50           # idle: how many (--idle-conns overrides)
    close: bool = False             # http: a new connection per request
    rate: int = 0                   # http-open: requests per second (--rate overrides)
    inflight: int = 16              # bolt: requests outstanding per connection
    payload_bytes: int = 1024       # bolt payload / http POST body
    h2: bool = False                # the proxy serves HTTP/2 (h2c) to the load generator
    tls: str = ""                   # http: the proxy terminates TLS with an "ec" (P-256)
                                    # or "rsa" (2048) certificate; "" = plain
    grpc: bool = False              # the proxy speaks h2c to the upstream too (gRPC)
    goal: dict = field(default_factory=dict)   # a target against a peer, checked in the
                                    # report: {"peer", "cpu_ratio_max", "p99_ratio_max",
                                    # "source"}
    extra: dict = field(default_factory=dict)


# issue 15: a gRPC unary call through fastmesh costs at most half of Envoy's CPU, and its p99
# is no worse than Envoy's
GRPC_GOAL = {"peer": "envoy", "cpu_ratio_max": 0.5, "p99_ratio_max": 1.0, "source": "issue 15"}

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("http1-small", "http", "http",
             "keep-alive GET, ~20-byte response body, 50 connections",
             "req/s", "request", "throughput", resource="small", connections=50),
    Scenario("http1-1k-post", "http", "http",
             "keep-alive POST of a 1 KiB body, short response, 50 connections",
             "req/s", "request", "throughput", resource="post", connections=50,
             payload_bytes=1024),
    Scenario("http1-64k", "http", "http",
             "keep-alive GET of a 64 KiB response, 50 connections",
             "req/s", "request", "throughput", resource="64k", connections=50),
    Scenario("http1-conn-churn", "http", "http",
             "GET with `Connection: close`: a new downstream connection per request, "
             "50 concurrent", "req/s", "request", "throughput", resource="small",
             connections=50, close=True),
    Scenario("h2-small", "h2", "http",
             "h2load over HTTP/2 with prior knowledge (h2c), 10 connections x 10 streams, "
             "GET with a ~20-byte body; the proxies speak HTTP/1.1 to the upstream",
             "req/s", "request", "throughput", resource="small", connections=10,
             inflight=10, h2=True),
    Scenario("grpc-unary", "grpc", "http",
             "unary gRPC calls (POST /bench.Echo/Ping, a 64-byte message, echoed with "
             "grpc-status 0 trailers) by h2load over h2c, 10 connections x 10 streams; the "
             "proxies speak h2c to a C (libnghttp2) gRPC echo server",
             "req/s", "request", "throughput", connections=10, inflight=10,
             payload_bytes=64, h2=True, grpc=True, goal=GRPC_GOAL),
    Scenario("grpc-unary-pingpong", "grpc", "http",
             "as grpc-unary with one call in flight per connection (ping-pong: h2load -m 1), "
             "10 connections", "req/s", "request", "throughput", connections=10, inflight=1,
             payload_bytes=64, h2=True, grpc=True, goal=GRPC_GOAL),
    Scenario("https-small", "http", "http",
             "keep-alive GET over TLS (the proxy terminates it, ECDSA P-256 certificate), "
             "~20-byte response body, 50 connections", "req/s", "request", "throughput",
             resource="small", connections=50, tls="ec"),
    Scenario("tls-handshake-ec", "tls-handshake", "http",
             "full TLS handshakes (no resumption), ECDSA P-256 certificate: 4 `openssl "
             "s_time -new` loops, each connection closed after its handshake",
             "handshakes/s", "handshake", "throughput", connections=4, tls="ec"),
    Scenario("tls-handshake-rsa", "tls-handshake", "http",
             "full TLS handshakes (no resumption), RSA 2048 certificate: 4 `openssl "
             "s_time -new` loops, each connection closed after its handshake",
             "handshakes/s", "handshake", "throughput", connections=4, tls="rsa"),
    Scenario("tcp-bulk", "tcp", "tcp",
             "one TCP stream pushed through the proxy to a sink as fast as it goes",
             "MB/s", "MB", "throughput", connections=1),
    Scenario("bolt-echo", "bolt", "bolt",
             "Bolt requests with a 1 KiB payload to an echo server, 4 connections x 16 "
             "in flight (peers: TCP pass-through)", "calls/s", "call", "throughput",
             connections=4, inflight=16, payload_bytes=1024),
    Scenario("bolt-fanin", "bolt", "bolt",
             "Bolt requests with a 1 KiB payload from 64 callers with one call in flight "
             "each (a sidecar's inbound side: many callers, one service; peers: TCP "
             "pass-through)", "calls/s", "call", "throughput",
             connections=64, inflight=1, payload_bytes=1024),
    Scenario("latency-fixed-rate", "http-open", "http",
             "open-loop keep-alive GETs at a fixed rate (2000 req/s unless --rate), "
             "latency from the intended send time", "req/s", "request", "p99",
             resource="small", connections=32, rate=2000),
    Scenario("idle-conns", "idle", "http",
             "idle keep-alive connections (10,000 unless --idle-conns), each after one "
             "request: proxy RSS",
             "conns", "conn", "rss", resource="small", connections=10000),
]}

DEFAULT_ORDER = list(SCENARIOS)


def select(names: str | None) -> list[Scenario]:
    if not names:
        return [SCENARIOS[n] for n in DEFAULT_ORDER]
    out = []
    for n in (x.strip() for x in names.split(",")):
        if not n:
            continue
        if n not in SCENARIOS:
            raise SystemExit(f"unknown scenario {n!r}; known: {', '.join(SCENARIOS)}")
        out.append(SCENARIOS[n])
    return out
