"""The EEG pipeline step: where a pulse is decided.

Each step reads the EEG ring from where the last one stopped, pushes the samples through
the phase tracker, and at every estimator update that falls in them asks
:class:`~closedloop.control.core.DecisionCore` whether to fire (the trigger policy, with
the amplitude gate and the power conditions); a decision to fire becomes a
:class:`~closedloop.stim.requests.PulseRequest` handed to the scheduler at once. Each
decision is a :class:`DecisionTrace` with an id that its request, pulses and MEPs carry.

No decision is made on EEG whose newest timestamp is in the future or older than
``safety.max_eeg_age_ms`` (the clock guard, :mod:`closedloop.control.clock_guard`): a
lasting mismatch is a fault, said once per episode, and the inlet is reopened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from closedloop.config.schema import Config
from closedloop.control.clock_guard import (
    CLOCK_GRACE_S,
    MAX_FUTURE_S,
    ClockGuard,
    guard_clock,
)
from closedloop.control.core import DecisionCore, Update
from closedloop.control.ledger import decision_fields, fire_context
from closedloop.control.trigger_policy import Decision
from closedloop.phase.tracker import PhaseTracker
from closedloop.stim.patterns import Unit
from closedloop.stim.requests import PulseRequest
from closedloop.streams.ring import RingBuffer

__all__ = [
    "CLOCK_GRACE_S",
    "MAX_FUTURE_S",
    "PIPELINE_DOCS",
    "ClockGuard",
    "DecisionTrace",
    "EegPipeline",
    "PipelineReason",
    "TraceStatus",
    "guard_clock",
    "request",
]

# -- decision traces ---------------------------------------------------------------------
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


class Host(Protocol):
    """What the pipeline needs of the service."""

    def emit(self, kind: str, **fields: Any) -> None: ...

    def holds(self, now: float) -> bool:
        """A protocol holds decisions (waiting for an MEP, the stimulator settling)."""
        ...

    def reopen_eeg(self) -> None: ...

    def estimator_changed(self, tracker: PhaseTracker) -> None: ...

    def calibrated(self, tracker: PhaseTracker) -> None: ...


class EegPipeline:
    """From ring reads to decision traces and pulse requests (on the event loop)."""

    def __init__(self, cfg: Callable[[], Config], tracker: PhaseTracker, core: DecisionCore,
                 ring: RingBuffer, *, host: Host, scheduler: Scheduler,
                 armed: Callable[[], bool], unit: Unit, stats: Any,
                 clock: Callable[[], float]) -> None:
        self._cfg = cfg
        self.tracker, self.core, self.ring = tracker, core, ring
        self.host, self.scheduler, self._armed, self.unit = host, scheduler, armed, unit
        self.stats = stats
        self.clock = clock
        c = cfg()
        self.offset_s = c.streams.eeg.time_offset_ms / 1000.0
        # from the oldest sample received (as the session recording does): the filters
        # warm up on it, and a replay of the recording meets the same first sample
        self.pos = max(0, ring.count - ring.capacity)
        self.calibrated = tracker.band is not None
        self.training_state = tracker.training_state
        self.guard = ClockGuard()
        self.decision_id = 0
        self._nonfinite_said, self._nonfinite_next = 0, 0.0
        self._seen_cfg = c

    def step(self) -> list[DecisionTrace]:
        """Everything the ring received since the last step; the decisions made."""
        perf = time.perf_counter_ns
        t_a = perf()
        tracker, core, stats = self.tracker, self.core, self.stats
        rd = self.ring.read_from(self.pos)
        self.pos = rd.start + len(rd.timestamps)
        if rd.lost:
            stats.samples_lost += rd.lost
            self.host.emit("samples_lost", count=rd.lost)
            tracker.reset()
        if not len(rd.timestamps):
            return []
        offset_s = self.offset_s
        core.begin(float(rd.timestamps[0]) + offset_s)
        chunk_newest = float(rd.timestamps[-1]) + offset_s  # when the chunk was stamped
        self._say_nonfinite()
        cfg = self._cfg()
        if cfg is not self._seen_cfg:  # settings changed while running
            self._seen_cfg = cfg
            core.set_config(cfg)
        traces = []
        for seg_start, seg_end, update_here in core.segments(rd.timestamps, offset_s):
            tracker.push(rd.data[seg_start:seg_end], rd.timestamps[seg_start:seg_end])
            if not self.calibrated and tracker.band is not None:
                self.calibrated = True
                self.host.calibrated(tracker)
            if not update_here:
                continue
            t_b = perf()
            newest = float(rd.timestamps[seg_end - 1]) + offset_s  # newest sample used
            update = core.estimate(t=newest)  # at its own time, not the read's last update
            t_c = perf()
            if tracker.training_state != self.training_state:
                self.training_state = tracker.training_state
                self.host.estimator_changed(tracker)
            if update is None:
                continue
            stats.estimates += 1
            clock_now = self.clock()
            now = core.decision_time(newest, clock_now)
            if self.host.holds(clock_now):
                continue  # an MEP protocol waits for its last MEP before the next pulse
            if not self._clock_ok(clock_now - newest, clock_now, cfg):
                continue
            decision = core.decide(update, now=now, armed=self._armed(),
                                   busy=self.scheduler.busy)
            t_d = perf()
            t_decided = self.clock()
            stats.chunk_to_decision_ms.add((t_decided - chunk_newest) * 1000.0)
            stats.update_cost_us.add((t_d - t_a) / 1000.0)
            if decision is None:
                continue
            stats.decisions += 1
            self.decision_id += 1
            stages = {"read_dsp_us": round((t_b - t_a) / 1000, 1),
                      "estimate_us": round((t_c - t_b) / 1000, 1),
                      "decide_us": round((t_d - t_c) / 1000, 1)}
            trace = self._request(decision, update, stages, cfg, t_decided, chunk_newest)
            if trace.status is not TraceStatus.REQUESTED:
                stats.refused[trace.reason] += 1
            self.host.emit("decision", **trace.fields())
            traces.append(trace)
        return traces

    def _request(self, decision: Decision, update: Update, stages: dict[str, float],
                 cfg: Config, decided: float, chunk: float) -> DecisionTrace:
        trace = request(self.decision_id, decision, update, core=self.core,
                        scheduler=self.scheduler, unit=self.unit,
                        target_phase_deg=cfg.trigger.target_phase_deg, decided=decided,
                        chunk=chunk, stages_us=stages)
        if trace.status is TraceStatus.REQUESTED:
            self.stats.chunk_to_handoff_ms.add((self.clock() - chunk) * 1000)
        return trace

    def _clock_ok(self, skew: float, now: float, cfg: Config) -> bool:
        self.guard, verdict = guard_clock(self.guard, skew=skew, now=now,
                                          max_age_s=cfg.safety.max_eeg_age_ms / 1000.0)
        if verdict.fault:
            self.host.emit("fault", error="eeg_clock_mismatch", message=(
                f"newest EEG timestamp is {-skew * 1000:+.1f} ms from now; no decisions "
                "until it is consistent again; reopening the EEG inlet"),
                skew_ms=round(skew * 1e3, 2))
        if verdict.reopen:
            self.host.reopen_eeg()
            self.tracker.reset()
        if verdict.recovered:
            self.host.emit("eeg_clock_ok", skew_ms=round(skew * 1e3, 2))
        if not verdict.ok:
            self.stats.refused[PipelineReason.EEG_TIMESTAMPS] += 1
        return verdict.ok

    def _say_nonfinite(self) -> None:
        """Non-finite samples, said at most once a second (a flat-lined electrode sends
        NaN for minutes)."""
        total = self.tracker.nonfinite
        if total != self._nonfinite_said and time.monotonic() >= self._nonfinite_next:
            self.host.emit("stream_error", role="eeg", fatal=False,
                           reason="non_finite_samples", count=total - self._nonfinite_said,
                           total=total, action=(
                               "the phase chain restarts after them; no estimate, and so no "
                               "pulse, is made from a window that holds one"))
            self._nonfinite_said, self._nonfinite_next = total, time.monotonic() + 1.0

