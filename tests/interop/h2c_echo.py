"""A tiny h2c (prior knowledge) echo server on fastmesh's HTTP/2 codec, for interop tests
with independent clients (curl, h2load, the `h2` package). Test-only: not the proxy.

    python tests/interop/h2c_echo.py [--port 0] [--loop uvloop|asyncio] [--max-streams N]

prints "READY <port>" once listening. Every request gets 200 with the request body echoed
(or, without a body, "<method> <path>\\n"); a request with `te: trailers` also gets
trailers `grpc-status: 0` (as a gRPC server would). Flow control is honoured both ways: the
request body is given back to the window as it is queued, the response waits for windows.

Paths under /t/ answer differently (for the proxy's translation tests):
  /t/bytes/N[?cl]      N bytes of body, with a content-length only when `cl` is given
  /t/trailers[?cl]     body "ok", then trailers `x-trailer: yes` (content-length with `cl`)
  /t/headers           the request's header fields as JSON (after the body, if any)
  /t/reset             RST_STREAM(INTERNAL_ERROR) before any response
  /t/reset-mid         response headers and 1000 bytes of body, then RST_STREAM
  /t/slow/MS           the echo answer after MS milliseconds
  /t/stats             {"connections": those that carried other requests, "open": open now,
                       "resets": {error code: RST_STREAMs received}} as JSON
"""
import argparse
import asyncio
import json
import sys

from fastmesh._core.buffer import RecvBuffer
from fastmesh._core.h2 import H2Connection, H2Consumer


class _Stream:
    __slots__ = ("headers", "body", "pending", "trailers", "responded")

    def __init__(self, headers):
        self.headers = headers
        self.body = []              # request DATA views (Slices of the receive buffer)
        self.pending = []           # response bytes waiting for a window
        self.trailers = False
        self.responded = False


class EchoConsumer(H2Consumer):
    def __init__(self, proto):
        self.proto = proto
        self.streams = {}

    def on_headers(self, sid, headers, end_stream):
        st = self.streams[sid] = _Stream(headers)
        if not self.proto.counted and headers.get(b":path") != b"/t/stats":
            self.proto.counted = True
            EchoProtocol.accepted += 1
        st.trailers = headers.get(b"te") == b"trailers"
        if end_stream:
            self.respond(sid)

    def on_data(self, sid, data, end_stream):
        st = self.streams.get(sid)
        if st is None:
            return
        if len(data):
            st.body.append(data)
            self.proto.conn.py_consumed(sid, len(data))
        if end_stream:
            self.respond(sid)

    def on_trailers(self, sid, trailers):
        self.respond(sid)

    def on_reset(self, sid, code, remote):
        if remote:
            EchoProtocol.resets[str(code)] = EchoProtocol.resets.get(str(code), 0) + 1
        self.streams.pop(sid, None)

    def on_window_open(self, sid):
        self.pump(sid)

    def respond(self, sid):
        st = self.streams[sid]
        conn = self.proto.conn
        path = st.headers.get(b":path", b"")
        if path.startswith(b"/t/") and self.special(sid, st, path.decode()):
            return
        body = st.body or [("%s %s\n" % (st.headers.get(b":method", b"").decode(),
                                        st.headers.get(b":path", b"").decode())).encode()]
        ctype = st.headers.get(b"content-type") or b"text/plain"
        conn.py_send_headers(sid, [(b":status", b"200"), (b"content-type", ctype),
                                   (b"server", b"fastmesh-h2c-echo")], False)
        st.pending = list(body)
        st.responded = True
        self.pump(sid)

    def special(self, sid, st, path):
        conn = self.proto.conn
        path, _, query = path.partition("?")
        hdrs = [(b":status", b"200"), (b"server", b"fastmesh-h2c-echo")]
        if path == "/t/reset":
            conn.py_reset_stream(sid, 2)
            self.streams.pop(sid, None)
            return True
        if path.startswith("/t/slow/"):
            asyncio.get_running_loop().call_later(int(path[8:]) / 1000.0, self.late, sid)
            return True
        if path.startswith("/t/bytes/"):
            n = int(path[9:])
            body = [bytes(range(256)) * 64] * (n // 16384)
            if n % 16384:
                body.append(b"x" * (n % 16384))
        elif path == "/t/trailers":
            body = [b"ok"]
            st.trailers = [(b"x-trailer", b"yes")]
        elif path == "/t/headers":
            body = [json.dumps([[k.decode(), v.decode()] for k, v in st.headers.items()]
                               + [["body-bytes", str(sum(len(b) for b in st.body))]]).encode()]
        elif path == "/t/reset-mid":
            conn.py_send_headers(sid, hdrs, False)
            conn.py_send_data(sid, b"y" * 1000, False)
            conn.py_reset_stream(sid, 2)
            self.streams.pop(sid, None)
            return True
        elif path == "/t/stats":
            body = [json.dumps({"connections": EchoProtocol.accepted, "open": EchoProtocol.open,
                                "resets": EchoProtocol.resets}).encode()]
        else:
            return False
        if "cl" in query.split("&"):
            hdrs.append((b"content-length", str(sum(len(b) for b in body)).encode()))
        conn.py_send_headers(sid, hdrs, False)
        st.pending = list(body)
        st.responded = True
        self.pump(sid)
        return True

    def late(self, sid):
        st = self.streams.get(sid)
        if st is not None:
            st.headers = {b":path": b"/slow", b":method": st.headers.get(b":method", b"")}
            self.respond(sid)
            self.proto.flush()

    def pump(self, sid):
        st = self.streams.get(sid)
        if st is None or not st.responded:
            return
        conn = self.proto.conn
        while st.pending:
            chunk = st.pending[0]
            last = len(st.pending) == 1 and not st.trailers
            sent = conn.py_send_data(sid, chunk, last)
            if sent < 0:
                self.streams.pop(sid, None)
                return
            if sent < len(chunk):
                st.pending[0] = memoryview(chunk)[sent:]
                return                              # on_window_open resumes
            st.pending.pop(0)
        if st.trailers:
            conn.py_send_headers(sid, st.trailers if isinstance(st.trailers, list)
                                 else [(b"grpc-status", b"0")], True)
        self.streams.pop(sid, None)


class EchoProtocol(asyncio.BufferedProtocol):
    accepted = 0                    # connections that carried requests other than /t/stats
    open = 0
    resets = {}                     # RST_STREAMs received, by error code
    max_streams = 1000              # SETTINGS_MAX_CONCURRENT_STREAMS (--max-streams)

    def __init__(self):
        self.rbuf = RecvBuffer(16384, 1 << 20)
        self.consumer = EchoConsumer(self)
        self.conn = H2Connection(self.consumer, max_concurrent_streams=EchoProtocol.max_streams)
        self.transport = None
        self.counted = False        # carried a request other than /t/stats

    def connection_made(self, transport):
        self.transport = transport
        EchoProtocol.open += 1
        self.flush()

    def get_buffer(self, sizehint):
        return self.rbuf.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        self.rbuf.advance(nbytes)
        self.conn.py_receive(self.rbuf)
        self.flush()
        if self.conn.closed:
            self.transport.close()

    def flush(self):
        chunks = self.conn.output_chunks()
        if chunks:
            self.transport.writelines(chunks)

    def connection_lost(self, exc):
        EchoProtocol.open -= 1
        self.consumer.streams.clear()


async def serve(port):
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(EchoProtocol, "127.0.0.1", port)
    print("READY %d" % srv.sockets[0].getsockname()[1], flush=True)
    async with srv:
        await srv.serve_forever()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--max-streams", type=int, default=1000)
    a = ap.parse_args()
    EchoProtocol.max_streams = a.max_streams
    if a.loop == "uvloop":
        import uvloop
        uvloop.run(serve(a.port))
    else:
        asyncio.run(serve(a.port))


if __name__ == "__main__":
    sys.exit(main())
