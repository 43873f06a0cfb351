"""Input-output (recruitment) curve: a Boltzmann sigmoid fit with confidence intervals.

``MEP(I) = MEPmax / (1 + exp((S50 - I) / k))`` (Devanne et al. 1997; Capaday 1997), fitted
to peak-to-peak amplitudes in log space (MEP variability is multiplicative), with 95%
confidence intervals from a parametric bootstrap of the residuals. The threshold read off
the fit is the intensity at which the curve reaches ``response_uv`` (50 µV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import least_squares

__all__ = ["BoltzmannFit", "fit_boltzmann"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class BoltzmannFit:
    """Fitted parameters and their 95% intervals (``(low, high)``)."""

    mep_max_uv: float
    s50_pct: float
    slope_pct: float
    threshold_pct: float
    ci: dict[str, tuple[float, float]]
    n: int


def _curve(p: Array, intensity: Array) -> Array:
    log_max, s50, k = p
    return np.asarray(log_max - np.logaddexp(0.0, (s50 - intensity) / k))


def _fit(intensity: Array, log_p2p: Array, p0: Array) -> Array:
    res = least_squares(lambda p: _curve(p, intensity) - log_p2p, p0,
                        bounds=([0.0, 0.0, 0.3], [12.0, 120.0, 30.0]))
    return np.asarray(res.x)


def fit_boltzmann(intensity_pct: Array, p2p_uv: Array, *, response_uv: float = 50.0,
                  floor_uv: float = 5.0, bootstrap: int = 200, seed: int = 0) -> BoltzmannFit:
    """Fit the recruitment curve; amplitudes below ``floor_uv`` are clamped to it (noise).

    Raises:
        ValueError: fewer than 5 pulses or fewer than 3 intensities.
    """
    x = np.asarray(intensity_pct, dtype=float)
    y = np.log(np.maximum(np.asarray(p2p_uv, dtype=float), floor_uv))
    if len(x) < 5 or len(np.unique(x)) < 3:
        raise ValueError("a recruitment curve needs at least 5 pulses at 3 intensities")
    p0 = np.array([float(y.max()), float(np.median(x)), 4.0])
    p = _fit(x, y, p0)
    resid = y - _curve(p, x)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        yb = _curve(p, x) + rng.choice(resid, size=len(resid), replace=True)
        boots.append(_fit(x, yb, p))
    b = np.array(boots)

    def threshold(q: Array) -> float:
        log_max, s50, k = q
        ratio = math.exp(log_max) / response_uv - 1.0
        return float(s50 - k * math.log(ratio)) if ratio > 0 else math.nan

    th = np.array([threshold(q) for q in b])
    ci = {"mep_max_uv": tuple(np.exp(np.percentile(b[:, 0], [2.5, 97.5]))),
          "s50_pct": tuple(np.percentile(b[:, 1], [2.5, 97.5])),
          "slope_pct": tuple(np.percentile(b[:, 2], [2.5, 97.5])),
          "threshold_pct": tuple(np.nanpercentile(th, [2.5, 97.5]))}
    return BoltzmannFit(mep_max_uv=float(math.exp(p[0])), s50_pct=float(p[1]),
                        slope_pct=float(p[2]), threshold_pct=threshold(p),
                        ci={k: (float(v[0]), float(v[1])) for k, v in ci.items()}, n=len(x))
