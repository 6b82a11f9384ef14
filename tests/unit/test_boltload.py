"""benchmarks.boltload: its echo server and client, as real subprocesses, for one second."""
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks import boltload  # noqa: E402

NODE_DIR = REPO / "tests" / "interop" / "node"
FRAMES_DIR = Path(os.environ.get("FASTMESH_BOLT_FRAMES")
                  or Path(__file__).resolve().parents[1] / "data" / "bolt-frames")

pytestmark = pytest.mark.timeout(90)


def start(cmd, cwd):
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(30)
    line = box[0] if box else b""
    if not line.startswith(b"READY "):
        stop(proc)
        raise RuntimeError(f"{cmd[:3]} did not start: {line!r}")
    return proc, int(line.split()[1])


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def run_load(port, *extra):
    cmd = [sys.executable, "-m", "benchmarks.boltload", "client", "--target",
           f"127.0.0.1:{port}", "--duration-s", "1", "--json", *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return json.loads(out.stdout)


@pytest.fixture
def echo_server():
    # --duration-s bounds its life even if this test process dies
    proc, port = start([sys.executable, "-m", "benchmarks.boltload", "echo-server",
                        "--listen", "127.0.0.1:0", "--duration-s", "60"], REPO)
    yield port
    stop(proc)


@pytest.mark.parametrize("extra", [
    ["--connections", "2", "--inflight", "8", "--payload-bytes", "1024"],
    ["--connections", "1", "--inflight", "1", "--payload-bytes", "0", "--loop", "asyncio"],
    ["--connections", "2", "--inflight", "4", "--payload-bytes", "70000", "--proto", "2"],
], ids=["v1-1k", "v1-empty-asyncio", "v2-70k"])
def test_echo_server_and_client(echo_server, extra):
    r = run_load(echo_server, *extra)
    assert r["calls"] > 0 and r["calls_per_s"] > 0
    assert r["errors_total"] == 0 and r["errors"] == {}
    assert r["unanswered"] == 0 and r["unknown_ids"] == 0
    assert r["connection_errors"] == [] and r["connected"] == r["connections"]
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]


def test_template_frame_against_echo_server(echo_server):
    r = run_load(echo_server, "--template-hex", str(FRAMES_DIR / "bolt_request.hex"))
    assert r["calls"] > 0 and r["errors_total"] == 0 and r["frame_bytes"] == 352


def test_frames_agree_with_the_codec():
    bolt = pytest.importorskip("fastmesh._core.bolt")
    hdr = boltload.header_block([("service", boltload.DEFAULT_SERVICE)])
    assert hdr == bolt.encode_header_block({"service": boltload.DEFAULT_SERVICE})
    req = boltload.encode_v1(1, 1, 9, 1, 3000, boltload.REQ_CLASS, hdr, b"abc")
    assert req == bolt.encode_request(1, 1, 9, 1, 3000, boltload.REQ_CLASS, hdr, b"abc")
    for ver1, switch in [(1, 0), (2, 1)]:
        resp = boltload.encode_v2(0, 2, 9, 1, 0, boltload.RESP_CLASS, b"", b"abc", ver1, switch)
        assert resp == bolt.encode_response(2, 9, 1, 0, boltload.RESP_CLASS, b"", b"abc",
                                            ver1=ver1, switch=switch)
        f = boltload.peek(resp, 0, len(resp))
        assert f.frame_len == len(resp) == bolt.py_frame_peek(resp)
    buf = b"\x00" * 3 + req + req
    f = boltload.peek(buf, 3, len(buf))
    assert (f.request_id, f.frame_len, f.timeout_ms) == (9, len(req), 3000)
    for cut in range(len(req)):
        assert boltload.peek(req, 0, cut) is None
    with pytest.raises(boltload.FrameError):
        boltload.peek(b"\x07", 0, 1)
    big = struct.pack(">BBHBIBiHHI", 1, 1, 1, 1, 1, 1, 0, 0, 0, 0xFFFFFFFF)
    with pytest.raises(boltload.FrameError):
        boltload.peek(big, 0, len(big))


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir(),
                    reason="node or tests/interop/node/node_modules missing")
def test_template_against_real_node_server():
    proc, port = start(["node", "server.js", "--port", "0", "--id", "load",
                        "--exit-on-stdin-close"], NODE_DIR)
    try:
        r = run_load(port, "--connections", "1", "--inflight", "2", "--template-hex",
                     str(FRAMES_DIR / "bolt_request.hex"))
    finally:
        stop(proc)
    assert r["calls"] > 0 and r["errors_total"] == 0 and r["connection_errors"] == []
