"""The admin API: a small HTTP/1.1 server on the admin address (loopback by default).

Endpoints are registered in a table, ``(method, path) -> handler``, so new ones are one line:

    GET  /ready         200 "ready" when every listener accepts, else 503
    GET  /stats         JSON counters: per listener, per cluster, totals, latency histograms
                        (?filter=REGEX: only the figures whose dotted name matches, e.g.
                        `listeners\\.web\\.` or `rq_total$`)
    GET  /stats/prometheus  the same in the Prometheus text format (?filter= too)
    GET  /listeners     JSON listener states and bound addresses
    GET  /clusters      JSON endpoints per cluster (address, active requests, idle pooled)
    GET  /config_dump   JSON of the running config (?format=envoy: Envoy's ConfigDump shape,
                        for a proxy configured by an Envoy bootstrap and its control plane)
    POST /reload        re-read the config file and apply it (400 with every error if invalid)
    GET  /logging       the log levels; POST /logging?level=debug sets every fastmesh
                        logger (supervisor and workers), POST /logging?<logger>=<level> one
    GET  /dashboard     the live page (fastmesh.dashboard); its JSON: /api/topology,
                        /api/rates, /api/events, and /api/stream (Server-Sent Events)
    GET  /              this list

Requests are parsed by httptools (the C parser of llhttp). A handler answers
``(status, content type, body)`` and the connection closes after it (admin traffic is rare),
or answers a `Stream`: the connection then stays open and the stream's coroutine writes
events to it until the client goes away. Each connection is served by its own task, so a
stream never holds up another admin call.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import httptools

from fastmesh import promtext

log = logging.getLogger("fastmesh.admin")

MAX_HEAD_BYTES = 16384
MAX_BODY_BYTES = 4 * 1024 * 1024
READ_TIMEOUT_S = 10.0

Handler = Callable[..., Awaitable[tuple[int, str, bytes]]]
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def json_body(obj, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def text(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", (message.rstrip("\n") + "\n").encode()


class Stream:
    """A streamed answer: `run(write)` is awaited with a function that queues bytes on the
    connection (it returns False once the client has gone); the connection closes when it
    returns. `content_type`, `headers`: of the response head."""

    def __init__(self, run: Callable[[Callable[[bytes], bool]], Awaitable[None]],
                 content_type: str = "text/event-stream; charset=utf-8",
                 headers: tuple = (("cache-control", "no-cache"),)):
        self.run, self.content_type, self.headers = run, content_type, headers


class _Request:
    __slots__ = ("method", "url", "headers", "body", "head_bytes")

    def __init__(self):
        self.method = ""
        self.url = bytearray()
        self.headers: list = []
        self.body = bytearray()
        self.head_bytes = 0


class _ParseError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _AdminConnection(asyncio.Protocol):
    """One admin connection: bytes -> httptools -> one request -> its handler's answer."""

    def __init__(self, server: "AdminServer"):
        self.server = server
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.req = _Request()
        self.complete = asyncio.get_running_loop().create_future()
        self.closed = False
        self.task: asyncio.Task | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport):
        self.transport = transport
        self.server.connections.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self.complete.done():
            return                          # one request per connection: the rest is ignored
        try:
            self.parser.feed_data(data)
        except _ParseError as exc:
            self._fail(exc.status, str(exc))
        except httptools.HttpParserCallbackError as exc:
            # our own refusal (limits), raised from a callback: httptools chains it
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, _ParseError):
                self._fail(cause.status, str(cause))
            else:
                self._fail(400, f"bad request: {exc}")
        except httptools.HttpParserUpgrade:
            self._fail(400, "upgrade not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"bad request: {exc}")

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if not self.complete.done():
            self.complete.set_exception(ConnectionError("closed"))

    # -- httptools callbacks --

    def on_url(self, url: bytes) -> None:
        self.req.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        self._count_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self.req.method = self.parser.get_method().decode("ascii", "replace")

    def on_body(self, body: bytes) -> None:
        if len(self.req.body) + len(body) > MAX_BODY_BYTES:
            raise _ParseError(413, "body too large")
        self.req.body += body

    def on_message_complete(self) -> None:
        if not self.complete.done():
            self.complete.set_result(self.req)

    def _count_head(self, n: int) -> None:
        self.req.head_bytes += n
        if self.req.head_bytes > MAX_HEAD_BYTES:
            raise _ParseError(431, "head too large")

    # -- serving --

    def _fail(self, status: int, message: str) -> None:
        if not self.complete.done():
            self.complete.set_result((status, message))

    def write(self, data: bytes) -> bool:
        if self.closed or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    async def _serve(self) -> None:
        try:
            try:
                got = await asyncio.wait_for(asyncio.shield(self.complete), READ_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError):
                self.transport.close()
                return
            if isinstance(got, tuple):
                status, ctype, body = text(*got)
            else:
                try:
                    answer = await self.server.dispatch(got)
                except Exception:
                    log.exception("admin: handler for %s failed", bytes(got.url)[:200])
                    answer = text(500, "internal error (see the proxy's log)")
                if isinstance(answer, Stream):
                    await self._stream(answer)
                    return
                status, ctype, body = answer
            self._respond(status, ctype, body)
        except asyncio.CancelledError:
            self.transport.close()
        except Exception:
            log.exception("admin: serving a request failed")
            self.transport.close()

    def _respond(self, status: int, ctype: str, body: bytes) -> None:
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n").encode()
        if not self.closed:
            self.transport.write(head + body)
            self.transport.close()

    async def _stream(self, stream: Stream) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in stream.headers)
        self.write((f"HTTP/1.1 200 OK\r\ncontent-type: {stream.content_type}\r\n{extra}"
                    "connection: close\r\n\r\n").encode())
        try:
            await stream.run(self.write)
        finally:
            if not self.closed:
                self.transport.close()


class AdminServer:
    def __init__(self, server_state):
        """server_state: the object that answers (fastmesh.server.supervisor.Supervisor)."""
        self.state = server_state
        self.routes: dict[tuple[str, str], Handler] = {}
        self._with_query: set = set()
        self.server = None
        self.connections: set = set()
        self.register("GET", "/", self._index)
        self.register("GET", "/ready", self._ready)
        self.register("GET", "/stats", self._stats, with_query=True)
        self.register("GET", "/stats/prometheus", self._stats_prometheus, with_query=True)
        self.register("GET", "/listeners", self._listeners)
        self.register("GET", "/clusters", self._clusters)
        self.register("GET", "/config_dump", self._config_dump, with_query=True)
        self.register("GET", "/logging", self._logging, with_query=True)
        self.register("POST", "/logging", self._logging, with_query=True)
        observatory = getattr(server_state, "observatory", None)
        if observatory is not None:
            observatory.register(self)

    def register(self, method: str, path: str, handler: Handler,
                 with_query: bool = False) -> None:
        """with_query: the handler also takes the query string's parameters (a dict)."""
        self.routes[(method, path)] = handler
        if with_query:
            self._with_query.add((method, path))

    async def start(self, host: str, port: int, sock=None) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: _AdminConnection(self)  # noqa: E731
        if sock is not None:
            self.server = await loop.create_server(factory, sock=sock)
        else:
            self.server = await loop.create_server(factory, host, port, reuse_address=True)
        addr = self.server.sockets[0].getsockname()
        log.info("admin: listening on %s:%s", addr[0], addr[1])

    @property
    def bound_address(self):
        return self.server.sockets[0].getsockname() if self.server else None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):     # streams end: their clients reconnect
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.close()

    async def dispatch(self, req: _Request):
        try:
            parts = urlsplit(req.url.decode("latin-1"))
        except ValueError:
            return text(400, "bad request target")
        method, path = req.method, parts.path
        handler = self.routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in self.routes):
                return text(405, "method not allowed")
            return text(404, "not found; GET / lists the endpoints")
        body = bytes(req.body)
        if (method, path) in self._with_query:
            return await handler(body, {k: v[-1] for k, v in
                                        parse_qs(parts.query, keep_blank_values=True).items()})
        return await handler(body)

    # -- endpoints ---------------------------------------------------------------

    async def _index(self, body: bytes):
        lines = [f"{m} {p}" for (m, p) in sorted(self.routes, key=lambda r: (r[1], r[0]))]
        return 200, "text/plain", ("\n".join(lines) + "\n").encode()

    async def _ready(self, body: bytes):
        if self.state.is_ready():
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", b"not ready\n"

    async def _filtered_stats(self, query: dict):
        pattern = query.get("filter")
        rx = None
        if pattern:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                return None, text(400, f"filter: not a regular expression: {exc}")
        stats = await _maybe_await(self.state.stats())
        return (filter_stats(stats, rx) if rx is not None else stats), None

    async def _stats(self, body: bytes, query: dict):
        stats, err = await self._filtered_stats(query)
        return err or json_body(stats)

    async def _stats_prometheus(self, body: bytes, query: dict):
        stats, err = await self._filtered_stats(query)
        if err:
            return err
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

    async def _logging(self, body: bytes, query: dict):
        """Envoy's /logging: GET lists the levels; POST ?level=L sets every fastmesh logger,
        ?<logger>=L one (names as in the log lines: supervisor, worker, admin, health...)."""
        if query:
            levels: dict = {}
            for key, value in query.items():
                value = value.lower()
                if value not in LOG_LEVELS:
                    return text(400, f"{key}: unknown level {value!r}; one of "
                                     f"{', '.join(LOG_LEVELS)}")
                if key == "level":
                    levels[""] = value
                    levels["fastmesh"] = value
                else:
                    levels[key if key.startswith("fastmesh") else f"fastmesh.{key}"] = value
            if not hasattr(self.state, "set_log_levels"):
                return text(501, "this server cannot change log levels")
            error = await self.state.set_log_levels(levels)
            if error:
                return text(500, f"log levels set here, but not in every worker: {error}")
        return json_body(self._log_levels())

    @staticmethod
    def _log_levels() -> dict:
        out = {"root": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()}
        for name in sorted(logging.root.manager.loggerDict):
            if name.startswith("fastmesh"):
                lg = logging.getLogger(name)
                out[name] = logging.getLevelName(lg.getEffectiveLevel()).lower()
        return out


def filter_stats(stats: dict, rx: re.Pattern) -> dict:
    """Keep the figures whose dotted name (`server.uptime_s`, `listeners.web.downstream_rq_total`,
    `latency_histograms.clusters.web`) matches `rx` (re.search)."""
    out: dict = {}
    for section, value in stats.items():
        if section == "latency_histograms" and isinstance(value, dict):
            hist = {}
            for kind in ("listeners", "clusters"):
                kept = {n: h for n, h in (value.get(kind) or {}).items()
                        if rx.search(f"{section}.{kind}.{n}")}
                if kept:
                    hist[kind] = kept
            if hist:
                out[section] = dict(hist, bounds_us=value.get("bounds_us"))
        elif section in ("listeners", "clusters") and isinstance(value, dict):
            kept_groups = {}
            for name, counters in value.items():
                kept = {k: v for k, v in counters.items()
                        if rx.search(f"{section}.{name}.{k}")}
                if kept:
                    kept_groups[name] = kept
            if kept_groups:
                out[section] = kept_groups
        elif isinstance(value, dict):
            kept = {k: v for k, v in value.items() if rx.search(f"{section}.{k}")}
            if kept:
                out[section] = kept
        elif rx.search(section):
            out[section] = value
    return out


async def _maybe_await(value):
    if asyncio.iscoroutine(value):
        return await value
    return value


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}
