"""Band amplitude and its running percentile, for amplitude gating.

Phase estimates are only trustworthy when the rhythm is present: Zrenner et al. 2018 and
later work fire only when band power is above a running percentile. The amplitude here is
the envelope of a causal Butterworth band-pass (explicit state), smoothed over about one
cycle; the percentile is taken over the last ``window_s`` of values sampled at each
update, in a preallocated ring.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from closedloop.dsp.filters import StreamingSOS
from closedloop.dsp.iir import lfilter_step

__all__ = ["BandAmplitude", "RunningPercentile"]


class BandAmplitude:
    """Causal band-pass, then the square root of twice the smoothed power."""

    def __init__(self, fs: float, band_hz: tuple[float, float]) -> None:
        self._bp = StreamingSOS.butter(2, band_hz, fs, "bandpass")
        centre = math.sqrt(band_hz[0] * band_hz[1])
        alpha = 1.0 - math.exp(-1.0 / (fs / centre))  # time constant of one cycle
        self._b = np.array([alpha])
        self._a = np.array([1.0, alpha - 1.0])
        self._zi: npt.NDArray[np.float64] | None = None

    def reset(self) -> None:
        """Forget the state (after a gap)."""
        self._bp.reset()
        self._zi = None

    def series(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Feed a chunk; return the amplitude at each of its samples."""
        if x.size == 0:
            return np.zeros(0)
        y = self._bp.process(x)
        if self._zi is None:  # steady state for a constant power of y[0]**2
            self._zi = np.array([-self._a[1] * float(y[0]) ** 2])
        power, self._zi = lfilter_step(self._b, self._a, y * y, self._zi)
        amp: npt.NDArray[np.float64] = np.sqrt(np.maximum(0.0, 2.0 * power))
        return amp


class RunningPercentile:
    """The ``q``-th percentile of the last ``capacity`` values pushed."""

    def __init__(self, q: float, capacity: int, recompute_every: int = 25) -> None:
        """``recompute_every`` = 0: only :meth:`recompute` updates the threshold."""
        self.q = q
        self._values = np.zeros(max(1, capacity))
        self._n = 0
        self._pos = 0
        self._every = recompute_every
        self._since = 0
        self._threshold = math.inf

    @property
    def capacity(self) -> int:
        """How many values are held at most."""
        return len(self._values)

    @property
    def count(self) -> int:
        """Values currently held."""
        return self._n

    def push(self, value: float) -> None:
        """Add one value, dropping the oldest when full."""
        self._values[self._pos] = value
        self._pos = (self._pos + 1) % len(self._values)
        self._n = min(self._n + 1, len(self._values))
        if self._every <= 0:
            return
        self._since += 1
        if self._since >= self._every or self._n < self._every:
            self.recompute()

    def recompute(self) -> None:
        """Compute the percentile of the values held now."""
        self._since = 0
        if self._n:
            self._threshold = float(np.percentile(self._values[:self._n], self.q))

    def threshold(self) -> float:
        """The current percentile (``inf`` before any value)."""
        return self._threshold if self._n else math.inf
