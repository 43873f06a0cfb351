"""The closed-loop service's life cycle: open the rig, run the EEG pipeline and the
housekeeping, attach the control planes, and always disarm and flush on the way out.

Threads and their hand-offs (functional core, imperative shell):

- one acquisition thread per LSL stream (:mod:`closedloop.streams.reader`) writes into a
  ring buffer; the EEG's steps the EEG pipeline
  (:class:`~closedloop.control.pipeline.EegPipeline`) on each chunk, where it arrives
  (:mod:`closedloop.control.realtime`), and hands what it said to the event loop;
- the event loop runs the session's records (:mod:`closedloop.control.records`), the
  supervisor's housekeeping and the operator's commands
  (:class:`~closedloop.control.commands.ServiceControl`, the ``api`` the planes hold);
- the fire thread (:mod:`closedloop.stim.scheduler`) lands each pulse at its scheduled
  LSL time through the :class:`~closedloop.stim.gated.GatedStimulator`;
- the event log writes in its own thread.

Safety: the service disarms on shutdown and on any error in the pulse path; a lost EEG
stream cancels a pending pulse, and the gate independently refuses to fire on stale EEG.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pylsl

from closedloop import __version__
from closedloop.blas import single_threaded_blas
from closedloop.config.redact import redacted_config
from closedloop.config.schema import Config
from closedloop.control.api import Attachment, Listener, Unsubscribe
from closedloop.control.bus import EventBus
from closedloop.control.commands import ServiceControl
from closedloop.control.hooks import Hooks
from closedloop.control.protocols import PROTOCOLS, ProtocolRunner
from closedloop.control.realtime import RealtimeStep, start_realtime
from closedloop.control.records import SessionRecords
from closedloop.control.rig import Rig, open_rig
from closedloop.control.stats import ServiceStats
from closedloop.control.supervisor import Supervisor, write_status
from closedloop.errors import ClosedLoopError
from closedloop.recording.events import EventLog
from closedloop.stim.patterns import Unit, unit_for

__all__ = ["PROTOCOLS", "ClosedLoopService", "ServiceStats"]

_GIL_SWITCH_S = 0.0005


class ClosedLoopService:
    """Construct with a validated :class:`Config`, then ``await run(stop_event)``; the
    operator's commands are :attr:`api` (:class:`~closedloop.control.commands.
    ServiceControl`)."""

    def __init__(self, cfg: Config, *, config_source: str = "",
                 config_overrides: tuple[str, ...] = ()) -> None:
        single_threaded_blas()
        self.cfg = cfg
        self.config_source = config_source
        self.config_overrides = config_overrides
        self.stats = ServiceStats()
        self.ready = asyncio.Event()
        self.unit: Unit = unit_for(cfg.stimulation)
        self.started_wall = time.time()
        self.log: EventLog | None = None
        self.bus = EventBus(self._write_event, pylsl.local_clock)
        self.api = ServiceControl(self)
        self.hooks = Hooks(self)
        self.supervisor = Supervisor(self.hooks)
        # the rooms opened by run() (None before)
        self.rig: Rig | None = None
        self.protocols: ProtocolRunner | None = None
        self.records: SessionRecords | None = None
        self.realtime: RealtimeStep | None = None
        self.attachments: tuple[Attachment, ...] = ()  # the control planes started
        self._stop: asyncio.Event | None = None
        self._fatal: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.TaskGroup | None = None  # while running
        self._result_tasks: set[asyncio.Task[None]] = set()  # started while stopping

    # -- life cycle --------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *,
                  attachments: Sequence[Attachment] = ()) -> ServiceStats:
        """Run until ``stop`` is set; always disarm and flush on the way out.

        ``attachments`` (the control planes, :func:`closedloop.mqtt.plane.planes_for`) are
        started with :attr:`api` once the service is ready and stopped first on the way
        out.

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
        self.record("session_start", version=__version__,
                    python=platform.python_version(), liblsl=pylsl.library_version(),
                    host=socket.gethostname(), pid=os.getpid(),
                    config_source=self.config_source, config=redacted_config(cfg))
        try:
            try:
                await self._start()
            except ClosedLoopError as exc:  # recorded (fault, session_end), then raised
                self.fail(exc)
                raise
            self.ready.set()
            self.supervisor.start_watchdog(self._loop)
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg  # background work (day top-ups, protocol results) too
                tasks = [tg.create_task(self.supervisor.run(), name="housekeeping")]
                for attachment in attachments:
                    self.attachments += (attachment,)
                    await attachment.start(self.api)
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
            raise _internal(first) from first
        finally:
            self.supervisor.stop_watchdog()
            await self._shutdown()
            sys.setswitchinterval(old_switch)
        return self.stats

    @property
    def state(self) -> str:
        """``starting``, ``idle``, ``armed``, ``running`` (a protocol), ``fault``, ``stopped``."""
        if self._fatal is not None:
            return "fault"
        if self._stop is not None and self._stop.is_set():
            return "stopped"
        if not self.ready.is_set() or self.rig is None:
            return "starting"
        if self.api.protocol is not None:
            return "running"
        return "armed" if self.rig.stim.armed else "idle"

    @property
    def fault(self) -> BaseException | None:
        """The fault that stopped the service (None: none)."""
        return self._fatal

    def fail(self, exc: BaseException) -> None:
        """A fault that stops the service: disarm at once, record, stop."""
        if self.rig is not None:
            self.rig.stim.disarm()
            self.rig.scheduler.cancel("fault")
        if self._fatal is None:
            self._fatal = exc
        if self.log is not None:
            self.record("fault", error=type(exc).__name__, message=str(exc))
        if self._stop is not None:
            self._stop.set()

    async def _start(self) -> None:
        self.rig = rig = await open_rig(self.cfg, self.unit, self.hooks)
        self.protocols = ProtocolRunner(
            self.hooks, stim=rig.stim, unit=self.unit,
            settle_s=lambda: self.cfg.stimulator.settle_ms / 1000.0, spawn=self.spawn,
            results=self.stats.protocol_results)
        self.records = records = SessionRecords(
            self.hooks, rig, unit=self.unit, stats=self.stats, protocols=self.protocols,
            spawn=self.spawn)
        self.realtime = start_realtime(
            rig, records, self.protocols, cfg=lambda: self.cfg, unit=self.unit,
            stats=self.stats, call_soon=self.call_soon,
            fail=lambda exc: self.fail(_internal(exc)))
        if self.cfg.stimulator.arm_on_start:
            rig.stim.arm()
            self.record("armed", by="arm_on_start")

    async def _shutdown(self) -> None:
        rig = self.rig
        if self.realtime is not None:
            self.realtime.stop()
        if rig is not None:
            rig.stim.disarm()
        for attachment in reversed(self.attachments):
            with contextlib.suppress(Exception):  # a plane's error must not stop the rest
                await attachment.stop()
        if rig is not None:
            rig.scheduler.cancel("shutdown")
            await asyncio.to_thread(rig.scheduler.stop)
            await asyncio.sleep(0)  # deliver outcomes queued by the fire thread
            try:  # the day's reservation not used goes back to the participant's counter
                await asyncio.to_thread(rig.stim.gate.settle)
            except ClosedLoopError as exc:
                self.record("fault", error="day_counter", message=str(exc))
        if self._result_tasks:  # protocol results still being computed
            await asyncio.gather(*self._result_tasks, return_exceptions=True)
        if rig is not None:
            self.record("disarmed", by="shutdown")
        if self.records is not None:
            await self.records.flush_meps()
        if rig is not None:
            await rig.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(write_status, self.cfg.recording.status_path(),
                                    {**self.api.status(), "state": "stopped"})
        s = self.stats
        self.record("session_end", fired=s.fired, refused=dict(s.refused),
                    decisions=s.decisions, error=str(self._fatal) if self._fatal else None)
        assert self.log is not None
        await asyncio.to_thread(self.log.close)
        if rig is not None:
            await rig.close_recording()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the service's task group (an error in it stops the service,
        visibly); while stopping, on the loop, and the shutdown waits for it."""
        if self._tasks is not None:
            self._tasks.create_task(coro)
            return
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._result_tasks.add(task)
        task.add_done_callback(self._result_tasks.discard)

    # -- events ------------------------------------------------------------------------
    def record(self, kind: str, **fields: Any) -> None:
        """Record an event (log, then subscribers); ``lsl_time`` defaults to now."""
        self.bus.emit(kind, **fields)

    def subscribe(self, fn: Listener) -> Unsubscribe:
        """Call ``fn(kind, fields)`` for every recorded event (on the event loop) until the
        returned function is called."""
        return self.bus.subscribe(fn)

    def _write_event(self, kind: str, **fields: Any) -> None:
        assert self.log is not None
        self.log.write(kind, **fields)

    def status_fields(self) -> dict[str, Any]:
        """The service's own part of the status."""
        return {"uptime_s": time.time() - self.started_wall, "pattern": self.unit.kind,
                "units_fired": self.records.units_fired if self.records else 0}

    # -- thread hand-offs --------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """From another thread: run ``fn()`` on the loop; an error there is fatal.
        Nothing once the loop is closed (a thread's last word after the shutdown)."""
        assert self._loop is not None
        if self._loop.is_closed():
            return

        def guarded() -> None:
            try:
                fn()
            except Exception as exc:  # never lost in the loop's default handler
                self.fail(exc)

        self._loop.call_soon_threadsafe(guarded)

    def wake_eeg(self) -> None:
        """From the EEG acquisition thread: new samples are in the ring; the pipeline
        decides on them now, in that thread (:mod:`closedloop.control.realtime`)."""
        realtime = self.realtime
        if realtime is not None:
            realtime.on_data()


def _internal(exc: BaseException) -> ClosedLoopError:
    """An error in the pulse path, as the service reports it (a ClosedLoopError as it is)."""
    if isinstance(exc, ClosedLoopError):
        return exc
    err = ClosedLoopError(f"internal error in the service ({type(exc).__name__}: {exc}); "
                          "disarmed and stopped")
    err.__cause__ = exc
    return err
