"""Circular statistics of angles (radians in, as the phase code uses them).

The circular SD is ``sqrt(-2 ln R)`` with ``R`` the mean resultant length (Mardia &
Jupp 2000; the figure phase-targeting papers report); ``R`` is floored at 1e-12 so that
errors spread evenly give a large, finite SD.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["circular_mean", "circular_sd", "circular_stats_deg", "resultant", "wrap"]

_MIN_R = 1e-12

Angles = npt.ArrayLike


def _mean_vector(x: Angles) -> complex:
    a = np.asarray(x, dtype=float)
    return complex(np.mean(np.exp(1j * a)))


def wrap(x: Angles) -> npt.NDArray[np.float64]:
    """Angles wrapped to (-pi, pi]."""
    return np.angle(np.exp(1j * np.asarray(x, dtype=float)))


def resultant(x: Angles) -> float:
    """The mean resultant length R in [0, 1] (1: all the same angle)."""
    return abs(_mean_vector(x))


def circular_mean(x: Angles) -> float:
    """The circular mean (radians, in (-pi, pi])."""
    return float(np.angle(_mean_vector(x)))


def circular_sd(x: Angles) -> float:
    """The circular SD (radians)."""
    return math.sqrt(-2.0 * math.log(max(resultant(x), _MIN_R)))


def circular_stats_deg(errors_deg: Angles) -> dict[str, float | int | None]:
    """Circular mean and SD (degrees) of angles given in degrees, NaN ignored."""
    e = np.radians(np.asarray(errors_deg, dtype=float))
    e = e[np.isfinite(e)]
    if not len(e):
        return {"n": 0, "mean_deg": None, "sd_deg": None, "resultant": None}
    return {"n": len(e), "mean_deg": round(math.degrees(circular_mean(e)), 2),
            "sd_deg": round(math.degrees(circular_sd(e)), 2),
            "resultant": round(resultant(e), 4)}
