"""Motor threshold hunting: maximum-likelihood PEST and the IFCN relative-frequency method.

ML-PEST after Awiszus F (2003), "TMS and threshold hunting", Suppl Clin Neurophysiol
56:13-23 (the algorithm of the TMS Motor Threshold Assessment Tool): the probability of a
response (an MEP of at least ``response_uv``) is modelled as a cumulative Gaussian of
intensity centred on the threshold with a spread proportional to it (0.07 x threshold, the
value Awiszus used); after each pulse the likelihood of every candidate threshold is
updated and the next pulse is given at the most likely one. The uncertainty is the
likelihood-ratio interval (95%: log-likelihood within 1.92 of its maximum). A small lapse
rate (a response or a miss that has nothing to do with the threshold: a lost pulse, a
twitch) keeps one such outlier from pinning the search far from the threshold.

IFCN relative frequency (Rossini et al. 1994, 2015): the lowest intensity at which at least
5 of 10 consecutive pulses evoke an MEP of 50 µV or more, approached from above in 1-2 %
steps. Both are pure state machines: ``next_intensity()``, ``record(intensity, p2p)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_ndtr

__all__ = ["IfcnRelativeFrequency", "MlPest", "ThresholdResult"]


@dataclass(frozen=True, slots=True)
class ThresholdResult:
    """A threshold estimate with its 95% interval and the pulses spent."""

    threshold_pct: float
    low_pct: float
    high_pct: float
    pulses: int
    converged: bool


@dataclass
class MlPest:
    """Maximum-likelihood PEST over a grid of candidate thresholds (%MSO)."""

    start_pct: float = 50.0
    response_uv: float = 50.0
    spread: float = 0.07
    lo_pct: float = 20.0
    hi_pct: float = 100.0
    step_pct: float = 0.5
    target_width_pct: float = 4.0
    max_pulses: int = 20
    lapse: float = 0.03
    _grid: np.ndarray = field(init=False, repr=False)
    _ll: np.ndarray = field(init=False, repr=False)
    pulses: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._grid = np.arange(self.lo_pct, self.hi_pct + 1e-9, self.step_pct)
        self._ll = np.zeros(len(self._grid))

    def next_intensity(self) -> float:
        """Where to stimulate next (a whole %MSO, as stimulators take)."""
        if self.pulses == 0:
            return float(round(self.start_pct))
        return float(round(self._ml()))

    def _ml(self) -> float:
        best = np.flatnonzero(self._ll >= self._ll.max() - 1e-9)
        return float((self._grid[best[0]] + self._grid[best[-1]]) / 2.0)

    def record(self, intensity_pct: float, p2p_uv: float) -> None:
        """Update with one pulse's outcome."""
        z = (intensity_pct - self._grid) / (self.spread * self._grid)
        p_resp = self.lapse / 2.0 + (1.0 - self.lapse) * np.exp(log_ndtr(z))
        p = p_resp if p2p_uv >= self.response_uv else 1.0 - p_resp
        self._ll += np.log(np.maximum(p, 1e-300))
        self.pulses += 1

    def result(self) -> ThresholdResult:
        """The current estimate and its 95% likelihood-ratio interval."""
        inside = self._grid[self._ll >= self._ll.max() - 1.92]
        lo, hi = float(inside.min()), float(inside.max())
        return ThresholdResult(self._ml(), lo, hi, self.pulses,
                               converged=hi - lo <= self.target_width_pct)

    @property
    def done(self) -> bool:
        """Converged, or the pulse budget is spent."""
        return self.pulses >= self.max_pulses or (self.pulses >= 6 and self.result().converged)


@dataclass
class IfcnRelativeFrequency:
    """5 of 10 responses of at least 50 µV, stepping down from a suprathreshold start."""

    start_pct: float = 70.0
    step_pct: float = 2.0
    response_uv: float = 50.0
    max_pulses: int = 200
    intensity: float = field(init=False)
    pulses: int = field(init=False, default=0)
    _level: list[bool] = field(init=False, default_factory=list)
    _lowest_ok: float | None = field(init=False, default=None)
    _finished: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.intensity = self.start_pct

    def next_intensity(self) -> float:
        """Where to stimulate next."""
        return self.intensity

    def record(self, intensity_pct: float, p2p_uv: float) -> None:
        """Count one pulse at the current level; move down or stop when it is decided."""
        self.pulses += 1
        self._level.append(p2p_uv >= self.response_uv)
        hits = sum(self._level)
        misses = len(self._level) - hits
        if hits >= 5:  # this level is suprathreshold: go down
            self._lowest_ok = self.intensity
            self.intensity -= self.step_pct
            self._level = []
        elif misses > 5:  # cannot reach 5 of 10 here: the previous level is the threshold
            if self._lowest_ok is None:
                self.intensity += 2 * self.step_pct  # started too low: go up
                self._level = []
            else:
                self._finished = True
        if self.pulses >= self.max_pulses:
            self._finished = True

    @property
    def done(self) -> bool:
        """Threshold found (or the budget spent)."""
        return self._finished

    def result(self) -> ThresholdResult:
        """The lowest level with 5 of 10 responses (uncertainty: one step)."""
        mt = self._lowest_ok if self._lowest_ok is not None else math.nan
        return ThresholdResult(mt, mt - self.step_pct, mt, self.pulses,
                               converged=self._lowest_ok is not None and self._finished)
