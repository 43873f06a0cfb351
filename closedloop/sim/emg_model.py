"""Synthetic EMG with TMS artefacts and motor-evoked potentials of known size.

The MEP amplitude is a Boltzmann sigmoid of intensity (the usual recruitment-curve model,
e.g. Devanne et al. 1997) multiplied by a phase modulation ``1 + depth * cos(phase -
best_phase)`` (excitability depends on the mu phase at the pulse; Zrenner et al. 2018
found larger MEPs at the mu trough, hence the default best phase of 180°), with log-normal
trial-to-trial variability. The waveform is a biphasic wave starting at ``latency_ms``.
Voluntary pre-activation episodes are mixed in so that rejection is exercised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["EMG_LABELS", "EmgSimParams", "MepModel", "mep_waveform", "tms_artefact"]

EMG_LABELS: tuple[str, ...] = ("FDI", "APB")


@dataclass(frozen=True, slots=True)
class MepModel:
    """Hidden truth of the simulated participant's corticospinal excitability."""

    s50_pct: float = 50.0
    slope_pct: float = 3.5
    mep_max_uv: float = 2500.0
    phase_depth: float = 0.5
    best_phase_rad: float = math.pi
    variability: float = 0.3
    latency_ms: float = 22.0
    duration_ms: float = 16.0
    channel_gain: tuple[float, ...] = (1.0, 0.6)

    def expected_p2p_uv(self, intensity_pct: float, phase_rad: float) -> float:
        """Median MEP peak-to-peak (µV) on the first channel."""
        recruit = 1.0 / (1.0 + math.exp((self.s50_pct - intensity_pct) / self.slope_pct))
        mod = 1.0 + self.phase_depth * math.cos(phase_rad - self.best_phase_rad)
        return self.mep_max_uv * recruit * mod

    def draw_p2p_uv(self, intensity_pct: float, phase_rad: float,
                    rng: np.random.Generator) -> float:
        """One trial's MEP peak-to-peak on the first channel."""
        return self.expected_p2p_uv(intensity_pct, phase_rad) * math.exp(
            rng.normal(0.0, self.variability))


@dataclass(frozen=True, slots=True)
class EmgSimParams:
    """Background EMG and pre-activation."""

    fs: float = 5000.0
    noise_uv: float = 4.0
    preactivation_rate_hz: float = 0.02  # episodes per second
    preactivation_s: float = 2.0
    preactivation_uv: float = 40.0


def mep_waveform(t_s: npt.NDArray[np.float64], p2p_uv: float, model: MepModel
                 ) -> npt.NDArray[np.float64]:
    """The MEP at times ``t_s`` after the pulse: one full sine cycle under a Hann window."""
    u = (t_s * 1000.0 - model.latency_ms) / model.duration_ms
    inside = (u >= 0) & (u <= 1)
    w = np.zeros_like(t_s)
    w[inside] = np.sin(2 * np.pi * u[inside]) * np.sin(np.pi * u[inside]) ** 2
    return w * (p2p_uv / 1.3)  # p2p of sin(2 pi u) sin^2(pi u) is about 1.3


def tms_artefact(t_s: npt.NDArray[np.float64], amplitude_uv: float = 3000.0
                 ) -> npt.NDArray[np.float64]:
    """The pulse artefact: a sharp, decaying, biphasic transient in the first ms."""
    a = np.zeros_like(t_s)
    inside = (t_s >= 0) & (t_s < 0.008)
    tt = t_s[inside]
    a[inside] = amplitude_uv * np.exp(-tt / 0.0008) * np.cos(2 * np.pi * 900.0 * tt)
    return a
