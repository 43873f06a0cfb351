"""What happens in a session, recorded: pulse outcomes, external pulses, stream changes,
MEPs and the estimator's changes, each as its event (on the event loop).

The rig's threads hand their news over to the loop (:class:`~closedloop.control.hooks.
Hooks`); here each becomes its record: a unit's outcome becomes one ``pulse`` event per
trigger (:class:`~closedloop.control.ledger.PulseLedger`) or a ``pulse_refused``, its MEP
is awaited by the decision's id, the participant's day counter is topped up ahead, and a
unit limit reached disarms (``stimulation_complete``). A pulse marker from another
stimulator is checked before its MEP is measured; a lost EEG stream cancels the pending
pulse and an EEG stream error stops the service.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import pylsl

from closedloop.config.schema import HARD_MIN_INTERVAL_S, Config
from closedloop.control.ledger import PulseLedger, mep_fields, mep_time, refusal_fields
from closedloop.control.protocols import ProtocolRunner
from closedloop.control.rig import Rig
from closedloop.control.stats import ServiceStats
from closedloop.errors import ClosedLoopError
from closedloop.mep.tracker import MepRecord
from closedloop.phase.etp import ETP
from closedloop.phase.tracker import PhaseTracker
from closedloop.stim.patterns import Unit
from closedloop.stim.requests import PulseOutcome
from closedloop.streams.reader import StreamEvent

__all__ = ["SessionRecords", "calibration_fields", "estimator_fields", "stream_event"]

_MAX_MARKER_CHARS = 1000
_MAX_MARKER_AGE_S = 60.0


class Host(Protocol):
    """What the records need of the service."""

    @property
    def cfg(self) -> Config: ...

    def record(self, kind: str, **fields: Any) -> None: ...

    def disarm(self, *, by: str) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class SessionRecords:
    """The session's records, from the rig's news (every method runs on the loop)."""

    def __init__(self, host: Host, rig: Rig, *, unit: Unit, stats: ServiceStats,
                 protocols: ProtocolRunner,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.host, self.rig, self.unit, self.stats = host, rig, unit, stats
        self.protocols = protocols
        self.ledger = PulseLedger(driver=rig.stim.driver.name, unit=unit)
        self.units_fired = 0
        self._spawn = spawn
        self._last_external = -math.inf
        self._topping_up = False

    # -- pulses -------------------------------------------------------------------------
    def pulse_outcome(self, o: PulseOutcome) -> None:
        """A unit delivered (its pulses recorded) or refused (why)."""
        if o.times:
            self._record_pulses(o)
        self._top_up_day()
        if not o.fired:
            self.stats.unit_refused[o.reason] += 1
            self.host.record("pulse_refused", **refusal_fields(o))
            return
        self.units_fired += 1
        self.protocols.unit_fired(o.request.id)
        limit = self.unit.max_units
        if limit is not None and self.units_fired >= limit and self.protocols.run is None:
            self.host.record("stimulation_complete", units=self.units_fired,
                             pattern=self.unit.kind, pulses=self.stats.fired)
            self.host.disarm(by="stimulation_complete")

    def _record_pulses(self, o: PulseOutcome) -> None:
        """One ``pulse`` event per trigger delivered (:mod:`closedloop.control.ledger`)."""
        stim, markers = self.rig.stim, self.rig.markers
        for rec in self.ledger.records(o, paired=stim.paired, intensity_pct=stim.intensity_pct):
            self.protocols.pulses_delivered(rec.pulses)
            self.stats.fire_error_ms.add(rec.fire_error_ms)
            fields = rec.fields()
            self.stats.pulses.append(fields)
            self.host.record("pulse", **fields)
            if markers is not None:
                markers.push(rec.lsl_time, {
                    "event": "pulse", "n": rec.pulse_number, "intensity_pct": rec.intensity_pct,
                    "target_phase_deg": rec.context.get("target_phase_deg")})
        self.stats.fired = self.ledger.fired
        t_mep = mep_time(o, self.unit, stim.paired)
        if t_mep is not None:
            self.rig.meps.add_pulse(t_mep, "closedloop", pylsl.local_clock(),
                                    decision_id=o.request.id)

    def _top_up_day(self) -> None:
        """Reserve the next block of the day's pulses, off the loop, before it is needed."""
        stim = self.rig.stim
        if self._topping_up or not stim.gate.needs_credit(self.unit.pulses + 10):
            return
        self._topping_up = True

        async def top_up() -> None:
            try:
                await asyncio.to_thread(stim.gate.top_up, stim.credit_target)
            except ClosedLoopError as exc:
                self.host.record("fault", error="day_counter", message=(
                    f"{exc}; disarmed (the daily limit could not be kept)"))
                self.host.disarm(by="day_counter_error")
            finally:
                self._topping_up = False

        self._spawn(top_up())

    def external_pulse(self, text: str, t: float) -> None:
        """A pulse marker from another stimulator: its MEP is measured."""
        now = pylsl.local_clock()
        reason = None
        if not text.strip() or len(text) > _MAX_MARKER_CHARS or not text.isprintable():
            reason = "not a pulse marker (empty, over-long or binary)"
        elif not math.isfinite(t) or abs(now - t) > _MAX_MARKER_AGE_S:
            reason = f"time {t:.3f} is not within {_MAX_MARKER_AGE_S:g} s of now"
        elif t - self._last_external < HARD_MIN_INTERVAL_S:
            reason = "closer than any pulse interval to the previous marker"
        if reason is not None:
            self.host.record("external_pulse_ignored", pulse_lsl_time=t, marker=text[:80],
                             reason=reason)
            return
        self._last_external = t
        self.host.record("external_pulse", pulse_lsl_time=t, marker=text[:200])
        self.rig.meps.add_pulse(t, "marker", now)

    # -- MEPs ---------------------------------------------------------------------------
    def poll_meps(self) -> None:
        """Measure the MEP windows that are complete."""
        ring = self.rig.emg.ring if self.rig.emg is not None else None
        for rec in self.rig.meps.poll(ring, pylsl.local_clock()):
            self._record_mep(rec)

    async def flush_meps(self) -> None:
        """On the way out: give open MEP windows a moment to complete, record the rest."""
        meps = self.rig.meps
        deadline = time.monotonic() + self.host.cfg.mep.window_ms[1] / 1000.0 + 0.1
        while meps.pending and time.monotonic() < deadline:
            self.poll_meps()
            await asyncio.sleep(0.01)
        for rec in meps.flush():
            self._record_mep(rec)

    def _record_mep(self, rec: MepRecord) -> None:
        fields = mep_fields(rec)
        self.stats.meps.append(fields)
        self.host.record("mep", **fields)
        self.protocols.mep(rec, self.host.cfg.mep.channels[0])

    # -- what the EEG pipeline said (closedloop.control.realtime) ------------------------
    def pipeline_events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Record the events of one pipeline step (each with the time it happened)."""
        for kind, fields in events:
            if kind == "phase_estimator":
                self.stats.estimator = _untimed(fields)
            elif kind == "calibrated":
                self.stats.calibration = _untimed(fields)
            self.host.record(kind, **fields)


def _untimed(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "lsl_time"}


def estimator_fields(tracker: PhaseTracker) -> dict[str, Any]:
    """A trained estimator started training, took over, or could not be trained: the
    ``phase_estimator`` event's fields."""
    model = tracker.wiener
    fields: dict[str, Any] = {"estimator": tracker.cfg.estimator,
                              "training": tracker.training_state}
    if model is not None and tracker.training_state == "ready":
        fields.update(band_hz=list(model.band_hz), peak_hz=model.peak_hz,
                      snr_db=round(model.snr_db, 2), rhythm=model.rhythm,
                      expected_sd_deg_above_median=round(
                          model.holdout_sd_deg_above_median, 1))
    elif isinstance(tracker.estimator, ETP) and tracker.training_state == "ready":
        fields.update(band_hz=list(tracker.estimator.band),
                      inter_peak_interval_ms=round(tracker.estimator.ipi_s * 1000, 1))
    return fields


def calibration_fields(tracker: PhaseTracker) -> dict[str, Any]:
    """The band was found in the first seconds of EEG (``band_hz = "auto"``): the
    ``calibrated`` event's fields."""
    peak = tracker.peak
    assert peak is not None
    return {"peak_hz": peak.peak_hz, "snr_db": round(peak.snr_db, 2),
            "band_hz": list(peak.band_hz)}


def stream_event(host: Host, stats: ServiceStats, rig: Rig | None, ev: StreamEvent) -> None:
    """A stream connected, lost, recovered or failed (``rig`` None: while it opens)."""
    rec = {"role": ev.role, "at_lsl_time": ev.lsl_time, **ev.detail}
    stats.stream_events.append({"kind": ev.kind, **rec})
    host.record(f"stream_{ev.kind}", **rec)
    if ev.kind == "error":
        reader = None if rig is None else {
            "eeg": rig.eeg, "emg": rig.emg, "pulses": rig.pulse_markers}[ev.role]
        err = reader.error if reader is not None and reader.error else ClosedLoopError(
            str(ev.detail))
        if ev.role == "eeg":
            host.fail(err)  # no trustworthy phase without the EEG: stop, visibly
        else:
            # EMG and pulse markers are for measuring, not for firing: carry on without
            # them (MEPs become 'emg_unavailable'), and say so
            host.record("fault", error=type(err).__name__, message=str(err),
                        role=ev.role, action="continuing without this stream")
            if ev.role == "emg" and rig is not None:
                rig.emg = None
    elif ev.role == "eeg" and ev.kind == "lost" and rig is not None:
        rig.scheduler.cancel("eeg_lost")
    # no reset on "recovered": the tracker resets on the data's own evidence (a gap in
    # the timestamps, samples lost from the ring), at the same sample as a replay of
    # the recording; a reset here raced with the pipeline and dropped the first
    # samples after a stall (or after a stream that connected before it started)
