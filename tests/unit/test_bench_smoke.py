"""The benchmark harness in --smoke mode: fastmesh and the bundled upstream only, ~1 s per
scenario, as a real subprocess. Checks the shape of results.json and that something got
through; no timing assertions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("http1-small", "tcp-bulk")

pytestmark = pytest.mark.timeout(180)

def proxy_log(out: Path, scenario: str) -> str:
    path = out / "logs" / f"{scenario}-fastmesh-r1.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    cmd = [sys.executable, "-m", "benchmarks", "compare", "--smoke", "--scenarios",
           ",".join(SCENARIOS), "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    text = (run.stdout + run.stderr).decode(errors="replace")
    path = out / "results.json"
    assert path.exists(), f"no results.json (rc {run.returncode}):\n{text[-3000:]}"
    return run.returncode, json.loads(path.read_text()), out, text


def test_results_json_shape(smoke):
    rc, results, out, text = smoke
    for key in ("schema", "machine", "settings", "peers", "scenarios", "commands", "notes"):
        assert key in results, key
    for key in ("cpu_model", "cpus", "kernel", "date", "versions"):
        assert key in results["machine"], key
    assert results["machine"]["versions"]["fastmesh"]
    assert results["settings"]["smoke"] is True
    assert results["settings"]["peers"] == ["fastmesh"]
    assert list(results["scenarios"]) == list(SCENARIOS)
    for name, scn in results["scenarios"].items():
        for key in ("info", "proxies", "ratios_vs_fastmesh", "winner"):
            assert key in scn, (name, key)
        fm = scn["proxies"]["fastmesh"]
        for key in ("status", "rounds", "median", "errors_total", "flagged"):
            assert key in fm, (name, key)
        assert len(fm["rounds"]) == 1
    assert (out / "report.md").read_text().startswith("# fastmesh vs its peers")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fastmesh_moved_something(smoke, scenario):
    rc, results, out, text = smoke
    fm = results["scenarios"][scenario]["proxies"]["fastmesh"]
    r = fm["rounds"][0]
    assert fm["status"] == "ok", f"{scenario}: {fm.get('error')}\n{text[-2000:]}"
    assert r["throughput"] > 0, (f"{scenario}: nothing got through: {r.get('errors')}\n"
                                 + proxy_log(out, scenario)[-2000:])
    assert 0 < r["cpu_sys_share"] <= 1
    assert r["units"] > 0
    assert r["cpu_s"] >= 0 and r["rss_peak_kib"] > 0
    assert fm["median"]["throughput"] == r["throughput"]


def test_exit_code(smoke):
    rc, results, out, text = smoke
    assert rc == 0, text[-3000:]
