"""The safety gate's rules: a pure, explicit-state check of every pulse request.

The gate can only refuse. Its limits come from ``[safety]`` and are clamped again here by
the hard caps of :mod:`closedloop.config.schema`, so that neither a config file nor a
command can raise them. The minimum inter-pulse interval is enforced here *and*,
independently, by the trigger policy. EEG freshness is part of the gate: a pulse is never
fired on a phase estimate made from a stream that has stopped.

What one trigger delivers is a *unit*: one pulse, a paired pulse (two pulses from one
trigger), or a train or burst (pulses at given offsets). A unit is checked as a whole
before its first pulse, and each of its pulses is checked again as it fires.

Rules for trains and bursts (all need ``motor_threshold_pct``, since the published limits
are in % of the resting motor threshold, MT):

- Regular trains up to 25 Hz: the train may last at most ``train_duration_factor`` × the
  maximum safe single-train duration of Rossi et al. 2009 (Clin Neurophysiol
  120:2008-2039, Table 4, from Wassermann 1998, Electroencephalogr Clin Neurophysiol
  108:1-16), looked up at the next higher tabulated frequency and intensity; above
  130 % MT, or above 25 Hz, no regular train is allowed. Chen et al. 1997
  (Electroencephalogr Clin Neurophysiol 105:415-421) advise 0.75 of the table, the
  default, and found inter-train intervals of 1 s or less unsafe at 20 Hz above 100 % MT:
  hence ``min_inter_train_s`` (at least 1 s in code, 5 s by default).
- Faster patterns (bursts: pulses closer than 40 ms: theta-burst, 100 Hz triplets) are
  not covered by that table; Rossi et al. 2009 and 2021 (Clin Neurophysiol
  132:269-306) report them safe at the intensities used (TBS at 80 % active MT, i.e.
  below rest MT) with one seizure at 100 % rest MT cTBS. We allow them up to
  ``max_burst_intensity_mt`` (≤ 100 % MT in code), at most 5 pulses a burst, bursts
  starting at least 190 ms apart (TBS: every 200 ms), at most 600 pulses in one unit
  (one cTBS block).
- Counts: pulses per session, per calendar day (across sessions, see
  :class:`DayCounter`) and per sliding window count every pulse of every unit.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as _dt
import itertools
import json
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from closedloop.config.schema import (
    HARD_MAX_BURST_INTENSITY_MT,
    HARD_MAX_COIL_TEMP_C,
    HARD_MAX_INTENSITY_PCT,
    HARD_MAX_PULSES_PER_DAY,
    HARD_MAX_PULSES_PER_SESSION,
    HARD_MAX_TRAIN_DURATION_FACTOR,
    HARD_MIN_INTER_TRAIN_S,
    HARD_MIN_INTERVAL_S,
    HARD_MIN_TRAIN_IPI_S,
    SafetyConfig,
)
from closedloop.errors import ConfigError

__all__ = ["DayCounter", "SafetyGate", "SafetyLimits", "max_train_duration_s"]

# Rossi et al. 2009, Table 4 (Wassermann 1998): maximum safe duration (s) of a single
# rTMS train, by frequency (rows) and intensity in % of MT (columns). ">x" entries are
# taken as x.
_TABLE_FREQS = (1.0, 5.0, 10.0, 20.0, 25.0)
_TABLE_INTENS = (90.0, 100.0, 110.0, 120.0, 130.0)
_TABLE_S = (
    (1800.0, 1800.0, 1800.0, 360.0, 50.0),
    (10.0, 10.0, 10.0, 10.0, 10.0),
    (5.0, 5.0, 5.0, 4.2, 2.9),
    (2.05, 1.6, 1.0, 0.55, 0.35),
    (1.28, 0.84, 0.4, 0.24, 0.2),
)
_BURST_IPI_S = 0.04  # pulses closer than this (> 25 Hz) form a burst
_MAX_BURST_PULSES = 5
_MIN_BURST_GAP_S = 0.19
_MAX_UNIT_PULSES = 600
_EPS = 1e-9


def max_train_duration_s(freq_hz: float, intensity_mt_pct: float) -> float | None:
    """Longest safe regular train (Rossi 2009 Table 4), or None if outside the table."""
    i = bisect.bisect_left(_TABLE_FREQS, freq_hz - _EPS)
    j = bisect.bisect_left(_TABLE_INTENS, intensity_mt_pct - _EPS)
    if i >= len(_TABLE_FREQS) or j >= len(_TABLE_INTENS):
        return None
    return _TABLE_S[i][j]


@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Effective limits, already clamped by the hard caps."""

    min_interval_s: float
    max_intensity_pct: float
    max_pulses: int
    rate_window_s: float
    max_pulses_per_window: int
    max_eeg_age_s: float
    max_pulses_per_day: int = 2000
    motor_threshold_pct: float | None = None
    train_duration_factor: float = 0.75
    min_inter_train_s: float = 5.0
    max_burst_intensity_mt: float = 100.0
    max_coil_temp_c: float = 40.0

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
            max_pulses_per_day=min(cfg.max_pulses_per_day, HARD_MAX_PULSES_PER_DAY),
            motor_threshold_pct=cfg.motor_threshold_pct,
            train_duration_factor=min(cfg.train_duration_factor,
                                      HARD_MAX_TRAIN_DURATION_FACTOR),
            min_inter_train_s=max(cfg.min_inter_train_s, HARD_MIN_INTER_TRAIN_S),
            max_burst_intensity_mt=min(cfg.max_burst_intensity_mt,
                                       HARD_MAX_BURST_INTENSITY_MT),
            max_coil_temp_c=min(cfg.max_coil_temp_c, HARD_MAX_COIL_TEMP_C),
        )


def _unit_reason(lim: SafetyLimits, offsets: Sequence[float],
                 intensity_pct: float) -> str | None:
    """Rules on the shape of a multi-pulse unit (see the module docstring)."""
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    if offsets[0] != 0.0 or any(not math.isfinite(g) or g <= 0 for g in gaps):
        return "safety:invalid_train"
    if min(gaps) < HARD_MIN_TRAIN_IPI_S - _EPS:
        return "safety:train_ipi"
    if len(offsets) > _MAX_UNIT_PULSES:
        return "safety:train_pulses"
    if lim.motor_threshold_pct is None:
        return "safety:train_needs_motor_threshold"
    rel = intensity_pct / lim.motor_threshold_pct * 100.0
    if min(gaps) < _BURST_IPI_S - _EPS:
        if rel > lim.max_burst_intensity_mt + _EPS:
            return "safety:burst_intensity"
        run, onset = 1, offsets[0]
        for g, t in zip(gaps, offsets[1:], strict=True):
            if g < _BURST_IPI_S - _EPS:
                run += 1
                if run > _MAX_BURST_PULSES:
                    return "safety:burst_length"
            else:
                if t - onset < _MIN_BURST_GAP_S - _EPS:
                    return "safety:burst_rate"
                run, onset = 1, t
        return None
    freq = 1.0 / min(gaps)
    limit = max_train_duration_s(freq, rel)
    if limit is None:
        return "safety:train_outside_table"
    if len(offsets) / freq > limit * lim.train_duration_factor + _EPS:
        return "safety:train_duration"
    return None


class SafetyGate:
    """Checks requests against the limits and remembers the pulses that were fired."""

    def __init__(self, limits: SafetyLimits, *, day_count: int = 0) -> None:
        self.limits = limits
        self._recent: deque[float] = deque()
        self.fired = 0
        self.day_count = day_count
        self.last_fire = -math.inf
        self.last_unit_end = -math.inf  # end of the last train or burst

    def check(self, *, t: float, intensity_pct: float, eeg_age_s: float | None,
              offsets: Sequence[float] = (0.0,), pulses_per_trigger: int = 1) -> str | None:
        """Return None if a unit starting at LSL time ``t`` is allowed, else the reason.

        Args:
            offsets: Times of the unit's triggers after ``t`` (``(0.0,)``: one trigger).
            pulses_per_trigger: 2 for a paired pulse (one trigger, two pulses).
        """
        lim = self.limits
        if not math.isfinite(intensity_pct) or intensity_pct < 0:
            return "safety:invalid_intensity"
        if intensity_pct > lim.max_intensity_pct:
            return "safety:max_intensity"
        if eeg_age_s is None or not eeg_age_s <= lim.max_eeg_age_s:
            return "safety:eeg_stale"
        if not math.isfinite(t):
            return "safety:invalid_time"
        if t - self.last_fire < lim.min_interval_s:
            return "safety:min_interval"
        if t - self.last_unit_end < lim.min_inter_train_s:
            return "safety:inter_train"
        n = len(offsets) * pulses_per_trigger
        if n < 1 or pulses_per_trigger not in (1, 2):
            return "safety:invalid_train"
        if self.fired + n > lim.max_pulses:
            return "safety:max_pulses"
        if self.day_count + n > lim.max_pulses_per_day:
            return "safety:max_pulses_per_day"
        while self._recent and self._recent[0] <= t - lim.rate_window_s:
            self._recent.popleft()
        if len(self._recent) + n > lim.max_pulses_per_window:
            return "safety:max_rate"
        if len(offsets) > 1:
            return _unit_reason(lim, offsets, intensity_pct)
        return None

    def check_next(self, *, t: float, planned: float, max_lateness_s: float,
                   eeg_age_s: float | None) -> str | None:
        """A later trigger of a unit that passed :meth:`check`: on time, EEG still fresh."""
        if eeg_age_s is None or not eeg_age_s <= self.limits.max_eeg_age_s:
            return "safety:eeg_stale"
        if not planned - 0.002 <= t <= planned + max_lateness_s:
            return "late"
        return None

    def commit(self, t: float, pulses: int = 1) -> None:
        """Record a trigger at LSL time ``t`` that gave ``pulses`` pulses."""
        self.fired += pulses
        self.day_count += pulses
        self.last_fire = t
        self._recent.extend([t] * pulses)

    def end_unit(self, t_last: float) -> None:
        """A train or burst ended with a pulse at ``t_last``: the inter-train pause starts."""
        self.last_unit_end = t_last


class DayCounter:
    """Pulses per calendar day (local time), kept in a small JSON file across sessions.

    The file maps ISO dates to counts; it is rewritten atomically. A file that cannot be
    read is an error (it is not silently reset: that would lift the daily limit).
    """

    def __init__(self, path: str | Path, today: Callable[[], str] | None = None) -> None:
        self.path = Path(path)
        self._today = today or (lambda: _dt.date.today().isoformat())
        self.counts: dict[str, int] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict) or not all(
                        isinstance(v, int) and v >= 0 for v in data.values()):
                    raise ValueError("expected {\"YYYY-MM-DD\": count, ...}")
                self.counts = {str(k): int(v) for k, v in data.items()}
            except (OSError, ValueError) as exc:
                raise ConfigError(source=str(self.path), key="safety.day_counter_file",
                                  problem=f"unreadable pulse counter ({exc}); fix or remove "
                                  "it knowingly") from exc

    @property
    def today(self) -> int:
        return self.counts.get(self._today(), 0)

    def add(self, n: int) -> int:
        """Count ``n`` pulses today and save; return today's total."""
        day = self._today()
        self.counts = {k: v for k, v in self.counts.items() if k >= _week_before(day)}
        self.counts[day] = self.counts.get(day, 0) + n
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.counts, sort_keys=True))
        os.replace(tmp, self.path)
        return self.counts[day]


def _week_before(day: str) -> str:
    with contextlib.suppress(ValueError):
        return (_dt.date.fromisoformat(day) - _dt.timedelta(days=7)).isoformat()
    return ""

