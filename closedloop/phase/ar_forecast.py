"""Phase by autoregressive forward prediction (Zrenner et al. 2018; phastimate).

Zrenner C, Desideri D, Belardinelli P, Ziemann U (2018). Real-time EEG-defined
excitability states determine efficacy of TMS-induced plasticity in human motor cortex.
Brain Stimulation 11(2):374-389. Reference code: phastimate (MATLAB), by the same group.

Algorithm, per update, on the newest ``window`` samples:

1. zero-phase FIR band-pass of the window (``filtfilt``);
2. drop ``edge`` samples at both ends, where the zero-phase filter is unreliable;
3. fit an AR(``order``) model by Yule-Walker (biased autocorrelation). The model is
   used only if every reflection coefficient has magnitude below 1, which is exactly the
   condition for all its poles to lie inside the unit circle (the "unstable AR" trap of
   some shipped implementations, see ANCHORS). Levinson-Durbin gives the reflection
   coefficients one by one (:func:`levinson_durbin`, the reference); the estimator
   uses the equivalent test that costs one LAPACK call: the Toeplitz autocorrelation
   matrix of order ``order + 1`` is positive definite, i.e. the ``order``-sized system
   has a Cholesky factor (``dposv``, which also solves it) and the final prediction
   error is positive;
4. forecast across the dropped edge and half a Hilbert window beyond the last sample;
5. Hilbert transform of the ``hilbert_window`` samples centred on the last real sample;
   the phase is read *at* that sample (not one late), and the frequency from the phase
   slope around it.

phastimate's parameters at 1000 Hz are window 500, FIR order 128, edge 64, AR order 30,
Hilbert window 128 samples; here they are given in milliseconds so they scale with the
sampling rate (the defaults: 500, 128, 64, 128 ms, order 20 at 500 Hz).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import signal
from scipy.linalg import lapack

from closedloop.dsp.iir import lfilter_step
from closedloop.phase.estimate import PhaseEstimate

_ONE = np.array([1.0])  # the forecast's numerator

__all__ = ["ARForecaster", "ARParams", "levinson_durbin", "toeplitz_index", "yule_walker"]

Array = npt.NDArray[np.float64]

_dposv = lapack.dposv  # Cholesky factor and solve; info > 0: not positive definite


@dataclass(frozen=True, slots=True)
class ARParams:
    """Parameters in samples at the processing rate."""

    fs: float
    band_hz: tuple[float, float]
    window: int
    fir_taps: int
    edge: int
    order: int
    hilbert_window: int

    @classmethod
    def from_ms(cls, *, fs: float, band_hz: tuple[float, float], window_ms: float,
                fir_ms: float, edge_ms: float, order: int,
                hilbert_window_ms: float) -> ARParams:
        """Convert millisecond parameters to samples at ``fs``."""
        def n(ms: float) -> int:
            return round(ms * fs / 1000.0)
        taps = n(fir_ms) | 1  # odd: a type-I linear-phase FIR
        hw = max(8, n(hilbert_window_ms) // 2 * 2)
        return cls(fs=fs, band_hz=band_hz, window=n(window_ms), fir_taps=taps,
                   edge=n(edge_ms), order=order, hilbert_window=hw)


def levinson_durbin(r: Array, order: int) -> tuple[Array, Array]:
    """Solve the Yule-Walker equations.

    Args:
        r: Autocorrelation at lags ``0..order``.
        order: Model order.

    Returns:
        ``(a, k)``: prediction coefficients with ``x[n] ~ sum(a[i] * x[n-1-i])`` and the
        reflection coefficients (all ``|k| < 1`` iff the model is stable).
    """
    rr = [float(v) for v in r[:order + 1]]
    a = [0.0] * order
    k = [1.0] * order
    err = rr[0]
    for m in range(order):
        if err <= 0.0:
            break
        acc = rr[m + 1]
        for i in range(m):
            acc -= a[i] * rr[m - i]
        km = acc / err
        k[m] = km
        # a[i] <- a[i] - km * a[m-1-i], in place, the symmetric pairs together
        for i in range(m // 2):
            j = m - 1 - i
            ai, aj = a[i], a[j]
            a[i] = ai - km * aj
            a[j] = aj - km * ai
        if m % 2:
            a[m // 2] -= km * a[m // 2]
        a[m] = km
        err *= 1.0 - km * km
    return np.array(a), np.array(k)


def toeplitz_index(order: int) -> npt.NDArray[np.intp]:
    """Indices that turn lags ``r[0..order-1]`` into their ``order``-sized Toeplitz matrix."""
    k = np.arange(order)
    return np.abs(np.subtract.outer(k, k))


def yule_walker(r: Array, index: npt.NDArray[np.intp]) -> Array | None:
    """The AR coefficients (as :func:`levinson_durbin`'s ``a``), or None if unstable.

    Args:
        r: Autocorrelation at lags ``0..order``, finite, ``r[0] > 0``.
        index: :func:`toeplitz_index` of the order.

    The model is stable (every reflection coefficient below 1 in magnitude) exactly when
    the Toeplitz matrix of ``r[0..order]`` is positive definite: when the ``order``-sized
    one has a Cholesky factor and the final prediction error is positive.
    """
    _, a, info = _dposv(r[index], r[1:])
    if info != 0 or not float(r[0]) - float(a @ r[1:]) > 0.0:
        return None
    out: Array = a
    return out


class ARForecaster:
    """The AR forward-prediction estimator on a window of samples at ``params.fs``."""

    def __init__(self, params: ARParams) -> None:
        p = params
        if p.window - 2 * p.edge <= 2 * p.order:
            raise ValueError("window too short for its edges and the AR order")
        self.params = p
        fir = signal.firwin(p.fir_taps, p.band_hz, pass_zero=False, fs=p.fs)
        # filtfilt with a symmetric FIR is one convolution with the FIR convolved with itself
        self._fir2 = np.convolve(fir, fir)
        self._pad = len(self._fir2) // 2
        self._n_forecast = p.edge + p.hilbert_window // 2
        self._slope_half = max(1, p.hilbert_window // 8)
        # zi of an all-pole lfilter from past outputs: zi[m] = -sum_l den[m+l+1] * y[-1-l]
        m, l_ = np.meshgrid(np.arange(p.order), np.arange(p.order), indexing="ij")
        self._zi_index = np.minimum(m + l_ + 1, p.order + 1)
        self._toeplitz_index = toeplitz_index(p.order)
        # autocorrelation at lags 0..order as one product with a strided view of a
        # zero-padded copy of the segment: r[l] = sum_i seg[i] * seg[i + l]
        n_seg = p.window - 2 * p.edge
        self._acf_buf = np.zeros(n_seg + p.order)
        self._acf_view = np.lib.stride_tricks.sliding_window_view(
            self._acf_buf, p.order + 1)[:n_seg]
        # the analytic signal (FFT, one-sided spectrum, inverse FFT) of the Hilbert window
        # is only read at the last real sample and the few around it for the frequency:
        # the same linear map restricted to those rows, as one complex matrix
        hw = p.hilbert_window
        mult = np.zeros(hw)
        mult[0] = 1.0
        mult[1:(hw + 1) // 2] = 2.0
        if hw % 2 == 0:
            mult[hw // 2] = 1.0
        # position of the last real sample inside the Hilbert window
        centre = hw - (self._n_forecast - p.edge) - 1
        h = self._slope_half
        rows = np.arange(centre - h, centre + h + 1)
        spectrum = np.fft.fft(np.eye(hw), axis=0)  # column j: the DFT of a unit impulse at j
        inverse = np.exp(2j * np.pi * np.outer(rows, np.arange(hw)) / hw) / hw
        self._analytic_rows = (inverse * mult) @ spectrum
        self._tail = hw - self._n_forecast  # real samples inside the Hilbert window
        self.unstable_fits = 0

    def _zero_phase_bandpass(self, x: Array) -> Array:
        """filtfilt(fir, x) with odd-reflection padding, as MATLAB's and scipy's filtfilt,
        computed only where it is kept (``edge`` samples in from both ends)."""
        n, e = self._pad, self.params.edge
        left = 2 * x[0] - x[n:0:-1]
        right = 2 * x[-1] - x[-2:-n - 2:-1]
        padded = np.concatenate((left, x, right))
        return np.convolve(padded[e:len(padded) - e], self._fir2, mode="valid")

    @property
    def window(self) -> int:
        """Samples needed per estimate."""
        return self.params.window

    def estimate(self, x: Array, t_last: float) -> PhaseEstimate | None:
        """Phase at the last sample of ``x`` (``len(x) == window``), or None if unusable.

        Args:
            x: The newest ``window`` samples of the spatially filtered signal.
            t_last: The LSL time of the last sample.
        """
        p = self.params
        if len(x) != p.window:
            return None
        seg = self._zero_phase_bandpass(x - x.mean())  # non-finite samples: all NaN
        n_seg = len(seg)
        self._acf_buf[:n_seg] = seg
        r = (seg @ self._acf_view) / n_seg
        r0 = float(r[0])
        if not (math.isfinite(r0) and r0 > 0.0):  # a non-finite sample, or a flat window
            return None
        a = yule_walker(r, self._toeplitz_index)
        if a is None:
            self.unstable_fits += 1
            return None
        den = np.concatenate(([1.0], -a, [0.0]))
        zi = -(den[self._zi_index] @ seg[:-p.order - 1:-1])
        forecast, _ = lfilter_step(_ONE, den[:-1], np.zeros(self._n_forecast), zi)
        around = (self._analytic_rows[:, :self._tail] @ seg[n_seg - self._tail:]
                  + self._analytic_rows[:, self._tail:] @ forecast)
        mid = around[self._slope_half]
        phase = math.atan2(mid.imag, mid.real)
        turn = np.sum(around[1:] * np.conj(around[:-1]))
        step = math.atan2(turn.imag, turn.real)  # mean rad/sample
        freq = step * p.fs / (2 * math.pi)
        amp = abs(mid)
        if not (math.isfinite(phase) and math.isfinite(freq) and math.isfinite(amp)):
            return None
        return PhaseEstimate(lsl_time=t_last, phase_rad=phase, freq_hz=freq, amplitude=amp)
