"""Results out: results.json (everything, including per-round raw numbers), report.md (a
table per scenario with ratios against fastmesh), the same tables on the console, and PNG
charts (throughput, CPU per unit of work, p99 latency) when matplotlib is importable.

Ratios are fastmesh / peer on the same figure: for throughput above 1 means fastmesh is
faster; for CPU per request, latency and memory below 1 means fastmesh is cheaper.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = "fastmesh-bench/1"
REQUIRED_TOP = ("schema", "machine", "settings", "peers", "scenarios")
REQUIRED_PROXY = ("status", "rounds", "median", "errors_total", "flagged")


def nice(x) -> str:
    """A number for people: 41234.5 -> '41,234', 12.345 -> '12.3', None -> '-'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


# -- JSON -------------------------------------------------------------------------------------

def write_json(results: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def validate(results: dict) -> list[str]:
    """Problems with the shape of a results dict (empty when well formed)."""
    problems = [f"missing top-level key {k!r}" for k in REQUIRED_TOP if k not in results]
    if results.get("schema") != SCHEMA:
        problems.append(f"schema is {results.get('schema')!r}, expected {SCHEMA!r}")
    for name, scn in (results.get("scenarios") or {}).items():
        for key in ("info", "proxies", "ratios_vs_fastmesh", "winner"):
            if key not in scn:
                problems.append(f"scenarios.{name}: missing {key!r}")
        for peer, fig in (scn.get("proxies") or {}).items():
            for key in REQUIRED_PROXY:
                if key not in fig:
                    problems.append(f"scenarios.{name}.proxies.{peer}: missing {key!r}")
            if fig.get("status") == "ok" and not isinstance(
                    (fig.get("median") or {}).get("throughput"), (int, float)):
                problems.append(f"scenarios.{name}.proxies.{peer}: no median throughput")
    try:
        json.dumps(results, allow_nan=False)
    except ValueError as exc:
        problems.append(f"not strict JSON: {exc}")
    return problems


# -- tables -----------------------------------------------------------------------------------

def scenario_table(scn: dict) -> tuple[list[str], list[list[str]]]:
    info = scn["info"]
    ratios = scn.get("ratios_vs_fastmesh", {})
    idle = info["kind"] == "idle"
    open_loop = info["kind"] == "http-open"
    if idle:
        head = ["proxy", "status", "conns open", "RSS MiB", "RSS growth MiB", "bytes/conn",
                "errors", "fastmesh/peer RSS"]
    else:
        head = ["proxy", "status", info["unit"], "p50 µs", "p99 µs", "p99.9 µs",
                f"CPU µs/{info['cost_unit']}", "kernel %", "CPU % core", "peak RSS MiB", "errors",
                f"fastmesh/peer {info['unit']}", "fastmesh/peer CPU"]
        if open_loop:
            head.insert(6, "gen. late p99 µs")
        if any((f.get("median") or {}).get("syscalls_per_unit") is not None
               for f in scn["proxies"].values()):
            head.insert(head.index("kernel %"), f"syscalls/{info['cost_unit']}")
    rows = []
    for peer, fig in scn["proxies"].items():
        m = fig.get("median") or {}
        lat = m.get("latency_us") or {}
        status = fig["status"]
        if fig.get("flagged"):
            status += " (!)"
        r = ratios.get(peer, {})
        errs = fig.get("errors_total", 0)
        mib = (lambda k: None if m.get(k) is None else m[k] / 1024)
        if idle:
            rows.append([peer, status, nice(m.get("throughput")), nice(mib("rss_kib")),
                         nice(mib("rss_delta_kib")), nice(m.get("bytes_per_conn")),
                         str(errs), "" if peer == "fastmesh" else ratio(r.get("rss_kib"))])
        else:
            util = m.get("cpu_util")
            rows.append([peer, status, nice(m.get("throughput")), nice(lat.get("p50")),
                         nice(lat.get("p99")), nice(lat.get("p99.9")),
                         nice(m.get("cpu_us_per_unit")),
                         "-" if m.get("cpu_sys_share") is None
                         else f"{m['cpu_sys_share'] * 100:.0f}",
                         "-" if util is None else f"{util * 100:.0f}",
                         nice(mib("rss_peak_kib")), str(errs),
                         "" if peer == "fastmesh" else ratio(r.get("throughput")),
                         "" if peer == "fastmesh" else ratio(r.get("cpu_us_per_unit"))])
            if open_loop:
                rows[-1].insert(6, nice((m.get("send_lateness_us") or {}).get("p99")))
            if f"syscalls/{info['cost_unit']}" in head:
                rows[-1].insert(head.index(f"syscalls/{info['cost_unit']}"),
                                nice(m.get("syscalls_per_unit")))
    return head, rows


def goal_check(scn: dict) -> dict | None:
    """The scenario's goal against a peer (info.goal: peer, cpu_ratio_max, p99_ratio_max),
    checked on the fastmesh / peer ratios of the medians. None when it has no goal."""
    goal = scn["info"].get("goal")
    if not goal:
        return None
    peer = goal["peer"]
    r = scn.get("ratios_vs_fastmesh", {}).get(peer)
    out = {"peer": peer, "source": goal.get("source"),
           "cpu_ratio_max": goal.get("cpu_ratio_max"), "p99_ratio_max": goal.get("p99_ratio_max")}
    if r is None:
        out["met"] = None
        ran = scn.get("proxies", {})
        out["why"] = (f"{peer} was not in this run" if peer not in ran else
                      "fastmesh was not in this run" if "fastmesh" not in ran else
                      f"no ratio: fastmesh or {peer} has no result in this run")
        return out
    out["cpu_ratio"], out["p99_ratio"] = r.get("cpu_us_per_unit"), r.get("p99")
    checks = [(out["cpu_ratio"], goal.get("cpu_ratio_max")), (out["p99_ratio"],
                                                              goal.get("p99_ratio_max"))]
    checks = [(v, lim) for v, lim in checks if lim is not None]
    out["met"] = None if any(v is None for v, _ in checks) else \
        all(v <= lim for v, lim in checks)
    return out


def goal_line(scn: dict) -> str | None:
    g = goal_check(scn)
    if g is None:
        return None
    want = []
    if g["cpu_ratio_max"] is not None:
        want.append(f"CPU/{scn['info']['cost_unit']} <= {g['cpu_ratio_max']:g}x {g['peer']}'s")
    if g["p99_ratio_max"] is not None:
        want.append(f"p99 <= {g['p99_ratio_max']:g}x {g['peer']}'s")
    head = f"goal ({g['source']}): fastmesh " + " and ".join(want)
    if g["met"] is None and "why" in g:
        return f"{head}: not checked ({g['why']})"
    verdict = {True: "MET", False: "NOT MET", None: "not checked (a figure is missing)"}
    return (f"{head}: CPU {ratio(g.get('cpu_ratio'))}, p99 {ratio(g.get('p99_ratio'))}: "
            f"{verdict[g['met']]}")


def _problems(scn: dict) -> list[str]:
    out = []
    for peer, fig in scn["proxies"].items():
        if fig["status"] != "ok" and fig.get("error"):
            out.append(f"{peer}: {fig['status']}: {first_line(fig['error'])}")
        elif fig.get("flagged"):
            out.append(f"{peer}: flagged: {fig.get('flag_reason', 'errors')}")
        m = fig.get("median") or {}
        late = (m.get("send_lateness_us") or {}).get("p99")
        p99 = (m.get("latency_us") or {}).get("p99")
        if late is not None and p99 and late > 0.25 * p99:
            out.append(f"{peer}: the load generator itself sent late (p99 {nice(late)} µs "
                       f"against a p99 latency of {nice(p99)} µs): the tail is partly the "
                       "load side's (a busy CPU?), not the proxy's")
    return out


def first_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "..."


def markdown_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(head, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def headline(scn: dict) -> str:
    w = scn.get("winner")
    info = scn["info"]
    what = {"throughput": f"highest {info['unit']}", "p99": "lowest p99 latency",
            "rss": "lowest RSS"}[info["better"]]
    return f"{what}: {w}" if w else f"{what}: no clean result"


def console(results: dict) -> str:
    parts = []
    for name, scn in results["scenarios"].items():
        head, rows = scenario_table(scn)
        parts.append(f"\n== {name}: {scn['info']['description']}\n   {headline(scn)}")
        parts.append(text_table(head, rows))
        if goal_line(scn):
            parts.append(f"   {goal_line(scn)}")
        parts += [f"   ! {p}" for p in _problems(scn)]
    return "\n".join(parts) + "\n"


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    out = [
        "# fastmesh vs its peers",
        "",
        f"{m['date']} on {m['cpu_model']} ({m['cpus']} CPUs), Linux {m['kernel']}; "
        f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}.",
        f"Versions: {vers}.",
        f"{s['rounds']} round(s) of {s['duration_s']:g} s per proxy and scenario "
        f"(warm-up {s['warmup_s']:g} s), proxies run in alternation; figures are medians "
        f"over rounds. Proxy on CPU {s['cpus']['proxy']}, load generator on CPU "
        f"{s['cpus']['load']}, upstream on CPU {s['cpus']['upstream']}. "
        f"HTTP load: {s['http_load']}; "
        f"HTTP upstream: {s['http_upstream']}." + (" SMOKE RUN: not a measurement."
                                                   if s.get("smoke") else ""),
        "",
        "Ratios are fastmesh / peer: above 1 for throughput means fastmesh is faster; below "
        "1 for CPU per request, latency and RSS means fastmesh is cheaper. `(!)` marks a "
        "proxy with errors or failed rounds in that scenario: its medians include them.",
        "",
    ]
    for name, scn in results["scenarios"].items():
        head, rows = scenario_table(scn)
        out += [f"## {name}", "", scn["info"]["description"] + ".", "",
                f"**{headline(scn)}**", "", markdown_table(head, rows), ""]
        if goal_line(scn):
            out += [goal_line(scn), ""]
        probs = _problems(scn)
        if probs:
            out += [f"- {p}" for p in probs] + [""]
    if results.get("charts"):
        out += ["## Charts", ""] + [f"![{c}]({c})" for c in results["charts"]] + [""]
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    out += ["## Commands", "", "Proxies (pinned with `taskset -c "
            f"{s['cpus']['proxy']}`):", ""]
    for peer, argv in (results.get("commands") or {}).items():
        out.append(f"- {peer}: `{' '.join(map(str, argv))}`")
    seen = set()
    extra = []
    for scn in results["scenarios"].values():
        info = scn["info"]
        cmds = [("upstream", (info.get("upstream") or {}).get("command"))]
        cmds += sorted((info.get("load_commands") or {}).items())
        for what, argv in cmds:
            line = " ".join(map(str, argv or []))
            if argv and line not in seen:
                seen.add(line)
                extra.append(f"- {what}: `{line}`")
    if extra:
        out += ["", "Upstreams and load (last round of each kind):", ""] + extra
    return "\n".join(out) + "\n"


def write_markdown(results: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / "report.md"
    path.write_text(markdown(results))
    return path


# -- charts -----------------------------------------------------------------------------------

CHARTS = (   # file, title, which scenarios, figure from the medians, axis label
    ("throughput.png", "throughput", lambda info: info["better"] == "throughput",
     lambda m: m.get("throughput"), "{unit}"),
    ("cpu_per_unit.png", "proxy CPU per unit of work", lambda info: info["kind"] != "idle",
     lambda m: m.get("cpu_us_per_unit"), "CPU µs/{cost_unit}"),
    ("p99_latency.png", "p99 latency", lambda info: info["kind"] not in ("tcp", "idle"),
     lambda m: (m.get("latency_us") or {}).get("p99"), "p99 µs"),
    ("idle_rss.png", "RSS with idle connections", lambda info: info["kind"] == "idle",
     lambda m: None if m.get("rss_kib") is None else m["rss_kib"] / 1024, "RSS MiB"),
)


def charts(results: dict, out_dir: Path) -> tuple[list[str], str | None]:
    """(files written, note). The note says why there are none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no charts (pip install 'fastmesh[bench]')"
    written = []
    for fname, title, wanted, get, label in CHARTS:
        panels = []
        for name, scn in results["scenarios"].items():
            if not wanted(scn["info"]):
                continue
            bars = [(peer, get(fig.get("median") or {}), fig.get("flagged"))
                    for peer, fig in scn["proxies"].items() if fig["status"] == "ok"]
            bars = [b for b in bars if b[1] is not None]
            if bars:
                panels.append((name, scn["info"], bars))
        if not panels:
            continue
        cols = min(4, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (name, info, bars) in zip(axes.flat, panels):
            names = [b[0] for b in bars]
            colors = ["#d62728" if n == "fastmesh" else "#7f7f7f" for n in names]
            rects = ax.bar(names, [b[1] for b in bars], color=colors)
            for rect, b in zip(rects, bars):
                if b[2]:
                    rect.set_hatch("//")
            ax.set_title(name, fontsize=10)
            ax.set_ylabel(label.format(**info), fontsize=8)
            ax.tick_params(labelsize=8)
            ax.bar_label(rects, labels=[nice(b[1]) for b in bars], fontsize=7)
        fig.suptitle(f"{title} (hatched: errors in some round)", fontsize=11)
        fig.tight_layout()
        fig.savefig(Path(out_dir) / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written, None
