"""Request-smuggling corpus for the HTTP/1 codec (data, not tests).

Each case is a request that a front-end and a back-end could frame differently. fastmesh must
either reject it (answer 400 and close) or frame it unambiguously: the first request ends at
exactly one offset, the one every conforming parser (llhttp here) also finds. The tests in
test_http1_differential.py assert both halves; the fuzz harness uses the bytes as seeds.

    REJECT   fastmesh rejects it: the head (HeadParser) or the chunked body (ChunkedFramer)
    FRAMED   fastmesh accepts it; `first` is exactly the first request, `rest` what follows
"""

REJECT = "reject"
FRAMED = "framed"

NEXT = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


def _post(*headers, body=b"", line=b"POST / HTTP/1.1", host=b"Host: a"):
    hs = ([host] if host else []) + list(headers)
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in hs) + b"\r\n" + body


def _te(body, *extra, te=b"Transfer-Encoding: chunked"):
    return _post(te, *extra, body=body)


CASES = []   # (name, data, verdict, first_len): first_len is the end of request 1 if FRAMED


def reject(name, data):
    CASES.append((name, data, REJECT, None))


def framed(name, first, rest=NEXT):
    CASES.append((name, first + rest, FRAMED, len(first)))


# --------------------------------------------------------------- CL and TE together
reject("CL.TE", _post(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\nG"))
reject("TE.CL", _post(b"Transfer-Encoding: chunked", b"Content-Length: 3",
                      body=b"8\r\nSMUGGLED\r\n0\r\n\r\n"))
reject("CL 0 + TE", _post(b"Content-Length: 0", b"Transfer-Encoding: chunked",
                          body=b"5\r\nhello\r\n0\r\n\r\n"))
reject("TE + CL in lower case", _post(b"transfer-encoding: chunked", b"content-length: 4",
                                      body=b"0\r\n\r\n"))
reject("TE identity + CL", _post(b"Transfer-Encoding: identity", b"Content-Length: 5",
                                 body=b"hello"))
reject("CL + TE obs-folded onto another field",
       _post(b"Content-Length: 5", b"X: y", b" Transfer-Encoding: chunked", body=b"hello"))

# ------------------------------------------------------------------ Content-Length
reject("duplicate CL differing", _post(b"Content-Length: 0", b"Content-Length: 44",
                                       body=b"x" * 44))
reject("CL list", _post(b"Content-Length: 0, 44", body=b"x" * 44))
reject("CL list equal", _post(b"Content-Length: 5, 5", body=b"hello"))
reject("CL +5", _post(b"Content-Length: +5", body=b"hello"))
reject("CL -5", _post(b"Content-Length: -5", body=b"hello"))
reject("CL 0x5", _post(b"Content-Length: 0x5", body=b"hello"))
reject("CL 5e0", _post(b"Content-Length: 5e0", body=b"hello"))
reject("CL 1_0", _post(b"Content-Length: 1_0", body=b"0123456789"))
reject("CL inner space", _post(b"Content-Length: 1 0", body=b"0123456789"))
reject("CL trailing NUL", _post(b"Content-Length: 5\x00", body=b"hello"))
reject("CL leading VT", _post(b"Content-Length: \x0b5", body=b"hello"))
reject("CL empty", _post(b"Content-Length:", body=b"hello"))
reject("CL 2**64", _post(b"Content-Length: 18446744073709551616", body=b"x"))
reject("CL 2**63 - 1", _post(b"Content-Length: 9223372036854775807", body=b"x"))
reject("CL space before colon", _post(b"Content-Length : 5", body=b"hello"))
reject("CL tab before colon", _post(b"Content-Length\t: 5", body=b"hello"))
reject("CL NUL in name", _post(b"Content-Length\x00: 5", body=b"hello"))
reject("CL obs-folded value", _post(b"Content-Length:", b" 5", body=b"hello"))
reject("CL hidden behind bare CR", _post(b"X: y\rContent-Length: 5", body=b"hello"))
reject("CL hidden behind bare LF", _post(b"X: y\nContent-Length: 5", body=b"hello"))
reject("CL line ending CR CR LF", _post(b"Content-Length: 5\r", body=b"hello"))
framed("CL with OWS", _post(b"Content-Length: \t 5 \t", body=b"hello"))
framed("CL leading zeros", _post(b"Content-Length: 005", body=b"hello"))
framed("CL 0 then pipelined", _post(b"Content-Length: 0"))
framed("GET with a CL body", _post(b"Content-Length: 5", body=b"hello", line=b"GET / HTTP/1.1"))
framed("Connection names content-length", _post(b"Connection: content-length",
                                                b"Content-Length: 5", body=b"hello"))
framed("Transfer_Encoding is just a field (CL frames)",
       _post(b"Transfer_Encoding: chunked", b"Content-Length: 5", body=b"hello"))
framed("no framing headers: no body", _post())

# ----------------------------------------------------------------- Transfer-Encoding
framed("TE chunked", _te(b"5\r\nhello\r\n0\r\n\r\n"))
framed("TE CHUNKED upper case", _te(b"5\r\nhello\r\n0\r\n\r\n", te=b"Transfer-Encoding: CHUNKED"))
framed("TE with OWS", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: \tchunked\t "))
framed("TE chunked with trailers", _te(b"5\r\nhello\r\n0\r\nX-T: 1\r\nExpires: 0\r\n\r\n"))
framed("framing fields as trailers mean nothing",
       _te(b"5\r\nhello\r\n0\r\nContent-Length: 9\r\nTransfer-Encoding: x\r\n\r\n"))
framed("TE chunked with an extension", _te(b"5;foo=bar\r\nhello\r\n0\r\n\r\n"))
framed("TE chunked, body holds a request", _te(b"%x\r\n%s\r\n0\r\n\r\n" % (len(NEXT), NEXT)))
reject("TE chunked, identity", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chunked, identity"))
reject("TE identity, chunked", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: identity, chunked"))
reject("TE gzip, chunked", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: gzip, chunked"))
reject("TE chunked, chunked", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chunked, chunked"))
reject("TE chunked twice", _te(b"0\r\n\r\n", b"Transfer-Encoding: chunked"))
reject("TE split over two fields", _te(b"0\r\n\r\n", b"Transfer-Encoding: chunked",
                                       te=b"Transfer-Encoding: gzip"))
reject("TE identity", _te(b"hello", te=b"Transfer-Encoding: identity"))
reject("TE xchunked", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: xchunked"))
reject("TE chunkedx", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chunkedx"))
reject("TE chunk", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chunk"))
reject("TE quoted", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: \"chunked\""))
reject("TE chunked;q", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chunked;q=1.0"))
reject("TE trailing comma", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chunked,"))
reject("TE leading comma", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: ,chunked"))
reject("TE NUL after", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chunked\x00"))
reject("TE VT before", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: \x0bchunked"))
reject("TE FF before", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: \x0cchunked"))
reject("TE NUL inside", _te(b"0\r\n\r\n", te=b"Transfer-Encoding: chu\x00nked"))
reject("TE empty", _te(b"0\r\n\r\n", te=b"Transfer-Encoding:"))
reject("TE space before colon", _te(b"0\r\n\r\n", te=b"Transfer-Encoding : chunked"))
reject("TE tab before colon", _te(b"0\r\n\r\n", te=b"Transfer-Encoding\t: chunked"))
reject("TE obs-fold value", _te(b"0\r\n\r\n", b" chunked", te=b"Transfer-Encoding:"))
reject("TE obs-fold tab value", _te(b"0\r\n\r\n", b"\tchunked", te=b"Transfer-Encoding: x"))
reject("TE name obs-folded in", _te(b"0\r\n\r\n", b" Transfer-Encoding: chunked", te=b"X: y"))
reject("TE first line indented", _post(b" Transfer-Encoding: chunked", b"Host: a",
                                       body=b"0\r\n\r\n", host=None))
reject("TE hidden behind bare CR", _post(b"X: y\rTransfer-Encoding: chunked", body=b"0\r\n\r\n"))
reject("TE hidden behind bare LF", _post(b"X: y\nTransfer-Encoding: chunked", body=b"0\r\n\r\n"))
reject("TE in HTTP/1.0", _post(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n",
                               line=b"POST / HTTP/1.0"))
reject("TE + CL in HTTP/1.0", _post(b"Transfer-Encoding: chunked", b"Content-Length: 5",
                                    body=b"0\r\n\r\n", line=b"POST / HTTP/1.0"))

# ----------------------------------------------------------------------- chunk sizes
reject("chunk size -1", _te(b"-1\r\nx\r\n0\r\n\r\n"))
reject("chunk size 0x10", _te(b"0x10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"))
reject("chunk size +1", _te(b"+1\r\nx\r\n0\r\n\r\n"))
reject("chunk size 2**64", _te(b"10000000000000000\r\nx\r\n0\r\n\r\n"))
reject("chunk size 2**64 + 5 (wraps to 5)", _te(b"10000000000000005\r\nhello\r\n0\r\n\r\n"))
reject("chunk size 16 f", _te(b"ffffffffffffffff\r\nx\r\n0\r\n\r\n"))
reject("chunk size 16 digits of zeros", _te(b"0000000000000005\r\nhello\r\n0\r\n\r\n"))
reject("chunk size with space", _te(b"5 \r\nhello\r\n0\r\n\r\n"))
reject("chunk size with tab", _te(b"5\t\r\nhello\r\n0\r\n\r\n"))
reject("chunk size space then ext", _te(b"5 ;x\r\nhello\r\n0\r\n\r\n"))
reject("chunk size space then junk", _te(b"5 junk\r\nhello\r\n0\r\n\r\n"))
reject("chunk size leading space", _te(b" 5\r\nhello\r\n0\r\n\r\n"))
reject("chunk size NUL", _te(b"5\x00\r\nhello\r\n0\r\n\r\n"))
reject("chunk size bare LF", _te(b"5\nhello\r\n0\r\n\r\n"))
reject("chunk size bare CR", _te(b"5\rhello\r\n0\r\n\r\n"))
reject("chunk size empty", _te(b"\r\nhello\r\n0\r\n\r\n"))
reject("chunk size g", _te(b"g\r\nhello\r\n0\r\n\r\n"))
reject("chunk ext bare CR", _te(b"5;a\rb\r\nhello\r\n0\r\n\r\n"))
reject("chunk ext CR CR LF", _te(b"5;a\r\r\nhello\r\n0\r\n\r\n"))
reject("chunk ext bare LF", _te(b"5;a\nb\r\nhello\r\n0\r\n\r\n"))
reject("chunk ext NUL", _te(b"5;a\x00\r\nhello\r\n0\r\n\r\n"))
reject("last chunk ext bare LF", _te(b"0;a\n\r\n"))
reject("chunk data too long", _te(b"3\r\nhello\r\n0\r\n\r\n"))
reject("chunk data too short", _te(b"5\r\nhey\r\n0\r\n\r\n\r\n\r\n"))
reject("chunk data bare LF", _te(b"5\r\nhello\n0\r\n\r\n"))
reject("chunk data no CRLF", _te(b"5\r\nhello0\r\n\r\n"))
reject("last chunk bare LF", _te(b"0\n\r\n"))
reject("final line bare LF", _te(b"0\r\n\n"))
reject("final line bare CR", _te(b"0\r\n\r" + NEXT))
reject("trailer bare LF", _te(b"0\r\nX: 1\n\r\n"))
reject("trailer obs-fold", _te(b"0\r\nX: 1\r\n 2\r\n\r\n"))
reject("trailer without colon", _te(b"0\r\nX\r\n\r\n"))
reject("trailer space before colon", _te(b"0\r\nX : 1\r\n\r\n"))
reject("trailer NUL", _te(b"0\r\nX: \x00\r\n\r\n"))

# ---------------------------------------------------------- request line, Host, misc
reject("HTTP/1.1 without Host", _post(host=None, line=b"GET / HTTP/1.1"))
reject("two Host fields", _post(b"Host: b", line=b"GET / HTTP/1.1"))
reject("Host with NUL", _post(host=b"Host: a\x00b", line=b"GET / HTTP/1.1"))
reject("Host space before colon", _post(host=b"Host : a", line=b"GET / HTTP/1.1"))
reject("Host with a space", _post(host=b"Host: pro be", line=b"GET / HTTP/1.1"))
reject("Host with a path", _post(host=b"Host: probe/evil", line=b"GET / HTTP/1.1"))
reject("Host with userinfo", _post(host=b"Host: a@b", line=b"GET / HTTP/1.1"))
reject("Host with two ports", _post(host=b"Host: a:80:80", line=b"GET / HTTP/1.1"))
reject("Host with a word as port", _post(host=b"Host: a:abc", line=b"GET / HTTP/1.1"))
reject("Host with an unclosed IP-literal", _post(host=b"Host: [::1", line=b"GET / HTTP/1.1"))
reject("Host empty", _post(host=b"Host: ", line=b"GET / HTTP/1.1"))
reject("Host with a port over 65535", _post(host=b"Host: a:65616", line=b"GET / HTTP/1.1"))
reject("fragment in the target", _post(line=b"GET /#/../admin HTTP/1.1"))
reject("asterisk-form GET", _post(line=b"GET * HTTP/1.1"))
reject("absolute-form, other Host", _post(line=b"GET http://internal/admin HTTP/1.1"))
reject("absolute-form, NUL authority", _post(host=b"Host: a\x00",
                                             line=b"GET http://a\x00/x HTTP/1.1"))
reject("absolute-form https", _post(line=b"GET https://a/x HTTP/1.1"))
reject("relative target", _post(line=b"GET admin HTTP/1.1"))
reject("authority-form", _post(host=b"Host: a:443", line=b"CONNECT a:443 HTTP/1.1"))
reject("target with space", _post(line=b"GET /a /b HTTP/1.1"))
reject("target with NUL", _post(line=b"GET /a\x00 HTTP/1.1"))
reject("target with obs-text", _post(line=b"GET /\xc0\xae HTTP/1.1"))
reject("target with tab", _post(line=b"GET /a\tHTTP/1.1 HTTP/1.1"))
reject("version junk", _post(line=b"GET / HTTP/1.1 x"))
reject("version with NUL", _post(line=b"GET / HTTP/1.1\x00"))
reject("request line bare CR", _post(line=b"GET / HTTP/1.1\rX: y"))
reject("request line bare LF", b"GET / HTTP/1.1\nHost: a\r\n\r\n" + NEXT)
reject("all bare LF", b"GET / HTTP/1.1\nHost: a\nContent-Length: 5\n\nhello" + NEXT)
reject("blank line bare LF", b"GET / HTTP/1.1\r\nHost: a\r\n\n" + NEXT)
reject("HTTP/0.9", b"GET /\r\n" + NEXT)
reject("HTTP/1.2", _post(line=b"GET / HTTP/1.2"))
reject("five empty lines first", b"\r\n" * 5 + _post(line=b"GET / HTTP/1.1"))
reject("empty line as bare LF first", b"\n" + _post(line=b"GET / HTTP/1.1"))
framed("four empty lines first", b"\r\n" * 4 + _post(line=b"GET / HTTP/1.1"))
framed("absolute-form with its Host", _post(host=b"Host: a.example",
                                            line=b"GET http://a.example/x HTTP/1.1"))
framed("Host IP-literal with a port", _post(host=b"Host: [::1]:8080", line=b"GET / HTTP/1.1"))
framed("asterisk-form OPTIONS", _post(line=b"OPTIONS * HTTP/1.1"))
framed("HTTP/1.0 with CL", _post(b"Content-Length: 5", body=b"hello", host=None,
                                 line=b"POST / HTTP/1.0"))
framed("obs-text in a value", _post(b"X: \xff\xfe", line=b"GET / HTTP/1.1"))
framed("Expect with a CL body", _post(b"Expect: 100-continue", b"Content-Length: 5",
                                      body=b"hello"))
framed("Upgrade is never honoured (stripped, plain request)",
       _post(b"Upgrade: h2c", b"Connection: Upgrade, HTTP2-Settings", b"HTTP2-Settings: AA",
             b"Content-Length: 5", body=b"hello"))
