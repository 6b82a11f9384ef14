"""The comparison run: for each scenario, start its upstream, then for each round run every
proxy in turn (A B C, A B C, ...): start it fresh on its own CPU, warm it up, measure one
load run (throughput, latency, errors from the load generator; CPU and memory of the proxy
from /proc), stop it. Then medians over rounds, ratios against fastmesh, and the reports.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import signal
import subprocess
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import measure, report, upstreams
from .loadgen import LoadError, LoadGen, find_wrk, wrk_version
from .peers import PEERS, Peer
from .procs import ProcError, ProcSet, free_port
from .scenarios import Scenario

@dataclass
class Settings:
    scenarios: list[Scenario]
    peers: list[str]
    rounds: int
    duration_s: float
    warmup_s: float
    out_dir: Path
    smoke: bool = False
    quick: bool = False
    loadgen: str = "auto"          # auto | wrk | python
    upstream: str = "auto"         # auto | nginx | builtin
    rate: float | None = None        # latency-fixed-rate: None = the scenario's
    idle_conns: int | None = None    # idle-conns: None = the scenario's
    charts: bool = True
    syscalls: bool = False           # also count system calls per unit (an strace pass)


# -- machine ----------------------------------------------------------------------------------

def cpu_layout() -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"proxy": None, "load": None, "upstream": None,
                "note": "only one CPU available: nothing pinned"}
    return {"proxy": cpus[0], "load": cpus[1], "upstream": cpus[2] if len(cpus) > 2 else cpus[1]}


def raise_nofile() -> int:
    """Raise the open-files limit for us and our children: to 65536 if allowed (root), else
    to the hard limit. The new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(hard, 65536), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            continue
    return soft


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(versions: dict) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


# -- progress ---------------------------------------------------------------------------------

class Progress:
    """`[3/24] http1-small envoy round 2 ...`: one line rewritten in place on a terminal,
    one line per step otherwise."""

    def __init__(self, total: int):
        self.total = max(1, total)
        self.i = 0
        self.tty = sys.stdout.isatty()
        self.label = ""

    def step(self, label: str) -> None:
        self.i += 1
        self.label = f"[{self.i}/{self.total}] {label}"
        self._show(self.label + " ...", final=False)

    def done(self, summary: str) -> None:
        self._show(f"{self.label}: {summary}", final=not self.tty)

    def note(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def _show(self, text: str, final: bool) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K" + text[:200])
            sys.stdout.flush()
        elif final:
            print(text, flush=True)


# -- one measured round -----------------------------------------------------------------------

@dataclass
class Context:
    st: Settings
    cpus: dict
    log_dir: Path
    load: LoadGen
    procs: ProcSet
    commands: dict = field(default_factory=dict)


def tls_files(st: Settings, kind: str) -> tuple[str, str, str]:
    """A self-signed certificate for CN=localhost (made once per run with the openssl
    command): (certificate, key, both in one file for HAProxy)."""
    d = st.out_dir / "certs"
    cert, key, both = d / f"{kind}.crt", d / f"{kind}.key", d / f"{kind}.pem"
    if not both.exists():
        d.mkdir(parents=True, exist_ok=True)
        newkey = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
                  if kind == "ec" else ["-newkey", "rsa:2048"])
        subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        both.write_bytes(cert.read_bytes() + key.read_bytes())
    return str(cert), str(key), str(both)


def idle_count(st: Settings, scn: Scenario) -> int:
    return (st.idle_conns or scn.connections) if scn.kind == "idle" else 0


def probe_path(scn: Scenario, up) -> str:
    if scn.kind == "grpc":
        return up.paths["probe"]            # GET /stats: the gRPC server's counters
    return up.paths.get(scn.resource, "/") if up.paths else "/"


def run_load(ctx: Context, scn: Scenario, port: int, up, duration_s: float) -> dict:
    if scn.kind == "http":
        return ctx.load.http_closed(port, probe_path(scn, up), scn, duration_s)
    if scn.kind == "http-open":
        return ctx.load.http_open(port, probe_path(scn, up), scn, duration_s,
                                  ctx.st.rate or scn.rate)
    if scn.kind == "tcp":
        return ctx.load.tcp_bulk(port, up.proc, duration_s)
    if scn.kind == "bolt":
        return ctx.load.bolt(port, scn, duration_s)
    if scn.kind == "tls-handshake":
        return ctx.load.tls_handshakes(port, duration_s, scn.connections)
    if scn.kind == "h2":
        return ctx.load.h2load(port, probe_path(scn, up), scn, duration_s)
    if scn.kind == "grpc":
        return ctx.load.grpc_unary(port, up, scn, duration_s)
    raise ValueError(scn.kind)


def run_round(ctx: Context, scn: Scenario, peer: Peer, up, rnd: int) -> dict:
    st = ctx.st
    port = free_port()
    workdir = st.out_dir / "configs" / scn.name / peer.name
    cfg = peer.write_config(scn.mode, port, up.port, workdir,
                            maxconn=max(4096, idle_count(st, scn) + 1000),
                            tls=tls_files(st, scn.tls) if scn.tls else None, h2=scn.h2,
                            grpc=scn.grpc)
    argv = peer.argv(cfg, workdir)
    ctx.commands.setdefault(peer.name, argv)
    proc = ctx.procs.start(f"{scn.name}-{peer.name}-r{rnd}", argv, ctx.cpus["proxy"],
                           ctx.log_dir)
    out = {"round": rnd, "command": argv, "config": str(cfg)}
    try:
        try:
            peer.wait_ready(proc, port, scn.mode, probe_path(scn, up), tls=bool(scn.tls),
                            h2=scn.h2)
        except ProcError as exc:
            return dict(out, status="start_failed", error=str(exc))
        try:
            if scn.kind == "idle":
                out.update(idle_round(ctx, scn, proc, port, up))
            else:
                if st.warmup_s > 0:
                    run_load(ctx, scn, port, up, st.warmup_s)
                c0 = measure.cpu_sample(proc.pid)
                load = run_load(ctx, scn, port, up, st.duration_s)
                c1 = measure.cpu_sample(proc.pid)
                cpu = measure.cpu_delta(c0, c1)
                out.update(figures(load, cpu, measure.memory(proc.pid)))
                if scn.kind == "grpc":
                    grpc_verify(ctx, scn, port, out)
                if st.syscalls:
                    # a separate pass: strace slows the proxy, so its CPU is not this one's
                    calls, traced = measure.count_syscalls(
                        proc.pid, lambda: run_load(ctx, scn, port, up, min(st.duration_s, 3.0)))
                    if calls is not None and traced["units"]:
                        out["syscalls_per_unit"] = round(calls / traced["units"], 2)
        except (LoadError, ProcError) as exc:
            return dict(out, status="load_failed", error=str(exc))
        if not proc.alive():
            out.setdefault("errors", {})["proxy_exited"] = 1
            out["errors_total"] = out.get("errors_total", 0) + 1
            out["error"] = f"the proxy exited during the run: {proc.stderr_tail(600)}"
        out["status"] = "ok"
        return out
    finally:
        ctx.procs.stop(proc)


def grpc_verify(ctx: Context, scn: Scenario, port: int, out: dict) -> None:
    """One grpcio call through the proxy after the measured run: a failed call (not OK, no
    echo) counts as an error of the round; without grpcio it is only noted."""
    check = ctx.load.grpc_check(port, scn)
    out["grpc_check"] = check
    if check.get("ok") is False:
        out["errors"] = dict(out["errors"], grpc_check_failed=1)
        out["errors_total"] = out.get("errors_total", 0) + 1


def figures(load: dict, cpu: dict, mem: dict) -> dict:
    units = load["units"]
    lat = load.get("latency_us") or {}
    out = {
        "throughput": load["throughput"],
        "units": units,
        "duration_s": load["duration_s"],
        "latency_us": {k: lat.get(k) for k in ("p50", "p90", "p99", "p99.9", "max")},
        "cpu_s": cpu["cpu_s"],
        "cpu_util": cpu["cpu_util"],
        "cpu_us_per_unit": round(cpu["cpu_s"] * 1e6 / units, 2) if units else None,
        "cpu_sys_share": cpu["cpu_sys_share"],
        "processes": cpu["processes"],
        "threads": cpu["threads"],
        "rss_kib": mem["rss_kib"],
        "rss_peak_kib": mem["rss_peak_kib"],
        "errors": load["errors"],
        "errors_total": load["errors_total"],
        "load_tool": load["tool"],
        "load_raw": load["raw"],
    }
    for key in ("service_latency_us", "send_lateness_us"):
        if key in load:
            out[key] = load[key]
    return out


def idle_round(ctx: Context, scn: Scenario, proc, port: int, up) -> dict:
    before = measure.memory(proc.pid)
    c0 = measure.cpu_sample(proc.pid)

    def at_ready():
        time.sleep(1.0)                     # let the proxy settle after the last open
        return {"memory": measure.memory(proc.pid), "cpu": measure.cpu_sample(proc.pid)}

    load = ctx.load.idle_conns(ctx.procs, port, probe_path(scn, up), idle_count(ctx.st, scn),
                               at_ready)
    mem = load["at_ready"]["memory"]
    cpu = measure.cpu_delta(c0, load["at_ready"]["cpu"])
    opened = load["units"]
    delta = mem["rss_kib"] - before["rss_kib"]
    return {
        "throughput": load["throughput"],
        "units": opened,
        "duration_s": load["duration_s"],
        "latency_us": {},
        "cpu_s": cpu["cpu_s"],
        "cpu_util": None,
        "cpu_us_per_unit": round(cpu["cpu_s"] * 1e6 / opened, 2) if opened else None,
        "processes": cpu["processes"],
        "threads": cpu["threads"],
        "rss_before_kib": before["rss_kib"],
        "rss_kib": mem["rss_kib"],
        "rss_delta_kib": delta,
        "bytes_per_conn": round(delta * 1024 / opened) if opened else None,
        "rss_peak_kib": mem["rss_peak_kib"],
        "errors": load["errors"],
        "errors_total": load["errors_total"],
        "load_tool": load["tool"],
        "load_raw": load["raw"],
    }


def round_summary(r: dict, scn: Scenario) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {report.first_line(r.get('error', ''), 120)}"
    if scn.kind == "idle":
        s = (f"{r['throughput']} conns open, RSS {r['rss_kib'] / 1024:.1f} MiB "
             f"({report.nice(r['bytes_per_conn'])} B/conn)")
    else:
        p99 = (r.get("latency_us") or {}).get("p99")
        s = (f"{report.nice(r['throughput'])} {scn.unit}, "
             + (f"p99 {report.nice(p99)} µs, " if p99 is not None else "")
             + f"{report.nice(r['cpu_us_per_unit'])} CPU µs/{scn.cost_unit}"
             + (f", {r['syscalls_per_unit']} syscalls/{scn.cost_unit}"
                if r.get("syscalls_per_unit") is not None else ""))
    if r.get("errors_total"):
        s += f"  ERRORS {r['errors']}"
    return s


# -- summaries --------------------------------------------------------------------------------

def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summarize(scn: Scenario, rounds: list[dict]) -> dict:
    ok = [r for r in rounds if r["status"] == "ok"]
    errors_total = sum(r.get("errors_total", 0) for r in ok)
    out = {"status": "ok" if ok else rounds[0]["status"], "rounds_ok": len(ok),
           "rounds": rounds, "errors_total": errors_total, "median": {}}
    failed = [r for r in rounds if r["status"] != "ok"]
    if failed:
        out["error"] = failed[0].get("error", failed[0]["status"])
    if not ok:
        out["flagged"] = False
        return out
    m = out["median"]
    for key in ("throughput", "cpu_us_per_unit", "cpu_util", "cpu_sys_share", "rss_kib",
                "rss_peak_kib", "syscalls_per_unit",
                "rss_delta_kib", "bytes_per_conn"):
        vals = [r.get(key) for r in ok]
        if any(v is not None for v in vals):
            m[key] = _median(vals)
    m["latency_us"] = {p: _median([(r.get("latency_us") or {}).get(p) for r in ok])
                       for p in ("p50", "p99", "p99.9")}
    for key in ("service_latency_us", "send_lateness_us"):
        if any(key in r for r in ok):
            m[key] = {p: _median([r.get(key, {}).get(p) for r in ok])
                      for p in ("p50", "p99", "p99.9")}
    bad = [r for r in ok if r.get("errors_total")]
    out["flagged"] = bool(bad or failed)
    if out["flagged"]:
        kinds: dict = {}
        for r in bad:
            for k, v in r["errors"].items():
                kinds[k] = kinds.get(k, 0) + v
        parts = []
        if bad:
            parts.append(f"errors in {len(bad)}/{len(rounds)} rounds: "
                         + ", ".join(f"{k}={v}" for k, v in kinds.items()))
        if failed:
            parts.append(f"{len(failed)}/{len(rounds)} rounds failed")
        out["flag_reason"] = "; ".join(parts)
    return out


def ratios_and_winner(scn: Scenario, proxies: dict) -> tuple[dict, str | None]:
    def fig(peer, key):
        m = proxies[peer].get("median") or {}
        if key == "p99":
            return (m.get("latency_us") or {}).get("p99")
        return m.get(key)

    ok = [p for p, f in proxies.items() if f["status"] == "ok"]
    ratios = {}
    if "fastmesh" in ok:
        for peer in ok:
            if peer == "fastmesh":
                continue
            r = {}
            for key in ("throughput", "cpu_us_per_unit", "p99", "rss_peak_kib", "rss_kib"):
                a, b = fig("fastmesh", key), fig(peer, key)
                if a is not None and b:
                    r[key] = round(a / b, 3)
            ratios[peer] = r
    clean = [p for p in ok if not proxies[p]["flagged"]] or ok
    key = {"throughput": "throughput", "p99": "p99", "rss": "rss_kib"}[scn.better]
    scored = [(fig(p, key), p) for p in clean if fig(p, key) is not None]
    if not scored:
        return ratios, None
    best = max(scored) if scn.better == "throughput" else min(scored)
    return ratios, best[1]


# -- the whole run ----------------------------------------------------------------------------

def compare(st: Settings) -> dict:
    st.out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = st.out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    nofile = raise_nofile()
    cpus = cpu_layout()
    if cpus["load"] is not None:
        os.sched_setaffinity(0, {cpus["load"]})     # the harness stays off the proxy's CPU

    notes: list[str] = []
    if cpus.get("note"):
        notes.append(cpus["note"])
    peers: dict[str, Peer] = {}
    peer_info = {}
    for name in st.peers:
        p = PEERS[name]()
        found = p.find()
        peer_info[name] = {"available": found, "path": p.path, "version": p.version,
                           "reason": None if found else p.missing_reason}
        if found:
            peers[name] = p
        else:
            notes.append(f"{name} skipped: {p.missing_reason}")
    wrk = find_wrk() if st.loadgen in ("auto", "wrk") else None
    if st.loadgen == "wrk" and wrk is None:
        raise SystemExit("--loadgen wrk: wrk not found (apt-get install wrk)")
    versions = {name: info["version"] for name, info in peer_info.items()}
    versions["wrk"] = wrk_version(wrk) if wrk else None
    if st.upstream != "builtin":
        versions.setdefault("nginx", upstreams.find_nginx()[1])
    http_load = (f"wrk {versions['wrk']} (1 thread)" if wrk
                 else "benchmarks.httpload closed (Python)")

    results = {
        "schema": report.SCHEMA,
        "machine": machine_info(versions),
        "settings": {
            "scenarios": [s.name for s in st.scenarios], "peers": st.peers,
            "rounds": st.rounds, "duration_s": st.duration_s, "warmup_s": st.warmup_s,
            "quick": st.quick, "smoke": st.smoke, "rate_override": st.rate,
            "idle_conns_override": st.idle_conns, "nofile_limit": nofile, "cpus": cpus,
            "http_load": http_load, "http_upstream": None,
        },
        "peers": peer_info,
        "scenarios": {},
        "commands": {},
        "notes": notes,
    }
    for n in notes:
        print(f"note: {n}", flush=True)
    load = LoadGen(cpus["load"], log_dir, wrk)
    order = [p for p in st.peers if p in peers]
    progress = Progress(len(st.scenarios) * len(order) * st.rounds)
    interrupted = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for scn in st.scenarios:
            results["scenarios"][scn.name] = run_scenario(st, scn, peers, order, cpus,
                                                          log_dir, load, progress, results)
            report.write_json(results, st.out_dir)
    except KeyboardInterrupt as exc:
        interrupted = exc
        notes.append("interrupted: the results are partial")
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if st.charts:
            files, note = report.charts(results, st.out_dir)
            results["charts"] = files
            if note:
                notes.append(note)
        report.write_json(results, st.out_dir)
        report.write_markdown(results, st.out_dir)
    if interrupted is not None:
        raise interrupted
    return results


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_scenario(st, scn, peers, order, cpus, log_dir, load, progress, results) -> dict:
    info = {"kind": scn.kind, "mode": scn.mode, "description": scn.description,
            "unit": scn.unit, "cost_unit": scn.cost_unit, "better": scn.better,
            "connections": idle_count(st, scn) or scn.connections}
    if scn.kind == "http-open":
        info["rate"] = st.rate or scn.rate
    if scn.kind in ("h2", "grpc"):
        info["streams_per_connection"] = scn.inflight
    if scn.kind == "grpc":
        info["payload_bytes"] = scn.payload_bytes
    if scn.goal:
        info["goal"] = dict(scn.goal)
    load.commands.clear()
    rounds: dict[str, list] = {p: [] for p in order}
    skip: dict[str, str] = {}
    for p in order:
        why = peers[p].supports(scn.mode, scn.kind)
        if not why and scn.tls and not peers[p].tls_capable:
            why = "does not terminate TLS"
        if not why and scn.grpc and not peers[p].grpc_capable:
            why = "does not proxy gRPC (h2c on both sides)"
        elif not why and scn.h2 and not scn.grpc and not peers[p].h2_capable:
            why = "does not serve HTTP/2"
        if why:
            skip[p] = why
    if scn.kind == "idle" and results["settings"]["nofile_limit"] < idle_count(st, scn) + 512:
        why = (f"open-files limit {results['settings']['nofile_limit']} is too low for "
               f"{idle_count(st, scn)} connections")
        skip = {p: why for p in order}
    with ProcSet() as procs:
        ctx = Context(st, cpus, log_dir, load, procs, results["commands"])
        try:
            up = upstreams.start_for(scn.kind, procs, cpus["upstream"],
                                     st.out_dir / "configs" / "upstream", log_dir, st.upstream)
        except (ProcError, OSError) as exc:
            up = None
            skip = {p: f"upstream did not start: {exc}" for p in order}
        if up is not None:
            info["upstream"] = {"kind": up.kind, "command": up.argv, "version": up.version}
            if scn.kind in ("http", "http-open", "idle"):
                results["settings"]["http_upstream"] = f"{up.kind} {up.version or ''}".strip()
        for rnd in range(1, st.rounds + 1):
            for p in order:
                progress.step(f"{scn.name} {p} round {rnd}")
                if p in skip:
                    rounds[p].append({"round": rnd, "status": "skipped", "error": skip[p]})
                    progress.done(f"skipped: {report.first_line(skip[p], 100)}")
                    continue
                r = run_round(ctx, scn, peers[p], up, rnd)
                if r["status"] == "start_failed":
                    if p == "fastmesh" and scn.mode == "bolt":
                        r["status"] = "unsupported"
                    skip[p] = f"did not start in round {r['round']}"
                rounds[p].append(r)
                progress.done(round_summary(r, scn))
        info["load_commands"] = dict(load.commands)
    proxies = {p: summarize(scn, rounds[p]) for p in order}
    for p, fig in proxies.items():
        if fig["status"] == "skipped":
            fig["error"] = skip.get(p, fig.get("error"))
    ratios, winner = ratios_and_winner(scn, proxies)
    out = {"info": info, "proxies": proxies, "ratios_vs_fastmesh": ratios, "winner": winner}
    if scn.goal:
        out["goal"] = report.goal_check(out)
    return out
