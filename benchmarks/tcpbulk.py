"""One long TCP stream, for the tcp-bulk scenario: a source that pushes bytes as fast as the
path takes them, and a sink that counts them.

    python -m benchmarks.tcpbulk sink --listen 127.0.0.1:0
    python -m benchmarks.tcpbulk source --target 127.0.0.1:10000 --duration-s 10 [--json]

The sink prints `READY <port>`, then for every connection that ends one line
`CONN {"bytes": N, "seconds": S, "mb_per_s": R}` where S runs from the first byte received
to the end of the stream: what came through, over how long. The source sends for
--duration-s seconds, closes, and prints what it sent. Both use blocking sockets, large
buffers and no per-byte Python work, so the proxy in between is what limits the rate.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

CHUNK_BYTES = 1 << 20


def sink(args) -> int:
    host, port = parse_hostport(args.listen)
    srv = socket.create_server((host, port), backlog=128, reuse_port=False)
    print(f"READY {srv.getsockname()[1]}", flush=True)
    lock = threading.Lock()

    def drain(conn):
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        total = 0
        first = last = None
        try:
            while True:
                n = conn.recv_into(view)
                if not n:
                    break
                if first is None:
                    first = time.perf_counter()
                total += n
            last = time.perf_counter()
        except OSError:
            last = time.perf_counter()
        finally:
            conn.close()
        secs = (last - first) if first is not None else 0.0
        line = {"bytes": total, "seconds": round(secs, 4),
                "mb_per_s": round(total / secs / 1e6, 1) if secs > 0 else 0.0}
        with lock:
            print("CONN " + json.dumps(line), flush=True)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def source(args) -> int:
    host, port = parse_hostport(args.target)
    data = memoryview(bytes(range(256)) * (CHUNK_BYTES // 256))
    t0 = time.perf_counter()
    sent = 0
    error = None
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        out = {"bytes": 0, "seconds": 0.0, "mb_per_s": 0.0, "error": f"connect: {exc}"}
        print(json.dumps(out) if args.json else out)
        return 1
    deadline = t0 + args.duration_s
    try:
        while time.perf_counter() < deadline:
            sent += sock.send(data)
    except OSError as exc:
        error = str(exc)
    elapsed = time.perf_counter() - t0
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
    out = {"bytes": sent, "seconds": round(elapsed, 4),
           "mb_per_s": round(sent / elapsed / 1e6, 1) if elapsed > 0 else 0.0, "error": error}
    print(json.dumps(out) if args.json else
          f"sent {sent} bytes in {elapsed:.2f} s = {out['mb_per_s']} MB/s"
          + (f" (error: {error})" if error else ""))
    return 0 if error is None else 1


def parse_hostport(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tcpbulk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--listen", default="127.0.0.1:0")
    c = sub.add_parser("source")
    c.add_argument("--target", required=True)
    c.add_argument("--duration-s", type=float, default=10.0)
    c.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    return sink(args) if args.cmd == "sink" else source(args)


if __name__ == "__main__":
    sys.exit(main())
