"""The rig: everything a session opens, in one place, all of it there once opened.

:func:`open_rig` starts the stream readers, waits for the EEG (and the EMG, which may be
missing: MEPs are then unavailable, and it says so), builds the phase tracker and the MEP
tracker, opens the stimulator behind the gate (with the participant's day counter) and
sets its intensities, starts the fire thread, the marker outlet and the session
recorder. If any step fails, what was opened is closed again before the error goes on.
:meth:`Rig.close` closes the streams, the trainer and the stimulator;
:meth:`Rig.close_recording` the session recording, last (it records the session's end).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import pylsl

from closedloop import __version__
from closedloop.config.redact import redacted_config
from closedloop.config.schema import Config
from closedloop.control.api import Listener, Unsubscribe
from closedloop.errors import ClosedLoopError, StimulatorError, StreamNotFoundError
from closedloop.mep.tracker import MepTracker
from closedloop.phase.tracker import PhaseTracker
from closedloop.recording.markers import PulseMarkerOutlet
from closedloop.recording.session import SessionRecorder
from closedloop.stim.day_counter import DayCounter, default_state_dir
from closedloop.stim.factory import make_driver
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import Unit
from closedloop.stim.requests import PulseOutcome
from closedloop.stim.safety import SafetyGate, SafetyLimits
from closedloop.stim.scheduler import FireScheduler
from closedloop.streams.lsl_info import StreamSummary
from closedloop.streams.reader import MarkerReader, StreamEvent, StreamReader

__all__ = ["Rig", "RigHooks", "open_rig", "set_unit_intensities"]


class RigHooks(Protocol):
    """The service's side of the rig's threads (each runs on the thread that calls it
    and must hand over to the event loop itself)."""

    def wake_eeg(self) -> None:
        """New EEG samples are in the ring (acquisition thread): the EEG pipeline steps on
        them there (:mod:`closedloop.control.realtime`)."""
        ...

    def stream_event(self, ev: StreamEvent) -> None: ...

    def external_pulse(self, text: str, t: float) -> None: ...

    def driver_fault(self, reason: str) -> None: ...

    def pulse_outcome(self, o: PulseOutcome) -> None: ...

    def pulse_path_error(self, exc: BaseException) -> None: ...

    def emit(self, kind: str, **fields: Any) -> None:
        """Record an event (on the loop)."""
        ...

    def subscribe(self, fn: Listener) -> Unsubscribe: ...


@dataclass
class Rig:
    """The session's streams, trackers, stimulator and recorders."""

    eeg: StreamReader
    eeg_info: StreamSummary
    emg: StreamReader | None  # None: not configured, or missing at the start
    pulse_markers: MarkerReader | None
    tracker: PhaseTracker
    meps: MepTracker
    day_counter: DayCounter
    stim: GatedStimulator
    scheduler: FireScheduler
    markers: PulseMarkerOutlet | None
    recorder: SessionRecorder | None
    trainer: ThreadPoolExecutor
    # the phase tracker is stepped in the EEG acquisition thread (control.realtime) and
    # calibrated or given a new band by the loop's commands: both hold this lock
    tracker_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    async def close(self) -> None:
        """Stop the readers and the trainer, close the stimulator (the caller has
        disarmed it and stopped the scheduler)."""
        for reader in (self.eeg, self.emg, self.pulse_markers):
            if reader is not None:
                await asyncio.to_thread(reader.stop)
        self.trainer.shutdown(wait=False, cancel_futures=True)
        await _close_driver(self.stim.driver)

    async def close_recording(self) -> None:
        if self.recorder is not None:
            with contextlib.suppress(OSError):  # already reported (recording.xdf fault)
                await asyncio.to_thread(self.recorder.close)


def set_unit_intensities(stim: GatedStimulator, cfg: Config, unit: Unit) -> None:
    """Set the configured intensities of the session's unit (a pair's two, or one)."""
    if unit.paired:
        stim.set_paired(cfg.stimulation.conditioning_pct, cfg.stimulator.intensity_pct,
                        cfg.stimulation.isi_ms)
    else:
        stim.set_intensity(cfg.stimulator.intensity_pct)


def eeg_age(eeg: StreamReader, clock: Callable[[], float] = pylsl.local_clock
            ) -> float | None:
    """How old the newest EEG sample is (None: none, or the stream is lost)."""
    if eeg.lost or eeg.last_arrival is None:
        return None
    return float(clock()) - eeg.last_arrival


async def open_rig(cfg: Config, unit: Unit, hooks: RigHooks) -> Rig:
    """Open everything for a session; on an error, close what was opened and raise it.

    Raises:
        ClosedLoopError: a stream not found, a channel missing, the stimulator or the
            recording that cannot be opened.
    """
    async with contextlib.AsyncExitStack() as undo:
        rig = await _open(cfg, unit, hooks, undo)
        undo.pop_all()  # opened: the rig closes it from now on
        return rig
    raise AssertionError("unreachable")  # (the exit stack does not swallow errors)


async def _open(cfg: Config, unit: Unit, hooks: RigHooks,
                undo: contextlib.AsyncExitStack) -> Rig:
    def stopped(reader: StreamReader | MarkerReader) -> None:
        undo.push_async_callback(asyncio.to_thread, reader.stop)

    eeg = StreamReader(
        role="eeg", selector=cfg.streams.eeg, acquisition=cfg.acquisition,
        required_labels={"phase.channel": [cfg.phase.channel],
                         "phase.reference": list(cfg.phase.reference),
                         **{f"trigger.power_conditions[{k}]":
                            [c for c in (cond.channel, *(cond.reference or ())) if c]
                            for k, cond in enumerate(cfg.trigger.power_conditions)}},
        on_data=hooks.wake_eeg, on_event=hooks.stream_event)
    eeg.start()
    stopped(eeg)
    emg = None
    if cfg.streams.emg is not None:
        emg = StreamReader(role="emg", selector=cfg.streams.emg, acquisition=cfg.acquisition,
                           required_labels={"mep.channels": list(cfg.mep.channels)},
                           on_data=lambda: None, on_event=hooks.stream_event)
        emg.start()
        stopped(emg)
    pulse_markers = None
    if cfg.streams.pulses is not None:
        pulse_markers = MarkerReader(role="pulses", selector=cfg.streams.pulses,
                                     acquisition=cfg.acquisition,
                                     on_marker=hooks.external_pulse,
                                     on_event=hooks.stream_event)
        pulse_markers.start()
        stopped(pulse_markers)
    timeout = cfg.acquisition.resolve_timeout_s
    info = await asyncio.to_thread(eeg.wait_connected, timeout)
    trainer = ThreadPoolExecutor(1, thread_name_prefix="closedloop-train")
    undo.callback(trainer.shutdown, wait=False, cancel_futures=True)
    tracker = PhaseTracker(fs_in=info.rate_hz, labels=info.labels, cfg=cfg.phase,
                           trainer=trainer.submit, conditions=cfg.trigger.power_conditions)
    emg_labels = None
    if emg is not None:
        try:
            emg_labels = (await asyncio.to_thread(emg.wait_connected, timeout)).labels
        except StreamNotFoundError as exc:
            # EMG is not needed to stimulate: carry on, MEPs are marked unavailable
            hooks.emit("stream_missing", role="emg", message=str(exc))
            emg.stop()
            emg = None
    meps = MepTracker(cfg.mep, channels=cfg.mep.channels, labels=emg_labels)
    limits = SafetyLimits.from_config(cfg.safety)
    day = DayCounter(cfg.safety.day_counter_dir or default_state_dir(),
                     cfg.session.participant, limit=limits.max_pulses_per_day)
    driver = make_driver(cfg.stimulator)
    await asyncio.to_thread(driver.open)
    undo.push_async_callback(_close_driver, driver)
    stim = GatedStimulator(driver, SafetyGate(limits, day=day, max_units=unit.max_units),
                           eeg_age_s=lambda: eeg_age(eeg), on_fault=hooks.driver_fault,
                           credit_target=unit.pulses + 20,  # reserved ahead (top-ups)
                           unit_offsets=unit.offsets)
    set_unit_intensities(stim, cfg, unit)
    hooks.emit("stimulator_ready", **driver.status(), pattern=unit.kind,
               pulses_per_unit=unit.pulses, timing=cfg.stimulation.timing)
    scheduler = FireScheduler(stim, max_lateness_s=cfg.trigger.max_lateness_ms / 1000.0,
                              on_outcome=hooks.pulse_outcome, on_error=hooks.pulse_path_error)
    scheduler.start()
    undo.push_async_callback(asyncio.to_thread, scheduler.stop)
    markers = None
    if cfg.recording.marker_stream:
        markers = PulseMarkerOutlet(cfg.recording.marker_stream,
                                    f"closedloop-{socket.gethostname()}-{os.getpid()}")
    hooks.emit("ready", eeg=info.name, eeg_rate_hz=info.rate_hz, eeg_channels=info.n_channels,
               processing_rate_hz=tracker.fs,
               band_hz=list(tracker.band) if tracker.band else "auto")
    recorder = None
    if cfg.recording.xdf:
        try:
            recorder = SessionRecorder(cfg.recording.xdf)
            assert eeg.ring is not None
            recorder.add_stream(1, eeg.ring, info, "EEG")
            if emg is not None and emg.ring is not None and emg.summary:
                recorder.add_stream(2, emg.ring, emg.summary, "EMG")
        except OSError as exc:
            if recorder is not None:
                with contextlib.suppress(OSError):
                    recorder.close()
            raise ClosedLoopError(f"recording.xdf: cannot write {cfg.recording.xdf}: "
                                  f"{exc}") from exc
        hooks.subscribe(recorder.event)
        recorder.event("session_start", {"lsl_time": pylsl.local_clock(),
                                         "version": __version__,
                                         "config": redacted_config(cfg)})
    return Rig(eeg, info, emg, pulse_markers, tracker, meps, day, stim, scheduler, markers,
               recorder, trainer)


async def _close_driver(driver: Any) -> None:
    with contextlib.suppress(StimulatorError):
        await asyncio.to_thread(driver.close)
