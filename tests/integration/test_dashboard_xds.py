"""The dashboard's timeline names the xDS control plane as the source of what it pushes
(the reference ADS server in tests/xds_server.py; fastmesh on an Envoy bootstrap)."""
from __future__ import annotations

import sys
import time

import yaml

from fmtest import Proc, free_port, get_json, wait_ready
from xds_server import (CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsServer, assignment, bootstrap,
                        eds_cluster, http_listener, route_config, to_cluster)


def test_xds_pushes_are_in_the_timeline(tmp_path):
    started = []
    ups = {}
    srv = AdsServer()
    srv.start()
    try:
        for name in ("up1", "up2"):
            p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen",
                      "127.0.0.1:0", "--name", name], name=name)
            started.append(p)
            ups[name] = int(p.popen.stdout.readline().split()[1])
        admin = free_port()
        path = tmp_path / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(bootstrap(admin, srv.port)))
        fm = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--log-level",
                   "warning"], name="fastmesh")
        started.append(fm)
        wait_ready(admin, fm)
        port = free_port()
        mark = len(srv.requests)
        srv.set(CLUSTER, "c1", [eds_cluster("web")])
        srv.set(ENDPOINT, "e1", [assignment("web", ups["up1"])])
        srv.set(ROUTE, "r1", [route_config("routes", [to_cluster("/", "web")])])
        srv.set(LISTENER, "l1", [http_listener("ingress", port, "routes")])
        for t, v in ((CLUSTER, "c1"), (ENDPOINT, "e1"), (LISTENER, "l1"), (ROUTE, "r1")):
            srv.wait_ack(t, v, after=mark)
        mark = len(srv.requests)
        srv.set(ENDPOINT, "e2", [assignment("web", ups["up2"])])
        srv.wait_ack(ENDPOINT, "e2", after=mark)
        time.sleep(0.2)
        ev = get_json(admin, "/api/events")["events"]
        got = {(e["kind"], e["action"], e["name"], e["source"]) for e in ev}
        assert ("cluster", "added", "web", "xds push") in got, ev
        assert ("listener", "added", "ingress", "xds push") in got, ev
        assert ("endpoint", "added", f"web/127.0.0.1:{ups['up2']}", "xds push") in got, ev
        assert ("endpoint", "removed", f"web/127.0.0.1:{ups['up1']}", "xds push") in got, ev
        topo = get_json(admin, "/api/topology")
        assert [l["name"] for l in topo["listeners"]] == ["ingress"]
        assert [e["address"] for c in topo["clusters"] if c["name"] == "web"
                for e in c["endpoints"]] == [f"127.0.0.1:{ups['up2']}"]
    finally:
        for p in reversed(started):
            p.stop()
        srv.stop()
