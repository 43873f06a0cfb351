"""The closed-loop service: streams in, phase-locked pulses out, everything recorded.

Threads and their hand-offs (functional core, imperative shell):

- one acquisition thread per LSL stream (:mod:`closedloop.streams.reader`) writes into a
  ring buffer and wakes the event loop with ``call_soon_threadsafe``;
- the event loop runs the EEG pipeline (:class:`~closedloop.phase.tracker.PhaseTracker`,
  :func:`~closedloop.control.trigger_policy.decide`) on each wake-up, measures MEPs,
  and records every decision, pulse and stream change;
- the fire thread (:mod:`closedloop.stim.scheduler`) lands each pulse at its scheduled
  LSL time through the :class:`~closedloop.stim.gated.GatedStimulator`;
- the event log writes in its own thread.

Safety: the service disarms on shutdown and on any error in the pulse path; a lost EEG
stream cancels a pending pulse, and the gate independently refuses to fire on stale EEG.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import platform
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pylsl

from closedloop import __version__
from closedloop.blas import single_threaded_blas
from closedloop.config.load import load_config
from closedloop.config.redact import redacted_config
from closedloop.config.schema import HARD_MIN_INTERVAL_S, Config
from closedloop.control.api import Attachment, Listener, Unsubscribe
from closedloop.control.bus import EventBus
from closedloop.control.core import DecisionCore
from closedloop.control.ledger import (
    PulseLedger,
    mep_fields,
    mep_time,
    refusal_fields,
)
from closedloop.control.pipeline import EegPipeline
from closedloop.control.protocols import PROTOCOLS, ProtocolRun, ProtocolRunner
from closedloop.control.rig import Rig, open_rig
from closedloop.control.runtime import (
    LIVE_KEYS,
    apply_live_settings,
    live_value,
    restart_keys,
)
from closedloop.control.stats import LatencyRing
from closedloop.control.supervisor import Supervisor, write_status
from closedloop.dsp.circular import circular_stats_deg
from closedloop.errors import ClosedLoopError, ControlError, StimulatorError
from closedloop.mep.tracker import MepRecord, MepTracker
from closedloop.phase.etp import ETP
from closedloop.phase.tracker import PhaseTracker
from closedloop.recording.events import EventLog
from closedloop.recording.session import SessionRecorder
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import Unit, unit_for
from closedloop.stim.scheduler import FireScheduler, PulseOutcome
from closedloop.streams.reader import MarkerReader, StreamEvent, StreamReader

__all__ = ["PROTOCOLS", "ClosedLoopService", "ServiceStats"]


_MAX_MARKER_CHARS = 1000
_MAX_MARKER_AGE_S = 60.0
_GIL_SWITCH_S = 0.0005
_QUIET_BEFORE_S = 0.0015  # no pipeline update starts this close before a fire command
_QUIET_AFTER_S = 0.0002


@dataclass
class ServiceStats:
    """What happened in a session, for the demo summary and benchmarks."""

    decisions: int = 0
    estimates: int = 0
    fired: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    # bounded: a daemon runs for months (the event log keeps everything; these serve the
    # summary, metrics and status). A pulse record is about 1.5 kB, an MEP's 0.7 kB.
    pulses: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=500))
    meps: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2_000))
    stream_events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))
    chunk_to_decision_ms: LatencyRing = field(default_factory=LatencyRing)
    chunk_to_handoff_ms: LatencyRing = field(default_factory=LatencyRing)
    fire_error_ms: LatencyRing = field(default_factory=LatencyRing)
    update_cost_us: LatencyRing = field(default_factory=LatencyRing)
    heap_trim_ms: LatencyRing = field(default_factory=LatencyRing)
    samples_lost: int = 0
    calibration: dict[str, Any] | None = None
    estimator: dict[str, Any] | None = None  # the wiener filter's state, when it is used
    protocol_results: list[dict[str, Any]] = field(default_factory=list)


class ClosedLoopService:
    """Construct with a validated :class:`Config`, then ``await run(stop_event)``."""

    def __init__(self, cfg: Config, *, config_source: str = "",
                 config_overrides: tuple[str, ...] = ()) -> None:
        single_threaded_blas()
        self.cfg = cfg
        self.config_source = config_source
        self.config_overrides = config_overrides
        self.stats = ServiceStats()
        self.ready = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._fatal: BaseException | None = None
        self._eeg_wake = asyncio.Event()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rng = np.random.default_rng(cfg.trigger.seed)
        self.log: EventLog | None = None
        self.bus = EventBus(self._write_event, pylsl.local_clock)
        self.rig: Rig | None = None  # everything the session opened (open_rig)
        self._attachments: tuple[Attachment, ...] = ()
        self._last_external = -math.inf
        self.protocols: ProtocolRunner | None = None
        self.ledger: PulseLedger | None = None
        self.started_wall = time.time()
        self.unit: Unit = unit_for(cfg.stimulation)
        self.units_fired = 0
        self.core: DecisionCore | None = None
        self.supervisor = Supervisor(self)
        self._hooks = _Hooks(self)
        self._tasks: asyncio.TaskGroup | None = None  # while running
        self._result_tasks: set[asyncio.Task[None]] = set()  # started while stopping
        self._topping_up = False

    # -- life cycle --------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *,
                  attachments: Sequence[Attachment] = ()) -> ServiceStats:
        """Run until ``stop`` is set; always disarm and flush on the way out.

        ``attachments`` (the control planes, :func:`closedloop.mqtt.plane.planes_for`) are
        started once the service is ready and stopped first on the way out.

        Raises:
            ClosedLoopError: a stream, channel, stimulator or recording error that stopped
                the service (it was disarmed first).
        """
        self._stop = stop
        self._loop = asyncio.get_running_loop()
        cfg = self.cfg
        if cfg.mqtt.enabled and not attachments:
            raise ClosedLoopError("mqtt.enabled is set but no MQTT control plane was "
                                  "attached (closedloop.mqtt.plane.planes_for builds it)")
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(_GIL_SWITCH_S)  # the fire thread must get the GIL promptly
        self.log = EventLog(cfg.recording.events)
        self._event("session_start", version=__version__,
                       python=platform.python_version(), liblsl=pylsl.library_version(),
                       host=socket.gethostname(), pid=os.getpid(),
                       config_source=self.config_source, config=redacted_config(cfg))
        try:
            try:
                await self._start()
            except ClosedLoopError as exc:  # recorded (fault, session_end), then raised
                self._fail(exc)
                raise
            self.ready.set()
            self.supervisor.start_watchdog(self._loop)
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg  # background work (day top-ups, protocol results) too
                tasks = [tg.create_task(self._eeg_loop(), name="eeg-pipeline"),
                         tg.create_task(self.supervisor.run(), name="housekeeping")]
                for attachment in attachments:
                    self._attachments += (attachment,)
                    await attachment.start(self)
                await stop.wait()
                self._tasks = None  # what starts now is awaited by the shutdown
                for task in tasks:
                    task.cancel()
            if self._fatal is not None:
                raise self._fatal
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            if isinstance(first, ClosedLoopError):
                raise first from None
            raise ClosedLoopError(f"internal error in the service ({type(first).__name__}: "
                                  f"{first}); disarmed and stopped") from first
        finally:
            self.supervisor.stop_watchdog()
            await self._shutdown()
            sys.setswitchinterval(old_switch)
        return self.stats

    def fail(self, exc: BaseException) -> None:
        """A fault that stops the service: disarm at once, record, stop (on the loop)."""
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """A fault that stops the service: disarm at once, record, stop."""
        if self.stim is not None:
            self.stim.disarm()
        if self.scheduler is not None:
            self.scheduler.cancel("fault")
        if self._fatal is None:
            self._fatal = exc
        if self.log is not None:
            self._event("fault", error=type(exc).__name__,
                           message=str(exc))
        if self._stop is not None:
            self._stop.set()

    async def _start(self) -> None:
        cfg = self.cfg
        self.rig = rig = await open_rig(cfg, self.unit, self._hooks)
        self.ledger = PulseLedger(driver=rig.stim.driver.name, unit=self.unit)
        self.protocols = ProtocolRunner(
            self._hooks, stim=rig.stim, unit=self.unit,
            settle_s=lambda: self.cfg.stimulator.settle_ms / 1000.0, spawn=self._spawn,
            results=self.stats.protocol_results)
        if cfg.stimulator.arm_on_start:
            rig.stim.arm()
            self._event("armed", by="arm_on_start")

    async def _shutdown(self) -> None:
        if self.stim is not None:
            self.stim.disarm()
        for attachment in reversed(self._attachments):
            with contextlib.suppress(Exception):  # a plane's error must not stop the rest
                await attachment.stop()
        if self.scheduler is not None:
            self.scheduler.cancel("shutdown")
            await asyncio.to_thread(self.scheduler.stop)
        await asyncio.sleep(0)  # deliver outcomes queued by the fire thread
        if self.stim is not None:
            try:  # the day's reservation not used goes back to the participant's counter
                await asyncio.to_thread(self.stim.gate.settle)
            except ClosedLoopError as exc:
                if self.log is not None:
                    self._event("fault", error="day_counter", message=str(exc))
        if self._result_tasks:  # protocol results still being computed
            await asyncio.gather(*self._result_tasks, return_exceptions=True)
        if self.log is not None and self.stim is not None:
            self._event("disarmed", by="shutdown")
        if self.meps is not None:
            # give MEP windows still open a moment to complete, then record the rest
            deadline = time.monotonic() + self.cfg.mep.window_ms[1] / 1000.0 + 0.1
            while self.meps.pending and time.monotonic() < deadline:
                self.poll_meps()
                await asyncio.sleep(0.01)
            for rec in self.meps.flush():
                self._record_mep(rec)
        if self.rig is not None:
            await self.rig.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(write_status, self.cfg.recording.status_path(),
                                    {**self.status(), "state": "stopped"})
        if self.log is not None:
            s = self.stats
            self._event("session_end", fired=s.fired,
                           refused=dict(s.refused), decisions=s.decisions,
                           error=str(self._fatal) if self._fatal else None)
            await asyncio.to_thread(self.log.close)
        if self.rig is not None:
            await self.rig.close_recording()

    # -- thread hand-offs --------------------------------------------------------------
    def _wake_from_thread(self) -> None:
        if not self._wake_pending and self._loop is not None:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._eeg_wake.set)

    # -- the EEG pipeline --------------------------------------------------------------
    async def _eeg_loop(self) -> None:
        try:
            await self._eeg_pipeline()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # in the pulse path: disarm, record, stop visibly
            self._fail(exc)
            raise

    async def _eeg_pipeline(self) -> None:
        cfg = self.cfg
        assert self.eeg is not None and self.eeg.ring is not None and self.tracker is not None
        assert self.stim is not None and self.scheduler is not None
        tracker, stim, scheduler = self.tracker, self.stim, self.scheduler
        self.core = DecisionCore(cfg, tracker, latency_s=stim.latency_s, rng=self._rng)
        if tracker.training_state == "ready":  # a calibrated model file
            self._record_estimator(tracker)
        pipeline = EegPipeline(lambda: self.cfg, tracker, self.core, self.eeg.ring,
                               host=self._hooks, scheduler=scheduler,
                               armed=lambda: stim.armed, unit=self.unit, stats=self.stats,
                               clock=pylsl.local_clock)
        while True:
            await self._eeg_wake.wait()
            self._eeg_wake.clear()
            self._wake_pending = False
            # quiet window: a pulse due within the next update's duration gets the GIL
            # to itself (an update holds it for a few hundred microseconds)
            due = scheduler.next_command_time()
            if due is not None:
                wait = due - pylsl.local_clock() + _QUIET_AFTER_S
                if wait < _QUIET_BEFORE_S:
                    await asyncio.sleep(max(wait, 0.0))
            pipeline.step()

    def _record_estimator(self, tracker: PhaseTracker) -> None:
        """A trained estimator started training, took over, or could not be trained."""
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
        self.stats.estimator = fields
        self._event("phase_estimator", **fields)

    def _record_calibration(self, tracker: PhaseTracker) -> None:
        peak = tracker.peak
        assert peak is not None
        self.stats.calibration = {"peak_hz": peak.peak_hz, "snr_db": round(peak.snr_db, 2),
                                  "band_hz": list(peak.band_hz)}
        self._event("calibrated", **self.stats.calibration)

    # -- outcomes and events (run on the loop) -----------------------------------------
    def _event(self, kind: str, **fields: Any) -> None:
        """Record an event (log, then subscribers); ``lsl_time`` defaults to now."""
        self.bus.emit(kind, **fields)

    def _write_event(self, kind: str, **fields: Any) -> None:
        assert self.log is not None
        self.log.write(kind, **fields)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """From another thread: run ``fn(*args)`` on the loop; an error there is fatal."""
        assert self._loop is not None

        def guarded() -> None:
            try:
                fn(*args)
            except Exception as exc:  # never lost in the loop's default handler
                self._fail(exc)

        self._loop.call_soon_threadsafe(guarded)

    def _on_outcome(self, o: PulseOutcome) -> None:
        if o.times:
            self._record_unit_pulses(o)
        self._top_up_day()
        if not o.fired:
            self.stats.refused[o.reason] += 1
            self._event("pulse_refused", **refusal_fields(o))
            return
        self.units_fired += 1
        if self.protocols is not None:
            self.protocols.unit_fired(o.request.id)
        limit = self.unit.max_units
        if limit is not None and self.units_fired >= limit and self.protocol is None:
            self._event("stimulation_complete", units=self.units_fired, pattern=self.unit.kind,
                        pulses=self.stats.fired)
            self.disarm(by="stimulation_complete")

    def _top_up_day(self) -> None:
        """Reserve the next block of the day's pulses, off the loop, before it is needed."""
        stim = self.stim
        if (stim is None or self._topping_up
                or not stim.gate.needs_credit(self.unit.pulses + 10)):
            return
        assert self._loop is not None
        self._topping_up = True

        async def top_up() -> None:
            try:
                await asyncio.to_thread(stim.gate.top_up, stim.credit_target)
            except ClosedLoopError as exc:
                self._event("fault", error="day_counter", message=(
                    f"{exc}; disarmed (the daily limit could not be kept)"))
                self.disarm(by="day_counter_error")
            finally:
                self._topping_up = False

        self._spawn(top_up())

    def _record_unit_pulses(self, o: PulseOutcome) -> None:
        """One ``pulse`` event per trigger delivered (:mod:`closedloop.control.ledger`)."""
        assert self.stim is not None and self.ledger is not None
        paired = self.stim.paired
        for rec in self.ledger.records(o, paired=paired, intensity_pct=self.stim.intensity_pct):
            if self.protocols is not None:
                self.protocols.pulses_delivered(rec.pulses)
            self.stats.fire_error_ms.add(rec.fire_error_ms)
            fields = rec.fields()
            self.stats.pulses.append(fields)
            self._event("pulse", **fields)
            if self.rig is not None and self.rig.markers is not None:
                self.rig.markers.push(rec.lsl_time, {
                    "event": "pulse", "n": rec.pulse_number, "intensity_pct": rec.intensity_pct,
                    "target_phase_deg": rec.context.get("target_phase_deg")})
        self.stats.fired = self.ledger.fired
        t_mep = mep_time(o, self.unit, paired)
        if self.meps is not None and t_mep is not None:
            self.meps.add_pulse(t_mep, "closedloop", pylsl.local_clock(),
                                decision_id=o.request.id)

    def _on_external_pulse(self, text: str, t: float) -> None:
        now = pylsl.local_clock()
        reason = None
        if not text.strip() or len(text) > _MAX_MARKER_CHARS or not text.isprintable():
            reason = "not a pulse marker (empty, over-long or binary)"
        elif not math.isfinite(t) or abs(now - t) > _MAX_MARKER_AGE_S:
            reason = f"time {t:.3f} is not within {_MAX_MARKER_AGE_S:g} s of now"
        elif t - self._last_external < HARD_MIN_INTERVAL_S:
            reason = "closer than any pulse interval to the previous marker"
        if reason is not None:
            self._event("external_pulse_ignored", pulse_lsl_time=t, marker=text[:80],
                        reason=reason)
            return
        self._last_external = t
        self._event("external_pulse", pulse_lsl_time=t, marker=text[:200])
        if self.meps is not None:
            self.meps.add_pulse(t, "marker", now)

    def _on_stream_event(self, ev: StreamEvent) -> None:
        rec = {"role": ev.role, "at_lsl_time": ev.lsl_time, **ev.detail}
        self.stats.stream_events.append({"kind": ev.kind, **rec})
        self._event(f"stream_{ev.kind}", **rec)
        if ev.kind == "error":
            reader = {"eeg": self.eeg, "emg": self.emg, "pulses": self.pulse_markers}[ev.role]
            err = reader.error if reader is not None and reader.error else ClosedLoopError(
                str(ev.detail))
            if ev.role == "eeg":
                self._fail(err)  # no trustworthy phase without the EEG: stop, visibly
            else:
                # EMG and pulse markers are for measuring, not for firing: carry on without
                # them (MEPs become 'emg_unavailable'), and say so
                self._event("fault", error=type(err).__name__, message=str(err),
                            role=ev.role, action="continuing without this stream")
                if ev.role == "emg" and self.rig is not None:
                    self.rig.emg = None
        elif ev.role == "eeg" and ev.kind == "lost" and self.scheduler is not None:
            self.scheduler.cancel("eeg_lost")
        # no reset on "recovered": the tracker resets on the data's own evidence (a gap in
        # the timestamps, samples lost from the ring), at the same sample as a replay of
        # the recording; a reset here raced with the pipeline and dropped the first
        # samples after a stall (or after a stream that connected before it started)

    # -- what the supervisor asks (closedloop.control.supervisor.Host) ----------------
    def cancel_pending(self, reason: str) -> None:
        """Cancel the pulse the scheduler holds, if any."""
        if self.scheduler is not None:
            self.scheduler.cancel(reason)

    def count_refusal(self, reason: str) -> None:
        self.stats.refused[reason] += 1

    def stop_protocol_if_running(self, by: str) -> None:
        if self.protocol is not None:
            self.stop_protocol(by=by)

    def heap_trimmed(self, ms: float) -> None:
        self.stats.heap_trim_ms.add(ms)

    def write_error(self) -> ClosedLoopError | None:
        """A recording that cannot be written (the service stops on it)."""
        if self.recorder is not None and self.recorder.error is not None:
            return ClosedLoopError(f"recording.xdf: cannot write {self.recorder.path}: "
                                   f"{self.recorder.error}")
        if self.log is not None and self.log.error is not None:
            return ClosedLoopError(f"recording.events: cannot write {self.log.path}: "
                                   f"{self.log.error}")
        return None

    def poll_meps(self) -> None:
        if self.meps is None:
            return
        ring = self.emg.ring if self.emg is not None else None
        for rec in self.meps.poll(ring, pylsl.local_clock()):
            self._record_mep(rec)

    def _record_mep(self, rec: MepRecord) -> None:
        fields = mep_fields(rec)
        self.stats.meps.append(fields)
        self._event("mep", **fields)
        if self.protocols is not None:
            self.protocols.mep(rec, self.cfg.mep.channels[0])


    # -- control: called on the event loop (MQTT control plane, tests) ---------------
    def record(self, kind: str, **fields: Any) -> None:
        """Record an event in the log (and hand it to the listeners)."""
        self._event(kind, **fields)

    def subscribe(self, fn: Listener) -> Unsubscribe:
        """Call ``fn(kind, fields)`` for every recorded event (on the event loop) until the
        returned function is called."""
        return self.bus.subscribe(fn)

    def add_listener(self, fn: Listener) -> None:
        """Subscribe ``fn`` for the whole session."""
        self.bus.subscribe(fn)

    # the rig's parts (None before it is opened)
    @property
    def eeg(self) -> StreamReader | None:
        return self.rig.eeg if self.rig is not None else None

    @property
    def emg(self) -> StreamReader | None:
        return self.rig.emg if self.rig is not None else None

    @property
    def pulse_markers(self) -> MarkerReader | None:
        return self.rig.pulse_markers if self.rig is not None else None

    @property
    def tracker(self) -> PhaseTracker | None:
        return self.rig.tracker if self.rig is not None else None

    @property
    def meps(self) -> MepTracker | None:
        return self.rig.meps if self.rig is not None else None

    @property
    def stim(self) -> GatedStimulator | None:
        return self.rig.stim if self.rig is not None else None

    @property
    def scheduler(self) -> FireScheduler | None:
        return self.rig.scheduler if self.rig is not None else None

    @property
    def recorder(self) -> SessionRecorder | None:
        return self.rig.recorder if self.rig is not None else None

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """The control planes started beside the service."""
        return self._attachments

    @property
    def state(self) -> str:
        """``starting``, ``idle``, ``armed``, ``running`` (a protocol), ``fault``, ``stopped``."""
        if self._fatal is not None:
            return "fault"
        if self._stop is not None and self._stop.is_set():
            return "stopped"
        if not self.ready.is_set() or self.stim is None:
            return "starting"
        if self.protocol is not None:
            return "running"
        return "armed" if self.stim.armed else "idle"

    def _require_operational(self, verb: str) -> None:
        state = self.state
        if state in ("fault", "stopped", "starting"):
            raise ControlError(f"{verb}: refused, the service is {state}"
                               + (f" ({self._fatal})" if self._fatal else ""))
        if self.eeg is None or self.eeg.lost:
            raise ControlError(f"{verb}: refused, the EEG stream is lost")

    def arm(self, *, by: str) -> None:
        """Arm the stimulator (pulses that pass the gate will fire).

        Raises:
            ControlError: faulted, stopping, not ready, or the EEG stream is lost.
        """
        self._require_operational("arm")
        assert self.stim is not None
        try:
            self.stim.arm()
        except StimulatorError as exc:
            raise ControlError(f"arm: refused, {exc}") from exc
        self._event("armed", by=by)

    def disarm(self, *, by: str) -> None:
        """Disarm and cancel any pending pulse; always allowed."""
        if self.stim is not None:
            self.stim.disarm()
        if self.scheduler is not None:
            self.scheduler.cancel("disarmed")
        self._event("disarmed", by=by)

    def apply_settings(self, changes: dict[str, Any], *, by: str) -> dict[str, Any]:
        """Change live settings (see :data:`~closedloop.control.runtime.LIVE_KEYS`).

        Raises:
            ConfigError: naming the bad key; nothing is changed then.
        """
        new = apply_live_settings(self.cfg, changes, source=by)
        self.apply_config(new, by=by)
        return self.settings()

    def apply_config(self, new: Config, *, by: str) -> None:
        """Swap in an already validated config that differs only in live settings."""
        old = self.cfg
        # everything that can be refused is checked before anything changes; the device
        # is the one step that can still fail, and then nothing else has changed
        band_changes = self.tracker is not None and new.phase.band_hz != old.phase.band_hz
        if band_changes and new.phase.band_hz == "auto":
            raise ControlError("band_hz: use the calibrate command to find the band")
        if self.stim is not None and new.stimulator.intensity_pct != old.stimulator.intensity_pct:
            try:
                self.stim.set_intensity(new.stimulator.intensity_pct)
            except StimulatorError as exc:
                raise ControlError(f"intensity_pct: {exc}") from exc
        if band_changes:
            assert self.tracker is not None and new.phase.band_hz != "auto"
            self.tracker.set_band(new.phase.band_hz)
        self.cfg = new
        changed = {k: live_value(new, d) for k, d in LIVE_KEYS.items()
                   if live_value(new, d) != live_value(old, d)}
        self._event("settings_changed", by=by, changes=changed)

    def settings(self) -> dict[str, Any]:
        """The live settings now."""
        out = {}
        for short, dotted in LIVE_KEYS.items():
            value = live_value(self.cfg, dotted)
            out[short] = list(value) if isinstance(value, tuple) else value
        if self.tracker is not None and self.tracker.band is not None:
            out["band_hz"] = list(self.tracker.band)
        return out

    @property
    def protocol(self) -> ProtocolRun | None:
        """The running protocol's state (None: none runs)."""
        return self.protocols.run if self.protocols is not None else None

    def start_protocol(self, name: str, *, pulses: int | None, by: str) -> None:
        """Arm and run a protocol until stopped or ``pulses`` have fired
        (:mod:`closedloop.control.protocols`).

        Raises:
            ControlError: unknown protocol, one already running, not operational, or one
                the stimulation pattern or the streams cannot run.
        """
        if name not in PROTOCOLS:
            raise ControlError(f"protocol: unknown '{name}' (known: {', '.join(PROTOCOLS)})")
        if self.protocol is not None:
            raise ControlError(f"start: protocol '{self.protocol.name}' is running; "
                               "stop it first")
        self._require_operational("start")
        assert self.protocols is not None
        self.protocols.start(name, pulses=pulses, by=by, emg_connected=self.emg is not None,
                             intensity_pct=self.cfg.stimulator.intensity_pct,
                             max_intensity_pct=self.cfg.safety.max_intensity_pct,
                             seed=self.cfg.trigger.seed)

    def stop_protocol(self, *, by: str) -> None:
        """Stop the running protocol (if any) and disarm."""
        if self.protocols is None:
            self.disarm(by=by)
        else:
            self.protocols.stop(by=by)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the service's task group (an error in it stops the service,
        visibly); while stopping, on the loop, and the shutdown waits for it."""
        if self._tasks is not None:
            self._tasks.create_task(coro)
            return
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._result_tasks.add(task)
        task.add_done_callback(self._result_tasks.discard)

    def calibrate(self, *, seconds: float, by: str) -> dict[str, Any]:
        """Find the individual peak in the newest ``seconds`` of EEG and use its band.

        Raises:
            ControlError: not enough data, or not operational.
        """
        self._require_operational("calibrate")
        assert self.tracker is not None
        try:
            peak = self.tracker.calibrate(seconds)
        except ValueError as exc:
            raise ControlError(f"calibrate: {exc}") from exc
        result = {"peak_hz": peak.peak_hz, "snr_db": round(peak.snr_db, 2),
                  "band_hz": list(peak.band_hz), "seconds": seconds}
        self.stats.calibration = result
        self._event("calibrated", by=by, **result)
        return result

    def reload(self, *, by: str) -> dict[str, Any]:
        """Re-read the config file; apply it if only live-settable keys changed.

        Raises:
            ConfigError: the file is invalid (the running config is kept).
            ControlError: keys that need a restart changed (nothing is applied).

        Every refusal (SIGHUP or MQTT alike) is recorded as ``reload_refused`` with the
        reason and ``by`` before it is raised.
        """
        try:
            if not self.config_source or not os.path.exists(self.config_source):
                raise ControlError("reload: the service was not started from a config file")
            new = load_config(self.config_source, self.config_overrides)
            blocked = restart_keys(self.cfg, new)
            if blocked:
                raise ControlError("reload: these keys need a restart: " + ", ".join(blocked))
            self.apply_config(new, by=by)
        except Exception as exc:  # recorded here, raised to the caller
            if self.log is not None:
                self._event("reload_refused", by=by, error=str(exc) or type(exc).__name__)
            raise
        return self.settings()

    def status(self) -> dict[str, Any]:
        """State, stream health, counts, settings: what `status` replies and publishes."""
        now = pylsl.local_clock()

        def stream(reader: StreamReader | MarkerReader | None) -> dict[str, Any] | None:
            if reader is None:
                return None
            age = (now - reader.last_arrival) if reader.last_arrival is not None else None
            return {"name": reader.summary.name if reader.summary else None,
                    "connected": reader.summary is not None, "lost": reader.lost,
                    "last_sample_age_ms": round(age * 1000.0, 1) if age is not None else None}

        s = self.stats
        last = s.pulses[-1]["lsl_time"] if s.pulses else None
        return {
            "state": self.state, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_wall, 1),
            "streams": {"eeg": stream(self.eeg), "emg": stream(self.emg),
                        "pulses": stream(self.pulse_markers)},
            "protocol": self.protocol.summary() if self.protocol is not None else None,
            "counts": {"pulses": s.fired, "decisions": s.decisions,
                       "refused": sum(s.refused.values()), "meps": len(s.meps),
                       "samples_lost": s.samples_lost},
            "last_pulse_lsl_time": last,
            "settings": self.settings(),
            "phase": self._phase_status(),
            "fault": str(self._fatal) if self._fatal else None,
            "stimulator": self.stim.driver.status() if self.stim is not None else None,
            "stimulation": {"pattern": self.unit.kind, "units_fired": self.units_fired,
                            "pulses_today": (self.stim.gate.day_count
                                             if self.stim is not None else None)},
        }

    def _phase_status(self) -> dict[str, Any] | None:
        """The estimator in use, its band and (trained ones) their training and (wiener)
        expected error."""
        tr = self.tracker
        if tr is None:
            return None
        out: dict[str, Any] = {"estimator": type(tr.estimator).__name__ if tr.estimator
                               else None, "tracker": tr.status().state,
                               "band_hz": list(tr.band) if tr.band else None}
        if tr.training_state != "off":
            out["training"] = tr.training_state
            if tr.wiener is not None:
                out["wiener_expected_sd_deg_above_median"] = round(
                    tr.wiener.holdout_sd_deg_above_median, 1)
        return out

    def metrics(self) -> dict[str, Any]:
        """Latency percentiles, phase accuracy proxy, buffer fill, dropped samples."""
        s = self.stats
        ring = self.eeg.ring if self.eeg is not None else None
        fill = None
        if ring is not None:
            fill = round(min(ring.count, ring.capacity) / ring.capacity, 3)
        recent = itertools.islice(reversed(s.pulses), 200)  # no copy of the whole history
        predicted = [p["predicted_phase_deg"] - p["target_phase_deg"] for p in recent]
        return {
            "latency_ms": {"chunk_to_decision": s.chunk_to_decision_ms.summary(),
                           "chunk_to_fire_request": s.chunk_to_handoff_ms.summary(),
                           "fire_error": s.fire_error_ms.summary()},
            "update_cost_us": s.update_cost_us.summary(),
            "predicted_phase_error_deg": circular_stats_deg(predicted),
            "eeg_buffer_fill": fill, "samples_lost": s.samples_lost,
            "pulses": s.fired, "refused": dict(s.refused),
        }


class _Hooks:
    """The service as its rooms see it: the rig's threads (handed over to the loop), the
    EEG pipeline and the protocol runner (closedloop.control.rig.RigHooks,
    .pipeline.Host, .protocols.Host)."""

    def __init__(self, service: ClosedLoopService) -> None:
        self._s = service

    def emit(self, kind: str, **fields: Any) -> None:
        self._s.record(kind, **fields)

    def subscribe(self, fn: Listener) -> Unsubscribe:
        return self._s.subscribe(fn)

    # -- the rig's threads ------------------------------------------------------------
    def wake_eeg(self) -> None:
        self._s._wake_from_thread()

    def stream_event(self, ev: StreamEvent) -> None:
        self._s._call_soon(self._s._on_stream_event, ev)

    def external_pulse(self, text: str, t: float) -> None:
        self._s._call_soon(self._s._on_external_pulse, text, t)

    def driver_fault(self, reason: str) -> None:
        self._s._call_soon(self._s.supervisor.driver_fault, reason)

    def pulse_outcome(self, o: PulseOutcome) -> None:
        self._s._call_soon(self._s._on_outcome, o)

    def pulse_path_error(self, exc: BaseException) -> None:
        self._s._call_soon(self._s._fail, exc)

    # -- the EEG pipeline -------------------------------------------------------------
    def holds(self, now: float) -> bool:
        return self._s.protocols is not None and self._s.protocols.holds(now)

    def reopen_eeg(self) -> None:
        assert self._s.eeg is not None
        self._s.eeg.request_reopen()

    def estimator_changed(self, tracker: PhaseTracker) -> None:
        self._s._record_estimator(tracker)

    def calibrated(self, tracker: PhaseTracker) -> None:
        self._s._record_calibration(tracker)

    # -- the protocol runner ----------------------------------------------------------
    def clock(self) -> float:
        return float(pylsl.local_clock())

    def arm(self, *, by: str) -> None:
        self._s.arm(by=by)

    def disarm(self, *, by: str) -> None:
        self._s.disarm(by=by)

    def set_target_phase(self, deg: float) -> None:
        s = self._s
        s.apply_config(apply_live_settings(s.cfg, {"target_phase_deg": deg},
                                           source="protocol"), by="protocol")
