"""The main process of `fastmesh run`: the PID a process manager watches, stable across hot
restarts.

A generation (a supervisor and its workers, fastmesh.server.supervisor) serves traffic; the
main process only starts generations and relays signals to them. On SIGHUP it starts a new
generation, which takes the listening sockets over from the running one through the upgrade
socket (fastmesh.server.upgrade); the old one drains and exits. The main process stays, so
under systemd (Type=simple or Type=notify) or as a container's PID 1 the service's main PID
never changes and its cgroup is never torn down by a restart.

    signal to the main process   what happens
    SIGHUP                       hot restart (deferred while a generation is starting; a
                                 restart already starting absorbs it if it arrives within
                                 COALESCE_S, as a process-group HUP reaches us twice)
    SIGTERM                      forwarded: every generation drains and exits; then we exit
    SIGINT                       forwarded: every generation stops at once; then we exit

Generations run with SIGHUP ignored (their workers inherit that), so a HUP sent to the whole
process group restarts the service once instead of killing its workers. Each generation
reports "ready" over a pipe once it accepts; with NOTIFY_SOCKET set (systemd Type=notify) the
main process sends READY=1, RELOADING=1 and STOPPING=1 accordingly. The main process exits
with the exit status of the last generation; a generation that fails to start during a hot
restart is logged and the running one keeps serving.

It imports nothing heavy (no event loop, no config model) and reaps every child, so it can
run as PID 1 in a container.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("fastmesh.main")

READY_FD_ENV = "FASTMESH_READY_FD"      # set for a generation: where to say it accepts
MAIN_PID_ENV = "FASTMESH_MAIN_PID"      # set for a generation: the main process's PID
COALESCE_S = 0.5                        # HUPs this close to a restart's start are the same one
PR_SET_PDEATHSIG = 1


class Generation:
    def __init__(self, number: int, proc: subprocess.Popen, ready_fd: int):
        self.number = number
        self.proc = proc
        self.pid = proc.pid
        self.ready_fd = ready_fd          # read end of its ready pipe, -1 once closed
        self.ready = False
        self.started = time.monotonic()
        self.status: int | None = None    # exit status once reaped


def _exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 1


class MainProcess:
    """Starts generations of `argv` and relays signals to them until the last one exits."""

    def __init__(self, argv: list, pending_signals: list | None = None):
        self.argv = argv
        self.gens: list[Generation] = []
        self.count = 0
        self.stopping = False
        self.restart_pending = False
        self.exit_code = 0
        self.early = pending_signals if pending_signals is not None else []
        import ctypes           # the main process only: a generation never pays for it
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._notify_addr = os.environ.pop("NOTIFY_SOCKET", None)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        # signals arrive as bytes on the wake pipe; the handlers themselves do nothing
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, _noop)
        if any(sig in (signal.SIGTERM, signal.SIGINT) for sig in self.early):
            log.info("main process: stopped before it started")
            return 0
        self._spawn()
        for sig in self.early:              # a HUP before start: joins the first start
            self._on_signal(sig)
        self.early = []
        while self.gens:
            fds = [self._wake_r] + [g.ready_fd for g in self.gens if g.ready_fd >= 0]
            try:
                readable, _, _ = select.select(fds, [], [], 5.0)
            except InterruptedError:
                continue
            if self._wake_r in readable:
                try:
                    data = os.read(self._wake_r, 512)
                except BlockingIOError:
                    data = b""
                for signum in data:
                    self._on_signal(signum)
            for g in list(self.gens):
                if g.ready_fd >= 0 and g.ready_fd in readable:
                    self._on_ready_pipe(g)
            self._reap()
        self._notify("STOPPING=1")
        log.info("main process: exiting with %d", self.exit_code)
        return self.exit_code

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return                          # reaped after every wake-up
        if signum == signal.SIGHUP:
            self._on_hup()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("main process: %s: stopping every generation",
                         signal.Signals(signum).name)
                self._notify("STOPPING=1")
            self.stopping = True
            self.restart_pending = False
            for g in self.gens:
                self._kill(g, signum)

    def _on_hup(self) -> None:
        if self.stopping:
            log.warning("SIGHUP while stopping: ignored")
            return
        starting = self._starting()
        if starting is not None:
            if time.monotonic() - starting.started < COALESCE_S:
                log.info("SIGHUP: a hot restart has just started; this one joins it")
            else:
                log.info("SIGHUP: a generation is still starting; the hot restart is deferred "
                         "until it is ready")
                self.restart_pending = True
            return
        log.info("SIGHUP: hot restart: starting generation %d", self.count + 1)
        self._notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000))
        self._spawn()

    def _starting(self) -> Generation | None:
        for g in self.gens:
            if not g.ready and g.status is None:
                return g
        return None

    # ------------------------------------------------------------------ generations

    def _spawn(self) -> None:
        r, w = os.pipe()
        self.count += 1
        env = dict(os.environ, **{READY_FD_ENV: str(w), MAIN_PID_ENV: str(os.getpid())})
        libc = self._libc

        def child_setup():
            # a generation and its workers ignore SIGHUP: hot restarts are ours to run
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            # if the main process is killed outright, the generation drains and exits
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        try:
            proc = subprocess.Popen(self.argv, env=env, pass_fds=[w], preexec_fn=child_setup)
        except OSError as exc:
            os.close(r)
            os.close(w)
            log.error("main process: cannot start a generation: %s", exc)
            if not self.gens:
                self.exit_code = 1
            return
        os.close(w)
        os.set_blocking(r, False)
        self.gens.append(Generation(self.count, proc, r))

    def _on_ready_pipe(self, g: Generation) -> None:
        try:
            data = os.read(g.ready_fd, 64)
        except BlockingIOError:
            return
        if data:
            if not g.ready and b"R" in data:
                g.ready = True
                log.info("main process: generation %d (pid %d) is serving", g.number, g.pid)
                self._notify("READY=1\nMAINPID=%d\nSTATUS=generation %d serving"
                             % (os.getpid(), g.number))
                if self.restart_pending and not self.stopping:
                    self.restart_pending = False
                    self._on_hup()
            return
        os.close(g.ready_fd)                # end of stream: it exited (or closed it)
        g.ready_fd = -1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            g = next((g for g in self.gens if g.pid == pid), None)
            if g is None:
                continue                    # an orphan re-parented to us (PID 1): reaped
            g.status = status
            g.proc.returncode = _exit_code(status)    # reaped here, not by Popen
            if g.ready_fd >= 0:
                self._on_ready_pipe(g)      # a last "ready" may still be in the pipe
                if g.ready_fd >= 0:
                    os.close(g.ready_fd)
                    g.ready_fd = -1
            self.gens.remove(g)
            code = _exit_code(status)
            if not g.ready and not self.stopping and any(o.ready for o in self.gens):
                log.error("hot restart failed: generation %d exited with %d before serving; "
                          "generation %d keeps serving", g.number, code,
                          max(o.number for o in self.gens if o.ready))
                self._notify("READY=1\nSTATUS=hot restart failed")
                if self.restart_pending:
                    self.restart_pending = False
                    self._on_hup()
                continue
            if not self.gens:
                self.exit_code = code
            else:
                log.info("main process: generation %d exited with %d", g.number, code)

    def _kill(self, g: Generation, signum: int) -> None:
        if g.status is None:
            try:
                os.kill(g.pid, signum)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ systemd

    def _notify(self, text: str) -> None:
        addr = self._notify_addr
        if not addr:
            return
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(text.encode(), addr)
        except OSError as exc:
            log.warning("sd_notify: %s", exc)


def _noop(signum, frame) -> None:
    pass


def report_ready() -> None:
    """In a generation: tell the main process that this generation accepts."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"R")
    except OSError as exc:
        if exc.errno != errno.EBADF:
            log.warning("could not report readiness: %s", exc)
    finally:
        try:
            os.close(int(fd))
        except OSError:
            pass


def is_generation() -> bool:
    return READY_FD_ENV in os.environ


def main_pid() -> int:
    return int(os.environ.get(MAIN_PID_ENV) or os.getpid())


def generation_argv() -> list:
    # -P: the installed package, whatever the working directory
    return [sys.executable, "-P", "-m", "fastmesh"] + sys.argv[1:]
