"""Offline ground-truth phase, as defined by Zrenner et al. 2020.

Zrenner C, Galevska D, Nieminen JO, Baur D, Stefanou MI, Ziemann U (2020). The shaky
ground truth of real-time phase estimation. NeuroImage 214:116761.

The "true" phase of a recording is not one number: it depends on the non-causal filter
used. Following the paper, it is the circular mean over several zero-phase band-pass
filters applied to the whole recording (Butterworth of order 2 and 4 run forwards and
backwards; windowed-sinc FIRs of 2 and 3 cycles of the peak frequency), each followed by
the Hilbert transform; the spread between them is the ground truth's own uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import signal

__all__ = ["GroundTruth", "ground_truth"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GroundTruth:
    """Per-sample phase (rad), amplitude, and the circular SD between filters (rad)."""

    phase: Array
    amplitude: Array
    spread: Array


def ground_truth(x: Array, fs: float, band_hz: tuple[float, float]) -> GroundTruth:
    """The Zrenner 2020 ground truth of ``x`` in ``band_hz``."""
    lo, hi = band_hz
    centre = (lo + hi) / 2.0
    x = x - np.mean(x)
    analytic = []
    for order in (2, 4):
        sos = signal.butter(order, band_hz, btype="bandpass", fs=fs, output="sos")
        analytic.append(signal.hilbert(signal.sosfiltfilt(sos, x)))
    for cycles in (2, 3):
        taps = round(cycles * fs / centre) | 1
        fir = signal.firwin(taps, band_hz, pass_zero=False, fs=fs)
        analytic.append(signal.hilbert(signal.filtfilt(fir, 1.0, x, padlen=min(3 * taps,
                                                                            len(x) - 1))))
    stack = np.array(analytic)
    unit = stack / np.maximum(np.abs(stack), 1e-300)
    mean = unit.mean(axis=0)
    r = np.clip(np.abs(mean), 1e-12, 1.0)
    return GroundTruth(phase=np.angle(mean), amplitude=np.abs(stack).mean(axis=0),
                       spread=np.sqrt(-2.0 * np.log(r)))
