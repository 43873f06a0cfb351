"""From raw EEG chunks to phase estimates: spatial filter, decimation, band, estimator.

:class:`PhaseTracker` is the functional core of the EEG side: no threads, no LSL, no
clock. It is fed chunks (samples and LSL timestamps) and asked for an estimate; it keeps
a preallocated history of the spatially filtered, decimated signal. When the band is
``"auto"`` it first collects ``calibration_s`` of data and finds the individual peak.

Estimators of three kinds: window estimators (AR, ecHT) read the newest samples of the
history; trained ones (``wiener``, ``etp``) are trained on the first ``calibration_s`` of
the continuous signal (in a worker thread live) and take over from AR forward prediction
:data:`TRAINED_SWITCH_DELAY_S` after that data ends; the streaming ``resonator`` is fed
every sample and its output is kept beside the signal.

Timing: the decimator's anti-alias filter delays the signal by a known amount at the band
centre; the estimate's time is moved back by it, so that phase refers to the true
acquisition time of the sample (the ``time_offset_ms`` of the stream has already been
taken off the LSL timestamps by the reader).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from closedloop.config.schema import PhaseConfig, PowerCondition
from closedloop.dsp.filters import Decimator
from closedloop.dsp.spatial import SpatialFilter, hjorth
from closedloop.phase.amplitude import BandAmplitude
from closedloop.phase.ar_forecast import ARForecaster
from closedloop.phase.echt import EcHT
from closedloop.phase.estimate import PhaseEstimate
from closedloop.phase.etp import ETP
from closedloop.phase.peak import PeakFit, find_peak
from closedloop.phase.registry import centre_of, make_ar, make_echt, make_resonator, train_etp
from closedloop.phase.resonator import Resonator
from closedloop.phase.wiener import WienerModel, WienerPhase, train_wiener

__all__ = ["TRAINED", "PhaseTracker", "TrackerStatus"]

Array = npt.NDArray[np.float64]

# Timestamps jump forward or back by a few milliseconds when chunks are stamped at push
# time without dejitter; only a jump beyond this is a gap (lost data, a restart) that
# resets the filters: a stream that stalls and comes back after missing samples resets
# here; one that delivers its backlog without a gap goes on.
_GAP_S = 0.05
_RECALIBRATION_MAX_S = 60.0
# a trained estimator takes over this much data after its training data ends: training
# runs in a worker thread live, and the switch happens at the same sample live and offline
TRAINED_SWITCH_DELAY_S = 2.0
# estimators trained on the first calibration_s of the session (AR until they are)
TRAINED = ("wiener", "etp")

Trained = WienerModel | ETP
Trainer = Callable[[Callable[[], Trained]], "Future[Trained]"]
WindowEstimator = ARForecaster | EcHT | WienerPhase | ETP


def _run_now(fn: Callable[[], Trained]) -> Future[Trained]:
    """Train in the calling thread (offline, tests)."""
    fut: Future[Trained] = Future()
    try:
        fut.set_result(fn())
    except Exception as exc:  # handed to whoever reads the future
        fut.set_exception(exc)
    return fut


@dataclass(frozen=True, slots=True)
class TrackerStatus:
    """Why there is (or is not) an estimate: ``ready``, ``calibrating``, ``warming_up``."""

    state: str
    detail: str = ""


class _Condition:
    """A power condition's own chain: spatial filter, decimator, band amplitude."""

    def __init__(self, cond: PowerCondition, labels: Sequence[str], cfg: PhaseConfig,
                 decimator: Decimator) -> None:
        channel = cond.channel or cfg.channel
        reference = (cond.reference if cond.reference is not None else
                     cfg.reference if channel == cfg.channel else ())
        self.spatial: SpatialFilter = hjorth(labels, channel, reference)
        self.decimator = Decimator(decimator.fs_in, decimator.factor)
        self.amplitude = BandAmplitude(decimator.fs_out, cond.band_hz)

    def process(self, data: npt.NDArray[np.floating], ts: Array) -> Array:
        x, _ = self.decimator.process(self.spatial.apply(data), ts)
        return self.amplitude.series(x)

    def reset(self) -> None:
        self.decimator.reset()
        self.amplitude.reset()


class PhaseTracker:
    """Stateful EEG-to-phase chain for one target channel (and the band amplitudes of
    the trigger's power conditions)."""

    def __init__(self, *, fs_in: float, labels: Sequence[str], cfg: PhaseConfig,
                 trainer: Trainer | None = None,
                 conditions: Sequence[PowerCondition] = ()) -> None:
        """``trainer`` runs the training of a trained estimator (``wiener`` without a
        model file, ``etp``): by default at once, in the calling thread; the live service
        hands it to a worker thread."""
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
        self._a = np.zeros(cap)  # band amplitude at each sample (0 before the band is known)
        self._conditions = [_Condition(c, labels, cfg, self.decimator) for c in conditions]
        self._c = np.zeros((len(self._conditions), cap))  # their amplitudes
        # the streaming estimator's output at each sample (resonator only)
        self._z = np.zeros(cap if cfg.estimator == "resonator" else 0, dtype=complex)
        self.resonator: Resonator | None = None
        self._end = 0  # write position in the history arrays
        self._n = 0  # valid samples ending at _end (since the last reset)
        self._last_ts: float | None = None
        self.peak: PeakFit | None = None
        self.band: tuple[float, float] | None = None
        self.estimator: WindowEstimator | Resonator | None = None
        self.amplitude: BandAmplitude | None = None
        self._delay_s = 0.0
        self.resets = 0
        # every channel the estimate or a power condition uses: a non-finite sample there
        # (an amplifier's NaN for a saturated or disconnected electrode) restarts the chain
        # after it, so no filter state is poisoned and no estimate spans it
        self._used = np.array(sorted({*self.spatial.indices,
                                      *(i for c in self._conditions
                                        for i in c.spatial.indices)}), dtype=np.intp)
        self.nonfinite = 0  # samples dropped because a used channel was not finite
        self._total = 0  # samples ever written to the history (never reset)
        self._trainer = trainer or _run_now
        self.wiener: WienerModel | None = None  # the trained filter ("wiener")
        self._trained: WienerPhase | ETP | None = None  # the trained estimator in use
        # "off" (not a trained estimator), "collecting", "training", "ready", "failed: why"
        self.training_state = "collecting" if cfg.estimator in TRAINED else "off"
        self._training: Future[Trained] | None = None
        self._switch_at = 0  # value of _total from which the trained estimator is used
        if cfg.estimator == "wiener" and cfg.wiener_file:
            self._install(WienerModel.load(Path(cfg.wiener_file), self.fs))
            assert self.wiener is not None
            self._set_band(self.wiener.band_hz)
        elif cfg.band_hz != "auto":
            self._set_band(cfg.band_hz)

    def set_band(self, band: tuple[float, float]) -> None:
        """Use another band from now on (the estimator and amplitude filter restart)."""
        self._set_band(band)
        self._feed_amplitude_history()

    def _feed_amplitude_history(self) -> None:
        """Run the (new) band's amplitude filter and resonator over the history held."""
        span = slice(self._end - self._n, self._end)
        if self.amplitude is not None and self._n:
            self._a[span] = self.amplitude.series(self._x[span])
        if self.resonator is not None and self._n:
            self._z[span] = self.resonator.process(self._x[span])

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
        self.peak = find_peak(self._x[self._end - n:self._end], self.fs,
                              rhythm=self.cfg.rhythm)
        self.set_band(self.peak.band_hz)
        return self.peak

    def _set_band(self, band: tuple[float, float]) -> None:
        c = self.cfg
        self.band = band
        self.resonator = None
        if self._trained is not None:  # keeps the band it was trained for
            self.estimator = self._trained
        elif c.estimator == "echt":  # (closedloop.phase.registry: as it is evaluated)
            self.estimator = make_echt(c, self.fs, centre_of(band, self.peak))
        elif c.estimator == "resonator":
            self.resonator = make_resonator(c, self.fs, centre_of(band, self.peak), band)
            self.estimator = self.resonator
        else:
            self.estimator = make_ar(c, self.fs, band)
        self.amplitude = BandAmplitude(self.fs, band)
        self._delay_s = self.decimator.phase_delay_s(math.sqrt(band[0] * band[1]))

    def reset(self) -> None:
        """Drop history and filter state (after a gap or a stream restart)."""
        self.decimator.reset()
        if self.amplitude is not None:
            self.amplitude.reset()
        if self.resonator is not None:
            self.resonator.reset()
        for cond in self._conditions:
            cond.reset()
        self._n = 0
        self._last_ts = None
        self.resets += 1

    def push(self, data: npt.NDArray[np.floating], ts: Array) -> None:
        """Feed raw samples (n, channels) with their LSL timestamps.

        A sample that is not finite in a used channel resets the chain: estimation starts
        again from the first sample after it (counted in :attr:`nonfinite`)."""
        if len(ts) == 0:
            return
        used = data[:, self._used]
        if not np.isfinite(used).all():
            bad = np.flatnonzero(~np.isfinite(used).all(axis=1))
            self.nonfinite += len(bad)
            self.reset()
            data, ts = data[bad[-1] + 1:], ts[bad[-1] + 1:]
            if len(ts) == 0:
                return
            self._last_ts = None  # the reset already restarted the chain
        if self._last_ts is not None:
            step = ts[0] - self._last_ts
            if abs(step) > max(_GAP_S, 5.0 / self.fs_in):  # a gap, or time ran backwards
                self.reset()
        self._last_ts = float(ts[-1])
        x, xt = self.decimator.process(self.spatial.apply(data), ts)
        m = len(x)
        if m == 0:
            return
        amp = self.amplitude.series(x) if self.amplitude is not None else np.zeros(m)
        z = self.resonator.process(x) if self.resonator is not None else None
        cond_amp = [c.process(data, ts) for c in self._conditions]
        cap = len(self._x)
        if m >= cap:
            x, xt, amp, m = x[-cap:], xt[-cap:], amp[-cap:], cap
            z = z[-cap:] if z is not None else None
            cond_amp = [c[-cap:] for c in cond_amp]
        # shift left only when the end is reached: amortised, no per-chunk allocation
        if self._end + m > cap:
            keep = min(self._n, cap - m)
            self._x[:keep] = self._x[self._end - keep:self._end]
            self._t[:keep] = self._t[self._end - keep:self._end]
            self._a[:keep] = self._a[self._end - keep:self._end]
            self._c[:, :keep] = self._c[:, self._end - keep:self._end]
            if len(self._z):
                self._z[:keep] = self._z[self._end - keep:self._end]
            self._end = keep
        self._x[self._end:self._end + m] = x
        self._t[self._end:self._end + m] = xt
        self._a[self._end:self._end + m] = amp
        for k, c in enumerate(cond_amp):
            self._c[k, self._end:self._end + m] = c
        if z is not None:
            self._z[self._end:self._end + m] = z
        self._end += m
        self._total += m
        self._n = min(self._n + m, self._end)
        n_cal = self.cfg.calibration_s * self.fs
        if self.band is None and self._n >= n_cal:
            self._calibrate()
        if self.training_state == "collecting" and self.band is not None and self._n >= n_cal:
            self._start_training(int(n_cal))

    def _start_training(self, n: int) -> None:
        """Train the estimator on the first ``n`` samples of the continuous signal held
        (the same samples however they were chunked); it takes over
        :data:`TRAINED_SWITCH_DELAY_S` after them (AR forward prediction until then)."""
        start = self._end - self._n
        x = self._x[start:start + n].copy()
        band = self.band  # fixed, or found in these same samples ("auto")
        assert band is not None
        c, fs = self.cfg, self.fs
        train: Callable[[], Trained]
        if c.estimator == "wiener":
            def train() -> Trained:
                return train_wiener(x, fs, taps_ms=c.wiener_taps_ms, band_hz=band,
                                    rhythm=c.rhythm)
        else:
            def train() -> Trained:
                return train_etp(c, x, fs, band)
        self.training_state = "training"
        self._switch_at = self._total - self._n + n + int(TRAINED_SWITCH_DELAY_S * self.fs)
        self._training = self._trainer(train)

    def _install(self, trained: Trained) -> None:
        if isinstance(trained, WienerModel):
            self.wiener = trained
            self._trained = WienerPhase(trained)
        else:
            self._trained = trained
        self.training_state = "ready"
        self.estimator = self._trained

    def _maybe_switch(self, sample: int) -> None:
        """Install the trained filter once the estimate's sample reaches the switch point
        (waiting for the training if it has not finished by then)."""
        if self._training is None or sample < self._switch_at:
            return
        training, self._training = self._training, None
        try:
            trained = training.result()
        except (ValueError, np.linalg.LinAlgError) as exc:
            self.training_state = f"failed: {exc}"
            return
        self._install(trained)

    def _calibrate(self) -> None:
        """The individual peak in the first ``calibration_s`` of the continuous signal
        (the same samples however they were chunked)."""
        start = self._end - self._n
        x = self._x[start:start + int(self.cfg.calibration_s * self.fs)]
        self.peak = find_peak(x, self.fs, rhythm=self.cfg.rhythm)
        self._set_band(self.peak.band_hz)
        self._feed_amplitude_history()

    def status(self) -> TrackerStatus:
        """Whether :meth:`estimate` can give an estimate now, and why not."""
        if self.estimator is None:
            return TrackerStatus("calibrating",
                                 f"{self._n / self.fs:.1f} of {self.cfg.calibration_s:g} s")
        if self._n < self.estimator.window:
            return TrackerStatus("warming_up", f"{self._n} of {self.estimator.window} samples")
        return TrackerStatus("ready")

    def decimated_count(self, n_raw: int) -> int:
        """How many samples the history gains from the first ``n_raw`` raw samples of the
        next chunk (for :meth:`estimate` at a sample inside a chunk pushed whole)."""
        return self.decimator.kept_count(n_raw)

    def estimate(self, back: int = 0) -> PhaseEstimate | None:
        """Phase at the newest sample (or ``back`` samples of the history before it), or
        None when not ready or the fit was unusable."""
        if self._training is not None:
            self._maybe_switch(self._total - back)
        est = self.estimator
        if est is None or self._n - back < est.window:
            return None
        end = self._end - back
        t_last = float(self._t[end - 1]) - self._delay_s
        if isinstance(est, Resonator):
            result = est.estimate_from(self._z[end - est.slope - 1:end], t_last)
        else:
            result = est.estimate(self._x[end - est.window:end], t_last)
        if result is None or self.band is None:
            return None
        lo, hi = self.band
        if not lo - 2.0 <= result.freq_hz <= hi + 2.0:
            return None  # the forecast left the band: do not trust its phase
        return result

    def amplitude_at(self, back: int = 0) -> float:
        """The causal band amplitude at the newest sample or ``back`` samples before it
        (0 before the band is known)."""
        if self._n <= back:
            return 0.0
        return float(self._a[self._end - 1 - back])

    def condition_amplitudes(self, back: int = 0) -> tuple[float, ...]:
        """The band amplitude of each power condition, as :meth:`amplitude_at`."""
        if self._n <= back:
            return tuple(0.0 for _ in self._conditions)
        return tuple(float(v) for v in self._c[:, self._end - 1 - back])

    @property
    def band_amplitude(self) -> float:
        """The causal band amplitude at the newest sample (0 before the band is known)."""
        return self.amplitude_at(0)

    @property
    def newest_time(self) -> float | None:
        """LSL time of the newest raw sample pushed."""
        return self._last_ts
