"""The Bolt codec (fastmesh._core.bolt): captured frames, fragmentation, properties, errors."""
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from fastmesh._core import bolt


def _frames_dir() -> Path:
    env = os.environ.get("FASTMESH_BOLT_FRAMES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "data" / "bolt-frames"


FRAMES_DIR = _frames_dir()
CAPTURED = sorted(p.name for p in FRAMES_DIR.glob("*.hex"))

SERVICE = "com.example.EchoService:1.0"
REQ_CLASS = b"com.alipay.sofa.rpc.core.request.SofaRequest"
RESP_CLASS = b"com.alipay.sofa.rpc.core.response.SofaResponse"

# what each captured frame must decode to (README of the capture)
EXPECTED = {
    "bolt_request.hex": dict(proto=1, type=1, cmdcode=1, ver2=1, request_id=1, codec=1,
                             timeout_ms=3000, status=0, class_name=REQ_CLASS, frame_len=352,
                             headers={"service": SERVICE}),
    "bolt_response.hex": dict(proto=1, type=0, cmdcode=2, ver2=1, request_id=1, codec=1,
                              status=0, timeout_ms=0, class_name=RESP_CLASS, frame_len=169,
                              headers={}),
    "bolt_request_protobuf.hex": dict(proto=1, type=1, cmdcode=1, request_id=1, codec=11,
                                      timeout_ms=3000, class_name=REQ_CLASS,
                                      headers={"service": SERVICE,
                                               "sofa_head_method_name": "echo",
                                               "sofa_head_target_app": "",
                                               "sofa_head_target_service": SERVICE}),
    "bolt_response_protobuf.hex": dict(proto=1, type=0, cmdcode=2, request_id=1, codec=11,
                                       status=0, class_name=RESP_CLASS,
                                       headers={"sofa_head_response_error": "false"}),
    "bolt_request_boom.hex": dict(proto=1, type=1, cmdcode=1, request_id=1, codec=1,
                                  timeout_ms=3000, class_name=REQ_CLASS,
                                  headers={"service": SERVICE}),
    "bolt_response_error.hex": dict(proto=1, type=0, cmdcode=2, request_id=1, codec=1,
                                    status=bolt.STATUS_SERVER_EXCEPTION, class_name=RESP_CLASS),
    "bolt_heartbeat.hex": dict(proto=1, type=1, cmdcode=0, ver2=1, request_id=2, codec=1,
                               timeout_ms=3000, class_len=0, header_len=0, content_len=0,
                               frame_len=22, headers={}),
    "bolt_heartbeat_ack.hex": dict(proto=1, type=0, cmdcode=0, ver2=1, request_id=2, codec=1,
                                   status=0, class_len=0, header_len=0, content_len=0,
                                   frame_len=20, headers={}),
}


def load(name: str) -> bytes:
    return bytes.fromhex((FRAMES_DIR / name).read_text().strip())


def test_captured_frames_exist():
    assert FRAMES_DIR.is_dir(), f"captured Bolt frames not found at {FRAMES_DIR}"
    assert set(EXPECTED) <= set(CAPTURED), set(EXPECTED) - set(CAPTURED)


# -- captured frames ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_captured_frame_fields(name):
    data = load(name)
    d = bolt.parse_frame(data)
    want = dict(EXPECTED[name])
    headers = want.pop("headers", None)
    for key, value in want.items():
        assert d[key] == value, key
    assert d["frame_len"] == len(data)
    assert d["header_size"] == (20 if d["type"] == 0 else 22)
    assert d["id_offset"] == 5 and d["ver1"] == 0 and d["switch"] == 0 and not d["has_crc"]
    assert d["header_size"] + d["class_len"] + d["header_len"] + d["content_len"] == len(data)
    if headers is not None:
        assert bolt.decode_headers(data) == headers
    if d["header_len"]:
        assert bolt.py_header_lookup(data, "service") in (SERVICE.encode(), None)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_captured_frame_reencodes_byte_for_byte(name):
    data = load(name)
    assert bolt.encode_frame(bolt.parse_frame(data)) == data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_prefix_needs_more(name):
    data = load(name)
    for cut in range(len(data)):
        assert bolt.py_frame_peek(data[:cut]) == 0, cut
        assert bolt.parse_frame(data[:cut]) is None
    assert bolt.py_frame_peek(data) == len(data)
    assert bolt.py_frame_peek(data + b"\x01\x01garbage") == len(data)
    # the total is known as soon as the fixed part is in
    hs = 20 if data[1] == 0 else 22
    assert bolt.py_frame_needed(data[:hs]) == (0 if hs < len(data) else hs, len(data))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_kinds(kind):
    data = load("bolt_request.hex")
    assert bolt.py_frame_peek(kind(data)) == len(data)
    assert bolt.parse_frame(kind(data))["request_id"] == 1
    assert bolt.decode_headers(kind(data)) == {"service": SERVICE}


def test_request_routing_header_lookup():
    data = load("bolt_request.hex")
    assert bolt.py_header_lookup(data, "service") == SERVICE.encode()
    assert bolt.py_header_lookup(data, b"servic") is None
    assert bolt.py_header_lookup(data, "missing") is None
    pb = load("bolt_request_protobuf.hex")
    assert bolt.py_header_lookup(pb, "sofa_head_method_name") == b"echo"
    assert bolt.py_header_lookup(pb, "sofa_head_target_app") == b""
    assert bolt.py_header_lookup(load("bolt_response.hex"), "service") is None


def test_encoders_match_captured_heartbeats():
    assert bolt.encode_heartbeat(1, 2, timeout_ms=3000) == load("bolt_heartbeat.hex")
    assert bolt.encode_heartbeat_ack(1, 2) == load("bolt_heartbeat_ack.hex")


def test_encoders_match_captured_request_and_response():
    req = bolt.parse_frame(load("bolt_request.hex"))
    built = bolt.encode_request(1, 1, 1, 1, 3000, req["class_name"],
                                bolt.encode_header_block({"service": SERVICE}), req["content"])
    assert built == load("bolt_request.hex")
    resp = bolt.parse_frame(load("bolt_response_error.hex"))
    assert bolt.encode_response(1, 1, 1, 2, resp["class_name"], b"", resp["content"]) == \
        load("bolt_response_error.hex")


def test_known_answer_frames():
    # computed by hand from the layout for requestId 111, headers {"k": "v"}, "hello world"
    req = bytes.fromhex("0101000101 0000006f 01 ffffffff 0000 000a 0000000b"
                        "000000016b0000000176 68656c6c6f20776f726c64")
    resp = bytes.fromhex("0100000201 0000006f 01 0000 0000 000a 0000000b"
                         "000000016b0000000176 68656c6c6f20776f726c64")
    hb = bytes.fromhex("01010000010000006f01ffffffff0000000000000000")
    ack = bytes.fromhex("01000000010000006f01 0000 0000 0000 00000000")
    block = bolt.encode_header_block({"k": "v"})
    assert bolt.encode_request(1, 1, 111, 1, -1, b"", block, b"hello world") == req
    assert bolt.encode_response(1, 111, 1, 0, b"", block, b"hello world") == resp
    assert bolt.encode_heartbeat(1, 111) == hb
    assert bolt.encode_heartbeat_ack(1, 111) == ack
    d = bolt.parse_frame(req)
    assert (d["timeout_ms"], d["header_len"], d["content_len"]) == (-1, 10, 11)


def test_v2_layout():
    block = bolt.encode_header_block([("service", SERVICE)])
    req = bolt.encode_request(2, 1, 0x01020304, 1, 5000, REQ_CLASS, block, b"x" * 9,
                              ver1=1, switch=0)
    assert req[:12] == bytes([2, 1, 1, 0, 1, 1, 1, 2, 3, 4, 1, 0])
    assert struct.unpack_from(">iHHI", req, 12) == (5000, len(REQ_CLASS), len(block), 9)
    d = bolt.parse_frame(req)
    assert (d["header_size"], d["id_offset"], d["has_crc"]) == (24, 6, False)
    resp = bolt.encode_response(2, 7, 11, 0, RESP_CLASS, b"", b"ok", ver1=2, switch=1)
    d = bolt.parse_frame(resp)
    assert (d["header_size"], d["id_offset"], d["has_crc"]) == (22, 6, True)
    assert d["frame_len"] == 22 + len(RESP_CLASS) + 2 + 4 == len(resp)
    assert struct.unpack_from(">I", resp, len(resp) - 4)[0] == zlib.crc32(resp[:-4])


def test_crc_only_with_ver1_2_and_switch_bit():
    # SOFABolt writes a CRC only when ver1 == 2 and ProtocolSwitch bit 0 is on; Java's
    # default v2 frames carry ver1 1 with the CRC switch on and no trailer.
    for ver1, switch, has in [(1, 0, False), (1, 1, False), (2, 0, False), (2, 1, True),
                              (2, 3, True), (2, 2, False)]:
        frame = bolt.encode_response(2, 1, 1, 0, b"c", b"", b"body", ver1=ver1, switch=switch)
        d = bolt.parse_frame(frame)
        assert d["has_crc"] is has and d["frame_len"] == len(frame)


# -- streaming ----------------------------------------------------------------------------

def split_stream(chunks, max_frame_bytes=bolt.DEFAULT_MAX_FRAME_BYTES):
    """Feed chunks through a receive buffer, framing with py_frame_peek."""
    buf = bytearray()
    out = []
    for chunk in chunks:
        buf += chunk
        while True:
            rc = bolt.py_frame_peek(buf, max_frame_bytes)
            if rc < 0:
                raise bolt.BoltFrameError(rc)
            if rc == 0:
                break
            out.append(bytes(buf[:rc]))
            del buf[:rc]
    assert not buf, "bytes left over"
    return out


def test_concatenated_captured_frames_one_byte_at_a_time():
    frames = [load(n) for n in sorted(EXPECTED)] * 2
    stream = b"".join(frames)
    assert split_stream(stream[i:i + 1] for i in range(len(stream))) == frames
    assert split_stream([stream]) == frames


# -- errors -------------------------------------------------------------------------------

def assert_error(data, code, max_frame_bytes=bolt.DEFAULT_MAX_FRAME_BYTES):
    assert bolt.py_frame_peek(data, max_frame_bytes) == code
    with pytest.raises(bolt.BoltFrameError) as info:
        bolt.parse_frame(data, max_frame_bytes)
    assert info.value.code == code
    assert str(info.value) == bolt.error_reason(code)
    assert isinstance(info.value, ValueError)


def test_error_codes_are_distinct_and_named():
    codes = [bolt.ERR_PROTO, bolt.ERR_TYPE, bolt.ERR_TOO_BIG, bolt.ERR_LENGTH, bolt.ERR_CRC]
    assert len(set(codes)) == 5 and all(c < 0 for c in codes)
    reasons = {bolt.error_reason(c) for c in codes}
    assert len(reasons) == 5 and all(r.startswith("bolt: ") for r in reasons)


@pytest.mark.parametrize("first", [b"\x00", b"\x03", b"\xff", b"GET "])
def test_bad_proto_byte(first):
    assert_error(first, bolt.ERR_PROTO)


@pytest.mark.parametrize("ver1", [0, 3, 0xFF])
def test_bad_v2_version(ver1):
    assert_error(bytes([2, ver1]), bolt.ERR_PROTO)


def test_bad_cmd_type_rejected_from_its_byte():
    assert_error(b"\x01\x03", bolt.ERR_TYPE)
    assert_error(b"\x02\x01\x07", bolt.ERR_TYPE)


def test_type_and_cmdcode_disagree():
    resp = bytearray(load("bolt_response.hex"))
    resp[2:4] = b"\x00\x01"                          # a "response" carrying cmdcode request
    assert_error(bytes(resp), bolt.ERR_TYPE)
    req = bytearray(load("bolt_request.hex"))
    req[2:4] = b"\x00\x02"                           # a "request" carrying cmdcode response
    assert_error(bytes(req), bolt.ERR_TYPE)
    req[2:4] = b"\x00\x64"                           # unknown codes (GoAway 100) pass through
    assert bolt.py_frame_peek(bytes(req)) == len(req)


def test_oversized_length_rejected_from_fixed_header_alone():
    # only the 22-byte fixed part is in: a 4 GiB content length is refused at once
    head = struct.pack(">BBHBIBiHHI", 1, 1, 1, 1, 9, 1, 3000, 0, 0, 0xFFFFFFFF)
    assert len(head) == 22
    assert_error(head, bolt.ERR_TOO_BIG)
    head2 = struct.pack(">BBBHBIBBHHHI", 2, 1, 0, 2, 1, 9, 1, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF)
    assert len(head2) == 22
    assert_error(head2, bolt.ERR_TOO_BIG)
    # and the limit is exact
    frame = load("bolt_request.hex")
    assert bolt.py_frame_peek(frame[:22], len(frame)) == 0
    assert bolt.py_frame_peek(frame, len(frame)) == len(frame)
    assert_error(frame[:22], bolt.ERR_TOO_BIG, max_frame_bytes=len(frame) - 1)


def test_v2_bad_crc():
    frame = bolt.encode_request(2, 1, 5, 1, 1000, REQ_CLASS, b"", b"payload", ver1=2, switch=1)
    assert bolt.py_frame_peek(frame) == len(frame)
    for pos in (7, 10, 30, len(frame) - 5, len(frame) - 1):   # id, codec, class, body, CRC
        bad = bytearray(frame)
        bad[pos] ^= 0x40
        assert_error(bytes(bad), bolt.ERR_CRC)
    # incomplete frames wait, even when the CRC bytes are not in yet
    assert bolt.py_frame_peek(frame[:-1]) == 0


def test_heartbeat_with_lengths():
    for cls, hdr, body in [(b"c", b"", b""), (b"", bolt.encode_header_block({"a": "b"}), b""),
                           (b"", b"", b"x")]:
        hb = bolt.encode_request(1, 1, 3, 1, -1, cls, hdr, body, cmdcode=bolt.CMD_HEARTBEAT)
        assert_error(hb, bolt.ERR_LENGTH)
        ack = bolt.encode_frame(dict(proto=1, type=0, cmdcode=0, request_id=3, codec=1,
                                     status=0, class_name=cls, header_block=hdr, content=body))
        assert_error(ack, bolt.ERR_LENGTH)


def test_header_block_too_short_for_a_pair():
    for hl in range(1, 8):
        frame = bolt.encode_request(1, 1, 3, 1, -1, b"", b"\x00" * hl, b"")
        assert_error(frame, bolt.ERR_LENGTH)


def test_encoder_rejects_out_of_range():
    with pytest.raises(ValueError):
        bolt.encode_request(3, 1, 1, 1, 0)
    with pytest.raises(ValueError):
        bolt.encode_request(1, 0, 1, 1, 0)
    with pytest.raises(ValueError):
        bolt.encode_response(2, 1, 1, 0, ver1=5)
    with pytest.raises(ValueError):
        bolt.encode_response(1, 1, 1, 0x10000)
    with pytest.raises(ValueError):
        bolt.encode_response(1, 1, 1, 0, class_name=b"x" * 0x10000)
    with pytest.raises(ValueError):
        bolt.encode_error_response(1, 1, 1, 0)


# -- error responses made by the proxy ----------------------------------------------------

@pytest.mark.parametrize("status", [bolt.STATUS_NO_PROCESSOR, bolt.STATUS_SERVER_THREADPOOL_BUSY,
                                    bolt.STATUS_TIMEOUT, bolt.STATUS_CONNECTION_CLOSED])
@pytest.mark.parametrize("proto", [1, 2])
def test_error_response(status, proto):
    frame = bolt.encode_error_response(proto, 0xFFFFFFFE, 11, status)
    d = bolt.parse_frame(frame)
    assert (d["type"], d["cmdcode"], d["status"], d["request_id"], d["codec"]) == \
        (0, 2, status, 0xFFFFFFFE, 11)
    assert d["class_len"] == d["header_len"] == d["content_len"] == 0
    assert len(frame) == (20 if proto == 1 else 22)
    assert bolt.STATUS_NAMES[status]


# -- header block -------------------------------------------------------------------------

def test_header_block_nulls_and_duplicates():
    block = bolt.encode_header_block([("a", None), (None, "x"), ("a", "1"), ("b", b"\x00\xff"),
                                      ("a", "2"), ("", "empty-key")])
    assert bolt.py_header_find(block, "a") is not None
    off, n = bolt.py_header_find(block, "a")
    assert block[off:off + n] == b"1"                 # the null value is skipped, first wins
    assert bolt.decode_header_block(block) == {"a": "1", "b": "\x00\udcff", "": "empty-key"}
    frame = bolt.encode_request(1, 1, 1, 1, 0, b"", block, b"")
    assert bolt.py_header_lookup(frame, "b") == b"\x00\xff"
    assert bolt.py_header_lookup(frame, "") == b"empty-key"


def test_malformed_header_blocks_never_read_out_of_bounds():
    first = bolt.encode_header_block({"service": SERVICE})
    good = first + bolt.encode_header_block({"k": "v"})
    for cut in range(1, len(good)):
        if cut == len(first):                         # a whole pair: a valid block
            continue
        trunc = good[:cut]
        assert bolt.py_header_find(trunc, "service") is None
        assert bolt.py_header_find(trunc, "k") is None
        with pytest.raises(ValueError):
            bolt.decode_header_block(trunc)
        if cut >= 8:
            frame = bolt.encode_request(1, 1, 1, 1, 0, b"", trunc, b"tail")
            assert bolt.py_header_lookup(frame, "service") is None
            with pytest.raises(ValueError):
                bolt.decode_headers(frame)
    # lengths pointing past the end, huge lengths, null marker mid-way
    for block in [b"\x00\x00\x00\x05key\x00\x00\x00\x00",
                  b"\xff\xff\xff\xfe" + b"x" * 8,
                  b"\x00\x00\x00\x01k\xff\xff\xff\xfe",
                  b"\x00\x00\x00\x01k\x00\x00\x00\x01v\x00\x00"]:
        assert bolt.py_header_find(block, "k") is None
        with pytest.raises(ValueError):
            bolt.decode_header_block(block)
    assert bolt.decode_header_block(b"") == {}


# -- id patching --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_id_patch_captured(name):
    data = load(name)
    buf = bytearray(data)
    bolt.py_frame_set_id(buf, 0xA1B2C3D4)
    assert bolt.py_frame_get_id(buf) == 0xA1B2C3D4
    assert buf[5:9] == b"\xa1\xb2\xc3\xd4"
    assert buf[:5] == data[:5] and buf[9:] == data[9:]


@pytest.mark.parametrize("ver1,switch", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_id_patch_v2_keeps_crc_valid(ver1, switch):
    frame = bolt.encode_request(2, 1, 1, 1, 3000, REQ_CLASS,
                                bolt.encode_header_block({"service": SERVICE}), b"z" * 300,
                                ver1=ver1, switch=switch)
    for new_id in (0, 1, 2, 0xFFFFFFFF, 0x80000000, 12345):
        buf = bytearray(frame)
        bolt.py_frame_set_id(buf, new_id)
        assert buf[6:10] == struct.pack(">I", new_id)
        assert bolt.py_frame_peek(buf) == len(frame)
        assert bytes(buf) == bolt.encode_request(2, 1, new_id, 1, 3000, REQ_CLASS,
                                                  bolt.encode_header_block({"service": SERVICE}),
                                                  b"z" * 300, ver1=ver1, switch=switch)


def test_id_patch_rejects_partial_frames():
    with pytest.raises(ValueError):
        bolt.py_frame_set_id(bytearray(load("bolt_request.hex")[:30]), 5)
    with pytest.raises(ValueError):
        bolt.py_frame_set_id(bytearray(), 5)


# -- properties ---------------------------------------------------------------------------

header_text = st.text(max_size=12)
header_pairs = st.lists(st.tuples(header_text, st.one_of(st.none(), header_text)), max_size=5)


@st.composite
def frame_fields(draw):
    proto = draw(st.sampled_from([1, 2]))
    cmd_type = draw(st.sampled_from([0, 1, 2]))
    heartbeat = draw(st.booleans()) and cmd_type != 2
    if heartbeat:
        cmdcode = 0
    else:
        cmdcode = 2 if cmd_type == 0 else 1
    d = dict(
        proto=proto,
        ver1=draw(st.sampled_from([1, 2])) if proto == 2 else 0,
        type=cmd_type,
        cmdcode=cmdcode,
        ver2=draw(st.integers(0, 255)),
        request_id=draw(st.integers(0, 0xFFFFFFFF)),
        codec=draw(st.sampled_from([1, 11, 0, 255])),
        switch=draw(st.integers(0, 3)) if proto == 2 else 0,
        timeout_ms=0 if cmd_type == 0 else draw(st.integers(-(2 ** 31), 2 ** 31 - 1)),
        status=draw(st.integers(0, 0xFFFF)) if cmd_type == 0 else 0,
        class_name=b"" if heartbeat else draw(st.binary(max_size=64)),
        header_block=b"" if heartbeat else bolt.encode_header_block(draw(header_pairs)),
        content=b"" if heartbeat else draw(st.binary(max_size=300)),
    )
    return d


def expected_view(d):
    hs = {(1, 0): 20, (1, 1): 22, (1, 2): 22, (2, 0): 22, (2, 1): 24, (2, 2): 24}
    has_crc = d["proto"] == 2 and d["ver1"] == 2 and bool(d["switch"] & 1)
    return dict(d, class_len=len(d["class_name"]), header_len=len(d["header_block"]),
                content_len=len(d["content"]), header_size=hs[d["proto"], d["type"]],
                id_offset=5 if d["proto"] == 1 else 6, has_crc=has_crc,
                frame_len=hs[d["proto"], d["type"]] + len(d["class_name"])
                + len(d["header_block"]) + len(d["content"]) + (4 if has_crc else 0))


@given(frame_fields())
def test_parse_encode_roundtrip(d):
    frame = bolt.encode_frame(d)
    parsed = bolt.parse_frame(frame)
    assert parsed == expected_view(d)
    assert bolt.encode_frame(parsed) == frame
    assert bolt.py_frame_peek(frame) == len(frame)
    if parsed["has_crc"]:
        assert struct.unpack(">I", frame[-4:])[0] == zlib.crc32(frame[:-4])


@given(st.lists(frame_fields(), min_size=1, max_size=6), st.data())
def test_random_fragmentation(fields, data):
    frames = [bolt.encode_frame(d) for d in fields]
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert split_stream(chunks) == frames


@given(frame_fields(), st.integers(0, 0xFFFFFFFF))
def test_id_patch_property(d, new_id):
    frame = bolt.encode_frame(d)
    buf = bytearray(frame)
    bolt.py_frame_set_id(buf, new_id)
    assert bytes(buf) == bolt.encode_frame(dict(d, request_id=new_id))


@given(st.binary(max_size=2000), st.integers(0, 0xFFFFFFFF))
def test_crc32_matches_zlib(data, seed):
    assert bolt.crc32(data) == zlib.crc32(data)
    assert bolt.crc32(data, seed) == zlib.crc32(data, seed)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_garbage_never_crashes(data):
    rc = bolt.py_frame_peek(data, 1 << 16)
    assert rc <= len(data)
    if rc > 0:
        assert bolt.encode_frame(bolt.parse_frame(data, 1 << 16)) == data[:rc]
    bolt.py_header_find(data, "service")
    try:
        bolt.decode_header_block(data)
    except ValueError:
        pass
