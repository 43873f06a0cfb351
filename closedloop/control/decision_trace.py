"""How a decision ends: its trace, and a decision to fire handed to the scheduler.

Every decision the pipeline (:mod:`closedloop.control.pipeline`) makes, to fire or not, is
a :class:`DecisionTrace` with an id that its pulse request, pulse records and MEP records
carry; its fields are the ``decision`` event's (:func:`~closedloop.control.ledger.decision_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from closedloop.control.core import DecisionCore, Update
from closedloop.control.ledger import decision_fields, fire_context
from closedloop.control.trigger_policy import Decision
from closedloop.stim.patterns import Unit
from closedloop.stim.requests import PulseRequest

__all__ = ["PIPELINE_DOCS", "DecisionTrace", "PipelineReason", "Scheduler", "TraceStatus",
           "request"]


class PipelineReason(StrEnum):
    """The pipeline's own refusals."""

    SCHEDULER_BUSY = "scheduler_busy"
    EEG_TIMESTAMPS = "eeg_timestamps"


PIPELINE_DOCS: dict[PipelineReason, str] = {
    PipelineReason.SCHEDULER_BUSY: 'a unit is still being delivered',
    PipelineReason.EEG_TIMESTAMPS: 'the clock guard: no decision on this EEG',
}


class TraceStatus(StrEnum):
    """How a decision ended in the pipeline."""

    REQUESTED = "requested"  # handed to the scheduler (the gate may still refuse it)
    REFUSED = "refused"  # by the trigger policy (its reason) or a busy scheduler


@dataclass(frozen=True, slots=True)
class DecisionTrace:
    """One decision: its id, how it ended, why, the estimate and the stage timings."""

    decision_id: int
    status: TraceStatus
    reason: str
    decision: Decision
    update: Update
    stages_us: dict[str, float] | None

    def fields(self) -> dict[str, Any]:
        """The ``decision`` event's fields."""
        return decision_fields(self.decision_id, self.decision, self.update,
                               fired=self.status is TraceStatus.REQUESTED,
                               reason=self.reason, stages_us=self.stages_us)


class Scheduler(Protocol):
    """The fire thread (:class:`~closedloop.stim.scheduler.FireScheduler`) or its
    simulated stand-in."""

    @property
    def busy(self) -> bool: ...

    def submit(self, request: PulseRequest) -> bool: ...


def request(decision_id: int, decision: Decision, update: Update, *, core: DecisionCore,
            scheduler: Scheduler, unit: Unit, target_phase_deg: float, decided: float,
            chunk: float, stages_us: dict[str, float] | None) -> DecisionTrace:
    """Hand a decision to fire to the scheduler (live and offline alike); the trace of
    how it ended. A decision not to fire is traced with the policy's reason."""
    status, reason = TraceStatus.REFUSED, decision.reason
    if decision.fire:
        req = PulseRequest(decision_id, decision.fire_time, fire_context(
            decision, update, target_phase_deg=target_phase_deg, decided=decided,
            chunk=chunk, stages_us=stages_us), unit.offsets)
        if scheduler.submit(req):
            core.scheduled(decision)
            status = TraceStatus.REQUESTED
        else:
            reason = PipelineReason.SCHEDULER_BUSY
    return DecisionTrace(decision_id, status, reason, decision, update, stages_us)
