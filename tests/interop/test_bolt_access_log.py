"""The Bolt access log with the real SOFARPC peers: one line per call answered, in the
HTTP/1 log's conventions (default line), or in a configured format (text, JSON lines)."""
import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bolt_peers import NodeServer, requires_node, run_client  # noqa: E402

pytestmark = [requires_node, pytest.mark.timeout(120)]

SERVICE = "com.example.EchoService:1.0"


def _config(server, access_log):
    return {
        "listeners": [{"name": "rpc", "protocol": "bolt", "route_table": "rpc",
                       "access_log": access_log}],
        "route_tables": {"rpc": {"routes": [{"match": {"headers": [
            {"name": "service", "prefix": "com.example.EchoService"}]}, "cluster": "echo"}]}},
        "clusters": [{"name": "echo", "endpoints": [server.host]}],
    }


def _lines(path, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"{n} lines expected in {path}: "
                         f"{path.read_text() if path.exists() else 'no file'}")


@pytest.fixture
def server():
    with NodeServer("s1") as srv:
        yield srv


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_bolt_default_line(server, start_fastmesh, tmp_path, loop):
    log_path = tmp_path / "bolt.log"
    fm = start_fastmesh(_config(server, str(log_path)), loop=loop)
    out = run_client(f"127.0.0.1:{fm.port}", [{"method": "echo", "args": ["hi"]},
                                              {"method": "boom"}])
    assert out[0]["ok"] and not out[1]["ok"]
    lines = _lines(log_path, 2)
    assert len(lines) == 2
    pat = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1 '
                     r'"(?P<svc>\S+) (?P<method>\S+)" (?P<status>\d+) - '
                     r'(?P<ms>\d+\.\d{3}) echo (?P<up>\S+) (?P<rid>\d+)$')
    m0, m1 = pat.match(lines[0]), pat.match(lines[1])
    assert m0 and m1, lines
    assert m0["svc"] == SERVICE and m0["method"] == "echo" and m0["status"] == "0"
    assert m1["method"] == "boom" and m1["status"] != "0"
    assert m0["up"] == server.host
    assert m0["rid"] != m1["rid"]


def test_bolt_json_lines(server, start_fastmesh, tmp_path):
    log_path = tmp_path / "bolt.jsonl"
    fm = start_fastmesh(_config(server, {"path": str(log_path), "json_format": {
        "service": "%RPC_SERVICE%", "method": "%REQ(sofa_head_method_name)%",
        "status": "%RESPONSE_CODE%", "ms": "%DURATION%", "upstream": "%UPSTREAM_HOST%",
        "cluster": "%UPSTREAM_CLUSTER%", "id": "%REQUEST_ID%", "proto": "%PROTOCOL%",
        "rx": "%BYTES_RECEIVED%", "tx": "%BYTES_SENT%", "client": "%DOWNSTREAM_REMOTE_ADDRESS%"}}))
    run_client(f"127.0.0.1:{fm.port}", [{"method": "echo", "args": ["hi"]}])
    rec = json.loads(_lines(log_path, 1)[0])
    assert rec["service"] == SERVICE and rec["method"] == "echo"
    assert rec["status"] == "0" and rec["upstream"] == server.host
    assert rec["cluster"] == "echo" and rec["proto"] == "bolt" and rec["id"].isdigit()
    assert int(rec["ms"]) >= 0
    # whole frames: a request's fixed part is 22 bytes (v1), a response's 20, plus
    # class name, headers and content
    assert int(rec["rx"]) > 22 + len(SERVICE) and int(rec["tx"]) > 20, rec
    assert rec["client"].startswith("127.0.0.1:") and rec["client"] != "127.0.0.1:0", rec
