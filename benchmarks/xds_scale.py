"""A control plane at scale, fastmesh and Envoy side by side (one after the other, same
pushes, same machine):

    python -m benchmarks.xds_scale [--clusters 1000] [--endpoints 10] [--changes 100]

For each proxy: a reference ADS server (tests/xds_server.py) pushes N EDS clusters of M
endpoints each, their N load assignments, one route configuration with N routes (plus a
catch-all) and one listener; then, under wrk load through the listener, it makes C EDS
changes (each replaces one cluster's endpoints; every tenth moves the cluster that carries
the load between two upstreams). Reported:

- push -> ACK: from the first push (the proxy is up and has subscribed to CDS and LDS)
  until all four types are acknowledged (ms);
- EDS change -> ACK (median, p95, ms), and EDS change -> traffic on the new upstream
  (median, max, ms, polled every 5 ms on its own keep-alive connection);
- RSS of all the proxy's processes after the push (MiB);
- HTTP errors during the changes (wrk: socket errors + non-2xx): must be 0.
Prints a JSON summary (and writes it with --out).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fmtest import (Proc, RawClient, _wait_line, find_envoy, free_port,  # noqa: E402
                    wait_envoy_ready, wait_ready)
from xds_server import (CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsServer,  # noqa: E402
                        assignment, bootstrap, eds_cluster, http_listener, route_config,
                        to_cluster)


def tree_rss_kib(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):     # gone meanwhile
            pass
    return total


def fake_assignment(name: str, i: int, m: int):
    # addresses nobody listens on: these clusters carry no traffic, they weigh on the config
    return assignment(name, *[20000 + (i * m + j) % 40000 for j in range(m)])


def run_side(who: str, args, ups: dict, tmp: Path) -> dict:
    n, m = args.clusters, args.endpoints
    srv = AdsServer()
    srv.start()
    admin, port = free_port(), free_port()
    path = tmp / f"{who}.yaml"
    import yaml
    path.write_text(yaml.safe_dump(bootstrap(admin, srv.port)))
    if who == "envoy":
        proc = Proc([find_envoy(), "-c", str(path), "--base-id", str(30000 + os.getpid() % 20000),
                     "--concurrency", "1", "-l", "warning"], name="envoy")
    else:
        proc = Proc([sys.executable, "-m", "fastmesh", "run", "-c", str(path), "--log-level",
                     "warning", "--upgrade-socket", str(tmp / "up.sock")], name="fastmesh")
    out: dict = {"proxy": who}
    try:
        names = [f"c{i}" for i in range(n)]
        clusters = [eds_cluster(c) for c in names]
        assignments = [assignment("c0", ups["up1"])] + [
            fake_assignment(c, i, m) for i, c in enumerate(names) if i]
        routes = [to_cluster(f"/{c}/", c) for c in names] + [to_cluster("/", "c0")]
        # the clock starts when the proxy is up and subscribed, not while it starts (Envoy
        # reports ready only after its first CDS/LDS answers: that is what is measured)
        srv.wait_request(lambda r: r.type_url == CLUSTER, timeout=60)
        srv.wait_request(lambda r: r.type_url == LISTENER, timeout=60)
        mark = len(srv.requests)
        t0 = time.monotonic()
        srv.set(CLUSTER, "c1", clusters)
        srv.set(ENDPOINT, "e1", assignments)
        srv.set(ROUTE, "r1", [route_config("routes", routes)])
        srv.set(LISTENER, "l1", [http_listener("ingress", port, "routes")])
        for t, v in ((CLUSTER, "c1"), (ENDPOINT, "e1"), (ROUTE, "r1"), (LISTENER, "l1")):
            srv.wait_ack(t, v, after=mark, timeout=120)
        out["push_to_ack_ms"] = round((time.monotonic() - t0) * 1000, 1)
        if who == "envoy":
            wait_envoy_ready(admin, proc)
        else:
            wait_ready(admin, proc)
        _wait_serving(port, b"hello from up1\n")
        time.sleep(1.0)
        out["rss_mib"] = round(tree_rss_kib(proc.popen.pid) / 1024, 1)
        wrk = subprocess.Popen(["wrk", "-t1", "-c10", f"-d{args.wrk_s}s",
                                f"http://127.0.0.1:{port}/c0/"], stdout=subprocess.PIPE,
                               text=True)
        time.sleep(0.5)
        acks, follows = [], []
        poll = RawClient(port, timeout=5)
        current = "up1"
        for k in range(1, args.changes + 1):
            version = f"e{k + 1}"
            if k % 10 == 0:
                current = "up2" if current == "up1" else "up1"
                assignments[0] = assignment("c0", ups[current])
            else:
                i = 1 + (k * 7) % (n - 1)
                assignments[i] = fake_assignment(f"c{i}", i + k, m)
            mark = len(srv.requests)
            t1 = time.monotonic()
            srv.set(ENDPOINT, version, assignments)
            if k % 10 == 0:
                want = f"hello from {current}\n".encode()
                while True:
                    poll.request(path="/c0/")
                    if bytes(poll.read_response().body) == want:
                        follows.append((time.monotonic() - t1) * 1000)
                        break
                    time.sleep(0.005)
            srv.wait_ack(ENDPOINT, version, after=mark, timeout=60)
            acks.append((time.monotonic() - t1) * 1000)
        poll.close()
        text = wrk.communicate(timeout=args.wrk_s + 60)[0]
        reqs = int(re.search(r"(\d+) requests in", text).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                         text)
        acks.sort()
        out.update({
            "eds_change_to_ack_ms": {"median": round(statistics.median(acks), 1),
                                     "p95": round(acks[int(len(acks) * 0.95) - 1], 1)},
            "eds_change_to_traffic_ms": {"median": round(statistics.median(follows), 1),
                                         "max": round(max(follows), 1)},
            "requests_during_changes": reqs,
            "http_errors": (int(non2xx.group(1)) if non2xx else 0)
            + (sum(int(x) for x in sock.groups()) if sock else 0),
        })
        return out
    finally:
        proc.stop()
        srv.stop()


def _wait_serving(port: int, want: bytes, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with RawClient(port, timeout=2) as c:
                c.request(path="/c0/")
                if bytes(c.read_response().body) == want:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the pushed listener never served")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.xds_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--wrk-s", type=int, default=60, help="load duration (covers the changes)")
    ap.add_argument("--peers", default="fastmesh,envoy")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fm-xds-scale-"))
    ups, procs = {}, []
    try:
        for name in ("up1", "up2"):
            p = Proc([sys.executable, "-m", "fastmesh.demo.upstream", "--listen", "127.0.0.1:0",
                      "--name", name], name=name)
            procs.append(p)
            ups[name] = int(_wait_line(p, b"READY", 15).split()[1])
        results = [run_side(who, args, ups, tmp) for who in args.peers.split(",")]
    finally:
        for p in procs:
            p.stop()
    summary = {"clusters": args.clusters, "endpoints_per_cluster": args.endpoints,
               "routes": args.clusters + 1, "eds_changes": args.changes, "results": results,
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if all(r.get("http_errors") == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
