"""Offline evaluation of causal phase estimators against the Zrenner 2020 ground truth.

Every estimator runs causally over a recording, asked for the phase at the newest sample
every ``step`` samples (10 ms by default); errors are scored after a training period
(ETP learns from it; the individual peak is found in it) at all points and where the
ground-truth amplitude is above its median and 75th percentile, as in the published
comparisons.

Each estimator runs with the parameters of a :class:`~closedloop.config.schema.PhaseConfig`
(the defaults unless given), as the live tracker would; ``closedloop calibrate`` scores
several parameter variants this way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from closedloop.config.schema import PhaseConfig
from closedloop.dsp.circular import circular_mean, circular_sd, wrap
from closedloop.phase.estimate import PhaseEstimate
from closedloop.phase.peak import find_peak
from closedloop.phase.registry import make_ar, make_echt, make_resonator, train_etp
from closedloop.phase.truth import ground_truth
from closedloop.phase.wiener import WienerPhase, train_wiener

__all__ = ["ESTIMATORS", "PUBLISHED", "EvaluationResult", "evaluate_signal", "score"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class EvaluationResult:
    """Scores of one estimator on one signal."""

    name: str
    scores: dict[str, dict[str, float | int | None]]
    cost_us: dict[str, float]
    errors: Array  # radians, at every scored point (NaN where no estimate)
    gates: dict[str, npt.NDArray[np.bool_]]
    expected: Array | None = None  # the estimator's own expected error (deg), if it says


def score(errors: Array) -> dict[str, float | int | None]:
    """Bias (circular mean), circular SD and mean absolute error, in degrees."""
    e = errors[np.isfinite(errors)]
    if not len(e):
        return {"n": 0, "bias_deg": None, "circ_sd_deg": None, "mae_deg": None}
    return {"n": len(e), "bias_deg": round(math.degrees(circular_mean(e)), 2),
            "circ_sd_deg": round(math.degrees(circular_sd(e)), 2),
            "mae_deg": round(math.degrees(float(np.mean(np.abs(wrap(e))))), 2)}


Runner = Callable[[Array, int], PhaseEstimate | None]


def _window_runner(est: Any) -> Runner:
    def run(x: Array, i: int) -> PhaseEstimate | None:
        if i < est.window:
            return None
        result: PhaseEstimate | None = est.estimate(x[i - est.window:i], float(i - 1))
        return result
    return run


def _make(name: str, fs: float, band: tuple[float, float], peak_hz: float,
          train: Array, step: int, c: PhaseConfig) -> Runner:
    """The estimator ``name`` with the parameters of ``c`` (its rhythm too), built as the
    live tracker builds it."""
    if name == "ar":
        return _window_runner(make_ar(c, fs, band))
    if name == "echt":
        return _window_runner(make_echt(c, fs, peak_hz))
    if name == "etp":
        return _window_runner(train_etp(c, train, fs, band, step))
    if name == "resonator":
        res = make_resonator(c, fs, peak_hz, band)
        pos = {"n": 0}

        def run(x: Array, i: int) -> PhaseEstimate | None:
            res.process(x[pos["n"]:i])
            pos["n"] = i
            return res.estimate(float(i - 1))
        return run
    if name == "wiener":  # ours: trained on the training period, like ETP
        return _window_runner(WienerPhase(train_wiener(
            train, fs, band_hz=band, rhythm=c.rhythm, taps_ms=c.wiener_taps_ms)))
    raise ValueError(f"unknown estimator {name}")


PUBLISHED = ("ar", "etp", "echt", "resonator")
ESTIMATORS = (*PUBLISHED, "wiener")


def evaluate_signal(x: Array, fs: float, *, estimators: tuple[str, ...] = ESTIMATORS,
                    train_s: float = 60.0, step: int | None = None, rhythm: str = "alpha",
                    variants: Mapping[str, tuple[str, PhaseConfig]] | None = None
                    ) -> tuple[dict[str, Any], list[EvaluationResult]]:
    """Run each estimator causally over ``x``; score after ``train_s``.

    ``variants`` (label -> estimator name and the parameters to run it with) replaces
    ``estimators``, each with the default parameters and ``rhythm``.

    Returns:
        ``(info, results)``: the peak, bands and ground-truth spread, and per-estimator
        scores at all points, amplitude above the median and above the 75th percentile.
    """
    step = step or max(1, int(0.01 * fs + 0.5))
    n_train = int(train_s * fs)
    whole_peak = find_peak(x, fs, rhythm=rhythm)
    truth = ground_truth(x, fs, whole_peak.band_hz)
    train_peak = find_peak(x[:n_train], fs, rhythm=rhythm)
    idx = np.arange(n_train, len(x) + 1, step)  # estimate at sample idx-1 with data [:idx]
    amp = truth.amplitude[idx - 1]
    gates = {"all": np.ones(len(idx), bool), "amp>median": amp > np.median(amp),
             "amp>p75": amp > np.percentile(amp, 75)}
    if variants is None:
        params = PhaseConfig(rhythm=rhythm)  # type: ignore[arg-type]
        variants = {name: (name, params) for name in estimators}
    results = []
    for label, (name, params) in variants.items():
        run = _make(name, fs, train_peak.band_hz, train_peak.peak_hz, x[:n_train], step,
                    params)
        if name == "resonator":  # let it settle on the training data first
            for j in range(step, n_train, step):
                run(x, j)
        errors = np.full(len(idx), np.nan)
        expected = np.full(len(idx), np.nan)
        costs = []
        for k, i in enumerate(idx):
            t0 = time.perf_counter_ns()
            est = run(x, int(i))
            costs.append(time.perf_counter_ns() - t0)
            if est is not None:
                errors[k] = est.phase_rad - truth.phase[i - 1]
                if est.expected_error_deg is not None:
                    expected[k] = est.expected_error_deg
        c = np.array(costs) / 1000.0
        results.append(EvaluationResult(
            name=label, scores={g: score(errors[m]) for g, m in gates.items()},
            cost_us={"median": round(float(np.median(c)), 1),
                     "p99": round(float(np.percentile(c, 99)), 1)},
            errors=errors, gates=gates,
            expected=expected if np.isfinite(expected).any() else None))
    info = {"peak_hz": whole_peak.peak_hz, "snr_db": round(whole_peak.snr_db, 2),
            "truth_band_hz": list(whole_peak.band_hz),
            "estimator_band_hz": list(train_peak.band_hz),
            "truth_spread_deg_median": round(math.degrees(float(np.median(
                truth.spread[idx - 1]))), 2)}
    return info, results
