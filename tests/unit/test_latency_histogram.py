"""The data world's latency histogram: fixed log-linear buckets, their bounds as exported,
and the control world's percentile from bucket counts."""
from fastmesh._core.stats import LAT_BOUNDS_US, LATENCY_BUCKETS, Counters, latency_bucket
from fastmesh.dashboard import percentile_ms


def test_bounds_and_bucket_index_agree():
    assert len(LAT_BOUNDS_US) == LATENCY_BUCKETS - 1
    assert list(LAT_BOUNDS_US) == sorted(set(LAT_BOUNDS_US))
    assert LAT_BOUNDS_US[0] == 64 and LAT_BOUNDS_US[-1] == 1 << 24
    for i, bound in enumerate(LAT_BOUNDS_US):
        assert latency_bucket(bound - 1) == i, bound        # below a bound: its bucket
        assert latency_bucket(bound) == i + 1, bound        # at it: the next one
    assert latency_bucket(0) == 0 and latency_bucket(-5) == 0
    assert latency_bucket(10 ** 12) == LATENCY_BUCKETS - 1  # overflow
    # log-linear: four buckets per power of two, each at most 25% wide
    for lo, hi in zip(LAT_BOUNDS_US[1:], LAT_BOUNDS_US[2:]):
        assert (hi - lo) / lo <= 0.25


def test_record_and_export():
    c = Counters("cluster")
    assert c.histogram() is None                            # nothing recorded: nothing sent
    for us in (10, 100, 100, 5000, 10 ** 9):
        c.record_latency_us(us)
    h = c.histogram()
    counts, total_us = h[:-1], h[-1]
    assert sum(counts) == 5 and total_us == 10 + 200 + 5000 + 10 ** 9
    assert counts[latency_bucket(100)] == 2 and counts[-1] == 1


def test_percentiles_from_counts():
    counts = [0] * LATENCY_BUCKETS
    assert percentile_ms(counts, LAT_BOUNDS_US, 0.5) is None
    counts[latency_bucket(1000)] = 99                       # 1 ms
    counts[latency_bucket(200_000)] = 1                     # 200 ms
    p50 = percentile_ms(counts, LAT_BOUNDS_US, 0.5)
    p99 = percentile_ms(counts, LAT_BOUNDS_US, 0.99)
    p999 = percentile_ms(counts, LAT_BOUNDS_US, 0.999)
    assert 0.85 <= p50 <= 1.15 and 0.85 <= p99 <= 1.15     # within the bucket's width
    assert 170 <= p999 <= 230
