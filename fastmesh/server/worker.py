"""A worker process: one event loop running a DataPlane, driven by its supervisor over a
SEQPACKET socket pair (fastmesh.server.ipc).

Started by the supervisor as ``python -m fastmesh.server.worker --ctrl-fd N --loop uvloop``.
Messages it takes (each answered with ``{"t": "reply", "ok": ...}``):

    config    {"config": <config map>, "keep_clusters": [names], "listeners": [names],
              "health": {cluster: {"host:port": failed}}} + one listening fd per name (a name
              repeats when the worker serves several sockets of its address's group); the
              clusters named in keep_clusters are not in the config map: the worker keeps its
              own, unchanged; health (optional): every active health check verdict, applied
              before the listeners serve this config
    stats     -> {"stats": {...}}
    clusters  -> {"clusters": {...}}
    endpoints {"clusters": {name: ["host:port", ...] or {"endpoints": [...], "weights":
              [...]}}}: new endpoint sets for some clusters (EDS); pools to endpoints that
              stay are kept; "health" as in config, optional
    health    {"clusters": {name: {"host:port": failed}}, "all": bool}: the supervisor's
              active health check verdicts, the whole set for each cluster named (all: for
              every cluster, those not named have no failed endpoint)
    drain     {"timeout_ms", "close_listeners"}: stop accepting (close_listeners: serve what
              the kernel queued, then stop the sockets listening), finish connections, exit
    handover  {"migrate_path", "timeout_ms"}: stop accepting; hand idle Bolt connections to
              the new generation through migrate_path; drain the rest; exit
    adopt     {"listener", "data"} + fd: continue a connection migrated from the old generation
    stop      exit now

Messages it sends unasked: ``draining`` (it was sent SIGTERM itself: the supervisor starts its
replacement on the same sockets while it finishes its requests) and ``final`` (its counters,
as it exits).

Signals: SIGHUP is ignored (inherited ignored from the supervisor, and set again first thing):
only the main process acts on it, and a HUP to the process group must not kill workers.
SIGTERM drains this worker; SIGINT stops it at once. If the supervisor goes away (the link
closes), the worker drains and exits.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from fastmesh.config.load import load_dict
from fastmesh.server import ipc
from fastmesh.server.dataplane import DataPlane

log = logging.getLogger("fastmesh.worker")


class Worker:
    def __init__(self, loop, ctrl_sock: socket.socket, index: int):
        self.loop = loop
        self.index = index
        self.plane = DataPlane(loop)
        self.ctrl = ipc.Channel(ctrl_sock, loop, self._on_message)
        self.done = asyncio.Event()
        self.drain_timeout_ms = 30000
        self._exiting = False

    def start(self) -> None:
        self.ctrl.start_reading()

    def _on_message(self, msg: dict, fds: list) -> None:
        t = msg.get("t")
        if t == "closed":
            log.warning("worker %d: supervisor link closed; draining", self.index)
            self._exit_after(self.plane.drain(self.drain_timeout_ms))
            return
        handler = getattr(self, "_on_" + str(t), None)
        if handler is None:
            for fd in fds:
                os.close(fd)
            self.ctrl.reply(msg, ipc.reply_msg(ok=False, error=f"unknown message {t!r}"))
            return
        self.loop.create_task(self._run(handler, msg, fds))

    async def _run(self, handler, msg, fds):
        try:
            out = await handler(msg, fds)
            if out is not None and not self.ctrl.closed:
                self.ctrl.reply(msg, ipc.reply_msg(ok=True, **out))
        except Exception as exc:
            log.exception("worker %d: %s failed", self.index, msg.get("t"))
            if not self.ctrl.closed:
                self.ctrl.reply(msg, ipc.reply_msg(ok=False, error=f"{type(exc).__name__}: {exc}"))

    # -- handlers --

    async def _on_config(self, msg, fds):
        held = self.plane.cfg.clusters if self.plane.cfg is not None else {}
        keep = msg.get("keep_clusters") or ()
        missing = [n for n in keep if n not in held]
        if missing:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"asked to keep clusters this worker does not have: {missing[:5]}")
        cfg = load_dict(msg["config"], source=msg.get("source", "<supervisor>"),
                        clusters={n: held[n] for n in keep})
        names = msg.get("listeners", [])
        if len(names) != len(fds):
            for fd in fds:
                os.close(fd)
            raise ValueError(f"{len(names)} listener names but {len(fds)} sockets")
        sockets: dict = {}
        for n, fd in zip(names, fds):
            s = socket.socket(fileno=fd)
            s.setblocking(False)
            sockets.setdefault(n, []).append(s)
        self.drain_timeout_ms = cfg.drain_timeout_ms
        try:
            await self.plane.apply(cfg, sockets, msg.get("health"))
        except BaseException:
            for group in sockets.values():
                for s in group:
                    s.close()
            raise
        return {"version": self.plane.snapshot.version}

    async def _on_endpoints(self, msg, fds):
        self.plane.update_endpoints(msg["clusters"])
        if msg.get("health") is not None:
            self.plane.set_health(msg["health"], replace_all=True)
        return {}

    async def _on_health(self, msg, fds):
        self.plane.set_health(msg["clusters"], replace_all=bool(msg.get("all")))
        return {}

    async def _on_stats(self, msg, fds):
        return {"stats": dict(self.plane.stats(), index=self.index)}

    async def _on_clusters(self, msg, fds):
        return {"clusters": self.plane.clusters_info()}

    async def _on_drain(self, msg, fds):
        close = bool(msg.get("close_listeners"))
        if self._exiting:
            # already draining (a SIGTERM to the process group reaches us first): the
            # supervisor's word still decides what becomes of the listening sockets
            self.plane.begin_drain(close)
        else:
            self._exit_after(self.plane.drain(msg.get("timeout_ms", self.drain_timeout_ms),
                                              close))
        return {}

    def on_sigterm(self) -> None:
        """SIGTERM to this worker: finish its requests and exit; the supervisor replaces it
        (unless the whole generation is stopping, in which case its drain message follows)."""
        if self._exiting:
            return
        log.info("worker %d: SIGTERM: draining", self.index)
        if not self.ctrl.closed:
            try:
                self.ctrl.send({"t": "draining"})
            except OSError:
                pass
        self._exit_after(self.plane.drain(self.drain_timeout_ms))

    async def _on_stop(self, msg, fds):
        self.ctrl.reply(msg, ipc.reply_msg(ok=True))
        self._finish()
        return None

    async def _on_handover(self, msg, fds):
        from fastmesh.server import upgrade
        self.plane.begin_drain()
        self._exit_after(upgrade.migrate_out(self.plane, msg["migrate_path"],
                                             msg.get("timeout_ms", self.drain_timeout_ms)))
        return {}

    async def _on_adopt(self, msg, fds):
        from fastmesh.server import upgrade
        await upgrade.adopt(self.plane, msg["listener"], fds[0], msg.get("data", b""),
                            msg.get("chain"))
        return {}

    # -- exit --

    def _exit_after(self, coro) -> None:
        if self._exiting:
            coro.close()
            return
        self._exiting = True

        async def run():
            try:
                left = await coro
                if left:
                    log.warning("worker %d: drain timeout with %d connections left",
                                self.index, left)
            finally:
                self._finish()
        self.loop.create_task(run())

    def _finish(self) -> None:
        # last word to the supervisor: the final counters, so they outlive this process
        if not self.ctrl.closed:
            try:
                self.ctrl.send({"t": "final", "stats": self.plane.stats()})
            except OSError:
                pass
        self.plane.close()
        self.done.set()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctrl-fd", type=int, required=True)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s")
    if args.loop == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from fastmesh._core import http1
    http1.reseed_request_ids()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        ctrl = socket.socket(fileno=args.ctrl_fd)
        w = Worker(loop, ctrl, args.index)
        # signals: SIGTERM drains this worker (and gets it replaced); a terminal's Ctrl-C
        # reaches the whole group and stops everything at once
        loop.add_signal_handler(signal.SIGTERM, w.on_sigterm)
        loop.add_signal_handler(signal.SIGINT, w._finish)
        w.start()
        await w.done.wait()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
