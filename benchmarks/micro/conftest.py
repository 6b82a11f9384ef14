"""Micro-benchmark plumbing: `work(benchmark, fn, messages=, nbytes=)` runs fn under
pytest-benchmark and records messages/s and bytes/s from the median time per call; a table of
them is printed at the end of the session (pytest-benchmark itself shows only calls/s)."""
from __future__ import annotations

import pytest

_RESULTS: list[tuple[str, float, float, float]] = []   # name, median s, messages/s, bytes/s


@pytest.fixture
def work(request):
    def run(benchmark, fn, messages: int, nbytes: int):
        benchmark.extra_info.update(messages_per_call=messages, bytes_per_call=nbytes)
        out = benchmark(fn)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        median_s = getattr(stats, "median", None)    # robust to the odd scheduler hiccup
        if median_s:
            benchmark.extra_info.update(messages_per_s=messages / median_s,
                                        bytes_per_s=nbytes / median_s)
            _RESULTS.append((request.node.name, median_s, messages / median_s,
                             nbytes / median_s))
        return out
    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("messages/s and bytes/s (from the median time per call)")
    width = max(len(r[0]) for r in _RESULTS)
    tr.write_line(f"{'benchmark':<{width}}  {'median µs':>12}  {'messages/s':>14}  "
                  f"{'MB/s':>10}")
    for name, median_s, mps, bps in _RESULTS:
        tr.write_line(f"{name:<{width}}  {median_s * 1e6:>12.2f}  {mps:>14,.0f}  "
                      f"{bps / 1e6:>10,.1f}")
