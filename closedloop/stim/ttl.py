"""TTL triggering: a pulse on a hardware line.

Three lines are supported, all through pyserial:

- ``rts`` / ``dtr``: the modem-control line of a serial port (a classic RS-232 port or a
  USB adapter that has them) drives the stimulator's trigger input through a level
  shifter; the edge leaves as soon as the ioctl returns (no wire time).
- ``byte``: a serial trigger box (Brain Products TriggerBox, an Arduino, a Cedrus
  StimTracker...) that sets its output lines to each byte it receives: the code, then 0
  after the pulse width. The pulse leaves one byte's wire time (plus the adapter's USB
  latency, which you measure and add with ``latency_ms``) after the write.

A TTL line cannot set the stimulator's intensity: with the ``ttl`` driver the intensity is
set on the device by hand, and ``[stimulator] intensity_pct`` must say what it is (it is
what the safety gate checks). Nor can it read the device back: the ttl driver's
:class:`~closedloop.stim.base.DeviceState` is the operator's declaration (``source =
"declared"``: the intensity ``set_intensity`` was told, one pulse per trigger), and a
knob turned on the device is not seen. The serial drivers can use a :class:`TtlLine` as their
trigger route (``trigger_port``) while they set intensity and arm over their own port.

- ``parport``: a parallel port's data lines through Linux's ppdev (``/dev/parportN``):
  the code on D0-D7, then 0 after the pulse width; no wire time. This route has not been
  tried on a physical port (none on our machines); opening a missing port is tested.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from typing import Any, Literal

import pylsl

from closedloop.errors import StimulatorError
from closedloop.stim.base import Commanded, DeviceState, DriverBase
from closedloop.stim.serial_link import SerialLink, wire_time_s

__all__ = ["TtlLine", "TtlStimulator"]

Line = Literal["rts", "dtr", "byte", "parport"]

# Linux ppdev ioctls (linux/ppdev.h): _IO('p', 0x8b), _IO('p', 0x8c), _IOW('p', 0x86, char)
_PPCLAIM = 0x708B
_PPRELEASE = 0x708C
_PPWDATA = 0x40017086


class ParallelPort:
    """The data lines of a parallel port, through Linux's ppdev."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        import fcntl  # noqa: PLC0415 - POSIX only

        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise StimulatorError(f"ttl (parport): cannot open {self.path!r}: {exc}") from exc
        try:
            fcntl.ioctl(fd, _PPCLAIM)
        except OSError as exc:
            os.close(fd)
            raise StimulatorError(f"ttl (parport): cannot claim {self.path!r}: {exc}") from exc
        self._fd = fd

    def write(self, value: int) -> None:
        import fcntl  # noqa: PLC0415

        if self._fd is None:
            raise StimulatorError(f"ttl (parport): {self.path!r} is not open")
        try:
            fcntl.ioctl(self._fd, _PPWDATA, struct.pack("B", value))
        except OSError as exc:
            raise StimulatorError(f"ttl (parport): writing {self.path!r} failed: {exc}") from exc

    def close(self) -> None:
        import fcntl  # noqa: PLC0415

        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, _PPRELEASE)
            os.close(fd)


class TtlLine:
    """One trigger line: ``pulse()`` raises it for ``width_s`` and lowers it again."""

    def __init__(self, port: str, *, line: Line, width_s: float, code: int = 1,
                 baud: int = 115200) -> None:
        if line not in ("rts", "dtr", "byte", "parport"):
            raise StimulatorError(f"ttl: line must be rts, dtr, byte or parport, not {line!r}")
        if not 0 < code < 256:
            raise StimulatorError(f"ttl: trigger code must be 1..255, not {code}")
        self.line = line
        self.width_s = width_s
        self.code = code
        self.link = SerialLink(port, baud=baud, timeout_s=0.5, what=f"ttl ({line})")
        self.parport = ParallelPort(port) if line == "parport" else None
        self._lock = threading.Lock()

    @property
    def latency_s(self) -> float:
        """Delay from :meth:`pulse` to the rising edge that is known in advance."""
        return wire_time_s(1, self.link.baud) if self.line == "byte" else 0.0

    @property
    def is_open(self) -> bool:
        return self.parport.is_open if self.parport is not None else self.link.is_open

    def open(self) -> None:
        if self.parport is not None:
            self.parport.open()
        else:
            self.link.open()
        try:
            self._low()
        except StimulatorError:
            self.close()
            raise

    def close(self) -> None:
        if self.is_open:
            with contextlib.suppress(StimulatorError):
                self._low()
        if self.parport is not None:
            self.parport.close()
        else:
            self.link.close()

    def _low(self) -> None:
        if self.parport is not None:
            self.parport.write(0)
        elif self.line == "byte":
            self.link.write(b"\x00")
        else:
            self.link.set_line(self.line, False)

    def pulse(self) -> float:
        """Raise the line, hold it ``width_s``, lower it; return when it was raised."""
        with self._lock:
            t = float(pylsl.local_clock())
            if self.parport is not None:
                self.parport.write(self.code)
            elif self.line == "byte":
                self.link.write(bytes([self.code]))
            else:
                self.link.set_line(self.line, True)
            end = time.perf_counter() + self.width_s
            try:
                while time.perf_counter() < end:
                    time.sleep(0)
            finally:
                self._low()
            return t


class TtlStimulator(DriverBase):
    """A stimulator triggered by a TTL line; arming and intensity are set on the device."""

    name = "ttl"

    def __init__(self, *, port: str, line: Line = "rts", pulse_width_ms: float = 1.0,
                 code: int = 1, latency_s: float | None = None) -> None:
        self.ttl = TtlLine(port, line=line, width_s=pulse_width_ms / 1000.0, code=code)
        super().__init__(self.ttl.latency_s if latency_s is None else latency_s)
        self.trigger_route = f"ttl:{line}"

    def open(self) -> None:
        self.ttl.open()
        self.clear_fault()
        self.read_device()

    def close(self) -> None:
        self._armed = False
        self.ttl.close()

    def read_device(self) -> DeviceState:
        """The operator's declaration (a TTL line cannot read the device): no I/O."""
        state = DeviceState(intensity_pct=self._intensity, intensity_b_pct=None,
                            pulses_per_trigger=1, isi_ms=None, mode="standard",
                            source="declared", read_at=time.monotonic())
        self._device = state
        return state

    def arm(self) -> None:
        if not self.ttl.is_open:
            raise StimulatorError("ttl: not open")
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def set_intensity(self, pct: float) -> float:
        self._intensity = float(pct)  # what the operator set on the device
        self._commanded = Commanded(self._intensity, None, 1, "standard")
        self.read_device()
        return self._intensity

    def fire(self) -> float:
        if not self._armed:
            raise StimulatorError("ttl: not armed")
        try:
            return self.ttl.pulse() + self.latency_s
        except StimulatorError as exc:
            self.report_fault(str(exc))
            raise

    def status(self) -> dict[str, Any]:
        return {**super().status(), "port": self.ttl.link.port,
                "intensity_control": "manual (set on the device)"}
