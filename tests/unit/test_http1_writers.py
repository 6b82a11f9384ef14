"""Head writers (fastmesh._core.http1): the forwarded request head, the relayed response head,
the proxy's own error responses and request ids. Every output is re-parsed, by fastmesh's
own parser and by llhttp (httptools), so a writer can't emit something a peer reads apart."""
import re

import httptools
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastmesh._core.http1 import (
    HeadParser, py_build_request_head, py_build_response_head, py_error_response,
    py_make_request_id, reason_phrase,
)

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

HOP_BY_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
              b"proxy-authorization", b"proxy-authenticate", b"proxy-connection"}


def fwd(head, **kw):
    out = py_build_request_head(head, **kw)
    assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
    n, d = HeadParser(True).parse(out)          # our own parser accepts what we send
    assert n == len(out)
    return out, d


def names(d):
    return [n.lower() for n, _ in d["headers"]]


def values(d, name):
    return [v for n, v in d["headers"] if n.lower() == name]


class _Rec:
    def __init__(self):
        self.headers, self.body, self.done, self.status = [], b"", 0, None

    def on_header(self, n, v):
        self.headers.append((n.lower(), v))

    def on_body(self, b):
        self.body += b

    def on_message_complete(self):
        self.done += 1


def llhttp_response(data, head_request=False):
    rec = _Rec()
    p = httptools.HttpResponseParser(rec)
    p.feed_data(data)
    rec.status = p.get_status_code()
    return rec


def req(*headers, line=b"GET /p?q HTTP/1.1"):
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


# ----------------------------------------------------------------- request head

def test_minimal_request():
    out, d = fwd(req(b"Host: a"), client_ip=b"10.0.0.7", request_id=b"id-1")
    assert out == (b"GET /p?q HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 10.0.0.7\r\n"
                   b"x-forwarded-proto: http\r\nx-request-id: id-1\r\n\r\n")
    assert d["method"] == b"GET" and d["target"] == b"/p?q" and d["body_kind"] == 0


def test_hop_by_hop_headers_are_removed():
    head = req(b"Host: a", b"Connection: keep-alive", b"Keep-Alive: timeout=5", b"TE: trailers",
               b"Trailer: Expires", b"Upgrade: websocket", b"Proxy-Authorization: Basic x",
               b"Proxy-Connection: keep-alive", b"PROXY-Whatever: 1", b"X-Keep: yes",
               b"Content-Length: 3", line=b"POST / HTTP/1.1")
    out, d = fwd(head)
    assert not HOP_BY_HOP & set(names(d)) and b"proxy-whatever" not in names(d)
    assert values(d, b"x-keep") == [b"yes"]
    assert values(d, b"content-length") == [b"3"] and d["body_kind"] == 1


def test_headers_named_by_connection_are_removed():
    head = req(b"Host: a", b"Connection: Foo, bar , keep-alive", b"Connection: BAZ",
               b"foo: 1", b"Bar: 2", b"baz: 3", b"FooBar: 4", b"Fo: 5")
    out, d = fwd(head)
    assert names(d) == [b"host", b"foobar", b"fo", b"x-forwarded-for", b"x-forwarded-proto",
                        b"x-request-id"]


def test_connection_can_not_remove_host_or_framing():
    # "Connection: content-length" must not strip the framing header (that would desync the
    # upstream from us) nor Host (routing)
    head = req(b"Host: a", b"Connection: Content-Length, Host, Transfer-Encoding",
               b"Content-Length: 4", line=b"POST / HTTP/1.1")
    out, d = fwd(head)
    assert values(d, b"content-length") == [b"4"] and values(d, b"host") == [b"a"]
    head = req(b"Host: a", b"Connection: transfer-encoding", b"Transfer-Encoding: chunked",
               line=b"POST / HTTP/1.1")
    out, d = fwd(head)
    assert values(d, b"transfer-encoding") == [b"chunked"] and d["body_kind"] == 2


def test_transfer_encoding_is_re_emitted_canonically():
    out, d = fwd(req(b"Host: a", b"Transfer-Encoding:  CHUNKED ", line=b"POST / HTTP/1.1"))
    assert b"transfer-encoding: chunked\r\n" in out and b"CHUNKED" not in out
    assert values(d, b"transfer-encoding") == [b"chunked"]


def test_x_forwarded_for_is_appended():
    _, d = fwd(req(b"Host: a"), client_ip=b"10.1.1.1")
    assert values(d, b"x-forwarded-for") == [b"10.1.1.1"]
    _, d = fwd(req(b"Host: a", b"X-Forwarded-For: 1.2.3.4"), client_ip=b"10.1.1.1")
    assert values(d, b"x-forwarded-for") == [b"1.2.3.4, 10.1.1.1"]
    _, d = fwd(req(b"Host: a", b"X-Forwarded-For: 1.2.3.4, 5.6.7.8", b"x-forwarded-for: 9.9.9.9",
                   b"X-Forwarded-For:"), client_ip=b"::1")
    assert values(d, b"x-forwarded-for") == [b"1.2.3.4, 5.6.7.8, 9.9.9.9, ::1"]


def test_x_forwarded_for_survives_connection_naming_it():
    # an attacker can't make us drop the chain (or our own entry) via Connection
    _, d = fwd(req(b"Host: a", b"Connection: x-forwarded-for", b"X-Forwarded-For: 1.2.3.4"),
               client_ip=b"10.1.1.1")
    assert values(d, b"x-forwarded-for") == [b"1.2.3.4, 10.1.1.1"]


def test_x_forwarded_proto_is_replaced():
    _, d = fwd(req(b"Host: a", b"X-Forwarded-Proto: https", b"x-forwarded-proto: wss"))
    assert values(d, b"x-forwarded-proto") == [b"http"]


def test_request_id_kept_when_present_added_when_absent():
    _, d = fwd(req(b"Host: a", b"X-Request-Id: client-chosen"), request_id=b"ours")
    assert values(d, b"x-request-id") == [b"client-chosen"]
    _, d = fwd(req(b"Host: a"), request_id=b"ours")
    assert values(d, b"x-request-id") == [b"ours"]
    _, d = fwd(req(b"Host: a"), request_id=None)
    assert values(d, b"x-request-id") == []


def test_request_id_named_by_connection_is_replaced():
    # hop-by-hop by Connection: the client's id is dropped, and the upstream still gets one
    _, d = fwd(req(b"Host: a", b"Connection: X-Request-Id", b"X-Request-Id: client"),
               request_id=b"ours")
    assert values(d, b"x-request-id") == [b"ours"]


def test_headers_to_add_and_remove():
    head = req(b"Host: a", b"Cookie: c", b"X-Debug: 1", b"x-debug: 2", b"X-Keep: k")
    # remove names come lower-cased from the config loader; matching ignores the head's case
    _, d = fwd(head, add=((b"x-mesh", b"v1"), (b"x-env", b"prod")),
               remove=(b"x-debug", b"cookie", b"absent"))
    assert names(d) == [b"host", b"x-keep", b"x-forwarded-for", b"x-forwarded-proto",
                        b"x-request-id", b"x-mesh", b"x-env"]
    assert values(d, b"x-mesh") == [b"v1"]


def test_remove_can_not_resurrect_hop_by_hop_or_touch_framing_re_emission():
    head = req(b"Host: a", b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.1")
    _, d = fwd(head, remove=(b"transfer-encoding",))
    assert d["body_kind"] == 2          # the forwarded body is chunked: the header must stay


@pytest.mark.parametrize("strip", [True, False])
def test_expect(strip):
    head = req(b"Host: a", b"Expect: 100-continue", b"Content-Length: 1", line=b"PUT / HTTP/1.1")
    _, d = fwd(head, strip_expect=strip)
    assert values(d, b"expect") == ([] if strip else [b"100-continue"])


def test_version_method_target_preserved_and_absolute_form_becomes_origin_form():
    _, d = fwd(req(b"Host: a", line=b"DELETE /x/y?z=1 HTTP/1.1"))
    assert (d["method"], d["target"], d["minor"]) == (b"DELETE", b"/x/y?z=1", 1)
    out, d = fwd(req(b"Host: a.b", line=b"GET http://a.b/x?y HTTP/1.1"))
    assert out.startswith(b"GET /x?y HTTP/1.1\r\n")
    out, d = fwd(req(b"Host: a", b"Connection: keep-alive", line=b"GET / HTTP/1.0"))
    assert out.startswith(b"GET / HTTP/1.1\r\n")      # upstream connections are HTTP/1.1


def test_forwarded_request_parses_in_llhttp():
    head = req(b"Host: a", b"Connection: close, X-A", b"X-A: 1", b"X-B: 2",
               b"Transfer-Encoding: chunked", line=b"POST /u HTTP/1.1")
    out = py_build_request_head(head, add=((b"x-c", b"3"),))
    rec = _Rec()
    p = httptools.HttpRequestParser(rec)
    p.feed_data(out + b"3\r\nabc\r\n0\r\n\r\n")
    assert rec.done == 1 and rec.body == b"abc"
    assert (b"x-a", b"1") not in rec.headers and (b"x-b", b"2") in rec.headers


TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=TCHARS, min_size=1, max_size=12).map(str.encode)


@SETTINGS
@given(st.lists(st.tuples(tokens, tokens), max_size=10), st.lists(tokens, max_size=3),
       st.sampled_from([b"", b"Content-Length: 7", b"Transfer-Encoding: chunked"]))
def test_property_forwarded_head_is_well_formed(fields, connection_names, framing):
    hs = [b"Host: svc"] + [n + b": " + v for n, v in fields]
    if connection_names:
        hs.append(b"Connection: " + b", ".join(connection_names))
    if framing:
        hs.append(framing)
    head = req(*hs, line=b"POST /x HTTP/1.1")
    try:
        _, src = HeadParser(True).parse(head)
    except ValueError:
        return                          # random fields collided with framing rules
    out, d = fwd(head, client_ip=b"1.1.1.1")
    lowered = {c.lower() for c in connection_names} - {b"host", b"content-length"}
    out_names = names(d)
    # nothing hop-by-hop or named by Connection (except what we add back) goes out
    for n in out_names:
        assert n not in HOP_BY_HOP - {b"transfer-encoding"}
        assert n not in lowered or n in (b"x-forwarded-for", b"x-forwarded-proto",
                                         b"x-request-id", b"transfer-encoding")
    # framing is preserved exactly
    assert (d["body_kind"], d["content_length"]) == (src["body_kind"], src["content_length"])
    assert out_names.count(b"x-forwarded-for") == 1 and out_names.count(b"x-forwarded-proto") == 1
    assert out_names.count(b"x-request-id") == 1


# ---------------------------------------------------------------- response head

def resp(*headers, line=b"HTTP/1.1 200 OK"):
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def relay(head, **kw):
    out = py_build_response_head(head, **kw)
    assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
    p = HeadParser(False)
    p.expect_head_response = kw.get("request_was_head", False)
    n, d = p.parse(out)
    assert n == len(out)
    return out, d


def test_response_content_length_passes_through():
    out, d = relay(resp(b"Content-Length: 5", b"X-A: 1"))
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n"
    rec = llhttp_response(out + b"hello")
    assert rec.done == 1 and rec.body == b"hello"


def test_response_chunked_as_received():
    out, d = relay(resp(b"Transfer-Encoding: chunked"), te_mode=0)
    assert d["body_kind"] == 2 and values(d, b"transfer-encoding") == [b"chunked"]
    out, d = relay(resp(b"Transfer-Encoding: gzip, chunked"), te_mode=0)
    assert values(d, b"transfer-encoding") == [b"gzip, chunked"]   # the coding stays named


def test_response_close_delimited_rechunked():
    out, d = relay(resp(), te_mode=1)
    assert d["body_kind"] == 2
    rec = llhttp_response(out + b"4\r\nbody\r\n0\r\n\r\n")
    assert rec.done == 1 and rec.body == b"body"


def test_response_close_delimited_with_a_coding_rechunked_keeps_it():
    out, d = relay(resp(b"Transfer-Encoding: gzip"), te_mode=1)
    assert values(d, b"transfer-encoding") == [b"gzip, chunked"] and d["body_kind"] == 2


def test_bodyless_responses_and_transfer_encoding():
    # HEAD and 304 may say how a GET's body would be coded; 204 must not carry it
    out, d = relay(resp(b"Transfer-Encoding: chunked"), request_was_head=True)
    assert values(d, b"transfer-encoding") == [b"chunked"] and d["body_kind"] == 0
    out, _ = relay(resp(b"Transfer-Encoding: chunked", line=b"HTTP/1.1 304 Not Modified"))
    assert b"transfer-encoding: chunked" in out.lower()
    out, _ = relay(resp(b"Transfer-Encoding: chunked", line=b"HTTP/1.1 204 No Content"))
    assert b"transfer-encoding" not in out.lower()
    # never to an HTTP/1.0 client
    out, _ = relay(resp(b"Transfer-Encoding: chunked"), te_mode=2, request_was_head=True)
    assert b"transfer-encoding" not in out.lower()


def test_response_dechunked_for_http10():
    out, d = relay(resp(b"Transfer-Encoding: chunked"), te_mode=2, close=True)
    assert b"transfer-encoding" not in out.lower()
    assert d["body_kind"] == 3 and d["conn_close"]


def test_response_connection_handling():
    out, d = relay(resp(b"Content-Length: 0", b"Connection: keep-alive, X-Hop", b"X-Hop: 1",
                        b"Keep-Alive: timeout=5", b"Upgrade: h2c", b"Proxy-Authenticate: B",
                        b"Trailer: E", b"X-End: 2"))
    assert names(d) == [b"content-length", b"x-end"]
    out, d = relay(resp(b"Content-Length: 0"), close=True)
    assert values(d, b"connection") == [b"close"] and d["conn_close"]
    out, d = relay(resp(b"Content-Length: 0"), keep_alive_10=True)
    assert values(d, b"connection") == [b"keep-alive"]
    out, d = relay(resp(b"Content-Length: 0", line=b"HTTP/1.0 200 OK"))
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and values(d, b"connection") == []


@pytest.mark.parametrize("line", [b"HTTP/1.1 100 Continue", b"HTTP/1.1 103 Early Hints",
                                  b"HTTP/1.1 101 Switching Protocols"])
def test_informational_responses_get_no_framing_or_connection(line):
    out, d = relay(resp(b"Upgrade: websocket", b"Connection: upgrade", line=line), te_mode=1,
                   close=True)
    assert out == line + b"\r\n\r\n"


def test_status_line_is_rebuilt():
    out, _ = relay(resp(line=b"HTTP/1.0 404 Not  Found"), close=True)
    assert out.startswith(b"HTTP/1.1 404 Not  Found\r\n")
    out, _ = relay(resp(b"Content-Length: 0", line=b"HTTP/1.1 599"))
    assert out.startswith(b"HTTP/1.1 599 \r\n")
    assert llhttp_response(out).status == 599


def test_response_to_head_request():
    out, d = relay(resp(b"Content-Length: 1000"), request_was_head=True)
    assert values(d, b"content-length") == [b"1000"] and d["body_kind"] == 0


# ------------------------------------------------------------- error responses

@pytest.mark.parametrize("status", [400, 404, 408, 413, 431, 500, 501, 502, 503, 504, 505, 299])
@pytest.mark.parametrize("body", [b"", b"x", b"upstream connect failed\n", b"\x00" * 1000])
@pytest.mark.parametrize("close", [False, True])
def test_error_response_parses_with_the_right_length(status, body, close):
    out = py_error_response(status, b"some_reason", body, close)
    rec = llhttp_response(out)
    assert rec.status == status and rec.done == 1 and rec.body == body
    assert dict(rec.headers)[b"content-length"] == b"%d" % len(body)
    assert (dict(rec.headers).get(b"connection") == b"close") == close
    assert dict(rec.headers)[b"x-fastmesh-error"] == b"some_reason"
    n, d = HeadParser(False).parse(out)
    assert d["status"] == status and d["content_length"] == len(body)
    assert d["reason"] == reason_phrase(status)
    assert n + len(body) == len(out)


def test_error_response_without_reason_code():
    out = py_error_response(503, None)
    assert b"x-fastmesh-error" not in out and out.endswith(b"content-length: 0\r\n\r\n")


def test_reason_phrases():
    assert reason_phrase(400) == b"Bad Request"
    assert reason_phrase(431) == b"Request Header Fields Too Large"
    assert reason_phrase(502) == b"Bad Gateway"
    assert reason_phrase(999) == b"Unknown"


# ------------------------------------------------------------------ request ids

UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_request_ids_are_uuid4_and_unique():
    ids = [py_make_request_id() for _ in range(20000)]
    assert all(isinstance(i, bytes) and UUID4.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    # not a counter: the random bits vary in every position class
    assert len({i[0:8] for i in ids}) > 19000 and len({i[24:] for i in ids}) > 19000
