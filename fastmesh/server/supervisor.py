"""The supervisor: the control world of a fastmesh process generation.

It owns the listening sockets (opened once here, or received from the previous generation),
starts N worker processes that share them, serves the admin API, applies reloads, restarts
workers that die, and runs hot restarts (fastmesh.server.upgrade). Workers get config
snapshots and sockets over SEQPACKET socket pairs (fastmesh.server.ipc) and report counters
back; /stats sums them. Active health checks run here, one prober for the proxy
(fastmesh.health): every worker gets its verdicts, with each config and as they change.

Signals: SIGTERM drains (the listening sockets stop listening, so new clients are refused at
once; requests in progress finish; exit within drain_timeout_ms); SIGINT stops at once. SIGHUP
is ignored here and in the workers: hot restarts are run by the main process
(fastmesh.server.mainproc), which starts a new generation that takes over through the upgrade
socket. A signal that arrives while the generation is still starting is acted on once it has
started.
"""
from __future__ import annotations

import asyncio
import dataclasses
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
from fastmesh.health import HealthChecker
from fastmesh.listener import grow_socket_group, open_listening_socket, open_socket_group
from fastmesh.server import ipc, mainproc, upgrade

log = logging.getLogger("fastmesh.supervisor")

WORKER_START_TIMEOUT_S = 20.0
WORKER_POLL_S = 0.2
STATS_POLL_S = 1.0          # a worker's counters are snapshot this often (kept if it crashes)
REPLACE_DELAY_S = 0.3       # a worker draining on its own is replaced after this, unless the
                            # whole generation is stopping (a process-group SIGTERM)


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
    add_histograms(dst, src)


def add_histograms(dst: dict, src: dict) -> None:
    """Latency histograms (bucket counts + [sum µs]) add bucket by bucket."""
    hist = src.get("histograms")
    if not hist:
        return
    acc = dst.setdefault("histograms", {})
    for kind in ("listeners", "clusters"):
        per = acc.setdefault(kind, {})
        for name, h in (hist.get(kind) or {}).items():
            d = per.get(name)
            if d is None or len(d) != len(h):
                per[name] = list(h)
            else:
                per[name] = [a + b for a, b in zip(d, h)]


def latency_histograms(hist: dict) -> dict:
    """/stats form of the summed histograms: per listener and cluster the bucket counts
    (upper bounds in `bounds_us`, then the overflow bucket), count and sum."""
    from fastmesh._core.stats import LAT_BOUNDS_US
    out: dict = {"bounds_us": list(LAT_BOUNDS_US)}
    for kind in ("listeners", "clusters"):
        out[kind] = {name: {"counts": h[:-1], "count": sum(h[:-1]), "sum_us": h[-1]}
                     for name, h in (hist.get(kind) or {}).items()}
    return out


def default_upgrade_path(config_path: str) -> str:
    import hashlib
    digest = hashlib.sha1(os.path.abspath(config_path).encode()).hexdigest()[:12]
    return f"/tmp/fastmesh-{digest}.upgrade.sock"


def _addr_key(a: model.Address) -> str:
    return str(a)


def _bound(listeners) -> list:
    """The listeners that have sockets of their own (bind_to_port; the others only take
    connections handed over by a listener with use_original_dst)."""
    return [lc for lc in listeners if lc.bind_to_port]


def _close_groups(groups: dict) -> None:
    for group in groups.values():
        for s in group:
            s.close()


class InProcessWorker:
    """workers: 0: the data plane in the supervisor's own process and loop, driven over a
    socket pair exactly as a worker process is; this stands for the process (poll, signals,
    wait) where the supervisor expects one."""

    def __init__(self, loop, ctrl: socket.socket, index: int):
        from fastmesh.server.worker import Worker
        self.worker = Worker(loop, ctrl, index)
        self.worker.start()
        self.pid = os.getpid()
        self.returncode = None

    def poll(self):
        if self.returncode is None and self.worker.done.is_set():
            self.returncode = 0
        return self.returncode

    def send_signal(self, sig) -> None:
        if sig == signal.SIGTERM:
            self.worker.on_sigterm()
        else:
            self.worker._finish()

    def kill(self) -> None:
        self.worker._finish()

    def wait(self, timeout=None):
        if self.poll() is None:
            # its drain runs on this very loop: it cannot be waited for here
            raise subprocess.TimeoutExpired("in-process worker", timeout)
        return self.returncode


class WorkerHandle:
    def __init__(self, index: int, proc: subprocess.Popen, chan: ipc.Channel):
        self.index, self.proc, self.chan = index, proc, chan
        self.ready = False
        self.last_stats: dict | None = None     # latest counters (its final ones once sent)
        self.final = False                      # the worker sent its final counters
        self.absorbed = False                   # last_stats added to Supervisor.carried
        # the cluster models this worker holds (name -> model): those a new config shares
        # with it are not sent again
        self.clusters: dict = {}


class Supervisor:
    def __init__(self, cfg: model.Config, loop, *, config_path: str | None, loop_kind: str,
                 workers: int | None, upgrade_path: str | None, log_level: str = "info"):
        self.cfg = cfg
        self.loop = loop
        self.config_path = config_path
        self.loop_kind = loop_kind
        self.nworkers = workers if workers is not None else cfg.workers
        # workers: 0 (a sidecar's single process): the supervisor runs the data plane itself,
        # as worker 0 over the same message link; one socket per listener
        self.in_process = self.nworkers == 0
        self.nslots = max(1, self.nworkers)
        self.upgrade_path = upgrade_path
        self.log_level = log_level
        self.last_apply: dict = {}      # what the last config change sent the workers
        self.started = False
        # address -> its SO_REUSEPORT group of listening sockets (>= one per worker)
        self.sockets: dict[str, list] = {}
        self.admin_sock: socket.socket | None = None
        self.workers: list[WorkerHandle | None] = []
        self.retiring: list[WorkerHandle] = []          # replaced workers still draining
        self.generation = 1
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
        self._apply_lock = asyncio.Lock()
        self.xds = None                     # fastmesh.xds.source.XdsSource, when configured
        self._xds_inherited: dict | None = None
        self.bootstrap_doc = None           # the Envoy bootstrap as read (for config dumps)
        self.registry = None                # fastmesh.registry.source.RegistrySource
        self._registry_stop: asyncio.Task | None = None
        # active health checks: one prober for the whole proxy; verdicts go to every worker
        self.health = HealthChecker(loop, self._send_health, self._cluster_has_traffic)
        # the dashboard and its JSON API (fastmesh.dashboard): change timeline, live rates
        from fastmesh.dashboard import Observatory
        self.observatory = Observatory(self)
        self.change_source: str | None = None    # who asked for the config change under way

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        inherited = {}
        old_chan = None
        registry_state = None
        if self.upgrade_path:
            got = await upgrade.fetch_sockets(self.upgrade_path, self.loop)
            if got is not None:
                old_chan, inherited, self.generation, xds_state, registry_state = got
                log.info("upgrade: took %d listening sockets from the running generation",
                         sum(len(g) for g in inherited.values()))
                if self.cfg.xds is not None and xds_state:
                    self._inherit_xds(xds_state)
        if self._uses_registry(self.cfg) or registry_state:
            # providers from ZooKeeper: the first lists (or those the previous generation
            # served) fill the clusters before any worker serves
            from fastmesh.registry.source import RegistrySource
            self.registry = RegistrySource(self, inherited=registry_state)
            await self.registry.prepare(self.cfg)
            self.cfg = self.registry.fill(self.cfg)
        try:
            for lc in _bound(self.cfg.listeners):
                key = _addr_key(lc.address)
                group = inherited.pop(key, None)
                self.sockets[key] = (grow_socket_group(lc.address, group, self.nslots)
                                     if group else open_socket_group(lc.address, self.nslots))
            if self.cfg.admin is not None:
                key = _addr_key(self.cfg.admin.address)
                group = inherited.pop(key, None)
                self.admin_sock = group.pop(0) if group else open_listening_socket(
                    self.cfg.admin.address)
                if group:
                    inherited[key] = group
            for group in inherited.values():
                for s in group:
                    s.close()
            # as Envoy's start-up: the first round of health checks decides before serving
            self.health.sync(self.cfg)
            await self.health.first_round()
            for i in range(self.nslots):
                self.workers.append(None)
                await self._start_worker(i)
            if self.admin_sock is not None:
                self.admin = AdminServer(self)
                self.admin.register("POST", "/reload", self._admin_reload)
                await self.admin.start(None, None, sock=self.admin_sock.dup())
        except BaseException:
            self.health.stop()
            if self.registry is not None:
                await self.registry.stop()
            if old_chan is not None:
                old_chan.close()            # the old generation goes on serving
            self._kill_workers()
            raise
        if self.registry is not None:
            # published before the old generation (if any) withdraws its own
            self.registry.publish(self.cfg, self._bound_addresses())
            if old_chan is not None and not await self.registry.wait_published():
                log.warning("upgrade: this generation's services are not published yet "
                            "(registry unreachable); the previous generation withdraws its own")
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
        self._read_bootstrap()
        if self.cfg.xds is not None:
            # the control plane: static resources serve already; its pushes follow
            import functools
            from fastmesh.config.envoy import translate_composed
            from fastmesh.xds.source import XdsSource
            self.xds = XdsSource(self, self.cfg.xds,
                                 functools.partial(translate_composed, reuse_translations=True),
                                 inherited=self._xds_inherited)
            self.xds.start()
            if self.admin is not None:
                self.admin.register("GET", "/xds", self._admin_xds)
        if self.admin is not None:
            self.admin.register("GET", "/registry", self._admin_registry)
        self.started = True
        self.observatory.started()
        # start-up garbage (config parsing, imports) collected, and its pages given back
        import gc
        from fastmesh._core import buffer
        gc.collect()
        buffer.trim_now()
        log.info("fastmesh %s: generation %d serving (%d listeners, %d clusters, %d workers, "
                 "pid %d, main pid %d)", __version__, self.generation, len(self.cfg.listeners),
                 len(self.cfg.clusters), self.nworkers, os.getpid(), mainproc.main_pid())

    def _inherit_xds(self, xds_state: dict) -> None:
        """Serve what the control plane had sent the previous generation from the start, so
        a hot restart neither drops its listeners nor waits for the control plane."""
        from fastmesh.config.envoy import translate_composed
        from fastmesh.config.envoy.compose import State, compose
        try:
            state = State(dict(xds_state["resources"]))
            cfg = translate_composed(compose(self.cfg.xds.document, state).document,
                                     self.cfg.source)
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            log.warning("upgrade: the previous generation's xDS resources do not apply (%s); "
                        "starting from the file's static resources", exc)
            return
        self.cfg = dataclasses.replace(cfg, xds=self.cfg.xds)
        self._xds_inherited = xds_state
        log.info("upgrade: serving the previous generation's xDS resources (%s)",
                 ", ".join(f"{len(v)} {t.rsplit('.', 1)[-1]}"
                           for t, v in state.resources.items()))

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

    def _listener_fds(self, i: int, listeners=None, sockets=None) -> tuple[list, list]:
        """The listening sockets worker i serves: its share of each address's group (one
        name per descriptor)."""
        names, fds = [], []
        for lc in _bound(self.cfg.listeners if listeners is None else listeners):
            group = (self.sockets if sockets is None else sockets)[_addr_key(lc.address)]
            for j in range(i, len(group), self.nslots):
                names.append(lc.name)
                fds.append(group[j].fileno())
        return names, fds

    async def _start_worker(self, i: int) -> None:
        parent, child = ipc.socketpair()
        if self.in_process:
            proc = InProcessWorker(self.loop, child, i)
        else:
            # -P: never import fastmesh from the working directory (a source checkout there
            # would shadow the installed, compiled package)
            cmd = [sys.executable, "-P", "-m", "fastmesh.server.worker",
                   "--ctrl-fd", str(child.fileno()), "--index", str(i), "--loop",
                   self.loop_kind, "--log-level", self.log_level]
            proc = subprocess.Popen(cmd, pass_fds=[child.fileno()])
            child.close()
        chan = ipc.Channel(parent, self.loop)
        h = WorkerHandle(i, proc, chan)
        chan.on_message = lambda msg, fds: self._on_worker_message(h, msg, fds)
        self.workers[i] = h
        names, fds = self._listener_fds(i)
        health_version = self.health.version
        reply, _ = await chan.request(
            {"t": "config", "config": to_dict(self.cfg), "source": self.cfg.source,
             "listeners": names, "health": self.health.verdicts()}, fds,
            timeout_s=WORKER_START_TIMEOUT_S)
        if not reply.get("ok"):
            proc.kill()
            raise RuntimeError(f"worker {i} failed to start: {reply.get('error')}")
        h.clusters = self.cfg.clusters
        h.ready = True
        if self.health.version != health_version:
            self._send_health_to(h, self.health.verdicts(), everything=True)

    def _on_worker_message(self, h: WorkerHandle, msg: dict, fds: list) -> None:
        for fd in fds:
            os.close(fd)
        t = msg.get("t")
        if t == "final" and not h.absorbed:
            h.last_stats, h.final = msg.get("stats"), True
        elif t == "draining":
            # the worker was told to stop on its own (SIGTERM to its PID): it finishes its
            # requests while a new worker takes its sockets
            self.loop.call_later(REPLACE_DELAY_S, self._replace_draining, h)

    def _replace_draining(self, h: WorkerHandle) -> None:
        if self._stopping or h.index >= len(self.workers) or self.workers[h.index] is not h:
            return
        log.info("worker %d (pid %d) is draining on its own; starting its replacement",
                 h.index, h.proc.pid)
        self.retiring.append(h)
        self.workers[h.index] = None
        self.worker_restarts += 1
        self.loop.create_task(self._restart_worker(h.index))

    async def _restart_worker(self, i: int) -> None:
        try:
            await self._start_worker(i)
            log.info("worker %d restarted (pid %d)", i, self.workers[i].proc.pid)
        except Exception as exc:
            log.error("worker %d: restart failed: %s", i, exc)

    def _handles(self) -> list:
        return [h for h in self.workers if h is not None] + self.retiring

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
        await asyncio.gather(*[one(h) for h in self._handles()
                               if h.ready and h.proc.poll() is None])

    async def _watch_workers(self) -> None:
        next_snapshot = time.monotonic() + STATS_POLL_S
        while not self._stopping:
            await asyncio.sleep(WORKER_POLL_S)
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + STATS_POLL_S
                await self._snapshot_stats()
            for h in list(self.retiring):
                if h.proc.poll() is not None:
                    await self._wait_channels_closed([h], 0.5)
                    self._absorb(h)
                    h.chan.close()
                    self.retiring.remove(h)
                    log.info("worker pid %d drained and exited", h.proc.pid)
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
                await self._restart_worker(i)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> tuple[bool, list]:
        """Re-read the config file and apply it. On any error nothing changes."""
        if self.config_path is None:
            return False, ["no config file to reload (started without -c)"]
        self.change_source = "file reload"
        try:
            return await self._reload_file()
        finally:
            self.change_source = None

    async def _reload_file(self) -> tuple[bool, list]:
        try:
            cfg = load_file(self.config_path)
        except ConfigError as exc:
            self.reload_failures += 1
            return False, exc.errors
        if self.xds is not None:
            # the file's static resources change; what the control plane sent stays
            return await self.xds.reload_static(cfg)
        return await self.apply_config(cfg)

    async def apply_config(self, cfg: model.Config) -> tuple[bool, list]:
        """Apply a new config, whatever its source (file reload, control plane): every
        worker applies it, or nothing changes. One at a time."""
        async with self._apply_lock:
            return await self._apply_config(cfg)

    async def _on_every_worker(self, request_for) -> str | None:
        """Send every live worker its request (request_for(handle) -> awaitable reply) and
        wait for all; the first failure's reason, or None when all applied it."""
        results = await asyncio.gather(*[request_for(h) for h in self.workers if h is not None],
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                return str(r) or type(r).__name__
            if not r[0].get("ok"):
                return r[0].get("error")
        return None

    async def apply_endpoints(self, cfg: model.Config, updates: dict) -> tuple[bool, list]:
        """Only some clusters' endpoints change (EDS): each worker replaces those endpoint
        sets in place; nothing else is rebuilt. `cfg` is the config with them changed."""
        async with self._apply_lock:
            return await self._apply_endpoints_locked(cfg, updates)

    async def apply_endpoints_from(self, make) -> tuple[bool, list]:
        """As apply_endpoints, the change computed under the apply lock from the config
        current then (a reload may have changed it while this waited): make(cfg) ->
        (cfg, updates), or None when there is nothing to change."""
        async with self._apply_lock:
            got = make(self.cfg)
            if got is None:
                return True, []
            return await self._apply_endpoints_locked(*got)

    async def _apply_endpoints_locked(self, cfg: model.Config,
                                      updates: dict) -> tuple[bool, list]:
        health_version = self.health.version
        msg = {"t": "endpoints", "clusters": updates}
        if any(cfg.clusters[n].health_check is not None for n in updates):
            msg["health"] = self.health.preview(cfg)

        async def endpoints_for(h):
            reply = await h.chan.request(msg, timeout_s=10)
            if reply[0].get("ok"):
                h.clusters = dict(h.clusters, **{n: cfg.clusters[n] for n in updates})
            return reply
        error = await self._on_every_worker(endpoints_for)
        if error is not None:
            return False, [f"apply: {error}"]
        old_cfg, self.cfg = self.cfg, cfg
        self.version += 1
        self.observatory.config_changed(old_cfg, cfg)
        self._follow_health(health_version)
        return True, []

    @staticmethod
    def _uses_registry(cfg: model.Config) -> bool:
        return any(c.discovery is not None for c in cfg.clusters.values()) or any(
            lc.publish is not None for lc in cfg.listeners)

    def _bound_addresses(self) -> dict:
        """listener name -> (host, port) it is bound to (port 0 resolved)."""
        out = {}
        for lc in self.cfg.listeners:
            group = self.sockets.get(_addr_key(lc.address))
            if group:
                out[lc.name] = group[0].getsockname()[:2]
        return out

    async def _apply_config(self, cfg: model.Config) -> tuple[bool, list]:
        if self.registry is None and self._uses_registry(cfg):
            from fastmesh.registry.source import RegistrySource
            self.registry = RegistrySource(self)
        if self.registry is not None:
            # a new or changed discovery block is read before the config applies
            await self.registry.prepare(cfg)
            cfg = self.registry.fill(cfg)
        ok, errors = await self._apply_config_filled(cfg)
        if self.registry is not None:
            self.registry.sync(self.cfg)
            if not self._stopping:
                self.registry.publish(self.cfg, self._bound_addresses())
        return ok, errors

    async def _apply_config_filled(self, cfg: model.Config) -> tuple[bool, list]:
        errors = []
        if (cfg.admin.address if cfg.admin else None) != \
                (self.cfg.admin.address if self.cfg.admin else None):
            errors.append("admin.address: cannot change on reload (use a hot restart)")
        if errors:
            self.reload_failures += 1
            return False, errors
        new_socks = {}
        try:
            for lc in _bound(cfg.listeners):
                key = _addr_key(lc.address)
                if key not in self.sockets and key not in new_socks:
                    new_socks[key] = open_socket_group(lc.address, self.nslots)
        except OSError as exc:
            _close_groups(new_socks)
            self.reload_failures += 1
            return False, [f"listeners: {exc}"]
        # each worker gets the sockets of listeners that are new or moved
        old_by_name = {l.name: l for l in self.cfg.listeners}
        changed = [lc for lc in cfg.listeners
                   if lc.name not in old_by_name or old_by_name[lc.name].address != lc.address]
        all_socks = dict(self.sockets, **new_socks)

        # clusters every worker already holds (the very models) are named, not sent: a
        # control plane's update of a route or a listener leaves thousands of them alone
        live = [h for h in self.workers if h is not None]
        keep = {n for n, cl in cfg.clusters.items() if all(h.clusters.get(n) is cl for h in live)}
        plain = to_dict(cfg, except_clusters=keep)
        keep_names = sorted(keep)
        self.last_apply = {"clusters_sent": len(plain["clusters"]), "clusters_kept": len(keep)}
        health_version = self.health.version
        health = self.health.preview(cfg)

        async def config_for(h):
            names, fds = self._listener_fds(h.index, changed, all_socks)
            reply = await h.chan.request({"t": "config", "config": plain, "source": cfg.source,
                                          "keep_clusters": keep_names, "listeners": names,
                                          "health": health},
                                         fds, timeout_s=10)
            if reply[0].get("ok"):
                h.clusters = cfg.clusters
            return reply
        error = await self._on_every_worker(config_for)
        if error is not None:
            # workers apply all-or-nothing; one that failed keeps its old config
            self.reload_failures += 1
            _close_groups(new_socks)
            return False, [f"apply: {error}"]
        self.sockets.update(new_socks)
        keep = {_addr_key(lc.address) for lc in _bound(cfg.listeners)}
        for key in list(self.sockets):
            if key not in keep:
                # the workers have stopped it listening; they drain their own copies
                _close_groups({key: self.sockets.pop(key)})
        old_cfg, self.cfg = self.cfg, cfg
        self.version += 1
        self.reloads += 1
        self.observatory.config_changed(old_cfg, cfg)
        self._follow_health(health_version)
        if self.xds is None:
            self._read_bootstrap()
        log.info("reload: config version %d applied", self.version)
        return True, []

    # ------------------------------------------------------------------ health checks

    def _follow_health(self, version_before: int) -> None:
        """After a config or endpoint change: the prober follows the new config; workers
        get every verdict again if any moved while they were applying it."""
        self.health.sync(self.cfg)
        if self.health.version != version_before:
            verdicts = self.health.verdicts()
            for h in self.workers:
                if h is not None and h.ready:
                    self._send_health_to(h, verdicts, everything=True)

    def _send_health(self, names: list) -> None:
        """The prober's verdicts for these clusters changed: every worker gets them."""
        if self._stopping:
            return
        verdicts = self.health.verdicts()
        clusters = {n: verdicts.get(n, {}) for n in names}
        for h in self.workers:
            if h is not None and h.ready:
                self._send_health_to(h, clusters)

    def _send_health_to(self, h: WorkerHandle, clusters: dict, everything=False) -> None:
        async def send():
            try:
                reply, _ = await h.chan.request({"t": "health", "clusters": clusters,
                                                 "all": everything}, timeout_s=5)
                if not reply.get("ok"):
                    log.warning("worker %d: health verdicts refused: %s", h.index,
                                reply.get("error"))
            except (asyncio.TimeoutError, ipc.ChannelClosed, OSError) as exc:
                # a worker that died gets every verdict again when it is restarted
                log.debug("worker %d: health verdicts not delivered: %s", h.index, exc)
        self.loop.create_task(send())

    def _cluster_has_traffic(self, name: str) -> bool:
        """Has the cluster carried any request (as Envoy: an upstream connection)? From the
        workers' latest counters, read every STATS_POLL_S."""
        for st in [h.last_stats for h in self._handles()] + [self.carried]:
            c = ((st or {}).get("clusters") or {}).get(name)
            if c and (c.get("upstream_cx_total") or c.get("upstream_rq_total")):
                return True
        return False

    async def set_log_levels(self, levels: dict) -> str | None:
        """Admin POST /logging: here, then in every worker (and in those started later)."""
        for name, level in levels.items():
            logging.getLogger(name or None).setLevel(level.upper())
        if "" in levels:
            self.log_level = levels[""]
        log.debug("log levels set: %s", levels)
        return await self._on_every_worker(
            lambda h: h.chan.request({"t": "logging", "levels": levels}, timeout_s=5))

    async def _admin_xds(self, body: bytes):
        import json
        out = dict(self.xds.status(), last_apply=self.last_apply)
        return 200, "application/json", (json.dumps(out, indent=2) + "\n").encode()

    async def _admin_registry(self, body: bytes):
        import json
        out = self.registry.status() if self.registry is not None else {}
        return 200, "application/json", (json.dumps(out, indent=2) + "\n").encode()

    async def _admin_reload(self, body: bytes):
        import json
        ok, errors = await self.reload()
        out = {"ok": ok, "version": self.version, "errors": errors}
        return (200 if ok else 400), "application/json", (json.dumps(out, indent=2) + "\n").encode()

    # ------------------------------------------------------------------ upgrade

    def handover_sockets(self) -> tuple[list, list]:
        addrs, socks = [], []
        for key, group in self.sockets.items():
            for s in group:
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
        self._stop_xds()
        self.health.stop()
        if self.registry is not None:
            await self.registry.unpublish()
        if self.admin is not None:
            self.admin.close()
        await asyncio.gather(*[
            h.chan.request({"t": "handover", "migrate_path": migrate_path,
                            "timeout_ms": self.cfg.drain_timeout_ms}, timeout_s=5)
            for h in self._handles()], return_exceptions=True)
        await self._wait_workers_exit(self.cfg.drain_timeout_ms / 1000.0 + 5)
        live = self._handles()
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

    async def adopt_connection(self, listener: str, fd: int, data: bytes,
                               chain: str | None = None) -> None:
        live = [h for h in self.workers if h is not None and h.ready]
        if not live:
            raise RuntimeError("no worker to take the connection")
        self._rr += 1
        h = live[self._rr % len(live)]
        reply, _ = await h.chan.request({"t": "adopt", "listener": listener, "data": data,
                                         "chain": chain}, [fd], timeout_s=5)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))

    # ------------------------------------------------------------------ stop

    async def drain_and_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_xds()
        self.health.stop()
        if self.registry is not None:
            # callers that find us in the registry stop picking us before we stop listening
            await self.registry.unpublish()
        log.info("draining (up to %d ms); listeners closed to new connections",
                 self.cfg.drain_timeout_ms)
        if self.upgrade_server is not None:
            self.upgrade_server.close(unlink=True)
        # nobody takes these sockets over: the workers serve what the kernel has queued and
        # stop them listening; our copies go now
        _close_groups(self.sockets)
        self.sockets = {}
        await asyncio.gather(*[
            h.chan.request({"t": "drain", "timeout_ms": self.cfg.drain_timeout_ms,
                            "close_listeners": True}, timeout_s=5)
            for h in self._handles()], return_exceptions=True)
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
            if all(h.proc.poll() is not None for h in self._handles()):
                return
            await asyncio.sleep(0.05)
        self._kill_workers(signal.SIGKILL)

    def _kill_workers(self, sig=signal.SIGKILL) -> None:
        for h in self._handles():
            if h.proc.poll() is None:
                try:
                    h.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        for h in self._handles():
            if h is not None:
                try:
                    h.proc.wait(5)
                except subprocess.TimeoutExpired:
                    h.proc.kill()

    def _stop_xds(self) -> None:
        if self.xds is not None:
            self.xds.stop()

    def _finish(self) -> None:
        self.observatory.stop()
        self._stop_xds()
        self.health.stop()
        if self.registry is not None:
            registry, self.registry = self.registry, None
            self._registry_stop = self.loop.create_task(registry.stop())
        if self._monitor is not None:
            self._monitor.cancel()
        if self.admin is not None:
            self.admin.close()
        for h in self._handles():
            h.chan.close()
        _close_groups(self.sockets)
        if self.admin_sock is not None:
            self.admin_sock.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
        if self._registry_stop is not None:
            # the registry sessions end (their ephemeral nodes with them), bounded
            await asyncio.wait([self._registry_stop], timeout=5)

    # ------------------------------------------------------------------ admin answers

    def is_ready(self) -> bool:
        return not self._stopping and all(h is not None and h.ready for h in self.workers)

    async def _gather(self, t: str) -> list:
        res = await asyncio.gather(*[h.chan.request({"t": t}, timeout_s=5)
                                     for h in self._handles() if h.ready],
                                   return_exceptions=True)
        return [r[0] for r in res if not isinstance(r, BaseException) and r[0].get("ok")]

    async def stats(self) -> dict:
        per_worker = [r["stats"] for r in await self._gather("stats")]
        totals: dict = {"listeners": {}, "clusters": {}}
        add_counters(totals, self.carried)
        for st in per_worker:
            add_counters(totals, st, skip=())
        listeners, clusters = totals["listeners"], totals["clusters"]
        for name, hc in self.health.stats().items():
            clusters.setdefault(name, {}).update(hc)
        if self.registry is not None:
            for name, rc in self.registry.stats().items():
                clusters.setdefault(name, {}).update(rc)
        # how the kernel spread connections over this generation's live workers
        spread = []
        for st in per_worker:
            ls = (st.get("listeners") or {}).values()
            spread.append({"pid": st.get("pid"), "index": st.get("index"),
                           "downstream_cx_total": sum(c.get("downstream_cx_total", 0) for c in ls),
                           "downstream_cx_active": sum(c.get("downstream_cx_active", 0)
                                                       for c in ls),
                           "engine": st.get("engine")})     # its I/O engine and counters
        out = {
            "server": {"version": __version__, "pid": mainproc.main_pid(),
                       "supervisor_pid": os.getpid(), "generation": self.generation,
                       "uptime_s": round(time.time() - self.started_at, 3),
                       "config_version": self.version, "workers": len(self.workers),
                       "worker_pids": [h.proc.pid for h in self.workers if h is not None],
                       "worker_connections": sorted(spread, key=lambda w: (w["index"] is None,
                                                                          w["index"] or 0)),
                       "worker_restarts": self.worker_restarts, "reloads": self.reloads,
                       "reload_failures": self.reload_failures},
            "listeners": listeners,
            "clusters": clusters,
        }
        out["latency_histograms"] = latency_histograms(totals.get("histograms") or {})
        return out

    def listeners_info(self) -> dict:
        out = {}
        for lc in self.cfg.listeners:
            group = self.sockets.get(_addr_key(lc.address))
            addr = group[0].getsockname() if group else None
            out[lc.name] = {"state": "running" if not self._stopping else "stopped",
                            "protocol": lc.protocol,
                            "address": f"{addr[0]}:{addr[1]}" if addr else None}
        return out

    async def clusters_info(self) -> dict:
        per_worker = [r["clusters"] for r in await self._gather("clusters")]
        from fastmesh.registry.report import annotate_clusters
        for info in per_worker:
            annotate_clusters(self, info)
        return per_worker[0] if len(per_worker) == 1 else {"workers": per_worker}

    def config_dump(self) -> dict:
        from fastmesh.registry.report import endpoint_sources
        from fastmesh.config.envoy.dump import redact
        return {"version": self.version, "source": self.cfg.source,
                "config": redact(to_dict(self.cfg)), "endpoint_sources": endpoint_sources(self)}

    def envoy_config_dump(self) -> dict | None:
        """Envoy's ConfigDump shape, for a proxy configured by an Envoy bootstrap."""
        from fastmesh.config.envoy.dump import config_dump
        if self.xds is not None:
            types = self.xds.client.types if self.xds.client is not None else {}
            return config_dump(self.xds.static, self.started_at, self.xds.state.resources,
                               {t: s.version for t, s in types.items()},
                               {t: s.updated_at for t, s in types.items()})
        if self.bootstrap_doc is None:
            return None
        return config_dump(self.bootstrap_doc, self.started_at)

    def _read_bootstrap(self) -> None:
        if self.config_path is not None:
            from fastmesh.config.envoy.dump import read_bootstrap
            self.bootstrap_doc = read_bootstrap(self.config_path)


def install_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif kind != "asyncio":
        raise ValueError(f"unknown loop {kind!r}")


def serve(cfg: model.Config, *, config_path=None, loop_kind="uvloop", workers=None,
          upgrade_path=None, log_level="info", before_start=None,
          early_signals: list | None = None) -> int:
    """Run one generation until it stops. early_signals: TERM/INT that reached the process
    before this (`fastmesh run` catches them from its first instruction)."""
    # hot restarts belong to the main process; the workers inherit the ignored disposition
    # from the moment they exist, so a HUP sent to the process group can never kill them
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    install_loop(loop_kind)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        pending = early_signals if early_signals is not None else []
        sup: Supervisor | None = None

        def on_signal(signum):
            if sup is None or not sup.started:
                log.info("%s while starting: acted on once started",
                         signal.Signals(signum).name)
                pending.append(signum)
            elif signum == signal.SIGTERM:
                loop.create_task(sup.drain_and_stop())
            else:
                sup.stop_now()
        # installed before anything else can take time: a signal during start-up is deferred
        loop.add_signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
        if before_start is not None:
            await before_start()
        sup = Supervisor(cfg, loop, config_path=config_path, loop_kind=loop_kind,
                         workers=workers, upgrade_path=upgrade_path, log_level=log_level)
        try:
            await sup.start()
        except Exception as exc:
            log.error("cannot start: %s", exc)
            return 1
        mainproc.report_ready()
        for signum in pending:
            on_signal(signum)
        await sup.wait_stopped()
        log.info("stopped")
        return 0

    return asyncio.run(main())
