"""A session's counts and bounded latency statistics (a preallocated ring of the newest
values), for the summary, status and metrics."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from closedloop.dsp.circular import circular_stats_deg  # (its home is dsp.circular)

__all__ = ["LatencyRing", "PipelineStats", "ServiceStats", "circular_stats_deg"]


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


@dataclass
class PipelineStats:
    """What the EEG pipeline counts and times (on its own: offline mode)."""

    samples_lost: int = 0
    estimates: int = 0
    decisions: int = 0
    # refusals of decisions by reason (live: counted in the EEG acquisition thread)
    decision_refused: Counter[str] = field(default_factory=Counter)
    chunk_to_decision_ms: LatencyRing = field(default_factory=LatencyRing)
    chunk_to_handoff_ms: LatencyRing = field(default_factory=LatencyRing)
    update_cost_us: LatencyRing = field(default_factory=LatencyRing)


@dataclass
class ServiceStats(PipelineStats):
    """What happened in a session, for the demo summary and benchmarks."""

    fired: int = 0
    # refusals of units and by the supervisor, by reason (counted on the event loop)
    unit_refused: Counter[str] = field(default_factory=Counter)
    # bounded: a daemon runs for months (the event log keeps everything; these serve the
    # summary, metrics and status). A pulse record is about 1.5 kB, an MEP's 0.7 kB.
    pulses: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=500))
    meps: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2_000))
    stream_events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))
    fire_error_ms: LatencyRing = field(default_factory=LatencyRing)
    heap_trim_ms: LatencyRing = field(default_factory=LatencyRing)
    calibration: dict[str, Any] | None = None
    estimator: dict[str, Any] | None = None  # the wiener filter's state, when it is used
    protocol_results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def refused(self) -> Counter[str]:
        """Every refusal by reason (a copy: count into ``decision_refused`` or
        ``unit_refused``)."""
        out = Counter(self.unit_refused)  # (C-level copies: safe while the other thread
        out.update(Counter(self.decision_refused))  # counts)
        return out
