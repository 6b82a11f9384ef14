"""The grpc-unary benchmark scenario's pieces, with real peers: the C gRPC echo server
(benchmarks/floor/grpc_echo.c, built with cc and libnghttp2) called by a real grpcio client,
directly and through fastmesh (an `http2` listener, a cluster with `http_protocol: http2`);
then the scenario itself in --smoke mode against fastmesh, ~1 s."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import grpcload, upstreams                          # noqa: E402
from benchmarks.peers import PEERS, build_c                          # noqa: E402
from benchmarks.procs import ProcError, ProcSet, free_port           # noqa: E402

grpc = pytest.importorskip("grpc")
pytestmark = pytest.mark.timeout(120)


def _have_nghttp2() -> bool:
    return any(Path(p).exists() for p in ("/usr/include/nghttp2/nghttp2.h",
                                          "/usr/local/include/nghttp2/nghttp2.h"))


needs_build = pytest.mark.skipif(
    not (_have_nghttp2() and (shutil.which("cc") or shutil.which("gcc"))),
    reason="needs a C compiler and libnghttp2-dev")


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    try:
        build_c("grpc-echo", upstreams.GRPC_ECHO_SOURCE, ("nghttp2",))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    logs = tmp_path_factory.mktemp("grpc-echo-logs")
    with ProcSet() as procs:
        yield upstreams.start_grpc_echo(procs, None, logs), procs, logs


def unary(target: str, payload: bytes, method: str = grpcload.METHOD):
    with grpc.insecure_channel(target) as ch:
        return ch.unary_unary(method).with_call(payload, timeout=10)


@needs_build
@pytest.mark.parametrize("size", [0, 64, 100_000])
def test_echo_server_answers_grpcio(echo, size):
    up, _, _ = echo
    payload = grpcload.message(size)
    before = grpcload.upstream_stats(up.port)["calls_ok"]
    resp, call = unary(f"127.0.0.1:{up.port}", payload)
    assert resp == payload
    assert call.code() == grpc.StatusCode.OK
    assert grpcload.upstream_stats(up.port)["calls_ok"] == before + 1


@needs_build
def test_echo_server_unknown_method_is_unimplemented(echo):
    up, _, _ = echo
    with pytest.raises(grpc.RpcError) as exc:
        unary(f"127.0.0.1:{up.port}", b"x", "/bench.Echo/Nope")
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


@needs_build
@pytest.mark.parametrize("name", ["fastmesh", "envoy", "haproxy", "nginx"])
def test_grpc_through_proxy(echo, tmp_path, name):
    """fastmesh (required) and each peer that is installed, configured by the harness for
    the grpc scenarios (h2c on both sides), pass real gRPC calls and their trailers."""
    up, procs, logs = echo
    port = free_port()
    peer = PEERS[name]()
    if not peer.find():
        if name == "fastmesh":
            raise AssertionError(peer.missing_reason)
        pytest.skip(peer.missing_reason)
    cfg = peer.write_config("http", port, up.port, tmp_path, h2=True, grpc=True)
    if name == "fastmesh":
        assert "http_protocol: http2" in cfg.read_text()
    proc = procs.start(f"{name}-grpc", peer.argv(cfg, tmp_path), None, logs, cwd=str(REPO))
    try:
        peer.wait_ready(proc, port, "http", "/stats", h2=True)
        before = grpcload.upstream_stats(up.port)["calls_ok"]
        for size in (0, 64, 100_000):
            payload = grpcload.message(size)
            resp, call = unary(f"127.0.0.1:{port}", payload)
            assert resp == payload
            assert call.code() == grpc.StatusCode.OK
        assert grpcload.upstream_stats(up.port)["calls_ok"] == before + 3
        with pytest.raises(grpc.RpcError) as exc:
            unary(f"127.0.0.1:{port}", b"x", "/bench.Echo/Nope")
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # the harness's own check: a grpcio call in a subprocess, as after each round
        out = subprocess.run([sys.executable, "-m", "benchmarks.grpcload", "call", "--target",
                              f"127.0.0.1:{port}", "--json"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["ok"] is True and res["code"] == "OK" and res["echoed"] is True, res
    except ProcError as exc:
        raise AssertionError(proc.stderr_tail()) from exc
    finally:
        procs.stop(proc)


@needs_build
@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
def test_grpc_unary_smoke(tmp_path):
    """`compare --smoke --scenarios grpc-unary`: fastmesh only, one round of ~1 s."""
    cmd = [sys.executable, "-m", "benchmarks", "compare", "--smoke", "--scenarios",
           "grpc-unary", "--out", str(tmp_path), "--no-charts"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=100,
                         stdin=subprocess.DEVNULL)
    text = (run.stdout + run.stderr).decode(errors="replace")
    assert run.returncode == 0, text[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    scn = results["scenarios"]["grpc-unary"]
    assert scn["info"]["upstream"]["kind"] == "grpc-echo"
    fm = scn["proxies"]["fastmesh"]
    assert fm["status"] == "ok", f"{fm.get('error')}\n{text[-2000:]}"
    r = fm["rounds"][0]
    assert r["units"] > 0 and r["throughput"] > 0
    assert r["errors_total"] == 0, r["errors"]
    assert "0 failed, 0 errored, 0 timeout" in r["load_raw"]["summary"]
    # every success h2load counted was answered by the gRPC server with grpc-status 0
    assert r["load_raw"]["upstream"]["calls_ok"] >= r["units"]
    assert r["grpc_check"]["ok"] is True, r["grpc_check"]
    assert r["cpu_us_per_unit"] > 0 and r["latency_us"]["p99"] > 0
    assert scn["goal"]["peer"] == "envoy"
    assert "grpc-unary" in (tmp_path / "report.md").read_text()
