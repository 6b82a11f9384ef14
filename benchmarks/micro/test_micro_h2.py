"""Micro-benchmarks of the HTTP/2 codec through its Python entry points (each figure
includes one Python call per unit; the C-loop comparison with libnghttp2 is
benchmarks/h2codec/run.py):

    python -m pytest benchmarks/micro/test_micro_h2.py --benchmark-only -p no:cacheprovider

- HPACK decode of a gRPC request header block (first block, and steady state)
- HPACK encode of the same header list (steady state)
- a server connection receiving a burst of 10 gRPC requests (HEADERS + DATA each)
"""
from __future__ import annotations

import pytest

hpack_ours = pytest.importorskip("fastmesh._core.hpack")
h2_ours = pytest.importorskip("fastmesh._core.h2")
hpack = pytest.importorskip("hpack")


def grpc_headers(i):
    return [(b":method", b"POST"), (b":scheme", b"http"),
            (b":path", b"/helloworld.Greeter/SayHello"), (b":authority", b"localhost:50051"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            (b"user-agent", b"grpc-python/1.60.0 grpc-c/37.0.0 (linux; chttp2)"),
            (b"grpc-accept-encoding", b"identity,deflate,gzip"),
            (b"x-request-id", b"%036d" % i)]


def frame(ftype, flags, sid, payload):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def test_hpack_decode_first_block(benchmark, work):
    block = hpack.Encoder().encode(grpc_headers(0))
    work(benchmark, lambda: hpack_ours.Decoder().py_decode(block), messages=1, nbytes=len(block))


def test_hpack_decode_steady(benchmark, work):
    enc = hpack.Encoder()
    enc.encode(grpc_headers(0))
    block = enc.encode(grpc_headers(0))          # all indexed: the steady state of a channel
    d = hpack_ours.Decoder()
    d.py_decode(hpack.Encoder().encode(grpc_headers(0)))
    work(benchmark, lambda: d.py_decode(block), messages=1, nbytes=len(block))


def test_hpack_encode_steady(benchmark, work):
    e = hpack_ours.Encoder()
    fields = grpc_headers(0)
    e.encode(fields)
    work(benchmark, lambda: e.encode(fields), messages=1, nbytes=0)


def test_h2_server_burst_of_10_requests(benchmark, work):
    enc = hpack.Encoder()
    msg = b"\0\0\0\0\x5f" + b"m" * 95
    state = {"sid": 1}

    class Consumer(h2_ours.H2Consumer):
        pass

    def fresh():
        c = h2_ours.H2Connection(Consumer(), max_concurrent_streams=1 << 30,
                                 initial_window_bytes=1 << 30,
                                 connection_window_bytes=(1 << 31) - 1)
        c.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
        c.data_to_send()
        return c

    def burst():
        sid = state["sid"]
        data = b"".join(frame(1, 4, s, enc.encode(grpc_headers(s))) + frame(0, 1, s, msg)
                        for s in range(sid, sid + 20, 2))
        state["sid"] = sid + 20
        return data

    bursts = [burst() for _ in range(2000)]     # one HPACK sequence: replayed from the start
    state.update(conn=fresh(), i=0)             # on a fresh connection when used up

    def run():
        if state["i"] == len(bursts):
            state.update(conn=fresh(), i=0)
        conn = state["conn"]
        conn.feed(bursts[state["i"]])
        state["i"] += 1
        conn.data_to_send()
        assert not conn.closed
    work(benchmark, run, messages=10, nbytes=len(bursts[0]))
