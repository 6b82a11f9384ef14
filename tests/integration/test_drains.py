"""Drains, reloads and hot restarts that lose nothing, tried the way production fails: slow
upstreams that stream their bodies, clients that reuse a connection the instant a response
ends, signals sent to the main PID, to the process group and to single workers, and a parent
that watches the PID as systemd does (with its notify protocol).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from fmtest import (RawClient, free_port, get_json, pid_alive,
                    post_json, supervisor_pid, wait_gone, wait_new_generation, wait_ready, wrk_result,
                    wrk_start)





def http_cfg(upstream: str, **top) -> dict:
    return dict({
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "drain_timeout_ms": 8000,
        "listeners": [{"name": "web", "address": f"127.0.0.1:{free_port()}",
                       "protocol": "http1", "route_table": "rt"}],
        "route_tables": {"rt": {"routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}},
        "clusters": [{"name": "up", "endpoints": [upstream]}],
    }, **top)


def _port(cfg, i=0) -> int:
    return int(cfg["listeners"][i]["address"].rsplit(":", 1)[1])


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):      # gone meanwhile
        return []


def _tree(pid: int) -> set:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(_children(p))
    return out





def _refused_within(port: int, seconds: float) -> bool:
    """A connection attempt is refused (not accepted-and-ignored) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        else:
            s.close()
        time.sleep(0.02)
    return False


# -------------------------------------------------- a response under way when the drain begins

DRAIN_KINDS = ["sighup", "sighup-group", "second-run", "sigterm", "reload-remove"]


@pytest.mark.parametrize("kind", DRAIN_KINDS)
def test_response_started_before_drain_then_next_request_is_answered(
        deployment, start_upstream, loop_kind, kind):
    """A response whose head left before the drain promised keep-alive; its body streams for
    1.5 s across the drain. The client's next request, sent the instant the body ends, is
    answered (with Connection: close) instead of meeting a closed socket."""
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg, loop=loop_kind)
    d.start()
    port = _port(cfg)
    c = RawClient(port, timeout=15)
    c.request(path="/drip/0/1500/6")
    time.sleep(0.2)                                     # the head has left
    old = supervisor_pid(d.admin_port)
    if kind == "sighup":
        d.hup()
    elif kind == "sighup-group":
        os.killpg(d.main_pid, signal.SIGHUP)            # every process of the service
    elif kind == "second-run":
        d.start(wait=False)
    elif kind == "sigterm":
        os.kill(d.main_pid, signal.SIGTERM)
    else:
        cfg2 = json.loads(json.dumps(cfg))
        cfg2["listeners"][0].update(name="web2", address=f"127.0.0.1:{free_port()}")
        d.write(cfg2)
        status, out = post_json(d.admin_port, "/reload")
        assert status == 200, out
    if kind.startswith("sighup") or kind == "second-run":
        wait_new_generation(d.admin_port, old)          # the old generation drains now
    r = c.read_response()
    assert r.status == 200 and len(r.body) == 60
    assert r.header("connection") != "close"            # the head promised keep-alive...
    c.request(path="/")                                 # ...so the client reuses it at once
    r2 = c.read_response()
    assert r2.status == 200 and r2.body == b"hello from up\n"
    assert r2.header("connection") == "close"
    assert c.is_closed(5)
    c.close()
    if kind == "sigterm":
        assert d.procs[0].popen.wait(15) == 0


def test_restarts_under_slow_streaming_load_lose_nothing(deployment, start_upstream, loop_kind):
    """20 keep-alive clients against an upstream that answers in 0-100 ms and streams its
    body in pieces; hot restarts by SIGHUP to the main PID, by SIGHUP to the process group
    and by a second `run`: wrk sees no error and no non-2xx."""
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg, loop=loop_kind, workers=2)
    d.start()
    port = _port(cfg)
    load = wrk_start(port, 10, conns=20, path="/drip-random/200")
    for how in ("main", "group", "second-run", "main"):
        time.sleep(1.2)
        old = supervisor_pid(d.admin_port)
        if how == "main":
            d.hup()
        elif how == "group":
            os.killpg(d.current_main_pid(), signal.SIGHUP)
        else:
            d.start(wait=False)
        wait_new_generation(d.admin_port, old)
        wait_gone(old, 15)
    reqs, out = wrk_result(load)
    assert reqs > 300, out
    assert "Socket errors" not in out and "Non-2xx" not in out, out


# ------------------------------------------------------------------ signals and the main PID

def test_sighup_to_process_group_restarts_once_and_kills_nothing(deployment, start_upstream):
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg, workers=2)
    d.start()
    port = _port(cfg)
    slow = RawClient(port, timeout=15)
    slow.request(path="/slow/1500")
    time.sleep(0.2)
    st = get_json(d.admin_port, "/stats")["server"]
    old_sup, old_workers = st["supervisor_pid"], st["worker_pids"]
    os.killpg(d.main_pid, signal.SIGHUP)        # a terminal hangup / a manager's group signal
    wait_new_generation(d.admin_port, old_sup)
    r = slow.read_response()                    # the old worker was not killed by the HUP
    assert r.status == 200 and r.body == b"slow done\n"
    slow.close()
    for pid in [old_sup] + old_workers:
        wait_gone(pid)
    time.sleep(1.0)
    st = get_json(d.admin_port, "/stats")["server"]
    assert st["generation"] == 2                # one restart, not one per process
    assert st["pid"] == d.main_pid and pid_alive(d.main_pid)
    assert st["worker_restarts"] == 0


@pytest.mark.parametrize("delay_s", [0.06, 0.15, 0.4])
def test_sighup_right_after_start_is_not_fatal(deployment, start_upstream, delay_s):
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg)
    p = d.start(wait=False)
    time.sleep(delay_s)
    os.kill(p.popen.pid, signal.SIGHUP)
    wait_ready(d.admin_port, p)
    time.sleep(1.5)                             # a deferred restart, if any, has run
    assert p.popen.poll() is None, p.stderr_text()
    with RawClient(_port(cfg)) as c:
        c.request(path="/")
        assert c.read_response().status == 200
    assert get_json(d.admin_port, "/stats")["server"]["pid"] == p.popen.pid
    assert "SIGHUP" in p.stderr_text()


def test_main_pid_stable_across_restarts_with_systemd_notify(deployment, start_upstream,
                                                             tmp_path):
    """A parent that watches the PID it started, as systemd does (Type=notify): the PID stays
    the service's main process across hot restarts, READY/RELOADING/STOPPING arrive on
    NOTIFY_SOCKET, and nothing of any generation is left after SIGTERM."""
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg, workers=2)
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(15)

    def next_notice(want: str) -> str:
        while True:
            msg = notify.recv(4096).decode()
            if want in msg.split("\n"):
                return msg

    p = d.start(env={"NOTIFY_SOCKET": notify_path})
    main = p.popen.pid
    assert f"MAINPID={main}" in next_notice("READY=1")
    seen = set()
    for _ in range(3):
        old = supervisor_pid(d.admin_port)
        seen |= _tree(main)
        d.hup()
        next_notice("RELOADING=1")
        next_notice("READY=1")
        wait_new_generation(d.admin_port, old)
        wait_gone(old)
        assert p.popen.poll() is None           # the watched PID never went away
        st = get_json(d.admin_port, "/stats")["server"]
        assert st["pid"] == main
        assert st["supervisor_pid"] in _children(main)  # generations are its children
    with RawClient(_port(cfg)) as c:
        c.request(path="/")
        assert c.read_response().status == 200
    seen |= _tree(main)
    p.popen.send_signal(signal.SIGTERM)
    next_notice("STOPPING=1")
    assert p.popen.wait(15) == 0
    for pid in seen - {main}:
        wait_gone(pid, 5)                       # no old generation, worker or zombie left
    notify.close()


# --------------------------------------------------- nobody will serve: refuse at once

def test_sigterm_refuses_new_connections_while_draining(deployment, start_upstream, loop_kind):
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg, loop=loop_kind, workers=2)
    p = d.start()
    port = _port(cfg)
    slow = RawClient(port, timeout=15)
    slow.request(path="/drip/0/2000/4")
    time.sleep(0.2)
    t0 = time.monotonic()
    p.popen.send_signal(signal.SIGTERM)
    assert _refused_within(port, 1.0)           # refused, not accepted and left hanging
    assert time.monotonic() - t0 < 1.5
    r = slow.read_response()                    # while the one in flight finishes
    assert r.status == 200 and len(r.body) == 40
    slow.close()
    assert p.popen.wait(15) == 0


def test_reload_removing_a_listener_refuses_at_once(deployment, start_upstream, loop_kind):
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    cfg["listeners"].append({"name": "extra", "address": f"127.0.0.1:{free_port()}",
                             "protocol": "http1", "route_table": "rt"})
    d = deployment(cfg, loop=loop_kind, workers=2)
    d.start()
    slow = RawClient(_port(cfg, 1), timeout=15)
    slow.request(path="/drip/0/1500/3")
    time.sleep(0.2)
    cfg2 = json.loads(json.dumps(cfg))
    del cfg2["listeners"][1]
    d.write(cfg2)
    status, out = post_json(d.admin_port, "/reload")
    assert status == 200, out
    assert _refused_within(_port(cfg, 1), 1.0)
    r = slow.read_response()
    assert r.status == 200 and len(r.body) == 30
    slow.close()
    with RawClient(_port(cfg)) as c:            # the listener that stays is untouched
        c.request(path="/")
        assert c.read_response().status == 200


def test_connections_queued_at_sigterm_are_served(deployment, start_upstream):
    """Connections the kernel completed before the listener closed are accepted and served
    (with Connection: close), not reset."""
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg)
    p = d.start()
    port = _port(cfg)
    busy = RawClient(port, timeout=15)
    busy.request(path="/slow/800")
    time.sleep(0.2)
    worker = get_json(d.admin_port, "/stats")["server"]["worker_pids"][0]
    os.kill(worker, signal.SIGSTOP)             # the worker stops accepting for a while
    try:
        queued = [RawClient(port, timeout=15) for _ in range(5)]   # handshakes complete
        for c in queued:
            c.request(path="/")
        p.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    finally:
        os.kill(worker, signal.SIGCONT)
    for c in queued:
        r = c.read_response()
        assert r.status == 200 and r.header("connection") == "close"
        c.close()
    assert busy.read_response().status == 200
    busy.close()
    assert p.popen.wait(15) == 0


# ------------------------------------------------------------------------ workers

def test_connections_spread_over_workers(deployment, start_upstream):
    """40 connections opened first and used afterwards: each of 2 workers gets a fair share
    (SO_REUSEPORT), and /stats shows the spread."""
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg, workers=2)
    d.start()
    port = _port(cfg)
    clients = [RawClient(port) for _ in range(40)]
    time.sleep(0.2)
    for c in clients:
        c.request(path="/")
    for c in clients:
        assert c.read_response().status == 200
    spread = get_json(d.admin_port, "/stats")["server"]["worker_connections"]
    for c in clients:
        c.close()
    assert len(spread) == 2
    counts = sorted(w["downstream_cx_total"] for w in spread)
    assert sum(counts) == 40
    assert counts[0] >= 8, spread               # binomial(40, 1/2): below 8 is p < 1e-4


def test_worker_sent_sigterm_finishes_and_is_replaced(deployment, start_upstream, loop_kind):
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg, loop=loop_kind)
    d.start()
    port = _port(cfg)
    slow = RawClient(port, timeout=15)
    slow.request(path="/drip/0/2000/4")
    time.sleep(0.2)
    victim = get_json(d.admin_port, "/stats")["server"]["worker_pids"][0]
    os.kill(victim, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        st = get_json(d.admin_port, "/stats")["server"]
        if st["worker_pids"] and victim not in st["worker_pids"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert pid_alive(victim)                    # still finishing its request...
    with RawClient(port) as c:                  # ...while the replacement serves new ones
        c.request(path="/")
        assert c.read_response().status == 200
    r = slow.read_response()
    assert r.status == 200 and len(r.body) == 40
    slow.close()
    wait_gone(victim)


def test_idle_keepalive_closed_in_drain_with_fin_not_rst(deployment, start_upstream):
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg)
    d.start()
    c = RawClient(_port(cfg))
    c.request(path="/")
    assert c.read_response().status == 200
    old = supervisor_pid(d.admin_port)
    d.hup()
    wait_new_generation(d.admin_port, old)
    c.sock.settimeout(5)
    assert c.sock.recv(1) == b""                # an orderly end of stream (no reset)
    c.close()
    wait_gone(old)


def test_generation_outlives_nothing_when_main_process_is_killed(deployment, start_upstream):
    """SIGKILL to the main process: its generation is told to drain (parent-death signal),
    so no orphaned supervisor keeps the ports."""
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg)
    p = d.start()
    sup = supervisor_pid(d.admin_port)
    p.popen.kill()
    p.popen.wait(5)
    wait_gone(sup, 15)


def test_idle_close_does_not_race_a_request_on_the_wire(deployment, start_upstream):
    """The drain's idle close is due while a request sits unread in the kernel (the old
    worker was stopped while the client sent it): the request is answered, with
    Connection: close, instead of the connection being closed under it."""
    up = start_upstream("up")
    cfg = http_cfg(up.address)
    d = deployment(cfg)
    d.start()
    c = RawClient(_port(cfg), timeout=10)
    c.request(path="/")
    assert c.read_response().status == 200
    st = get_json(d.admin_port, "/stats")["server"]
    old_sup, old_worker = st["supervisor_pid"], st["worker_pids"][0]
    d.hup()
    wait_new_generation(d.admin_port, old_sup)
    os.kill(old_worker, signal.SIGSTOP)
    try:
        time.sleep(1.5)                         # past the drain's 1 s idle grace
        c.request(path="/")                     # on the wire, unread
        time.sleep(0.1)
    finally:
        os.kill(old_worker, signal.SIGCONT)
    r = c.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    assert c.is_closed(5)
    c.close()
    wait_gone(old_sup)
