"""An HTTP/1.1 server over TLS that tells each client what its TLS looked like, for the
upstream TLS origination tests (the proxy is its client). Test-only: not the proxy.

    python tests/tls_upstream.py --cert C --key K [--ca CA] [--min 1.2] [--max 1.3]
                                 [--alpn http/1.1,...] [--port 0]

prints "READY <port>" once listening. Every request gets 200 and a JSON body:
{"path", "sni", "version", "reused", "alpn", "peer_uri"} — the SNI the client sent (null
when none), the TLS version, whether the session was resumed, the ALPN protocol chosen and
the client certificate's URI SANs (--ca: a client certificate is required and verified).
Keep-alive is honoured (--close: every response closes its connection); one thread per
connection.
"""
import argparse
import json
import socket
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        conn = self.connection
        cert = conn.getpeercert() or {}
        body = json.dumps({
            "path": self.path,
            "sni": getattr(conn, "fm_sni", None),
            "version": conn.version(),
            "reused": conn.session_reused,
            "alpn": conn.selected_alpn_protocol(),
            "peer_uri": [v for t, v in cert.get("subjectAltName", ()) if t == "URI"],
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if self.server.close_each:
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


class TlsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, ctx, close_each=False):
        self.ctx = ctx
        self.close_each = close_each
        super().__init__(addr, Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.settimeout(10)
        return sock, addr

    def finish_request(self, request, client_address):
        # the handshake in the connection's own thread (a stuck client blocks nobody)
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            request.close()
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca")
    ap.add_argument("--min", default="1.2")
    ap.add_argument("--max", default="1.3")
    ap.add_argument("--alpn", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--close", action="store_true", help="close after each response")
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[a.min]
    ctx.maximum_version = _VERSIONS[a.max]
    ctx.load_cert_chain(a.cert, a.key)
    if a.ca:
        ctx.load_verify_locations(cafile=a.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if a.alpn:
        ctx.set_alpn_protocols(a.alpn.split(","))

    def on_sni(sslobj, name, _ctx):
        sslobj.fm_sni = name
    ctx.sni_callback = on_sni
    srv = TlsServer(("127.0.0.1", a.port), ctx, a.close)
    srv.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    print(f"READY {srv.server_address[1]}", flush=True)
    srv.serve_forever()             # until SIGTERM


if __name__ == "__main__":
    main()
