"""/dashboard in a real headless browser: Debian's chromium driven by playwright (never a
downloaded browser). One browser and one proxy deployment per module (per event loop).

A real fastmesh (two HTTP upstreams, a dead endpoint, an HTTP and a Bolt listener) is
watched while: the topology shows every name in the config; the dead endpoint is marked;
figures move under wrk load without a reload; a config reload shows in the timeline; the
page survives a hot restart and a full restart on the same admin port. A screenshot goes to
tests/artifacts/ (ignored by git).
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fmtest import (START_TIMEOUT_S, Deployment, Proc, _wait_line, free_port, get_json,
                    post_json, wait_new_generation, wait_ready)

CHROMIUM = os.environ.get("FASTMESH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no system chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def env(request, tmp_path_factory):
    loop = request.param
    started = []

    def upstream(name):
        p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                  "--name", name, "--loop", loop], name=f"upstream {name}")
        started.append(p)
        return f"127.0.0.1:{int(_wait_line(p, b'READY', START_TIMEOUT_S).split()[1])}"

    web, api = upstream("web"), upstream("api")
    dead = f"127.0.0.1:{free_port()}"
    bolt_dead = f"127.0.0.1:{free_port()}"
    cfg = {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "listeners": [
            {"name": "edge-http", "protocol": "http1", "route_table": "edge-routes",
             "address": f"127.0.0.1:{free_port()}"},
            {"name": "rpc-bolt", "protocol": "bolt", "route_table": "rpc-routes",
             "address": f"127.0.0.1:{free_port()}"}],
        "route_tables": {
            "edge-routes": {"virtual_hosts": [
                {"name": "shop-vhost", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/api"}, "cluster": "api-cluster"},
                    {"match": {"prefix": "/"}, "cluster": "web-cluster"}]}]},
            "rpc-routes": {"routes": [{"match": {"headers": [
                {"name": "service", "prefix": "com.example"}]}, "cluster": "rpc-cluster"}]}},
        "clusters": [
            {"name": "web-cluster", "endpoints": [web]},
            {"name": "api-cluster", "endpoints": [api, dead]},
            {"name": "rpc-cluster", "endpoints": [bolt_dead]}],
    }
    d = Deployment(tmp_path_factory.mktemp(f"dash-{loop}"), cfg, loop=loop)
    d.start()

    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    profile = tempfile.mkdtemp(prefix="fm-chromium-")
    # a fresh profile directory each time (playwright passes it as --user-data-dir)
    browser = pw.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True,
        viewport={"width": 1440, "height": 900},
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync"])
    page = browser.pages[0] if browser.pages else browser.new_page()
    errors: list = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{d.admin_port}/dashboard")
    page.wait_for_selector(".endpoint")
    yield {"d": d, "page": page, "errors": errors, "cfg": cfg, "dead": dead,
           "bolt_dead": bolt_dead, "web": web, "loop": loop}
    browser.close()
    pw.stop()
    shutil.rmtree(profile, ignore_errors=True)
    d.stop_all()
    for p in started:
        p.stop()


def _names(cfg) -> list:
    names = [l["name"] for l in cfg["listeners"]]
    names += list(cfg["route_tables"])
    for rt in cfg["route_tables"].values():
        names += [vh["name"] for vh in rt.get("virtual_hosts", [])]
    names += [c["name"] for c in cfg["clusters"]]
    names += [e for c in cfg["clusters"] for e in c["endpoints"]]
    return names


def _figure(page, selector, field) -> str:
    return page.locator(f'{selector} [data-field="{field}"]').first.inner_text()


def test_topology_shows_every_name(env):
    page = env["page"]
    text = page.locator("#map").inner_text()
    for name in _names(env["cfg"]):
        assert name in text, name
    assert page.locator('.listener[data-name="edge-http"]').count() == 1
    assert page.locator('.cluster[data-name="api-cluster"]').count() == 1
    assert page.locator('.endpoint[data-cluster="api-cluster"]').count() == 2
    # wires drawn from listeners to route tables to clusters to endpoints
    assert page.locator("#wires path").count() >= 5
    assert page.locator("#version").inner_text() == "1"
    assert not env["errors"], env["errors"]


def test_dead_endpoint_is_marked(env):
    page = env["page"]
    dead = page.locator(f'.endpoint[data-address="{env["dead"]}"]')
    dead.wait_for()
    page.wait_for_function(
        "a => document.querySelector(`.endpoint[data-address=\"${a}\"]`)"
        ".dataset.health === 'unreachable'", arg=env["dead"], timeout=10000)
    live = page.locator(f'.endpoint[data-address="{env["web"]}"]')
    assert live.get_attribute("data-health") == "healthy"
    # seen, not only machine-readable: the marked element looks different
    colour = lambda loc: loc.evaluate("e => getComputedStyle(e).borderLeftColor")  # noqa
    assert colour(dead) != colour(live)
    assert "unreachable" in dead.inner_text()


def test_figures_move_under_load(env):
    page, d = env["page"], env["d"]
    port = int(env["cfg"]["listeners"][0]["address"].rsplit(":", 1)[1])
    before = _figure(page, '.cluster[data-name="web-cluster"]', "upstream_rq_total")
    url_before = page.url
    wrk = subprocess.Popen(["wrk", "-t1", "-c4", "-d3s", f"http://127.0.0.1:{port}/"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page.wait_for_function(
            "() => parseFloat(document.querySelector('.cluster[data-name=\"web-cluster\"] "
            "[data-field=\"rq_per_s\"]').textContent) > 10", timeout=8000)
        rates = []
        for _ in range(6):
            rates.append(_figure(page, '.cluster[data-name="web-cluster"]', "rq_per_s"))
            time.sleep(0.3)
        assert len(set(rates)) > 1, rates               # several updates a second
        p99 = _figure(page, '.cluster[data-name="web-cluster"]', "p99_ms")
        assert p99.endswith(" ms"), p99
        assert _figure(page, '.listener[data-name="edge-http"]', "connections") != "–"
        ep_rate = _figure(page, f'.endpoint[data-address="{env["web"]}"]', "rq_per_s")
        assert float(ep_rate) > 0
        ep_p99 = _figure(page, f'.endpoint[data-address="{env["web"]}"]', "p99_ms")
        assert ep_p99.endswith(" ms"), ep_p99
    finally:
        wrk.wait(20)
    after = _figure(page, '.cluster[data-name="web-cluster"]', "upstream_rq_total")
    assert int(after) > int(before or 0)
    assert page.url == url_before                        # no reload
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"dashboard-{env['loop']}.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10000
    assert not env["errors"], env["errors"]


def test_reload_shows_in_timeline(env):
    page, d = env["page"], env["d"]
    cfg = copy.deepcopy(env["cfg"])
    cfg["clusters"].append({"name": "canary-cluster", "endpoints": [env["web"]]})
    cfg["route_tables"]["edge-routes"]["virtual_hosts"][0]["routes"].insert(
        0, {"match": {"prefix": "/canary"}, "cluster": "canary-cluster"})
    d.write(cfg)
    status, out = post_json(d.admin_port, "/reload")
    assert status == 200, out
    page.wait_for_selector('#timeline li[data-kind="cluster"][data-action="added"]'
                           '[data-name="canary-cluster"][data-source="file reload"]',
                           timeout=5000)
    page.wait_for_selector('#timeline li[data-kind="route"][data-source="file reload"]')
    page.wait_for_selector('.cluster[data-name="canary-cluster"]')
    assert page.locator("#version").inner_text() == "2"
    assert "/canary" in page.locator("#map").inner_text()
    env["cfg"] = cfg
    assert not env["errors"], env["errors"]


def test_page_reconnects_after_hot_restart_and_restart(env):
    page, d = env["page"], env["d"]
    old_sup = get_json(d.admin_port, "/stats")["server"]["supervisor_pid"]
    d.hup()
    wait_new_generation(d.admin_port, old_sup)
    page.wait_for_function("() => document.querySelector('#generation').textContent === '2'",
                           timeout=15000)
    page.wait_for_selector('#timeline li[data-source="hot restart"]', timeout=10000)
    page.wait_for_selector('#conn[data-state="live"]', timeout=10000)
    # a full restart on the same admin port: stop everything, start again
    d.stop_all()
    d.procs.clear()
    page.wait_for_selector('#conn[data-state="reconnecting"]', timeout=10000)
    d.start()
    page.wait_for_selector('#conn[data-state="live"]', timeout=15000)
    page.wait_for_function("() => document.querySelector('#generation').textContent === '1'",
                           timeout=10000)
    page.wait_for_selector('.cluster[data-name="canary-cluster"]')
    # the only console errors allowed are the refused connections while it was down
    others = [e for e in env["errors"] if "ERR_CONNECTION_REFUSED" not in e
              and "ERR_EMPTY_RESPONSE" not in e and "ERR_CONNECTION_RESET" not in e]
    assert not others, others
