"""Causal streaming filters with explicit state.

IIR filters run in second-order sections. As in mne-lsl's streaming filters, the state is
seeded from the first sample (``sosfilt_zi * x0``), so the EEG's DC offset, which can be
tens of millivolts, does not ring through the pass band at start-up or after a gap.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import signal

from closedloop.dsp.iir import lfilter_step

__all__ = ["Decimator", "StreamingSOS", "phase_delay_s"]

Array = npt.NDArray[np.float64]


class StreamingSOS:
    """A 1-D causal SOS filter that keeps its state between chunks."""

    def __init__(self, sos: npt.NDArray[np.float64]) -> None:
        self.sos = np.asarray(sos, dtype=np.float64)
        self._b = [np.ascontiguousarray(s[:3]) for s in self.sos]
        self._a = [np.ascontiguousarray(s[3:]) for s in self.sos]
        self._zi_unit = signal.sosfilt_zi(self.sos)
        self._zi: Array | None = None

    @classmethod
    def butter(cls, order: int, cutoff: float | tuple[float, float], fs: float,
               btype: Literal["lowpass", "highpass", "bandpass", "bandstop"]) -> StreamingSOS:
        """A Butterworth filter in SOS form."""
        return cls(signal.butter(order, cutoff, btype=btype, fs=fs, output="sos"))

    def reset(self) -> None:
        """Forget the state; the next chunk re-seeds it."""
        self._zi = None

    def process(self, x: Array) -> Array:
        """Filter a chunk, continuing from the previous one.

        Runs the sections as a cascade of ``lfilter`` steps (same direct-form II
        transposed state as ``sosfilt``; :func:`~closedloop.dsp.iir.lfilter_step`): for the
        small chunks of a real-time loop this is several times cheaper than ``sosfilt``'s
        per-call set-up.
        """
        if x.size == 0:
            return x.astype(np.float64)
        if self._zi is None:
            self._zi = self._zi_unit * x[0]
        y = np.asarray(x, dtype=np.float64)
        zi = self._zi
        for k in range(len(self.sos)):
            y, zi[k] = lfilter_step(self._b[k], self._a[k], y, zi[k])
        return y

    def phase_delay_s(self, freq_hz: float, fs: float) -> float:
        """Delay of a sinusoid at ``freq_hz`` through this filter, in seconds."""
        return phase_delay_s(self.sos, freq_hz, fs)


def phase_delay_s(sos: npt.NDArray[np.float64], freq_hz: float, fs: float) -> float:
    """``-angle(H(f)) / (2 pi f)`` of an SOS filter, in seconds."""
    _, h = signal.sosfreqz(sos, worN=[freq_hz], fs=fs)
    return float(-np.angle(h[0]) / (2 * np.pi * freq_hz))


class Decimator:
    """Low-pass and keep every ``factor``-th sample, continuously across chunks.

    The anti-alias filter is a causal Butterworth (order 4, cut-off at 40% of the output
    rate). Its delay at the frequency of interest is reported by :meth:`phase_delay_s` so
    that phase estimates can be moved back to the true sample times.
    """

    def __init__(self, fs_in: float, factor: int) -> None:
        if factor < 1:
            raise ValueError("factor must be >= 1")
        self.fs_in = fs_in
        self.factor = factor
        self.fs_out = fs_in / factor
        self._filter = (StreamingSOS.butter(4, 0.4 * self.fs_out, fs_in, "lowpass")
                        if factor > 1 else None)
        self._phase = 0  # index within the next chunk of the next sample to keep

    @staticmethod
    def factor_for(fs_in: float, target_hz: float) -> int:
        """Largest integer factor that keeps the output rate at or above ``target_hz``."""
        return max(1, int(fs_in // target_hz))

    def reset(self) -> None:
        """Forget the filter state and the sample phase."""
        if self._filter is not None:
            self._filter.reset()
        self._phase = 0

    def process(self, x: Array, ts: Array) -> tuple[Array, Array]:
        """Decimate a chunk of samples and their timestamps."""
        if self._filter is None:
            return x, ts
        y = self._filter.process(x)
        keep = slice(self._phase, None, self.factor)
        out, out_ts = y[keep], ts[keep]
        self._phase = (self._phase - len(x)) % self.factor
        return out, out_ts

    def kept_count(self, n: int) -> int:
        """How many of the next chunk's first ``n`` samples :meth:`process` will keep."""
        if self._filter is None:
            return n
        return len(range(self._phase, n, self.factor))

    def phase_delay_s(self, freq_hz: float) -> float:
        """Delay the anti-alias filter adds at ``freq_hz`` (0 without decimation)."""
        if self._filter is None:
            return 0.0
        return self._filter.phase_delay_s(freq_hz, self.fs_in)
