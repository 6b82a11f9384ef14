"""SOFARPC providers discovered from ZooKeeper, end to end with real peers.

A real ZooKeeper (Debian's zookeeper jars, run by this module once on a free port with a
throw-away data dir), real sofa-rpc-node providers that register themselves through
sofa-rpc-node's own ZooKeeper registry (node/zk_provider.js), and a sofa-rpc-node client that
keeps calling through fastmesh's Bolt listener (node/zk_caller.js) and counts, per window,
which provider answered and how many calls failed.
"""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fmtest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bolt_peers import NODE, NODE_DIR, requires_node, stop_process  # noqa: E402

JAVA = shutil.which("java")
ZK_JARS = [j for j in ("/usr/share/java/zookeeper.jar", "/usr/share/java/zookeeper-jute.jar",
                       "/usr/share/java/slf4j-nop.jar") if os.path.exists(j)] or \
    sorted(glob.glob("/usr/share/zookeeper/*.jar") + glob.glob("/usr/share/zookeeper/lib/*.jar"))


def _zk_skip_reason():
    if JAVA is None:
        return "java is not installed (apt-get install zookeeperd)"
    if not any("zookeeper" in os.path.basename(j) for j in ZK_JARS):
        return "the ZooKeeper jars are not installed (apt-get install zookeeperd)"
    try:
        import kazoo  # noqa: F401
    except ImportError:
        return "kazoo is not installed"
    return None


pytestmark = [requires_node, pytest.mark.skipif(_zk_skip_reason() is not None,
                                                reason=_zk_skip_reason() or ""),
              pytest.mark.timeout(90)]

SERVICE = "com.example.EchoService:1.0"
PROVIDERS = "/sofa-rpc/com.example.EchoService/providers"


# ============================================================================ ZooKeeper

class ZooKeeper:
    """A standalone ZooKeeper server (the server class run directly with java)."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_port()
        self.proc = None
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.cfg = workdir / "zoo.cfg"
        self.cfg.write_text(
            "tickTime=500\n"                         # sessions from 1 s (2 ticks) up
            f"dataDir={workdir / 'data'}\n"
            f"clientPort={self.port}\nclientPortAddress=127.0.0.1\n"
            "minSessionTimeout=1000\nmaxSessionTimeout=60000\n"
            "admin.enableServer=false\n4lw.commands.whitelist=ruok\n")
        self.log = open(workdir / "zookeeper.log", "ab")

    @property
    def servers(self):
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s=40.0):
        self.proc = subprocess.Popen(
            [JAVA, "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-cp", ":".join(ZK_JARS), "org.apache.zookeeper.server.ZooKeeperServerMain",
             str(self.cfg)], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zookeeper exited {self.proc.returncode}: "
                                   f"{(self.dir / 'zookeeper.log').read_text()[-2000:]}")
            if self.ruok():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("zookeeper did not start")

    def ruok(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"ruok")
                return s.recv(16) == b"imok"
        except OSError:
            return False

    def stop(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def zk(tmp_path_factory):
    z = ZooKeeper(tmp_path_factory.mktemp("zookeeper")).start()
    yield z
    z.stop()
    z.log.close()


@pytest.fixture
def kz(zk):
    from kazoo.client import KazooClient
    c = KazooClient(hosts=zk.servers, timeout=5)
    c.start(timeout=15)
    yield c
    c.stop()
    c.close()


# ============================================================================ peers

class Provider:
    """zk_provider.js: registers itself in ZooKeeper through sofa-rpc-node's registry."""

    def __init__(self, zk, pid, version="1.0", weight=100, session_timeout_ms=30000,
                 leave_wait_ms=1500):
        self.id = pid
        self.err = open(os.devnull, "wb") if not os.environ.get("FASTMESH_TEST_VERBOSE") \
            else None
        self.proc = subprocess.Popen(
            [NODE, "zk_provider.js", "--zk", zk.servers, "--id", pid, "--version", version,
             "--weight", str(weight), "--session-timeout-ms", str(session_timeout_ms),
             "--leave-wait-ms", str(leave_wait_ms)],
            cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.port = None
        self.ready_at = None

    def wait_ready(self, timeout_s=30.0):
        box = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout_s)
        line = box[0] if box else b""
        if not line.startswith(b"READY "):
            self.stop()
            raise RuntimeError(f"provider {self.id} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.ready_at = time.monotonic()
        return self

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def leave(self, timeout_s=15.0):
        """Graceful: SIGTERM (unpublish, wait, close)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout_s)

    def kill(self):
        self.proc.kill()
        self.proc.wait(5)

    def stop(self):
        stop_process(self.proc)
        if self.err is not None:
            self.err.close()
            self.err = None


class Caller:
    """zk_caller.js: keeps calling whoami() through fastmesh; windows of results."""

    def __init__(self, host, version="1.0", concurrent=2, interval_ms=5):
        self.proc = subprocess.Popen(
            [NODE, "zk_caller.js", "--host", host, "--version", version, "--concurrent",
             str(concurrent), "--interval-ms", str(interval_ms)],
            cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        self.windows = []               # (monotonic time received, window dict)
        self.final = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if msg.get("done"):
                    self.final = msg
                elif "ok" in msg:
                    self.windows.append((time.monotonic(), msg))

    def ok_by(self, since=0.0):
        out = {}
        with self._lock:
            for t, w in self.windows:
                if t >= since:
                    for k, v in w["ok"].items():
                        out[k] = out.get(k, 0) + v
        return out

    def failed(self, since=0.0):
        with self._lock:
            return sum(w["fail"] for t, w in self.windows if t >= since)

    def errors(self):
        with self._lock:
            return [e for _, w in self.windows for e in w["errors"]][:10]

    def first_ok(self, pid, since=0.0):
        """When the first call answered by pid was reported (a 200 ms window's end)."""
        with self._lock:
            for t, w in self.windows:
                if t >= since and w["ok"].get(pid):
                    return t
        return None

    def wait_for(self, pred, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"zk_caller.js exited while waiting for {what}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: ok={self.ok_by()} "
                             f"failed={self.failed()} errors={self.errors()}")

    def finish(self, timeout_s=15.0):
        """Stop calling; the totals (calls in flight finish first)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reader.join(5)
        assert self.final is not None, "zk_caller.js gave no totals"
        return self.final

    def stop(self):
        stop_process(self.proc)


@pytest.fixture
def peers():
    started = []

    def provider(*a, **kw):
        p = Provider(*a, **kw)
        started.append(p)
        return p.wait_ready()

    def caller(*a, **kw):
        c = Caller(*a, **kw)
        started.append(c)
        return c
    peers.provider, peers.caller = provider, caller
    yield peers
    for p in reversed(started):
        p.stop()


def registry_config(zk, cluster=None, discovery=None, route=None):
    return {
        "listeners": [{"name": "rpc", "protocol": "bolt", "route_table": "rpc"}],
        "route_tables": {"rpc": {"routes": [dict(
            {"match": {"headers": [{"name": "service", "exact": SERVICE}]}, "cluster": "echo",
             "timeout_ms": 3000}, **(route or {}))]}},
        "clusters": [dict({"name": "echo", "discovery": {"zookeeper": dict(
            {"servers": zk.servers, "service": SERVICE}, **(discovery or {}))}},
            **(cluster or {}))],
    }


def admin_json(fm, path):
    status, body = fm.admin(path)
    assert status == 200, body
    return json.loads(body)


def cluster_addresses(fm, name="echo"):
    return sorted(e["address"] for e in admin_json(fm, "/clusters")[name])


# a fastmesh started with a registry config first connects its ZooKeeper session, then reads
# the providers: seconds on a loaded 2-core CI machine with the JVM beside the suite (5 s was
# seen to run out); later changes reach it through watches, within the shorter waits below
FIRST_DISCOVERY_S = 20


def wait_until(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def report(name, **figures):
    print(f"\n[registry] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ============================================================================ scenarios

def test_join_leave_other_version_and_clusters_view(zk, peers, start_fastmesh):
    """Providers join (calls reach them within a couple of seconds) and leave gracefully
    (0 failed calls); a provider of another version under the same interface never gets a
    call; /clusters and /config_dump show the source and the URL attributes."""
    fm = start_fastmesh(registry_config(zk))
    p1 = peers.provider(zk, "p1")
    other = peers.provider(zk, "v2", version="2.0")
    caller = peers.caller(f"127.0.0.1:{fm.port}")
    caller.wait_for(lambda: caller.ok_by().get("p1"), 10, "calls answered by p1")
    join1_s = caller.first_ok("p1") - p1.ready_at

    p2 = peers.provider(zk, "p2")
    caller.wait_for(lambda: caller.ok_by().get("p2"), 5, "calls answered by p2")
    join2_s = caller.first_ok("p2") - p2.ready_at

    clusters = admin_json(fm, "/clusters")["echo"]
    by_addr = {e["address"]: e for e in clusters}
    assert sorted(by_addr) == sorted([p1.address, p2.address])
    e = by_addr[p1.address]
    assert e["source"] == "registry"
    assert e["registry"]["weight"] == 100
    assert e["registry"]["serialization"] == "hessian2"
    assert e["registry"]["attributes"]["appName"] is not None
    assert "pid" in e["registry"]["attributes"]
    dump = admin_json(fm, "/config_dump")
    src = dump["endpoint_sources"]["echo"]
    assert src["source"] == "registry"
    assert {x["address"] for x in src["endpoints"]} == {p1.address, p2.address}
    assert dump["config"]["clusters"][0]["discovery"]["zookeeper"]["service"] == SERVICE
    stats = fm.cluster_stats("echo")
    assert stats["registry_providers"] == 2 and stats["registry_skipped"] >= 1

    t_leave = time.monotonic()
    p1.proc.send_signal(signal.SIGTERM)         # unpublish, wait 1.5 s, close
    wait_until(lambda: cluster_addresses(fm) == [p2.address], 5, "p1 gone from /clusters")
    gone_s = time.monotonic() - t_leave
    p1.proc.wait(10)
    caller.wait_for(lambda: caller.ok_by(since=time.monotonic()).get("p2") is not None
                    or caller.ok_by(since=t_leave + 2.0).get("p2"), 5, "calls after p1 left")
    totals = caller.finish()
    report("join/leave", join_first_s=round(join1_s, 2), join_second_s=round(join2_s, 2),
           leave_removed_s=round(gone_s, 2), calls=sum(totals["ok"].values()),
           failed=totals["fail"], by=totals["ok"])
    assert totals["fail"] == 0, totals["errors"]
    assert "v2" not in totals["ok"]
    assert join1_s < 3.0 and join2_s < 3.0
    other.stop()


def test_killed_provider_is_removed_at_session_expiry(zk, peers, start_fastmesh):
    """SIGKILL: the ephemeral node goes when its session expires (2 s here); fastmesh drops
    the endpoint then; a retry policy carries the calls caught on the dead connection."""
    fm = start_fastmesh(registry_config(zk, route={"retry_policy": {
        "retry_on": ["connect-failure", "reset"], "num_retries": 2}}))
    victim = peers.provider(zk, "k1", session_timeout_ms=2000)
    p2 = peers.provider(zk, "k2")
    caller = peers.caller(f"127.0.0.1:{fm.port}")
    caller.wait_for(lambda: {"k1", "k2"} <= set(caller.ok_by()), 10, "calls to both")
    t_kill = time.monotonic()
    victim.kill()
    wait_until(lambda: cluster_addresses(fm) == [p2.address], 10,
               "the killed provider's node to expire")
    removed_s = time.monotonic() - t_kill
    time.sleep(0.5)
    after = time.monotonic()
    time.sleep(1.0)
    assert caller.ok_by(since=after).get("k2")
    totals = caller.finish()
    report("kill", removed_after_s=round(removed_s, 2), calls=sum(totals["ok"].values()),
           failed=totals["fail"])
    assert removed_s < 6.0
    assert totals["fail"] == 0, totals["errors"]


def test_zookeeper_restart_while_calls_flow(zk, peers, start_fastmesh):
    """ZooKeeper stops and comes back while calls flow: the last known providers are used
    meanwhile (0 failed calls), and afterwards the watch works again (a new provider gets
    calls, one that leaves stops getting them)."""
    fm = start_fastmesh(registry_config(zk))
    p1 = peers.provider(zk, "r1")
    p2 = peers.provider(zk, "r2")
    caller = peers.caller(f"127.0.0.1:{fm.port}")
    caller.wait_for(lambda: {"r1", "r2"} <= set(caller.ok_by()), 10, "calls to both")
    zk.stop()
    down_at = time.monotonic()
    time.sleep(3.0)
    assert {"r1", "r2"} <= set(caller.ok_by(since=down_at + 1.0)), "calls stopped"
    reg = admin_json(fm, "/registry")
    assert reg["sessions"][0]["state"] in ("suspended", "lost", "connecting")
    zk.start()
    # within its session timeout (5 s) even when its first handshake hit the server
    # while it was still starting
    wait_until(lambda: admin_json(fm, "/registry")["sessions"][0]["state"] == "connected",
               8, "fastmesh to reconnect")
    reconnect_s = time.monotonic() - down_at
    p3 = peers.provider(zk, "r3")
    caller.wait_for(lambda: caller.ok_by(since=p3.ready_at).get("r3"), 8,
                    "calls to a provider registered after the restart")
    joined_s = caller.first_ok("r3", since=p3.ready_at) - p3.ready_at
    p1.leave()
    wait_until(lambda: cluster_addresses(fm) == sorted([p2.address, p3.address]), 8,
               "r1 gone after it left")
    totals = caller.finish()
    report("zk restart", zk_down_s=3.0, reconnected_after_s=round(reconnect_s, 2),
           new_provider_calls_after_s=round(joined_s, 2), calls=sum(totals["ok"].values()),
           failed=totals["fail"])
    assert totals["fail"] == 0, totals["errors"]


def test_weights_from_the_url(zk, peers, start_fastmesh):
    fm = start_fastmesh(registry_config(zk))
    peers.provider(zk, "w1", weight=100)
    peers.provider(zk, "w3", weight=300)
    wait_until(lambda: len(cluster_addresses(fm)) == 2, FIRST_DISCOVERY_S, "both providers")
    caller = peers.caller(f"127.0.0.1:{fm.port}", concurrent=2, interval_ms=2)
    caller.wait_for(lambda: sum(caller.ok_by().values()) >= 800, 20, "800 calls")
    totals = caller.finish()
    ratio = totals["ok"].get("w3", 0) / max(1, totals["ok"].get("w1", 0))
    report("weights", by=totals["ok"], ratio=round(ratio, 2))
    assert totals["fail"] == 0
    assert 2.4 <= ratio <= 3.6, totals["ok"]


def test_publish_registers_and_unregisters(zk, kz, procs, start_fastmesh):
    """publish: on a Bolt listener: fastmesh registers the service pointing at its listener
    (as sofa-rpc-node would), and removes it on drain."""
    from fastmesh.registry import urls
    port = free_port()
    cfg = {
        "listeners": [{"name": "inbound", "protocol": "bolt", "route_table": "local",
                       "address": f"127.0.0.1:{port}",
                       "publish": {"zookeeper": {"servers": zk.servers,
                                                 "services": ["com.example.PubService:1.0"],
                                                 "weight": 50, "app_name": "pubapp"}}}],
        "route_tables": {"local": {"routes": [{"match": {"headers": [
            {"name": "service", "prefix": "com.example."}]}, "cluster": "local"}]}},
        "clusters": [{"name": "local", "endpoints": ["127.0.0.1:1"]}],
    }
    fm = start_fastmesh(cfg)
    path = "/sofa-rpc/com.example.PubService/providers"

    def children():
        return kz.get_children(path) if kz.exists(path) else []
    wait_until(children, 5, "the published node")
    (child,) = children()
    p = urls.parse_provider(urls.decode_child(child))
    assert p.address == f"127.0.0.1:{port}"
    assert p.weight() == 50 and p.params["appName"] == "pubapp"
    sel = urls.select([child], urls.ServiceSpec.parse("com.example.PubService:1.0"))
    assert [x.address for x in sel.providers] == [f"127.0.0.1:{port}"]
    assert kz.exists(f"{path}/{child}").ephemeralOwner != 0
    assert admin_json(fm, "/registry")["published"][0]["service"] == "com.example.PubService:1.0"
    fm.proc.stop(signal.SIGTERM, timeout=15)
    assert children() == [], "the registration outlived the proxy"


def test_reload_changes_the_discovered_service(zk, peers, start_fastmesh):
    """A config reload that changes the discovery block: the new service's providers are
    read before the new config applies (no gap with an empty cluster)."""
    fm = start_fastmesh(registry_config(zk))
    a = peers.provider(zk, "a1")
    b = peers.provider(zk, "b2", version="2.0")
    wait_until(lambda: cluster_addresses(fm) == [a.address], FIRST_DISCOVERY_S,
               "the 1.0 provider")
    cfg = registry_config(zk, discovery={"service": "com.example.EchoService:2.0"})
    cfg["route_tables"]["rpc"]["routes"][0]["match"]["headers"][0]["exact"] = \
        "com.example.EchoService:2.0"
    cfg["admin"] = fm.cfg["admin"]
    cfg["listeners"][0]["address"] = fm.cfg["listeners"][0]["address"]
    import yaml
    fm.path.write_text(yaml.safe_dump(cfg))
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{fm.admin_port}/reload", method="POST",
                                 data=b"")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["ok"]
    assert cluster_addresses(fm) == [b.address]
    caller = peers.caller(f"127.0.0.1:{fm.port}", version="2.0")
    caller.wait_for(lambda: caller.ok_by().get("b2"), 5, "calls to the 2.0 provider")
    totals = caller.finish()
    assert totals["fail"] == 0 and set(totals["ok"]) == {"b2"}


def test_unregistered_provider_finishes_its_calls(zk, kz, peers, start_fastmesh):
    """A provider whose node goes while it still lives (unregistered by hand): the call in
    flight to it is answered, then fastmesh closes its idle connection to it."""
    from bolt_peers import client_command
    fm = start_fastmesh(registry_config(zk))
    p = peers.provider(zk, "u1")
    wait_until(lambda: cluster_addresses(fm) == [p.address], FIRST_DISCOVERY_S, "the provider")
    slow = subprocess.Popen(client_command(f"127.0.0.1:{fm.port}",
                                           [{"method": "slow", "args": [1500]}], 5000),
                            cwd=NODE_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: fm.cluster_stats("echo").get("upstream_rq_active"), 5,
                   "the slow call in flight")
        for child in kz.get_children(PROVIDERS):
            if f"%3A{p.port}%3F" in child or f":{p.port}?" in child:
                kz.delete(f"{PROVIDERS}/{child}")
        wait_until(lambda: cluster_addresses(fm) == [], 5, "the endpoint removed")
        out, _ = slow.communicate(timeout=10)
    finally:
        stop_process(slow)
    (result,) = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert result["ok"] and result["result"] == "slow-done", result
    wait_until(lambda: fm.cluster_stats("echo")["upstream_cx_active"] == 0, 5,
               "the connection to the removed provider closed")


def test_hot_restart_resubscribes_and_republishes(zk, kz, peers, deployment):
    """A hot restart: the new generation serves the providers at once (the old one hands
    over its lists, so even with ZooKeeper down), subscribes again, publishes its listener
    before the old generation withdraws its own; 0 failed calls throughout."""
    from fmtest import supervisor_pid, wait_gone, wait_new_generation
    cfg = registry_config(zk)
    cfg["admin"] = {"address": f"127.0.0.1:{free_port()}"}
    cfg["drain_timeout_ms"] = 5000
    port = free_port()
    cfg["listeners"][0]["address"] = f"127.0.0.1:{port}"
    cfg["listeners"][0]["publish"] = {"zookeeper": {"servers": zk.servers,
                                                    "services": ["com.example.Front:1.0"]}}
    d = deployment(cfg)
    d.start()
    front = "/sofa-rpc/com.example.Front/providers"
    p1 = peers.provider(zk, "h1")
    # one call at a time with pauses: the connection is idle often enough to be migrated
    # (a connection that always has a call in flight drains until drain_timeout_ms instead)
    caller = peers.caller(f"127.0.0.1:{port}", concurrent=1, interval_ms=10)
    caller.wait_for(lambda: caller.ok_by().get("h1"), 10, "calls to h1")
    wait_until(lambda: kz.exists(front) and len(kz.get_children(front)) == 1, 5, "published")
    (first_child,) = kz.get_children(front)

    old = supervisor_pid(d.admin_port)
    d.hup()
    new = wait_new_generation(d.admin_port, old)
    wait_gone(old, 15)
    wait_until(lambda: len(kz.get_children(front)) == 1 and kz.get_children(front) != [first_child],
               5, "only the new generation's registration")
    reg = get_admin(d.admin_port, "/registry")
    assert reg["subscriptions"]["echo"]["providers"] == [p1.address]

    # ZooKeeper down across a hot restart: the lists handed over serve
    zk.stop()
    t_down = time.monotonic()
    d.hup()
    newer = wait_new_generation(d.admin_port, new)
    wait_gone(new, 15)
    time.sleep(1.0)
    assert caller.ok_by(since=time.monotonic() - 0.8).get("h1"), "no calls after the restart"
    zk.start()
    wait_until(lambda: get_admin(d.admin_port, "/registry")["sessions"][0]["state"] ==
               "connected", 10, "the newest generation to connect")
    def registered():
        from kazoo.exceptions import KazooException
        try:            # the test's own session may be renewed after the outage
            return kz.exists(front) and len(kz.get_children(front)) >= 1
        except KazooException:
            return False
    wait_until(registered, 10, "the newest generation's registration")
    totals = caller.finish()
    report("hot restart", generations=3, zk_down_restart_s=round(time.monotonic() - t_down, 1),
           calls=sum(totals["ok"].values()), failed=totals["fail"])
    assert totals["fail"] == 0, totals["errors"]
    assert newer != new


def get_admin(port, path):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def test_single_process_mode(zk, peers, start_fastmesh):
    """workers: 0 (the sidecar's one process): the registry feeds the in-process plane."""
    cfg = registry_config(zk)
    cfg["workers"] = 0
    fm = start_fastmesh(cfg)
    p = peers.provider(zk, "s1")
    caller = peers.caller(f"127.0.0.1:{fm.port}")
    caller.wait_for(lambda: caller.ok_by().get("s1"), 5, "calls to s1")
    assert cluster_addresses(fm) == [p.address]
    totals = caller.finish()
    assert totals["fail"] == 0, totals["errors"]
