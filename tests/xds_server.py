"""A reference ADS server for the tests (grpcio + xds-protos): state of the world, scripted.

    srv = AdsServer(); srv.start()                  # on 127.0.0.1:<srv.port>
    srv.set(CLUSTER, "v1", [cluster_pb2.Cluster(...)])   # pushed to every subscribed stream
    srv.wait_request(lambda r: ...)                 # the DiscoveryRequests fastmesh sent
    srv.stop(); srv.start()                         # the control plane goes away, comes back

It answers a subscription (a request with a new nonce-less ask, or new resource names) with
the current version of that type; an ACK or NACK is recorded and answered with nothing. RDS
and EDS answers carry the resources asked for; LDS and CDS answers the whole set. Used for
fastmesh and for real Envoy alike, so both are driven by the same pushes.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

import fastmesh.xds.resources  # noqa: F401  (registers the typed_config message types)

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
WHOLE_SET = (LISTENER, CLUSTER)


def _name(msg) -> str:
    return getattr(msg, "cluster_name", "") or msg.name


class _Stream:
    def __init__(self, server: "AdsServer", peer: str):
        self.server = server
        self.peer = peer
        self.out: queue.Queue = queue.Queue()
        self.names: dict = {}          # type -> subscribed names (None: wildcard)
        self.nonce = 0

    def send_current(self, t: str) -> None:
        version, resources = self.server.state.get(t, ("", []))
        if not version or t not in self.names:
            return
        want = self.names[t]
        if want is not None and t not in WHOLE_SET:
            resources = [r for r in resources if _name(r) in want]
        self.nonce += 1
        resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=t,
                                               nonce=f"n{self.nonce}")
        for r in resources:
            a = any_pb2.Any()
            a.Pack(r)
            resp.resources.append(a)
        self.out.put(resp)


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, port: int = 0):
        self.port = port
        self.state: dict = {}           # type -> (version, [messages])
        self.requests: list = []        # (peer, DiscoveryRequest), in arrival order
        self.streams: list = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.grpc_server = None

    # -- life --

    def start(self) -> None:
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self.grpc_server)
        self.port = self.grpc_server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.grpc_server.start()

    def stop(self) -> None:
        with self.lock:
            for s in self.streams:
                s.out.put(None)
            self.streams.clear()
        if self.grpc_server is not None:
            self.grpc_server.stop(0).wait(5)
            self.grpc_server = None

    # -- scripting --

    def set(self, t: str, version: str, resources: list) -> None:
        with self.lock:
            self.state[t] = (version, list(resources))
            for s in self.streams:
                s.send_current(t)

    def wait_request(self, pred, timeout: float = 15.0, after: int = 0):
        """The first request (from index `after`) that pred accepts."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.requests)):
                    if pred(self.requests[i][1]):
                        return self.requests[i][1]
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [(r.type_url.rsplit(".", 1)[-1], r.version_info, r.response_nonce,
                              r.error_detail.message[:80]) for _, r in self.requests[after:]]
                    raise AssertionError(f"no such request; got {kinds}")
                self.cond.wait(left)

    def wait_ack(self, t: str, version: str, after: int = 0, timeout: float = 15.0):
        return self.wait_request(lambda r: r.type_url == t and r.version_info == version
                                 and r.response_nonce and not r.error_detail.message,
                                 timeout, after)

    def wait_nack(self, t: str, after: int = 0, timeout: float = 15.0):
        return self.wait_request(lambda r: r.type_url == t and r.error_detail.message,
                                 timeout, after)

    # -- the service --

    def StreamAggregatedResources(self, request_iterator, context):
        stream = _Stream(self, context.peer())
        with self.lock:
            self.streams.append(stream)

        def read():
            try:
                for req in request_iterator:
                    with self.cond:
                        self.requests.append((stream.peer, req))
                        self.cond.notify_all()
                        t = req.type_url
                        names = None if (t in WHOLE_SET and not req.resource_names) \
                            else set(req.resource_names)
                        changed = stream.names.get(t, "unset") != names
                        stream.names[t] = names
                        if not req.response_nonce or changed:
                            stream.send_current(t)
            except grpc.RpcError:
                pass
            finally:
                stream.out.put(None)
        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                resp = stream.out.get()
                if resp is None or not context.is_active():
                    return
                yield resp
        finally:
            with self.lock:
                if stream in self.streams:
                    self.streams.remove(stream)


# ------------------------------------------------------------------ resources to push

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
      "HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def msg(cls, data: dict):
    m = cls()
    json_format.ParseDict(data, m)
    return m


def eds_cluster(name: str):
    return msg(cluster_pb2.Cluster, {
        "name": name, "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}})


def assignment(name: str, *ports: int):
    return msg(endpoint_pb2.ClusterLoadAssignment, {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": p}}}}
            for p in ports]}]})


def http_listener(name: str, port: int, route_config: str):
    return msg(listener_pb2.Listener, {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM, "stat_prefix": name,
                "rds": {"route_config_name": route_config,
                        "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router",
                                  "typed_config": {"@type": ROUTER}}]}}]}]})


def route_config(name: str, routes: list):
    return msg(route_pb2.RouteConfiguration, {
        "name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]})


def to_cluster(prefix: str, cluster: str) -> dict:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}


def bootstrap(admin_port: int, ads_port: int) -> dict:
    return {
        "node": {"id": "sidecar~127.0.0.1~test.default~default.svc.cluster.local",
                 "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {
                               "cluster_name": "xds_cluster",
                               "retry_policy": {"retry_back_off": {
                                   "base_interval": "0.2s", "max_interval": "1s"}}}}]},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"}},
        "static_resources": {"clusters": [{
            "name": "xds_cluster", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                             "HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": ads_port}}}}]}]}}]},
    }
