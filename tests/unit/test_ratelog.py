"""RateLimitedLog: per key, at most `burst` lines per window; the next line after a window
says how many were left out."""
import logging

from fastmesh import ratelog
from fastmesh.ratelog import RateLimitedLog


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def test_burst_then_summary(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(ratelog.time, "monotonic", clock)
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), interval_s=10, burst=3)
    with caplog.at_level(logging.WARNING, logger="t.ratelog"):
        for i in range(100):
            rl.warning("k", "connect failed %d", i)
        assert [r.getMessage() for r in caplog.records] == [
            "connect failed 0", "connect failed 1", "connect failed 2"]
        clock.t += 10
        rl.warning("k", "connect failed %d", 100)
    assert caplog.records[-1].getMessage() == \
        "connect failed 100 (97 similar messages left out)"


def test_keys_are_independent(monkeypatch, caplog):
    monkeypatch.setattr(ratelog.time, "monotonic", Clock())
    rl = RateLimitedLog(logging.getLogger("t.ratelog2"), burst=1)
    with caplog.at_level(logging.WARNING, logger="t.ratelog2"):
        for _ in range(5):
            rl.warning("a", "from a")
            rl.warning("b", "from b")
    assert [r.getMessage() for r in caplog.records] == ["from a", "from b"]
