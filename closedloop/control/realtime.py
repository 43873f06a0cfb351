"""The EEG pipeline where the samples arrive: in the EEG acquisition thread.

Each chunk the reader writes into the ring is stepped through the
:class:`~closedloop.control.pipeline.EegPipeline` at once, in the same thread: no hand-off
to the event loop lies between a chunk and its decision (that hop, and the loop's other
work, were most of the service's latency tail over a bare LSL inlet).

What the step says (decisions, samples lost, clock faults, the estimator's changes) is
recorded on the event loop, in one hand-off per step, with the time it happened. The
phase tracker is shared with the loop's commands (``calibrate``, a new band): both hold
:attr:`Rig.tracker_lock <closedloop.control.rig.Rig.tracker_lock>`. A step never starts
in the quiet window just before a fire command (the fire thread then gets the GIL to
itself), and an error in a step stops the service, visibly, and no step runs after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pylsl

from closedloop.config.schema import Config
from closedloop.control.core import DecisionCore
from closedloop.control.pipeline import EegPipeline
from closedloop.control.protocols import ProtocolRunner
from closedloop.control.records import SessionRecords, calibration_fields, estimator_fields
from closedloop.control.rig import Rig
from closedloop.control.stats import ServiceStats
from closedloop.phase.tracker import PhaseTracker
from closedloop.stim.patterns import Unit

__all__ = ["QUIET_AFTER_S", "QUIET_BEFORE_S", "RealtimeHost", "RealtimeStep", "start_realtime"]

QUIET_BEFORE_S = 0.0015  # no pipeline step starts this close before a fire command
QUIET_AFTER_S = 0.0002

Event = tuple[str, dict[str, Any]]


class RealtimeHost:
    """The pipeline's host in the acquisition thread: events are kept for the loop (with
    the time they happened), the rest is asked of ``holds`` and ``reopen``."""

    def __init__(self, *, clock: Callable[[], float], holds: Callable[[float], bool],
                 reopen: Callable[[], None]) -> None:
        self._clock = clock
        self._holds = holds
        self._reopen = reopen
        self.pending: list[Event] = []

    def emit(self, kind: str, **fields: Any) -> None:
        if "lsl_time" not in fields:
            fields["lsl_time"] = self._clock()
        self.pending.append((kind, fields))

    def holds(self, now: float) -> bool:
        return self._holds(now)

    def reopen_eeg(self) -> None:
        self._reopen()

    def estimator_changed(self, tracker: PhaseTracker) -> None:
        self.emit("phase_estimator", **estimator_fields(tracker))

    def calibrated(self, tracker: PhaseTracker) -> None:
        self.emit("calibrated", **calibration_fields(tracker))


class RealtimeStep:
    """Steps ``pipeline`` on each chunk (:meth:`on_data`, from the acquisition thread)."""

    def __init__(self, pipeline: EegPipeline, host: RealtimeHost, *,
                 lock: threading.Lock, next_command: Callable[[], float | None],
                 clock: Callable[[], float], deliver: Callable[[list[Event]], None],
                 failed: Callable[[BaseException], None]) -> None:
        self.pipeline, self.host, self.lock = pipeline, host, lock
        self._next_command, self._clock = next_command, clock
        self._deliver, self._failed = deliver, failed
        self.running = True  # False: stopped (shut down) or failed

    def stop(self) -> None:
        """No step from now on (the one under way, if any, ends)."""
        self.running = False

    def on_data(self) -> None:
        """New samples are in the ring: decide on them now."""
        if not self.running:
            return
        # quiet window: a pulse due within the next step's duration gets the GIL to
        # itself (a step holds it for a few hundred microseconds)
        due = self._next_command()
        if due is not None:
            wait = due - self._clock() + QUIET_AFTER_S
            if wait < QUIET_BEFORE_S:
                time.sleep(max(wait, 0.0))
        try:
            with self.lock:
                self.pipeline.step()
        except Exception as exc:  # in the pulse path: stop stepping, stop the service
            self.running = False
            self._failed(exc)
        finally:
            if self.host.pending:
                events, self.host.pending = self.host.pending, []
                self._deliver(events)


def start_realtime(rig: Rig, records: SessionRecords, protocols: ProtocolRunner, *,
                   cfg: Callable[[], Config], unit: Unit, stats: ServiceStats,
                   call_soon: Callable[[Callable[[], None]], None],
                   fail: Callable[[BaseException], None]) -> RealtimeStep:
    """The EEG pipeline of ``rig``, stepped in its acquisition thread from now on. What a
    step says goes to ``records`` on the loop (``call_soon``); an error in a step
    disarms and cancels in that thread, then ``fail`` runs on the loop."""
    assert rig.eeg.ring is not None
    tracker, stim = rig.tracker, rig.stim
    core = DecisionCore(cfg(), tracker, latency_s=stim.latency_s,
                        rng=np.random.default_rng(cfg().trigger.seed))
    host = RealtimeHost(clock=pylsl.local_clock, holds=protocols.holds,
                        reopen=rig.eeg.request_reopen)
    if tracker.training_state == "ready":  # a calibrated model file
        host.estimator_changed(tracker)
        records.pipeline_events(host.pending)
        host.pending = []
    pipeline = EegPipeline(cfg, tracker, core, rig.eeg.ring, host=host,
                           scheduler=rig.scheduler, armed=lambda: stim.armed, unit=unit,
                           stats=stats, clock=pylsl.local_clock)

    def deliver(events: list[Event]) -> None:
        call_soon(lambda: records.pipeline_events(events))

    def failed(exc: BaseException) -> None:  # (in the acquisition thread)
        stim.disarm()  # at once: a pending pulse must not wait for the loop
        rig.scheduler.cancel("fault")
        call_soon(lambda: fail(exc))

    return RealtimeStep(pipeline, host, lock=rig.tracker_lock,
                        next_command=rig.scheduler.next_command_time,
                        clock=pylsl.local_clock, deliver=deliver, failed=failed)
