"""fastmesh driven by a control plane over ADS (xDS v3, state of the world), against the
reference ADS server in tests/xds_server.py: ACK/NACK on the wire, EDS/RDS/LDS/CDS changes
applied while a client keeps sending, a refused resource leaving the old config serving, the
control plane going away and coming back.
"""
from __future__ import annotations

import socket
import sys
import threading
import time

import pytest
import yaml

from envoy.config.cluster.v3 import cluster_pb2

from fmtest import Proc, RawClient, free_port, get_json, wait_ready
from xds_server import (CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsServer, assignment, bootstrap,
                        eds_cluster, http_listener, route_config, to_cluster)

@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    """The ADS server, two upstreams, and fastmesh on a bootstrap pointing at the server."""
    tmp = tmp_path_factory.mktemp("xds")
    started = []
    ups = {}
    for name in ("up1", "up2"):
        p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                  "--name", name], name=name)
        started.append(p)
        ups[name] = int(p.popen.stdout.readline().split()[1])
    srv = AdsServer()
    srv.start()
    admin_port = free_port()
    path = tmp / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(bootstrap(admin_port, srv.port)))
    # two workers: every update must reach both (SO_REUSEPORT spreads the test's connections)
    fm = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--log-level", "info",
               "--workers", "2", "--upgrade-socket", str(tmp / "upgrade.sock")], name="fastmesh")
    started.append(fm)
    try:
        wait_ready(admin_port, fm)
        yield {"srv": srv, "ups": ups, "admin": admin_port, "fm": fm}
    finally:
        for p in reversed(started):
            p.stop()
        srv.stop()


def _get(port: int, path="/") -> tuple[int, bytes]:
    with RawClient(port, timeout=5) as c:
        c.request(path=path)
        r = c.read_response()
        return r.status, bytes(r.body)


def _eventually(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = fn()
            if out:
                return out
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_initial_config_is_acked_and_serves(plane):
    srv, ups = plane["srv"], plane["ups"]
    port = free_port()
    plane["port"] = port
    mark = len(srv.requests)
    srv.set(CLUSTER, "c1", [eds_cluster("web")])
    srv.set(ENDPOINT, "e1", [assignment("web", ups["up1"])])
    srv.set(ROUTE, "r1", [route_config("routes", [to_cluster("/", "web")])])
    srv.set(LISTENER, "l1", [http_listener("ingress", port, "routes")])
    first = srv.wait_request(lambda r: r.type_url == CLUSTER)
    assert first.node.id.startswith("sidecar~") and first.node.cluster == "test"
    for t, v in ((CLUSTER, "c1"), (ENDPOINT, "e1"), (LISTENER, "l1"), (ROUTE, "r1")):
        srv.wait_ack(t, v, after=mark)
    assert _eventually(lambda: _get(port) == (200, b"hello from up1\n"))


def test_eds_change_with_a_continuous_client(plane):
    srv, ups, port = plane["srv"], plane["ups"], plane["port"]
    seen, errors, stop = [], [], threading.Event()

    def client():
        c = RawClient(port, timeout=5)
        while not stop.is_set():
            try:
                c.request(path="/")
                r = c.read_response()
                seen.append(bytes(r.body))
                if r.status != 200:
                    errors.append(r.status)
            except OSError as exc:
                errors.append(repr(exc))
                c = RawClient(port, timeout=5)
        c.close()
    t = threading.Thread(target=client)
    t.start()
    try:
        time.sleep(0.5)
        mark = len(srv.requests)
        srv.set(ENDPOINT, "e2", [assignment("web", ups["up2"])])
        srv.wait_ack(ENDPOINT, "e2", after=mark)
        _eventually(lambda: seen and seen[-1] == b"hello from up2\n")
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors[:5]
    assert b"hello from up1\n" in seen and seen[-1] == b"hello from up2\n"


def test_rds_change_seen_on_a_keepalive_connection(plane):
    srv, port = plane["srv"], plane["port"]
    c = RawClient(port, timeout=5)
    c.request(path="/x")
    assert c.read_response().body == b"hello from up2\n"
    mark = len(srv.requests)
    srv.set(ROUTE, "r2", [route_config("routes", [
        {"match": {"path": "/x"}, "direct_response": {"status": 200,
                                                      "body": {"inline_string": "x route"}}},
        to_cluster("/", "web")])])
    srv.wait_ack(ROUTE, "r2", after=mark)
    c.request(path="/x")                    # the same connection, the new route table
    assert c.read_response().body == b"x route"
    c.close()
    # the workers were sent the route table alone: they kept the cluster EDS had changed,
    # with its new endpoints (new connections land on either worker)
    assert get_json(plane["admin"], "/xds")["last_apply"] == {"clusters_sent": 0,
                                                             "clusters_kept": 1}
    assert {_get(port) for _ in range(12)} == {(200, b"hello from up2\n")}


def test_refused_resource_is_nacked_and_old_config_serves(plane):
    srv, port = plane["srv"], plane["port"]
    mark = len(srv.requests)
    bad = eds_cluster("web")
    bad.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    srv.set(CLUSTER, "c2", [bad])
    nack = srv.wait_nack(CLUSTER, after=mark)
    assert nack.version_info == "c1"                    # the version still serving
    assert "web" in nack.error_detail.message and "lb_policy" in nack.error_detail.message
    assert _get(port, "/x") == (200, b"x route")
    assert _get(port, "/") == (200, b"hello from up2\n")
    mark = len(srv.requests)
    srv.set(CLUSTER, "c3", [eds_cluster("web")])        # fixed: accepted again
    srv.wait_ack(CLUSTER, "c3", after=mark)


def test_control_plane_away_and_back(plane):
    srv, ups, port = plane["srv"], plane["ups"], plane["port"]
    srv.stop()
    time.sleep(1.0)
    assert _get(port) == (200, b"hello from up2\n")     # serving while it is away
    mark = len(srv.requests)
    srv.start()                                         # same port
    again = srv.wait_request(lambda r: r.type_url == CLUSTER, after=mark, timeout=15)
    assert again.version_info == "c3"                   # it asks with what it has
    mark = len(srv.requests)
    srv.set(ENDPOINT, "e3", [assignment("web", ups["up1"])])
    srv.wait_ack(ENDPOINT, "e3", after=mark)
    assert _eventually(lambda: _get(port) == (200, b"hello from up1\n"))


def test_listener_removed_by_lds_refuses_at_once(plane):
    srv, port = plane["srv"], plane["port"]
    extra = free_port()
    mark = len(srv.requests)
    srv.set(LISTENER, "l2", [http_listener("ingress", port, "routes"),
                             http_listener("extra", extra, "routes")])
    srv.wait_ack(LISTENER, "l2", after=mark)
    assert _eventually(lambda: _get(extra)[0] == 200)
    mark = len(srv.requests)
    srv.set(LISTENER, "l3", [http_listener("ingress", port, "routes")])
    srv.wait_ack(LISTENER, "l3", after=mark)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", extra), timeout=2)
    st = get_json(plane["admin"], "/stats")
    assert "ingress" in st["listeners"]


def test_hot_restart_keeps_dynamic_listeners_serving(plane):
    """The new generation starts with the control plane's resources the old one held: the
    LDS listener never stops serving, and the new stream asks with the versions it serves."""
    import os
    import signal
    srv, port, admin = plane["srv"], plane["port"], plane["admin"]
    old = get_json(admin, "/stats")["server"]["supervisor_pid"]
    errors, done, stop = [], [0], threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, _ = _get(port)
                done[0] += 1
                if status != 200:
                    errors.append(status)
            except OSError as exc:
                errors.append(repr(exc))
    t = threading.Thread(target=client)
    t.start()
    mark = len(srv.requests)
    try:
        time.sleep(0.3)
        os.kill(plane["fm"].popen.pid, signal.SIGHUP)
        _eventually(lambda: get_json(admin, "/stats")["server"]["supervisor_pid"] != old,
                    timeout=20)
        first = srv.wait_request(lambda r: r.type_url == CLUSTER, after=mark, timeout=15)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors[:5]
    assert done[0] > 20
    assert first.version_info == "c3"
    assert _get(port) == (200, b"hello from up1\n")


def test_eds_change_keeps_pools_to_endpoints_that_stay(plane):
    srv, ups, port, admin = plane["srv"], plane["ups"], plane["port"], plane["admin"]

    def cx_total():
        return get_json(admin, "/stats")["clusters"]["web"]["upstream_cx_total"]
    c = RawClient(port, timeout=5)
    for _ in range(3):
        c.request(path="/")
        assert c.read_response().body == b"hello from up1\n"
    before = cx_total()
    mark = len(srv.requests)
    srv.set(ENDPOINT, "e4", [assignment("web", ups["up1"], ups["up2"])])
    srv.wait_ack(ENDPOINT, "e4", after=mark)
    seen = set()
    for _ in range(6):
        c.request(path="/")
        seen.add(bytes(c.read_response().body))
    c.close()
    assert seen == {b"hello from up1\n", b"hello from up2\n"}
    assert cx_total() == before + 1         # one new connection, to up2; up1's was kept


def test_config_dump_in_envoy_shape(plane):
    import json
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{plane['admin']}/config_dump?format=envoy",
                                timeout=5) as r:
        dump = json.loads(r.read())
    by_type = {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}
    assert set(by_type) == {"BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump",
                            "RoutesConfigDump", "EndpointsConfigDump", "SecretsConfigDump"}
    assert by_type["BootstrapConfigDump"]["bootstrap"]["node"]["cluster"] == "test"
    cl = by_type["ClustersConfigDump"]
    assert [c["cluster"]["name"] for c in cl["static_clusters"]] == ["xds_cluster"]
    dyn = cl["dynamic_active_clusters"]
    assert [c["cluster"]["name"] for c in dyn] == ["web"] and dyn[0]["version_info"] == "c3"
    assert dyn[0]["cluster"]["@type"].endswith("envoy.config.cluster.v3.Cluster")
    assert dyn[0]["last_updated"].endswith("Z")
    ls = by_type["ListenersConfigDump"]["dynamic_listeners"]
    assert [entry["name"] for entry in ls] == ["ingress"]
    eds = by_type["EndpointsConfigDump"]["dynamic_endpoint_configs"]
    assert eds[0]["endpoint_config"]["cluster_name"] == "web" and eds[0]["version_info"] == "e4"
    routes = by_type["RoutesConfigDump"]["dynamic_route_configs"]
    assert routes[0]["route_config"]["name"] == "routes"
    # the readable (native) dump stays the default
    with urllib.request.urlopen(f"http://127.0.0.1:{plane['admin']}/config_dump",
                                timeout=5) as r:
        assert "config" in json.loads(r.read())


def test_bolt_listener_from_the_control_plane(plane, tmp_path):
    """fastmesh.filters.network.bolt_proxy: a TypedStruct holding the native Bolt listener's
    fields and routes, pushed over LDS; real SOFARPC frames are routed by their service."""
    from pathlib import Path

    from envoy.config.listener.v3 import listener_pb2

    from fastmesh._core import bolt
    from fmtest import REPO, BoltClient
    from xds_server import msg
    srv, admin = plane["srv"], plane["admin"]
    echo_port = free_port()
    echo = Proc([sys.executable, "-m", "benchmarks.boltload", "echo-server", "--listen",
                 f"127.0.0.1:{echo_port}"], name="bolt echo", cwd=str(REPO))
    try:
        _eventually(lambda: socket.create_connection(("127.0.0.1", echo_port), 1).close()
                    or True)
        rpc_port = free_port()
        echo_cluster = msg(cluster_pb2.Cluster, {
            "name": "echo", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "echo", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": echo_port}}}}]}]}})
        rpc = msg(listener_pb2.Listener, {
            "name": "rpc",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": rpc_port}},
            "filter_chains": [{"filters": [{
                "name": "fastmesh.filters.network.bolt_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                    "type_url": "type.googleapis.com/fastmesh.filters.network.bolt_proxy.v1."
                                "BoltProxy",
                    "value": {"max_in_flight": 100, "routes": [
                        {"match": {"headers": [{"name": "service", "present": True}]},
                         "cluster": "echo"}]}}}]}]})
        mark = len(srv.requests)
        srv.set(CLUSTER, "c5", [eds_cluster("web"), echo_cluster])
        srv.wait_ack(CLUSTER, "c5", after=mark)
        srv.set(LISTENER, "l5", [http_listener("ingress", plane["port"], "routes"), rpc])
        srv.wait_ack(LISTENER, "l5", after=mark)
        frames = Path(__file__).resolve().parents[1] / "data" / "bolt-frames"
        req = bytearray(bytes.fromhex((frames / "bolt_request.hex").read_text().strip()))
        client = _eventually(lambda: BoltClient(rpc_port))
        for i in (7, 8):
            frame = bytearray(req)
            bolt.py_frame_set_id(frame, i)
            client.send(frame)
            f = client.read_frame()
            assert f["request_id"] == i and f["status"] == 0
        client.close()
        assert get_json(admin, "/stats")["listeners"]["rpc"]["downstream_rq_total"] == 2
    finally:
        echo.stop()


def test_cluster_with_http2_options(plane):
    """Istio sends clusters with HTTP/2 protocol options: such a cluster is taken (its
    endpoints spoken to over HTTP/2), and one with an HTTP/2 feature fastmesh does not have
    is NACKed naming that field (not "could not be decoded")."""
    from xds_server import msg
    srv = plane["srv"]

    def h2_cluster(**options):
        return msg(cluster_pb2.Cluster, {
            "name": "grpc-backend", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                             "HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": options}}}})
    # the listeners pushed so far name these clusters: keep them
    with srv.lock:
        current = list(srv.state[CLUSTER][1])
    mark = len(srv.requests)
    srv.set(CLUSTER, "c6", current + [h2_cluster()])
    srv.wait_ack(CLUSTER, "c6", after=mark)
    mark = len(srv.requests)
    srv.set(CLUSTER, "c7", current + [h2_cluster(allow_connect=True)])
    nack = srv.wait_nack(CLUSTER, after=mark)
    assert nack.version_info == "c6"
    assert "cluster 'grpc-backend'" in nack.error_detail.message and \
        "allow_connect" in nack.error_detail.message, nack.error_detail.message
