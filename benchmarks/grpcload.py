"""gRPC pieces of the grpc-unary scenarios.

    frame(msg)          a gRPC length-prefixed message (flag 0, 4-byte big-endian length)
    message(n)          the n-byte request message every run sends
    upstream_stats()    the counters of benchmarks/floor/grpc_echo.c (GET /stats over h2c)

and a command that makes one real gRPC call with grpcio (generic unary call, identity
serializers) and says whether it succeeded:

    python -m benchmarks.grpcload call --target 127.0.0.1:PORT [--payload-bytes 64] --json
      -> {"ok": true, "code": "OK", "echoed": true, "trailing": [...], "latency_us": ...}

The harness runs it against the proxy after each measured round (in a separate process, so
grpcio's threads never live in the harness, which forks the proxies): h2load counts 2xx
answers, and a proxy that answered a gRPC error itself with HTTP 200 would pass that count.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time

METHOD = "/bench.Echo/Ping"
STATS_PATH = "/stats"


def frame(msg: bytes) -> bytes:
    return b"\0" + struct.pack(">I", len(msg)) + msg


def _varint(v: int, width: int = 0) -> bytes:
    """v as a protobuf varint, padded to width bytes with continuation bits (decoders take
    non-minimal varints) when width is more than it needs."""
    out = bytearray()
    while True:
        out.append(v & 0x7F)
        v >>= 7
        if not v and len(out) >= width:
            return bytes(out)
        out[-1] |= 0x80


def message(n: int) -> bytes:
    """An n-byte protobuf message: field 1 (bytes) holding "pingping..." (the servers here
    echo it without decoding; the shape is only to be realistic). n < 2: n filler bytes."""
    if n < 2:
        return b"p" * n
    size = n - 2
    while 1 + len(_varint(size)) + size > n:
        size -= 1
    return b"\x0a" + _varint(size, n - 1 - size) + (b"ping" * (size // 4 + 1))[:size]


def upstream_stats(port: int, timeout_s: float = 5.0) -> dict:
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is needed to read the gRPC upstream's counters")
    out = subprocess.run([curl, "-s", "--http2-prior-knowledge", "--max-time",
                          str(timeout_s), f"http://127.0.0.1:{port}{STATS_PATH}"],
                         capture_output=True, text=True, timeout=timeout_s + 5)
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise RuntimeError(f"gRPC upstream stats: {out.stdout[:200]!r} "
                           f"{out.stderr[:200]}") from None


def call(target: str, payload_bytes: int, timeout_s: float = 5.0) -> dict:
    try:
        import grpc
    except ImportError as exc:
        return {"ok": None, "skipped": f"grpcio is not installed: {exc}"}
    req = message(payload_bytes)
    with grpc.insecure_channel(target) as ch:
        fn = ch.unary_unary(METHOD)          # no serializers: bytes in, bytes out
        t0 = time.perf_counter()
        try:
            resp, c = fn.with_call(req, timeout=timeout_s)
        except grpc.RpcError as exc:
            return {"ok": False, "code": exc.code().name, "details": exc.details(),
                    "trailing": [list(kv) for kv in (exc.trailing_metadata() or ())]}
        us = round((time.perf_counter() - t0) * 1e6)
    echoed = resp == req
    return {"ok": c.code() == grpc.StatusCode.OK and echoed, "code": c.code().name,
            "echoed": echoed, "trailing": [list(kv) for kv in (c.trailing_metadata() or ())],
            "latency_us": us}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.grpcload")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("call", help="one unary gRPC call with grpcio")
    c.add_argument("--target", required=True)
    c.add_argument("--payload-bytes", type=int, default=64)
    c.add_argument("--timeout-s", type=float, default=5.0)
    c.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = call(args.target, args.payload_bytes, args.timeout_s)
    print(json.dumps(res) if args.json else res, flush=True)
    return 0 if res.get("ok") is not False else 1


if __name__ == "__main__":
    sys.exit(main())
