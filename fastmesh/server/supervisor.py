"""The supervisor: the control world of a fastmesh process generation.

It owns the listening sockets (opened once here, or received from the previous generation),
starts N worker processes that share them, serves the admin API, applies reloads, restarts
workers that die, and runs hot restarts (fastmesh.server.upgrade). Workers get config
snapshots and sockets over SEQPACKET socket pairs (fastmesh.server.ipc) and report counters
back; /stats sums them.

Signals: SIGTERM drains (stop accepting, finish requests, exit within drain_timeout_ms);
SIGINT stops at once; SIGHUP hot-restarts into a new process running the same command.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from fastmesh import __version__
from fastmesh._core.stats import GAUGE_SLOTS
from fastmesh.admin import AdminServer
from fastmesh.config import model
from fastmesh.config.load import ConfigError, load_file, to_dict
from fastmesh.listener import open_listening_socket
from fastmesh.server import ipc, upgrade

log = logging.getLogger("fastmesh.supervisor")

WORKER_START_TIMEOUT_S = 20.0
WORKER_POLL_S = 0.2
STATS_POLL_S = 1.0          # a worker's counters are snapshot this often (kept if it crashes)


def add_counters(dst: dict, src: dict, skip=GAUGE_SLOTS) -> None:
    """Gauges describe the present: only counters carry over from an exited worker or
    generation (skip=() to sum everything, as /stats does for live workers)."""
    for kind in ("listeners", "clusters"):
        acc = dst.setdefault(kind, {})
        for name, counters in (src.get(kind) or {}).items():
            d = acc.setdefault(name, {})
            for k, v in counters.items():
                if k not in skip:
                    d[k] = d.get(k, 0) + v


def default_upgrade_path(config_path: str) -> str:
    digest = hashlib.sha1(os.path.abspath(config_path).encode()).hexdigest()[:12]
    return f"/tmp/fastmesh-{digest}.upgrade.sock"


def _addr_key(a: model.Address) -> str:
    return str(a)


class WorkerHandle:
    def __init__(self, index: int, proc: subprocess.Popen, chan: ipc.Channel):
        self.index, self.proc, self.chan = index, proc, chan
        self.ready = False
        self.last_stats: dict | None = None     # latest counters (its final ones once sent)
        self.final = False                      # the worker sent its final counters
        self.absorbed = False                   # last_stats added to Supervisor.carried


class Supervisor:
    def __init__(self, cfg: model.Config, loop, *, config_path: str | None, loop_kind: str,
                 workers: int | None, upgrade_path: str | None, log_level: str = "info",
                 argv: list | None = None):
        self.cfg = cfg
        self.loop = loop
        self.config_path = config_path
        self.loop_kind = loop_kind
        self.nworkers = workers or cfg.workers
        self.upgrade_path = upgrade_path
        self.log_level = log_level
        self.argv = argv
        self.sockets: dict[str, socket.socket] = {}     # address -> listening socket
        self.admin_sock: socket.socket | None = None
        self.workers: list[WorkerHandle | None] = []
        self.admin: AdminServer | None = None
        self.upgrade_server: upgrade.UpgradeServer | None = None
        self.migrate_server: upgrade.MigrateServer | None = None
        self.started_at = time.time()
        self.version = 1
        self.worker_restarts = 0
        self.reloads = 0
        self.reload_failures = 0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._monitor: asyncio.Task | None = None
        self._rr = 0
        # counters of exited workers and of previous generations, added to every /stats
        self.carried: dict = {"listeners": {}, "clusters": {}}
        self._inherit_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        inherited = {}
        old_chan = None
        if self.upgrade_path:
            got = await upgrade.fetch_sockets(self.upgrade_path, self.loop)
            if got is not None:
                old_chan, inherited = got
                log.info("upgrade: took %d listening sockets from the running generation",
                         len(inherited))
        try:
            for lc in self.cfg.listeners:
                key = _addr_key(lc.address)
                self.sockets[key] = inherited.pop(key, None) or open_listening_socket(lc.address)
            if self.cfg.admin is not None:
                key = _addr_key(self.cfg.admin.address)
                self.admin_sock = inherited.pop(key, None) or open_listening_socket(
                    self.cfg.admin.address)
            for s in inherited.values():
                s.close()
            for i in range(self.nworkers):
                self.workers.append(None)
                await self._start_worker(i)
            if self.admin_sock is not None:
                self.admin = AdminServer(self)
                self.admin.register("POST", "/reload", self._admin_reload)
                await self.admin.start(None, None, sock=self.admin_sock.dup())
        except BaseException:
            if old_chan is not None:
                old_chan.close()            # the old generation goes on serving
            self._kill_workers()
            raise
        if old_chan is not None:
            migrate_path = self.upgrade_path + ".migrate"
            self.migrate_server = upgrade.MigrateServer(self, migrate_path, self.loop)
            self.migrate_server.start()
            old_chan.send({"t": "accepting", "migrate_path": migrate_path})
            self.loop.call_later(self.cfg.drain_timeout_ms / 1000.0 + 30,
                                 self.migrate_server.close)
            self._inherit_task = self.loop.create_task(self._inherit_counters(old_chan))
        if self.upgrade_path:
            self.upgrade_server = upgrade.UpgradeServer(self, self.upgrade_path, self.loop)
            self.upgrade_server.start()
        self._monitor = self.loop.create_task(self._watch_workers())
        log.info("fastmesh %s: serving (%d listeners, %d clusters, %d workers, pid %d)",
                 __version__, len(self.cfg.listeners), len(self.cfg.clusters), self.nworkers,
                 os.getpid())

    async def _inherit_counters(self, chan: ipc.Channel) -> None:
        """The previous generation sends its counters when its last worker has drained."""
        try:
            msg, fds = await chan.recv(timeout_s=self.cfg.drain_timeout_ms / 1000.0 + 15)
            for fd in fds:
                os.close(fd)
            if msg.get("t") == "counters":
                add_counters(self.carried, msg.get("stats") or {})
                log.info("upgrade: the previous generation's counters carried over")
        except (asyncio.TimeoutError, ipc.ChannelClosed, OSError):
            log.warning("upgrade: no counters from the previous generation; its totals are "
                        "not in /stats")
        finally:
            chan.close()

    def _listener_fds(self) -> tuple[list, list]:
        names, fds = [], []
        for lc in self.cfg.listeners:
            names.append(lc.name)
            fds.append(self.sockets[_addr_key(lc.address)].fileno())
        return names, fds

    async def _start_worker(self, i: int) -> None:
        parent, child = ipc.socketpair()
        # -P: never import fastmesh from the working directory (a source checkout there
        # would shadow the installed, compiled package)
        cmd = [sys.executable, "-P", "-m", "fastmesh.server.worker",
               "--ctrl-fd", str(child.fileno()), "--index", str(i), "--loop", self.loop_kind,
               "--log-level", self.log_level]
        proc = subprocess.Popen(cmd, pass_fds=[child.fileno()])
        child.close()
        chan = ipc.Channel(parent, self.loop)
        h = WorkerHandle(i, proc, chan)
        chan.on_message = lambda msg, fds: self._on_worker_message(h, msg, fds)
        self.workers[i] = h
        names, fds = self._listener_fds()
        reply, _ = await chan.request(
            {"t": "config", "config": to_dict(self.cfg), "source": self.cfg.source,
             "listeners": names}, fds, timeout_s=WORKER_START_TIMEOUT_S)
        if not reply.get("ok"):
            proc.kill()
            raise RuntimeError(f"worker {i} failed to start: {reply.get('error')}")
        h.ready = True

    def _on_worker_message(self, h: WorkerHandle, msg: dict, fds: list) -> None:
        for fd in fds:
            os.close(fd)
        if msg.get("t") == "final" and not h.absorbed:
            h.last_stats, h.final = msg.get("stats"), True

    def _absorb(self, h: WorkerHandle) -> None:
        """An exited worker's counters (final, or the last snapshot if it crashed) join
        `carried`, once."""
        if h.absorbed or h.last_stats is None:
            return
        add_counters(self.carried, h.last_stats)
        h.absorbed = True

    async def _snapshot_stats(self) -> None:
        async def one(h):
            try:
                reply, _ = await h.chan.request({"t": "stats"}, timeout_s=2)
            except (asyncio.TimeoutError, ipc.ChannelClosed, OSError):
                return
            if reply.get("ok") and not h.final:
                h.last_stats = reply["stats"]
        await asyncio.gather(*[one(h) for h in self.workers
                               if h is not None and h.ready and h.proc.poll() is None])

    async def _watch_workers(self) -> None:
        next_snapshot = time.monotonic() + STATS_POLL_S
        while not self._stopping:
            await asyncio.sleep(WORKER_POLL_S)
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + STATS_POLL_S
                await self._snapshot_stats()
            for i, h in enumerate(self.workers):
                if h is None or self._stopping or h.proc.poll() is None:
                    continue
                self.worker_restarts += 1
                log.error("worker %d (pid %d) exited with %s; restarting", i, h.proc.pid,
                          h.proc.returncode)
                await self._wait_channels_closed([h], 0.5)
                self._absorb(h)
                h.chan.close()
                self.workers[i] = None
                try:
                    await self._start_worker(i)
                    log.info("worker %d restarted (pid %d)", i, self.workers[i].proc.pid)
                except Exception as exc:
                    log.error("worker %d: restart failed: %s", i, exc)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> tuple[bool, list]:
        """Re-read the config file and apply it. On any error nothing changes."""
        if self.config_path is None:
            return False, ["no config file to reload (started without -c)"]
        try:
            cfg = load_file(self.config_path)
        except ConfigError as exc:
            self.reload_failures += 1
            return False, exc.errors
        errors = []
        if (cfg.admin.address if cfg.admin else None) != \
                (self.cfg.admin.address if self.cfg.admin else None):
            errors.append("admin.address: cannot change on reload (use a hot restart)")
        if errors:
            self.reload_failures += 1
            return False, errors
        new_socks = {}
        try:
            for lc in cfg.listeners:
                key = _addr_key(lc.address)
                if key not in self.sockets and key not in new_socks:
                    new_socks[key] = open_listening_socket(lc.address)
        except OSError as exc:
            for s in new_socks.values():
                s.close()
            self.reload_failures += 1
            return False, [f"listeners: {exc}"]
        # each worker gets the sockets of listeners that are new or moved
        old_by_name = {l.name: l for l in self.cfg.listeners}
        changed = [lc for lc in cfg.listeners
                   if lc.name not in old_by_name or old_by_name[lc.name].address != lc.address]
        all_socks = dict(self.sockets, **new_socks)
        names = [lc.name for lc in changed]
        fds = [all_socks[_addr_key(lc.address)].fileno() for lc in changed]
        results = await asyncio.gather(*[
            h.chan.request({"t": "config", "config": to_dict(cfg), "source": cfg.source,
                            "listeners": names}, fds, timeout_s=10)
            for h in self.workers if h is not None], return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException) or not r[0].get("ok")]
        if failed:
            # workers apply all-or-nothing; one that failed keeps its old config
            self.reload_failures += 1
            err = failed[0]
            msg = str(err) if isinstance(err, BaseException) else err[0].get("error")
            for s in new_socks.values():
                s.close()
            return False, [f"apply: {msg}"]
        self.sockets.update(new_socks)
        keep = {_addr_key(lc.address) for lc in cfg.listeners}
        for key in list(self.sockets):
            if key not in keep:
                self.sockets.pop(key).close()   # workers still drain their own copies
        self.cfg = cfg
        self.version += 1
        self.reloads += 1
        log.info("reload: config version %d applied", self.version)
        return True, []

    async def _admin_reload(self, body: bytes):
        import json
        ok, errors = await self.reload()
        out = {"ok": ok, "version": self.version, "errors": errors}
        return (200 if ok else 400), "application/json", (json.dumps(out, indent=2) + "\n").encode()

    # ------------------------------------------------------------------ upgrade

    def handover_sockets(self) -> tuple[list, list]:
        addrs, socks = [], []
        for key, s in self.sockets.items():
            addrs.append(key)
            socks.append(s)
        if self.admin_sock is not None and self.cfg.admin is not None:
            addrs.append(_addr_key(self.cfg.admin.address))
            socks.append(self.admin_sock)
        return addrs, socks

    async def hand_over(self, migrate_path: str, chan: ipc.Channel | None = None) -> None:
        """The new generation accepts: stop accepting, migrate, drain, exit; last, send the
        counters of this generation (and those it inherited) to the new one over `chan`."""
        self._stopping = True
        if self.admin is not None:
            self.admin.close()
        await asyncio.gather(*[
            h.chan.request({"t": "handover", "migrate_path": migrate_path,
                            "timeout_ms": self.cfg.drain_timeout_ms}, timeout_s=5)
            for h in self.workers if h is not None], return_exceptions=True)
        await self._wait_workers_exit(self.cfg.drain_timeout_ms / 1000.0 + 5)
        live = [h for h in self.workers if h is not None]
        await self._wait_channels_closed(live, 1.0)
        for h in live:
            self._absorb(h)
        if self._inherit_task is not None and not self._inherit_task.done():
            # replaced while the generation before us still drains: pass its totals on too
            try:
                await asyncio.wait_for(asyncio.shield(self._inherit_task),
                                       self.cfg.drain_timeout_ms / 1000.0 + 15)
            except asyncio.TimeoutError:
                pass
        if chan is not None and not chan.closed:
            try:
                chan.send({"t": "counters", "stats": self.carried})
            except OSError:
                pass
        log.info("upgrade: handed over; exiting")
        self._finish()

    async def adopt_connection(self, listener: str, fd: int, data: bytes) -> None:
        live = [h for h in self.workers if h is not None and h.ready]
        if not live:
            raise RuntimeError("no worker to take the connection")
        self._rr += 1
        h = live[self._rr % len(live)]
        reply, _ = await h.chan.request({"t": "adopt", "listener": listener, "data": data},
                                        [fd], timeout_s=5)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))

    def spawn_new_generation(self) -> None:
        """SIGHUP: start the same command again; it takes over through the upgrade socket."""
        if not self.upgrade_path or not self.argv:
            log.error("SIGHUP: no upgrade socket; ignoring")
            return
        log.info("SIGHUP: starting a new generation")
        try:
            subprocess.Popen(self.argv, start_new_session=False)
        except OSError as exc:
            log.error("SIGHUP: could not start the new generation: %s; still serving", exc)

    # ------------------------------------------------------------------ stop

    async def drain_and_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("draining (up to %d ms)", self.cfg.drain_timeout_ms)
        if self.upgrade_server is not None:
            self.upgrade_server.close(unlink=True)
        await asyncio.gather(*[
            h.chan.request({"t": "drain", "timeout_ms": self.cfg.drain_timeout_ms}, timeout_s=5)
            for h in self.workers if h is not None], return_exceptions=True)
        await self._wait_workers_exit(self.cfg.drain_timeout_ms / 1000.0 + 2)
        self._finish()

    def stop_now(self) -> None:
        self._stopping = True
        if self.upgrade_server is not None:
            self.upgrade_server.close(unlink=True)
        self._kill_workers(signal.SIGINT)
        self._finish()

    async def _wait_channels_closed(self, handles: list, timeout_s: float) -> None:
        """Give exited workers' links time to deliver what is left in them (a final message
        comes before the end of the stream)."""
        deadline = time.monotonic() + timeout_s
        for h in handles:
            h.chan.start_reading()
        while time.monotonic() < deadline and not all(h.chan.closed or h.final
                                                      for h in handles):
            await asyncio.sleep(0.02)

    async def _wait_workers_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(h is None or h.proc.poll() is not None for h in self.workers):
                return
            await asyncio.sleep(0.05)
        self._kill_workers(signal.SIGKILL)

    def _kill_workers(self, sig=signal.SIGKILL) -> None:
        for h in self.workers:
            if h is not None and h.proc.poll() is None:
                try:
                    h.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        for h in self.workers:
            if h is not None:
                try:
                    h.proc.wait(5)
                except subprocess.TimeoutExpired:
                    h.proc.kill()

    def _finish(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self.admin is not None:
            self.admin.close()
        for h in self.workers:
            if h is not None:
                h.chan.close()
        for s in self.sockets.values():
            s.close()
        if self.admin_sock is not None:
            self.admin_sock.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ------------------------------------------------------------------ admin answers

    def is_ready(self) -> bool:
        return not self._stopping and all(h is not None and h.ready for h in self.workers)

    async def _gather(self, t: str) -> list:
        res = await asyncio.gather(*[h.chan.request({"t": t}, timeout_s=5)
                                     for h in self.workers if h is not None and h.ready],
                                   return_exceptions=True)
        return [r[0] for r in res if not isinstance(r, BaseException) and r[0].get("ok")]

    async def stats(self) -> dict:
        per_worker = [r["stats"] for r in await self._gather("stats")]
        totals: dict = {"listeners": {}, "clusters": {}}
        add_counters(totals, self.carried)
        for st in per_worker:
            add_counters(totals, st, skip=())
        listeners, clusters = totals["listeners"], totals["clusters"]
        return {
            "server": {"version": __version__, "pid": os.getpid(),
                       "uptime_s": round(time.time() - self.started_at, 3),
                       "config_version": self.version, "workers": len(self.workers),
                       "worker_pids": [h.proc.pid for h in self.workers if h is not None],
                       "worker_restarts": self.worker_restarts, "reloads": self.reloads,
                       "reload_failures": self.reload_failures},
            "listeners": listeners,
            "clusters": clusters,
        }

    def listeners_info(self) -> dict:
        out = {}
        for lc in self.cfg.listeners:
            s = self.sockets.get(_addr_key(lc.address))
            addr = s.getsockname() if s is not None else None
            out[lc.name] = {"state": "running" if not self._stopping else "stopped",
                            "protocol": lc.protocol,
                            "address": f"{addr[0]}:{addr[1]}" if addr else None}
        return out

    async def clusters_info(self) -> dict:
        per_worker = [r["clusters"] for r in await self._gather("clusters")]
        return per_worker[0] if len(per_worker) == 1 else {"workers": per_worker}

    def config_dump(self) -> dict:
        return {"version": self.version, "source": self.cfg.source, "config": to_dict(self.cfg)}


def install_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif kind != "asyncio":
        raise ValueError(f"unknown loop {kind!r}")


def serve(cfg: model.Config, *, config_path=None, loop_kind="uvloop", workers=None,
          upgrade_path=None, log_level="info", argv=None, before_start=None) -> int:
    install_loop(loop_kind)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        if before_start is not None:
            await before_start()
        sup = Supervisor(cfg, loop, config_path=config_path, loop_kind=loop_kind,
                         workers=workers, upgrade_path=upgrade_path, log_level=log_level,
                         argv=argv)
        try:
            await sup.start()
        except Exception as exc:
            log.error("cannot start: %s", exc)
            return 1
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(sup.drain_and_stop()))
        loop.add_signal_handler(signal.SIGINT, sup.stop_now)
        loop.add_signal_handler(signal.SIGHUP, sup.spawn_new_generation)
        await sup.wait_stopped()
        log.info("stopped")
        return 0

    return asyncio.run(main())
