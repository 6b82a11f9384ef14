"""Atheris fuzz harness for the Bolt codec (fastmesh/_core/bolt.pyx). Not a pytest module.

    pip install atheris
    python tests/fuzz/fuzz_bolt.py -runs=1000000
    python tests/fuzz/fuzz_bolt.py -max_total_time=600
    python tests/fuzz/fuzz_bolt.py crash-<sha1>          # replay a finding

With no corpus directory it seeds a temporary one from the captured frames in
tests/data/bolt-frames (v1 and v2, requests, responses, heartbeats) and mutations of them.

Input layout: byte 0 picks the frame-size limit and a split point, the rest is the bytes
off the wire. Every input is checked for:
  - no exception but ValueError (BoltFrameError is one), no crash;
  - a frame is never reported complete before all its bytes are in (every prefix is
    "need more" or the same error), and never over the size limit;
  - class, header and content spans have their declared lengths and lie within the frame;
  - re-encoding the parsed fields gives the frame back byte for byte (length fields and
    the CRC are computed by the encoder, so a frame that parses is canonical);
  - patching the id in place keeps the frame valid (v2 CRC included) and changes only the id;
  - the header value the router reads in place equals the one in the decoded header map.
"""
import os
import pathlib
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from fastmesh._core.bolt import (decode_headers, encode_frame, parse_frame,
                                     py_frame_peek, py_frame_set_id, py_header_lookup)

FRAMES = pathlib.Path(__file__).resolve().parents[1] / "data" / "bolt-frames"
LIMITS = [16 << 20, 4096, 256, 64, 22]


@atheris.instrument_func
def shape(d, err) -> int:
    # The core is compiled C that libFuzzer cannot see into; these branches on the outcome
    # (which error, which kind of frame) are the coverage that tells inputs apart.
    if err is not None:
        if err == -1:
            return 1
        elif err == -2:
            return 2
        elif err == -3:
            return 3
        elif err == -4:
            return 4
        elif err == -5:
            return 5
        return 6
    if d is None:
        return 7
    k = 8
    if d["proto"] == 2:
        k += 1
        if d["has_crc"]:
            k += 2
    if d["type"] == 0:
        k += 4
    elif d["type"] == 1:
        k += 8
    elif d["type"] == 2:
        k += 16
    if d["cmdcode"] == 0:
        k += 32
    if d["header_len"]:
        k += 64
    if d["content_len"]:
        k += 128
    return k


@atheris.instrument_func
def check(data: bytes) -> None:
    if len(data) < 2:
        return
    limit = LIMITS[data[0] % len(LIMITS)]
    wire = data[1:]
    try:
        d = parse_frame(wire, limit)
    except ValueError:
        err = py_frame_peek(wire, limit)
        assert err < 0, err
        shape(None, err)
        # a prefix never looks complete; it needs more or fails the same way
        for k in (0, 1, len(wire) // 2, len(wire) - 1):
            if 0 <= k < len(wire):
                r = py_frame_peek(wire[:k], limit)
                assert r <= 0, (k, r)
        return
    shape(d, None)
    if d is None:
        assert py_frame_peek(wire, limit) == 0
        return
    n = d["frame_len"]
    assert 0 < n <= len(wire) and n <= max(limit, d["header_size"]), (n, limit)
    assert len(d["class_name"]) == d["class_len"]
    assert len(d["header_block"]) == d["header_len"]
    assert len(d["content"]) == d["content_len"]
    for k in sorted({0, 1, n // 2, n - 1}):
        assert py_frame_peek(wire[:k], limit) == 0, k
    frame = wire[:n]
    assert encode_frame(d) == frame, "re-encoding differs"
    buf = bytearray(frame)
    new_id = (d["request_id"] * 2654435761 + 1) & 0xFFFFFFFF
    py_frame_set_id(buf, new_id)
    d2 = parse_frame(bytes(buf), limit)
    assert d2 is not None and d2["request_id"] == new_id
    assert dict(d2, request_id=d["request_id"]) == d, "id patch changed another field"
    try:
        headers = decode_headers(frame)
    except ValueError:
        return
    for key in ("service", "sofa_head_method_name", "x"):
        v = headers.get(key)
        got = py_header_lookup(frame, key)
        assert got == (None if v is None else v.encode("utf-8", "surrogateescape")), key


def seeds() -> list[bytes]:
    out = []
    for p in sorted(FRAMES.glob("*.hex")):
        raw = bytes.fromhex("".join(p.read_text().split()))
        for lim in range(len(LIMITS)):
            out.append(bytes([lim]) + raw)
        out.append(b"\x00" + raw + raw)                         # two frames back to back
        out.append(b"\x00" + raw[:len(raw) // 2])               # a partial one
    return out


def main() -> None:
    argv = list(sys.argv)
    if not any(os.path.isdir(a) for a in argv[1:]) and not any(
            os.path.isfile(a) for a in argv[1:]):
        corpus = tempfile.mkdtemp(prefix="fuzz-bolt-")
        for i, s in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(s)
        argv.append(corpus)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
