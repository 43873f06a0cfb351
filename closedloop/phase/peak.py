"""Individual peak frequency from resting data, on a 1/f-corrected spectrum.

As in phastimate's SNR estimate: fit a line to log power over log frequency outside the
search band (the aperiodic 1/f background), subtract it, and take the largest residual
inside the search band. The residual at the peak, in dB, is the SNR of the rhythm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import signal

__all__ = ["RHYTHMS", "PeakFit", "find_peak"]

# rhythm -> (peak search range in Hz, half width of the band around the peak in Hz)
RHYTHMS: dict[str, tuple[tuple[float, float], float]] = {
    "theta": ((4.0, 8.0), 1.5),
    "alpha": ((7.0, 14.0), 2.0),  # also the sensorimotor mu rhythm
    "beta": ((13.0, 30.0), 3.0),
}


@dataclass(frozen=True, slots=True)
class PeakFit:
    """The individual peak: frequency, SNR over the 1/f fit, and the band around it."""

    peak_hz: float
    snr_db: float
    band_hz: tuple[float, float]


def find_peak(x: npt.NDArray[np.float64], fs: float, *,
              search_hz: tuple[float, float] | None = None,
              fit_hz: tuple[float, float] = (2.0, 40.0),
              half_width_hz: float | None = None, rhythm: str = "alpha") -> PeakFit:
    """Peak frequency of ``x`` within ``search_hz`` (default: the ``rhythm``'s range in
    :data:`RHYTHMS`, with its band half width).

    Raises:
        ValueError: fewer than 4 s of data.
    """
    if len(x) < 4 * fs:
        raise ValueError("at least 4 s of data are needed to find a peak frequency")
    default_search, default_half = RHYTHMS[rhythm]
    search_hz = search_hz or default_search
    half_width_hz = default_half if half_width_hz is None else half_width_hz
    fit_hz = (fit_hz[0], max(fit_hz[1], search_hz[1] + 10.0))
    nper = int(min(len(x), 4 * fs))
    f, pxx = signal.welch(x - np.mean(x), fs=fs, nperseg=nper, noverlap=nper // 2)
    fit = (f >= fit_hz[0]) & (f <= fit_hz[1]) & ((f < search_hz[0]) | (f > search_hz[1]))
    logp = np.log10(np.maximum(pxx, np.finfo(float).tiny))
    slope, intercept = np.polyfit(np.log10(f[fit]), logp[fit], 1)
    residual_db = 10.0 * (logp - (intercept + slope * np.log10(np.maximum(f, 1e-9))))
    inside = np.flatnonzero((f >= search_hz[0]) & (f <= search_hz[1]))
    best = inside[int(np.argmax(residual_db[inside]))]
    peak = float(f[best])
    return PeakFit(peak_hz=peak, snr_db=float(residual_db[best]),
                   band_hz=(max(0.5, peak - half_width_hz), peak + half_width_hz))
