"""The base of the serial-port drivers (Magstim, MagVenture): open with a handshake, a
watch thread, close with a goodbye, fire over the port or a trigger line."""

from __future__ import annotations

import contextlib
import threading

import pylsl

from closedloop.errors import StimulatorError
from closedloop.stim.base import DriverBase
from closedloop.stim.serial_link import SerialLink
from closedloop.stim.trigger_line import TriggerLine

__all__ = ["SerialDriver"]


class SerialDriver(DriverBase):
    """What the serial-port drivers share: open with a handshake, a watch thread (keep-alive
    or status poll) that reports a fault, close with a goodbye, optional TTL trigger route.

    Subclasses set ``link`` and ``trigger`` before calling ``super().__init__`` and define
    :meth:`_handshake`, :meth:`_watch` (runs until ``self._stop`` is set), :meth:`_goodbye`,
    :meth:`_device_disarm` and :meth:`_serial_fire`.
    """

    link: SerialLink
    trigger: TriggerLine | None
    watch_name = "watch"

    def __init__(self, latency_s: float) -> None:
        super().__init__(latency_s)
        if self.trigger is None:  # fired over the port the keep-alive shares
            self.fire_lock = self.link.lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _handshake(self) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        raise NotImplementedError

    def _watch_guarded(self) -> None:
        """The watch thread never ends silently: an unexpected error in it (a reply that
        does not parse, a bug) is a fault like a missed keep-alive, and the gate disarms."""
        try:
            self._watch()
        except Exception as exc:
            if not self._stop.is_set():
                self.report_fault(f"{self.watch_name} thread failed: "
                                  f"{type(exc).__name__}: {exc}")

    def _goodbye(self) -> None:
        raise NotImplementedError

    def _device_disarm(self) -> None:
        raise NotImplementedError

    def _serial_fire(self) -> None:
        raise NotImplementedError

    def disarm(self) -> None:
        """Send the device's disarm command whenever the port is open, even in fault.

        A driver in fault (a knob turned, a missed keep-alive) is exactly when the device
        must be disarmed; then an error is suppressed (the fault is already reported),
        otherwise it is reported as a fault.
        """
        self._armed = False
        if not self.link.is_open:
            return
        in_fault = self._fault is not None
        try:
            self._device_disarm()
        except StimulatorError as exc:
            if not in_fault:
                self.report_fault(f"disarm: {exc}")

    def fire(self) -> float:
        """Fire through the TTL route when there is one, else the serial command."""
        if not self._armed:
            raise StimulatorError(f"{self.name}: not armed")
        if self.trigger is not None:
            return self.trigger.pulse() + self.latency_s
        with self.link.lock:  # stamped once the port is ours: when the command leaves
            t = float(pylsl.local_clock())
            try:
                self._serial_fire()
            except StimulatorError as exc:
                self.report_fault(f"fire: {exc}")
                raise
        return t + self.latency_s

    def open(self) -> None:
        self.link.open()
        try:
            self._handshake()
            if self.trigger is not None:
                self.trigger.open()
        except BaseException:
            self.link.close()
            raise
        self.clear_fault()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch_guarded,
                                        name=f"{self.name}-{self.watch_name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        if self.link.is_open:
            with contextlib.suppress(StimulatorError):
                self._goodbye()
        self._armed = False
        self.link.close()
        if self.trigger is not None:
            with contextlib.suppress(StimulatorError):
                self.trigger.close()
