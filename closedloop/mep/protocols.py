"""MEP-driven protocols the service can run: each pulse's MEP chooses the next pulse.

Adapters from the pure algorithms (:mod:`.threshold`, :mod:`.recruitment`,
:mod:`.phase_search`) to one interface the service drives: :meth:`next_pulse` gives the
intensity (and, for phase mapping, the target phase) of the next pulse; :meth:`record`
takes the MEP it evoked; :attr:`done` and :meth:`result` end it. No intensity above the
safety limit is ever planned: a protocol that would need one is refused at its start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from closedloop.errors import ControlError
from closedloop.mep.phase_search import PhaseSearch
from closedloop.mep.recruitment import fit_boltzmann
from closedloop.mep.threshold import IfcnRelativeFrequency, MlPest

__all__ = ["MEP_PROTOCOLS", "MepProtocol", "PulsePlan", "make_mep_protocol"]


@dataclass(frozen=True, slots=True)
class PulsePlan:
    """What the next pulse should be."""

    intensity_pct: float
    target_phase_deg: float | None = None


class MepProtocol(Protocol):
    """The interface the service drives."""

    name: str

    def next_pulse(self) -> PulsePlan:
        """The next pulse."""

    def record(self, plan: PulsePlan, p2p_uv: float) -> None:
        """The MEP the planned pulse evoked."""

    @property
    def done(self) -> bool:
        """Finished."""

    def result(self) -> dict[str, Any]:
        """What was found."""


class _Threshold:
    def __init__(self, name: str, hunt: MlPest | IfcnRelativeFrequency) -> None:
        self.name = name
        self.hunt = hunt

    def next_pulse(self) -> PulsePlan:
        return PulsePlan(self.hunt.next_intensity())

    def record(self, plan: PulsePlan, p2p_uv: float) -> None:
        self.hunt.record(plan.intensity_pct, p2p_uv)

    @property
    def done(self) -> bool:
        return self.hunt.done

    def result(self) -> dict[str, Any]:
        r = self.hunt.result()
        return {"threshold_pct": r.threshold_pct, "ci95_pct": [r.low_pct, r.high_pct],
                "pulses": r.pulses, "converged": r.converged}


class _IoCurve:
    name = "io-curve"

    def __init__(self, levels: list[float], seed: int | None) -> None:
        self._plan = list(levels)
        np.random.default_rng(seed).shuffle(self._plan)
        self._x: list[float] = []
        self._y: list[float] = []

    def next_pulse(self) -> PulsePlan:
        return PulsePlan(self._plan[len(self._x)])

    def record(self, plan: PulsePlan, p2p_uv: float) -> None:
        self._x.append(plan.intensity_pct)
        self._y.append(p2p_uv)

    @property
    def done(self) -> bool:
        return len(self._x) >= len(self._plan)

    def result(self) -> dict[str, Any]:
        fit = fit_boltzmann(np.array(self._x), np.array(self._y))
        return {"mep_max_uv": fit.mep_max_uv, "s50_pct": fit.s50_pct,
                "slope_pct": fit.slope_pct, "threshold_pct": fit.threshold_pct,
                "ci95": {k: list(v) for k, v in fit.ci.items()}, "pulses": fit.n}


class _PhaseMap:
    def __init__(self, intensity: float, pulses: int, seed: int | None,
                 adaptive: bool) -> None:
        self.name = "phase-map" if adaptive else "phase-map-random"
        self.search = PhaseSearch(n_bins=4, seed=seed, adaptive=adaptive)
        self.intensity = intensity
        self.budget = pulses
        self.count = 0
        self._bin = 0

    def next_pulse(self) -> PulsePlan:
        self._bin = self.search.next_bin()
        return PulsePlan(self.intensity, self.search.bin_phase_deg(self._bin))

    def record(self, plan: PulsePlan, p2p_uv: float) -> None:
        self.search.record(self._bin, p2p_uv)
        self.count += 1

    @property
    def done(self) -> bool:
        return self.count >= self.budget

    def result(self) -> dict[str, Any]:
        return self.search.report()


MEP_PROTOCOLS = ("mt-mlpest", "mt-ifcn", "io-curve", "phase-map", "phase-map-random")


def make_mep_protocol(name: str, *, pulses: int | None, intensity_pct: float,
                      max_intensity_pct: float, seed: int | None = None) -> MepProtocol:
    """Build a protocol; its intensities never exceed ``max_intensity_pct``.

    Raises:
        ControlError: unknown protocol, or one that would need more than the limit.
    """
    if name == "mt-mlpest":
        return _Threshold(name, MlPest(start_pct=intensity_pct, hi_pct=max_intensity_pct,
                                       max_pulses=pulses or 20))
    if name == "mt-ifcn":
        return _Threshold(name, IfcnRelativeFrequency(start_pct=intensity_pct,
                                                      max_pulses=pulses or 200))
    if name == "io-curve":
        levels = [float(x) for x in np.arange(30.0, 71.0, 5.0) if x <= max_intensity_pct]
        if len(levels) < 3:
            raise ControlError("io-curve: the safety limit leaves fewer than 3 intensities "
                               "between 30 and 70 %MSO")
        reps = max(1, (pulses or 45) // len(levels))
        return _IoCurve(levels * reps, seed)
    if name in ("phase-map", "phase-map-random"):
        return _PhaseMap(intensity_pct, pulses or 200, seed, adaptive=name == "phase-map")
    raise ControlError(f"protocol: unknown '{name}'")
