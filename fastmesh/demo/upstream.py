"""A small HTTP/1.1 upstream server for the demo, the tests and the benchmarks.

Parsing is httptools (llhttp), an implementation independent of fastmesh's own codec.
Keep-alive and pipelining are honoured. What it answers, by path:

    /echo              JSON: server name, method, path, headers, body length and sha256
    /bytes/N           N bytes with Content-Length
    /chunked/N         N bytes, chunked (8 KiB chunks)
    /close/N           N bytes delimited by closing the connection
    /status/NNN        that status (no body for 1xx/204/304)
    /slow/MS           waits MS milliseconds, then answers
    /drip/H/B/N        waits H ms, sends the head (content-length: N*10), then the body in
                       N pieces of 10 bytes spread over B ms: a slow, streaming upstream
    /drip-random/MAX   as /drip/H/B/8 with H and B drawn at random from 0..MAX/2 ms
    /reset             closes the connection without answering
    /reset-mid         promises 100 bytes, sends 10, closes
    /stall-mid         promises 100 bytes, sends 10, then sends nothing more (stays open)
    /gzip-chunked/N    N bytes gzip-compressed, `transfer-encoding: gzip, chunked`
    /malformed         a response head with a bad Content-Length
    /gzip-close/N      N bytes gzip-compressed, `transfer-encoding: gzip`, ended by closing
    /early/NNN         answers NNN at once, before reading the request body
    /healthz           200 "ok" while healthy, else 503 (for active health checks)
    anything else      "hello from NAME\n"

Control paths, for tests that make an upstream fail and recover (answered, never counted):

    /control/fail/NNN  from now on answer every request but /healthz with NNN (0: stop)
    /control/health/ok, /control/health/fail   what /healthz answers
    /control/stats     JSON: requests answered (control paths aside), /healthz among them,
                       and the Host header of the last 20

A path may carry a routing prefix before "/_/": "/api/_/slow/100" is answered as "/slow/100";
any path ending in "/echo" is answered as "/echo".

Run one: ``python -m fastmesh.demo.upstream --listen 127.0.0.1:8001 --name web-1``.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import random
import hashlib
import json
import logging
import signal

import httptools

log = logging.getLogger("fastmesh.demo.upstream")


class ServerState:
    """What every connection of one upstream server shares."""

    def __init__(self, fail_status: int = 0):
        self.fail_status = fail_status      # non-zero: answer everything with this status
        self.healthy = True                 # what /healthz says
        self.requests = 0
        self.healthz = 0
        self.hosts: list = []               # the Host of the last requests (at most 20)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, name: str, state: ServerState | None = None):
        self.name = name
        self.state = state if state is not None else ServerState()
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.queue: list = []          # requests parsed, answered in order
        self.busy = False
        self._reset()

    def _reset(self):
        self.url = b""
        self.headers = []
        self.body = hashlib.sha256()
        self.body_len = 0
        self.body_keep = bytearray()
        self.early_sent = False

    # -- asyncio --
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc):
        self.transport = None

    # -- httptools callbacks --
    def on_message_begin(self):
        self._reset()

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        path = _command(self.url.split(b"?", 1)[0].decode("latin-1"))
        if path.startswith("/early/") and not self.early_sent:
            self.early_sent = True
            status = int(path.rsplit("/", 1)[1])
            self.transport.write(b"HTTP/1.1 %d Early\r\ncontent-length: 5\r\n\r\nearly" % status)

    def on_body(self, body):
        self.body.update(body)
        self.body_len += len(body)
        if len(self.body_keep) < 65536:
            self.body_keep += body[:65536 - len(self.body_keep)]

    def on_message_complete(self):
        req = {
            "method": self.parser.get_method().decode(),
            "url": self.url.decode("latin-1"),
            "headers": self.headers,
            "body_bytes": self.body_len,
            "body_sha256": self.body.hexdigest(),
            "body": bytes(self.body_keep).decode("latin-1") if self.body_len <= 65536 else None,
            "keep_alive": self.parser.should_keep_alive(),
            "early_sent": self.early_sent,
        }
        self.queue.append(req)
        if not self.busy:
            asyncio.ensure_future(self._drain_queue())

    async def _drain_queue(self):
        self.busy = True
        try:
            while self.queue and self.transport is not None:
                req = self.queue.pop(0)
                await self._answer(req)
        finally:
            self.busy = False

    async def _drip(self, head_ms, body_ms, pieces, conn, head_only, keep):
        await asyncio.sleep(head_ms / 1000.0)
        if self.transport is None:
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n"
                             % (10 * pieces, conn))
        if not head_only:
            for i in range(pieces):
                await asyncio.sleep(body_ms / 1000.0 / max(1, pieces))
                if self.transport is None:
                    return
                self.transport.write(b"drip %04d\n" % (i % 10000))
        if not keep and self.transport is not None:
            self.transport.close()

    async def _answer(self, req):
        t = self.transport
        path = _command(req["url"].split("?", 1)[0])
        keep = req["keep_alive"]
        conn = b"" if keep else b"connection: close\r\n"
        head_only = req["method"] == "HEAD"

        def send(status, body=b"", extra=b"", reason=b"OK"):
            t.write(b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s%s\r\n"
                    % (status, reason, len(body), extra, conn) + (b"" if head_only else body))
            if not keep:
                t.close()

        if req["early_sent"]:
            if not keep:
                t.close()
            return
        st = self.state
        if path.startswith("/control/"):
            what = path[9:]
            if what.startswith("fail/"):
                st.fail_status = int(what[5:])
            elif what in ("health/ok", "health/fail"):
                st.healthy = what == "health/ok"
            elif what == "stats":
                send(200, json.dumps({"requests": st.requests, "healthz": st.healthz,
                                      "hosts": st.hosts}).encode(),
                     b"content-type: application/json\r\n")
                return
            else:
                send(404, b"unknown control\n", reason=b"Not Found")
                return
            send(200, b"ok\n")
            return
        st.requests += 1
        st.hosts = (st.hosts + [v for k, v in req["headers"] if k.lower() == "host"])[-20:]
        if path == "/healthz":
            st.healthz += 1
            if st.healthy:
                send(200, b"ok\n")
            else:
                send(503, b"unhealthy\n", reason=b"Service Unavailable")
            return
        if st.fail_status:
            send(st.fail_status, b"failing from %s\n" % self.name.encode(), reason=b"Failing")
            return
        if path == "/echo":
            out = dict(req, server=self.name)
            send(200, json.dumps(out).encode(), b"content-type: application/json\r\n")
        elif path.startswith("/bytes/"):
            send(200, b"x" * int(path[7:]))
        elif path.startswith("/chunked/"):
            n = int(path[9:])
            t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n%s\r\n" % conn)
            if not head_only:
                while n > 0:
                    k = min(n, 8192)
                    t.write(b"%x\r\n%s\r\n" % (k, b"y" * k))
                    n -= k
                t.write(b"0\r\n\r\n")
            if not keep:
                t.close()
        elif path.startswith("/close/"):
            n = int(path[7:])
            t.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"z" * n)
            t.close()
        elif path.startswith("/status/"):
            status = int(path[8:])
            if status < 200 or status in (204, 304):
                t.write(b"HTTP/1.1 %d Status\r\n%s\r\n" % (status, conn))
                if status < 200:
                    send(200, b"after-1xx")
                elif not keep:
                    t.close()
            else:
                send(status, b"status %d\n" % status, reason=b"Status")
        elif path.startswith("/slow/"):
            await asyncio.sleep(int(path[6:]) / 1000.0)
            if self.transport is not None:
                send(200, b"slow done\n")
        elif path.startswith("/drip/") or path.startswith("/drip-random/"):
            if path.startswith("/drip/"):
                head_ms, body_ms, pieces = (int(x) for x in path[6:].split("/"))
            else:
                half = int(path[13:]) // 2
                head_ms, body_ms, pieces = random.randint(0, half), random.randint(0, half), 8
            await self._drip(head_ms, body_ms, pieces, conn, head_only, keep)
        elif path == "/reset":
            t.abort()
        elif path.startswith("/gzip-chunked/"):
            data = gzip.compress(b"g" * int(path[14:]))
            t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n%s\r\n" % conn)
            if not head_only:
                half = len(data) // 2
                for piece in (data[:half], data[half:]):
                    t.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                t.write(b"0\r\n\r\n")
            if not keep:
                t.close()
        elif path.startswith("/gzip-close/"):
            data = gzip.compress(b"g" * int(path[12:]))
            t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\n"
                    + (b"" if head_only else data))
            t.close()
        elif path == "/malformed":
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 12x\r\n\r\nhello")
        elif path == "/stall-mid":
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"m" * 10)
        elif path == "/reset-mid":
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"m" * 10)
            await asyncio.sleep(0.05)
            if self.transport is not None:
                self.transport.abort()
        else:
            send(200, b"hello from %s\n" % self.name.encode())


def _command(path: str) -> str:
    if path.endswith("/echo"):
        return "/echo"
    return "/" + path.split("/_/", 1)[1] if "/_/" in path else path


async def start_upstream(host: str, port: int, name: str, fail_status: int = 0):
    loop = asyncio.get_running_loop()
    state = ServerState(fail_status)
    return await loop.create_server(lambda: UpstreamProtocol(name, state), host, port,
                                    reuse_address=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:8001")
    ap.add_argument("--name", default="upstream")
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--fail-status", type=int, default=0,
                    help="answer every request (but /healthz) with this status")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host       # "[v6]:port"
    if args.loop == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def run():
        server = await start_upstream(host, int(port), args.name, args.fail_status)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
