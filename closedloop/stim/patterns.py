"""What one trigger delivers: the stimulation patterns of ``[stimulation]``, as pure data.

A :class:`Unit` is the pulse offsets one trigger decision schedules (one pulse, a burst, a
train, a block of theta-burst), whether each trigger is a paired pulse, and the pause that
must follow before the next unit may start. Theta-burst (Huang et al. 2005, Neuron
45:201-206): bursts of 3 pulses at 50 Hz repeated every 200 ms; iTBS is 2 s of bursts
(30 pulses) every 10 s, cTBS is uninterrupted bursts (600 pulses in 40 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from closedloop.config.schema import StimulationConfig

__all__ = ["Unit", "unit_for"]

_TBS_BURST = (0.0, 0.02, 0.04)  # 3 pulses at 50 Hz
_TBS_PERIOD_S = 0.2
_ITBS_ON_BURSTS = 10  # 2 s on
_ITBS_OFF_S = 8.0


@dataclass(frozen=True, slots=True)
class Unit:
    """One trigger decision's worth of stimulation."""

    kind: str
    offsets: tuple[float, ...]
    paired: bool = False
    pause_after_s: float | None = None  # fixed pause (iTBS); None: trigger.min_interval_s
    max_units: int | None = None  # from the pattern itself (TBS session length)

    @property
    def duration_s(self) -> float:
        return self.offsets[-1]

    @property
    def pulses(self) -> int:
        return len(self.offsets) * (2 if self.paired else 1)


def _tbs(bursts: int) -> tuple[float, ...]:
    return tuple(round(b * _TBS_PERIOD_S + o, 6) for b in range(bursts) for o in _TBS_BURST)


def unit_for(cfg: StimulationConfig) -> Unit:
    """The unit ``cfg`` describes."""
    p = cfg.pattern
    if p == "single":
        return Unit("single", (0.0,), max_units=cfg.units)
    if p == "paired":
        return Unit("paired", (0.0,), paired=True, max_units=cfg.units)
    if p == "burst":
        ipi = 1.0 / cfg.burst_frequency_hz
        return Unit("burst", tuple(round(k * ipi, 6) for k in range(cfg.burst_pulses)),
                    max_units=cfg.units)
    if p == "train":
        ipi = 1.0 / cfg.train_frequency_hz
        return Unit("train", tuple(round(k * ipi, 6) for k in range(cfg.train_pulses)),
                    max_units=cfg.units)
    bursts = cfg.tbs_pulses // 3
    if p == "itbs":
        per_unit = _ITBS_ON_BURSTS
        units = -(-bursts // per_unit)
        return Unit("itbs", _tbs(min(per_unit, bursts)), pause_after_s=_ITBS_OFF_S,
                    max_units=min(units, cfg.units) if cfg.units else units)
    return Unit("ctbs", _tbs(bursts), max_units=1)
