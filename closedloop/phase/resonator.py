"""A resonant oscillator tracker: a complex resonator tuned to the individual peak.

A complex one-pole filter ``z[n] = r e^{i w0} z[n-1] + (1 - r) x[n]`` is an analytic
band-pass centred on ``w0`` whose phase shift is exactly zero at the centre frequency:
its state *is* an estimate of the analytic signal at the newest sample, updated per sample
at negligible cost. This is the "resonant oscillator at the individual peak frequency" of
the published comparisons (e.g. the resonator used by Rosenblum et al. 2021/2022 for
real-time phase estimation); its weakness is a phase bias that grows with the distance of
the momentary frequency from the centre.

Tuning, measured on EEGMAT (C3, amplitude above the median, 2026-11-26): one stage with a
4 Hz bandwidth is best (circular SD 19.4° Hjorth / 23.4° raw, mean of subjects 19, 23, 25
and 33); two stages in cascade give 30-40°, as does a 2 Hz bandwidth.

Frequency adaptation: every ``retune_every_s`` the centre moves half way to the individual
peak of the last ``retune_span_s`` of input, on the 1/f-corrected spectrum
(:func:`~closedloop.phase.peak.find_peak`), so it follows a peak that drifts over a long
session and stays on it. A loop that retunes to the resonator's own momentary frequency (a
PLL) does not stay locked on real EEG: the 1/f background pulls it 1-2 Hz below the peak
(phase bias -15 to -35° on EEGMAT); correcting the phase for the measured momentary
frequency adds more noise than it removes bias (+5-7°).

Everything is a per-sample recursion (the DC is removed by a one-pole running mean, the
retuning happens at fixed sample counts), so the output does not depend on how the
samples were chunked: the live tracker keeps the resonator's output per sample and reads
it at any sample (:meth:`Resonator.process`, :meth:`Resonator.estimate_from`).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from closedloop.dsp.iir import lfilter_step
from closedloop.phase.estimate import PhaseEstimate
from closedloop.phase.peak import RHYTHMS, find_peak

__all__ = ["Resonator"]

Array = npt.NDArray[np.float64]
Complex = npt.NDArray[np.complex128]

# time constant of the running mean that removes the DC before the resonator
_DC_TAU_S = 2.0


class Resonator:
    """Streaming complex resonator: :meth:`process` samples, then :meth:`estimate` (or
    :meth:`estimate_from` a stored output)."""

    name = "resonator"

    def __init__(self, *, fs: float, centre_hz: float, bandwidth_hz: float = 4.0,
                 stages: int = 1, retune_every_s: float = 0.0, retune_span_s: float = 60.0,
                 rhythm: str = "alpha") -> None:
        """``retune_every_s``: 0 = a fixed centre."""
        self.fs = fs
        self.centre_hz = self._initial_centre = centre_hz
        self._r = math.exp(-math.pi * bandwidth_hz / fs)
        self._b = np.array([1.0 - self._r], dtype=complex)
        self._stages = stages
        self._retune_every = round(retune_every_s * fs)
        self._span = np.zeros(round(retune_span_s * fs) if retune_every_s > 0 else 0)
        self._rhythm = rhythm
        self._search = RHYTHMS[rhythm][0]
        alpha = 1.0 - math.exp(-1.0 / (_DC_TAU_S * fs))
        self._dc_b = np.array([alpha])
        self._dc_a = np.array([1.0, alpha - 1.0])
        # samples to settle (one second), and over which the frequency is averaged
        self.window = int(fs)
        self.slope = max(1, int(fs / centre_hz / 8))
        self.reset()

    def _tune(self, centre_hz: float) -> None:
        self.centre_hz = centre_hz
        pole = self._r * np.exp(1j * 2 * math.pi * centre_hz / self.fs)
        self._a = np.array([1.0, -pole], dtype=complex)

    def reset(self) -> None:
        """Forget all state (a gap in the data), the retuned centre too."""
        self._tune(self._initial_centre)
        self._zi = [np.zeros(1, dtype=complex) for _ in range(self._stages)]
        self._dc_zi: Array | None = None
        self._tail: Complex = np.zeros(0, dtype=complex)
        self._n = 0

    def process(self, x: Array) -> Complex:
        """The resonator's output (analytic signal estimate) at each new sample."""
        x = np.asarray(x, dtype=float)
        if not len(x):
            return np.zeros(0, dtype=complex)
        if self._retune_every:  # split at the retuning points
            parts = []
            while len(x):
                k = min(len(x), self._retune_every - self._n % self._retune_every)
                parts.append(self._process(x[:k]))
                x = x[k:]
                if self._n % self._retune_every == 0:
                    self._retune()
            return np.concatenate(parts)
        return self._process(x)

    def _retune(self) -> None:
        """Move the centre half way to the individual peak of the last span of input."""
        if self._n < len(self._span):
            return
        span = np.roll(self._span, -(self._n % len(self._span)))  # oldest first
        try:
            peak = find_peak(span, self.fs, rhythm=self._rhythm).peak_hz
        except ValueError:  # pragma: no cover - the span is at least 4 s
            return
        lo, hi = self._search
        self._tune(min(max(self.centre_hz + 0.5 * (peak - self.centre_hz), lo), hi))

    def _process(self, x: Array) -> Complex:
        if len(self._span):  # a ring: sample n at n % len
            cap = len(self._span)
            idx = (self._n + np.arange(max(0, len(x) - cap), len(x))) % cap
            self._span[idx] = x[-cap:]
        if self._dc_zi is None:  # start the running mean at the first sample
            self._dc_zi = np.array([x[0] * (1.0 - self._dc_b[0])])
        mean, self._dc_zi = lfilter_step(self._dc_b, self._dc_a, x, self._dc_zi)
        y: Complex = (x - mean).astype(complex)
        for k, zi in enumerate(self._zi):
            y, self._zi[k] = lfilter_step(self._b, self._a, y, zi)
        self._tail = np.concatenate((self._tail, y))[-(self.slope + 1):]
        self._n += len(x)
        return y

    def estimate_from(self, z: Complex, t_last: float) -> PhaseEstimate | None:
        """Phase from the resonator's newest outputs ``z`` (at least ``slope + 1``, the
        last at ``t_last``); frequency from the mean phase step over them."""
        if len(z) < 2 or not np.all(np.isfinite(z)):
            return None
        tail = z[-(self.slope + 1):]
        step = float(np.angle(np.sum(tail[1:] * np.conj(tail[:-1]))))
        return PhaseEstimate(lsl_time=t_last, phase_rad=float(np.angle(tail[-1])),
                             freq_hz=step * self.fs / (2 * math.pi),
                             amplitude=float(abs(tail[-1])) * 2.0)

    def estimate(self, t_last: float) -> PhaseEstimate | None:
        """Phase of the resonator state at the newest sample."""
        if self._n < self.window:  # one second to settle
            return None
        return self.estimate_from(self._tail, t_last)
