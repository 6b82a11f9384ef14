"""A peer cannot flood the log: an upstream that refuses every connection, or a client that
sends garbage, costs at most a few log lines per 10 s, while every request still gets its
answer and its counter."""
import socket
import struct

import pytest

from fmtest import RawClient, free_port

pytestmark = pytest.mark.timeout(60)


def test_refused_upstream_logs_a_few_lines_not_one_per_request(start_fastmesh, loop_kind):
    dead = free_port()
    fm = start_fastmesh({
        "listeners": [{"name": "web", "protocol": "http1", "route_table": "web"}],
        "route_tables": {"web": {"routes": [{"match": {"prefix": "/"}, "cluster": "dead"}]}},
        "clusters": [{"name": "dead", "endpoints": [f"127.0.0.1:{dead}"]}],
    }, loop=loop_kind)
    with RawClient(fm.port) as c:
        for _ in range(200):
            c.request("GET", "/")
            resp = c.read_response()
            assert resp.status == 503 and resp.header("x-fastmesh-error") == "connect_failed"
    assert fm.listener_stats()["error_connect_failed"] == 200
    lines = [l for l in fm.proc.output().splitlines() if "connect to" in l]
    assert 1 <= len(lines) <= 5, lines


def test_garbage_bolt_clients_log_a_few_lines(start_fastmesh, loop_kind):
    fm = start_fastmesh({
        "listeners": [{"name": "rpc", "protocol": "bolt", "route_table": "rpc"}],
        "route_tables": {"rpc": {"routes": [
            {"match": {"headers": [{"name": "service", "present": True}]}, "cluster": "c"}]}},
        "clusters": [{"name": "c", "endpoints": [f"127.0.0.1:{free_port()}"]}],
    }, loop=loop_kind)
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", fm.port), timeout=5) as s:
            s.sendall(b"\x07" + struct.pack(">I", 12345) + b"junk" * 8)    # wrong proto byte
            assert s.recv(100) == b""                                       # closed by fastmesh
    assert fm.listener_stats()["error_bad_frame"] == 100
    lines = [l for l in fm.proc.output().splitlines() if "bad Bolt frame" in l]
    assert 1 <= len(lines) <= 5, lines
