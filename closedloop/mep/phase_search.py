"""Which phase gives the largest MEPs? Adaptive search over phase bins (Thompson sampling).

Each pulse targets one of ``n_bins`` phase bins; log MEP amplitudes per bin get a normal
model with unknown mean and variance (normal-inverse-gamma prior). The next bin is drawn
by Thompson sampling: pulses go where the posterior says the largest mean may be, so the
search spends most of its budget on the promising phases while still checking the others.
The report gives each bin's mean with an interval and the probability that each bin is the
best. Pure and seeded: the closed loop supplies the pulses and their MEPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PhaseSearch"]


@dataclass
class PhaseSearch:
    """Thompson sampling over phase bins centred at ``k * 360 / n_bins`` degrees."""

    n_bins: int = 4
    seed: int | None = None
    floor_uv: float = 5.0
    adaptive: bool = True
    _values: list[list[float]] = field(init=False, repr=False)
    _rng: np.random.Generator = field(init=False, repr=False)
    _order: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._values = [[] for _ in range(self.n_bins)]
        self._rng = np.random.default_rng(self.seed)
        self._order = []

    def bin_phase_deg(self, k: int) -> float:
        """Target phase of bin ``k`` (degrees, wrapped to (-180, 180])."""
        d = k * 360.0 / self.n_bins
        return d - 360.0 if d > 180.0 else d

    def _posterior_draws(self, n: int) -> np.ndarray:
        draws = np.empty((n, self.n_bins))
        for k, v in enumerate(self._values):
            x = np.log(np.maximum(np.asarray(v, dtype=float), self.floor_uv))
            m = len(x)
            mean = float(x.mean()) if m else 5.0
            ss = float(((x - mean) ** 2).sum()) if m else 0.0
            kappa, alpha, beta = 0.01 + m, 1.0 + m / 2.0, 0.5 + ss / 2.0
            sigma2 = beta / self._rng.gamma(alpha, 1.0, size=n)
            draws[:, k] = self._rng.normal(mean * m / kappa if m else 5.0,
                                           np.sqrt(sigma2 / kappa))
        return draws

    def next_bin(self) -> int:
        """The bin for the next pulse.

        Adaptive: each bin twice, then Thompson sampling. Otherwise: every bin equally
        often, in a random order (shuffled blocks of one pulse per bin).
        """
        if not self.adaptive:
            if not self._order:
                self._order = [int(k) for k in self._rng.permutation(self.n_bins)]
            return self._order.pop()
        counts = [len(v) for v in self._values]
        if min(counts) < 2:
            return int(np.argmin(counts))
        return int(np.argmax(self._posterior_draws(1)[0]))

    def record(self, k: int, p2p_uv: float) -> None:
        """One MEP after a pulse in bin ``k``."""
        if math.isfinite(p2p_uv):
            self._values[k].append(p2p_uv)

    def report(self, draws: int = 4000) -> dict[str, object]:
        """Per-bin medians, pulses, the probability each is best, and the best bin."""
        p_best = np.bincount(np.argmax(self._posterior_draws(draws), axis=1),
                             minlength=self.n_bins) / draws
        best = int(np.argmax(p_best))
        ci: list[list[float] | None] = []
        for v in self._values:  # 95% interval of the geometric mean (log-normal MEPs)
            if len(v) < 2:
                ci.append(None)
                continue
            x = np.log(np.maximum(np.asarray(v, dtype=float), self.floor_uv))
            half = 1.96 * float(x.std(ddof=1)) / math.sqrt(len(x))
            ci.append([round(math.exp(x.mean() - half), 1), round(math.exp(x.mean() + half), 1)])
        return {"bins_deg": [self.bin_phase_deg(k) for k in range(self.n_bins)],
                "pulses": [len(v) for v in self._values],
                "median_p2p_uv": [float(np.median(v)) if v else None for v in self._values],
                "geometric_mean_ci95_uv": ci,
                "p_best": [round(float(p), 3) for p in p_best],
                "best_bin": best, "best_phase_deg": self.bin_phase_deg(best),
                "confidence": round(float(p_best[best]), 3)}
