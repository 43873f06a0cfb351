"""One step of an IIR filter with explicit state, at the cost of scipy's kernel alone.

``scipy.signal.lfilter`` checks and converts its arguments on every call, which costs
about ten microseconds: more than the filtering itself for the few samples of a 2 ms
chunk, and the real-time loop filters several times per chunk. For a 1-D input, a
recursive filter (``len(a) > 1``) and a state ``zi``, lfilter passes its arguments
unchanged to its compiled kernel; :func:`lfilter_step` calls that kernel directly, so
its numbers are lfilter's bit for bit (``tests/test_ring_dsp.py`` checks it). Where the
kernel cannot be found (a SciPy that renamed it), lfilter itself is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import signal

__all__ = ["KERNEL", "lfilter_step"]


def _kernel() -> Callable[..., tuple[Any, Any]] | None:
    try:
        from scipy.signal import _sigtools  # noqa: PLC0415 - optional private kernel
    except ImportError:  # pragma: no cover - depends on the SciPy release
        return None
    kernel = getattr(_sigtools, "_linear_filter", None)
    return kernel if callable(kernel) else None


KERNEL = _kernel()
"""SciPy's compiled lfilter kernel (None: not found, :func:`lfilter_step` falls back)."""


def lfilter_step(b: npt.NDArray[Any], a: npt.NDArray[Any], x: npt.NDArray[Any],
                 zi: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``signal.lfilter(b, a, x, zi=zi)`` for 1-D ``b``, ``a`` (``len(a) > 1``), ``x`` and
    ``zi`` (``len(zi) == max(len(a), len(b)) - 1``): the output and the final state.

    No samples leave the state as it was (SciPy's kernel returns an undefined state then).
    """
    if len(x) == 0:
        dtype = np.result_type(b, a, x, zi)
        return np.zeros(0, dtype), np.array(zi, dtype=dtype)
    if KERNEL is None or len(a) < 2 or x.ndim != 1:
        y, zf = signal.lfilter(b, a, x, zi=zi)
        return np.asarray(y), np.asarray(zf)
    y, zf = KERNEL(b, a, x, -1, zi)
    return y, zf
