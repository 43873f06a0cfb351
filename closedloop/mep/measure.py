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

__all__ = ["MepMeasure", "measure_mep"]

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
                          True, "incomplete_epoch")
    bg_mean = float(np.mean(bg))
    bg_sd = float(np.std(bg))
    bg_p2p = float(np.ptp(bg))
    bg_rms = float(np.sqrt(np.mean((bg - bg_mean) ** 2)))
    p2p = float(np.ptp(win))
    win_t = t_ms[win_mask]
    dev = np.abs(win - bg_mean)
    peak_latency = float(win_t[int(np.argmax(dev))])
    latency: float | None = None
    if p2p >= no_response_uv:
        above = np.flatnonzero(dev > onset_sd * max(bg_sd, 1e-9))
        if above.size:
            latency = float(win_t[above[0]])
    if bg_p2p > preactivation_uv:
        return MepMeasure(p2p, latency, peak_latency, bg_p2p, bg_rms, True, "preactivation")
    if p2p < no_response_uv:
        return MepMeasure(p2p, None, peak_latency, bg_p2p, bg_rms, False, "no_response")
    return MepMeasure(p2p, latency, peak_latency, bg_p2p, bg_rms, False, "ok")
