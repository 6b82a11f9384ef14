"""The latency histogram's cost per request, measured in C (no Python call per record):

    python -m pytest benchmarks/micro/test_micro_histogram.py -s -p no:cacheprovider

`record only`: bucket index (count leading zeros, shifts) + two adds, values spread over
every bucket; `with clock`: what a request pays in all, the two CLOCK_MONOTONIC reads (vDSO)
at its start and end plus the record. Prints ns per request (median of 5 runs of 2M).
"""
from __future__ import annotations

import statistics

import pytest

stats = pytest.importorskip("fastmesh._core.stats")


@pytest.mark.parametrize("with_clock", [False, True], ids=["record-only", "with-clock"])
def test_histogram_record_cost(with_clock):
    runs = [stats.bench_record_ns(2_000_000, with_clock) for _ in range(5)]
    ns = statistics.median(runs)
    print(f"\nlatency histogram record ({'with clock' if with_clock else 'record only'}): "
          f"{ns:.1f} ns/request (runs: {', '.join(f'{r:.1f}' for r in runs)})")
    assert ns < 1000            # a sanity bound, not a timed test
