"""The pulse ledger: what left the coil, as records, from the scheduler's outcomes.

One :class:`PulseRecord` per trigger delivered, with its own schedule and timing error,
the intensities the device's read-back said it would deliver (a paired pulse's
conditioning pulse, a device burst's pulses), its place in the unit, and the
``decision_id`` of the decision that asked for it. The live service and offline mode build
their records here, from the same :class:`~closedloop.stim.requests.PulseOutcome`, so they
have the same fields. :func:`mep_time` says when the unit's MEP follows (after a paired
pulse's test pulse, a burst's last pulse) or that it has none to measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from closedloop.control.core import Update
from closedloop.control.trigger_policy import Decision
from closedloop.mep.tracker import MepRecord
from closedloop.stim.patterns import Unit
from closedloop.stim.requests import PulseOutcome

__all__ = ["PulseLedger", "PulseRecord", "decision_fields", "fire_context", "mep_fields",
           "mep_time", "refusal_fields"]


@dataclass(frozen=True, slots=True)
class PulseRecord:
    """One trigger delivered (the fields of the ``pulse`` event)."""

    lsl_time: float
    scheduled_lsl_time: float
    fire_error_ms: float
    command_lsl_time: float
    intensity_pct: float
    driver: str
    pulse_number: int  # pulses delivered in the session so far, this one's included
    decision_id: int
    context: dict[str, Any] = field(default_factory=dict)  # the decision's, carried on
    unit: dict[str, Any] = field(default_factory=dict)  # unit, unit_index, unit_size
    paired: dict[str, float] | None = None  # conditioning_pct, isi_ms
    device_burst: list[float] | None = None  # the % of each pulse of a device burst
    stages_us: dict[str, float] | None = None  # the unit's first trigger, live only
    pulses: int = 1  # pulses this trigger gave (2 for a pair)

    def fields(self) -> dict[str, Any]:
        """The ``pulse`` event's fields."""
        out: dict[str, Any] = {
            "lsl_time": self.lsl_time, "scheduled_lsl_time": self.scheduled_lsl_time,
            "fire_error_ms": self.fire_error_ms, "command_lsl_time": self.command_lsl_time,
            "intensity_pct": self.intensity_pct, "driver": self.driver,
            "pulse_number": self.pulse_number, "decision_id": self.decision_id,
            **self.context, **self.unit}
        if self.paired is not None:
            out["paired"] = self.paired
        if self.device_burst is not None:
            out["device_burst"] = self.device_burst
        out["stages_us"] = self.stages_us
        return out


class PulseLedger:
    """Numbers the pulses of a session and turns outcomes into records."""

    def __init__(self, *, driver: str, unit: Unit) -> None:
        self.driver = driver
        self.unit = unit
        self.fired = 0  # pulses delivered (a pair's conditioning pulse included)

    def records(self, o: PulseOutcome, *, paired: tuple[float, float] | None,
                intensity_pct: float) -> list[PulseRecord]:
        """The records of every trigger ``o`` delivered (``paired``: the stimulator's
        (conditioning %, interval ms); ``intensity_pct``: its intensity, for a driver whose
        outcome lists no pulses)."""
        req = o.request
        ctx = {k: v for k, v in req.context.items() if k != "stages_us"}
        n_unit = len(req.offsets)
        out = []
        for k, t in enumerate(o.times):
            scheduled = req.fire_time + req.offsets[k]
            shots = o.pulses[k] if k < len(o.pulses) else ((t, intensity_pct),)
            self.fired += len(shots)
            stages = None
            if k == 0 and "stages_us" in req.context:
                stages = dict(req.context["stages_us"])
                stages["handoff_to_fire_us"] = round((o.command_time - o.handed_over) * 1e6, 1)
            out.append(PulseRecord(
                lsl_time=t, scheduled_lsl_time=scheduled,
                fire_error_ms=round((t - scheduled) * 1000.0, 4),
                command_lsl_time=o.command_times[k], intensity_pct=shots[-1][1],
                driver=self.driver, pulse_number=self.fired, decision_id=req.id, context=ctx,
                unit=({"unit": self.unit.kind, "unit_index": k, "unit_size": n_unit}
                      if n_unit > 1 else {}),
                paired=({"conditioning_pct": shots[0][1],
                         "isi_ms": round((shots[1][0] - shots[0][0]) * 1e3, 3)}
                        if len(shots) == 2 and paired is not None else None),
                device_burst=([p for _, p in shots]
                              if len(shots) > 1 and not (len(shots) == 2 and paired is not None)
                              else None),
                stages_us=stages, pulses=len(shots)))
        return out


def mep_time(o: PulseOutcome, unit: Unit, paired: tuple[float, float] | None) -> float | None:
    """When the MEP of the unit ``o`` delivered follows (None: none to measure): after a
    single pulse, a paired pulse's test pulse, a whole burst's last pulse."""
    if not o.times or unit.kind not in ("single", "paired", "burst"):
        return None
    if unit.kind == "burst" and len(o.times) != len(o.request.offsets):
        return None  # a burst cut short
    return o.times[-1] + (paired[1] / 1000.0 if paired is not None else 0.0)


def decision_fields(decision_id: int, decision: Decision, update: Update, *, fired: bool,
                    reason: str, stages_us: dict[str, float] | None) -> dict[str, Any]:
    """The ``decision`` event's fields (live and offline)."""
    est = update.est
    return {"decision_id": decision_id, "fire": fired, "reason": reason,
            "crossing_lsl_time": decision.crossing_time, "fire_lsl_time": decision.fire_time,
            "predicted_phase_deg": round(math.degrees(decision.predicted_phase_rad), 2),
            "phase_deg": round(math.degrees(est.phase_rad), 2),
            "estimate_lsl_time": est.lsl_time, "freq_hz": round(est.freq_hz, 3),
            "band_amplitude": round(update.amplitude, 3),
            "amplitude_threshold": (round(update.threshold, 3)
                                    if math.isfinite(update.threshold) else None),
            "expected_error_deg": (round(est.expected_error_deg, 1)
                                   if est.expected_error_deg is not None else None),
            "stages_us": stages_us}


def fire_context(decision: Decision, update: Update, *, target_phase_deg: float,
                 decided: float, chunk: float,
                 stages_us: dict[str, float] | None) -> dict[str, Any]:
    """What a pulse request carries from its decision to its pulse records (``decided``:
    when it was decided; ``chunk``: when the newest sample's chunk was stamped)."""
    est = update.est
    return {"target_phase_deg": target_phase_deg,
            "predicted_phase_deg": round(math.degrees(decision.predicted_phase_rad), 2),
            "estimate_lsl_time": est.lsl_time, "decision_lsl_time": decided,
            "chunk_lsl_time": chunk, "freq_hz": round(est.freq_hz, 3),
            "band_amplitude": round(update.amplitude, 3),
            **({"stages_us": stages_us} if stages_us is not None else {}),
            **({"expected_error_deg": round(est.expected_error_deg, 1)}
               if est.expected_error_deg is not None else {})}


def refusal_fields(o: PulseOutcome) -> dict[str, Any]:
    """The ``pulse_refused`` event's fields: a request that did not fire whole."""
    return {"reason": o.reason, "scheduled_lsl_time": o.request.fire_time,
            "decision_id": o.request.id, "delivered": len(o.times),
            "of": len(o.request.offsets),
            **{k: v for k, v in o.request.context.items() if k != "stages_us"}}


def mep_fields(rec: MepRecord) -> dict[str, Any]:
    """The ``mep`` event's fields (live and offline)."""
    m = rec.measure
    return {"pulse_lsl_time": rec.pulse_lsl_time, "decision_id": rec.decision_id,
            "source": rec.source, "channel": rec.channel, "p2p_uv": _r(m.p2p_uv),
            "latency_ms": _r(m.latency_ms), "peak_latency_ms": _r(m.peak_latency_ms),
            "area_uv_ms": _r(m.area_uv_ms), "background_p2p_uv": _r(m.background_p2p_uv),
            "background_rms_uv": _r(m.background_rms_uv), "rejected": m.rejected,
            "reason": m.reason}


def _r(x: float | None, nd: int = 3) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, nd)
