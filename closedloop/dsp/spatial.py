"""Spatial filters: a target channel minus the mean of its neighbours (Hjorth 1975).

The Hjorth/Laplacian montage around C3 is the usual mu-rhythm filter of the phase-targeting
literature (Zrenner et al. 2018 used C3 minus FC1, FC5, CP1, CP5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SpatialFilter", "hjorth"]


@dataclass(frozen=True)
class SpatialFilter:
    """A weighted sum of a few channels: ``data[:, indices] @ weights``."""

    indices: tuple[int, ...]
    weights: npt.NDArray[np.float64]

    def apply(self, data: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """(n, channels) samples to the (n,) filtered signal.

        Summed column by column in a fixed order, not by a matrix product: a BLAS kernel
        may round a row differently depending on how many rows it is given, and the same
        samples must give the same numbers however they were chunked.
        """
        first, *rest = self.indices
        y: npt.NDArray[np.float64] = np.multiply(data[:, first], self.weights[0],
                                                 dtype=np.float64)
        for i, w in zip(rest, self.weights[1:], strict=True):
            y += np.multiply(data[:, i], w, dtype=np.float64)
        return y


def hjorth(labels: Sequence[str], channel: str, reference: Sequence[str]) -> SpatialFilter:
    """Channel minus the mean of ``reference`` (or the channel alone when it is empty).

    Raises:
        ValueError: a label is not in ``labels``.
    """
    index = {label: i for i, label in enumerate(labels)}
    missing = [c for c in (channel, *reference) if c not in index]
    if missing:
        raise ValueError(f"labels not found: {', '.join(missing)}")
    idx = (index[channel], *(index[r] for r in reference))
    weights = np.ones(len(idx))
    if reference:
        weights[1:] = -1.0 / len(reference)
    return SpatialFilter(idx, weights)
