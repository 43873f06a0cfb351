"""One serial port, opened with clear errors, read with deadlines, never left hanging.

Every device driver talks through a :class:`SerialLink`: ``transact`` writes a command and
reads its reply under one lock (the keep-alive thread and the fire path share the port),
with a read deadline, so a device that stops answering is an error after ``timeout_s``,
not a hang. An OS error on the port (the USB adapter unplugged, the cable pulled from a
pseudo-terminal) becomes :class:`~closedloop.errors.StimulatorError` naming the port.
"""

from __future__ import annotations

import contextlib
import termios
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pylsl
import serial

if TYPE_CHECKING:
    from closedloop.stim.ttl import TtlLine

from closedloop.errors import StimulatorError
from closedloop.stim.base import DriverBase

__all__ = ["SerialDriver", "SerialLink", "wire_time_s"]

# what a port that vanished raises (termios.error is not an OSError; pyserial raises
# TypeError when the port is closed under a read by another thread)
_PORT_ERRORS = (serial.SerialException, OSError, termios.error, TypeError)


def wire_time_s(n_bytes: int, baud: int) -> float:
    """Time ``n_bytes`` take on the wire at ``baud`` (8N1: 10 bits a byte)."""
    return n_bytes * 10.0 / baud


class SerialLink:
    """A locked, deadline-bound serial port."""

    def __init__(self, port: str, *, baud: int, timeout_s: float, what: str) -> None:
        self.port = port
        self.baud = baud
        self.timeout_s = timeout_s
        self.what = what
        self.lock = threading.RLock()
        self._ser: serial.Serial | None = None

    @property
    def is_open(self) -> bool:
        return self._ser is not None

    def open(self) -> None:
        try:
            self._ser = serial.Serial(self.port, self.baud, bytesize=serial.EIGHTBITS,
                                      parity=serial.PARITY_NONE,
                                      stopbits=serial.STOPBITS_ONE, timeout=self.timeout_s,
                                      write_timeout=self.timeout_s, exclusive=True)
        except (*_PORT_ERRORS, ValueError) as exc:
            raise StimulatorError(f"{self.what}: cannot open serial port {self.port!r}: "
                                  f"{exc}") from exc
        self._ser.reset_input_buffer()

    def close(self) -> None:
        with self.lock:
            ser, self._ser = self._ser, None
        if ser is not None:  # a vanished port cannot be closed any more cleanly
            with contextlib.suppress(*_PORT_ERRORS):
                ser.close()

    def _port(self) -> serial.Serial:
        if self._ser is None:
            raise StimulatorError(f"{self.what}: serial port {self.port!r} is not open")
        return self._ser

    def _lost(self, exc: BaseException) -> StimulatorError:
        return StimulatorError(f"{self.what}: serial port {self.port!r} failed (unplugged?): "
                               f"{exc}")

    def write(self, data: bytes) -> None:
        """Write and wait until the bytes have left the host."""
        with self.lock:
            ser = self._port()
            try:
                ser.write(data)
                ser.flush()
            except _PORT_ERRORS as exc:
                raise self._lost(exc) from exc

    def read_exact(self, n: int, deadline: float) -> bytes:
        """Read ``n`` bytes or raise after ``deadline`` (time.monotonic)."""
        with self.lock:
            ser = self._port()
            buf = bytearray()
            try:
                while len(buf) < n:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    ser.timeout = left
                    chunk = ser.read(n - len(buf))
                    buf += chunk
            except _PORT_ERRORS as exc:
                raise self._lost(exc) from exc
            if len(buf) < n:
                raise StimulatorError(
                    f"{self.what}: no answer on {self.port!r} within {self.timeout_s:g} s "
                    f"(got {len(buf)} of {n} bytes: {bytes(buf)!r})")
            return bytes(buf)

    def drain(self) -> bytes:
        """What the device sent on its own and is waiting to be read (no waiting)."""
        with self.lock:
            ser = self._port()
            try:
                n = ser.in_waiting
                return ser.read(n) if n else b""
            except _PORT_ERRORS as exc:
                raise self._lost(exc) from exc

    def flush_input(self) -> None:
        with self.lock:
            ser = self._port()
            try:
                ser.reset_input_buffer()
            except _PORT_ERRORS as exc:
                raise self._lost(exc) from exc

    def transact(self, data: bytes, read: Callable[[float], bytes] | None) -> bytes:
        """Write ``data`` then, if ``read`` is given, return ``read(deadline)``."""
        with self.lock:
            self.flush_input()
            self.write(data)
            if read is None:
                return b""
            return read(time.monotonic() + self.timeout_s)

    def set_line(self, line: str, level: bool) -> None:
        """Set the RTS or DTR modem line."""
        with self.lock:
            ser = self._port()
            try:
                if line == "rts":
                    ser.rts = level
                else:
                    ser.dtr = level
            except _PORT_ERRORS as exc:
                raise StimulatorError(
                    f"{self.what}: cannot set {line.upper()} on {self.port!r}: {exc} "
                    "(pseudo-terminals and some USB adapters have no modem lines; use "
                    "line = \"byte\" with a serial trigger box)") from exc


class SerialDriver(DriverBase):
    """What the serial-port drivers share: open with a handshake, a watch thread (keep-alive
    or status poll) that reports a fault, close with a goodbye, optional TTL trigger route.

    Subclasses set ``link`` and ``trigger`` before calling ``super().__init__`` and define
    :meth:`_handshake`, :meth:`_watch` (runs until ``self._stop`` is set), :meth:`_goodbye`,
    :meth:`_device_disarm` and :meth:`_serial_fire`.
    """

    link: SerialLink
    trigger: TtlLine | None
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
