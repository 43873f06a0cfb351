"""The EEG pipeline: where a pulse is decided, live and offline.

Live, each step reads the EEG ring from where the last one stopped; offline
(:mod:`closedloop.replay.offline`), a recording is fed to :meth:`EegPipeline.process` in
blocks. Either way the samples go through the phase tracker, and at every estimator update
that falls in them :class:`~closedloop.control.core.DecisionCore` is asked whether to fire
(the trigger policy, with the amplitude gate and the power conditions); a decision to fire
becomes a :class:`~closedloop.stim.requests.PulseRequest` handed to the scheduler at once.
Each decision is a :class:`~closedloop.control.decision_trace.DecisionTrace` with an id
that its request, pulses and MEPs carry, emitted as a ``decision`` event.

What offline changes is handed in, not written here: the clock (``clock_at``: the data's
time, an update's newest sample plus a modelled delay), the host (records into lists, no
protocol holds), the scheduler (simulated) and no stage timings (``timed``). A block comes
with the amplifier's chunk size: its updates fall where the chunks read one by one would
put them, and once the band is known the block is pushed through the filters at once,
each update estimated at its own sample of the history (``back``).

No decision is made on EEG whose newest timestamp is in the future or older than
``safety.max_eeg_age_ms`` (the clock guard, :mod:`closedloop.control.clock_guard`): a
lasting mismatch is a fault, said once per episode, and the inlet is reopened. Offline the
EEG's age is the modelled delay, and it passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from closedloop.config.schema import Config
from closedloop.control.clock_guard import (
    CLOCK_GRACE_S,
    MAX_FUTURE_S,
    ClockGuard,
    guard_clock,
)
from closedloop.control.core import DecisionCore, Update
from closedloop.control.decision_trace import (
    PIPELINE_DOCS,
    DecisionTrace,
    PipelineReason,
    Scheduler,
    TraceStatus,
    request,
)
from closedloop.control.stats import PipelineStats
from closedloop.control.trigger_policy import Decision
from closedloop.phase.tracker import PhaseTracker
from closedloop.stim.patterns import Unit
from closedloop.streams.ring import RingBuffer

__all__ = ["CLOCK_GRACE_S", "MAX_FUTURE_S", "PIPELINE_DOCS", "ClockGuard", "DecisionTrace",
           "EegPipeline", "PipelineReason", "PipelineStats", "Stats", "TraceStatus",
           "guard_clock", "request"]


class Host(Protocol):
    """What the pipeline needs of the service."""

    def emit(self, kind: str, **fields: Any) -> None: ...

    def holds(self, now: float) -> bool:
        """A protocol holds decisions (waiting for an MEP, the stimulator settling)."""
        ...

    def reopen_eeg(self) -> None: ...

    def estimator_changed(self, tracker: PhaseTracker) -> None: ...

    def calibrated(self, tracker: PhaseTracker) -> None: ...


Stats = PipelineStats  # (the service passes its ServiceStats, a PipelineStats)


class EegPipeline:
    """From samples to decision traces and pulse requests (live: in the EEG acquisition thread,
    :mod:`closedloop.control.realtime`).

    ``clock``: the LSL clock live. ``clock_at``: what time it is at an update whose newest
    sample is at the given LSL time; by default the clock's (live), offline the data's
    own. ``timed``: the pipeline times itself, the traces' stage durations and the stats'
    latencies (not offline: its records are the same every run, ``stages_us`` None).
    ``ring``: None when fed by :meth:`process` alone (offline).
    """

    def __init__(self, cfg: Callable[[], Config], tracker: PhaseTracker, core: DecisionCore,
                 ring: RingBuffer | None, *, host: Host, scheduler: Scheduler,
                 armed: Callable[[], bool], unit: Unit, stats: Stats,
                 clock: Callable[[], float],
                 clock_at: Callable[[float], float] | None = None,
                 timed: bool = True) -> None:
        self._cfg = cfg
        self.tracker, self.core, self.ring = tracker, core, ring
        self.host, self.scheduler, self._armed, self.unit = host, scheduler, armed, unit
        self.stats = stats
        self.clock = clock
        self._clock_at = clock_at
        self._timed = timed
        c = cfg()
        self.offset_s = c.streams.eeg.time_offset_ms / 1000.0
        # from the oldest sample received (as the session recording does): the filters
        # warm up on it, and a replay of the recording meets the same first sample
        self.pos = 0 if ring is None else max(0, ring.count - ring.capacity)
        self.calibrated = tracker.band is not None
        self.training_state = tracker.training_state
        self.guard = ClockGuard()
        self.decision_id = 0
        self._nonfinite_said, self._nonfinite_next = 0, 0.0
        self._seen_cfg = c

    def step(self) -> list[DecisionTrace]:
        """Everything the ring received since the last step; the decisions made."""
        t_a = time.perf_counter_ns()
        assert self.ring is not None, "a pipeline without a ring is fed by process()"
        rd = self.ring.read_from(self.pos)
        self.pos = rd.start + len(rd.timestamps)
        if rd.lost:
            self.stats.samples_lost += rd.lost
            self.host.emit("samples_lost", count=rd.lost)
            self.tracker.reset()
        if not len(rd.timestamps):
            return []
        self._say_nonfinite()
        return self._process(rd.data, rd.timestamps, None, t_a)

    def process(self, data: npt.NDArray[np.floating[Any]], stamps: npt.NDArray[np.float64], *,
                chunk: int | None = None) -> list[DecisionTrace]:
        """Decide on ``data`` (samples, channels) stamped ``stamps``; the decisions made.

        ``chunk``: the samples came in chunks of this many (a recording, a backlog). The
        updates then fall where they would had each chunk been read on its own; once the
        band is known, finite samples are pushed through the filters at once (their per-call
        cost dominates otherwise) and each update is estimated at its own sample of the
        history: the filters give the same numbers however the samples are split, so the
        decisions are the same. None: the samples are one chunk (as a ring read).
        """
        if not len(stamps):
            return []
        return self._process(data, stamps, chunk, time.perf_counter_ns())

    def _process(self, data: npt.NDArray[np.floating[Any]], stamps: npt.NDArray[np.float64],
                 chunk: int | None, t_a: int) -> list[DecisionTrace]:
        tracker, core, offset_s = self.tracker, self.core, self.offset_s
        core.begin(float(stamps[0]) + offset_s)
        self._settings()  # (the update cadence for the segments below)
        traces: list[DecisionTrace] = []
        n = len(stamps)
        size = n if chunk is None else chunk
        # a non-finite sample restarts the chain inside a push, and the updates' places
        # counted before it would be off: such samples go chunk by chunk, as live
        block = 0 if chunk is None or not np.isfinite(data).all() else chunk
        for i in range(0, n, size):
            if block and tracker.band is not None:
                self._block(data[i:], stamps[i:], block, t_a, traces)
                break
            ts = stamps[i:i + size]
            chunk_newest = float(ts[-1]) + offset_s  # when the chunk was stamped
            for a, b, update_here in core.segments(ts, offset_s):
                tracker.push(data[i + a:i + b], ts[a:b])
                if not self.calibrated and tracker.band is not None:
                    self.calibrated = True
                    self.host.calibrated(tracker)
                if update_here:
                    self._update(float(ts[b - 1]) + offset_s, 0, chunk_newest, t_a, traces)
        return traces

    def _block(self, data: npt.NDArray[np.floating[Any]], stamps: npt.NDArray[np.float64],
               chunk: int, t_a: int, traces: list[DecisionTrace]) -> None:
        """Chunks pushed at once (the band known): the updates found chunk by chunk, then
        estimated ``back`` samples of the history before its newest."""
        tracker, core, offset_s = self.tracker, self.core, self.offset_s
        updates: list[tuple[int, float, float, float]] = []
        for c in range(0, len(stamps), chunk):
            part = stamps[c:c + chunk]
            chunk_newest = float(part[-1]) + offset_s
            for _, b, update_here in core.segments(part, offset_s):
                if update_here:
                    updates.append((tracker.decimated_count(c + b),
                                    float(part[b - 1]) + offset_s, core.spacing,
                                    chunk_newest))
        kept = tracker.decimated_count(len(stamps))
        tracker.push(data, stamps)
        for k, newest, spacing, chunk_newest in updates:
            core.spacing = spacing  # as it was at this update (the decision's horizon)
            self._update(newest, kept - k, chunk_newest, t_a, traces)

    def _update(self, newest: float, back: int, chunk: float, t_a: int,
                traces: list[DecisionTrace]) -> None:
        """One estimator update, at LSL time ``newest`` (``back`` samples of the history
        before its newest), and its decision."""
        perf = time.perf_counter_ns
        tracker, core, stats = self.tracker, self.core, self.stats
        t_b = perf()
        update = core.estimate(back, t=newest)
        t_c = perf()
        if tracker.training_state != self.training_state:
            self.training_state = tracker.training_state
            self.host.estimator_changed(tracker)
        if update is None:
            return
        stats.estimates += 1
        clock_now = self.clock() if self._clock_at is None else self._clock_at(newest)
        now = core.decision_time(newest, clock_now)
        if self.host.holds(clock_now):
            return  # an MEP protocol waits for its last MEP before the next pulse
        cfg = self._settings()  # (after the hold: a protocol sets its target, then lets go)
        if not self._clock_ok(clock_now - newest, clock_now, cfg):
            return
        decision = core.decide(update, now=now, armed=self._armed(), busy=self.scheduler.busy)
        t_d = perf()
        t_decided = self.clock()
        if self._timed:
            stats.chunk_to_decision_ms.add((t_decided - chunk) * 1000.0)
            stats.update_cost_us.add((t_d - t_a) / 1000.0)
        if decision is None:
            return
        stats.decisions += 1
        self.decision_id += 1
        stages = ({"read_dsp_us": round((t_b - t_a) / 1000, 1),
                   "estimate_us": round((t_c - t_b) / 1000, 1),
                   "decide_us": round((t_d - t_c) / 1000, 1)} if self._timed else None)
        trace = self._request(decision, update, stages, cfg, t_decided, chunk)
        if trace.status is not TraceStatus.REQUESTED:
            stats.decision_refused[trace.reason] += 1
        self.host.emit("decision", **trace.fields())
        traces.append(trace)

    def _request(self, decision: Decision, update: Update,
                 stages: dict[str, float] | None,
                 cfg: Config, decided: float, chunk: float) -> DecisionTrace:
        trace = request(self.decision_id, decision, update, core=self.core,
                        scheduler=self.scheduler, unit=self.unit,
                        target_phase_deg=cfg.trigger.target_phase_deg, decided=decided,
                        chunk=chunk, stages_us=stages)
        if trace.status is TraceStatus.REQUESTED and self._timed:
            self.stats.chunk_to_handoff_ms.add((self.clock() - chunk) * 1000)
        return trace

    def _settings(self) -> Config:
        """The settings now, handed to the core when they changed (live: by a command or
        a protocol, on the loop)."""
        cfg = self._cfg()
        if cfg is not self._seen_cfg:
            self._seen_cfg = cfg
            self.core.set_config(cfg)
        return cfg

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
            self.stats.decision_refused[PipelineReason.EEG_TIMESTAMPS] += 1
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

