"""The supervisor: the watchdog, the stimulator's faults and reconnection, housekeeping.

- The **watchdog** thread disarms when the event loop has not run for
  ``safety.watchdog_ms`` (the loop beats every :data:`HOUSEKEEPING_S`); the loop then says
  so (``fault``, ``error = "watchdog"``) and stops a running protocol. If the watchdog
  itself fails, it disarms and the service stops: it must not die silently.
- A **stimulator fault** the driver found (a missed keep-alive, a vanished port) disarms,
  cancels the pending pulse, stops a protocol, and the driver is reopened every
  :data:`RECONNECT_S` with its settings restored and read back; arming is allowed again
  only after that (the operator arms).
- **Housekeeping**, every :data:`HOUSEKEEPING_S` on the loop: MEP windows measured, the
  status file written every second (its error said once), the C heap trimmed every minute,
  and a recording that cannot be written stops the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from closedloop.config.schema import Config
from closedloop.control.memory import trim_heap
from closedloop.errors import ClosedLoopError, StimulatorError
from closedloop.recording.events import clean_json
from closedloop.stim.gated import GatedStimulator

__all__ = ["HOUSEKEEPING_S", "RECONNECT_S", "Supervisor", "write_status"]

HOUSEKEEPING_S = 0.01
RECONNECT_S = 5.0  # a faulted stimulator is reopened this often (it stays disarmed)
STATUS_FILE_S = 1.0
TRIM_HEAP_S = 60.0  # freed C heap is given back to the system this often


class Host(Protocol):
    """What the supervisor needs of the service."""

    @property
    def cfg(self) -> Config: ...

    @property
    def stim(self) -> GatedStimulator | None: ...

    def cancel_pending(self, reason: str) -> None: ...

    def record(self, kind: str, **fields: Any) -> None: ...

    def count_refusal(self, reason: str) -> None: ...

    def stop_protocol_if_running(self, by: str) -> None: ...

    def poll_meps(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def write_error(self) -> ClosedLoopError | None:
        """A recording (event log, XDF) that cannot be written."""
        ...

    def fail(self, exc: BaseException) -> None: ...

    def heap_trimmed(self, ms: float) -> None: ...


class Supervisor:
    """Watches the loop and the stimulator; runs housekeeping (:meth:`run`)."""

    def __init__(self, host: Host, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.clock = clock
        self.heartbeat = clock()
        self.watchdog_trip: float | None = None  # how long the loop had stalled
        self.next_reconnect = math.inf
        self.stim_fault: str | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- the watchdog (its own thread) ---------------------------------------------------
    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.heartbeat = self.clock()
        self._thread = threading.Thread(target=self._watchdog, name="watchdog", daemon=True)
        self._thread.start()

    def stop_watchdog(self) -> None:
        self._stop.set()

    def _watchdog(self) -> None:
        try:
            self.watch()
        except Exception as exc:
            stim = self.host.stim
            if stim is not None:
                with contextlib.suppress(Exception):
                    stim.disarm()
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.host.fail, ClosedLoopError(
                    f"the watchdog thread failed ({type(exc).__name__}: {exc}); disarmed"))

    def watch(self) -> None:
        """Until stopped: disarm when the loop's heartbeat is older than the limit."""
        limit = self.host.cfg.safety.watchdog_ms / 1000.0
        while not self._stop.wait(min(0.05, limit / 4)):
            self.check(limit)

    def check(self, limit: float) -> bool:
        """One look at the heartbeat; True when it tripped (and disarmed)."""
        stalled = self.clock() - self.heartbeat
        stim = self.host.stim
        if stalled > limit and stim is not None and stim.armed:
            stim.disarm()
            self.host.cancel_pending("watchdog")
            self.watchdog_trip = stalled
            return True
        return False

    # -- the stimulator's faults ---------------------------------------------------------
    def driver_fault(self, reason: str) -> None:
        """The driver found a fault on its own (on the loop): it is disarmed already."""
        self.stim_fault = reason
        self.host.cancel_pending("stimulator_fault")
        self.host.record("fault", error="stimulator", message=reason,
                       action=f"disarmed; reconnecting every {RECONNECT_S:g} s, arm again "
                              "when it is back")
        self.host.count_refusal("stimulator_fault")
        self.next_reconnect = self.clock() + RECONNECT_S
        self.host.stop_protocol_if_running("stimulator_fault")

    async def reconnect(self) -> None:
        """Close and reopen a faulted driver, restore its settings; the operator arms."""
        stim = self.host.stim
        assert stim is not None
        driver = stim.driver
        self.next_reconnect = self.clock() + RECONNECT_S
        try:
            await asyncio.to_thread(driver.close)
            await asyncio.to_thread(driver.open)
            if stim.paired is not None:
                cond, isi = stim.paired
                await asyncio.to_thread(stim.set_paired, cond, stim.intensity_pct, isi)
            else:
                await asyncio.to_thread(stim.set_intensity, stim.intensity_pct)
            stim.reconnected()  # only now may it be armed again
        except StimulatorError as exc:
            self.host.record("stimulator_reconnect_failed", message=str(exc))
            return
        self.stim_fault = None
        self.next_reconnect = math.inf
        self.host.record("stimulator_reconnected", **driver.status())

    # -- housekeeping (on the loop) ------------------------------------------------------
    async def run(self) -> None:
        host = self.host
        next_status = 0.0
        next_trim = time.monotonic() + TRIM_HEAP_S
        status_error_said = False
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            self.heartbeat = self.clock()
            if self.watchdog_trip is not None:
                host.record("fault", error="watchdog", message=(
                    f"the event loop did not run for at least {self.watchdog_trip * 1e3:.0f} "
                    f"ms (safety.watchdog_ms = {host.cfg.safety.watchdog_ms:g}); disarmed"),
                    action="arm again when the cause is known")
                self.watchdog_trip = None
                host.count_refusal("watchdog")
                host.stop_protocol_if_running("watchdog")
            host.poll_meps()
            if self.clock() >= self.next_reconnect and host.stim is not None:
                await self.reconnect()
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_FILE_S
                error = await asyncio.to_thread(write_status, host.cfg.recording.status_path(),
                                                host.status())
                if error is not None and not status_error_said:
                    status_error_said = True  # once: it would repeat every second
                    host.record("status_file_error", message=error)
            if time.monotonic() >= next_trim:
                next_trim = time.monotonic() + TRIM_HEAP_S
                t0 = time.perf_counter()
                await asyncio.to_thread(trim_heap)
                host.heap_trimmed((time.perf_counter() - t0) * 1000.0)
            failure = host.write_error()
            if failure is not None:
                host.fail(failure)


def write_status(path: str, status: dict[str, Any]) -> str | None:
    """Replace the health summary atomically (a reader never sees half a file).

    Returns:
        None, or the error (the caller records it once).
    """
    status = {**status, "written_wall_time": time.time()}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(clean_json(status), fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        return f"{path}: {exc}"
    return None
