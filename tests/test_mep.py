"""MEP measures on synthetic epochs with known answers and on real MEP recordings."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import loadmat

from closedloop.config.schema import MepConfig
from closedloop.mep.measure import measure_mep
from closedloop.mep.tracker import MepTracker
from closedloop.sim.emg_model import MepModel, mep_waveform, tms_artefact
from closedloop.streams.ring import RingBuffer
from tests.conftest import need_data

FS = 5000.0
KW = {"window_ms": (15.0, 50.0), "background_ms": (-100.0, -5.0), "preactivation_uv": 50.0,
      "onset_sd": 5.0, "no_response_uv": 50.0}


def epoch(p2p: float, noise: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(-0.2, 0.1, 1 / FS)
    x = rng.normal(0, noise, len(t)) + tms_artefact(t) + mep_waveform(t, p2p, MepModel())
    return x, t


def test_known_mep_amplitude_and_latency() -> None:
    x, t = epoch(1000.0)
    m = measure_mep(x, t, **KW)  # type: ignore[arg-type]
    assert m.reason == "ok"
    assert not m.rejected
    assert m.p2p_uv == pytest.approx(1000.0, rel=0.05)
    assert m.latency_ms is not None
    assert 21.5 <= m.latency_ms <= 24.0  # the simulated MEP starts at 22 ms
    assert 22.0 < m.peak_latency_ms < 38.0
    assert m.background_p2p_uv < 50.0


def test_preactivation_and_no_response() -> None:
    x, t = epoch(1000.0)
    pre = (t > -0.08) & (t < -0.02)
    x[pre] += 60.0 * np.sin(2 * np.pi * 80 * t[pre])
    m = measure_mep(x, t, **KW)  # type: ignore[arg-type]
    assert m.rejected
    assert m.reason == "preactivation"
    small, t = epoch(20.0)
    m = measure_mep(small, t, **KW)  # type: ignore[arg-type]
    assert not m.rejected
    assert m.reason == "no_response"
    assert m.latency_ms is None


def test_incomplete_epoch() -> None:
    t = np.arange(0.0, 0.01, 1 / FS)
    m = measure_mep(np.zeros(len(t)), t, **KW)  # type: ignore[arg-type]
    assert m.rejected
    assert m.reason == "incomplete_epoch"


def test_tracker_waits_for_the_window_then_times_out_without_emg() -> None:
    cfg = MepConfig(channels=("FDI",), timeout_s=0.5)
    ring = RingBuffer(int(FS), 1)
    tracker = MepTracker(cfg, channels=["FDI"], labels=["FDI"])
    x, t = epoch(800.0)
    t = t + 10.0
    tracker.add_pulse(10.0, "closedloop", now=10.0)
    ring.write(x[t <= 10.03][:, None], t[t <= 10.03])
    assert tracker.poll(ring, now=10.04) == []  # the window (to 50 ms) is not complete
    ring.write(x[t > 10.03][:, None], t[t > 10.03])
    (rec,) = tracker.poll(ring, now=10.1)
    assert rec.channel == "FDI"
    assert rec.measure.p2p_uv == pytest.approx(800.0, rel=0.05)
    lonely = MepTracker(cfg, channels=["FDI", "APB"], labels=None)
    lonely.add_pulse(20.0, "marker", now=20.0)
    assert lonely.poll(None, now=20.2) == []
    recs = lonely.poll(None, now=20.6)
    assert [r.measure.reason for r in recs] == ["emg_unavailable"] * 2


@pytest.mark.parametrize(("name", "fs", "pulse_index", "unit_scale"), [
    ("mepfeatx/ID01.mat", 3000.0, 150, 1.0),
    ("oxford_mep/S1_Magstim_50percent.mat", 10000.0, 1000, 1000.0),
])
def test_real_meps_match_a_direct_offline_computation(name: str, fs: float, pulse_index: int,
                                                      unit_scale: float) -> None:
    mat = loadmat(need_data("emg", name))
    epochs = (mat["meps"] if "meps" in mat else mat["Values"]) * unit_scale  # µV
    t = (np.arange(epochs.shape[0]) - pulse_index) / fs
    bg = (-45.0, -5.0)  # ID01 epochs start 50 ms before the pulse
    win = (t * 1000 >= 15) & (t * 1000 <= 50)
    for k in range(epochs.shape[1]):
        x = epochs[:, k]
        m = measure_mep(x, t, window_ms=(15.0, 50.0), background_ms=bg,
                        preactivation_uv=1e9, onset_sd=5.0, no_response_uv=50.0)
        assert m.p2p_uv == pytest.approx(float(x[win].max() - x[win].min()), rel=1e-12)
        peak = t[win][np.argmax(np.abs(x[win] - x[(t * 1000 >= -45) & (t * 1000 <= -5)].mean()))]
        assert m.peak_latency_ms == pytest.approx(peak * 1000)
    if name.startswith("mepfeatx"):
        p2p = [measure_mep(epochs[:, k], t, window_ms=(15.0, 50.0), background_ms=bg,
                           preactivation_uv=1e9, onset_sd=5.0,
                           no_response_uv=50.0).p2p_uv for k in range(epochs.shape[1])]
        assert 700 < np.median(p2p) < 1200  # the dataset's README: median about 960 µV


def test_area_blanking_and_conditioning() -> None:
    from closedloop.mep.measure import blank_artefact, condition_epoch  # noqa: PLC0415

    t = np.arange(-0.2, 0.1, 1 / FS)
    wave = mep_waveform(t, 1000.0, MepModel())
    m = measure_mep(wave, t, **KW)  # type: ignore[arg-type]
    win = (t >= 0.015) & (t <= 0.050)
    expected = np.trapezoid(np.abs(wave[win]), t[win] * 1000.0)
    assert m.area_uv_ms == pytest.approx(expected, rel=1e-6)
    x = wave + tms_artefact(t)
    blanked = blank_artefact(x, t, (-1.0, 8.0))
    assert np.max(np.abs(blanked[(t > -0.001) & (t < 0.008)])) < 1.0
    np.testing.assert_array_equal(blanked[t > 0.009], x[t > 0.009])
    hum = wave + 80.0 * np.sin(2 * np.pi * 50 * t)
    clean = condition_epoch(hum, t, FS, bandpass_hz=(10.0, 1000.0), notch_hz=50.0,
                            background_ms=(-100.0, -5.0))
    bg = (t > -0.1) & (t < -0.005)
    assert np.ptp(clean[bg]) < 20.0  # the 50 Hz hum is gone from the background
    assert measure_mep(clean, t, **KW).p2p_uv == pytest.approx(1000.0, rel=0.15)  # type: ignore[arg-type]


def test_pulses_in_quick_succession_each_get_their_own_mep() -> None:
    """Paired pulses 100 ms apart (as in LICI): two epochs from one EMG stream."""
    cfg = MepConfig(channels=("FDI",), background_ms=(-45.0, -5.0), blank_ms=(-1.0, 8.0))
    ring = RingBuffer(int(2 * FS), 1)
    t = 5.0 + np.arange(int(0.6 * FS)) / FS
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, len(t))
    for t_pulse, size in ((5.2, 1200.0), (5.3, 300.0)):
        rel = t - t_pulse
        x += tms_artefact(rel) + mep_waveform(rel, size, MepModel())
    ring.write(x[:, None], t)
    tracker = MepTracker(cfg, channels=["FDI"], labels=["FDI"])
    tracker.add_pulse(5.2, "closedloop", now=5.2)
    tracker.add_pulse(5.3, "closedloop", now=5.3)
    first, second = tracker.poll(ring, now=5.6)
    assert first.measure.p2p_uv == pytest.approx(1200.0, rel=0.05)
    assert second.measure.p2p_uv == pytest.approx(300.0, rel=0.1)
    assert second.measure.reason == "ok"  # the first MEP ended before its background
