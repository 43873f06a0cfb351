"""The estimators, built one way: the live tracker, ``evaluate-phase`` and ``calibrate``
all build them here, so that what is scored is what runs (and what ``calibrate``
recommends is what it scored).

The band-limited estimators are centred on the individual peak when the band is the
peak's (found by calibration), else on the band's geometric centre: ecHT with its
published width (half its centre frequency) and the resonator with
``phase.resonator_bandwidth_hz`` (at most the band's width).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from closedloop.config.schema import PhaseConfig
from closedloop.phase.ar_forecast import ARForecaster, ARParams
from closedloop.phase.echt import EcHT
from closedloop.phase.etp import ETP
from closedloop.phase.peak import PeakFit
from closedloop.phase.resonator import Resonator

__all__ = ["centre_of", "make_ar", "make_echt", "make_resonator", "train_etp"]

Array = npt.NDArray[np.float64]


def centre_of(band: tuple[float, float], peak: PeakFit | None) -> float:
    """The individual peak when ``band`` is its band, else the band's geometric centre."""
    if peak is not None and tuple(peak.band_hz) == tuple(band):
        return float(peak.peak_hz)
    return math.sqrt(band[0] * band[1])


def make_echt(c: PhaseConfig, fs: float, centre_hz: float) -> EcHT:
    """ecHT (Schreglmann et al. 2021) with ``phase.echt_window_ms``, at ``centre_hz``."""
    return EcHT(fs=fs, centre_hz=centre_hz, window=round(c.echt_window_ms * fs / 1000.0))


def make_ar(c: PhaseConfig, fs: float, band: tuple[float, float]) -> ARForecaster:
    """AR forward prediction with the configured parameters ."""
    return ARForecaster(ARParams.from_ms(fs=fs, band_hz=band, window_ms=c.window_ms,
                                         fir_ms=c.fir_ms, edge_ms=c.edge_ms,
                                         order=c.ar_order,
                                         hilbert_window_ms=c.hilbert_window_ms))


def make_resonator(c: PhaseConfig, fs: float, centre_hz: float,
                   band: tuple[float, float]) -> Resonator:
    """The configured resonator (its bandwidth at most the band's width)."""
    return Resonator(fs=fs, centre_hz=centre_hz, rhythm=c.rhythm,
                     bandwidth_hz=min(c.resonator_bandwidth_hz, band[1] - band[0]),
                     retune_every_s=c.resonator_retune_s)


def train_etp(c: PhaseConfig, x: Array, fs: float, band: tuple[float, float],
              step: int | None = None) -> ETP:
    """ETP with the configured window and edge, trained on ``x`` (estimates every
    ``step`` samples, 10 ms by default, for its phase offset)."""
    etp = ETP(fs=fs, band_hz=band, window=round(c.window_ms * fs / 1000.0),
              edge=round(c.edge_ms * fs / 1000.0))
    etp.train(x, step or max(1, round(0.01 * fs)))
    return etp
