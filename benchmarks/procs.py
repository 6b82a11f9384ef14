"""Child processes for the benchmark harness: started pinned to a CPU, in their own process
group, with stdout read line by line in the background and stderr in a log file, and always
stopped (the whole group: SIGTERM, then SIGKILL).

    with ProcSet() as procs:
        up = procs.start("upstream", [...], cpu=1, log_dir=tmp)
        port = int(up.wait_line("READY", 10).split()[1])
    # every process started through `procs` is stopped here, even on an exception
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

TASKSET = shutil.which("taskset")


class ProcError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """argv run on one CPU: `taskset -c N argv...` (taskset execs, so the pid is the program's)."""
    if cpu is None or TASKSET is None:
        return list(argv)
    return [TASKSET, "-c", str(cpu), *argv]


def _pin_self(cpu: int | None):
    """preexec hook when taskset is missing."""
    if cpu is None or TASKSET is not None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


class Proc:
    def __init__(self, name: str, argv: list[str], cpu: int | None, log_path: Path,
                 env: dict | None = None, cwd: str | None = None):
        self.name = name
        self.argv = pinned(argv, cpu)
        self.log_path = log_path
        self.lines: queue.Queue = queue.Queue()
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env,
                                      cwd=cwd, start_new_session=True,
                                      preexec_fn=_pin_self(cpu))
        self.pid = self.popen.pid
        self._reader = threading.Thread(target=self._read_stdout, daemon=True,
                                        name=f"stdout-{name}")
        self._reader.start()

    def _read_stdout(self):
        for raw in self.popen.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)                      # EOF marker

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_line(self, prefix: str, timeout_s: float) -> str:
        """The next stdout line starting with prefix; ProcError on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcError(f"{self.name}: no {prefix!r} line within {timeout_s:g} s"
                                f"{self._stderr_hint()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)
                raise ProcError(f"{self.name}: exited (rc {self.popen.poll()}) before a "
                                f"{prefix!r} line{self._stderr_hint()}")
            if line.startswith(prefix):
                return line

    def stderr_tail(self, n_chars: int = 1500) -> str:
        try:
            self._log.flush()
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_chars:].decode(errors="replace").strip()

    def _stderr_hint(self) -> str:
        tail = self.stderr_tail(600)
        return f"; stderr: {tail}" if tail else ""

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after timeout_s. Returns the exit code."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        else:
            _signal_group(self.pid, signal.SIGKILL)   # stragglers left in the group
        self._reader.join(2)
        self.popen.stdout.close()
        self._log.close()
        return self.popen.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ProcSet:
    """Starts processes and stops every one of them, newest first, on exit."""

    def __init__(self):
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], cpu: int | None, log_dir: Path, **kw) -> Proc:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        p = Proc(name, argv, cpu, Path(log_dir) / f"{safe}.log", **kw)
        self.procs.append(p)
        return p

    def stop(self, proc: Proc) -> int | None:
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.stop()

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()
        return False


def wait_port(port: int, timeout_s: float, proc: Proc | None = None) -> None:
    """Wait until 127.0.0.1:port accepts a TCP connection (or proc exits: ProcError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and not proc.alive():
            raise ProcError(f"{proc.name}: exited with code {proc.popen.returncode}"
                            f"{proc._stderr_hint()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                hint = proc._stderr_hint() if proc is not None else ""
                raise ProcError(f"port {port} not accepting after {timeout_s:g} s{hint}")
            time.sleep(0.05)


def http_probe(port: int, path: str = "/", timeout_s: float = 10.0,
               proc: Proc | None = None, tls: bool = False) -> int:
    """GET path on 127.0.0.1:port (over TLS, certificate unchecked, with tls) until it
    answers 2xx; the status. ProcError otherwise."""
    import contextlib
    import ssl
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    tls_ctx = None
    if tls:
        tls_ctx = ssl.create_default_context()
        tls_ctx.check_hostname = False
        tls_ctx.verify_mode = ssl.CERT_NONE
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise ProcError(f"{proc.name}: exited with code {proc.popen.returncode}"
                            f"{proc._stderr_hint()}")
        try:
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(socket.create_connection(("127.0.0.1", port),
                                                                 timeout=2))
                if tls_ctx is not None:
                    s = stack.enter_context(tls_ctx.wrap_socket(s, server_hostname="localhost"))
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
                          .encode())
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            parts = data.split(b" ", 2)
            if len(parts) >= 2 and parts[1].isdigit():
                status = int(parts[1])
                if 200 <= status < 300:
                    return status
                last = f"status {status}"
            else:
                last = f"answer {data[:60]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    hint = proc._stderr_hint() if proc is not None else ""
    raise ProcError(f"GET {path} on port {port}: {last}{hint}")


def h2_probe(port: int, path: str = "/", timeout_s: float = 10.0,
             proc: Proc | None = None) -> int:
    """GET path over HTTP/2 with prior knowledge (curl) until it answers 2xx."""
    import shutil
    import subprocess
    curl = shutil.which("curl")
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise ProcError(f"{proc.name}: exited with code {proc.popen.returncode}"
                            f"{proc._stderr_hint()}")
        if curl is None:
            raise ProcError("curl is needed to probe an HTTP/2 listener")
        out = subprocess.run([curl, "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                              "%{http_code}", f"http://127.0.0.1:{port}{path}"],
                             capture_output=True, text=True, timeout=5).stdout
        if out.isdigit() and 200 <= int(out) < 300:
            return int(out)
        last = f"status {out or 'none'}"
        time.sleep(0.1)
    hint = proc._stderr_hint() if proc is not None else ""
    raise ProcError(f"h2c GET {path} on port {port}: {last}{hint}")


def run_once(name: str, argv: list[str], cpu: int | None, timeout_s: float, log_dir: Path,
             env: dict | None = None, cwd: str | None = None) -> tuple[int, str, str]:
    """Run a program to its end (pinned, own process group); (exit code, stdout, stderr tail).
    On timeout the whole group is killed and ProcError raised."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    log_path = Path(log_dir) / f"{safe}.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen(pinned(argv, cpu), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=log, env=env, cwd=cwd, start_new_session=True,
                             preexec_fn=_pin_self(cpu))
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(p.pid, signal.SIGKILL)
            p.communicate()
            raise ProcError(f"{name}: still running after {timeout_s:g} s: killed") from None
        finally:
            if p.poll() is None:
                _signal_group(p.pid, signal.SIGKILL)
                p.wait()
    err = log_path.read_bytes()[-1500:].decode(errors="replace").strip()
    return p.returncode, out.decode(errors="replace"), err
