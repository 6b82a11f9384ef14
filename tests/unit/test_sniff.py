"""The protocol sniffer and filter-chain selection: every split point of every protocol's
first bytes, random input (Hypothesis), real TLS ClientHellos from OpenSSL, HTTP request
lines checked against llhttp (httptools), and Envoy's filter_chain_match order."""
from __future__ import annotations

import ssl

import httptools
import pytest
from hypothesis import given, settings, strategies as st

from fastmesh._core import sniff
from fastmesh._core.dispatch import ChainMatch, select_chain

KIND = {sniff.MORE: "more", sniff.TCP: "tcp", sniff.HTTP1: "http1", sniff.H2C: "h2c",
        sniff.BOLT_KIND: "bolt", sniff.TLS_KIND: "tls"}


def kind(data, which=sniff.INSPECT_ALL, eof=False):
    return KIND[sniff.sniff(data, which, eof).kind]


def client_hello(server_name="svc.example.com", alpn=("h2", "http/1.1")) -> bytes:
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inb, outb, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outb.read()


BOLT_V1_REQ = bytes([1, 1, 0, 1, 1, 0, 0, 0, 7, 1, 0, 0, 0x0b, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0])
BOLT_V1_HEARTBEAT = bytes([1, 1, 0, 0, 1, 0, 0, 0, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
BOLT_V2_REQ = bytes([2, 1, 1, 0, 1, 1, 0, 0, 0, 7, 1, 0, 0, 0, 0x0b, 0xb8] + [0] * 8)

WHOLE = [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http1"),
    (b"POST /x?y=1 HTTP/1.0\r\n", "http1"),
    (b"OPTIONS * HTTP/1.1\r\n", "http1"),
    (b"GET / HTTP/1.1\nHost: a\n\n", "tcp"),        # bare LF: neither llhttp nor the codec
    (b"M-SEARCH * HTTP/1.1\r\n", "http1"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2c"),
    (BOLT_V1_REQ, "bolt"),
    (BOLT_V1_HEARTBEAT, "bolt"),
    (BOLT_V2_REQ, "bolt"),
    (client_hello(), "tls"),
    (b"SSH-2.0-OpenSSH_9.2p1\r\n", "tcp"),
    (b"GET / HTTP/2.0\r\n", "tcp"),
    (b"GET / HTTP/1.2\r\n", "tcp"),
    (b"GET  HTTP/1.1\r\n", "tcp"),                 # empty target
    (b"get / HTTP/1.1\r\n", "tcp"),                # methods are upper-case
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "tcp"),  # PostgreSQL SSLRequest
    (b"\x16\x02\x00", "tcp"),                       # not TLS 3.x
    (bytes([1, 0, 0, 1]), "tcp"),                   # a Bolt response is not a client's first
    (bytes([1, 1, 0, 2]), "tcp"),                   # ... nor is cmdcode 2
]


@pytest.mark.parametrize("data,want", WHOLE, ids=[w[1] + ":" + repr(w[0][:12]) for w in WHOLE])
def test_every_split_point(data, want):
    """A prefix either waits for more or already gives the final answer; never another."""
    assert kind(data) == want
    decided_at = None
    for i in range(1, len(data)):
        k = kind(data[:i])
        assert k in ("more", want), (i, k)
        if k == want and decided_at is None:
            decided_at = i
        if decided_at is not None:
            assert k == want, (i, k)
    # and at EOF a prefix is never left undecided
    for i in range(0, len(data)):
        assert kind(data[:i], eof=True) != "more"


def test_tls_server_name_and_alpn():
    r = sniff.sniff(client_hello("API.Example.COM", ("h2", "http/1.1")))
    assert (r.server_name, r.alpn) == ("api.example.com", ("h2", "http/1.1"))
    r = sniff.sniff(client_hello("a.b", None))
    assert (r.server_name, r.alpn) == ("a.b", ())


def test_tls_client_hello_over_two_records():
    """A ClientHello split across two TLS records (allowed, rare): both are read."""
    ch = client_hello("two.records.example", ("http/1.1",))
    body = ch[5:]
    cut = 40
    rec = lambda b: bytes([22, 3, 1]) + len(b).to_bytes(2, "big") + b      # noqa: E731
    data = rec(body[:cut]) + rec(body[cut:])
    for i in range(1, len(data)):
        assert kind(data[:i]) in ("more", "tls")
    r = sniff.sniff(data)
    assert (r.server_name, r.alpn) == ("two.records.example", ("http/1.1",))


def test_tls_malformed_hello_is_tls_without_names():
    ch = bytearray(client_hello())
    ch[5] = 2                                       # a ServerHello type: not a ClientHello
    r = sniff.sniff(bytes(ch))
    assert KIND[r.kind] == "tls" and r.server_name is None and r.alpn == ()


def test_inspectors_only_what_the_listener_runs():
    assert kind(b"GET / HTTP/1.1\r\n", which=sniff.TLS) == "tcp"
    assert kind(client_hello(), which=sniff.HTTP) == "tcp"
    assert kind(BOLT_V1_REQ, which=sniff.HTTP | sniff.TLS) == "tcp"


def test_overlong_request_line_is_not_http():
    assert kind(b"GET /" + b"a" * 9000) == "tcp"
    assert kind(b"GET /" + b"a" * 8000) == "more"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=7))
def test_random_bytes_are_decided_consistently(data, which):
    """No input crashes it; a decision never changes as more bytes arrive."""
    first = None
    for i in range(len(data) + 1):
        k = kind(data[:i], which=which or sniff.INSPECT_ALL)
        if first is not None:
            assert k == first
        elif k != "more":
            first = k


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT"]),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/?=&%._-~", min_size=1,
               max_size=40),
       st.sampled_from(["HTTP/1.0", "HTTP/1.1", "HTTP/1.2", "HTTP/2.0", "HTTX/1.1"]),
       st.sampled_from(["\r\n", "\n"]))
def test_request_line_agrees_with_llhttp(method, target, version, eol):
    """Differential: the sniffer calls HTTP/1 what llhttp parses as an HTTP/1.0 or 1.1
    request line."""
    line = f"{method} /{target} {version}{eol}Host: x{eol}{eol}".encode()

    class Cb:
        headers_done = False

        def on_headers_complete(self):
            self.headers_done = True
    cb = Cb()
    p = httptools.HttpRequestParser(cb)
    try:
        p.feed_data(line)
        llhttp = cb.headers_done and p.get_http_version() in ("1.0", "1.1")
    except httptools.HttpParserUpgrade:             # CONNECT: parsed, then "upgraded"
        llhttp = p.get_http_version() in ("1.0", "1.1")
    except httptools.HttpParserError:
        llhttp = False
    assert (kind(line) == "http1") == llhttp, (line, kind(line))


# ------------------------------------------------------------------ chain selection

def pick(matches, dst="10.0.0.1", dport=80, sni=None, transport="raw_buffer", apps=(),
         src="192.168.1.9", sport=40000):
    return select_chain(tuple(matches), dst, dport, sni, transport, tuple(apps), src, sport)


def test_destination_port_before_everything():
    m = [ChainMatch(destination_cidrs=["10.0.0.1/32"]), ChainMatch(destination_port=80)]
    assert pick(m) == 1             # port is looked at first: the port chain wins


def test_longest_prefix_wins_and_unset_is_fallback():
    m = [ChainMatch(destination_cidrs=["10.0.0.0/8"]), ChainMatch(destination_cidrs=["10.0.0.0/24"]),
         ChainMatch()]
    assert pick(m, dst="10.0.0.7") == 1
    assert pick(m, dst="10.9.0.7") == 0
    assert pick(m, dst="172.16.0.1") == 2


def test_server_names_exact_then_longest_wildcard():
    m = [ChainMatch(server_names=["*.example.com"]), ChainMatch(server_names=["a.example.com"]),
         ChainMatch(server_names=["*.b.example.com"]), ChainMatch()]
    assert pick(m, sni="a.example.com") == 1
    assert pick(m, sni="x.b.example.com") == 2
    assert pick(m, sni="c.example.com") == 0
    assert pick(m, sni="example.com") == 3
    assert pick(m, sni=None) == 3


def test_transport_then_application_protocols():
    m = [ChainMatch(transport_protocol="tls", application_protocols=["h2"]),
         ChainMatch(transport_protocol="tls"),
         ChainMatch(application_protocols=["http/1.1", "http/1.0"])]
    assert pick(m, transport="tls", apps=("h2", "http/1.1")) == 0
    assert pick(m, transport="tls", apps=("http/1.1",)) == 1
    assert pick(m, apps=("http/1.0",)) == 2
    assert pick(m, apps=()) == -1                  # nothing fits: no chain


def test_source_prefix_and_ports():
    m = [ChainMatch(source_cidrs=["192.168.0.0/16"]), ChainMatch(source_ports=[40000]),
         ChainMatch()]
    assert pick(m) == 0
    assert pick(m, src="10.1.1.1") == 1
    assert pick(m, src="10.1.1.1", sport=1) == 2


def test_ipv6_prefixes():
    m = [ChainMatch(destination_cidrs=["fd00::/8"]), ChainMatch(destination_cidrs=["10.0.0.0/8"])]
    assert pick(m, dst="fd00::5") == 0
    assert pick(m, dst="10.1.2.3") == 1
    assert pick(m, dst="2001:db8::1") == -1
