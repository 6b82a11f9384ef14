"""Micro-benchmarks of fastmesh's codecs and receive buffer, through their Python entry
points (so each figure includes one Python call and, for the parsers, building the result):

    python -m pytest benchmarks/micro --benchmark-only -p no:cacheprovider

- HTTP/1 request head parsing (HeadParser.parse) on a small and a large head
- chunked framing (ChunkedFramer.py_feed) of a body in 8 KiB and in 64-byte chunks
- RecvBuffer feed + take, as bytes and as a zero-copy slice
- Bolt frame_peek (py_frame_peek) and parse_frame on the captured SOFARPC frames

The captured frames are found like the tests find them: $FASTMESH_BOLT_FRAMES, else
tests/data/bolt-frames in this repository, else ../shared/bolt-frames beside it.
Each benchmark records messages/s and bytes/s from its median time (see conftest.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

http1 = pytest.importorskip("fastmesh._core.http1")
buffer = pytest.importorskip("fastmesh._core.buffer")
bolt = pytest.importorskip("fastmesh._core.bolt")

REPO = Path(__file__).resolve().parents[2]


def frames_dir() -> Path:
    env = os.environ.get("FASTMESH_BOLT_FRAMES")
    if env:
        return Path(env)
    for candidate in (REPO / "tests" / "data" / "bolt-frames",
                      REPO.parent / "shared" / "bolt-frames"):
        if candidate.is_dir():
            return candidate
    return REPO / "tests" / "data" / "bolt-frames"


# -- HTTP/1 heads -----------------------------------------------------------------------------

SMALL_HEAD = (b"GET /api/v1/items?id=42 HTTP/1.1\r\n"
              b"Host: svc.local\r\n"
              b"User-Agent: bench/1.0\r\n"
              b"Accept: */*\r\n"
              b"\r\n")


def large_head() -> bytes:
    lines = [b"POST /api/v1/orders/12345/items?expand=all&page=3 HTTP/1.1",
             b"Host: orders.internal.example.com",
             b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0",
             b"Accept: application/json, text/plain, */*",
             b"Accept-Encoding: gzip, deflate, br",
             b"Accept-Language: en-US,en;q=0.9",
             b"Content-Type: application/json",
             b"Content-Length: 1024",
             b"Cookie: " + b"; ".join(b"c%d=%s" % (i, b"v" * 40) for i in range(20)),
             b"Authorization: Bearer " + b"t" * 600]
    lines += [b"X-Trace-%02d: %s" % (i, b"0123456789abcdef" * 4) for i in range(30)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize("size", ["small", "large"])
def test_http1_head_parse(benchmark, work, size):
    head = SMALL_HEAD if size == "small" else large_head()
    parser = http1.HeadParser(True)
    consumed, parsed = parser.parse(head)
    assert consumed == len(head) and parsed is not None
    work(benchmark, lambda: parser.parse(head), messages=1, nbytes=len(head))


# -- chunked framing --------------------------------------------------------------------------

def chunked(body_bytes: int, chunk_bytes: int) -> bytes:
    out = bytearray()
    left = body_bytes
    while left:
        k = min(left, chunk_bytes)
        out += b"%x\r\n" % k + b"c" * k + b"\r\n"
        left -= k
    return bytes(out + b"0\r\n\r\n")


@pytest.mark.parametrize("body_bytes,chunk_bytes", [(65536, 8192), (4096, 64)],
                         ids=["64KiB-in-8KiB", "4KiB-in-64B"])
def test_chunked_framing(benchmark, work, body_bytes, chunk_bytes):
    data = chunked(body_bytes, chunk_bytes)

    def frame():
        consumed, pieces, done = http1.ChunkedFramer().py_feed(data)
        return consumed, done

    assert frame() == (len(data), True)
    work(benchmark, frame, messages=1, nbytes=len(data))


# -- receive buffer ---------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_bytes", [512, 16384])
@pytest.mark.parametrize("as_slice", [False, True], ids=["bytes", "slice"])
def test_recv_buffer_feed_take(benchmark, work, chunk_bytes, as_slice):
    rb = buffer.RecvBuffer()
    chunk = b"r" * chunk_bytes
    feed, take = rb.py_feed, rb.py_take

    def cycle():
        feed(chunk)
        return take(chunk_bytes, as_slice)

    assert len(cycle()) == chunk_bytes
    work(benchmark, cycle, messages=1, nbytes=chunk_bytes)


# -- Bolt -------------------------------------------------------------------------------------

FRAME_FILES = ["bolt_request.hex", "bolt_response.hex", "bolt_request_protobuf.hex",
               "bolt_heartbeat.hex"]


def load_frame(name: str) -> bytes:
    path = frames_dir() / name
    if not path.exists():
        pytest.skip(f"no captured frame {path} (set FASTMESH_BOLT_FRAMES)")
    return bytes.fromhex(path.read_text().strip())


@pytest.mark.parametrize("name", FRAME_FILES)
def test_bolt_frame_peek(benchmark, work, name):
    frame = load_frame(name)
    assert bolt.py_frame_peek(frame) == len(frame)
    work(benchmark, lambda: bolt.py_frame_peek(frame), messages=1, nbytes=len(frame))


@pytest.mark.parametrize("name", FRAME_FILES)
def test_bolt_parse_frame(benchmark, work, name):
    frame = load_frame(name)
    assert bolt.parse_frame(frame)["frame_len"] == len(frame)
    work(benchmark, lambda: bolt.parse_frame(frame), messages=1, nbytes=len(frame))


def test_bolt_peek_stream(benchmark, work):
    """Framing a receive buffer holding 64 back-to-back requests, as a proxy would."""
    frame = load_frame("bolt_request.hex")
    stream = frame * 64
    view = memoryview(stream)

    def walk():
        pos = n = 0
        while pos < len(stream):
            k = bolt.py_frame_peek(view[pos:])
            if k <= 0:
                break
            pos += k
            n += 1
        return n

    assert walk() == 64
    work(benchmark, walk, messages=64, nbytes=len(stream))
