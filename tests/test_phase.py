"""Phase estimation on signals with an exactly known phase."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import solve_toeplitz

from closedloop.config.schema import PhaseConfig
from closedloop.control.stats import circular_stats_deg
from closedloop.phase.ar_forecast import (
    ARForecaster,
    ARParams,
    levinson_durbin,
    toeplitz_index,
    yule_walker,
)
from closedloop.phase.peak import find_peak
from closedloop.phase.tracker import PhaseTracker

pytestmark = pytest.mark.compute  # CPU-bound, no real-time deadline (conftest.py)

FS = 500.0


def ar() -> ARForecaster:
    return ARForecaster(ARParams.from_ms(fs=FS, band_hz=(8.0, 13.0), window_ms=500, fir_ms=128,
                                         edge_ms=64, order=20, hilbert_window_ms=128))


def errors_deg(est: ARForecaster, x: np.ndarray, true_phase: np.ndarray, step: int = 5
               ) -> list[float]:
    out = []
    for i in range(est.window, len(x), step):
        e = est.estimate(x[i - est.window:i], i - 1)
        assert e is not None
        out.append(math.degrees(math.remainder(e.phase_rad - true_phase[i - 1], 2 * math.pi)))
    return out


def test_levinson_matches_toeplitz_solve_and_flags_instability() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    r = np.correlate(x, x, "full")[399:399 + 11] / 400
    a, k = levinson_durbin(r, 10)
    np.testing.assert_allclose(a, solve_toeplitz(r[:-1], r[1:]), atol=1e-10)
    assert np.all(np.abs(k) < 1)
    _, k_bad = levinson_durbin(np.array([1.0, 1.5, 1.0]), 2)  # not a valid autocorrelation
    assert np.any(np.abs(k_bad) >= 1)


def test_cholesky_yule_walker_agrees_with_levinson_on_stability() -> None:
    """The estimator's one-call stability test (positive definite Toeplitz matrix) says
    unstable exactly when Levinson-Durbin finds a reflection coefficient of 1 or more,
    and otherwise gives the same coefficients; on narrow-band signals (near-singular,
    where shipped implementations go wrong) and on perturbed lags that are no longer a
    valid autocorrelation."""
    rng = np.random.default_rng(11)
    verdicts = {True: 0, False: 0}
    for trial in range(400):
        order = int(rng.integers(2, 31))
        n = 200
        t = np.arange(n)
        x = np.sin(2 * np.pi * rng.uniform(0.01, 0.2) * t) + rng.uniform(1e-4, 1) * \
            rng.normal(size=n)
        r = np.correlate(x, x, "full")[n - 1:n + order] / n
        if trial % 2:  # break it at random lags
            r[rng.integers(1, order + 1, size=2)] *= rng.uniform(-2.0, 2.0, size=2)
        a_ref, k = levinson_durbin(r, order)
        kmax = float(np.max(np.abs(k)))
        if abs(kmax - 1.0) < 1e-6:
            continue  # too close to the boundary for either to be decisive
        a = yule_walker(r, toeplitz_index(order))
        stable = kmax < 1.0
        assert (a is not None) == stable, (trial, order, kmax)
        if a is not None:
            np.testing.assert_allclose(a, a_ref, rtol=1e-6, atol=1e-6 * np.abs(a_ref).max())
        verdicts[stable] += 1
    assert verdicts[True] > 100 and verdicts[False] > 50


@pytest.mark.parametrize("freq", [8.5, 10.0, 12.0])
def test_ar_phase_on_noisy_sinusoid(freq: float) -> None:
    rng = np.random.default_rng(2)
    t = np.arange(int(12 * FS)) / FS
    phase = 2 * np.pi * freq * t + 0.7
    x = 20 * np.cos(phase) + rng.normal(0, 4, len(t)) + 300.0
    stats = circular_stats_deg(errors_deg(ar(), x, phase))
    assert abs(stats["mean_deg"]) < 5  # type: ignore[arg-type]
    assert stats["sd_deg"] < 12  # type: ignore[operator]


def test_ar_tracks_frequency_drift_and_phase_reset() -> None:
    rng = np.random.default_rng(3)
    t = np.arange(int(20 * FS)) / FS
    freq = 9.0 + 2.0 * t / t[-1]  # 9 -> 11 Hz
    phase = 2 * np.pi * np.cumsum(freq) / FS
    phase[len(t) // 2:] += 2.0  # a phase reset half-way
    x = 20 * np.cos(phase) + rng.normal(0, 3, len(t))
    errs = np.array(errors_deg(ar(), x, phase))
    # away from the reset (one window either side) the error is small
    n = len(errs)
    keep = np.r_[0:n // 2 - 60, n // 2 + 60:n]
    stats = circular_stats_deg(errs[keep])
    assert abs(stats["mean_deg"]) < 6  # type: ignore[arg-type]
    assert stats["sd_deg"] < 10  # type: ignore[operator]


def test_ar_never_runs_away_on_noise_bursts_or_flat_input() -> None:
    rng = np.random.default_rng(4)
    est = ar()
    for _ in range(200):
        x = rng.normal(0, 1, est.window) * rng.choice([1e-6, 1.0, 1e4])
        e = est.estimate(x, 0.0)
        if e is not None:
            assert math.isfinite(e.phase_rad)
            assert math.isfinite(e.freq_hz)
            assert math.isfinite(e.amplitude)
    assert est.estimate(np.zeros(est.window), 0.0) is None
    assert est.estimate(np.full(est.window, np.nan), 0.0) is None
    assert est.estimate(np.zeros(3), 0.0) is None


def test_find_peak_on_one_over_f_plus_rhythm() -> None:
    rng = np.random.default_rng(5)
    n = int(60 * FS)
    white = rng.normal(size=n)
    spectrum = np.fft.rfft(white)
    f = np.fft.rfftfreq(n, 1 / FS)
    spectrum[1:] /= np.sqrt(f[1:])
    pink = np.fft.irfft(spectrum, n)
    pink *= 10 / pink.std()
    t = np.arange(n) / FS
    x = pink + 3 * np.cos(2 * np.pi * 10.75 * t)
    fit = find_peak(x, FS)
    assert abs(fit.peak_hz - 10.75) <= 0.25
    assert fit.snr_db > 3
    assert fit.band_hz == (fit.peak_hz - 2, fit.peak_hz + 2)
    no_rhythm = find_peak(pink, FS)
    assert no_rhythm.snr_db < fit.snr_db


@pytest.mark.parametrize("fs_in", [500.0, 1000.0, 5000.0])
def test_tracker_phase_refers_to_the_true_sample_time(fs_in: float) -> None:
    """Spatial filter + decimation + AR: the anti-alias delay is compensated."""
    rng = np.random.default_rng(6)
    labels = ["C3", "FC1", "FC5", "CP1", "CP5", "Oz"]
    tracker = PhaseTracker(fs_in=fs_in, labels=labels, cfg=PhaseConfig())
    n = int(8 * fs_in)
    t = 100.0 + np.arange(n) / fs_in
    data = rng.normal(0, 2, (n, len(labels))) + 40.0  # common offset
    data[:, 0] += 15 * np.cos(2 * np.pi * 10.3 * t)
    errs = []
    chunk = max(1, int(fs_in / 250))
    for i in range(0, n, chunk):
        tracker.push(data[i:i + chunk], t[i:i + chunk])
        if i % (chunk * 5) == 0 and (e := tracker.estimate()) is not None:
            errs.append(math.degrees(math.remainder(
                e.phase_rad - 2 * np.pi * 10.3 * e.lsl_time, 2 * math.pi)))
    stats = circular_stats_deg(errs)
    assert stats["n"] > 100
    assert abs(stats["mean_deg"]) < 5  # type: ignore[arg-type]
    assert stats["sd_deg"] < 10  # type: ignore[operator]


@pytest.mark.parametrize("estimator", ["ar", "echt"])
def test_estimates_inside_a_long_chunk_equal_those_taken_as_it_came(estimator: str) -> None:
    """The offline mode pushes a second at once and asks for the updates inside it
    (``back``): the same numbers, to the bit, as pushing up to each update and asking."""
    rng = np.random.default_rng(9)
    fs_in = 1000.0
    labels = ["C3", "FC1", "FC5", "CP1", "CP5"]
    cfg = PhaseConfig(estimator=estimator)  # type: ignore[arg-type]
    n = int(3 * fs_in)
    t = 5.0 + np.arange(n) / fs_in
    data = rng.normal(0, 3, (n, len(labels)))
    data[:, 0] += 10 * np.cos(2 * np.pi * 10.7 * t)
    split = PhaseTracker(fs_in=fs_in, labels=labels, cfg=cfg)
    whole = PhaseTracker(fs_in=fs_in, labels=labels, cfg=cfg)
    head = int(1.3 * fs_in)  # an odd start, so the decimator's phase is not zero
    split.push(data[:head], t[:head])
    whole.push(data[:head], t[:head])
    cuts = list(range(head + 7, n, 23))
    expected = []
    for a, b in zip([head, *cuts], cuts, strict=False):
        split.push(data[a:b], t[a:b])
        expected.append((split.estimate(), split.band_amplitude))
    counts = [whole.decimated_count(b - head) for b in cuts[:len(expected)]]
    total = whole.decimated_count(n - head)
    whole.push(data[head:], t[head:])
    got = [(whole.estimate(total - k), whole.amplitude_at(total - k)) for k in counts]
    assert len(got) == len(expected) > 50
    assert all(e is not None for e, _ in expected)
    assert got == expected


def test_tracker_auto_band_and_reset_after_gap() -> None:
    rng = np.random.default_rng(7)
    fs = 500.0
    tracker = PhaseTracker(fs_in=fs, labels=["C3"],
                           cfg=PhaseConfig(reference=(), band_hz="auto", calibration_s=10))
    assert tracker.status().state == "calibrating"
    t = np.arange(int(12 * fs)) / fs
    x = (12 * np.cos(2 * np.pi * 11.5 * t) + rng.normal(0, 3, len(t)))[:, None]
    for i in range(0, len(t), 10):
        tracker.push(x[i:i + 10], t[i:i + 10])
    assert tracker.peak is not None
    assert abs(tracker.peak.peak_hz - 11.5) <= 0.25
    assert tracker.status().state == "ready"
    assert tracker.estimate() is not None
    # a gap of a second: state is dropped, and estimates wait for a full window again
    tracker.push(x[:10], t[-1] + 1.0 + np.arange(10) / fs)
    assert tracker.resets == 1
    assert tracker.status().state == "warming_up"
    assert tracker.estimate() is None


def test_timestamp_jitter_is_not_a_gap() -> None:
    """Chunks stamped at push time without dejitter jump by milliseconds: no reset."""
    rng = np.random.default_rng(8)
    fs = 5000.0
    tracker = PhaseTracker(fs_in=fs, labels=["C3"], cfg=PhaseConfig(reference=()))
    t = 0.0
    for _ in range(600):
        t += 0.002 + rng.uniform(-0.0015, 0.0015)  # push time of a 10-sample chunk
        ts = t - np.arange(9, -1, -1) / fs
        tracker.push(np.cos(2 * np.pi * 10 * ts)[:, None], ts)
    assert tracker.resets == 0
    assert tracker.estimate() is not None


def test_echt_resonator_and_etp_on_known_phase() -> None:
    """Each published baseline recovers an exactly known phase (noisy 10 Hz sinusoid)."""
    from closedloop.phase.echt import EcHT  # noqa: PLC0415
    from closedloop.phase.etp import ETP  # noqa: PLC0415
    from closedloop.phase.resonator import Resonator  # noqa: PLC0415

    rng = np.random.default_rng(9)
    t = np.arange(int(30 * FS)) / FS
    phase = 2 * np.pi * 10.0 * t + 1.0
    x = 20 * np.cos(phase) + rng.normal(0, 4, len(t)) + 50.0
    echt = EcHT(fs=FS, centre_hz=10.0, window=int(FS))
    etp = ETP(fs=FS, band_hz=(8.0, 12.0), window=int(0.5 * FS), edge=32)
    etp.train(x[: int(10 * FS)], 5)
    assert abs(etp.ipi_s - 0.1) < 0.004
    res = Resonator(fs=FS, centre_hz=10.0)
    res.process(x[: int(10 * FS) - 5])
    errs: dict[str, list[float]] = {"echt": [], "etp": [], "resonator": []}
    for i in range(int(10 * FS), len(t), 5):
        res.process(x[i - 5:i])
        for name, est in (("echt", echt.estimate(x[i - echt.window:i], i - 1)),
                          ("etp", etp.estimate(x[i - etp.window:i], (i - 1) / FS)),
                          ("resonator", res.estimate(i - 1))):
            assert est is not None
            assert math.isfinite(est.phase_rad)
            errs[name].append(math.degrees(math.remainder(est.phase_rad - phase[i - 1],
                                                          2 * math.pi)))
    for name, e in errs.items():
        s = circular_stats_deg(e)
        assert abs(s["mean_deg"]) < 8, (name, s)  # type: ignore[arg-type]
        assert s["sd_deg"] < 15, (name, s)  # type: ignore[operator]


def test_ground_truth_of_a_clean_rhythm_is_its_phase() -> None:
    from closedloop.phase.truth import ground_truth  # noqa: PLC0415

    t = np.arange(int(20 * FS)) / FS
    phase = 2 * np.pi * 10.2 * t
    gt = ground_truth(np.cos(phase) + 0.01 * np.random.default_rng(1).normal(size=len(t)),
                      FS, (8.2, 12.2))
    mid = slice(int(2 * FS), int(18 * FS))
    err = np.angle(np.exp(1j * (gt.phase[mid] - phase[mid])))
    assert np.max(np.abs(err)) < np.radians(3)
    assert np.median(gt.spread[mid]) < np.radians(2)


def test_real_eeg_regression_on_a_short_segment() -> None:
    """EEGMAT Subject19, C3 Hjorth, 100 s: the scores stay where they were measured."""
    from closedloop.phase.evaluate import evaluate_signal  # noqa: PLC0415
    from closedloop.replay.recording import load_edf  # noqa: PLC0415
    from tests.conftest import need_data  # noqa: PLC0415

    rec = load_edf(need_data("eeg", "eegmat", "Subject19_1.edf"))
    hj = rec.channel("C3") - np.mean([rec.channel(c) for c in ("F3", "T3", "Cz", "P3")],
                                     axis=0)
    info, results = evaluate_signal(hj[: int(100 * rec.fs)], rec.fs, train_s=40.0)
    assert info["peak_hz"] == pytest.approx(10.5, abs=0.5)
    by = {r.name: r.scores["amp>median"] for r in results}
    # measured 2026-11-26 on this segment (median gate): AR 28.1°, ETP 31.9°, ecHT 23.3°,
    # resonator 18.6°, ours (trained on the first 40 s) 15.2°; the 0.8x target is on the
    # mean over four subjects (tools/bench_phase.py), this subject alone is 0.82x
    assert by["ar"]["circ_sd_deg"] < 35  # type: ignore[operator]
    assert by["echt"]["circ_sd_deg"] < 30  # type: ignore[operator]
    assert by["etp"]["circ_sd_deg"] < 40  # type: ignore[operator]
    assert by["resonator"]["circ_sd_deg"] < 24  # type: ignore[operator]
    assert by["wiener"]["circ_sd_deg"] < 19  # type: ignore[operator]
    assert by["wiener"]["circ_sd_deg"] < 0.9 * min(  # type: ignore[operator]
        by[n]["circ_sd_deg"] for n in ("ar", "etp", "echt", "resonator"))  # type: ignore[type-var]
    for r in results:
        assert r.scores["all"]["n"] > 5000
        assert abs(r.scores["amp>median"]["bias_deg"]) < 20  # type: ignore[arg-type]


@pytest.mark.parametrize(("rhythm", "freq"), [("theta", 6.0), ("alpha", 10.5),
                                              ("beta", 21.0)])
def test_auto_band_finds_each_rhythm(rhythm: str, freq: float) -> None:
    """``band_hz = "auto"`` looks for the peak where the configured rhythm lives, on a
    1/f background that also carries a strong alpha rhythm, and the phase follows it."""
    rng = np.random.default_rng(12)
    fs = 500.0
    n = int(30 * fs)
    spectrum = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / fs)
    background = np.fft.irfft(spectrum / np.sqrt(np.maximum(f, 0.5)), n) * 8.0
    t = np.arange(n) / fs
    phase = 2 * np.pi * freq * t
    x = background + 3.0 * np.cos(phase)
    if rhythm != "alpha":
        x += 4.0 * np.cos(2 * np.pi * 10.5 * t + 1.0)  # a stronger alpha, to be ignored
    cfg = PhaseConfig(reference=(), band_hz="auto", rhythm=rhythm,  # type: ignore[arg-type]
                      calibration_s=20.0)  # the default estimator, trained from 22 s
    tracker = PhaseTracker(fs_in=fs, labels=["C3"], cfg=cfg)
    errs = []
    for i in range(0, n, 10):
        tracker.push(x[i:i + 10, None], t[i:i + 10])
        if i >= 22 * fs and (e := tracker.estimate()) is not None:
            errs.append(math.degrees(math.remainder(e.phase_rad - phase[i + 9], 2 * math.pi)))
    assert tracker.peak is not None and abs(tracker.peak.peak_hz - freq) <= 0.5
    assert tracker.band is not None and tracker.band[0] < freq < tracker.band[1]
    assert tracker.training_state == "ready"
    assert len(errs) > 300
    assert circular_stats_deg(errs)["sd_deg"] < 25  # type: ignore[operator]
