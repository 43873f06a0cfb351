"""The safety gate's rules: a pure, explicit-state check of every pulse request.

The gate can only refuse. Its limits come from ``[safety]`` and are clamped again here by
the hard caps of :mod:`closedloop.config.schema`, so that neither a config file nor a
command can raise them (the caps bound what Rossi et al. 2009, "Safety, ethical
considerations, and application guidelines for the use of TMS", Clin Neurophysiol
120:2008-2039, tabulate for single pulses and low-frequency trains). The minimum
inter-pulse interval is enforced here *and*, independently, by the trigger policy.

EEG freshness is part of the gate: a pulse is never fired on a phase estimate made from a
stream that has stopped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from closedloop.config.schema import (
    HARD_MAX_INTENSITY_PCT,
    HARD_MAX_PULSES_PER_SESSION,
    HARD_MIN_INTERVAL_S,
    SafetyConfig,
)

__all__ = ["SafetyGate", "SafetyLimits"]


@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Effective limits, already clamped by the hard caps."""

    min_interval_s: float
    max_intensity_pct: float
    max_pulses: int
    rate_window_s: float
    max_pulses_per_window: int
    max_eeg_age_s: float

    @classmethod
    def from_config(cls, cfg: SafetyConfig) -> SafetyLimits:
        """Clamp the configured limits by the hard caps in code."""
        return cls(
            min_interval_s=max(cfg.min_interval_s, HARD_MIN_INTERVAL_S),
            max_intensity_pct=min(cfg.max_intensity_pct, HARD_MAX_INTENSITY_PCT),
            max_pulses=min(cfg.max_pulses, HARD_MAX_PULSES_PER_SESSION),
            rate_window_s=cfg.rate_window_s,
            max_pulses_per_window=min(cfg.max_pulses_per_window, HARD_MAX_PULSES_PER_SESSION),
            max_eeg_age_s=cfg.max_eeg_age_ms / 1000.0,
        )


class SafetyGate:
    """Checks requests against the limits and remembers the pulses that were fired."""

    def __init__(self, limits: SafetyLimits) -> None:
        self.limits = limits
        self._recent: deque[float] = deque()
        self.fired = 0
        self.last_fire = -math.inf

    def check(self, *, t: float, intensity_pct: float, eeg_age_s: float | None) -> str | None:
        """Return None if a pulse at LSL time ``t`` is allowed, else the refusal reason."""
        lim = self.limits
        if not math.isfinite(intensity_pct) or intensity_pct < 0:
            return "safety:invalid_intensity"
        if intensity_pct > lim.max_intensity_pct:
            return "safety:max_intensity"
        if eeg_age_s is None or not eeg_age_s <= lim.max_eeg_age_s:
            return "safety:eeg_stale"
        if t - self.last_fire < lim.min_interval_s:
            return "safety:min_interval"
        if self.fired >= lim.max_pulses:
            return "safety:max_pulses"
        while self._recent and self._recent[0] <= t - lim.rate_window_s:
            self._recent.popleft()
        if len(self._recent) >= lim.max_pulses_per_window:
            return "safety:max_rate"
        return None

    def commit(self, t: float) -> None:
        """Record a pulse that was fired at LSL time ``t``."""
        self.fired += 1
        self.last_fire = t
        self._recent.append(t)
