"""The real SOFARPC peers talk to each other directly (no proxy): the baseline every proxy
interop test compares against."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bolt_peers import NodeServer, requires_node, run_client, wait_port_closed  # noqa: E402

pytestmark = [requires_node, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server():
    with NodeServer("s1") as srv:
        yield srv
    assert wait_port_closed(srv.port), "server.js still listening after stop"


def test_echo_boom_slow_whoami(server):
    out = run_client(server.host, [
        {"method": "echo", "args": ["hello"]},
        {"method": "echo", "args": ["héllo, wörld ✓"]},
        {"method": "boom"},
        {"method": "slow", "args": [200]},
        {"method": "whoami"},
    ])
    assert len(out) == 5
    assert out[0] == {"ok": True, "result": "hello", "ms": out[0]["ms"]}
    assert out[1]["ok"] and out[1]["result"] == "héllo, wörld ✓"
    assert not out[2]["ok"] and "boom" in out[2]["error"]
    assert out[3]["ok"] and out[3]["result"] == "slow-done" and out[3]["ms"] >= 190
    assert out[4] == {"ok": True, "result": "s1", "ms": out[4]["ms"]}


def test_slow_past_timeout_rejects(server):
    out = run_client(server.host, [{"method": "slow", "args": [1500], "timeout": 300},
                                   {"method": "echo", "args": ["after"]}])
    assert not out[0]["ok"] and out[0]["name"] == "RpcResponseTimeoutError"
    assert out[0]["ms"] < 1400
    assert out[1]["ok"] and out[1]["result"] == "after"


def test_protobuf_echo(server):
    out = run_client(server.host, [{"method": "echo", "args": ["hello"]}],
                     extra=["--codec", "protobuf"])
    assert out == [{"ok": True, "result": {"code": 200, "message": "hello"}, "ms": out[0]["ms"]}]


@pytest.mark.parametrize("extra", [["--bolt2"], ["--bolt2", "--crc"]])
def test_bolt_v2(server, extra):
    out = run_client(server.host, [{"method": "echo", "args": ["v2"]}, {"method": "boom"}],
                     extra=extra)
    assert out[0]["ok"] and out[0]["result"] == "v2"
    assert not out[1]["ok"] and "boom" in out[1]["error"]


def test_concurrent_unique_payloads(server):
    out = run_client(server.host, extra=["--concurrent", "8", "--count", "400",
                                         "--payload-bytes", "100"])
    assert len(out) == 1
    summary = out[0]
    assert summary["mode"] == "concurrent"
    assert (summary["ok"], summary["mismatch"], summary["errors"]) == (400, 0, 0), summary


def test_two_servers_round_robin():
    with NodeServer("s-a") as a, NodeServer("s-b") as b:
        out = run_client(f"{a.host},{b.host}", [{"method": "whoami"}] * 12)
    assert all(r["ok"] for r in out), out
    assert {r["result"] for r in out} == {"s-a", "s-b"}
