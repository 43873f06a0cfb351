"""Bounded latency statistics: a preallocated ring of the newest values."""

from __future__ import annotations

import numpy as np

from closedloop.dsp.circular import circular_stats_deg  # (its home is dsp.circular)

__all__ = ["LatencyRing", "circular_stats_deg"]


class LatencyRing:
    """Keeps the newest ``capacity`` values (e.g. milliseconds) for percentiles."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._v = np.zeros(capacity)
        self._n = 0
        self.total = 0

    def reset(self) -> None:
        """Forget every value."""
        self._n = 0
        self.total = 0

    def add(self, value: float) -> None:
        """Record one value."""
        self._v[self.total % len(self._v)] = value
        self.total += 1
        self._n = min(self._n + 1, len(self._v))

    def values(self) -> np.ndarray:
        """The values held (unordered)."""
        return self._v[:self._n].copy()

    def summary(self) -> dict[str, float | int | None]:
        """count, p50, p99, max (None when empty)."""
        v = self._v[:self._n]
        if not len(v):
            return {"count": 0, "p50": None, "p99": None, "max": None}
        p50, p99 = np.percentile(v, [50, 99])
        return {"count": int(self.total), "p50": round(float(p50), 4),
                "p99": round(float(p99), 4), "max": round(float(v.max()), 4)}
