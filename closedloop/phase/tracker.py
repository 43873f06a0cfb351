"""From raw EEG chunks to phase estimates: spatial filter, decimation, band, AR.

:class:`PhaseTracker` is the functional core of the EEG side: no threads, no LSL, no
clock. It is fed chunks (samples and LSL timestamps) and asked for an estimate; it keeps
a preallocated history of the spatially filtered, decimated signal. When the band is
``"auto"`` it first collects ``calibration_s`` of data and finds the individual peak.

Timing: the decimator's anti-alias filter delays the signal by a known amount at the band
centre; the estimate's time is moved back by it, so that phase refers to the true
acquisition time of the sample (the ``time_offset_ms`` of the stream has already been
taken off the LSL timestamps by the reader).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from closedloop.config.schema import PhaseConfig
from closedloop.dsp.filters import Decimator
from closedloop.dsp.spatial import hjorth
from closedloop.phase.amplitude import BandAmplitude
from closedloop.phase.ar_forecast import ARForecaster, ARParams
from closedloop.phase.echt import EcHT
from closedloop.phase.estimate import PhaseEstimate
from closedloop.phase.peak import PeakFit, find_peak

__all__ = ["PhaseTracker", "TrackerStatus"]

Array = npt.NDArray[np.float64]

# Timestamps jump forward or back by a few milliseconds when chunks are stamped at push
# time without dejitter; only a jump beyond this is a gap (lost data, a restart) that
# resets the filters. Loss and recovery of the stream reset them explicitly anyway.
_GAP_S = 0.05
_RECALIBRATION_MAX_S = 60.0


@dataclass(frozen=True, slots=True)
class TrackerStatus:
    """Why there is (or is not) an estimate: ``ready``, ``calibrating``, ``warming_up``."""

    state: str
    detail: str = ""


class PhaseTracker:
    """Stateful EEG-to-phase chain for one target channel."""

    def __init__(self, *, fs_in: float, labels: Sequence[str], cfg: PhaseConfig) -> None:
        self.cfg = cfg
        self.fs_in = fs_in
        self.spatial = hjorth(labels, cfg.channel, cfg.reference)
        self.decimator = Decimator(fs_in, Decimator.factor_for(fs_in, cfg.processing_rate_hz))
        self.fs = self.decimator.fs_out
        # history: enough for the estimator, a calibration and a later re-calibration
        cap = int(max(cfg.window_ms / 1000.0 * 4, cfg.calibration_s + 1.0,
                      _RECALIBRATION_MAX_S) * self.fs) + 16
        self._x = np.zeros(cap)
        self._t = np.zeros(cap)
        self._end = 0  # write position in the history arrays
        self._n = 0  # valid samples ending at _end (since the last reset)
        self._last_ts: float | None = None
        self.peak: PeakFit | None = None
        self.band: tuple[float, float] | None = None
        self.estimator: ARForecaster | EcHT | None = None
        self.amplitude: BandAmplitude | None = None
        self._delay_s = 0.0
        self.resets = 0
        if cfg.band_hz != "auto":
            self._set_band(cfg.band_hz)

    def set_band(self, band: tuple[float, float]) -> None:
        """Use another band from now on (the estimator and amplitude filter restart)."""
        self._set_band(band)
        if self.amplitude is not None and self._n:
            self.amplitude.process(self._x[self._end - self._n:self._end])

    def available_s(self) -> float:
        """Seconds of continuous signal held."""
        return self._n / self.fs

    def calibrate(self, seconds: float) -> PeakFit:
        """Find the individual peak in the newest ``seconds`` of signal and use its band.

        Raises:
            ValueError: less data than asked for (or than 4 s).
        """
        n = int(seconds * self.fs)
        if n > self._n:
            raise ValueError(f"only {self._n / self.fs:.1f} s of continuous EEG held, "
                             f"{seconds:g} s asked for")
        self.peak = find_peak(self._x[self._end - n:self._end], self.fs)
        self.set_band(self.peak.band_hz)
        return self.peak

    def _set_band(self, band: tuple[float, float]) -> None:
        c = self.cfg
        self.band = band
        params = ARParams.from_ms(fs=self.fs, band_hz=band, window_ms=c.window_ms,
                                  fir_ms=c.fir_ms, edge_ms=c.edge_ms, order=c.ar_order,
                                  hilbert_window_ms=c.hilbert_window_ms)
        if c.estimator == "echt":  # centred on the band's middle (the peak), same width
            self.estimator = EcHT(fs=self.fs, centre_hz=(band[0] + band[1]) / 2.0,
                                  width_hz=band[1] - band[0],
                                  window=round(c.echt_window_ms * self.fs / 1000.0))
        else:
            self.estimator = ARForecaster(params)
        self.amplitude = BandAmplitude(self.fs, band)
        self._delay_s = self.decimator.phase_delay_s(math.sqrt(band[0] * band[1]))

    def reset(self) -> None:
        """Drop history and filter state (after a gap or a stream restart)."""
        self.decimator.reset()
        if self.amplitude is not None:
            self.amplitude.reset()
        self._n = 0
        self._last_ts = None
        self.resets += 1

    def push(self, data: npt.NDArray[np.floating], ts: Array) -> None:
        """Feed raw samples (n, channels) with their LSL timestamps."""
        if len(ts) == 0:
            return
        if self._last_ts is not None:
            step = ts[0] - self._last_ts
            if abs(step) > max(_GAP_S, 5.0 / self.fs_in):  # a gap, or time ran backwards
                self.reset()
        self._last_ts = float(ts[-1])
        x, xt = self.decimator.process(self.spatial.apply(data), ts)
        if self.amplitude is not None:
            self.amplitude.process(x)
        m = len(x)
        if m == 0:
            return
        cap = len(self._x)
        if m >= cap:
            x, xt, m = x[-cap:], xt[-cap:], cap
        # shift left only when the end is reached: amortised, no per-chunk allocation
        if self._end + m > cap:
            keep = min(self._n, cap - m)
            self._x[:keep] = self._x[self._end - keep:self._end]
            self._t[:keep] = self._t[self._end - keep:self._end]
            self._end = keep
        self._x[self._end:self._end + m] = x
        self._t[self._end:self._end + m] = xt
        self._end += m
        self._n = min(self._n + m, self._end)
        if self.band is None and self._n >= self.cfg.calibration_s * self.fs:
            self._calibrate()

    def _calibrate(self) -> None:
        x = self._x[self._end - self._n:self._end]
        self.peak = find_peak(x, self.fs)
        self._set_band(self.peak.band_hz)
        assert self.amplitude is not None
        self.amplitude.process(x)

    def status(self) -> TrackerStatus:
        """Whether :meth:`estimate` can give an estimate now, and why not."""
        if self.estimator is None:
            return TrackerStatus("calibrating",
                                 f"{self._n / self.fs:.1f} of {self.cfg.calibration_s:g} s")
        if self._n < self.estimator.window:
            return TrackerStatus("warming_up", f"{self._n} of {self.estimator.window} samples")
        return TrackerStatus("ready")

    def estimate(self) -> PhaseEstimate | None:
        """Phase at the newest sample, or None when not ready or the fit was unusable."""
        est = self.estimator
        if est is None or self._n < est.window:
            return None
        x = self._x[self._end - est.window:self._end]
        result = est.estimate(x, float(self._t[self._end - 1]) - self._delay_s)
        if result is None or self.band is None:
            return None
        lo, hi = self.band
        if not lo - 2.0 <= result.freq_hz <= hi + 2.0:
            return None  # the forecast left the band: do not trust its phase
        return result

    @property
    def band_amplitude(self) -> float:
        """The causal band amplitude at the newest sample (0 before the band is known)."""
        return self.amplitude.value if self.amplitude is not None else 0.0

    @property
    def newest_time(self) -> float | None:
        """LSL time of the newest raw sample pushed."""
        return self._last_ts
