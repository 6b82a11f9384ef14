"""A tiny h2c (prior knowledge) echo server on fastmesh's HTTP/2 codec, for interop tests
with independent clients (curl, h2load, the `h2` package). Test-only: not the proxy.

    python tests/interop/h2c_echo.py [--port 0] [--loop uvloop|asyncio]

prints "READY <port>" once listening. Every request gets 200 with the request body echoed
(or, without a body, "<method> <path>\\n"); a request with `te: trailers` also gets
trailers `grpc-status: 0` (as a gRPC server would). Flow control is honoured both ways: the
request body is given back to the window as it is queued, the response waits for windows.
"""
import argparse
import asyncio
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
        self.streams.pop(sid, None)

    def on_window_open(self, sid):
        self.pump(sid)

    def respond(self, sid):
        st = self.streams[sid]
        conn = self.proto.conn
        body = st.body or [("%s %s\n" % (st.headers.get(b":method", b"").decode(),
                                        st.headers.get(b":path", b"").decode())).encode()]
        ctype = st.headers.get(b"content-type") or b"text/plain"
        conn.py_send_headers(sid, [(b":status", b"200"), (b"content-type", ctype),
                                   (b"server", b"fastmesh-h2c-echo")], False)
        st.pending = list(body)
        st.responded = True
        self.pump(sid)

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
            conn.py_send_headers(sid, [(b"grpc-status", b"0")], True)
        self.streams.pop(sid, None)


class EchoProtocol(asyncio.BufferedProtocol):
    def __init__(self):
        self.rbuf = RecvBuffer(16384, 1 << 20)
        self.consumer = EchoConsumer(self)
        self.conn = H2Connection(self.consumer, max_concurrent_streams=1000)
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
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
    a = ap.parse_args()
    if a.loop == "uvloop":
        import uvloop
        uvloop.run(serve(a.port))
    else:
        asyncio.run(serve(a.port))


if __name__ == "__main__":
    sys.exit(main())
