"""fastmesh's HTTP/1 codec against llhttp (httptools), the parser of Node.js and uvloop.

The property: whenever fastmesh accepts a message, llhttp accepts it too and agrees on the
method, URL, headers and where the message ends (its body framing); wherever llhttp rejects,
fastmesh rejects. fastmesh may be stricter: STRICTER lists the known cases with the reason.
The few places where it is knowingly more lenient are in LENIENT, each with the reason that
leniency can't make two parsers frame a message differently.

llhttp is fed one byte at a time so the offsets of "headers complete" and "message complete"
are exact; both parsers must find the same end of the first message.
"""
import importlib.util
import pathlib
import re

import httptools
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastmesh._core.http1 import ChunkedFramer, HeadParser, py_build_request_head


def _load_corpus():
    path = pathlib.Path(__file__).with_name("smuggling_corpus.py")
    spec = importlib.util.spec_from_file_location("fastmesh_smuggling_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


corpus = _load_corpus()

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# methods llhttp knows (it rejects any other token; CONNECT is left out: llhttp treats it as
# a tunnel, fastmesh does not serve tunnels and rejects its authority-form target)
LL_METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE",
              b"PROPFIND", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH", b"PURGE",
              b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"NOTIFY", b"SUBSCRIBE",
              b"UNSUBSCRIBE", b"LINK", b"UNLINK", b"QUERY"]


TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------- llhttp, byte by byte

class _Msg:
    def __init__(self):
        self.url, self.headers, self.trailers, self.body = b"", [], [], b""
        self.head_end = self.end = None
        self.method = self.status = None


class LL:
    """Feeds data to llhttp one byte at a time and records, per message, the exact offsets."""

    def __init__(self, data, is_request=True):
        self.msgs, self.error, self.upgrade = [], None, None
        self._pos = 0
        parser_cls = httptools.HttpRequestParser if is_request else httptools.HttpResponseParser
        self._p = parser_cls(self)
        self.is_request = is_request
        for i in range(len(data)):
            self._pos = i + 1
            try:
                self._p.feed_data(data[i:i + 1])
            except httptools.HttpParserUpgrade:
                self.upgrade = i + 1
                break
            except httptools.HttpParserError as e:
                self.error = (i, str(e))
                break

    # callbacks
    def on_message_begin(self):
        self.msgs.append(_Msg())

    def on_url(self, url):
        self.msgs[-1].url += url

    def on_header(self, name, value):
        m = self.msgs[-1]
        (m.headers if m.head_end is None else m.trailers).append((name, value))

    def on_headers_complete(self):
        m = self.msgs[-1]
        m.head_end = self._pos
        if self.is_request:
            m.method = self._p.get_method()
        else:
            m.status = self._p.get_status_code()

    def on_body(self, body):
        self.msgs[-1].body += body

    def on_message_complete(self):
        self.msgs[-1].end = self._pos

    # summaries
    @property
    def first(self):
        return self.msgs[0] if self.msgs else None

    def rejected_first(self):
        """llhttp rejected the first message (before finishing it)."""
        return self.error is not None and (self.first is None or self.first.end is None)


# ------------------------------------------------------------------ fastmesh framing

class FM:
    """fastmesh's view of the first message: head, then body by its framing."""

    def __init__(self, data, is_request=True, head_response=False):
        self.head = self.reject = None
        self.end = None
        self.body = b""
        p = HeadParser(is_request)
        p.expect_head_response = head_response
        try:
            n, d = p.parse(data)
        except ValueError as e:
            self.reject = ("head", e.args[0])
            return
        if d is None:
            return
        self.head, self.head_end = d, n
        kind = d["body_kind"]
        if kind == 0:
            self.end = n
        elif kind == 1:
            if len(data) >= n + d["content_length"]:
                self.end = n + d["content_length"]
                self.body = bytes(data[n:self.end])
        elif kind == 2:
            try:
                used, pieces, done = ChunkedFramer().py_feed(data[n:])
            except ValueError as e:
                self.reject = ("body", e.args[0])
                return
            self.body = b"".join(pieces)
            if done:
                self.end = n + used
        # kind 3 (close-delimited): ends at EOF, self.end stays None

    @property
    def accepted(self):
        return self.reject is None


def request_target(data):
    line = data.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    return line.split(b" ")[1]


def assert_heads_agree(fm, ll, data):
    """fastmesh accepted the head: llhttp must have accepted the same head identically."""
    m = ll.first
    assert m is not None and m.head_end is not None, (data, ll.error)
    assert m.head_end == fm.head_end, (data, m.head_end, fm.head_end)
    d = fm.head
    if ll.is_request:
        assert m.method == d["method"]
        assert m.url == request_target(data)
        assert m.url.endswith(d["target"])            # absolute-form: target is the path part
    else:
        assert m.status == d["status"]
    # llhttp keeps a value's trailing whitespace; fastmesh trims it (RFC 9110 5.5)
    assert [(n, v.rstrip(b" \t")) for n, v in m.headers] == d["headers"]


def assert_messages_agree(fm, ll, data):
    """fastmesh accepted the whole first message: llhttp frames it identically."""
    assert_heads_agree(fm, ll, data)
    m = ll.first
    if fm.end is None:                               # incomplete / close-delimited
        assert m.end is None, data
        return
    assert m.end == fm.end, (data, m.end, fm.end)
    assert m.body == fm.body


# --------------------------------------------------- where fastmesh is stricter (known)

STRICTER = [
    # (request head, why fastmesh rejects what llhttp accepts)
    (b"GET / HTTP/1.1\r\n\r\n",
     "HTTP/1.1 without Host (RFC 9112 3.2: MUST 400); llhttp leaves it to the application"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
     "two Host fields: routing must not depend on which one a hop picks"),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", "two Host fields, even equal ones"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
     "TE in HTTP/1.0 (RFC 9112 6.1: an HTTP/1.0 peer can't be trusted to frame it)"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
     "request codings other than exactly chunked: not forwarded, so refused"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0000000000000000005\r\n\r\n",
     "Content-Length longer than 18 digits: no overflow checks needed"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775807\r\n\r\n",
     "Content-Length of 19 digits"),
    (b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
     "more than 4 empty lines before the request line: a cheap stall, not robustness"),
    (b"GET https://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
     "absolute-form with a scheme other than http: a sidecar listener is plain http"),
    (b"GET http://b/x HTTP/1.1\r\nHost: a\r\n\r\n",
     "absolute-form whose authority is not the Host: routing uses Host, so they must agree"),
    (b"GET http://a/x HTTP/1.0\r\n\r\n",
     "absolute-form without a Host to check it against"),
    (b"OPTIONS *x HTTP/1.1\r\nHost: a\r\n\r\n", "asterisk-form followed by more"),
    (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
     "asterisk-form with a method other than OPTIONS (RFC 9112 3.2.4: OPTIONS only); llhttp "
     "takes '*' for any method"),
    (b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", "POST * (same reason)"),
    (b"GET /#x HTTP/1.1\r\nHost: a\r\n\r\n",
     "a fragment in the target (RFC 9112 3.2: never sent); llhttp parses it as part of the "
     "URL, and a hop that cuts the target at '#' would route a different path"),
    (b"GET /a?b#/admin HTTP/1.1\r\nHost: a\r\n\r\n", "a fragment after the query"),
    # Host (RFC 9110 7.2: uri-host [":" port]); llhttp does not look at the Host value at all,
    # fastmesh routes on it and forwards it: a value two parsers can split differently is 400
    (b"GET / HTTP/1.1\r\nHost: pro be\r\n\r\n", "Host with a space"),
    (b"GET / HTTP/1.1\r\nHost: probe/evil\r\n\r\n", "Host with a path"),
    (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", "Host with userinfo: is the host a or b?"),
    (b"GET / HTTP/1.1\r\nHost: host:80:80\r\n\r\n", "Host with two ports"),
    (b"GET / HTTP/1.1\r\nHost: host:abc\r\n\r\n", "Host with a port that is no number"),
    (b"GET / HTTP/1.1\r\nHost: host:65536\r\n\r\n", "Host with a port over 65535"),
    (b"GET / HTTP/1.1\r\nHost: host:\r\n\r\n",
     "Host with an empty port (ABNF-valid, RFC 3986 3.2.3 says omit the ':'): the router "
     "would strip it, the upstream gets it as sent"),
    (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "Host with an unclosed IP-literal"),
    (b"GET / HTTP/1.1\r\nHost: a%zz\r\n\r\n", "Host with a bad percent-encoding"),
    (b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
     "empty Host: an http URI with an empty host is invalid (RFC 9110 4.2.1) and there is "
     "nothing to route on; nginx answers 400 as well"),
    (b"GET / HTTP/1.0\r\nHost: a b\r\n\r\n",
     "an invalid Host in HTTP/1.0 (where Host may be absent, but one that is sent is checked)"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
     "versions other than HTTP/1.0 and 1.1 (llhttp takes any digit.digit)"),
    (b"GET /\r\n\r\n", "HTTP/0.9 request line: no version, no headers, no framing"),
    (b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
     "bare LF before the request line: only CRLF ends a line, anywhere in a head"),
    (b"\r\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", "bare CR before the request line"),
]

STRICTER_BODIES = [
    # (chunked body, why fastmesh rejects what llhttp accepts)
    (b"ffffffffffffffff\r\n", "16 hex digits: a chunk over 2**60 bytes is never legitimate"),
    (b"0000000000000005\r\nhello\r\n0\r\n\r\n",
     "16 digits even with leading zeros: size lines are bounded, simply"),
]

STRICTER_RESPONSES = [
    (b"HTTP/1.1 099 X\r\n\r\n", "status below 100 (RFC 9110 15: 3 digits, 1xx-5xx)"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
     "two TE fields in a response: refused rather than merged"),
]

# --------------------------------------------- where fastmesh is more lenient (known)

LENIENT = [
    # (request, why accepting what llhttp rejects can't desynchronise anyone)
    (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
     "extension methods (RFC 9110 9.1: any token); llhttp only knows a fixed list. The "
     "method is delimited by SP and never affects framing here"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
     "identical duplicate Content-Length (RFC 9110 8.6 allows accepting it): one number, "
     "so every parser that accepts it frames the same body"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n",
     "trailing HTAB after a field value is OWS (RFC 9110 5.5) and trimmed; llhttp keeps it "
     "and no longer sees 'chunked' (it rejects such a request, and reads such a response to "
     "the close). fastmesh re-emits TE as exactly 'chunked', so the next hop sees no tab"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\nContent-Length: 9\r\n\r\n",
     "trailer fields are not interpreted (a Content-Length there frames nothing: the body "
     "ended at the last chunk, the trailer section at its blank line); llhttp reuses its "
     "header rules for trailers and sees CL with TE"),
    # (absolute-form authorities outside RFC 3986, "http://a{b/", were accepted here until
    # Host was checked: the authority must equal Host, so both reject them now, see HEADS)
]

LENIENT_BODIES = [
    (b"5;a = b\r\nhello\r\n0\r\n\r\n",
     "chunk extensions are checked for CTLs only (VCHAR/obs-text/SP/HTAB), not for the "
     "name[=value] grammar: the size line still ends at its first CR, which must be followed "
     "by LF, so the extension can't move where the chunk starts"),
    (b"5;\r\nhello\r\n0\r\n\r\n", "empty chunk extension (same reason)"),
    (b"5;a=\x80\r\nhello\r\n0\r\n\r\n", "obs-text in a chunk extension (same reason)"),
]


LENIENT_RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\r\nuntil close",
     "an empty Transfer-Encoding in a response: chunked is not its final coding, so the body "
     "runs to the close (RFC 9112 6.3); fastmesh re-frames it for the client and drops TE"),
]

# The one framing difference: fastmesh follows RFC 9110 15.2 (no 1xx response has a body);
# llhttp only knows 100-103 as bodiless and reads a body after e.g. a 150. An upstream that
# sends one gets a 502 from fastmesh (the body bytes can't parse as the next status line).
RESPONSE_DIFFERENCES = [b"HTTP/1.1 150 Odd\r\nContent-Length: 3\r\n\r\nabc",
                        b"HTTP/1.1 199 X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]


@pytest.mark.parametrize("data", RESPONSE_DIFFERENCES)
def test_unknown_1xx_has_no_body(data):
    fm = FM(data, False)
    assert fm.head["body_kind"] == 0 and fm.end == data.index(b"\r\n\r\n") + 4
    assert LL(data, False).first.end == len(data)
    with pytest.raises(ValueError):                   # what follows is not a status line
        HeadParser(False).parse(data[fm.end:] + b"\r\n\r\n")


@pytest.mark.parametrize("data,why", LENIENT_RESPONSES, ids=[w[:40] for _, w in LENIENT_RESPONSES])
def test_known_leniency_responses(data, why):
    fm = FM(data, False)
    assert fm.accepted and fm.head["body_kind"] == 3
    assert LL(data, False).rejected_first()


@pytest.mark.parametrize("data,why", STRICTER, ids=[w[:40] for _, w in STRICTER])
def test_stricter_than_llhttp(data, why):
    assert not FM(data).accepted
    ll = LL(data)
    assert ll.error is None and ll.first.head_end is not None, (
        "llhttp now rejects this too: move it out of STRICTER", ll.error)


@pytest.mark.parametrize("body,why", STRICTER_BODIES, ids=[w[:40] for _, w in STRICTER_BODIES])
def test_stricter_than_llhttp_bodies(body, why):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    assert FM(data).reject[0] == "body"
    assert LL(data).error is None


@pytest.mark.parametrize("data,why", STRICTER_RESPONSES,
                         ids=[w[:40] for _, w in STRICTER_RESPONSES])
def test_stricter_than_llhttp_responses(data, why):
    assert not FM(data, False).accepted
    assert LL(data, False).error is None


@pytest.mark.parametrize("data,why", LENIENT, ids=[w[:40] for _, w in LENIENT])
def test_known_leniency(data, why):
    fm = FM(data)
    assert fm.accepted and fm.end == len(data)
    assert LL(data).rejected_first()


@pytest.mark.parametrize("body,why", LENIENT_BODIES, ids=[w[:40] for _, w in LENIENT_BODIES])
def test_known_leniency_bodies(body, why):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    fm = FM(data)
    assert fm.accepted and fm.end == len(data) and fm.body == b"hello"
    assert LL(data).rejected_first()


def _fields(lines, name):
    return [v for n, _, v in (ln.partition(b":") for ln in lines) if n.lower() == name]


def _is_known_lenient(data, is_request=True):
    """Whether a difference (fastmesh accepts, llhttp rejects) is one of LENIENT's kinds.
    (Extension methods are not: check_request swaps them for one llhttp knows.)"""
    head, _, body = data.lstrip(b"\r\n").partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    cls = [v.strip(b" \t") for v in _fields(lines[1:], b"content-length")]
    if len(cls) > 1 and all(v.isdigit() for v in cls) and len({int(v) for v in cls}) == 1:
        return True                                  # identical duplicate Content-Length
    if re.search(rb"(^|\r\n)[0-9a-fA-F]+;", body):
        return True                                  # a chunk extension
    if any(v.rstrip(b" ").endswith(b"\t") for v in _fields(lines[1:], b"transfer-encoding")):
        return True                                  # trailing HTAB after a TE value
    trailers = body[3:] if body.startswith(b"0\r\n") else body.partition(b"\r\n0\r\n")[2]
    if re.search(rb"(^|\r\n)(content-length|transfer-encoding)\s*:",
                 trailers.split(b"\r\n\r\n")[0], re.I):
        return True                                  # framing field names as trailers
    return False


# ----------------------------------------------------------------------- the corpus

HEADS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a/b?c=d&e HTTP/1.1\r\nHost: a:80\r\nAccept: */*\r\nUser-Agent: x/1\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"DELETE /r HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"PUT /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX:  padded  \r\nY:\r\nZ:\t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: \x80\xff\r\nY: a\tb\r\n\r\n",
    b"GET /%00%0d%0a HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET //x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /?q=a/b?c HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: xn--bcher-kva.example\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a_b.local:65535\r\n\r\n",
    b"GET http://127.0.0.1:80/x HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    # invalid in both
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    b"GET http://a{b/x HTTP/1.1\r\nHost: a{b\r\n\r\n",
    b"GET http://a#b/x HTTP/1.1\r\nHost: a#b\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\t\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nabc",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 404 Not \x80 Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
]


def known_method(data):
    """data with an extension method (fastmesh accepts any token, llhttp a fixed list, see
    LENIENT) replaced by one llhttp knows, so the rest of the request is still compared."""
    m = re.match(rb"(\r\n)*([^ \r\n]+) ", data)
    if m and m.group(2) not in LL_METHODS and all(chr(c) in TCHARS for c in m.group(2)):
        return data[:m.start(2)] + b"PUT" + data[m.end(2):]
    return data


def check_request(data):
    """The differential property on one input (see the module docstring)."""
    data = known_method(data)
    fm, ll = FM(data), LL(data)
    lenient = _is_known_lenient(data)
    ll_head_rejected = ll.error is not None and (ll.first is None or ll.first.head_end is None)
    ll_body_rejected = ll.rejected_first() and not ll_head_rejected
    if fm.head is not None:                          # fastmesh accepted the head
        if ll_head_rejected:
            assert lenient, ("fastmesh accepts a head llhttp rejects", data, ll.error)
            return fm, ll
        assert_heads_agree(fm, ll, data)
        if ll.upgrade is not None:
            return fm, ll                            # see test_upgrade_is_stripped
        if fm.end is not None:                       # ... and the whole first message
            if ll_body_rejected or ll.first.end != fm.end:
                assert lenient, ("fastmesh frames a body llhttp doesn't", data, ll.error,
                                 ll.first.end, fm.end)
            else:
                assert ll.first.body == fm.body
        elif fm.reject is None:                      # body incomplete for fastmesh
            assert ll.first.end is None, data
    if ll_head_rejected and not lenient:
        assert fm.head is None, data
    if ll_body_rejected and not lenient:
        assert fm.end is None, data
    return fm, ll


@pytest.mark.parametrize("data", HEADS)
def test_request_corpus(data):
    check_request(data)


def _is_known_lenient_response(data):
    head = data.partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    if any(not v.strip(b" \t") for v in _fields(lines[1:], b"transfer-encoding")):
        return True                                  # empty TE: close-delimited
    return _is_known_lenient(data, False)


def check_response(data):
    """check_request's property for responses (to a GET)."""
    fm, ll = FM(data, False), LL(data, False)
    lenient = _is_known_lenient_response(data)
    ll_head_rejected = ll.error is not None and (ll.first is None or ll.first.head_end is None)
    ll_body_rejected = ll.rejected_first() and not ll_head_rejected
    if fm.head is not None:
        if ll_head_rejected:
            assert lenient, ("fastmesh accepts a head llhttp rejects", data, ll.error)
            return fm, ll
        assert_heads_agree(fm, ll, data)
        if ll.upgrade is not None or 103 < fm.head["status"] < 200:
            return fm, ll                            # 101; RESPONSE_DIFFERENCES
        if fm.end is not None:
            if ll_body_rejected or ll.first.end != fm.end:
                assert lenient, ("fastmesh frames a body llhttp doesn't", data, ll.error,
                                 ll.first.end, fm.end)
            else:
                assert ll.first.body == fm.body
        elif fm.reject is None:                      # incomplete or close-delimited
            assert ll.first.end is None, data
    if ll_head_rejected and not lenient:
        assert fm.head is None, data
    if ll_body_rejected and not lenient:
        assert fm.end is None, data
    return fm, ll


@pytest.mark.parametrize("data", RESPONSES)
def test_response_corpus(data):
    check_response(data)


# --------------------------------------------------------------- smuggling corpus

CASE_IDS = [c[0] for c in corpus.CASES]


@pytest.mark.parametrize("name,data,verdict,first_len", corpus.CASES, ids=CASE_IDS)
def test_smuggling_case(name, data, verdict, first_len):
    fm = FM(data)
    if verdict == corpus.REJECT:
        assert not fm.accepted, (name, fm.head)
        # and the same however the bytes arrive: head one byte at a time, body likewise
        p = HeadParser(True)
        try:
            for k in range(1, len(data) + 1):
                n, d = p.parse(data[:k])
                if d is not None:
                    break
        except ValueError:
            return
        assert d is not None and d["body_kind"] == 2, name
        f = ChunkedFramer()
        with pytest.raises(ValueError):
            for c in data[n:]:
                f.py_feed(bytes([c]))
        return
    assert fm.accepted and fm.end == first_len, (name, fm.reject, fm.end, first_len)
    ll = LL(data)
    if ll.upgrade is None:
        if not ll.rejected_first():
            assert_messages_agree(fm, ll, data)
        else:
            assert _is_known_lenient(data), (name, ll.error)
    # what fastmesh forwards is framed identically by llhttp as well
    head = bytes(data[:fm.head_end])
    out = py_build_request_head(head.lstrip(b"\r\n"))
    fwd = out + data[fm.head_end:]
    fm2, ll2 = FM(fwd), LL(fwd)
    assert fm2.accepted and fm2.end == len(out) + first_len - fm.head_end
    assert ll2.upgrade is None
    if ll2.rejected_first():
        assert _is_known_lenient(fwd), (name, ll2.error)
        return
    assert ll2.first.end == fm2.end and ll2.first.body == fm.body
    # and the bytes after the first request are the next request, for both
    if not fm2.head["conn_close"]:
        assert len(ll2.msgs) >= 2 and ll2.msgs[1].url == b"/smuggled"


def test_corpus_is_large_and_mixed():
    verdicts = [c[2] for c in corpus.CASES]
    assert verdicts.count(corpus.REJECT) >= 100 and verdicts.count(corpus.FRAMED) >= 15
    assert len(set(CASE_IDS)) == len(CASE_IDS)


def test_upgrade_is_stripped():
    # llhttp hands the connection over at the end of an Upgrade head; fastmesh never
    # upgrades: it frames the request normally and forwards it without Upgrade/Connection,
    # so the upstream frames it normally too (checked in test_smuggling_case)
    data = (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Content-Length: 2\r\n\r\nhi")
    assert LL(data).upgrade is not None
    fm = FM(data)
    assert fm.end == len(data) and fm.head["has_upgrade"]
    out = py_build_request_head(data[:fm.head_end])
    assert b"upgrade" not in out.lower()


# -------------------------------------------------------------------- properties

tokens = st.text(alphabet=TCHARS, min_size=1, max_size=12).map(str.encode)
names = tokens.filter(lambda n: n.lower() not in (b"host", b"content-length",
                                                   b"transfer-encoding", b"connection",
                                                   b"upgrade"))
path_bytes = st.sampled_from([bytes([c]) for c in range(0x21, 0x7F) if c != 0x23])  # no '#'
paths = st.lists(path_bytes, max_size=30).map(lambda cs: b"/" + b"".join(cs))
value_bytes = st.sampled_from([bytes([c]) for c in [9, 32] + list(range(0x21, 0x7F))
                               + list(range(0x80, 0x100))])
values = st.lists(value_bytes, max_size=20).map(b"".join)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(LL_METHODS))
    minor = draw(st.sampled_from([0, 1]))
    fields = [(n, v) for n, v in draw(st.lists(st.tuples(names, values), max_size=8))]
    if minor == 1 or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"svc"))
    body = b""
    framing = draw(st.sampled_from(["none", "cl", "chunked"] if minor else ["none", "cl"]))
    if framing == "cl":
        body = draw(st.binary(max_size=40))
        fields.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        chunks = draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4))
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        fields.append((b"Transfer-Encoding", b"chunked"))
    draw(st.randoms()).shuffle(fields)
    head = (method + b" " + draw(paths) + b" HTTP/1.%d\r\n" % minor
            + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n")
    return head + body


@SETTINGS
@given(requests())
def test_property_generated_requests_agree(data):
    fm, ll = check_request(data + corpus.NEXT)
    assert fm.accepted and fm.end == len(data), (data, fm.reject)
    if not fm.head["conn_close"]:                    # (llhttp stops after a closing one)
        assert ll.msgs[1].url == b"/smuggled"        # both resume at the same byte


MUTATIONS = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x0b", b"\x7f", b"\x80", b",",
             b":", b";", b"0", b"5", b"-", b"+", b"x", b"chunked", b"identity",
             b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
             b"Content-Length: 0\r\n", b"Host: b\r\n", b"\r\n\r\n", b" chunked\r\n"]


@SETTINGS
@given(st.one_of(requests(), st.sampled_from([c[1] for c in corpus.CASES])),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(MUTATIONS),
                          st.booleans()), min_size=1, max_size=3))
def test_property_mutated_requests(data, edits):
    # insert or overwrite smuggling-flavoured bytes anywhere: fastmesh either rejects, or
    # llhttp frames the result exactly as fastmesh does
    for pos, ins, overwrite in edits:
        pos %= len(data) + 1
        data = data[:pos] + ins + data[pos + (len(ins) if overwrite else 0):]
    check_request(data)


@st.composite
def responses(draw):
    status = draw(st.sampled_from([100, 200, 201, 204, 206, 301, 304, 404, 500, 503]))
    fields = draw(st.lists(st.tuples(names, values), max_size=6))
    framing = draw(st.sampled_from(["none", "cl", "chunked", "close"]))
    body = b""
    if status in (100, 204, 304):
        framing = draw(st.sampled_from(["none", "cl"]))
    if framing == "cl":
        body = draw(st.binary(max_size=30))
        fields.append((b"Content-Length", b"%d" % len(body)))
        if status in (100, 204, 304):
            body = b""
    elif framing == "chunked":
        chunks = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=3))
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        fields.append((b"Transfer-Encoding", b"chunked"))
    elif framing == "close":
        body = draw(st.binary(max_size=30))
    reason = draw(st.sampled_from([b" OK", b"", b" ", b" Some Reason"]))
    return (b"HTTP/1.1 %d" % status + reason + b"\r\n"
            + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n" + body)


@SETTINGS
@given(responses())
def test_property_generated_responses_agree(data):
    fm, ll = FM(data, False), LL(data, False)
    assert fm.accepted and fm.head is not None, (data, fm.reject)
    assert not ll.rejected_first(), (data, ll.error)
    assert_messages_agree(fm, ll, data)


@SETTINGS
@given(st.one_of(responses(), st.sampled_from(RESPONSES)),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(MUTATIONS),
                          st.booleans()), min_size=1, max_size=3))
def test_property_mutated_responses(data, edits):
    for pos, ins, overwrite in edits:
        pos %= len(data) + 1
        data = data[:pos] + ins + data[pos + (len(ins) if overwrite else 0):]
    check_response(data)


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=20), max_size=4),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(MUTATIONS)), max_size=2))
def test_property_chunked_bodies_agree(chunks, edits):
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    for pos, ins in edits:
        pos %= len(body) + 1
        body = body[:pos] + ins + body[pos:]
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = head + body + corpus.NEXT
    fm, ll = FM(data), LL(data)
    if fm.accepted and fm.end is not None:
        if ll.rejected_first():
            assert _is_known_lenient(data), (body, ll.error)
        else:
            assert ll.first.end == fm.end and ll.first.body == fm.body, body
    if ll.rejected_first() and not _is_known_lenient(data):
        assert not (fm.accepted and fm.end is not None), body
