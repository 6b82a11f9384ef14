"""HeadParser (fastmesh._core.http1): valid heads of many shapes, every split point, every
input type, each rule of the grammar attacked with a targeted case, limits, and properties."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastmesh._core.http1 import HeadParser

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE = 0, 1, 2, 3


# ------------------------------------------------------------------------- helpers

def outcome(parser, data):
    """One parse call as a comparable value: ("ok", consumed, dict), ("incomplete",) or
    ("error", kind)."""
    try:
        n, d = parser.parse(data)
    except ValueError as e:
        assert len(e.args) == 2 and e.args[1] in ("bad", "too_large"), e.args
        assert isinstance(e.args[0], str) and e.args[0]
        return ("error", e.args[1])
    if d is None:
        assert n == 0
        return ("incomplete",)
    assert 0 < n <= len(data)
    return ("ok", n, d)


def whole(data, is_request=True, **kw):
    return outcome(HeadParser(is_request, **kw), data)


def by_prefixes(data, cuts, is_request=True, **kw):
    """Feed growing prefixes data[:c] for c in cuts, then all of data, to one parser, as
    bytes arrive; the first complete or error result is the answer."""
    p = HeadParser(is_request, **kw)
    for c in list(cuts) + [len(data)]:
        r = outcome(p, data[:c])
        if r[0] != "incomplete":
            return r
    return ("incomplete",)


def req(line=b"GET / HTTP/1.1", *headers, host=b"a.example"):
    hs = ([b"Host: " + host] if host is not None else []) + list(headers)
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in hs) + b"\r\n"


def ok(data, is_request=True, **kw):
    r = whole(data, is_request, **kw)
    assert r[0] == "ok", (data, r)
    return r[2]


def bad(data, is_request=True, kind="bad", **kw):
    r = whole(data, is_request, **kw)
    assert r == ("error", kind), (data, r)


# ------------------------------------------------------------------ valid requests

VALID_REQUESTS = [
    # (head, expected subset of the dict)
    (req(), dict(method=b"GET", target=b"/", path=b"/", minor=1, body_kind=BODY_NONE,
                 content_length=-1, conn_close=False, headers=[(b"Host", b"a.example")])),
    (req(b"GET /a/b?x=1&y=%20 HTTP/1.1"), dict(target=b"/a/b?x=1&y=%20", path=b"/a/b")),
    (req(b"GET /a?b?c HTTP/1.1"), dict(target=b"/a?b?c", path=b"/a")),
    (req(b"GET /?x HTTP/1.1"), dict(path=b"/")),
    (req(b"GET //double/slash HTTP/1.1"), dict(path=b"//double/slash")),
    (req(b"GET /a?b=/c?d HTTP/1.1"), dict(target=b"/a?b=/c?d", path=b"/a")),
    (req(b"OPTIONS * HTTP/1.1"), dict(method=b"OPTIONS", target=b"*", path=b"*")),
    (req(b"OPTIONS * HTTP/1.0", host=None), dict(method=b"OPTIONS", target=b"*", minor=0)),
    (req(b"OPTIONS /x HTTP/1.1"), dict(method=b"OPTIONS", target=b"/x")),
    (req(b"HEAD / HTTP/1.1"), dict(method=b"HEAD")),
    (req(b"PROPFIND /dav HTTP/1.1"), dict(method=b"PROPFIND")),
    (req(b"M-SEARCH~!#$%&'*+.^_`| / HTTP/1.1"), dict(method=b"M-SEARCH~!#$%&'*+.^_`|")),
    (req(b"POST /up HTTP/1.1", b"Content-Length: 5"),
     dict(method=b"POST", body_kind=BODY_LENGTH, content_length=5)),
    (req(b"POST / HTTP/1.1", b"Content-Length: 0"), dict(body_kind=BODY_NONE, content_length=0)),
    (req(b"POST / HTTP/1.1", b"Content-Length: 007"), dict(body_kind=BODY_LENGTH, content_length=7)),
    (req(b"POST / HTTP/1.1", b"content-length: 999999999999999999"),
     dict(body_kind=BODY_LENGTH, content_length=999999999999999999)),
    (req(b"POST / HTTP/1.1", b"Content-Length: 5", b"Content-Length: 5"),
     dict(body_kind=BODY_LENGTH, content_length=5)),
    (req(b"POST / HTTP/1.1", b"Content-Length:   12 \t"), dict(content_length=12)),
    # duplicates agree on the number, not the spelling: either one frames the same body
    (req(b"POST / HTTP/1.1", b"Content-Length: 5", b"Content-Length: 05"),
     dict(body_kind=BODY_LENGTH, content_length=5)),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked"), dict(body_kind=BODY_CHUNKED)),
    (req(b"POST / HTTP/1.1", b"transfer-encoding: CHUNKED"), dict(body_kind=BODY_CHUNKED)),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding:\tchunked\t"), dict(body_kind=BODY_CHUNKED)),
    (req(b"GET / HTTP/1.0", host=None), dict(minor=0, conn_close=True, headers=[])),
    (req(b"GET / HTTP/1.0", b"Connection: keep-alive", host=None),
     dict(minor=0, conn_close=False, conn_keep_alive=True)),
    (req(b"GET / HTTP/1.0"), dict(minor=0, headers=[(b"Host", b"a.example")])),
    (req(b"GET / HTTP/1.1", b"Connection: close"), dict(conn_close=True)),
    (req(b"GET / HTTP/1.1", b"Connection: Keep-Alive, CLOSE"),
     dict(conn_close=True, conn_keep_alive=True)),
    (req(b"GET / HTTP/1.1", b"Connection: ,, foo ,close,"), dict(conn_close=True)),
    (req(b"POST / HTTP/1.1", b"Expect: 100-continue", b"Content-Length: 1"),
     dict(expect_continue=True)),
    (req(b"POST / HTTP/1.1", b"Expect: 100-Continue"), dict(expect_continue=True)),
    (req(b"GET / HTTP/1.1", b"Upgrade: websocket", b"Connection: Upgrade"),
     dict(has_upgrade=True)),
    # absolute-form: the origin-form part is the target, the authority must equal Host
    (req(b"GET http://a.example/x?y HTTP/1.1"), dict(target=b"/x?y", path=b"/x")),
    (req(b"GET HTTP://A.Example:8080/ HTTP/1.1", host=b"a.example:8080"), dict(target=b"/")),
    # header values: trimmed, obs-text, inner whitespace, empty
    (req(b"GET / HTTP/1.1", b"X:  v  ", b"Y:\t\tw w\t", b"Z:", b"E: \t ",
         b"O: \x80\xff caf\xc3\xa9", b"Q: a:b:c", b"R: \"quoted\", (comment)"),
     dict(headers=[(b"Host", b"a.example"), (b"X", b"v"), (b"Y", b"w w"), (b"Z", b""),
                   (b"E", b""), (b"O", b"\x80\xff caf\xc3\xa9"), (b"Q", b"a:b:c"),
                   (b"R", b"\"quoted\", (comment)")])),
    (req(b"GET / HTTP/1.1", b"!#$%&'*+-.^_`|~09azAZ: token"),
     dict(headers=[(b"Host", b"a.example"), (b"!#$%&'*+-.^_`|~09azAZ", b"token")])),
    (req(b"GET / HTTP/1.1", b"Dup: 1", b"dup: 2", b"DUP: 3"),
     dict(headers=[(b"Host", b"a.example"), (b"Dup", b"1"), (b"dup", b"2"), (b"DUP", b"3")])),
    # up to 4 empty lines before the request line are skipped (and counted as consumed)
    (b"\r\n" + req(), dict(method=b"GET")),
    (b"\r\n" * 4 + req(), dict(method=b"GET")),
    # absolute-form with an IP-literal authority (Host must still equal it)
    (req(b"GET http://[::1]:8080/x HTTP/1.1", host=b"[::1]:8080"), dict(target=b"/x")),
]

# Host values (RFC 9110 7.2: uri-host [ ":" port ]) accepted by the parser, as sent
HOSTS_OK = [
    b"example.com", b"example.com:8080", b"127.0.0.1:80", b"[::1]:8080",
    b"xn--bcher-kva.example", b"a_b.local", b"a", b"A.Example", b"example.com.",
    b"[::1]", b"[2001:DB8::1]", b"[::ffff:192.0.2.1]:443", b"[1:2:3:4:5:6:7:8]",
    b"h:0", b"h:1", b"h:65535", b"h:00080",
    b"a%41b", b"%7e", b"-._~!$&'()*+,;=", b"svc-1.ns.svc.cluster.local:9080",
    b"999.999.999.999",                    # not an IPv4 address, but a valid reg-name
]
VALID_REQUESTS += [(req(host=h), dict(headers=[(b"Host", h)])) for h in HOSTS_OK]
VALID_REQUESTS += [
    (req(b"GET / HTTP/1.1", host=b" \texample.com:8080 \t"),
     dict(headers=[(b"Host", b"example.com:8080")])),       # OWS around the value is trimmed
    (req(b"GET / HTTP/1.0", host=b"[::1]:80"), dict(minor=0)),
]

VALID_RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
     dict(status=200, reason=b"OK", minor=1, body_kind=BODY_LENGTH, content_length=3)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", dict(body_kind=BODY_NONE, content_length=0)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", dict(body_kind=BODY_CHUNKED)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", dict(body_kind=BODY_CHUNKED)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", dict(body_kind=BODY_CLOSE)),
    (b"HTTP/1.1 200 OK\r\n\r\n", dict(body_kind=BODY_CLOSE, headers=[])),
    (b"HTTP/1.0 200 OK\r\n\r\n", dict(minor=0, body_kind=BODY_CLOSE, conn_close=True)),
    (b"HTTP/1.1 204 No Content\r\n\r\n", dict(status=204, body_kind=BODY_NONE)),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
     dict(status=304, body_kind=BODY_NONE, content_length=10)),
    (b"HTTP/1.1 100 Continue\r\n\r\n", dict(status=100, body_kind=BODY_NONE)),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", dict(status=101, has_upgrade=True)),
    (b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n", dict(status=200, reason=b"")),
    (b"HTTP/1.1 200 \r\nContent-Length: 1\r\n\r\n", dict(status=200, reason=b"")),
    (b"HTTP/1.1 404 Not  Found\t(x)\r\n\r\n", dict(status=404, reason=b"Not  Found\t(x)")),
    (b"HTTP/1.1 599 \x80\xff\r\n\r\n", dict(status=599, reason=b"\x80\xff")),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", dict(conn_close=True)),
]


def check_fields(d, expected):
    for k, v in expected.items():
        assert d[k] == v, (k, d[k], v)


@pytest.mark.parametrize("data,expected", VALID_REQUESTS)
def test_valid_request(data, expected):
    r = whole(data)
    assert r[0] == "ok", r
    assert r[1] == len(data)
    check_fields(r[2], expected)


@pytest.mark.parametrize("data,expected", VALID_RESPONSES)
def test_valid_response(data, expected):
    r = whole(data, False)
    assert r[0] == "ok", r
    assert r[1] == len(data)
    check_fields(r[2], expected)


def test_head_response_has_no_body():
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    p = HeadParser(False)
    p.expect_head_response = True
    n, d = p.parse(data)
    assert d["body_kind"] == BODY_NONE and d["content_length"] == 1234
    for te in (b"Transfer-Encoding: chunked", b""):
        p = HeadParser(False)
        p.expect_head_response = True
        assert p.parse(b"HTTP/1.1 200 OK\r\n" + te + b"\r\n\r\n")[1]["body_kind"] == BODY_NONE


def test_consumed_stops_at_head_with_pipelined_bytes():
    head = req(b"POST / HTTP/1.1", b"Content-Length: 4")
    for tail in (b"body", b"bodyGET / HTTP/1.1\r\nHost: b\r\n\r\n", b"\r\n\r\n"):
        n, d = HeadParser(True).parse(head + tail)
        assert n == len(head)
    skipped = b"\r\n\r\n" + head
    assert HeadParser(True).parse(skipped + b"xx")[0] == len(skipped)


def test_parser_is_reusable_after_ok_and_error():
    p = HeadParser(True)
    a, b = req(b"GET /a HTTP/1.1"), req(b"GET /b HTTP/1.1")
    assert p.parse(a)[1]["path"] == b"/a"
    assert p.parse(b)[1]["path"] == b"/b"
    with pytest.raises(ValueError):
        p.parse(b"GET / HTTP/1.1\n\n")
    assert p.parse(a)[1]["path"] == b"/a"
    # an incomplete scan, then an error, then a fresh head: nothing of the first leaks
    assert p.parse(b"GET /x HTTP/1.1\r\nHo") == (0, None)
    with pytest.raises(ValueError):
        p.parse(b"GET /x HTTP/1.1\r\nHo\n")
    assert p.parse(b)[1]["path"] == b"/b"


def test_empty_input_is_incomplete():
    assert HeadParser(True).parse(b"") == (0, None)
    assert HeadParser(False).parse(bytearray()) == (0, None)


# ------------------------------------------------------------ fragmentation, types

ALL_HEADS = ([(d, True) for d, _ in VALID_REQUESTS] + [(d, False) for d, _ in VALID_RESPONSES])


@pytest.mark.parametrize("data,is_request", ALL_HEADS)
def test_every_split_point_matches_whole(data, is_request):
    expect = whole(data, is_request)
    for k in range(1, len(data)):
        assert by_prefixes(data, [k], is_request) == expect, k


@pytest.mark.parametrize("data,is_request", ALL_HEADS)
def test_one_byte_at_a_time_matches_whole(data, is_request):
    assert by_prefixes(data, range(1, len(data)), is_request) == whole(data, is_request)


@pytest.mark.parametrize("data,is_request", ALL_HEADS[::3])
def test_prefixes_alone_are_incomplete(data, is_request):
    for k in range(0, len(data)):
        assert whole(data[:k], is_request) == ("incomplete",), k


@pytest.mark.parametrize("conv", [bytes, bytearray, memoryview,
                                  lambda b: memoryview(b"junk" + b + b"junk")[4:-4],
                                  lambda b: memoryview(bytearray(b))],
                         ids=["bytes", "bytearray", "memoryview", "mv-slice", "mv-bytearray"])
def test_input_types(conv):
    for data, expected in VALID_REQUESTS[:12]:
        r = outcome(HeadParser(True), conv(data))
        assert r == whole(data)
    for data, _ in ERRORS[:20]:
        assert outcome(HeadParser(True), conv(data)) == whole(data)
    # growing prefixes of a bytearray that is appended to in place
    p = HeadParser(True)
    buf = bytearray()
    data = VALID_REQUESTS[10][0]
    for i, c in enumerate(data):
        buf.append(c)
        r = outcome(p, conv(bytes(buf)))
        if i < len(data) - 1:
            assert r == ("incomplete",)
    assert r == whole(data)


def test_rejects_non_buffers():
    with pytest.raises(TypeError):
        HeadParser(True).parse("GET / HTTP/1.1\r\n\r\n")


# ------------------------------------------------------------------ error rules

ERRORS = [
    # (head, why) -- every one must be ("error", "bad")
    # line endings: only CRLF
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF after the request line"),
    (b"GET / HTTP/1.1\r\nHost: a\n\r\n", "bare LF after a header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\n", "bare LF as the blank line"),
    (b"GET / HTTP/1.1\r\nX: a\nb\r\nHost: a\r\n\r\n", "bare LF inside a value"),
    (b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "bare LF before the request line"),
    (b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", "bare CR in the request line"),
    (b"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n", "CR CR LF after the request line"),
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", "bare CR splitting a header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", "bare CR inside a value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX\r: b\r\n\r\n", "bare CR inside a name"),
    # (a bare CR is found when the head is complete; "\r\r\n" is not yet its blank line)
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n\r\n", "bare CR on a blank-looking line"),
    (b"\r\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", "bare CRs before the request line"),
    (b"\r\n" * 5 + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "five empty lines before the request"),
    # request line
    (b" / HTTP/1.1\r\nHost: a\r\n\r\n", "empty method"),
    (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", "method not a token"),
    (b"G\x00T / HTTP/1.1\r\nHost: a\r\n\r\n", "NUL in method"),
    (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", "tab after the method"),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "two spaces after the method"),
    (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", "two spaces after the target"),
    (b"GET HTTP/1.1\r\nHost: a\r\n\r\n", "no target"),
    (b"GET /\r\nHost: a\r\n\r\n", "HTTP/0.9 request line"),
    (b"GET / \r\nHost: a\r\n\r\n", "empty version"),
    (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", "space in target"),
    (b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n", "tab in target"),
    (b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", "NUL in target"),
    (b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n", "DEL in target"),
    (b"GET /a\x80b HTTP/1.1\r\nHost: a\r\n\r\n", "obs-text in target"),
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", "UTF-8 in target"),
    (b"GET /a\x0bb HTTP/1.1\r\nHost: a\r\n\r\n", "VT in target"),
    (b"GET a HTTP/1.1\r\nHost: a\r\n\r\n", "target neither '/', '*' nor absolute"),
    (b"GET admin/x HTTP/1.1\r\nHost: a\r\n\r\n", "relative target"),
    (b"GET *x HTTP/1.1\r\nHost: a\r\n\r\n", "asterisk followed by more"),
    (b"OPTIONS *x HTTP/1.1\r\nHost: a\r\n\r\n", "OPTIONS asterisk followed by more"),
    (b"OPTIONS */ HTTP/1.1\r\nHost: a\r\n\r\n", "OPTIONS asterisk then a slash"),
    # asterisk-form is for OPTIONS only (RFC 9112 3.2.4)
    (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", "GET *"),
    (b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", "POST *"),
    (b"HEAD * HTTP/1.1\r\nHost: a\r\n\r\n", "HEAD *"),
    (b"DELETE * HTTP/1.0\r\n\r\n", "DELETE * in HTTP/1.0"),
    (b"options * HTTP/1.1\r\nHost: a\r\n\r\n", "lower-case options * (methods are case-sensitive)"),
    (b"OPTION * HTTP/1.1\r\nHost: a\r\n\r\n", "OPTION *"),
    (b"OPTIONSX * HTTP/1.1\r\nHost: a\r\n\r\n", "OPTIONSX *"),
    (b"\r\nGET * HTTP/1.1\r\nHost: a\r\n\r\n", "GET * after an empty line"),
    # '#': a fragment is never sent (RFC 9112 3.2)
    (b"GET /#frag HTTP/1.1\r\nHost: a\r\n\r\n", "fragment in the target"),
    (b"GET /# HTTP/1.1\r\nHost: a\r\n\r\n", "empty fragment"),
    (b"GET /a?b#c HTTP/1.1\r\nHost: a\r\n\r\n", "fragment after the query"),
    (b"GET /a%23b#/admin HTTP/1.1\r\nHost: a\r\n\r\n", "fragment hiding a path"),
    (b"GET http://a/x#y HTTP/1.1\r\nHost: a\r\n\r\n", "fragment in absolute-form"),
    (b"GET http://a#b/x HTTP/1.1\r\nHost: a#b\r\n\r\n", "'#' in the authority"),
    (b"OPTIONS *# HTTP/1.1\r\nHost: a\r\n\r\n", "fragment after the asterisk"),
    (b"GET https://a/x HTTP/1.1\r\nHost: a\r\n\r\n", "https absolute-form (not served)"),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", "authority-form (no tunnels)"),
    (b"GET http://a HTTP/1.1\r\nHost: a\r\n\r\n", "absolute-form without a path"),
    (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", "absolute-form with an empty authority"),
    (b"GET http://b/x HTTP/1.1\r\nHost: a\r\n\r\n", "absolute-form authority != Host"),
    (b"GET http://a/x HTTP/1.0\r\n\r\n", "absolute-form without Host"),
    (b"GET http://a\x00/x HTTP/1.1\r\nHost: a\x00\r\n\r\n", "NUL in the authority"),
    (b"GET http://a\x80/x HTTP/1.1\r\nHost: a\x80\r\n\r\n", "obs-text in the authority"),
    (b"GET http://a@b/x HTTP/1.1\r\nHost: b\r\n\r\n", "userinfo: authority != Host"),
    (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", "HTTP/1.2"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "HTTP/2.0"),
    (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", "HTTP/1.10"),
    (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", "space after the version"),
    (b"GET / http/1.1\r\nHost: a\r\n\r\n", "lower-case version"),
    (b"GET / HTTP/1\r\nHost: a\r\n\r\n", "version without minor"),
    (b"GET / HTTP/1.1\x00\r\nHost: a\r\n\r\n", "NUL after the version"),
    # header names
    (b"GET / HTTP/1.1\r\nHost: a\r\nX : v\r\n\r\n", "space before the colon"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX\t: v\r\n\r\n", "tab before the colon"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n", "empty name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", "no colon"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX@Y: v\r\n\r\n", "'@' in a name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX\x00Y: v\r\n\r\n", "NUL in a name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX\x80: v\r\n\r\n", "obs-text in a name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX Y: v\r\n\r\n", "space inside a name"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\x7f: v\r\n\r\n", "DEL as a name"),
    # obs-fold
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: v\r\n continued\r\n\r\n", "obs-fold (SP)"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: v\r\n\tcontinued\r\n\r\n", "obs-fold (HTAB)"),
    (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "first header line indented"),
    # header values
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", "NUL in a value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", "DEL in a value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", "SOH in a value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x1bb\r\n\r\n", "ESC in a value"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x0c\r\n\r\n", "FF as a value"),
    (b"GET / HTTP/1.1\r\nHost: a\x00.b\r\n\r\n", "NUL in Host"),
    # Content-Length
    (req(b"POST / HTTP/1.1", b"Content-Length: +5"), "CL with a sign"),
    (req(b"POST / HTTP/1.1", b"Content-Length: -5"), "negative CL"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 0x5"), "hex CL"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 5 5"), "CL with inner space"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 5,5"), "CL list"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 5, 5"), "CL list with space"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 5.0"), "CL decimal"),
    (req(b"POST / HTTP/1.1", b"Content-Length:"), "empty CL"),
    (req(b"POST / HTTP/1.1", b"Content-Length: five"), "CL word"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 1e3"), "CL exponent"),
    (req(b"POST / HTTP/1.1", b"Content-Length: \xd9\xa5"), "CL non-ASCII digit"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 9999999999999999999"), "CL over 18 digits"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 0000000000000000005"), "CL 19 digits"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 5", b"Content-Length: 6"), "differing CLs"),
    (req(b"POST / HTTP/1.1", b"Content-Length: 5", b"content-length: "), "CL then empty CL"),
    # Transfer-Encoding (requests)
    (req(b"POST / HTTP/1.1", b"Content-Length: 5", b"Transfer-Encoding: chunked"), "CL + TE"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked", b"Content-Length: 5"), "TE + CL"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked", b"Content-Length: 0"), "TE + CL 0"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: identity"), "TE identity"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: gzip"), "TE gzip"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: gzip, chunked"), "TE gzip, chunked"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked, identity"), "chunked not last"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked, chunked"), "chunked twice"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked,"), "trailing comma"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: ,chunked"), "leading comma"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: xchunked"), "xchunked"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunkedx"), "chunkedx"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunk"), "chunk"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: \"chunked\""), "quoted chunked"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked;q=1"), "chunked with a parameter"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding:"), "empty TE"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
     "two TE fields"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"),
     "TE split over two fields"),
    (req(b"POST / HTTP/1.1", b"Transfer-Encoding: \x0bchunked"), "VT before chunked"),
    (req(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked"), "TE in HTTP/1.0"),
    (req(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked", host=None), "TE in HTTP/1.0, no Host"),
    # Host
    (req(host=None), "HTTP/1.1 without Host"),
    (req(b"GET / HTTP/1.1", b"Host: b"), "two Host fields"),
    (req(b"GET / HTTP/1.1", b"Host: a.example"), "two identical Host fields"),
    (req(b"GET / HTTP/1.0", b"Host: b"), "two Host fields in HTTP/1.0"),
]

# Host values the parser rejects (each also in HTTP/1.0, where Host may be absent but a
# present one must be valid), with why
HOSTS_BAD = [
    (b"pro be", "space"),
    (b"a\tb", "tab"),
    (b"probe/evil", "a path"),
    (b"a\\b", "backslash"),
    (b"a@b", "userinfo"),
    (b"user:pw@b", "userinfo with a password"),
    (b"host:80:80", "two ports"),
    (b"host:abc", "port not digits"),
    (b"host:8o", "port half digits"),
    (b"host:-1", "negative port"),
    (b"host:+80", "port with a sign"),
    (b"host: 80", "space before the port"),
    (b"host :80", "space before the colon"),
    (b"host:", "empty port"),
    (b"host:65536", "port over 65535"),
    (b"host:99999", "port 99999"),
    (b"host:123456", "port of 6 digits"),
    (b"host:000080", "port of 6 digits with zeros"),
    (b"[::1", "unclosed IP-literal"),
    (b"::1", "IPv6 without brackets"),
    (b"[::1]x", "junk after an IP-literal"),
    (b"[::1]:", "IP-literal with an empty port"),
    (b"[::1]:x", "IP-literal with a bad port"),
    (b"[]", "empty IP-literal"),
    (b"[1]", "IP-literal without colons"),
    (b"[1.2.3.4]", "IPv4 in brackets"),
    (b"[::g]", "non-hex in an IP-literal"),
    (b"[fe80::1%25eth0]", "IPv6 zone id"),
    (b"[v1.x]", "IPvFuture"),
    (b"a[::1]", "bracket inside a name"),
    (b"a]", "closing bracket"),
    (b"", "empty Host"),
    (b":80", "empty host with a port"),
    (b"a%4", "truncated percent-encoding"),
    (b"a%", "lone percent"),
    (b"a%zz", "percent without hex"),
    (b"a?b", "query in Host"),
    (b"a#b", "fragment in Host"),
    (b"a{b", "brace"),
    (b"a\"b", "quote"),
    (b"a<b>", "angle brackets"),
    (b"a|b", "pipe"),
    (b"a^b", "caret"),
    (b"a`b", "backtick"),
    (b"a\x80b", "obs-text"),
    (b"caf\xc3\xa9.example", "UTF-8 (not punycode)"),
    (b"a, b", "a list of two hosts"),
]
ERRORS += [(req(host=h), "Host %r: %s" % (h, why)) for h, why in HOSTS_BAD]
ERRORS += [(req(b"GET / HTTP/1.0", host=h), "HTTP/1.0 Host %r: %s" % (h, why))
           for h, why in HOSTS_BAD[:6]]

RESPONSE_ERRORS = [
    (b"HTTP/1.1 20 OK\r\n\r\n", "two-digit status"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "four-digit status"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "non-digit status"),
    (b"HTTP/1.1 099 X\r\n\r\n", "status below 100"),
    (b"HTTP/1.1 000\r\n\r\n", "status 000"),
    (b"HTTP/1.1  200 OK\r\n\r\n", "two spaces"),
    (b"HTTP/1.1 200\tOK\r\n\r\n", "tab after the status"),
    (b"HTTP/1.2 200 OK\r\n\r\n", "HTTP/1.2"),
    (b"HTTP/2 200 OK\r\n\r\n", "HTTP/2"),
    (b"http/1.1 200 OK\r\n\r\n", "lower-case version"),
    (b"HTTP/1.1 200 O\x00K\r\n\r\n", "NUL in the reason"),
    (b"HTTP/1.1 200 O\x7fK\r\n\r\n", "DEL in the reason"),
    (b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n", "bare LF"),
    (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "bare CR"),
    (b"HTTP/1.1 200 OK\r\nX: v\r\n folded\r\n\r\n", "obs-fold"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "CL + TE"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "differing CLs"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "negative CL"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
     "two TE fields"),
    (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "empty line before a status line"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "a request where a response belongs"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     "CL + TE on a 204"),
]


@pytest.mark.parametrize("data,why", ERRORS, ids=[w for _, w in ERRORS])
def test_request_error(data, why):
    bad(data)


@pytest.mark.parametrize("data,why", RESPONSE_ERRORS, ids=[w for _, w in RESPONSE_ERRORS])
def test_response_error(data, why):
    bad(data, False)


def reason(data, is_request=True):
    with pytest.raises(ValueError) as e:
        HeadParser(is_request).parse(data)
    return e.value.args[0]


@pytest.mark.parametrize("host,why", HOSTS_BAD, ids=[w for _, w in HOSTS_BAD])
def test_bad_host_reason(host, why):
    # refused for its Host, not by an earlier rule (a byte that is no field-value byte at
    # all, such as a tab inside, is still "bad host": the field-value rules allow it)
    assert reason(req(host=host)) == "bad host"


def test_target_rule_reasons():
    for line in (b"GET * HTTP/1.1", b"POST * HTTP/1.1", b"options * HTTP/1.1",
                 b"GET /#x HTTP/1.1", b"GET /a?b#c HTTP/1.1", b"GET http://a/x#y HTTP/1.1"):
        assert reason(req(line)) == "bad request target", line


def test_host_rules_are_for_requests_only():
    # a Host field in a response is not interpreted: relayed as any other field
    d = ok(b"HTTP/1.1 200 OK\r\nHost: pro be/x:1:2\r\nContent-Length: 0\r\n\r\n", False)
    assert d["headers"] == [(b"Host", b"pro be/x:1:2"), (b"Content-Length", b"0")]


SPLIT_ERRORS = [(d, True, w) for d, w in ERRORS] + [(d, False, w) for d, w in RESPONSE_ERRORS]


@pytest.mark.parametrize("data,is_request,why", SPLIT_ERRORS, ids=[w for *_, w in SPLIT_ERRORS])
def test_error_is_the_same_at_every_split_point(data, is_request, why):
    expect = whole(data, is_request)
    assert expect[0] == "error"
    assert by_prefixes(data, range(1, len(data)), is_request) == expect
    for k in range(1, len(data)):
        assert by_prefixes(data, [k], is_request) == expect, k


def test_bare_lf_is_an_error_before_the_head_is_complete():
    # a client can't hold the connection open with a malformed line: the error is immediate
    assert whole(b"GET / HTTP/1.1\n") == ("error", "bad")
    assert whole(b"GET / HTTP/1.1\r\nHost: a\n") == ("error", "bad")


# ----------------------------------------------------------------------- limits

def head_of_size(size, is_request=True):
    """A valid head of exactly size bytes (padding in one header value)."""
    base = (req(b"GET / HTTP/1.1", b"X-Pad: ") if is_request
            else b"HTTP/1.1 200 OK\r\nX-Pad: \r\n\r\n")
    pad = size - len(base)
    assert pad >= 1
    return base[:-4] + b"p" * pad + b"\r\n\r\n"


@pytest.mark.parametrize("is_request", [True, False])
@pytest.mark.parametrize("limit", [128, 1000, 65536])
def test_max_head_bytes_exactly_and_one_past(is_request, limit):
    at = head_of_size(limit, is_request)
    over = head_of_size(limit + 1, is_request)
    assert len(at) == limit and len(over) == limit + 1
    assert whole(at, is_request, max_head_bytes=limit)[0] == "ok"
    assert whole(at + b"trailing body bytes", is_request, max_head_bytes=limit)[1] == limit
    assert whole(over, is_request, max_head_bytes=limit) == ("error", "too_large")
    # arriving in pieces: the limit trips as soon as limit bytes hold no blank line
    step = max(1, limit // 7)
    assert by_prefixes(at, range(1, limit, step), is_request,
                       max_head_bytes=limit)[0] == "ok"
    assert by_prefixes(over, range(1, limit + 1, step), is_request,
                       max_head_bytes=limit) == ("error", "too_large")
    assert whole(over[:limit], is_request, max_head_bytes=limit) == ("error", "too_large")
    assert whole(over[:limit - 1], is_request, max_head_bytes=limit) == ("incomplete",)


def test_max_head_bytes_counts_skipped_empty_lines():
    head = head_of_size(200)
    assert whole(head, max_head_bytes=200)[0] == "ok"
    assert whole(b"\r\n" + head, max_head_bytes=202)[0] == "ok"
    assert whole(b"\r\n" + head, max_head_bytes=201) == ("error", "too_large")


def test_oversized_head_with_late_error_is_too_large_however_it_arrives():
    # whatever lies past max_head_bytes (here a bare LF) can't change the verdict
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 40 + b"\nY: b\r\n\r\n"
    assert whole(data, max_head_bytes=64) == ("error", "too_large")
    assert by_prefixes(data, range(1, len(data)), max_head_bytes=64) == ("error", "too_large")


def many_headers(n, is_request=True):
    hs = [b"X-H%d: v" % i for i in range(n)]
    if is_request:
        return req(b"GET / HTTP/1.1", *hs[1:])          # Host + n - 1 others
    return b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in hs) + b"\r\n"


@pytest.mark.parametrize("is_request", [True, False])
@pytest.mark.parametrize("limit", [1, 10, 100])
def test_max_headers_exactly_and_one_past(is_request, limit):
    at, over = many_headers(limit, is_request), many_headers(limit + 1, is_request)
    d = ok(at, is_request, max_headers=limit)
    assert len(d["headers"]) == limit
    assert whole(over, is_request, max_headers=limit) == ("error", "too_large")
    assert by_prefixes(over, range(1, len(over)), is_request,
                       max_headers=limit) == ("error", "too_large")


def test_max_headers_zero():
    assert ok(b"GET / HTTP/1.0\r\n\r\n", max_headers=0)["headers"] == []
    assert whole(req(), max_headers=0) == ("error", "too_large")


def test_huge_single_line_is_too_large_not_slow():
    data = b"GET /" + b"a" * 200000
    assert whole(data) == ("error", "too_large")
    p = HeadParser(True)
    for k in range(1000, len(data), 7919):
        r = outcome(p, data[:k])
        if r[0] != "incomplete":
            break
    assert r == ("error", "too_large")


def test_limits_are_per_head_not_per_connection():
    p = HeadParser(True, max_head_bytes=100)
    h = req()
    for _ in range(50):
        assert p.parse(h)[0] == len(h)


# ------------------------------------------------------------------- properties

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPECIAL = {b"host", b"content-length", b"transfer-encoding"}

tokens = st.text(alphabet=TCHARS, min_size=1, max_size=16).map(str.encode)
methods = st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS",
                                     b"PATCH"]), tokens)
path_chars = st.sampled_from([bytes([c]) for c in range(0x21, 0x7F) if c != 0x23])  # no '#'
paths = st.lists(path_chars, max_size=40).map(lambda cs: b"/" + b"".join(cs))
names = tokens.filter(lambda n: n.lower() not in SPECIAL)
value_bytes = st.sampled_from([bytes([c]) for c in [9, 32] + list(range(0x21, 0x7F))
                               + list(range(0x80, 0x100))])
values = st.lists(value_bytes, max_size=30).map(b"".join)
ows = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t "])


@st.composite
def request_heads(draw):
    method = draw(methods)
    path = draw(paths)
    minor = draw(st.sampled_from([0, 1]))
    fields = draw(st.lists(st.tuples(names, values, ows, ows), max_size=12))
    headers = []
    if minor == 1 or draw(st.booleans()):
        headers.append((b"Host", draw(st.sampled_from([b"a", b"svc.local:8080", b"[::1]"])),
                        b" ", b""))
    framing = draw(st.sampled_from(["none", "cl", "chunked"] if minor else ["none", "cl"]))
    cl = -1
    if framing == "cl":
        cl = draw(st.integers(0, 10 ** 12))
        headers.append((b"Content-Length", b"%d" % cl, b" ", b""))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked", b" ", b""))
    headers += fields
    draw(st.randoms()).shuffle(headers)
    skip = draw(st.integers(0, 4))
    raw = (b"\r\n" * skip + method + b" " + path + b" HTTP/1.%d\r\n" % minor
           + b"".join(n + b":" + a + v + b + b"\r\n" for n, v, a, b in headers) + b"\r\n")
    expect_kind = {"none": BODY_NONE, "cl": BODY_LENGTH if cl > 0 else BODY_NONE,
                   "chunked": BODY_CHUNKED}[framing]
    expected = dict(method=method, target=path, path=path.split(b"?")[0], minor=minor,
                    headers=[(n, v.strip(b" \t")) for n, v, _, _ in headers],
                    body_kind=expect_kind, content_length=cl)
    return raw, expected


@st.composite
def response_heads(draw):
    status = draw(st.integers(100, 999))
    reason = draw(st.one_of(st.none(), values))
    minor = draw(st.sampled_from([0, 1]))
    fields = draw(st.lists(st.tuples(names, values), max_size=10))
    line = b"HTTP/1.%d %d" % (minor, status) + (b"" if reason is None else b" " + reason)
    raw = line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    return raw, dict(status=status, reason=reason or b"", minor=minor,
                     headers=[(n, v.strip(b" \t")) for n, v in fields])


def random_cuts(draw, n):
    return sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=8)))


@SETTINGS
@given(request_heads(), st.data())
def test_property_generated_request_roundtrips(head, data):
    raw, expected = head
    r = whole(raw)
    assert r[0] == "ok", (raw, r)
    assert r[1] == len(raw)
    check_fields(r[2], expected)
    assert by_prefixes(raw, random_cuts(data.draw, len(raw))) == r


@SETTINGS
@given(response_heads(), st.data())
def test_property_generated_response_roundtrips(head, data):
    raw, expected = head
    r = whole(raw, False)
    assert r[0] == "ok", (raw, r)
    check_fields(r[2], expected)
    assert by_prefixes(raw, random_cuts(data.draw, len(raw)), False) == r


HEADISH = st.lists(st.sampled_from([b"GET ", b"/", b" HTTP/1.1", b"HTTP/1.1 200 OK", b"\r\n",
                                    b"\r", b"\n", b"Host: a", b": ", b"Content-Length: 5",
                                    b"Transfer-Encoding: chunked", b" ", b"\t", b"\x00",
                                    b"\x80", b"x", b"Connection: close", b"\r\n\r\n"]),
                   max_size=30).map(b"".join)


@SETTINGS
@given(st.one_of(st.binary(max_size=300), HEADISH), st.booleans(), st.data())
def test_property_garbage_never_crashes_and_is_split_independent(blob, is_request, data):
    kw = dict(max_head_bytes=data.draw(st.sampled_from([65536, 64, 16])),
              max_headers=data.draw(st.sampled_from([100, 2, 0])))
    r = whole(blob, is_request, **kw)         # only ok / incomplete / ValueError
    assert by_prefixes(blob, random_cuts(data.draw, len(blob)), is_request, **kw) == r
    if r[0] == "ok":
        # a complete head always ends in CRLF CRLF and re-parses the same
        assert blob[:r[1]].endswith(b"\r\n\r\n")
        assert whole(blob[:r[1]], is_request, **kw) == r


@SETTINGS
@given(request_heads(), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=3))
def test_property_any_corruption_is_rejected_or_still_well_formed(head, pos, junk):
    # overwrite some bytes of a valid head: the result is an error, or it parses to a head
    # whose fields contain none of the forbidden bytes
    raw, _ = head
    pos %= len(raw)
    mutated = raw[:pos] + junk + raw[pos + len(junk):]
    r = whole(mutated)
    if r[0] == "ok":
        d = r[2]
        assert all(0x21 <= c <= 0x7E for c in d["target"])
        for n, v in d["headers"]:
            assert all(chr(c) in TCHARS for c in n)
            assert not any(c in (0, 10, 13, 0x7F) or (c < 32 and c != 9) for c in v)
