"""The service as its rooms see it: one adapter for the rig's threads
(:class:`~closedloop.control.rig.RigHooks`; each but the EEG's data is handed over to
the event loop), the protocol runner (:class:`~closedloop.control.protocols.Host`), the
session records
(:class:`~closedloop.control.records.Host`) and the supervisor
(:class:`~closedloop.control.supervisor.Host`). Each method forwards to the room that
does the work; none holds state of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pylsl

from closedloop.config.schema import Config
from closedloop.control.api import Listener, Unsubscribe
from closedloop.control.commands import ServiceControl
from closedloop.control.protocols import ProtocolRunner
from closedloop.control.records import SessionRecords, stream_event
from closedloop.control.rig import Rig
from closedloop.control.runtime import apply_live_settings
from closedloop.control.stats import ServiceStats
from closedloop.control.supervisor import Supervisor
from closedloop.errors import ClosedLoopError
from closedloop.recording.events import EventLog
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.requests import PulseOutcome
from closedloop.streams.reader import StreamEvent

__all__ = ["Hooks", "Service"]


class Service(Protocol):
    """The service's rooms, as the hooks reach them
    (:class:`~closedloop.control.service.ClosedLoopService`)."""

    cfg: Config
    stats: ServiceStats
    log: EventLog | None
    api: ServiceControl
    rig: Rig | None
    protocols: ProtocolRunner | None
    records: SessionRecords | None
    supervisor: Supervisor

    def record(self, kind: str, **fields: Any) -> None: ...

    def subscribe(self, fn: Listener) -> Unsubscribe: ...

    def fail(self, exc: BaseException) -> None: ...

    def call_soon(self, fn: Callable[[], None]) -> None: ...

    def wake_eeg(self) -> None: ...


class Hooks:
    """Forwards each room's requests to the service's other rooms."""

    def __init__(self, service: Service) -> None:
        self._s = service

    @property
    def cfg(self) -> Config:
        return self._s.cfg

    def record(self, kind: str, **fields: Any) -> None:
        self._s.record(kind, **fields)

    emit = record

    def subscribe(self, fn: Listener) -> Unsubscribe:
        return self._s.subscribe(fn)

    def fail(self, exc: BaseException) -> None:
        self._s.fail(exc)

    def arm(self, *, by: str) -> None:
        self._s.api.arm(by=by)

    def disarm(self, *, by: str) -> None:
        self._s.api.disarm(by=by)

    # -- the rig's threads ------------------------------------------------------------
    def wake_eeg(self) -> None:
        self._s.wake_eeg()

    def stream_event(self, ev: StreamEvent) -> None:
        s = self._s
        s.call_soon(lambda: stream_event(self, s.stats, s.rig, ev))

    def external_pulse(self, text: str, t: float) -> None:
        self._s.call_soon(lambda: self._external_pulse(text, t))

    def _external_pulse(self, text: str, t: float) -> None:
        if self._s.records is None:  # the session is still opening: no MEP to measure yet
            self.record("external_pulse_ignored", pulse_lsl_time=t, marker=text[:80],
                        reason="the session was not ready yet")
            return
        self._s.records.external_pulse(text, t)

    def driver_fault(self, reason: str) -> None:
        self._s.call_soon(lambda: self._s.supervisor.driver_fault(reason))

    def pulse_outcome(self, o: PulseOutcome) -> None:
        self._s.call_soon(lambda: self._records().pulse_outcome(o))

    def pulse_path_error(self, exc: BaseException) -> None:
        self._s.call_soon(lambda: self._s.fail(exc))

    def _records(self) -> SessionRecords:
        records = self._s.records
        assert records is not None  # (the rig's threads start with the rig)
        return records

    # -- the protocol runner ----------------------------------------------------------
    def clock(self) -> float:
        return float(pylsl.local_clock())

    def set_target_phase(self, deg: float) -> None:
        s = self._s
        s.api.apply_config(apply_live_settings(s.cfg, {"target_phase_deg": deg},
                                               source="protocol"), by="protocol")

    # -- the supervisor ---------------------------------------------------------------
    @property
    def stim(self) -> GatedStimulator | None:
        return self._s.rig.stim if self._s.rig is not None else None

    def cancel_pending(self, reason: str) -> None:
        """Cancel the pulse the scheduler holds, if any."""
        if self._s.rig is not None:
            self._s.rig.scheduler.cancel(reason)

    def count_refusal(self, reason: str) -> None:
        self._s.stats.unit_refused[reason] += 1

    def stop_protocol_if_running(self, by: str) -> None:
        if self._s.api.protocol is not None:
            self._s.api.stop_protocol(by=by)

    def heap_trimmed(self, ms: float) -> None:
        self._s.stats.heap_trim_ms.add(ms)

    def poll_meps(self) -> None:
        if self._s.records is not None:
            self._s.records.poll_meps()

    def status(self) -> dict[str, Any]:
        return self._s.api.status()

    def write_error(self) -> ClosedLoopError | None:
        """A recording that cannot be written (the service stops on it)."""
        rig, log = self._s.rig, self._s.log
        if rig is not None and rig.recorder is not None and rig.recorder.error is not None:
            return ClosedLoopError(f"recording.xdf: cannot write {rig.recorder.path}: "
                                   f"{rig.recorder.error}")
        if log is not None and log.error is not None:
            return ClosedLoopError(f"recording.events: cannot write {log.path}: "
                                   f"{log.error}")
        return None
