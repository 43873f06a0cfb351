"""A resonant oscillator tracker: a complex resonator tuned to the individual peak.

A complex one-pole filter ``z[n] = r e^{i w0} z[n-1] + (1 - r) x[n]`` is an analytic
band-pass centred on ``w0`` whose phase shift is exactly zero at the centre frequency:
its state *is* an estimate of the analytic signal at the newest sample, updated per sample
at negligible cost. Two in cascade sharpen the band. This is the "resonant oscillator at
the individual peak frequency" of the published comparisons (e.g. the resonator used by
Rosenblum et al. 2021/2022 for real-time phase estimation); its weakness is a phase bias
that grows with the distance of the momentary frequency from the centre.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import signal

from closedloop.phase.estimate import PhaseEstimate

__all__ = ["Resonator"]

Array = npt.NDArray[np.float64]


class Resonator:
    """Streaming complex resonator; :meth:`push` samples, then :meth:`estimate`."""

    name = "resonator"

    def __init__(self, *, fs: float, centre_hz: float, bandwidth_hz: float = 3.0,
                 stages: int = 2) -> None:
        self.fs = fs
        r = math.exp(-math.pi * bandwidth_hz / fs)
        pole = r * np.exp(1j * 2 * math.pi * centre_hz / fs)
        self._b = np.array([1.0 - r], dtype=complex)
        self._a = np.array([1.0, -pole], dtype=complex)
        self._zi = [np.zeros(1, dtype=complex) for _ in range(stages)]
        self._last = np.zeros(2, dtype=complex)
        self._mean = 0.0
        self._n = 0

    def push(self, x: Array) -> None:
        """Feed new samples (the DC is removed with a slow running mean)."""
        if not len(x):
            return
        self._mean += 0.001 * (float(np.mean(x)) - self._mean) if self._n else float(x[0])
        y: npt.NDArray[np.complexfloating] = (np.asarray(x, dtype=float) - self._mean).astype(
            complex)
        for k, zi in enumerate(self._zi):
            y, self._zi[k] = signal.lfilter(self._b, self._a, y, zi=zi)
        self._last = np.concatenate((self._last, y))[-2:]
        self._n += len(x)

    def estimate(self, t_last: float) -> PhaseEstimate | None:
        """Phase of the resonator state at the newest sample."""
        if self._n < self.fs:  # one second to settle
            return None
        z0, z1 = self._last
        step = float(np.angle(z1 * np.conj(z0)))
        return PhaseEstimate(lsl_time=t_last, phase_rad=float(np.angle(z1)),
                             freq_hz=step * self.fs / (2 * math.pi),
                             amplitude=float(abs(z1)) * 2.0)
