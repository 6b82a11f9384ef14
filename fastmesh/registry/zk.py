"""ZooKeeper through kazoo, bridged to the supervisor's event loop.

kazoo keeps the session: reconnects (its waits capped here at ``RECONNECT_MAX_DELAY_S``,
where its default grows to an hour), session loss, watch re-registration on the same
session. Its callbacks run on its own threads; everything here hands them to the loop with
``call_soon_threadsafe`` and does the work there, so the rest of fastmesh.registry is
single-threaded asyncio code.

- ``ZkClient``: one session per (servers, session timeout), shared by its users.
- ``ChildrenWatch``: the children of one path, read again whenever its watch fires or the
  session (re)connects; a missing path is an empty list (and an exists-watch waits for it).
  While disconnected nothing is reported: the last list stands.
- ``Publication``: an ephemeral node kept present (created on every connect, re-created if
  deleted) until withdrawn.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("fastmesh.registry")

RECONNECT_MAX_DELAY_S = 1.0      # kazoo's connection back-off: 0.1 s doubling up to this
READ_TIMEOUT_S = 10.0
RETRY_AFTER_ERROR_S = 1.0


class _RateLimit(logging.Filter):
    """kazoo logs every failed reconnect attempt (one a second while ZooKeeper is down): at
    most `burst` records per message kind per `interval_s` get through."""

    def __init__(self, interval_s: float = 10.0, burst: int = 3):
        super().__init__()
        self.interval_s, self.burst = interval_s, burst
        self._windows: dict = {}

    def filter(self, record: logging.LogRecord) -> bool:
        import time
        key = str(record.msg)[:40]
        now = time.monotonic()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.interval_s:
            if len(self._windows) > 256:
                self._windows.clear()
            w = self._windows[key] = [now, 0]
        w[1] += 1
        return w[1] <= self.burst


_kazoo_log = logging.getLogger("fastmesh.registry.kazoo")
_kazoo_log.addFilter(_RateLimit())


class ZkClient:
    def __init__(self, loop, servers: str, session_timeout_ms: int, on_error):
        try:
            from kazoo.client import KazooClient
        except ImportError:
            raise RuntimeError("a ZooKeeper registry (discovery.zookeeper, publish.zookeeper) "
                               "needs the kazoo package: pip install kazoo") from None
        self.loop = loop
        self.servers = servers
        self.on_error = on_error            # (what, exception) -> None
        self.kz = KazooClient(
            hosts=servers, timeout=session_timeout_ms / 1000.0,
            connection_retry=dict(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.2,
                                  max_delay=RECONNECT_MAX_DELAY_S),
            command_retry=dict(max_tries=0), logger=_kazoo_log)
        self.state = "connecting"           # connecting | connected | suspended | lost
        self.connects = 0                   # sessions (re)established
        self.sessions_lost = 0
        self.users: list = []               # ChildrenWatch / Publication: .on_connected()
        self.closed = False
        self.kz.add_listener(self._on_state_thread)

    def start(self) -> None:
        self.kz.start_async()

    # -- kazoo threads -> loop

    def _on_state_thread(self, state) -> None:
        self._to_loop(self._on_state, str(state))
        return False                        # stay registered

    def _to_loop(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:                # the loop has closed: nobody is listening
            pass

    def _on_state(self, state: str) -> None:
        if self.closed:
            return
        if state == "CONNECTED":
            self.state = "connected"
            self.connects += 1
            log.info("registry: connected to ZooKeeper %s", self.servers)
            for u in list(self.users):
                u.on_connected()
        elif state == "SUSPENDED":
            self.state = "suspended"
            log.warning("registry: ZooKeeper %s unreachable; keeping the providers last known",
                        self.servers)
        elif state == "LOST":
            self.state = "lost"
            self.sessions_lost += 1
            log.warning("registry: ZooKeeper %s session lost; reconnecting", self.servers)

    def call(self, method: str, *args, **kw) -> asyncio.Future:
        """kazoo's <method>_async, as a future of this loop."""
        fut = self.loop.create_future()
        try:
            res = getattr(self.kz, method + "_async")(*args, **kw)
        except Exception as exc:            # kazoo refuses at once (closed, bad path)
            fut.set_exception(exc)
            return fut

        def settle(r):
            if fut.done():
                return
            if r.successful():
                fut.set_result(r.value)
            else:
                fut.set_exception(r.exception)
        res.rawlink(lambda r: self._to_loop(settle, r))
        return fut

    def watcher(self, fn):
        """A kazoo watch function that runs fn() on the loop."""
        return lambda event: self._to_loop(fn)

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def session_id(self):
        cid = self.kz.client_id
        return cid[0] if cid else None

    async def close(self, timeout_s: float = 3.0) -> None:
        """End the session (its ephemeral nodes go at once) and the threads, bounded."""
        if self.closed:
            return
        self.closed = True

        def stop():
            try:
                self.kz.stop()
                self.kz.close()
            except Exception:               # already stopped, or a socket error on the way
                pass
        try:
            await asyncio.wait_for(self.loop.run_in_executor(None, stop), timeout_s)
        except (asyncio.TimeoutError, RuntimeError):
            log.warning("registry: ZooKeeper %s session did not close in %.0f s", self.servers,
                        timeout_s)


class _Loop:
    """A task that redoes its work each time it is poked (pokes coalesce)."""

    def __init__(self, client: ZkClient):
        self.client = client
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._retry = None
        self.stopped = False

    def start(self) -> None:
        self.client.users.append(self)
        self._task = self.client.loop.create_task(self._run())
        if self.client.connected:
            self.poke()

    def on_connected(self) -> None:
        self.poke()

    def poke(self) -> None:
        if not self.stopped:
            self._dirty.set()

    def retry_later(self) -> None:
        if self._retry is None and not self.stopped:
            def again():
                self._retry = None
                self.poke()
            self._retry = self.client.loop.call_later(RETRY_AFTER_ERROR_S, again)

    def stop(self) -> None:
        self.stopped = True
        if self in self.client.users:
            self.client.users.remove(self)
        if self._retry is not None:
            self._retry.cancel()
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while not self.stopped:
            await self._dirty.wait()
            self._dirty.clear()
            if not self.client.connected:
                continue                    # the next connect pokes again
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.client.on_error(self.what(), exc)
                self.retry_later()

    async def once(self) -> None:
        raise NotImplementedError

    def what(self) -> str:
        raise NotImplementedError


class ChildrenWatch(_Loop):
    def __init__(self, client: ZkClient, path: str, on_children):
        super().__init__(client)
        self.path = path
        self.on_children = on_children      # (list of child names) -> None
        self.reads = 0
        self._watch = client.watcher(self.poke)

    def what(self) -> str:
        return f"watch {self.path}"

    async def once(self) -> None:
        from kazoo.exceptions import NoNodeError
        c = self.client
        try:
            children = await asyncio.wait_for(c.call("get_children", self.path, self._watch),
                                              READ_TIMEOUT_S)
        except NoNodeError:
            # no provider ever registered here: wait for the path to appear
            stat = await asyncio.wait_for(c.call("exists", self.path, self._watch),
                                          READ_TIMEOUT_S)
            if stat is not None:
                self.poke()
                return
            children = []
        self.reads += 1
        if not self.stopped:
            self.on_children(list(children))


class Publication(_Loop):
    def __init__(self, client: ZkClient, path: str):
        super().__init__(client)
        self.path = path
        self.created = 0
        self._watch = client.watcher(self.poke)

    def what(self) -> str:
        return f"publish {self.path}"

    async def once(self) -> None:
        from kazoo.exceptions import NodeExistsError
        c = self.client
        stat = await asyncio.wait_for(c.call("exists", self.path, self._watch), READ_TIMEOUT_S)
        if stat is not None or self.stopped:
            return                          # there; the watch tells us if it goes
        try:
            await asyncio.wait_for(c.call("create", self.path, b"", ephemeral=True,
                                          makepath=True), READ_TIMEOUT_S)
        except NodeExistsError:
            pass
        self.created += 1
        log.info("registry: published %s", self.path)
        await asyncio.wait_for(c.call("exists", self.path, self._watch), READ_TIMEOUT_S)

    async def withdraw(self, timeout_s: float = 2.0) -> None:
        """Stop keeping it and delete it (gone already is fine)."""
        from kazoo.exceptions import NoNodeError
        self.stop()
        if not self.client.connected:
            return                          # the session's end removes it
        try:
            await asyncio.wait_for(self.client.call("delete", self.path), timeout_s)
            log.info("registry: unpublished %s", self.path)
        except NoNodeError:
            pass
        except Exception as exc:
            self.client.on_error(f"unpublish {self.path}", exc)
