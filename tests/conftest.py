"""Fixtures: real processes on loopback, always stopped at teardown (see fmtest.py)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from fmtest import (START_TIMEOUT_S, Deployment, Fastmesh, Proc, Upstream, _wait_line, free_port,
                    wait_ready)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture
def start_upstream(procs):
    def start(name="up", loop="uvloop") -> Upstream:
        proc = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen",
                     "127.0.0.1:0", "--name", name, "--loop", loop], name=f"upstream {name}")
        procs.append(proc)
        line = _wait_line(proc, b"READY", START_TIMEOUT_S)
        return Upstream(proc, int(line.split()[1]), name)
    return start


@pytest.fixture
def start_fastmesh(procs, tmp_path):
    def start(cfg: dict, loop="uvloop", extra_args=(), env=None) -> Fastmesh:
        cfg = json.loads(json.dumps(cfg))
        cfg.setdefault("admin", {"address": f"127.0.0.1:{free_port()}"})
        for l in cfg["listeners"]:
            l.setdefault("address", f"127.0.0.1:{free_port()}")
        path = tmp_path / f"fastmesh-{len(procs)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        penv = dict(os.environ, **(env or {}))
        proc = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--loop", loop,
                     "--log-level", "warning", *extra_args], env=penv, name="fastmesh")
        procs.append(proc)
        fm = Fastmesh(proc, cfg, path)
        wait_ready(fm.admin_port, proc)
        return fm
    return start


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    """Behaviour tests run once on uvloop and once on plain asyncio."""
    return request.param


@pytest.fixture
def deployment(tmp_path):
    """Make Deployments (fmtest.Deployment); every generation they started is stopped."""
    made = []

    def make(cfg, **kw):
        d = Deployment(tmp_path, cfg, **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.stop_all()
