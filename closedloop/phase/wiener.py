"""A causal filter trained on the person's own EEG to output the analytic signal (ours).

The published real-time methods (AR forward prediction, ETP, ecHT, oscillators) assume a
model of the rhythm and band-pass it with a generic filter. Here nothing is assumed: a
causal FIR filter ``w`` (complex, ``taps`` long) is fitted by least squares so that its
output on the raw, spatially filtered EEG is the *offline ground truth* analytic signal
(Zrenner et al. 2020: the circular mean over four zero-phase band-pass filters and the
Hilbert transform, :mod:`closedloop.phase.truth`) of the same calibration data. It is the
Wiener filter (Wiener 1949) for that target: among causal linear estimators, the one with
the smallest mean squared error, tuned to this person's spectrum and noise.

Wiener N (1949). Extrapolation, Interpolation, and Smoothing of Stationary Time Series.
MIT Press. Zrenner C et al. (2020). The shaky ground truth of real-time phase
estimation. NeuroImage 214:116761.

Training, on ``x`` at the processing rate (seconds to minutes of resting EEG):

1. the individual peak and its band (:func:`~closedloop.phase.peak.find_peak`) and the
   ground-truth analytic signal ``z`` of ``x`` in that band;
2. ridge regression ``w = argmin sum_t |z(t) - w . (x[t-taps+1..t] - mean)|^2 +
   lam ||w||^2`` over ``t`` away from the ends of ``x`` (where the offline truth is
   itself unreliable), every ``stride``-th sample (neighbouring rows are nearly the same);
   ``lam`` (relative to the mean diagonal of the Gram matrix) is the one of
   :data:`LAMBDAS` with the lowest cross-validated error (step 3) where the output's
   amplitude is above its median: on EEGMAT it is 1e-7-1e-5 for every subject (C3 Hjorth
   13.4°, raw 16.4° with 30 s of training; a fixed 1e-2 gave 14.9° and 18.4°);
3. the expected error as a function of the output's amplitude, by 5-fold
   cross-validation (each fifth of ``x`` estimated by weights fitted on the other four):
   the estimate's *confidence* is the circular SD of error expected at its amplitude.

Estimate, per update: ``z_hat = w . (window - mean)``; phase = angle, amplitude = modulus;
the frequency from the phase advance of ``z_hat`` over the last quarter cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from closedloop.dsp.circular import circular_sd
from closedloop.phase.estimate import PhaseEstimate
from closedloop.phase.peak import find_peak
from closedloop.phase.truth import ground_truth

__all__ = ["LAMBDAS", "MIN_SNR_DB", "WienerModel", "WienerPhase", "train_wiener"]

Array = npt.NDArray[np.float64]
CArray = npt.NDArray[np.complex128]

_EDGE_S = 2.0  # truth samples this close to either end of the training data are not used
_FOLDS = 5  # cross-validation folds for the expected error
# Below this SNR of the individual peak (1/f-corrected spectrum) there is no rhythm whose
# phase is worth targeting: band-passed noise has a "phase" the filter can learn to follow,
# but it is not a brain state. Every estimate then reports an expected error of 180°.
MIN_SNR_DB = 6.0
_AMP_BINS = 8
# ridge strengths tried, relative to the mean diagonal of the Gram matrix
LAMBDAS = (1e-7, 1e-5, 1e-3, 1e-1)


@dataclass(frozen=True)
class WienerModel:
    """A trained filter, and what it is expected to achieve."""

    fs: float
    weights: CArray  # applied to the newest ``taps`` samples, oldest first
    band_hz: tuple[float, float]
    peak_hz: float
    # expected circular SD of error (deg) of outputs with amplitudes from each edge to the
    # next (the last bin has no upper end): 8 bins holding equal shares of training data
    amp_edges: Array
    expected_sd_deg: Array
    holdout_sd_deg_above_median: float
    snr_db: float
    ridge: float = 0.0  # the ridge strength chosen (relative; 0 = not recorded)

    @property
    def rhythm(self) -> bool:
        """Whether the training data had a rhythm (SNR at least :data:`MIN_SNR_DB`)."""
        return self.snr_db >= MIN_SNR_DB

    @property
    def taps(self) -> int:
        return len(self.weights)

    def expected_error_deg(self, amplitude: float) -> float:
        """Circular SD of error expected at this output amplitude (cross-validated),
        or 180° when the training data had no rhythm (:data:`MIN_SNR_DB`)."""
        if not self.rhythm:
            return 180.0
        k = int(np.searchsorted(self.amp_edges, amplitude, side="right")) - 1
        return float(self.expected_sd_deg[min(max(k, 0), len(self.expected_sd_deg) - 1)])

    def save(self, path: Path) -> None:
        """Write the model to an ``.npz`` file."""
        np.savez(path, fs=self.fs, weights=self.weights, band_hz=np.array(self.band_hz),
                 peak_hz=self.peak_hz, amp_edges=self.amp_edges,
                 expected_sd_deg=self.expected_sd_deg,
                 holdout_sd_deg_above_median=self.holdout_sd_deg_above_median,
                 snr_db=self.snr_db, ridge=self.ridge)

    @classmethod
    def load(cls, path: Path, fs: float) -> WienerModel:
        """Read a model written by :meth:`save`, for data at ``fs``.

        Raises:
            ValueError: unreadable, not a model, or trained at another rate.
        """
        try:
            with np.load(path) as f:
                model = cls(fs=float(f["fs"]), weights=np.asarray(f["weights"], np.complex128),
                            band_hz=(float(f["band_hz"][0]), float(f["band_hz"][1])),
                            peak_hz=float(f["peak_hz"]), amp_edges=np.asarray(f["amp_edges"]),
                            expected_sd_deg=np.asarray(f["expected_sd_deg"]),
                            holdout_sd_deg_above_median=float(
                                f["holdout_sd_deg_above_median"]),
                            snr_db=float(f["snr_db"]),
                            ridge=float(f["ridge"]) if "ridge" in f else 0.0)
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: not a Wiener phase model ({exc})") from exc
        if abs(model.fs - fs) > 1e-6 * fs:
            raise ValueError(f"{path}: trained at {model.fs:g} Hz, the processing rate is "
                             f"{fs:g} Hz")
        if model.taps < 8 or not np.all(np.isfinite(model.weights)):
            raise ValueError(f"{path}: the filter's weights are unusable")
        return model


def _solve(gram: Array, rhs: CArray, lam: float) -> CArray:
    """Ridge solution; ``lam`` relative to the mean diagonal of the Gram matrix."""
    reg = lam * float(np.trace(gram)) / len(gram)
    w = np.linalg.solve(gram + reg * np.eye(len(gram)), rhs)
    return np.asarray(w, dtype=np.complex128)


def _rows(x: Array, taps: int, ends: npt.NDArray[np.intp]) -> Array:
    """Windows ending at each of ``ends`` (inclusive), their mean removed."""
    view = sliding_window_view(x, taps)[ends - taps + 1]
    centred: Array = view - view.mean(axis=1, keepdims=True)
    return centred


def train_wiener(x: Array, fs: float, *, taps_ms: float = 500.0,
                 lam: float | tuple[float, ...] = LAMBDAS, stride: int = 2,
                 band_hz: tuple[float, float] | None = None,
                 rhythm: str = "alpha") -> WienerModel:
    """Fit the filter on calibration data ``x`` (the spatially filtered EEG at ``fs``),
    for the ground truth in ``band_hz`` (default: around the ``rhythm``'s peak), with
    the ridge strength ``lam`` (several: the best by cross-validation).

    Raises:
        ValueError: too little data for the filter length.
    """
    taps = max(8, round(taps_ms * fs / 1000.0))
    edge = int(_EDGE_S * fs)
    if len(x) < taps + 2 * edge + int(10 * fs):
        raise ValueError(f"{len(x) / fs:.1f} s of EEG is too little to train the Wiener "
                         f"filter (at least {(taps + 2 * edge) / fs + 10:.0f} s)")
    x = np.asarray(x, dtype=np.float64)
    peak = find_peak(x, fs, rhythm=rhythm)
    band = band_hz if band_hz is not None else peak.band_hz
    truth = ground_truth(x, fs, band)
    z = truth.amplitude * np.exp(1j * truth.phase)
    first = max(taps - 1, edge)
    last = len(x) - edge  # exclusive
    ends = np.arange(first, last, stride)
    rows = _rows(x, taps, ends)
    target = z[ends]
    # k-fold cross-validation for the expected error: the Gram matrix and right-hand side
    # of each fold are computed once; each fit leaves one contiguous fold out
    folds = np.array_split(np.arange(len(ends)), _FOLDS)
    grams = [rows[f].T @ rows[f] for f in folds]
    rhs = [rows[f].T @ target[f] for f in folds]
    gram_all, rhs_all = sum(grams[1:], grams[0]), sum(rhs[1:], rhs[0])
    best: tuple[float, float, CArray] | None = None  # (held-out SD, lam, outputs)
    for lam_k in (lam,) if isinstance(lam, float) else lam:
        out = np.empty(len(ends), dtype=np.complex128)
        for f, g, b in zip(folds, grams, rhs, strict=True):
            out[f] = rows[f] @ _solve(gram_all - g, rhs_all - b, lam_k)
        amp = np.abs(out)
        held_out = _circ_sd_deg(np.angle(out * np.conj(target))[amp > np.median(amp)])
        if best is None or held_out < best[0]:
            best = (held_out, lam_k, out)
    assert best is not None
    above, lam_best, out = best
    err = np.angle(out * np.conj(target))
    amp = np.abs(out)
    edges = np.quantile(amp, np.linspace(0.0, 1.0, _AMP_BINS + 1)[:-1])
    # expected error of outputs of about this amplitude: per bin between the edges
    upper = [*edges[1:], np.inf]
    sd = np.array([_circ_sd_deg(err[(amp >= lo) & (amp < hi)])
                   for lo, hi in zip(edges, upper, strict=True)])
    w = _solve(gram_all, rhs_all, lam_best)  # final weights from all the data
    return WienerModel(fs=fs, weights=w, band_hz=band, peak_hz=peak.peak_hz,
                       amp_edges=edges, expected_sd_deg=sd,
                       holdout_sd_deg_above_median=above, snr_db=peak.snr_db,
                       ridge=lam_best)


def _circ_sd_deg(err: Array) -> float:
    if not len(err):
        return 180.0
    return math.degrees(circular_sd(err))


class WienerPhase:
    """The trained filter as a phase estimator on a window of samples at ``model.fs``."""

    def __init__(self, model: WienerModel) -> None:
        self.model = model
        taps = model.taps
        # the frequency: phase advance over about a quarter cycle at the peak
        self._lag = max(1, round(model.fs / model.peak_hz / 4.0))
        self._w = np.ascontiguousarray(model.weights)
        self._window = taps + self._lag
        self._rad_per_sample_to_hz = model.fs / (2.0 * math.pi * self._lag)

    @property
    def window(self) -> int:
        """Samples needed per estimate."""
        return self._window

    def estimate(self, x: Array, t_last: float) -> PhaseEstimate | None:
        """Phase at the last sample of ``x`` (``len(x) == window``), or None if unusable."""
        if len(x) != self._window:
            return None
        taps, lag = self.model.taps, self._lag
        now = x[lag:]
        before = x[:taps]
        z = complex((now - now.mean()) @ self._w)
        z_before = complex((before - before.mean()) @ self._w)
        phase = math.atan2(z.imag, z.real)
        turn = z * z_before.conjugate()
        freq = math.atan2(turn.imag, turn.real) * self._rad_per_sample_to_hz
        amp = abs(z)
        if not (math.isfinite(phase) and math.isfinite(freq) and amp > 0.0):
            return None
        return PhaseEstimate(lsl_time=t_last, phase_rad=phase, freq_hz=freq, amplitude=amp,
                             expected_error_deg=self.model.expected_error_deg(amp))
