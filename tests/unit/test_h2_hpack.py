"""HPACK (fastmesh._core.hpack): RFC 7541 Appendix C vectors, property tests against the
independent `hpack` package in both directions, and hostile blocks."""
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

hpack = pytest.importorskip("hpack")

from fastmesh._core.hpack import (Decoder, Encoder, HeaderList, HpackError,
                                  py_huffman_decode, py_huffman_encode, static_table)

OK, COMPRESSION, TOO_LARGE = 0, -1, -2


def h(s):
    return bytes.fromhex(s.replace(" ", "").replace("\n", ""))


# ------------------------------------------------------------------ fixed vectors

def test_static_table_is_rfc7541_appendix_a():
    assert static_table() == [(n, v) for n, v in hpack.table.HeaderTable.STATIC_TABLE]


def test_c2_literals():
    d = Decoder()
    assert d.decode_list(h("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")) == [
        (b"custom-key", b"custom-header")]
    assert d.dynamic_table.size == 55
    d = Decoder()
    assert d.decode_list(h("040c 2f73 616d 706c 652f 7061 7468")) == [(b":path", b"/sample/path")]
    assert d.dynamic_table.size == 0
    d = Decoder()
    r, out = d.py_decode(h("1008 7061 7373 776f 7264 0673 6563 7265 74"))
    assert r == OK and out.items() == [(b"password", b"secret")] and out.sensitive() == [True]
    assert d.dynamic_table.size == 0
    assert Decoder().decode_list(h("82")) == [(b":method", b"GET")]


REQ1 = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")]
REQ2 = REQ1 + [(b"cache-control", b"no-cache")]
REQ3 = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
        (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]
C3 = ["8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
      "8286 84be 5808 6e6f 2d63 6163 6865",
      "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"]
C4 = ["8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
      "8286 84be 5886 a8eb 1064 9cbf",
      "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"]
SIZES_C3 = [57, 110, 164]


@pytest.mark.parametrize("blocks", [C3, C4], ids=["C.3", "C.4"])
def test_c3_c4_requests(blocks):
    d = Decoder()
    for block, want, size in zip(blocks, [REQ1, REQ2, REQ3], SIZES_C3):
        assert d.decode_list(h(block)) == want
        assert d.dynamic_table.size == size
    assert d.dynamic_table.py_entries() == [(b"custom-key", b"custom-value"),
                                            (b"cache-control", b"no-cache"),
                                            (b":authority", b"www.example.com")]


def test_c4_encoder_produces_the_rfc_bytes():
    e = Encoder(huffman=True)
    for block, want in zip(C4, [REQ1, REQ2, REQ3]):
        assert e.encode(want) == h(block)


def test_c3_encoder_without_huffman():
    e = Encoder(huffman=False)
    for block, want in zip(C3, [REQ1, REQ2, REQ3]):
        assert e.encode(want) == h(block)


DATE1 = b"Mon, 21 Oct 2013 20:13:21 GMT"
LOC = b"https://www.example.com"
RESP1 = [(b":status", b"302"), (b"cache-control", b"private"), (b"date", DATE1), (b"location", LOC)]
RESP2 = [(b":status", b"307"), (b"cache-control", b"private"), (b"date", DATE1), (b"location", LOC)]
RESP3 = [(b":status", b"200"), (b"cache-control", b"private"),
         (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"), (b"location", LOC),
         (b"content-encoding", b"gzip"),
         (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")]
C5 = ["""4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
         2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
         6c65 2e63 6f6d""",
      "4803 3330 37c1 c0bf",
      """88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
         54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
         5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
         3d31"""]
C6 = ["""4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
         2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3""",
      "4883 640e ffc1 c0bf",
      """88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
         77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
         9587 3160 65c0 03ed 4ee5 b106 3d50 07"""]


@pytest.mark.parametrize("blocks", [C5, C6], ids=["C.5", "C.6"])
def test_c5_c6_responses_with_evictions(blocks):
    d = Decoder(limit_table_bytes=256)
    for block, want, size in zip(blocks, [RESP1, RESP2, RESP3], [222, 222, 215]):
        assert d.decode_list(h(block)) == want
        assert d.dynamic_table.size == size
    assert d.dynamic_table.py_entries() == [RESP3[5], RESP3[4], RESP3[2]]


# ------------------------------------------------------------------ Huffman

@given(st.binary(max_size=300))
def test_huffman_round_trip(data):
    enc = py_huffman_encode(data)
    assert enc == hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                               hpack.huffman_constants.REQUEST_CODES_LENGTH).encode(data)
    assert py_huffman_decode(enc) == data


@given(st.binary(max_size=40))
def test_huffman_decoder_agrees_with_reference(data):
    ours = py_huffman_decode(data)
    try:
        ref = hpack.huffman_table.decode_huffman(data)
    except Exception:
        ref = None
    if ours is not None:
        assert ref == ours          # everything we accept, the reference reads the same
        assert py_huffman_encode(ours) == data   # and it is the one canonical encoding


def test_huffman_padding_rules():
    assert py_huffman_decode(bytes([0x1f])) == b"a"            # 'a' = 00011, padding 111
    assert py_huffman_decode(bytes([0x18])) is None            # padding with zeros
    assert py_huffman_decode(bytes([0x1f, 0xff])) is None      # 11 bits of padding
    assert py_huffman_decode(bytes([0xff, 0xff, 0xff, 0xfc])) is None   # EOS inside
    assert py_huffman_decode(b"") == b""
    assert py_huffman_decode(bytes([0xff])) is None            # 8 bits of padding, no symbol


# ------------------------------------------------------------------ property tests

NAMES = st.one_of(st.sampled_from([n for n, _ in static_table()]),
                  st.binary(min_size=1, max_size=20))
FIELDS = st.lists(st.tuples(NAMES, st.binary(max_size=60)), max_size=12)
SIZES = st.sampled_from([None, 0, 32, 100, 256, 1000, 4096])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(SIZES, FIELDS), min_size=1, max_size=8), st.booleans())
def test_round_trip_own_encoder_decoder(blocks, huffman):
    e, d = Encoder(huffman=huffman), Decoder()
    for size, fields in blocks:
        if size is not None:
            d.py_set_settings_table_bytes(size)     # our SETTINGS acked...
            e.py_set_peer_table_bytes(size)         # ...which the peer's encoder learns
        assert d.decode_list(e.encode(fields)) == fields
        assert d.dynamic_table.py_entries() == e.dynamic_table.py_entries()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(SIZES, FIELDS), min_size=1, max_size=8), st.booleans())
def test_reference_encoder_to_our_decoder(blocks, huffman):
    e, d = hpack.Encoder(), Decoder()
    for size, fields in blocks:
        if size is not None:
            d.py_set_settings_table_bytes(size)
            e.header_table_size = size
        assert d.decode_list(e.encode(fields, huffman=huffman)) == fields


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(SIZES, FIELDS), min_size=1, max_size=8), st.booleans())
def test_our_encoder_to_reference_decoder(blocks, huffman):
    e, d = Encoder(huffman=huffman), hpack.Decoder()
    for size, fields in blocks:
        if size is not None:
            d.header_table_size = 4096              # what it allows, like a SETTINGS value
            e.py_set_peer_table_bytes(size)
        assert d.decode(e.encode(fields), raw=True) == fields


def test_sensitive_fields_never_indexed():
    e, d = Encoder(), Decoder()
    block = e.encode([(b"authorization", b"Bearer abc"), (b"cookie", b"sid=1"),
                      (b"x-secret", b"v", True), (b"x-plain", b"v")])
    r, out = d.py_decode(block)
    assert r == OK and out.sensitive() == [True, True, True, False]
    assert e.dynamic_table.py_entries() == [(b"x-plain", b"v")]


# ------------------------------------------------------------------ hostile blocks

@pytest.mark.parametrize("block", [
    "80",                              # index 0
    "be",                              # index 62: dynamic table empty
    "ff ffffffffffffffffff 01",        # integer overflow
    "ff 80",                           # truncated integer
    "40 7f ffffff07",                  # string length past 2^28 / the block
    "40 05 6162",                      # string longer than the block
    "40 81 18 01 61",                  # Huffman name with zero padding
    "40 82 1fff 01 61",                # Huffman padding of 11 bits
    "40 84 ffffffff 01 61",            # EOS in a Huffman string
    "3fe21f",                          # size update to 4097, past SETTINGS_HEADER_TABLE_SIZE (4096)
    "82 20",                           # size update after a field
    "0f 2f 01 61",                     # literal name index past the tables
])
def test_compression_errors(block):
    d = Decoder()
    r, _ = d.py_decode(h(block))
    assert r == COMPRESSION
    assert d.counters["errors"] == 1
    with pytest.raises(HpackError):
        Decoder().decode_list(h(block))


def test_size_update_required_after_the_setting_shrinks():
    d = Decoder()
    d.py_set_settings_table_bytes(100)
    assert d.py_decode(h("82"))[0] == COMPRESSION
    d = Decoder()
    d.py_set_settings_table_bytes(100)
    assert d.py_decode(h("3f45 82"))[0] == OK                # update to 100, then a field
    assert d.dynamic_table.max_size == 100


def test_two_size_updates_at_the_start():
    d = Decoder()
    assert d.decode_list(h("20 3fe11e 82")) == [(b":method", b"GET")]


def test_header_list_limit_keeps_table_in_sync():
    e = hpack.Encoder()
    d = Decoder(max_list_bytes=200)
    big = [(b"x-%d" % i, b"v" * 20) for i in range(10)]
    r, out = d.py_decode(e.encode(big))
    assert r == TOO_LARGE and out.was_truncated and out.size_bytes > 200
    assert len(out) < 10
    # the next block refers to entries the dropped fields inserted: still decodes right
    assert d.decode_list(e.encode(big[:3])) == big[:3]
    assert d.counters["lists_too_large"] == 1


def test_hpack_bomb_is_bounded():
    # one 4000-byte entry, then 3000 one-byte references to it: 12 MB if unbounded
    block = h("40 01 78 7f 81 1e") + b"v" * 4000 + bytes([0xbe]) * 3000
    d = Decoder(max_list_bytes=65536)
    r, out = d.py_decode(block)
    assert r == TOO_LARGE
    assert out.buffer_bytes <= 4 * 65536


def test_lengths_never_drive_allocation():
    # a huge claimed string length with a short block: refused before any allocation
    d = Decoder()
    r, out = d.py_decode(h("40 7f ffffff07") + b"a" * 10)
    assert r == COMPRESSION and out.buffer_bytes == 0


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_random_blocks_never_crash(data):
    d = Decoder(max_list_bytes=1024)
    r, out = d.py_decode(data)
    assert r in (OK, COMPRESSION, TOO_LARGE)
    assert out.buffer_bytes <= 1024 + 2 * len(data) + 512
    if r == OK:                         # what we accept, the reference accepts the same way
        try:
            ref = hpack.Decoder().decode(data, raw=True)
        except Exception:
            return
        assert ref == out.items()
