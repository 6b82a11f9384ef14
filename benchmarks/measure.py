"""What a proxy costs, read from /proc: CPU time and memory of a process and all its
descendants.

CPU: for every process of the tree, utime + stime from /proc/PID/stat. That figure already
covers all the process's threads, live and exited (the kernel folds a thread's time into its
process when the thread exits; /proc/PID/task/TID/stat shows the same time split per live
thread, which `thread_cpu` reads for a per-thread view). Children that exited and were reaped
are counted through the root's cutime + cstime. The unit is clock ticks (SC_CLK_TCK, 100/s).

Memory: VmRSS (now) and VmHWM (peak since start) from /proc/PID/status, summed over the tree.
A process started fresh for each measured round makes VmHWM that round's peak.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(path: str) -> list[str] | None:
    """Fields of a /proc stat file after the `(comm)` field: index 0 is field 3 (state)."""
    text = _read(path)
    if text is None:
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(root: int) -> list[int]:
    """root and every process below it, found by scanning /proc for parent pids."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(f"/proc/{name}/stat")
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class CpuSample:
    t: float            # time.monotonic()
    ticks: int          # utime + stime of the tree, plus reaped children of the root
    sys_ticks: int      # the stime (kernel) part of ticks
    pids: int           # processes seen
    threads: int        # threads seen


def cpu_sample(root: int) -> CpuSample:
    ticks = sys_ticks = pids = threads = 0
    for pid in descendants(root):
        f = _stat_fields(f"/proc/{pid}/stat")
        if f is None:
            continue
        # field 14 utime, 15 stime, 16 cutime, 17 cstime, 20 num_threads (1-based)
        ticks += int(f[11]) + int(f[12])
        sys_ticks += int(f[12])
        if pid == root:
            ticks += int(f[13]) + int(f[14])
            sys_ticks += int(f[14])
        pids += 1
        threads += int(f[17])
    return CpuSample(time.monotonic(), ticks, sys_ticks, pids, threads)


def cpu_delta(a: CpuSample, b: CpuSample) -> dict:
    """CPU seconds spent between two samples, and the share of one core it was."""
    cpu_s = (b.ticks - a.ticks) / CLK_TCK
    sys_s = (b.sys_ticks - a.sys_ticks) / CLK_TCK
    wall_s = b.t - a.t
    return {"cpu_s": round(cpu_s, 3), "wall_s": round(wall_s, 3),
            "cpu_sys_share": round(sys_s / cpu_s, 3) if cpu_s > 0 else None,
            "cpu_util": round(cpu_s / wall_s, 3) if wall_s > 0 else None,
            "processes": b.pids, "threads": b.threads}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per live thread of one process, by thread name (for diagnosis)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        comm = (_read(f"/proc/{pid}/task/{tid}/comm") or "?").strip()
        if f is not None:
            out[f"{comm}/{tid}"] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def memory(root: int) -> dict:
    """Summed VmRSS and VmHWM (KiB) over the tree."""
    rss = hwm = 0
    for pid in descendants(root):
        text = _read(f"/proc/{pid}/status")
        if text is None:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return {"rss_kib": rss, "rss_peak_kib": hwm}


def count_syscalls(root: int, run) -> tuple[int | None, object]:
    """System calls made by `root`'s processes (all their threads) while run() runs:
    (calls, run's result); calls is None when strace cannot attach. strace slows the traced
    process, so this pass is separate from the CPU measurement; calls per request stay
    meaningful (an engine that batches more under load only looks worse here)."""
    import shutil
    import signal as _signal
    import subprocess
    import tempfile
    import time as _time
    strace = shutil.which("strace")
    if strace is None:
        return None, run()
    pids = descendants(root)
    with tempfile.NamedTemporaryFile(prefix="fm-strace-", suffix=".txt") as out:
        argv = [strace, "-c", "-f", "-qq", "-o", out.name]
        for pid in pids:
            argv += ["-p", str(pid)]
        tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _time.sleep(0.5)                    # attached (to every thread) before the load
        if tracer.poll() is not None:
            return None, run()
        try:
            result = run()
        finally:
            tracer.send_signal(_signal.SIGINT)
            try:
                tracer.wait(30)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait(5)
        text = open(out.name).read()
    for line in text.splitlines():
        f = line.split()
        if f and f[-1] == "total" and len(f) >= 4:
            try:
                return int(f[3]), result
            except ValueError:
                break
    return None, result
