"""Hot restarts under load: how many requests are lost, how long a hand-over takes.

    python -m benchmarks.restarts [--restarts 20] [--interval-s 1.5] [--connections 20]
                                  [--path /drip-random/400] [--workers 2] [--group]

Starts the bundled HTTP upstream and `fastmesh run`, runs wrk against it for the whole time,
and sends SIGHUP to the service's main PID (--group: to its whole process group, as a
terminal hangup or a process manager would) every interval. The default path is a slow,
streaming upstream: each response head comes after 0-200 ms and its body in 8 pieces over
another 0-200 ms, so responses are always under way when a drain begins. Every generation logs
to the same file (it inherits the main process's stderr), so the timeline comes from the log:
SIGHUP -> "new generation accepting" (the new one has taken the sockets and its workers
accept) -> "handed over; exiting" (the old one is drained). Checks that the main PID never
changes. Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _ts(line: str) -> float:
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.restarts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--interval-s", type=float, default=1.5)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--path", default="/drip-random/400",
                    help="what wrk asks for (the bundled upstream's paths; / is instant)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--group", action="store_true",
                    help="send SIGHUP to the process group instead of the main PID")
    ap.add_argument("--out", default=None, help="write the JSON summary here too")
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="fm-restarts-")
    up_port, port, admin = _free_port(), _free_port(), _free_port()
    cfg = f"""
admin: {{address: "127.0.0.1:{admin}"}}
drain_timeout_ms: 10000
listeners: [{{name: web, address: "127.0.0.1:{port}", protocol: http1, route_table: rt}}]
route_tables: {{rt: {{routes: [{{match: {{prefix: "/"}}, cluster: up}}]}}}}
clusters: [{{name: up, endpoints: ["127.0.0.1:{up_port}"]}}]
"""
    path = os.path.join(tmp, "fastmesh.yaml")
    with open(path, "w") as f:
        f.write(cfg)
    log_path = os.path.join(tmp, "fastmesh.log")
    log = open(log_path, "w")
    up = subprocess.Popen([sys.executable, "-P", "-m", "fastmesh.demo.upstream", "--listen",
                           f"127.0.0.1:{up_port}", "--name", "up"], stdout=subprocess.PIPE)
    up.stdout.readline()
    fm = subprocess.Popen([sys.executable, "-P", "-m", "fastmesh", "run", "-c", path, "--log-level",
                           "info", "--upgrade-socket", os.path.join(tmp, "upgrade.sock"),
                           "--workers", str(args.workers), "--loop", args.loop],
                          stderr=log, start_new_session=True)
    main_pid_changed = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                _get(f"http://127.0.0.1:{admin}/stats")
                break
            except OSError:
                time.sleep(0.05)
        duration = int(args.restarts * args.interval_s + 3)
        wrk = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{duration}s",
                                f"http://127.0.0.1:{port}{args.path}"], stdout=subprocess.PIPE,
                               text=True)
        time.sleep(1.0)
        for i in range(args.restarts):
            server = _get(f"http://127.0.0.1:{admin}/stats")["server"]
            main_pid_changed += server["pid"] != fm.pid
            sup = server["supervisor_pid"]
            if args.group:
                os.killpg(fm.pid, signal.SIGHUP)
            else:
                os.kill(fm.pid, signal.SIGHUP)
            t_end = time.monotonic() + args.interval_s
            while time.monotonic() < t_end:        # wait for this hand-over to finish
                try:
                    if _get(f"http://127.0.0.1:{admin}/stats")["server"]["supervisor_pid"] != sup:
                        break
                except OSError:
                    pass
                time.sleep(0.02)
            time.sleep(max(0.0, t_end - time.monotonic()))
            print(f"\r[{i + 1}/{args.restarts}] restarts", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        out = wrk.communicate(timeout=duration + 60)[0]
        time.sleep(1.0)
    finally:
        alive_at_end = fm.poll() is None
        fm.send_signal(signal.SIGTERM)
        try:
            fm.wait(30)
        except subprocess.TimeoutExpired:
            fm.kill()
        up.terminate()
        log.close()
    text = open(log_path).read().splitlines()
    hups = [_ts(l) for l in text if "SIGHUP: hot restart" in l]
    accepting = [_ts(l) for l in text if "new generation accepting after" in l]
    exits = [_ts(l) for l in text if "handed over; exiting" in l]
    to_accept = [(a - h) * 1000 for h, a in zip(hups, accepting)]
    to_exit = [(e - h) * 1000 for h, e in zip(hups, exits)]
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    summary = {
        "restarts": args.restarts, "completed_handovers": len(exits),
        "requests": reqs, "path": args.path, "workers": args.workers, "loop": args.loop,
        "signal_to": "process group" if args.group else "main pid",
        "main_pid_changed": main_pid_changed, "main_alive_at_end": alive_at_end,
        "main_exit_code": fm.returncode,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "hup_to_new_accepting_ms": {
            "median": round(statistics.median(to_accept), 1) if to_accept else None,
            "max": round(max(to_accept), 1) if to_accept else None},
        "hup_to_old_exit_ms": {
            "median": round(statistics.median(to_exit), 1) if to_exit else None,
            "max": round(max(to_exit), 1) if to_exit else None},
        "log": log_path,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    ok = (summary["non_2xx"] == 0 and summary["socket_errors"] == 0 and not main_pid_changed
          and alive_at_end and len(exits) == args.restarts)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
