"""The data-socket I/O engine of a worker process: which one, and why.

``engine: auto | io_uring | epoll | uvloop`` (top level of the native config; the
environment variable FASTMESH_ENGINE overrides it, for tests and trials):

- ``uvloop`` (the default for now): uvloop's own transports, as before.
- ``io_uring``: fastmesh._core.engine_uring; refused loudly if the kernel will not make a ring.
- ``epoll``: fastmesh._core.engine_epoll, a nested epoll set watched by uvloop.
- ``auto``: io_uring if a ring can be made here (io_uring_setup fails with ENOSYS on old
  kernels, EPERM under seccomp or kernel.io_uring_disabled=2), else epoll; the choice and the
  reason are logged.

The engine serves the client connections of listeners it can serve (serves(): HTTP/1,
Bolt and TCP chains, plain or TLS: no listener filters, chain matching or original-destination
hand-offs) and the upstream connections those protocols open to plain clusters
(fastmesh._core.upstream.open_connection). A TLS chain's engine (fastmesh._core.tls) is the
protocol of the engine's transport as it is of uvloop's. Everything else (upstream TLS,
HTTP/2 listeners, dispatched listeners, mirrors) stays on uvloop.

Hot restart: HTTP/1 connections are drained, not migrated, as on uvloop. Bolt and TCP
connections migrate as on uvloop: engine.detach_transport() hands over a duplicate of the
descriptor and the bytes received but never delivered (io_uring's stash), only once no kernel
operation names the socket (Transport.detach); the new generation adopts the descriptor into
its own engine when the listener is served by one (fastmesh.server.upgrade.adopt).

The process's engine is made once, by the first config a worker applies; a reload that
changes ``engine`` takes effect at the next restart (logged).
"""
from __future__ import annotations

import logging
import os
import platform

from fastmesh._core import engine as engine_core

log = logging.getLogger("fastmesh.engine")

ENGINES = ("auto", "io_uring", "epoll", "uvloop")
ENV = "FASTMESH_ENGINE"

_current = None            # the process's engine (None: uvloop)
_setting = None            # what it was made from
_loop = None               # the loop it serves


def setting_for(configured: str) -> str:
    env = os.environ.get(ENV, "").strip()
    if env:
        if env not in ENGINES:
            raise ValueError(f"{ENV}={env!r}: expected one of {', '.join(ENGINES)}")
        return env
    return configured


def uring_unavailable() -> str | None:
    """None when io_uring can serve here, else why not."""
    try:
        from fastmesh._core import engine_uring
    except ImportError as exc:
        return f"this build has no io_uring engine ({exc})"
    rel = platform.release().split(".")
    try:
        if (int(rel[0]), int(rel[1].split("-")[0])) < (6, 0):
            return f"kernel {platform.release()} predates multishot receive (6.0)"
    except (ValueError, IndexError):
        pass
    return engine_uring.probe()


def _uring_kw() -> dict:
    kw = {}
    n = os.environ.get("FASTMESH_URING_BUFFERS")        # tests: a tiny ring runs dry
    if n:
        kw["ring_buffers"] = int(n)
    b = os.environ.get("FASTMESH_URING_BUFFER_BYTES")
    if b:
        kw["ring_buffer_bytes"] = int(b)
    return kw


def make(loop, setting: str):
    """The engine for `setting` (already resolved: no env look-up), or None for uvloop."""
    if setting == "uvloop":
        return None
    if setting == "epoll":
        from fastmesh._core.engine_epoll import EpollEngine
        return EpollEngine(loop)
    if setting == "io_uring":
        why = uring_unavailable()
        if why is not None:
            raise RuntimeError(f"engine io_uring: {why}")
        from fastmesh._core.engine_uring import UringEngine
        return UringEngine(loop, **_uring_kw())
    if setting == "auto":
        why = uring_unavailable()
        if why is None:
            try:
                from fastmesh._core.engine_uring import UringEngine
                eng = UringEngine(loop, **_uring_kw())
                log.info("engine auto: io_uring (a ring with a provided buffer ring could be "
                         "made; kernel %s; completions: %s)", platform.release(), eng.mode)
                return eng
            except OSError as exc:
                why = str(exc)
        from fastmesh._core.engine_epoll import EpollEngine
        log.info("engine auto: epoll (io_uring unavailable: %s)", why)
        return EpollEngine(loop)
    raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {setting!r}")


def start(loop, configured: str):
    """Make the process's engine from the config's setting (once); later calls only warn
    when the setting changed. Returns the engine (None: uvloop)."""
    global _current, _setting, _loop
    setting = setting_for(configured)
    if _setting is not None and _loop is not loop:
        stop()                  # a new loop in this process (tests): a new engine
    if _setting is not None:
        if setting != _setting:
            log.warning("engine: %s stays until the next restart (config asks for %s)",
                        _setting, setting)
        return _current
    eng = make(loop, setting)
    _current, _setting, _loop = eng, setting, loop
    engine_core.install(eng)
    if eng is not None and setting != "auto":
        log.info("engine: %s%s", eng.name,
                 f" (completions: {eng.mode})" if eng.name == "io_uring" else "")
    return eng


def current():
    return _current


def stop() -> None:
    global _current, _setting, _loop
    if _current is not None:
        _current.close()
    _current, _setting, _loop = None, None, None
    engine_core.install(None)


SERVED_PROTOCOLS = ("http1", "bolt", "tcp")


def serves(cfg) -> bool:
    """Whether the engine can serve this listener's client connections: HTTP/1, Bolt and TCP
    chains (TLS or not), nothing that needs uvloop's transports (the dispatcher's sniffing,
    chain matching and hand-offs; HTTP/2's codec has not been tried on it)."""
    if cfg.filter_chains or cfg.original_dst or cfg.use_original_dst or cfg.inspectors:
        return False
    chains = cfg.chains()
    return bool(chains) and all(ch.protocol in SERVED_PROTOCOLS for ch in chains)
