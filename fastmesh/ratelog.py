"""Warnings the data path may repeat at line rate (an upstream that refuses connections, a
client sending garbage) go through a RateLimitedLog: per key, at most `burst` lines per
`interval_s`; the rest are counted, and the next line that gets through says how many were
left out. Keys are bounded by the config (cluster and listener names), never by peers."""
from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, burst: int = 5):
        self.logger = logger
        self.interval_s = interval_s
        self.burst = burst
        self._windows: dict = {}        # key -> [window start, lines logged, lines left out]

    def warning(self, key, msg: str, *args) -> None:
        now = time.monotonic()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.interval_s:
            left_out = w[2] if w is not None else 0
            w = self._windows[key] = [now, 0, left_out]
        if w[1] >= self.burst:
            w[2] += 1
            return
        w[1] += 1
        if w[2]:
            msg += " (%d similar messages left out)"
            args = (*args, w[2])
            w[2] = 0
        self.logger.warning(msg, *args)
