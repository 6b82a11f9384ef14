"""Bolt load generator and echo upstream.

    python -m benchmarks.boltload client --target 127.0.0.1:12200 --connections 4 \\
        --inflight 16 --payload-bytes 1024 --duration-s 10 [--json] [--template-hex FILE]
    python -m benchmarks.boltload echo-server --listen 127.0.0.1:12200

The client keeps --inflight requests outstanding on each of --connections connections for
--duration-s seconds and reports calls/s, latency percentiles in microseconds and errors by
response status. Requests look like SOFARPC's (class SofaRequest, header `service`, codec
1) with an opaque content of --payload-bytes; a real SOFARPC server cannot decode that, so
--template-hex FILE sends a captured request frame instead (e.g. a hessian2 echo), with only
the request id changed per call.

The echo server answers every request with a status-0 SofaResponse carrying the request's
content, acks heartbeats, and ignores oneway requests.

Self-contained on purpose (struct only, no fastmesh import): it is an independent Bolt
implementation to measure and cross-check the proxy with. Runs on uvloop when installed.
"""
import argparse
import asyncio
import json
import math
import signal
import struct
import sys
import time
from collections import Counter

REQ_CLASS = b"com.alipay.sofa.rpc.core.request.SofaRequest"
RESP_CLASS = b"com.alipay.sofa.rpc.core.response.SofaResponse"
DEFAULT_SERVICE = "com.example.EchoService:1.0"

STATUS_NAMES = {
    0x00: "SUCCESS", 0x01: "ERROR", 0x02: "SERVER_EXCEPTION", 0x03: "UNKNOWN",
    0x04: "SERVER_THREADPOOL_BUSY", 0x05: "ERROR_COMM", 0x06: "NO_PROCESSOR",
    0x07: "TIMEOUT", 0x08: "CLIENT_SEND_ERROR", 0x09: "CODEC_EXCEPTION",
    0x10: "CONNECTION_CLOSED", 0x11: "SERVER_SERIAL_EXCEPTION",
    0x12: "SERVER_DESERIAL_EXCEPTION",
}

# fixed parts: (proto, type is response) -> struct; fields in wire order
V1_REQ = struct.Struct(">BBHBIBiHHI")      # 22: proto type cmdcode ver2 id codec timeout cl hl bl
V1_RESP = struct.Struct(">BBHBIBHHHI")     # 20: proto type cmdcode ver2 id codec status cl hl bl
V2_REQ = struct.Struct(">BBBHBIBBiHHI")    # 24: proto ver1 type cmdcode ver2 id codec switch ...
V2_RESP = struct.Struct(">BBBHBIBBHHHI")   # 22
U32 = struct.Struct(">I")

MAX_FRAME_BYTES = 16 << 20
ARENA_BYTES = 256 << 10


class FrameError(Exception):
    pass


class Frame:
    """The fixed fields of one frame, and where its parts are in the buffer."""
    __slots__ = ("proto", "ver1", "type", "cmdcode", "request_id", "codec", "switch",
                 "timeout_ms", "status", "class_len", "header_len", "content_len",
                 "header_size", "frame_len", "id_offset", "has_crc")


def peek(buf, start, end, max_frame_bytes=MAX_FRAME_BYTES):
    """The Frame at buf[start:end] if it is whole, None if more bytes are needed."""
    n = end - start
    if n < 3:
        if n >= 1 and buf[start] not in (1, 2):
            raise FrameError(f"bad proto byte {buf[start]}")
        return None
    proto = buf[start]
    if proto == 1:
        cmd_type = buf[start + 1]
        st = V1_RESP if cmd_type == 0 else V1_REQ
    elif proto == 2:
        cmd_type = buf[start + 2]
        st = V2_RESP if cmd_type == 0 else V2_REQ
    else:
        raise FrameError(f"bad proto byte {proto}")
    if cmd_type > 2:
        raise FrameError(f"bad cmd type {cmd_type}")
    if n < st.size:
        return None
    f = Frame()
    if proto == 1:
        (_, f.type, f.cmdcode, _, f.request_id, f.codec, tos, f.class_len, f.header_len,
         f.content_len) = st.unpack_from(buf, start)
        f.ver1 = f.switch = 0
        f.id_offset = 5
        f.has_crc = False
    else:
        (_, f.ver1, f.type, f.cmdcode, _, f.request_id, f.codec, f.switch, tos, f.class_len,
         f.header_len, f.content_len) = st.unpack_from(buf, start)
        f.id_offset = 6
        f.has_crc = f.ver1 == 2 and bool(f.switch & 1)
    f.proto = proto
    if cmd_type == 0:
        f.status, f.timeout_ms = tos, 0
    else:
        f.status, f.timeout_ms = 0, tos
    f.header_size = st.size
    f.frame_len = st.size + f.class_len + f.header_len + f.content_len + (4 if f.has_crc else 0)
    if f.frame_len > max_frame_bytes:
        raise FrameError(f"frame of {f.frame_len} bytes over the limit")
    if n < f.frame_len:
        return None
    return f


def header_block(pairs):
    out = bytearray()
    for k, v in pairs:
        for s in (k, v):
            b = s.encode() if isinstance(s, str) else s
            out += U32.pack(len(b)) + b
    return bytes(out)


def encode_v1(cmd_type, cmdcode, request_id, codec, timeout_or_status, cls=b"", hdr=b"",
              body=b""):
    if cmd_type == 0:
        head = V1_RESP.pack(1, 0, cmdcode, 1, request_id, codec, timeout_or_status, len(cls),
                            len(hdr), len(body))
    else:
        head = V1_REQ.pack(1, cmd_type, cmdcode, 1, request_id, codec, timeout_or_status,
                           len(cls), len(hdr), len(body))
    return b"".join((head, cls, hdr, body))


def encode_v2(cmd_type, cmdcode, request_id, codec, timeout_or_status, cls=b"", hdr=b"",
              body=b"", ver1=1, switch=0):
    import zlib
    st = V2_RESP if cmd_type == 0 else V2_REQ
    head = st.pack(2, ver1, cmd_type, cmdcode, 1, request_id, codec, switch, timeout_or_status,
                   len(cls), len(hdr), len(body))
    frame = b"".join((head, cls, hdr, body))
    if ver1 == 2 and switch & 1:
        frame += U32.pack(zlib.crc32(frame))
    return frame


class Arena:
    """A receive buffer: unread bytes are buf[start:end]; the transport reads into the tail."""

    def __init__(self, size=ARENA_BYTES):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def tail(self, want=65536):
        free = len(self.buf) - self.end
        if free < want:
            used = self.end - self.start
            if self.start and len(self.buf) - used >= want:
                self.buf[0:used] = self.buf[self.start:self.end]
            else:
                size = len(self.buf)
                while size - used < want:
                    size *= 2
                if size > 2 * MAX_FRAME_BYTES:
                    raise FrameError("receive buffer over its cap")
                grown = bytearray(size)
                grown[0:used] = self.buf[self.start:self.end]
                self.view.release()
                self.buf = grown
                self.view = memoryview(grown)
            self.start, self.end = 0, used
        return self.view[self.end:]

    def reset_if_empty(self):
        if self.start == self.end:
            self.start = self.end = 0


# -- client -------------------------------------------------------------------------------

class Run:
    def __init__(self, template, id_offset, inflight):
        self.template = template
        self.frame_len = len(template)
        self.id_offset = id_offset
        self.inflight = inflight
        self.sending = True
        self.recording = False
        self.completed = 0            # answered while recording
        self.latencies_ns = []
        self.errors = Counter()       # status name -> count
        self.unknown_ids = 0
        self.conn_errors = []
        self.conns = []


class LoadConnection(asyncio.BufferedProtocol):
    def __init__(self, run):
        self.run = run
        self.arena = Arena()
        self.pending = {}             # request id -> send time, ns
        self.next_id = 1
        self.transport = None
        self.closed = None

    def connection_made(self, transport):
        self.transport = transport
        self.closed = asyncio.get_running_loop().create_future()
        self.send(self.run.inflight)

    def send(self, k):
        run = self.run
        if k <= 0 or not run.sending or self.transport.is_closing():
            return
        out = bytearray(run.template * k)
        pos = run.id_offset
        step = run.frame_len
        rid = self.next_id
        now = time.perf_counter_ns()
        pending = self.pending
        for _ in range(k):
            U32.pack_into(out, pos, rid)
            pending[rid] = now
            pos += step
            rid = (rid + 1) & 0xFFFFFFFF or 1
        self.next_id = rid
        self.transport.write(out)

    def get_buffer(self, sizehint):
        return self.arena.tail()

    def buffer_updated(self, nbytes):
        arena = self.arena
        arena.end += nbytes
        run = self.run
        buf = arena.buf
        done = 0
        now = time.perf_counter_ns()
        try:
            while True:
                f = peek(buf, arena.start, arena.end)
                if f is None:
                    break
                arena.start += f.frame_len
                if f.type != 0:
                    continue                      # the upstream asked us something: ignore
                sent = self.pending.pop(f.request_id, None)
                if sent is None:
                    run.unknown_ids += 1
                    continue
                done += 1
                if run.recording:
                    run.completed += 1
                    run.latencies_ns.append(now - sent)
                    if f.status:
                        run.errors[STATUS_NAMES.get(f.status, hex(f.status))] += 1
        except FrameError as exc:
            run.conn_errors.append(str(exc))
            self.transport.close()
            return
        arena.reset_if_empty()
        self.send(done)

    def connection_lost(self, exc):
        if exc is not None:
            self.run.conn_errors.append(f"connection lost: {exc}")
        elif self.run.sending:
            self.run.conn_errors.append("connection closed by the server")
        if not self.closed.done():
            self.closed.set_result(None)


def load_template(path):
    data = bytes.fromhex(open(path).read().strip())
    f = peek(data, 0, len(data))
    if f is None or f.frame_len != len(data):
        raise SystemExit(f"{path}: not exactly one whole Bolt frame")
    if f.type != 1 or f.cmdcode != 1:
        raise SystemExit(f"{path}: not a Bolt request (type {f.type}, cmdcode {f.cmdcode})")
    if f.has_crc:
        raise SystemExit(f"{path}: frames with a CRC trailer are not supported as templates")
    return data, f.id_offset


def build_template(args):
    payload = bytes((i * 131 + 7) & 0xFF for i in range(args.payload_bytes))
    hdr = header_block([("service", args.service)])
    if args.proto == 2:
        return encode_v2(1, 1, 0, args.codec, args.request_timeout_ms, REQ_CLASS, hdr,
                         payload), 6
    return encode_v1(1, 1, 0, args.codec, args.request_timeout_ms, REQ_CLASS, hdr, payload), 5


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def run_client(args):
    if args.template_hex:
        template, id_offset = load_template(args.template_hex)
    else:
        template, id_offset = build_template(args)
    host, port = parse_hostport(args.target)
    run = Run(template, id_offset, args.inflight)
    loop = asyncio.get_running_loop()
    for _ in range(args.connections):
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: LoadConnection(run), host, port), 5)
        except (OSError, asyncio.TimeoutError) as exc:
            run.conn_errors.append(f"connect: {exc!r}")
            continue
        run.conns.append(proto)

    if args.warmup_s > 0:
        await asyncio.sleep(args.warmup_s)
    run.recording = True
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration_s)
    run.sending = False
    elapsed = time.perf_counter() - t0
    calls_in_window = run.completed
    deadline = loop.time() + args.drain_s
    while loop.time() < deadline and any(c.pending for c in run.conns if not c.closed.done()):
        await asyncio.sleep(0.01)
    run.recording = False
    unanswered = sum(len(c.pending) for c in run.conns)
    for c in run.conns:
        c.transport.close()
    for c in run.conns:
        try:
            await asyncio.wait_for(asyncio.shield(c.closed), 2)
        except asyncio.TimeoutError:
            pass

    lat = sorted(run.latencies_ns)
    us = (lambda v: None if v is None else round(v / 1000.0, 1))
    return {
        "target": args.target,
        "connections": args.connections,
        "connected": len(run.conns),
        "inflight": args.inflight,
        "payload_bytes": None if args.template_hex else args.payload_bytes,
        "template_hex": args.template_hex,
        "frame_bytes": len(template),
        "duration_s": round(elapsed, 3),
        "calls": calls_in_window,
        "calls_per_s": round(calls_in_window / elapsed, 1) if elapsed > 0 else 0.0,
        "answered_total": len(lat),
        "latency_us": {
            "p50": us(percentile(lat, 50)),
            "p90": us(percentile(lat, 90)),
            "p99": us(percentile(lat, 99)),
            "p99.9": us(percentile(lat, 99.9)),
            "max": us(lat[-1] if lat else None),
            "mean": us(sum(lat) / len(lat) if lat else None),
        },
        "errors": dict(run.errors),
        "errors_total": sum(run.errors.values()),
        "unanswered": unanswered,
        "unknown_ids": run.unknown_ids,
        "connection_errors": run.conn_errors,
        "loop": type(loop).__module__.split(".")[0],
    }


def print_human(r):
    lat = r["latency_us"]
    print(f"target {r['target']}  connections {r['connected']}/{r['connections']}  "
          f"inflight {r['inflight']}  frame {r['frame_bytes']} B  "
          f"duration {r['duration_s']} s  loop {r['loop']}")
    print(f"calls {r['calls']}  calls/s {r['calls_per_s']}")
    print("latency us  " + "  ".join(f"{k} {lat[k]}" for k in ("p50", "p90", "p99", "p99.9",
                                                             "max")))
    errs = ", ".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "none"
    print(f"errors by status: {errs}  unanswered {r['unanswered']}  "
          f"unknown ids {r['unknown_ids']}")
    for e in r["connection_errors"]:
        print(f"connection error: {e}")


# -- echo server --------------------------------------------------------------------------

class EchoConnection(asyncio.BufferedProtocol):
    def __init__(self, max_frame_bytes, delay_ms=0.0):
        self.arena = Arena()
        self.max_frame_bytes = max_frame_bytes
        self.delay_s = delay_ms / 1000.0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.arena.tail()

    def buffer_updated(self, nbytes):
        arena = self.arena
        arena.end += nbytes
        buf = arena.buf
        view = arena.view
        out = []
        try:
            while True:
                f = peek(buf, arena.start, arena.end, self.max_frame_bytes)
                if f is None:
                    break
                start = arena.start
                arena.start += f.frame_len
                if f.type == 0 or f.type == 2:
                    continue                      # responses and oneways get no answer
                if f.cmdcode == 0:                # heartbeat -> ack
                    out.append(self.reply(f, 0, b"", b""))
                    continue
                body_at = start + f.header_size + f.class_len + f.header_len
                out.append(self.reply(f, 2, RESP_CLASS,
                                      bytes(view[body_at:body_at + f.content_len])))
        except FrameError:
            self.transport.close()
            return
        arena.reset_if_empty()
        if out:
            if self.delay_s:                      # a slow service: each read answered later
                asyncio.get_running_loop().call_later(self.delay_s, self._late, b"".join(out))
            else:
                self.transport.write(b"".join(out))

    def _late(self, data):
        if not self.transport.is_closing():
            self.transport.write(data)

    @staticmethod
    def reply(f, cmdcode, cls, body):
        if f.proto == 1:
            return encode_v1(0, cmdcode, f.request_id, f.codec, 0, cls, b"", body)
        return encode_v2(0, cmdcode, f.request_id, f.codec, 0, cls, b"", body, f.ver1, f.switch)


async def run_echo_server(args):
    host, port = parse_hostport(args.listen)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: EchoConnection(args.max_frame_bytes, args.delay_ms), host, port, backlog=1024)
    real_port = server.sockets[0].getsockname()[1]
    print(f"READY {real_port}", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        if args.duration_s:
            await asyncio.wait_for(stop, args.duration_s)
        else:
            await stop
    except asyncio.TimeoutError:
        pass
    server.close()
    await server.wait_closed()


# -- command line -------------------------------------------------------------------------

def parse_hostport(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def run_loop(coro, loop_name):
    if loop_name != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop_name == "uvloop":
                raise
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.boltload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("client", help="generate Bolt load")
    c.add_argument("--target", required=True, help="HOST:PORT")
    c.add_argument("--connections", type=int, default=1)
    c.add_argument("--inflight", type=int, default=1, help="outstanding requests per connection")
    c.add_argument("--payload-bytes", type=int, default=1024)
    c.add_argument("--duration-s", type=float, default=10.0)
    c.add_argument("--warmup-s", type=float, default=0.0, help="not recorded")
    c.add_argument("--drain-s", type=float, default=2.0,
                   help="how long to wait for outstanding answers after the run")
    c.add_argument("--template-hex", help="send this captured request frame (id patched)")
    c.add_argument("--service", default=DEFAULT_SERVICE, help="the `service` header")
    c.add_argument("--codec", type=int, default=1)
    c.add_argument("--proto", type=int, choices=(1, 2), default=1)
    c.add_argument("--request-timeout-ms", type=int, default=3000,
                   help="the timeout field of generated requests")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    c.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")

    e = sub.add_parser("echo-server", help="a fast Bolt echo upstream")
    e.add_argument("--listen", default="127.0.0.1:12200", help="HOST:PORT (port 0: any)")
    e.add_argument("--max-frame-bytes", type=int, default=MAX_FRAME_BYTES)
    e.add_argument("--delay-ms", type=float, default=0.0,
                   help="answer each batch of requests this much later (a slow service)")
    e.add_argument("--duration-s", type=float, default=0.0, help="exit after this (0: never)")
    e.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")

    args = ap.parse_args(argv)
    if args.cmd == "client":
        if args.connections < 1 or args.inflight < 1 or args.payload_bytes < 0:
            ap.error("--connections and --inflight must be >= 1, --payload-bytes >= 0")
        result = run_loop(run_client(args), args.loop)
        if args.json:
            print(json.dumps(result))
        else:
            print_human(result)
        return 0
    run_loop(run_echo_server(args), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
