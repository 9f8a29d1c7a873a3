"""Per-process limits of the SMTP front door: connections per IP and message rates.

Each accept process keeps its own counters (no shared state on the hot path); with N
processes sharing the port the effective per-IP ceiling is up to N times the setting, which
the operator divides in when configuring a multi-process node (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections import defaultdict


class ConnectionCounter:
    """Concurrent connections per remote IP (``421 4.7.0`` beyond the limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = defaultdict(int)

    def open(self, ip: str) -> bool:
        """Count a new connection; False (and not counted) when over the limit."""
        if self.limit and self._open[ip] >= self.limit:
            return False
        self._open[ip] += 1
        return True

    def close(self, ip: str) -> None:
        count = self._open.get(ip, 0) - 1
        if count <= 0:
            self._open.pop(ip, None)
        else:
            self._open[ip] = count


class RateLimiter:
    """A token bucket per key: ``per_minute`` messages, bursting up to one minute's worth."""

    def __init__(self, per_minute: int, *, clock: object = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, cost: float = 1.0) -> bool:
        if not self.per_minute:
            return True
        now: float = self._clock()  # type: ignore[operator]
        capacity = float(self.per_minute)
        tokens, stamp = self._buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - stamp) * capacity / 60.0)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > 100_000:  # forget full buckets so memory stays flat
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < capacity}
        return True
