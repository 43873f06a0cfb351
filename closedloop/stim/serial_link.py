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

import serial

from closedloop.errors import StimulatorError

__all__ = ["SerialLink", "wire_time_s"]

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
