"""Ring buffer and streaming DSP, on synthetic arrays (no LSL)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from closedloop.dsp.filters import Decimator, StreamingSOS
from closedloop.dsp.iir import KERNEL, lfilter_step
from closedloop.dsp.spatial import hjorth
from closedloop.streams.ring import RingBuffer


def test_ring_keeps_order_and_reports_loss() -> None:
    ring = RingBuffer(8, 2)
    counter = np.arange(20, dtype=float)
    data = np.column_stack([counter, -counter])
    ring.write(data[:5], counter[:5])
    got = ring.read_from(0)
    assert got.lost == 0
    assert got.data[:, 0].tolist() == [0, 1, 2, 3, 4]
    ring.write(data[5:20], counter[5:20])  # wraps and overwrites
    got = ring.read_from(5)
    assert got.lost == 7  # samples 5..11 were overwritten
    assert got.data[:, 0].tolist() == list(range(12, 20))
    assert got.timestamps.tolist() == list(range(12, 20))
    assert ring.latest(3).data[:, 1].tolist() == [-17, -18, -19]
    assert ring.between(13.5, 16.0).timestamps.tolist() == [14, 15, 16]
    assert ring.newest_timestamp() == 19


def test_ring_chunk_larger_than_capacity() -> None:
    ring = RingBuffer(4, 1)
    ring.write(np.arange(10.0)[:, None], np.arange(10.0))
    assert ring.count == 10
    assert ring.latest(10).data[:, 0].tolist() == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="expected"):
        ring.write(np.zeros((2, 3)), np.zeros(2))


def test_hjorth_weights() -> None:
    f = hjorth(["A", "C3", "B", "FC1", "CP1"], "C3", ["FC1", "CP1"])
    x = np.array([[9.0, 10.0, 9.0, 2.0, 4.0]])
    assert f.apply(x)[0] == pytest.approx(10.0 - 3.0)
    assert hjorth(["C3"], "C3", []).apply(np.array([[5.0]]))[0] == 5.0
    with pytest.raises(ValueError, match="FC5"):
        hjorth(["C3"], "C3", ["FC5"])


def test_streaming_filter_equals_whole_signal_and_has_no_dc_transient() -> None:
    rng = np.random.default_rng(0)
    x = 5000.0 + rng.normal(size=3000)  # a large DC offset, as on real EEG
    f = StreamingSOS.butter(2, (8.0, 13.0), 500.0, "bandpass")
    chunks = np.concatenate([f.process(c) for c in np.array_split(x, 37)])
    whole = StreamingSOS.butter(2, (8.0, 13.0), 500.0, "bandpass").process(x)
    np.testing.assert_allclose(chunks, whole, rtol=1e-9, atol=1e-9)
    assert np.max(np.abs(whole[:200])) < 5.0  # no ringing from the 5000 µV offset


def test_decimator_is_chunking_invariant_and_reports_its_delay() -> None:
    fs = 5000.0
    t = np.arange(25_000) / fs
    x = np.sin(2 * np.pi * 10 * t)
    d1, d2 = Decimator(fs, 10), Decimator(fs, 10)
    a, ta = d1.process(x, t)
    parts = [d2.process(x[i:i + 13], t[i:i + 13]) for i in range(0, len(x), 13)]
    b = np.concatenate([p[0] for p in parts])
    tb = np.concatenate([p[1] for p in parts])
    np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(np.diff(tb), 1 / 500.0, atol=1e-9)
    # the reported delay moves the decimated sinusoid back onto the truth
    delay = d1.phase_delay_s(10.0)
    assert 0.0005 < delay < 0.005
    tail = slice(500, None)
    err = np.angle(signal.hilbert(a)[tail] * np.exp(-1j * 2 * np.pi * 10 * (ta[tail] - delay)))
    assert abs(np.degrees(np.angle(np.mean(np.exp(1j * err)))) + 90) < 2  # sin = cos - 90°
    assert Decimator.factor_for(5000, 500) == 10
    assert Decimator.factor_for(500, 500) == 1
    assert Decimator.factor_for(1200, 500) == 2


def test_circular_statistics_against_their_definitions() -> None:
    from closedloop.dsp.circular import (  # noqa: PLC0415
        circular_mean,
        circular_sd,
        circular_stats_deg,
        resultant,
        wrap,
    )

    rng = np.random.default_rng(3)
    kappa_sd = 0.3
    x = 2.0 + rng.normal(0.0, kappa_sd, 20_000)  # wrapped normal: SD = sqrt(-2 ln R)
    assert abs(circular_mean(x) - 2.0) < 0.01
    assert abs(circular_sd(x) - kappa_sd) < 0.01
    assert abs(resultant(x) - np.exp(-kappa_sd**2 / 2)) < 0.005
    assert circular_mean([np.pi - 0.1, -np.pi + 0.1]) == pytest.approx(np.pi, abs=1e-9) \
        or circular_mean([np.pi - 0.1, -np.pi + 0.1]) == pytest.approx(-np.pi, abs=1e-9)
    assert np.allclose(wrap([3 * np.pi / 2, -3 * np.pi / 2]), [-np.pi / 2, np.pi / 2])
    assert circular_sd([0.0, np.pi]) > 6.0  # no mean direction: a large, finite SD
    s = circular_stats_deg([10.0, 20.0, float("nan")])
    assert s["n"] == 2 and s["mean_deg"] == pytest.approx(15.0)
    assert circular_stats_deg([])["sd_deg"] is None


@pytest.mark.parametrize("n", [0, 1, 2, 10, 257])
@pytest.mark.parametrize("kind", ["real", "complex", "fir-numerator"])
def test_the_lfilter_step_gives_lfilters_numbers_bit_for_bit(n: int, kind: str) -> None:
    assert KERNEL is not None  # the fast path is taken on this SciPy
    rng = np.random.default_rng(n)
    if kind == "fir-numerator":  # the AR forecast: b = [1], a recursive denominator
        b, a = np.array([1.0]), np.concatenate(([1.0], 0.3 * rng.standard_normal(4)))
    else:
        b, a = signal.butter(2, [8, 12], btype="bandpass", fs=500.0)
    x = rng.standard_normal(n)
    if kind == "complex":
        x = x + 1j * rng.standard_normal(n)
    zi = rng.standard_normal(max(len(a), len(b)) - 1)
    want_y, want_z = signal.lfilter(b, a, x, zi=zi)
    if n == 0:  # (SciPy's own final state is undefined then: the state is kept)
        want_z = zi.astype(want_y.dtype)
    got_y, got_z = lfilter_step(b, a, x, zi)
    assert got_y.dtype == want_y.dtype and got_z.dtype == want_z.dtype
    assert np.array_equal(got_y, want_y) and np.array_equal(got_z, want_z)
