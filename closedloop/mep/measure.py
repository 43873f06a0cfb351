"""Motor-evoked potential measures on one epoch: pure functions on arrays.

Conventions follow common practice (e.g. Groppa et al. 2012, "A practical guide to
diagnostic TMS of the motor cortex", Clin Neurophysiol 123:858-882): peak-to-peak
amplitude in a response window after the pulse, background activity in a window before
it, and rejection of trials with pre-activation (voluntary contraction inflates MEPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["MepMeasure", "blank_artefact", "condition_epoch", "measure_mep"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class MepMeasure:
    """Measures of one channel's response to one pulse (µV, ms after the pulse).

    ``latency_ms`` is the onset: the first sample in the window whose rectified deviation
    from the background mean exceeds ``onset_sd`` background SDs. None when there is no
    response (peak-to-peak under ``no_response_uv``) or no onset was found.
    """

    p2p_uv: float
    latency_ms: float | None
    peak_latency_ms: float
    area_uv_ms: float
    background_p2p_uv: float
    background_rms_uv: float
    rejected: bool
    reason: str


def measure_mep(x: Array, t_rel_s: Array, *, window_ms: tuple[float, float],
                background_ms: tuple[float, float], preactivation_uv: float,
                onset_sd: float, no_response_uv: float) -> MepMeasure:
    """Measure one epoch.

    Args:
        x: EMG samples in µV.
        t_rel_s: Their times relative to the pulse, in seconds.
    """
    t_ms = t_rel_s * 1000.0
    bg = x[(t_ms >= background_ms[0]) & (t_ms <= background_ms[1])]
    win_mask = (t_ms >= window_ms[0]) & (t_ms <= window_ms[1])
    win = x[win_mask]
    if len(win) < 2 or len(bg) < 2:
        return MepMeasure(float("nan"), None, float("nan"), float("nan"), float("nan"),
                          float("nan"), True, "incomplete_epoch")
    bg_mean = float(np.mean(bg))
    bg_sd = float(np.std(bg))
    bg_p2p = float(np.ptp(bg))
    bg_rms = float(np.sqrt(np.mean((bg - bg_mean) ** 2)))
    p2p = float(np.ptp(win))
    win_t = t_ms[win_mask]
    dev = np.abs(win - bg_mean)
    # area of the rectified, baseline-corrected response (trapezoid rule, µV x ms)
    area = float(np.sum((dev[1:] + dev[:-1]) / 2.0 * np.diff(win_t)))
    peak_latency = float(win_t[int(np.argmax(dev))])
    latency: float | None = None
    if p2p >= no_response_uv:
        above = np.flatnonzero(dev > onset_sd * max(bg_sd, 1e-9))
        if above.size:
            latency = float(win_t[above[0]])
    if bg_p2p > preactivation_uv:
        return MepMeasure(p2p, latency, peak_latency, area, bg_p2p, bg_rms, True,
                          "preactivation")
    if p2p < no_response_uv:
        return MepMeasure(p2p, None, peak_latency, area, bg_p2p, bg_rms, False, "no_response")
    return MepMeasure(p2p, latency, peak_latency, area, bg_p2p, bg_rms, False, "ok")


def blank_artefact(x: Array, t_rel_s: Array, blank_ms: tuple[float, float]) -> Array:
    """Replace the samples in ``blank_ms`` around the pulse by a straight line."""
    t_ms = t_rel_s * 1000.0
    inside = (t_ms >= blank_ms[0]) & (t_ms <= blank_ms[1])
    if not inside.any() or inside.all():
        return x
    y = x.copy()
    idx = np.flatnonzero(inside)
    before, after = idx[0] - 1, idx[-1] + 1
    if before < 0 or after >= len(x):
        y[inside] = x[after] if before < 0 else x[before]
        return y
    y[inside] = np.interp(t_ms[inside], [t_ms[before], t_ms[after]], [x[before], x[after]])
    return y


def condition_epoch(x: Array, t_rel_s: Array, fs: float, *,
                    bandpass_hz: tuple[float, float] | None, notch_hz: float | None,
                    background_ms: tuple[float, float]) -> Array:
    """Line-noise removal and zero-phase band-pass of one (already blanked) epoch.

    An epoch is too short for a notch filter to settle (a 50 Hz notch rings for hundreds
    of milliseconds), so line noise is removed by fitting sinusoids at ``notch_hz`` and its
    first two harmonics to the background window and subtracting them from the whole
    epoch: line noise is stationary over an epoch, the MEP is not in the background.
    """
    from scipy import signal  # noqa: PLC0415

    y = x - np.mean(x)
    if notch_hz is not None:
        t_ms = t_rel_s * 1000.0
        bg = (t_ms >= background_ms[0]) & (t_ms <= background_ms[1])
        freqs = [k * notch_hz for k in (1, 2, 3) if k * notch_hz < fs / 2]
        basis = np.column_stack([f(2 * np.pi * fr * t_rel_s) for fr in freqs
                                 for f in (np.sin, np.cos)] + [np.ones(len(y))])
        if bg.sum() > basis.shape[1]:
            coef, *_ = np.linalg.lstsq(basis[bg], y[bg], rcond=None)
            y = y - basis[:, :-1] @ coef[:-1]
    if bandpass_hz is not None:
        hi = min(bandpass_hz[1], 0.45 * fs)
        sos = signal.butter(2, (bandpass_hz[0], hi), btype="bandpass", fs=fs, output="sos")
        y = signal.sosfiltfilt(sos, y, padlen=min(len(y) - 1, 3 * (2 * len(sos) + 1)))
    return np.asarray(y, dtype=np.float64)
