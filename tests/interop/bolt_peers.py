"""Start and stop the real SOFARPC peers in tests/interop/node (server.js, client.js).

Every process started here is stopped by the same helper, with bounded waits.
"""
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")


def node_skip_reason():
    if NODE is None:
        return "node is not installed (needed for the real SOFARPC peers)"
    if not (NODE_DIR / "node_modules" / "sofa-rpc-node").is_dir():
        return f"run `npm ci` in {NODE_DIR} first (node_modules is absent)"
    return None


requires_node = pytest.mark.skipif(node_skip_reason() is not None,
                                   reason=node_skip_reason() or "")


def stop_process(proc, timeout_s=5.0):
    """Terminate one process we started, then kill it if it does not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


class NodeServer:
    """server.js on 127.0.0.1 with a free port; use as a context manager."""

    def __init__(self, server_id="s1", port=0, start_timeout_s=30.0):
        self.server_id = server_id
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.proc = None
        self._stderr = None

    def start(self):
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [NODE, "server.js", "--port", str(self.port), "--id", self.server_id,
             "--exit-on-stdin-close"],
            cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr)
        line = _readline_with_timeout(self.proc.stdout, self.start_timeout_s)
        if not line.startswith(b"READY "):
            err = self.stderr_text()
            self.stop()
            raise RuntimeError(f"server.js did not start: {line!r} {err}")
        self.port = int(line.split()[1])
        return self

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def stderr_text(self):
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _readline_with_timeout(stream, timeout_s):
    box = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0] if box else b""


def client_command(host, calls=None, timeout_ms=3000, extra=()):
    cmd = [NODE, str(NODE_DIR / "client.js"), "--host", host, "--timeout", str(timeout_ms)]
    if calls is not None:
        cmd += ["--calls", json.dumps(calls)]
    return cmd + list(extra)


def run_client(host, calls=None, timeout_ms=3000, extra=(), run_timeout_s=60.0):
    """Run client.js to completion; its JSON output lines, parsed."""
    proc = subprocess.run(client_command(host, calls, timeout_ms, extra), cwd=NODE_DIR,
                          stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=run_timeout_s)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]


def wait_port_closed(port, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.05)
    return False

