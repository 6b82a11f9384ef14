"""A small HTTP/1.1 load generator, for when wrk is missing and for what wrk cannot do.

    python -m benchmarks.httpload closed --target 127.0.0.1:10000 --connections 50 \\
        --duration-s 10 [--path /] [--method POST --body-bytes 1024] [--close] [--json]
    python -m benchmarks.httpload open --target 127.0.0.1:10000 --rate 2000 \\
        --connections 32 --duration-s 10 [--json]
    python -m benchmarks.httpload idle --target 127.0.0.1:10000 --connections 10000 \\
        [--hold-s 5]

closed  N keep-alive connections, each sending its next request as soon as the previous
        answer is complete (like wrk). --close sends `Connection: close` and opens a new
        connection per request. Reports requests/s and latency percentiles.
open    open loop at a fixed rate: request i is due at t0 + i/rate whatever happened before;
        it goes out on an idle connection, or waits for one. Latency is measured from the
        due time (what a user would see: queueing included, no coordinated omission), and
        also from the actual send ("service" latency). A select() loop with microsecond
        timeouts keeps the send times within tens of microseconds of the schedule.
idle    opens N connections (200 at a time), sends one GET on each and reads the answer, so
        every connection is established through the proxy, then holds them all open. Prints
        `READY {json}` when all are open, waits --hold-s seconds, prints `DONE {json}` (how
        many are still open) and exits.

Output (closed/open, --json): one JSON object with requests, duration_s, rps, latency_us
{p50, p75, p90, p99, p99.9, max, mean} and errors {connect, read, write, timeout, status}:
the same shape the harness reads from wrk. Runs on uvloop when installed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import select
import signal
import socket
import sys
import time
from collections import Counter, deque

ERROR_KINDS = ("connect", "read", "write", "timeout", "status")


# -- response framing ---------------------------------------------------------------------

class ResponseReader:
    """Incremental HTTP/1.1 response framing. feed(bytes) returns the responses completed
    by those bytes as (status, server_closes) pairs; bodies are counted, not kept.
    Handles Content-Length, chunked, and bodiless statuses; a body delimited by the close
    of the connection completes through eof()."""

    def __init__(self, head_request: bool = False):
        self.buf = bytearray()
        self.head_request = head_request
        self.body_bytes = 0
        self._reset()

    def _reset(self):
        self.state = "head"          # head | body | chunk_size | chunk_data | trailer | eof
        self.status = 0
        self.closes = False
        self.remaining = 0

    def feed(self, data) -> list[tuple[int, bool]]:
        self.buf += data
        done = []
        buf = self.buf
        while True:
            st = self.state
            if st == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ValueError("response head over 64 KiB")
                    break
                self._parse_head(bytes(buf[:end]))
                del buf[:end + 4]
                if self.state == "done":
                    done.append((self.status, self.closes))
                    self._reset()
            elif st == "body":
                k = min(self.remaining, len(buf))
                del buf[:k]
                self.remaining -= k
                self.body_bytes += k
                if self.remaining:
                    break
                done.append((self.status, self.closes))
                self._reset()
            elif st == "chunk_size":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(buf[:end]).split(b";", 1)[0].strip() or b"0", 16)
                del buf[:end + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.state, self.remaining = "chunk_data", size + 2
            elif st == "chunk_data":
                k = min(self.remaining, len(buf))
                del buf[:k]
                self.remaining -= k
                self.body_bytes += k
                if self.remaining:
                    break
                self.state = "chunk_size"
            elif st == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                del buf[:end + 2]
                if end == 0:
                    done.append((self.status, self.closes))
                    self._reset()
            else:                    # "eof": the body runs to the end of the connection
                self.body_bytes += len(buf)
                del buf[:]
                break
        return done

    def eof(self) -> list[tuple[int, bool]]:
        """The connection ended: completes a close-delimited response, if one is open."""
        if self.state == "eof":
            self._reset()
            return [(self.status, True)]
        return []

    @property
    def mid_response(self) -> bool:
        return self.state != "head" or bool(self.buf)

    def _parse_head(self, head: bytes):
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        http10 = parts[0] == b"HTTP/1.0"
        length = None
        chunked = False
        conn = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                conn = value.strip().lower()
        self.closes = b"close" in conn or (http10 and b"keep-alive" not in conn)
        if self.status < 200:                      # 1xx: the real answer follows
            self.state = "head"
            return
        if self.head_request or self.status in (204, 304):
            self.state = "done"
        elif chunked:
            self.state = "chunk_size"
        elif length is not None:
            self.remaining = length
            self.state = "body" if length else "done"
        else:
            self.state = "eof"
            self.closes = True


def build_request(host: str, port: int, path: str, method: str, body_bytes: int,
                  close: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: httpload"]
    body = b""
    if body_bytes or method in ("POST", "PUT"):
        body = b"x" * body_bytes
        lines += ["Content-Type: application/octet-stream", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- statistics ---------------------------------------------------------------------------

def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(values_s) -> dict:
    """Percentiles in microseconds of latencies given in seconds."""
    v = sorted(values_s)
    us = (lambda x: None if x is None else round(x * 1e6, 1))
    return {"p50": us(percentile(v, 50)), "p75": us(percentile(v, 75)),
            "p90": us(percentile(v, 90)), "p99": us(percentile(v, 99)),
            "p99.9": us(percentile(v, 99.9)), "max": us(v[-1] if v else None),
            "mean": us(sum(v) / len(v) if v else None)}


def result(tool, requests, elapsed, latencies, errors, body_bytes, **extra) -> dict:
    errors = {k: errors.get(k, 0) for k in ERROR_KINDS}
    out = {"tool": tool, "requests": requests, "duration_s": round(elapsed, 3),
           "rps": round(requests / elapsed, 1) if elapsed > 0 else 0.0,
           "bytes": body_bytes, "latency_us": latency_summary(latencies),
           "errors": errors, "errors_total": sum(errors.values())}
    out.update(extra)
    return out


def raise_nofile(want: int) -> int:
    """Raise the soft open-files limit towards want (up to the hard limit); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# -- closed loop --------------------------------------------------------------------------

class Closed:
    def __init__(self, request: bytes, close: bool, head_request: bool):
        self.request = request
        self.close = close
        self.head_request = head_request
        self.running = True
        self.latencies: list[float] = []
        self.errors: Counter = Counter()
        self.body_bytes = 0


class ClosedConn(asyncio.Protocol):
    def __init__(self, gen: Closed):
        self.gen = gen
        self.reader = ResponseReader(gen.head_request)
        self.transport = None
        self.sent_at = 0.0
        self.waiting = False
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self._send()

    def _send(self):
        if not self.gen.running:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.waiting = True
        self.transport.write(self.gen.request)

    def data_received(self, data):
        gen = self.gen
        try:
            answers = self.reader.feed(data)
        except ValueError:
            gen.errors["read"] += 1
            self.waiting = False
            self.transport.close()
            return
        for status, closes in answers:
            self._complete(status)
            if closes or gen.close:
                self.transport.close()
                return
            self._send()

    def _complete(self, status):
        gen = self.gen
        self.waiting = False
        if gen.running:
            gen.latencies.append(time.perf_counter() - self.sent_at)
            if not 200 <= status < 400:
                gen.errors["status"] += 1

    def connection_lost(self, exc):
        for status, _ in self.reader.eof():
            self._complete(status)
        if self.waiting and self.gen.running:
            self.gen.errors["read"] += 1
        self.gen.body_bytes += self.reader.body_bytes
        if not self.done.done():
            self.done.set_result(None)


async def run_closed(args) -> dict:
    host, port = parse_hostport(args.target)
    gen = Closed(build_request(host, port, args.path, args.method, args.body_bytes, args.close),
                 args.close, args.method == "HEAD")
    loop = asyncio.get_running_loop()
    conns: set = set()

    async def slot():
        while gen.running:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: ClosedConn(gen), host, port), 5)
            except asyncio.TimeoutError:
                gen.errors["connect"] += 1
                continue
            except OSError:
                gen.errors["connect"] += 1
                await asyncio.sleep(0.01)
                continue
            conns.add(proto)
            await proto.done
            conns.discard(proto)

    t0 = time.perf_counter()
    tasks = [loop.create_task(slot()) for _ in range(args.connections)]
    await asyncio.sleep(args.duration_s)
    gen.running = False
    elapsed = time.perf_counter() - t0
    requests = len(gen.latencies)
    for c in list(conns):
        if c.waiting:
            c.waiting = False              # answers still on the way are not errors
        c.transport.close()
    await asyncio.wait(tasks, timeout=5)
    for t in tasks:
        t.cancel()
    return result("httpload", requests, elapsed, gen.latencies, gen.errors, gen.body_bytes,
                  connections=args.connections)


# -- open loop ----------------------------------------------------------------------------

class OpenConn:
    __slots__ = ("sock", "reader", "due", "sent")

    def __init__(self, host, port, head_request):
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.reader = ResponseReader(head_request)
        self.due = self.sent = 0.0


def run_open(args) -> dict:
    host, port = parse_hostport(args.target)
    request = build_request(host, port, args.path, args.method, args.body_bytes, False)
    head_request = args.method == "HEAD"
    errors: Counter = Counter()
    latencies: list[float] = []
    service: list[float] = []
    body_bytes = 0
    idle: deque = deque()
    busy: dict = {}                        # fileno -> OpenConn
    for _ in range(args.connections):
        try:
            idle.append(OpenConn(host, port, head_request))
        except OSError:
            errors["connect"] += 1
    backlog: deque = deque()               # due times waiting for a free connection
    waited = 0
    lateness: list[float] = []             # send time - due time, when a connection was free
    precise_timers()

    def send(conn, due, on_time):
        sent = time.perf_counter()
        try:
            _send_all(conn.sock, request)
        except OSError:
            errors["write"] += 1
            replace(conn)
            backlog.appendleft(due)
            return
        if on_time:
            lateness.append(sent - due)
        conn.due, conn.sent = due, sent
        busy[conn.sock.fileno()] = conn

    def replace(conn):
        nonlocal body_bytes
        body_bytes += conn.reader.body_bytes
        conn.sock.close()
        try:
            idle.append(OpenConn(host, port, head_request))
        except OSError:
            errors["connect"] += 1

    interval = 1.0 / args.rate
    total = max(1, int(args.rate * args.duration_s))
    t0 = time.perf_counter() + 0.01
    stop_at = t0 + args.duration_s + args.drain_s
    i = 0
    while True:
        now = time.perf_counter()
        while i < total and t0 + i * interval <= now:
            due = t0 + i * interval
            i += 1
            if idle:
                send(idle.popleft(), due, True)
            else:
                backlog.append(due)
                waited += 1
        if i >= total and not busy and not backlog:
            break
        if now >= stop_at or (not busy and not idle and backlog):
            break
        # sleep in select() until SPIN_S before the next send, then poll (timeout 0) so
        # the send goes out on time; answers are read in both cases
        timeout = (t0 + i * interval - now) if i < total else 0.05
        timeout = timeout - SPIN_S if timeout > SPIN_S else 0.0
        ready, _, _ = select.select(list(busy), [], [], timeout)
        now = time.perf_counter()
        for fd in ready:
            conn = busy[fd]
            try:
                data = conn.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            try:
                answers = conn.reader.feed(data) if data else conn.reader.eof()
                broken = not data
            except ValueError:
                answers, broken = [], True
            for status, _ in answers:
                latencies.append(now - conn.due)
                service.append(now - conn.sent)
                if not 200 <= status < 400:
                    errors["status"] += 1
            if not answers and not broken:
                continue                           # more of this answer to come
            del busy[fd]
            if not answers:
                errors["read"] += 1                # the connection died under a request
            if broken or answers[-1][1]:
                replace(conn)
                conn = idle.pop() if idle else None
            if conn is not None:
                if backlog:
                    send(conn, backlog.popleft(), False)
                else:
                    idle.append(conn)
    elapsed = min(time.perf_counter(), t0 + args.duration_s + args.drain_s) - t0
    unanswered = len(busy) + len(backlog) + (total - i)
    errors["timeout"] += unanswered
    for conn in list(busy.values()) + list(idle):
        body_bytes += conn.reader.body_bytes
        conn.sock.close()
    out = result("httpload-open", len(latencies), max(elapsed, args.duration_s), latencies,
                 errors, body_bytes, connections=args.connections, rate=args.rate,
                 scheduled=total, waited_for_connection=waited, unanswered=unanswered,
                 service_latency_us=latency_summary(service),
                 send_lateness_us=latency_summary(lateness))
    return out


SPIN_S = 0.0002          # open loop: poll instead of sleeping this close to a send


def precise_timers():
    """Ask the kernel for 1 ns timer slack (default 50 us) so select() wakes on time."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)    # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def _send_all(sock, data):
    """Write all of data on a non-blocking socket (requests are small: rarely loops)."""
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            select.select([], [sock], [], 1.0)
            continue
        view = view[n:]


# -- idle connections ---------------------------------------------------------------------

class IdleConn(asyncio.Protocol):
    def __init__(self):
        self.reader = ResponseReader()
        self.answered = asyncio.get_running_loop().create_future()
        self.open = True
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            answers = self.reader.feed(data)
        except ValueError as exc:
            answers = []
            if not self.answered.done():
                self.answered.set_exception(exc)
        if answers and not self.answered.done():
            self.answered.set_result(answers[0][0])

    def connection_lost(self, exc):
        self.open = False
        if not self.answered.done():
            self.answered.set_exception(ConnectionError("closed before the answer"))


async def run_idle(args):
    host, port = parse_hostport(args.target)
    limit = raise_nofile(args.connections + 256)
    want = min(args.connections, limit - 64)
    request = build_request(host, port, args.path, "GET", 0, False)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(args.batch)
    conns: list[IdleConn] = []
    failures: Counter = Counter()

    async def open_one():
        async with gate:
            try:
                _, proto = await asyncio.wait_for(loop.create_connection(IdleConn, host, port),
                                                  10)
            except (OSError, asyncio.TimeoutError):
                failures["connect"] += 1
                return
            conns.append(proto)
            proto.transport.write(request)
            try:
                status = await asyncio.wait_for(asyncio.shield(proto.answered), 10)
                if not 200 <= status < 400:
                    failures["status"] += 1
            except (OSError, ValueError, asyncio.TimeoutError):
                failures["read"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(want)))
    took = time.perf_counter() - t0
    ready = {"requested": args.connections, "attempted": want, "nofile_limit": limit,
             "open": sum(c.open for c in conns), "failures": dict(failures),
             "open_s": round(took, 2)}
    print("READY " + json.dumps(ready), flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        await asyncio.wait_for(stop, args.hold_s)
    except asyncio.TimeoutError:
        pass
    done = dict(ready, still_open=sum(c.open for c in conns))
    print("DONE " + json.dumps(done), flush=True)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    await asyncio.sleep(0.1)


# -- command line -------------------------------------------------------------------------

def parse_hostport(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def print_human(r):
    lat = r["latency_us"]
    print(f"{r['tool']}: {r['requests']} requests in {r['duration_s']} s = {r['rps']} req/s")
    print("latency us  " + "  ".join(f"{k} {lat[k]}" for k in ("p50", "p90", "p99", "p99.9",
                                                             "max")))
    print("errors: " + ", ".join(f"{k}={v}" for k, v in r["errors"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.httpload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("closed", "open", "idle"):
        p = sub.add_parser(name)
        p.add_argument("--target", required=True, help="HOST:PORT")
        p.add_argument("--path", default="/")
        p.add_argument("--connections", type=int, default=50)
        if name != "idle":
            p.add_argument("--duration-s", type=float, default=10.0)
            p.add_argument("--method", default="GET")
            p.add_argument("--body-bytes", type=int, default=0)
            p.add_argument("--json", action="store_true", help="one JSON object on stdout")
        if name == "closed":
            p.add_argument("--close", action="store_true",
                           help="Connection: close, a new connection per request")
        if name == "open":
            p.add_argument("--rate", type=float, required=True, help="requests per second")
            p.add_argument("--drain-s", type=float, default=2.0,
                           help="how long to wait for answers after the last send")
        if name == "idle":
            p.add_argument("--batch", type=int, default=200, help="connections opened at once")
            p.add_argument("--hold-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.cmd == "idle":
        run_loop(run_idle(args))
        return 0
    if args.connections < 1 or args.duration_s <= 0:
        ap.error("--connections must be >= 1 and --duration-s > 0")
    if args.cmd == "closed":
        r = run_loop(run_closed(args))
    else:
        if args.rate <= 0:
            ap.error("--rate must be > 0")
        r = run_open(args)
    print(json.dumps(r) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_human(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
