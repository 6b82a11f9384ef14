"""ChunkedFramer (fastmesh._core.http1): valid bodies in every fragmentation, data pieces
that reassemble the body, trailers, each malformed shape, size overflow, properties."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastmesh._core.http1 import ChunkedFramer

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def run(pieces):
    """Feed pieces in order to one framer. Returns ("done", consumed, body, leftover) or
    ("more", consumed, body) or ("error", reason)."""
    f = ChunkedFramer()
    total, body = 0, []
    for i, piece in enumerate(pieces):
        try:
            n, data, done = f.py_feed(piece)
        except ValueError as e:
            return ("error", e.args[0])
        assert 0 <= n <= len(piece)
        total += n
        body += data
        if done:
            leftover = bytes(piece[n:]) + b"".join(pieces[i + 1:])
            return ("done", total, b"".join(body), leftover)
        assert n == len(piece)           # not done: everything offered was taken
    return ("more", total, b"".join(body))


def whole(data):
    return run([data])


def split_at(data, cuts):
    cuts = [0] + sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def encode(chunks, trailers=b"", ext=b""):
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c)
    return out + b"0" + ext + b"\r\n" + trailers + b"\r\n"


VALID = [
    # (encoded, body)
    (b"0\r\n\r\n", b""),
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"a\r\n0123456789\r\nA\r\nabcdefghij\r\n0\r\n\r\n", b"0123456789abcdefghij"),
    (b"000005\r\nhello\r\n000\r\n\r\n", b"hello"),
    (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello"),
    (b"5;a;b=\"q s\";c=\x80\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5;\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"2\r\n\r\n\r\n0\r\n\r\n", b"\r\n"),
    (b"3\r\n\x00\xff\n\r\n0\r\n\r\n", b"\x00\xff\n"),
    (b"0\r\nExpires: never\r\n\r\n", b""),
    (b"5\r\nhello\r\n0\r\nA: 1\r\nB-c:2\r\nD:\r\nE: x y\t\x80\r\n\r\n", b"hello"),
    (b"f\r\n" + b"x" * 15 + b"\r\n0\r\n\r\n", b"x" * 15),
    (encode([b"a" * 1000, b"b" * 4096, b"c"]), b"a" * 1000 + b"b" * 4096 + b"c"),
]

ERRORS = [
    (b"\r\n", "no size"),
    (b";ext\r\n", "extension without a size"),
    (b"-1\r\nx\r\n0\r\n\r\n", "negative size"),
    (b"+1\r\nx\r\n0\r\n\r\n", "signed size"),
    (b"0x10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", "0x prefix"),
    (b"g\r\n", "non-hex size"),
    (b" 5\r\nhello\r\n0\r\n\r\n", "space before the size"),
    (b"5 \r\nhello\r\n0\r\n\r\n", "space after the size"),
    (b"5\t\r\nhello\r\n0\r\n\r\n", "tab after the size"),
    (b"5 ;a\r\nhello\r\n0\r\n\r\n", "BWS before ';'"),
    (b"5 xyz\r\nhello\r\n0\r\n\r\n", "junk after the size"),
    (b"5\nhello\r\n0\r\n\r\n", "bare LF after the size"),
    (b"5\rhello\r\n0\r\n\r\n", "bare CR after the size"),
    (b"5;a\rb\r\nhello\r\n0\r\n\r\n", "bare CR in an extension"),
    (b"5;a\nb\r\nhello\r\n0\r\n\r\n", "bare LF in an extension"),
    (b"5;a\x00\r\nhello\r\n0\r\n\r\n", "NUL in an extension"),
    (b"5;a\x7f\r\nhello\r\n0\r\n\r\n", "DEL in an extension"),
    (b"5\r\nhelloX\r\n0\r\n\r\n", "data longer than its size"),
    (b"5\r\nhello\n0\r\n\r\n", "bare LF after data"),
    (b"5\r\nhello\r0\r\n\r\n", "bare CR after data"),
    (b"5\r\nhello0\r\n\r\n", "no CRLF after data"),
    (b"0\r\n\n", "bare LF as the final line"),
    (b"0\r\n\r\r\n", "bare CR as the final line"),
    (b"0\r\n\rX", "CR then junk as the final line"),
    (b"0\r\nA: 1\n\r\n", "bare LF after a trailer"),
    (b"0\r\nA: 1\rB\r\n\r\n", "bare CR in a trailer"),
    (b"0\r\nA: \x00\r\n\r\n", "NUL in a trailer value"),
    (b"0\r\n A: 1\r\n\r\n", "trailer starting with a space"),
    (b"0\r\n: 1\r\n\r\n", "trailer without a name"),
    (b"0\r\nNoColon\r\n\r\n", "trailer without a colon"),
    (b"0\r\nA : 1\r\n\r\n", "space before a trailer colon"),
    (b"0\r\nA@B: 1\r\n\r\n", "non-token trailer name"),
    (b"1" * 16 + b"\r\n", "16 hex digits"),
    (b"0" * 16 + b"\r\n", "16 digits of leading zeros"),
    (b"fffffffffffffffff\r\n", "size overflowing 64 bits"),
    (b"ffffffffffffffffffffffffffffffff\r\n", "size overflowing 128 bits"),
]


@pytest.mark.parametrize("data,body", VALID)
def test_valid_whole(data, body):
    assert whole(data) == ("done", len(data), body, b"")


@pytest.mark.parametrize("data,body", VALID)
def test_every_split_point(data, body):
    for k in range(1, len(data)):
        assert run([data[:k], data[k:]]) == ("done", len(data), body, b""), k


@pytest.mark.parametrize("data,body", VALID)
def test_one_byte_at_a_time(data, body):
    assert run([bytes([c]) for c in data]) == ("done", len(data), body, b"")


@pytest.mark.parametrize("data,body", VALID[:6])
def test_stops_at_the_end_and_leaves_the_next_message(data, body):
    nxt = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert whole(data + nxt) == ("done", len(data), body, nxt)
    # a second feed after done takes nothing
    f = ChunkedFramer()
    n, _, done = f.py_feed(data)
    assert done and n == len(data)
    assert f.py_feed(nxt) == (0, [], True)


@pytest.mark.parametrize("data,body", VALID[:6])
def test_prefixes_are_incomplete(data, body):
    for k in range(len(data)):
        r = whole(data[:k])
        assert r[0] == "more" and r[1] == k and body.startswith(r[2]), k


def test_input_types():
    data, body = VALID[2]
    for conv in (bytes, bytearray, memoryview, lambda b: memoryview(b"xx" + b)[2:]):
        assert whole(conv(data))[:3] == ("done", len(data), body)


def test_data_pieces_are_spans_of_the_input():
    # each piece is exactly the chunk bytes fed (no copies of framing, no merging across
    # chunks within a feed call), in order
    f = ChunkedFramer()
    n, pieces, done = f.py_feed(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert pieces == [b"abc", b"de"] and done
    f = ChunkedFramer()
    assert f.py_feed(b"a\r\n01234") == (8, [b"01234"], False)
    assert f.py_feed(b"56") == (2, [b"56"], False)
    assert f.py_feed(b"789\r\n0\r\n\r\n") == (10, [b"789"], True)


@pytest.mark.parametrize("data,why", ERRORS, ids=[w for _, w in ERRORS])
def test_error(data, why):
    assert whole(data)[0] == "error", why


@pytest.mark.parametrize("data,why", ERRORS, ids=[w for _, w in ERRORS])
def test_error_one_byte_at_a_time(data, why):
    assert run([bytes([c]) for c in data])[0] == "error", why


def test_error_is_sticky():
    f = ChunkedFramer()
    with pytest.raises(ValueError):
        f.py_feed(b"zz\r\n")
    with pytest.raises(ValueError):
        f.py_feed(b"0\r\n\r\n")


def test_max_size_is_fifteen_hex_digits():
    big = b"f" * 15
    f = ChunkedFramer()
    n, pieces, done = f.py_feed(big + b"\r\n" + b"x" * 100)
    assert n == 17 + 100 and pieces == [b"x" * 100] and not done
    # 2**60 - 1 - 100 bytes still to come: no overflow, no early end
    for _ in range(3):
        assert f.py_feed(b"y" * 4096) == (4096, [b"y" * 4096], False)
    with pytest.raises(ValueError):
        ChunkedFramer().py_feed(b"1" + big + b"\r\n")


def test_extension_line_limit():
    ok = b"1;" + b"e" * 4000 + b"\r\nx\r\n0\r\n\r\n"
    assert whole(ok)[0] == "done"
    assert whole(b"1;" + b"e" * 5000 + b"\r\nx\r\n0\r\n\r\n")[0] == "error"
    # the limit holds however the extension arrives
    long_ext = b"1;" + b"e" * 5000
    assert run(split_at(long_ext, range(0, len(long_ext), 100)))[0] == "error"


def test_trailer_section_limit():
    trailer = b"X: " + b"v" * 1000 + b"\r\n"
    assert whole(b"0\r\n" + trailer * 60 + b"\r\n")[0] == "done"
    assert whole(b"0\r\n" + trailer * 70 + b"\r\n")[0] == "error"
    long_name = b"0\r\n" + b"N" * 70000 + b": v\r\n\r\n"
    assert whole(long_name)[0] == "error"


def test_endless_stream_of_empty_chunks_is_not_possible():
    # a zero size ends the body: "0\r\n" can't be repeated to stall the framer
    assert whole(b"0\r\n0\r\n\r\n")[0] == "error"


# ------------------------------------------------------------------- properties

chunk_lists = st.lists(st.binary(min_size=1, max_size=300), max_size=8)
exts = st.sampled_from([b"", b";a", b";a=b", b";a=\"x y\";c"])
trailer_sets = st.lists(st.tuples(st.sampled_from([b"A", b"Expires", b"x-t"]),
                                  st.binary(max_size=20).map(
                                      lambda v: bytes(c for c in v if c >= 0x21 and c != 0x7F))),
                        max_size=3).map(lambda ts: b"".join(n + b": " + v + b"\r\n"
                                                            for n, v in ts))


@SETTINGS
@given(chunk_lists, exts, trailer_sets, st.data())
def test_property_random_fragmentation_reassembles_the_body(chunks, ext, trailers, data):
    enc = encode(chunks, trailers, ext)
    tail = data.draw(st.binary(max_size=20))
    cuts = data.draw(st.lists(st.integers(0, len(enc) + len(tail)), max_size=12))
    r = run(split_at(enc + tail, cuts))
    assert r == ("done", len(enc), b"".join(chunks), tail)


@SETTINGS
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.sampled_from([b"0", b"5", b"f", b"\r\n", b"\r", b"\n", b";",
                                           b"hello", b"A: 1", b" ", b"-", b"x"]),
                          max_size=25).map(b"".join)),
       st.data())
def test_property_garbage_never_crashes_and_is_split_independent(blob, data):
    a = whole(blob)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=10))
    b = run(split_at(blob, cuts))
    if a[0] == "error":
        assert b[0] == "error"
    else:
        assert a == b
        if a[0] == "done":
            assert blob[:a[1]].endswith(b"\r\n\r\n")
