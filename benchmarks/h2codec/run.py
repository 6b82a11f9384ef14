"""Measure fastmesh's HTTP/2 codec against libnghttp2 (and the pure-Python `h2` package as a
lower bar) on the same inputs. Benchmark-only (needs libnghttp2-dev and h2/hpack):

    python benchmarks/h2codec/run.py [--rounds 30]

Inputs: a typical gRPC unary request header block (9 fields, one varying x-request-id),
1000 of them in sequence (the dynamic table in steady state), and a connection's client
side: 1000 bursts of 10 requests (HEADERS + 100-byte DATA with END_STREAM), each answered
with a headers-only gRPC response. Figures: median over rounds, ns per unit, one core.
"""
import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def build():
    out = Path(tempfile.gettempdir()) / "fastmesh-h2bench"
    out.mkdir(exist_ok=True)
    src = out / "h2bench.pyx"
    src.write_bytes((HERE / "h2bench.pyx").read_bytes())
    setup = out / "setup.py"
    setup.write_text(f"""
from setuptools import setup, Extension
from Cython.Build import cythonize
setup(ext_modules=cythonize([Extension("h2bench", ["h2bench.pyx"], libraries=["nghttp2"],
      extra_compile_args=["-O2"])], include_path=[{str(ROOT)!r}], language_level=3))
""")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=out,
                   check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(out))
    import h2bench
    return h2bench


def grpc_headers(i):
    return [(b":method", b"POST"), (b":scheme", b"http"),
            (b":path", b"/helloworld.Greeter/SayHello"), (b":authority", b"localhost:50051"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            (b"user-agent", b"grpc-python/1.60.0 grpc-c/37.0.0 (linux; chttp2)"),
            (b"grpc-accept-encoding", b"identity,deflate,gzip"),
            (b"x-request-id", str(uuid.UUID(int=i * 7919 + 1)).encode())]


def frame(ftype, flags, sid, payload):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def client_bursts(n_bursts=1000, per_burst=10):
    import hpack
    enc = hpack.Encoder()
    bursts = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")]
    sid = 1
    msg = b"\0\0\0\0\x5f" + b"m" * 95                    # a 100-byte gRPC message
    for b in range(n_bursts):
        out = []
        for i in range(per_burst):
            out.append(frame(1, 4, sid, enc.encode(grpc_headers(sid))))
            out.append(frame(0, 1, sid, msg))
            sid += 2
        bursts.append(b"".join(out))
    return bursts


def h2_session(bursts, rounds):
    import h2.config, h2.connection, h2.events
    times = []
    for r in range(rounds):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        conn.data_to_send()
        t0 = time.perf_counter_ns()
        for b in bursts:
            for ev in conn.receive_data(b):
                if isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if isinstance(ev, h2.events.StreamEnded):
                    conn.send_headers(ev.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                                     (b"grpc-status", b"0")], end_stream=True)
            conn.data_to_send()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times)


def median_of(fn, *args, rounds):
    results = [fn(*args, 1) for _ in range(rounds)]
    return statistics.median(r[0] for r in results), results[0][1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    hb = build()
    import hpack
    enc = hpack.Encoder()
    lists = [grpc_headers(i) for i in range(1000)]
    blocks = [enc.encode(h) for h in lists]
    cold = [hpack.Encoder().encode(lists[0])]
    bursts = client_bursts()
    frames_in = 1 + 1000 * 10 * 2
    rows = []
    for name, fn, args in [
            ("HPACK decode, first block (ns/block)", "decode", (cold * 1,)),
            ("HPACK decode, steady state (ns/block)", "decode", (blocks,)),
            ("HPACK encode, steady state (ns/block)", "encode", (lists,))]:
        ours, info = median_of(getattr(hb, "ours_" + fn), *args, rounds=a.rounds * (50 if args[0] is cold else 1))
        ng, ng_info = median_of(getattr(hb, "ng_" + fn), *args, rounds=a.rounds * (50 if args[0] is cold else 1))
        rows.append((name, ours, ng, info, ng_info))
    ours_t, ours_info = median_of(hb.ours_session, bursts, rounds=a.rounds)
    ng_t, ng_info = median_of(hb.ng_session, bursts, rounds=a.rounds)
    ngc_t = statistics.median(hb.ng_session(bursts, 1, True)[0] for _ in range(a.rounds))
    py_t = h2_session(bursts, max(3, a.rounds // 10))
    nreq = 10000
    print(f"{'measure':44s} {'fastmesh':>10s} {'nghttp2':>10s} {'ratio':>7s}")
    for name, o, n, i1, i2 in rows:
        print(f"{name:44s} {o:10.0f} {n:10.0f} {o / n:7.2f}   ({i1} / {i2})")
    print(f"{'session: ns per request (in+out)':44s} {ours_t / nreq:10.0f} {ng_t / nreq:10.0f} {ours_t / ng_t:7.2f}"
          f"   (requests, out bytes: {ours_info} / {ng_info})")
    print(f"{'  nghttp2 + copying header fields out':44s} {'':10s} {ngc_t / nreq:10.0f} {ours_t / ngc_t:7.2f}")
    print(f"{'session: ns per frame received':44s} {ours_t / frames_in:10.0f} {ng_t / frames_in:10.0f}")
    print(f"{'python h2 package: ns per request':44s} {py_t / nreq:10.0f}")


if __name__ == "__main__":
    main()
