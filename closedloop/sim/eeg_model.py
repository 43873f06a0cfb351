"""Synthetic EEG with a known mu phase: the ground truth for the closed loop.

Background: 1/f ("pink") noise, built as a sum of Ornstein-Uhlenbeck processes with
octave-spaced corner frequencies (1-128 Hz; equal power per octave gives a 1/f spectrum),
partly shared by all channels (so a Hjorth filter removes it) and partly independent.
Mu rhythm: an oscillator whose frequency wanders slowly around ``mu_freq_hz`` and whose
amplitude waxes and wanes, focal over C3 with weaker spread to its neighbours. Because
the generator knows the oscillator's phase at every sample, the true phase at any pulse
is known exactly (0 = positive peak of the mu component, as the trigger convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import signal

__all__ = ["LABELS_10_10_64", "EegBlock", "EegGenerator", "EegSimParams"]

# 64 channels of the extended 10-20 (10-10) system, as on common 64-channel caps.
LABELS_10_10_64: tuple[str, ...] = (
    "Fp1", "Fpz", "Fp2", "AF7", "AF3", "AFz", "AF4", "AF8",
    "F7", "F5", "F3", "F1", "Fz", "F2", "F4", "F6", "F8",
    "FT7", "FC5", "FC3", "FC1", "FCz", "FC2", "FC4", "FC6", "FT8",
    "T7", "C5", "C3", "C1", "Cz", "C2", "C4", "C6", "T8",
    "TP9", "TP7", "CP5", "CP3", "CP1", "CPz", "CP2", "CP4", "CP6", "TP8", "TP10",
    "P7", "P5", "P3", "P1", "Pz", "P2", "P4", "P6", "P8",
    "PO7", "PO3", "POz", "PO4", "PO8", "O1", "Oz", "O2", "Iz",
)
assert len(LABELS_10_10_64) == 64

# Spread of the mu source over C3 to its neighbours (same polarity, weaker).
_MU_SPREAD = {"C3": 1.0, "C1": 0.4, "C5": 0.4, "FC3": 0.4, "CP3": 0.4,
              "FC1": 0.2, "FC5": 0.2, "CP1": 0.2, "CP5": 0.2, "Cz": 0.1, "T7": 0.1}


@dataclass(frozen=True, slots=True)
class EegSimParams:
    """Parameters of the synthetic EEG."""

    fs: float = 5000.0
    mu_freq_hz: float = 10.0
    mu_amplitude_uv: float = 20.0
    background_uv: float = 15.0
    shared_fraction: float = 0.6
    white_noise_uv: float = 1.0
    freq_wander_hz: float = 0.4
    dc_offset_uv: float = 5000.0


@dataclass(frozen=True, slots=True)
class EegBlock:
    """Generated samples (n, 64) in µV with the true mu phase and amplitude per sample."""

    data: npt.NDArray[np.float32]
    mu_phase: npt.NDArray[np.float64]
    mu_amplitude: npt.NDArray[np.float64]


class _OUBank:
    """Independent OU processes x[n] = a x[n-1] + b w[n], one set per column."""

    def __init__(self, corners_hz: npt.NDArray[np.float64], fs: float, n_cols: int) -> None:
        self.a = np.exp(-2 * np.pi * corners_hz / fs)
        self.b = np.sqrt(1 - self.a ** 2)
        self.state = np.zeros((len(corners_hz), n_cols))

    def filter(self, white: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """white: (k, n, cols) -> each process filtered, (k, n, cols), continuing the state."""
        out = np.empty_like(white)
        for k in range(len(self.a)):
            out[k], _ = signal.lfilter([self.b[k]], [1.0, -self.a[k]], white[k], axis=0,
                                       zi=self.a[k] * self.state[k][None, :])
            self.state[k] = out[k, -1]
        return out


class EegGenerator:
    """Produces consecutive blocks of synthetic EEG."""

    def __init__(self, params: EegSimParams, rng: np.random.Generator,
                 labels: tuple[str, ...] = LABELS_10_10_64) -> None:
        self.p = params
        self.rng = rng
        self.labels = labels
        n_ch = len(labels)
        corners = 2.0 ** np.arange(0, 8, dtype=np.float64)  # 1 .. 128 Hz
        self._shared = _OUBank(corners, params.fs, 1)
        self._local = _OUBank(corners, params.fs, n_ch)
        self._norm = 1.0 / math.sqrt(len(corners))
        self._spread = np.array([_MU_SPREAD.get(label, 0.0) for label in labels])
        self._dc = rng.normal(0.0, params.dc_offset_uv, n_ch)
        self._phase = rng.uniform(-math.pi, math.pi)
        # slow processes: frequency wander (tau 2 s) and amplitude envelope (tau 0.4 s)
        self._slow = _OUBank(np.array([1 / (2 * math.pi * 2.0), 1 / (2 * math.pi * 0.4)]),
                             params.fs, 1)
        self._slow.state[:] = rng.normal(size=(2, 1))

    def generate(self, n: int) -> EegBlock:
        """The next ``n`` samples."""
        p = self.p
        rng = self.rng
        n_ch = len(self.labels)
        shared = self._shared.filter(rng.normal(size=(len(self._shared.a), n, 1))).sum(0)[:, 0]
        local = self._local.filter(rng.normal(size=(len(self._local.a), n, n_ch))).sum(0)
        background = p.background_uv * self._norm * (
            math.sqrt(p.shared_fraction) * shared[:, None]
            + math.sqrt(1 - p.shared_fraction) * local)
        wander, env = self._slow.filter(rng.normal(size=(2, n, 1)))
        freq = p.mu_freq_hz + p.freq_wander_hz * wander[:, 0]
        phase = self._phase + np.cumsum(2 * np.pi * freq / p.fs)
        self._phase = float(math.remainder(phase[-1], 2 * math.pi))
        amp = p.mu_amplitude_uv * (0.15 + np.abs(env[:, 0]))
        mu = amp * np.cos(phase)
        data = (background + mu[:, None] * self._spread[None, :] + self._dc[None, :]
                + rng.normal(0.0, p.white_noise_uv, (n, n_ch)))
        wrapped = np.angle(np.exp(1j * phase))
        return EegBlock(data.astype(np.float32), wrapped, amp)
