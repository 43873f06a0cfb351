"""Educated temporal prediction, ETP (Shirinpour et al. 2020).

Shirinpour S, Alekseichuk I, Mantell K, Opitz A (2020). Experimental evaluation of methods
for real-time EEG phase-specific transcranial magnetic stimulation. Journal of Neural
Engineering 17:046002.

Training, on resting data: the inter-peak interval of the band-passed signal (median over
the training period). Real time: band-pass the newest window (zero-phase), find its last
peak away from the distorted edge, and extrapolate the phase at the newest sample as
``2 pi (t - t_peak) / IPI``. The systematic offset of that prediction against the ground
truth is learned on the training data and removed, as in the paper's training step.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import signal

from closedloop.dsp.circular import circular_mean
from closedloop.phase.estimate import PhaseEstimate, wrap_rad
from closedloop.phase.truth import ground_truth

__all__ = ["ETP"]

Array = npt.NDArray[np.float64]


class ETP:
    """ETP after :meth:`train`; :meth:`estimate` on the newest ``window`` samples."""

    name = "etp"

    def __init__(self, *, fs: float, band_hz: tuple[float, float], window: int,
                 edge: int) -> None:
        self.fs = fs
        self.band = band_hz
        self.window = window
        self.edge = edge
        self._fir = signal.firwin(int(0.128 * fs) | 1, band_hz, pass_zero=False, fs=fs)
        self.ipi_s = 1.0 / ((band_hz[0] + band_hz[1]) / 2.0)
        self.offset = 0.0

    def train(self, x: Array, step: int) -> None:
        """Learn the inter-peak interval and the phase offset from resting data ``x``."""
        sos = signal.butter(2, self.band, btype="bandpass", fs=self.fs, output="sos")
        filtered = signal.sosfiltfilt(sos, x - np.mean(x))
        peaks, _ = signal.find_peaks(filtered)
        if len(peaks) > 3:
            ipis = np.diff(peaks) / self.fs
            ok = (ipis > 1.0 / self.band[1]) & (ipis < 1.0 / self.band[0])
            if ok.any():
                self.ipi_s = float(np.median(ipis[ok]))
        truth = ground_truth(x, self.fs, self.band)
        errs = []
        for i in range(self.window, len(x), step):
            est = self.estimate(x[i - self.window:i], (i - 1) / self.fs)
            if est is not None:
                errs.append(est.phase_rad - truth.phase[i - 1])
        if errs:
            self.offset = circular_mean(errs)

    def estimate(self, x: Array, t_last: float) -> PhaseEstimate | None:
        """Phase at the last sample of ``x``."""
        if len(x) != self.window:
            return None
        y = signal.filtfilt(self._fir, 1.0, x - x.mean(), padlen=min(len(x) - 1,
                                                                     3 * len(self._fir)))
        usable = y[: self.window - self.edge]
        peaks, _ = signal.find_peaks(usable)
        if not len(peaks):
            return None
        t_peak = t_last - (self.window - 1 - peaks[-1]) / self.fs
        phase = wrap_rad(2 * math.pi * (t_last - t_peak) / self.ipi_s - self.offset)
        return PhaseEstimate(lsl_time=t_last, phase_rad=phase, freq_hz=1.0 / self.ipi_s,
                             amplitude=float(y[peaks[-1]]))
