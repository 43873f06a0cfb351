"""The trained causal filter (``phase.estimator = "wiener"``) on signals of known phase,
its confidence, its model files, and its place in the tracker (training, switch-over)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from closedloop.config.schema import PhaseConfig
from closedloop.control.stats import circular_stats_deg
from closedloop.phase.tracker import TRAINED_SWITCH_DELAY_S, PhaseTracker
from closedloop.phase.truth import ground_truth
from closedloop.phase.wiener import WienerModel, WienerPhase, train_wiener

pytestmark = pytest.mark.compute  # CPU-bound, no real-time deadline (conftest.py)

FS = 500.0


def drifting_rhythm(seconds: float, rng: np.random.Generator, *, noise: float = 0.6,
                    resets: bool = False, drift_hz: float = 0.8
                    ) -> tuple[np.ndarray, np.ndarray]:
    """An alpha-like rhythm whose frequency wanders (10.5 ± ``drift_hz``), with its exact
    phase; with ``resets``, the phase jumps at random moments (about every 3 s)."""
    n = int(seconds * FS)
    freq = 10.5 + drift_hz * np.sin(2 * np.pi * 0.05 * np.arange(n) / FS)
    phase = np.cumsum(2 * np.pi * freq / FS)
    if resets:
        jumps = rng.random(n) < 1.0 / (3 * FS)
        phase += np.cumsum(jumps * rng.uniform(-np.pi, np.pi, n))
    amp = 1.0 + 0.5 * np.sin(2 * np.pi * 0.13 * np.arange(n) / FS)
    x = amp * np.cos(phase) + noise * rng.normal(size=n) + 0.3 * np.cumsum(
        rng.normal(size=n)) / np.sqrt(FS)  # slow drift, as electrodes have
    return x, np.angle(np.exp(1j * phase))


def errors_deg(est: WienerPhase, x: np.ndarray, true_phase: np.ndarray, start: int,
               missing: list[int] | None = None) -> tuple[list[float], list[float]]:
    """Errors and expected errors every 5 samples from ``start``; the samples without an
    estimate go to ``missing`` (none allowed when it is not given)."""
    errs, expected = [], []
    for i in range(max(start, est.window), len(x), 5):
        e = est.estimate(x[i - est.window:i], float(i - 1))
        if e is None and missing is not None:
            missing.append(i)
            continue
        assert e is not None
        assert math.isfinite(e.phase_rad) and math.isfinite(e.freq_hz)
        errs.append(math.degrees(math.remainder(e.phase_rad - true_phase[i - 1], 2 * math.pi)))
        assert e.expected_error_deg is not None
        expected.append(e.expected_error_deg)
    return errs, expected


def test_trained_filter_tracks_a_drifting_rhythm_in_noise() -> None:
    rng = np.random.default_rng(1)
    x, phase = drifting_rhythm(90, rng)
    model = train_wiener(x[: int(40 * FS)], FS)
    assert 9.5 <= model.peak_hz <= 11.5
    est = WienerPhase(model)
    errs, expected = errors_deg(est, x, phase, int(40 * FS))
    stats = circular_stats_deg(errs)
    assert abs(stats["mean_deg"]) < 5  # type: ignore[arg-type]
    assert stats["sd_deg"] < 15  # type: ignore[operator]
    # the error it expects (held-out calibration data) is about the error it makes against
    # what it was trained to output, the offline ground truth
    truth = ground_truth(x, FS, model.band_hz)
    vs_truth = circular_stats_deg(errors_deg(est, x, truth.phase, int(40 * FS))[0])
    ratio = float(np.median(expected)) / vs_truth["sd_deg"]  # type: ignore[operator]
    assert 0.5 < ratio < 2.0


def test_on_a_narrow_band_ar_process_it_beats_ar_forward_prediction() -> None:
    """An AR(2) resonance at 11 Hz in white noise (a textbook alpha model): the truth is
    the offline ground truth; the trained filter is closer to it than AR forecasting."""
    from scipy import signal  # noqa: PLC0415

    from closedloop.phase.ar_forecast import ARForecaster, ARParams  # noqa: PLC0415

    rng = np.random.default_rng(8)
    r, theta = 0.985, 2 * np.pi * 11.0 / FS
    x = signal.lfilter([1.0], [1.0, -2 * r * np.cos(theta), r * r], rng.normal(size=int(90 * FS)))
    x += 2.0 * rng.normal(size=len(x))
    model = train_wiener(x[: int(40 * FS)], FS)
    truth = ground_truth(x, FS, model.band_hz)
    ours = circular_stats_deg(errors_deg(WienerPhase(model), x, truth.phase,
                                         int(40 * FS))[0])
    ar = ARForecaster(ARParams.from_ms(fs=FS, band_hz=model.band_hz, window_ms=500,
                                       fir_ms=128, edge_ms=64, order=20,
                                       hilbert_window_ms=128))
    theirs = []
    for i in range(int(40 * FS), len(x), 5):
        e = ar.estimate(x[i - ar.window:i], float(i - 1))
        if e is not None:
            theirs.append(math.degrees(math.remainder(e.phase_rad - truth.phase[i - 1],
                                                      2 * math.pi)))
    assert abs(ours["mean_deg"]) < 5  # type: ignore[arg-type]
    assert ours["sd_deg"] < 0.8 * circular_stats_deg(theirs)["sd_deg"]  # type: ignore[operator]


def test_phase_resets_and_bursts_never_run_away() -> None:
    rng = np.random.default_rng(2)
    x, phase = drifting_rhythm(80, rng, resets=True)
    x[int(60 * FS):int(61 * FS)] += 200.0 * rng.normal(size=int(FS))  # an artefact burst
    x[int(70 * FS):int(71 * FS)] = 0.0  # a flat second
    est = WienerPhase(train_wiener(x[: int(40 * FS)], FS))
    missing: list[int] = []
    errs, _ = errors_deg(est, x, phase, int(40 * FS), missing)
    assert len(errs) > 1000
    # no estimate only where the whole filter window is flat
    assert missing and all(int(70 * FS) + est.model.taps <= i <= int(71 * FS) for i in missing)
    # away from the burst, the resets cost only the cycles right after them
    clean = errs[: int(19 * FS / 5)]
    assert circular_stats_deg(clean)["sd_deg"] < 35  # type: ignore[operator]
    # a flat window has no phase: no estimate rather than a made-up one
    assert est.estimate(np.zeros(est.window), 0.0) is None


def test_confidence_is_low_without_a_rhythm() -> None:
    rng = np.random.default_rng(3)
    clear, _ = drifting_rhythm(60, rng, noise=0.3)
    noise = rng.normal(size=int(60 * FS)) + 0.3 * np.cumsum(rng.normal(size=int(60 * FS))) \
        / np.sqrt(FS)
    good = train_wiener(clear, FS)
    bad = train_wiener(noise, FS)
    assert good.holdout_sd_deg_above_median < 15
    # band-passed noise has a "phase" a filter can follow (about 40° here), but no rhythm:
    # no estimate of it is to be trusted, not even at its strongest moments
    assert bad.holdout_sd_deg_above_median > 30
    assert good.rhythm and not bad.rhythm
    assert bad.expected_error_deg(float(bad.amp_edges[-1]) * 10) == 180.0
    assert good.expected_error_deg(float(good.amp_edges[-1]) * 10) < 15
    assert good.expected_error_deg(0.0) > good.expected_error_deg(float(good.amp_edges[-1]))


def test_model_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x, _ = drifting_rhythm(40, rng)
    model = train_wiener(x, FS, taps_ms=300.0)
    path = tmp_path / "m.npz"
    model.save(path)
    back = WienerModel.load(path, FS)
    assert back.taps == model.taps == 150
    np.testing.assert_array_equal(back.weights, model.weights)
    assert back.band_hz == model.band_hz
    with pytest.raises(ValueError, match=r"m\.npz: trained at 500 Hz, the processing rate "
                                         r"is 1000 Hz"):
        WienerModel.load(path, 1000.0)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: not a Wiener phase model"):
        WienerModel.load(junk, FS)
    with pytest.raises(ValueError, match="too little to train"):
        train_wiener(x[: int(5 * FS)], FS)


def _feed(tracker: PhaseTracker, x: np.ndarray, chunks: list[int]) -> list[tuple]:  # type: ignore[type-arg]
    """Push ``x`` (one channel at FS) in chunks of the given sizes (cycled); estimate after
    each; return (sample index, phase, expected error) of every estimate."""
    out = []
    i, k = 0, 0
    while i < len(x):
        n = chunks[k % len(chunks)]
        k += 1
        tracker.push(x[i:i + n, None], 100.0 + np.arange(i, min(i + n, len(x))) / FS)
        i += n
        e = tracker.estimate()
        if e is not None:
            out.append((i, e.phase_rad, e.expected_error_deg))
    return out


def test_tracker_trains_then_switches_at_the_same_sample_however_chunked() -> None:
    rng = np.random.default_rng(5)
    x, _ = drifting_rhythm(50, rng)
    cfg = PhaseConfig(reference=(), estimator="wiener", calibration_s=20.0)
    a = PhaseTracker(fs_in=FS, labels=["C3"], cfg=cfg)
    with ThreadPoolExecutor(1) as pool:  # as the live service: training in a worker
        b = PhaseTracker(fs_in=FS, labels=["C3"], cfg=cfg, trainer=pool.submit)
        got_a = {i: (p, c) for i, p, c in _feed(a, x, [10])}
        got_b = {i: (p, c) for i, p, c in _feed(b, x, [7, 23, 5, 40])}
    assert a.training_state == b.training_state == "ready"
    switch = int((20.0 + TRAINED_SWITCH_DELAY_S) * FS)
    # AR before the switch (no expected error), the trained filter after it
    assert all(c is None for i, (_, c) in got_a.items() if i < switch)
    assert all(c is not None for i, (_, c) in got_a.items() if i >= switch + 10)
    common = sorted(set(got_a) & set(got_b))
    assert len(common) > 100
    assert all(got_a[i] == got_b[i] for i in common)
    np.testing.assert_array_equal(a.wiener.weights, b.wiener.weights)  # type: ignore[union-attr]


def test_tracker_uses_a_calibrated_model_from_the_start(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x, _ = drifting_rhythm(40, rng)
    path = tmp_path / "model.npz"
    train_wiener(x, FS).save(path)
    cfg = PhaseConfig(reference=(), estimator="wiener", wiener_file=str(path))
    tracker = PhaseTracker(fs_in=FS, labels=["C3"], cfg=cfg)
    assert tracker.training_state == "ready"
    got = _feed(tracker, x[: int(3 * FS)], [10])
    assert got and all(c is not None for _, _, c in got)
    with pytest.raises(ValueError, match="trained at 500 Hz"):
        PhaseTracker(fs_in=2000.0, labels=["C3"],
                     cfg=PhaseConfig(reference=(), estimator="wiener", wiener_file=str(path),
                                     processing_rate_hz=1000.0))


def test_failed_training_keeps_the_ar_estimates() -> None:
    """Training needs about 15 s: with less, the tracker says why and stays on AR."""
    rng = np.random.default_rng(7)
    x, _ = drifting_rhythm(12, rng)
    cfg = PhaseConfig(reference=(), estimator="wiener", calibration_s=6.0)
    tracker = PhaseTracker(fs_in=FS, labels=["C3"], cfg=cfg)
    got = _feed(tracker, x, [10])
    assert tracker.training_state.startswith("failed: ") and "too little" in tracker.training_state
    assert got[-1][0] > 10 * FS and got[-1][2] is None  # still estimating, with AR
