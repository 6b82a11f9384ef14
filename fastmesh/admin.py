"""The admin API: a small HTTP/1.1 server on the admin address (loopback by default).

Endpoints are registered in a table, ``(method, path) -> handler``, so new ones are one line:

    GET  /ready         200 "ready" when every listener accepts, else 503
    GET  /stats         JSON counters: per listener, per cluster, totals
    GET  /stats/prometheus  the same in the Prometheus text format
    GET  /listeners     JSON listener states and bound addresses
    GET  /clusters      JSON endpoints per cluster (address, active requests, idle pooled)
    GET  /config_dump   JSON of the running config (?format=envoy: Envoy's ConfigDump shape,
                        for a proxy configured by an Envoy bootstrap and its control plane)
    POST /reload        re-read the config file and apply it (400 with every error if invalid)
    GET  /              this list

Each request gets one response and the connection closes (admin traffic is rare).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

from fastmesh import promtext

log = logging.getLogger("fastmesh.admin")

MAX_HEAD_BYTES = 16384
MAX_BODY_BYTES = 4 * 1024 * 1024
READ_TIMEOUT_S = 10.0

Handler = Callable[[bytes], Awaitable[tuple[int, str, bytes]]]


def json_body(obj) -> tuple[int, str, bytes]:
    return 200, "application/json", (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class AdminServer:
    def __init__(self, server_state):
        """server_state: the object that answers (fastmesh.server.supervisor.Supervisor)."""
        self.state = server_state
        self.routes: dict[tuple[str, str], Handler] = {}
        self._with_query: set = set()
        self.server = None
        self.register("GET", "/", self._index)
        self.register("GET", "/ready", self._ready)
        self.register("GET", "/stats", self._stats)
        self.register("GET", "/stats/prometheus", self._stats_prometheus)
        self.register("GET", "/listeners", self._listeners)
        self.register("GET", "/clusters", self._clusters)
        self.register("GET", "/config_dump", self._config_dump, with_query=True)

    def register(self, method: str, path: str, handler: Handler,
                 with_query: bool = False) -> None:
        """with_query: the handler also takes the query string's parameters (a dict)."""
        self.routes[(method, path)] = handler
        if with_query:
            self._with_query.add((method, path))

    async def start(self, host: str, port: int, sock=None) -> None:
        if sock is not None:
            self.server = await asyncio.start_server(self._serve, sock=sock)
        else:
            self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        addr = self.server.sockets[0].getsockname()
        log.info("admin: listening on %s:%s", addr[0], addr[1])

    @property
    def bound_address(self):
        return self.server.sockets[0].getsockname() if self.server else None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(self._handle(reader), READ_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except asyncio.LimitOverrunError:
            status, ctype, body = 431, "text/plain", b"head too large\n"
        except Exception:
            log.exception("admin: handler failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n").encode()
        try:
            writer.write(head + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD_BYTES:
            return 431, "text/plain", b"head too large\n"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1]
        path, _, query = target.partition("?")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return 400, "text/plain", b"bad content-length\n"
        if length < 0 or length > MAX_BODY_BYTES:
            return 413, "text/plain", b"body too large\n"
        body = await reader.readexactly(length) if length else b""
        handler = self.routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in self.routes):
                return 405, "text/plain", b"method not allowed\n"
            return 404, "text/plain", b"not found; GET / lists the endpoints\n"
        if (method, path) in self._with_query:
            from urllib.parse import parse_qs
            return await handler(body, {k: v[-1] for k, v in parse_qs(query).items()})
        return await handler(body)

    # -- endpoints ---------------------------------------------------------------

    async def _index(self, body: bytes):
        lines = [f"{m} {p}" for (m, p) in sorted(self.routes, key=lambda r: r[1])]
        return 200, "text/plain", ("\n".join(lines) + "\n").encode()

    async def _ready(self, body: bytes):
        if self.state.is_ready():
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", b"not ready\n"

    async def _stats(self, body: bytes):
        return json_body(await _maybe_await(self.state.stats()))

    async def _stats_prometheus(self, body: bytes):
        stats = await _maybe_await(self.state.stats())
        return 200, promtext.CONTENT_TYPE, promtext.render(stats).encode()

    async def _listeners(self, body: bytes):
        return json_body(await _maybe_await(self.state.listeners_info()))

    async def _clusters(self, body: bytes):
        return json_body(await _maybe_await(self.state.clusters_info()))

    async def _config_dump(self, body: bytes, query: dict):
        fmt = query.get("format", "fastmesh")
        if fmt not in ("fastmesh", "envoy"):
            return 400, "text/plain", b"format: fastmesh (default) or envoy\n"
        if fmt == "envoy":
            dump = self.state.envoy_config_dump()
            if dump is None:
                return 400, "text/plain", (b"format=envoy: this proxy was configured by the "
                                           b"native format; Envoy's ConfigDump needs an Envoy "
                                           b"bootstrap\n")
            return json_body(dump)
        return json_body(await _maybe_await(self.state.config_dump()))


async def _maybe_await(value):
    if asyncio.iscoroutine(value):
        return await value
    return value


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
