"""Magstim 200², BiStim² and Rapid² over their serial port.

The protocol (9600 baud, 8N1): a command is one ASCII command character, ASCII data (``@``
when there is none) and a CRC byte, the one's complement of the low 8 bits of the sum of
the other bytes. A reply repeats the command character, then the instrument status byte,
then data, then the CRC; an error reply has ``?`` (not understood, or a bad CRC) or ``S``
(not allowed in the current state) where the status byte would be.

==========  =====================================  ===========================
command     meaning                                reply data after the status
==========  =====================================  ===========================
``Q@``      remote control on (also keep-alive)    none
``R@``      remote control off                     none
``EB``      arm                                    none
``EA``      disarm                                 none
``EH``      fire                                   none
``@nnn``    power A, %                             none
``Annn``    power B, % (BiStim)                    none
``Cnnn``    BiStim interval, ms (0.1 ms in HR)     none
``Y@/Z@``   BiStim high-resolution interval on/off none
``J@``      parameters                             9 digits: A, B (or 000), interval
``F@``      coil temperatures, 0.1 °C              6 digits
``\\@``     Rapid parameters                       rapid status, power(3) freq(4)
                                                   pulses(4) duration(3) wait(3)
``Bnnnn``   Rapid frequency, 0.1 Hz                rapid status
``Dnnnn``   Rapid pulses in a train                rapid status
``[nnn``    Rapid train duration, 0.1 s            rapid status
``x@``      Rapid system status (keep-alive when   3 status bytes
            an unlock code is used)
==========  =====================================  ===========================

Instrument status bits (0 = least significant): standby, armed, ready, coil present,
replace coil, error present, error type, remote control.

The device disarms itself when it hears nothing for about a second while armed, so the
driver sends a keep-alive at most every 500 ms from its own thread; a keep-alive without an
answer, an error flag, or a device that has left remote control or disarmed itself is a
fault, and the gate disarms. Every setting is read back and compared.

What the device will deliver is read back, not assumed: a Magstim left at 95 % by the
previous user, or a power knob turned after arming, fires at the device's power. The
driver reads the parameters (``J@``, ``\\@`` on a Rapid) at open, after every setting, in
``arm()`` before the arm command (it refuses to arm when they differ from what it
commanded), and in every keep-alive cycle, after the keep-alive command, from the same
thread; a read-back that differs from what was commanded is a fault (``device changed:
...``) and the gate disarms. Each read-back costs about 15 ms of port time at 9600 baud (3
bytes out, 12 back), taken from the keep-alive thread while the fire path waits for the
port lock; a knob turned between two read-backs is not seen until the next one (at most
one keep-alive period, 500 ms by default, plus the read). Open also disarms the device
(``EA``: it may have been left armed) and, on a BiStim, selects the low-resolution interval
(``Z@``): the ``J@`` interval does not say its unit and the resolution cannot be read
back, so the driver sets it (the device then resets its interval to 10 ms, MagPy).

Pulses per trigger, as MagPy models the devices (``magpy/magstim.py``: ``BiStim`` and
``Rapid``; N. McNair):

- 200²: one pulse at power A.
- BiStim²: an interval of 0 is *simultaneous discharge* (both units into the coil at once:
  one pulse, stronger than a 200²'s at the same %); an interval above 0 is *BiStim mode*:
  A at the trigger, B the interval later (``paired``, 2 pulses). MagPy does not say what B
  at 0 % does; this driver reads it as one pulse at A (``standard``), and
  ``set_intensity`` sets B to 0 for that reason. In high-resolution mode the interval is
  in 0.1 ms.
- Rapid²: in single-pulse mode (bit 3 of the Rapid status byte) one pulse; otherwise
  (rTMS mode, entered by a non-zero train duration) a trigger gives the train: the set
  number of pulses at the set frequency (``train``).

These command codes follow the protocol as implemented by MagPy (N. McNair) and the
Magstim serial documentation it cites; they are tested against the emulator in
``tools/stim_emulator.py``, not yet against a physical Rapid².
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Literal

from closedloop.errors import StimulatorError
from closedloop.stim.base import Commanded, DeviceState
from closedloop.stim.serial_driver import SerialDriver
from closedloop.stim.serial_link import SerialLink, wire_time_s
from closedloop.stim.trigger_line import TriggerLine

__all__ = ["MagstimStimulator", "crc", "frame"]

Model = Literal["200", "bistim", "rapid"]

BAUD = 9600
STANDBY, ARMED, READY, COIL_PRESENT, REPLACE_COIL, ERROR, ERROR_TYPE, REMOTE = range(8)
RAPID_SINGLE_PULSE = 3  # bit of the Rapid status byte (MagPy: singlePulseMode)
_MAX_KEEPALIVE_S = 0.5
_TEMPERATURE_EVERY_S = 5.0
# reply data bytes between the status byte and the CRC
_DATA_LEN = {"Q": 0, "R": 0, "E": 0, "@": 0, "A": 0, "C": 0, "Y": 0, "Z": 0,
             "J": 9, "F": 6, "\\": 18, "B": 1, "D": 1, "[": 1, "x": 3}


def crc(data: bytes) -> int:
    """One's complement of the low 8 bits of the byte sum."""
    return (~sum(data)) & 0xFF


def frame(command: str, data: str = "@") -> bytes:
    """A command ready to write: command, data, CRC."""
    body = (command + data).encode("latin-1")
    return body + bytes([crc(body)])


def _bit(status: int, bit: int) -> bool:
    return bool(status >> bit & 1)


class MagstimStimulator(SerialDriver):
    """A Magstim on a serial port (see the module docstring for the protocol)."""

    watch_name = "keepalive"

    def __init__(self, *, port: str, model: Model = "200", keepalive_s: float = 0.5,
                 timeout_s: float = 0.3, unlock_code: str = "",
                 trigger: TriggerLine | None = None, latency_s: float | None = None) -> None:
        if not 0.05 <= keepalive_s <= _MAX_KEEPALIVE_S:
            raise StimulatorError(f"magstim: keepalive_s must be 0.05..{_MAX_KEEPALIVE_S}")
        self.model = model
        self.name = f"magstim-{model}"
        self.supports_paired = model == "bistim"
        self.link = SerialLink(port, baud=BAUD, timeout_s=timeout_s, what=self.name)
        self.trigger = trigger
        self.trigger_route = f"ttl:{trigger.line}" if trigger is not None else "serial"
        known = trigger.latency_s if trigger is not None else wire_time_s(3, BAUD)
        super().__init__(known if latency_s is None else latency_s)
        self.keepalive_s = keepalive_s
        self.unlock_code = unlock_code
        self._status = 0
        self._params: dict[str, Any] = {}
        self._hr = False  # BiStim high-resolution interval (set at open, not readable)
        self.keepalives = 0

    # -- protocol ----------------------------------------------------------------------
    def command(self, cmd: str, data: str = "@") -> tuple[int, str]:
        """Send one command; return (status byte, reply data); raise on an error reply."""
        def read(deadline: float) -> bytes:
            head = self.link.read_exact(2, deadline)
            if head[:1] == b"?":
                raise StimulatorError(f"{self.name}: command {cmd!r} not recognised")
            if head[1:2] in (b"?", b"S"):
                self.link.read_exact(1, deadline)
                what = ("not understood or bad checksum" if head[1:2] == b"?"
                        else "not allowed in the current state")
                raise StimulatorError(f"{self.name}: command {cmd}{data} refused: {what}")
            return head + self.link.read_exact(_DATA_LEN[cmd] + 1, deadline)

        reply = self.link.transact(frame(cmd, data), read)
        if reply[0:1] != cmd.encode("latin-1"):
            raise StimulatorError(f"{self.name}: reply {reply!r} does not answer {cmd!r}")
        if reply[-1] != crc(reply[:-1]):
            raise StimulatorError(f"{self.name}: reply {reply!r} has a bad checksum")
        self._status = reply[1]
        return reply[1], reply[2:-1].decode("latin-1")

    def _remote_command(self) -> tuple[str, str]:
        return ("Q", self.unlock_code) if self.unlock_code else ("Q", "@")

    def _keepalive_command(self) -> tuple[str, str]:
        return ("x", "@") if self.model == "rapid" and self.unlock_code else ("Q", "@")

    def read_parameters(self) -> dict[str, Any]:
        """Read the device's settings (``J@``, or ``\\@`` on a Rapid); cache the state."""
        try:
            if self.model == "rapid":
                _, d = self.command("\\")
                p: dict[str, Any] = {
                    "single_pulse": bool(ord(d[0]) >> RAPID_SINGLE_PULSE & 1),
                    "power_a": int(d[1:4]), "frequency_hz": int(d[4:8]) / 10.0,
                    "train_pulses": int(d[8:12]), "train_duration_s": int(d[12:15]) / 10.0}
            else:
                _, d = self.command("J")
                p = {"power_a": int(d[0:3])}
                if self.model == "bistim":
                    p.update(power_b=int(d[3:6]), interval=int(d[6:9]))
        except ValueError as exc:
            raise StimulatorError(f"{self.name}: parameters reply is not numbers: "
                                  f"{exc}") from exc
        self._params = p
        self._device = self._state(p)
        return p

    def _state(self, p: dict[str, Any]) -> DeviceState:
        """What a trigger delivers with parameters ``p`` (see the module docstring)."""
        a = float(p["power_a"])
        now = time.monotonic()
        if self.model == "bistim":
            b, interval = float(p["power_b"]), int(p["interval"])
            if interval == 0:
                return DeviceState(a, b, 1, None, "simultaneous", "device", now)
            if b == 0:
                return DeviceState(a, None, 1, None, "standard", "device", now)
            return DeviceState(a, b, 2, interval / 10.0 if self._hr else float(interval),
                               "paired", "device", now)
        if self.model == "rapid" and not p["single_pulse"]:
            n, f = int(p["train_pulses"]), float(p["frequency_hz"])
            period = 1000.0 / f if f > 0 and n > 1 else None
            return DeviceState(a, None, max(n, 1), period, "train", "device", now)
        return DeviceState(a, None, 1, None, "standard", "device", now)

    def read_device(self) -> DeviceState:
        self.read_parameters()
        assert self._device is not None
        return self._device

    def read_temperature(self) -> float:
        """The hotter coil's temperature, °C."""
        _, d = self.command("F")
        t = max(int(d[0:3]), int(d[3:6])) / 10.0
        self._temperature = t
        return t

    def _check_status(self, status: int) -> None:
        if _bit(status, ERROR):
            kind = "coil or system" if _bit(status, ERROR_TYPE) else "general"
            raise StimulatorError(f"{self.name}: device reports a {kind} error "
                                  f"(status 0x{status:02x})")
        if not _bit(status, REMOTE):
            raise StimulatorError(f"{self.name}: device is not under remote control")
        if not _bit(status, COIL_PRESENT):
            raise StimulatorError(f"{self.name}: no coil connected")

    # -- Stimulator --------------------------------------------------------------------
    def _handshake(self) -> None:
        status, _ = self.command(*self._remote_command())
        self._check_status(status)
        self.command("E", "A")  # it may have been left armed
        if self.model == "bistim":
            self.command("Z")  # a known interval unit (it cannot be read back)
            self._hr = False
        self.read_parameters()
        self.read_temperature()

    def _goodbye(self) -> None:
        with contextlib.suppress(StimulatorError):
            self.command("E", "A")
        self.command("R")

    def _watch(self) -> None:  # the keep-alive, then the parameters read back
        last_temp = time.monotonic()
        while not self._stop.wait(min(0.1, self.keepalive_s) if self._armed and not
                                  _bit(self._status, READY) else self.keepalive_s):
            try:
                status, _ = self.command(*self._keepalive_command())
                self.keepalives += 1
                self._check_status(status)
                if self._armed and not (_bit(status, ARMED) or _bit(status, READY)):
                    raise StimulatorError(f"{self.name}: device disarmed itself")
                self._watch_seen(self.read_device())  # a mismatch: a fault, keep going
                if time.monotonic() - last_temp >= _TEMPERATURE_EVERY_S:
                    last_temp = time.monotonic()
                    self.read_temperature()
            except StimulatorError as exc:
                if not self._stop.is_set():
                    self.report_fault(f"keep-alive: {exc}")
                return

    @property
    def ready(self) -> bool:
        return (self._armed and self._fault is None and _bit(self._status, READY))

    def arm(self) -> None:
        why = self._seen(self.read_device())
        if why is not None:
            self.report_fault(why)
            raise StimulatorError(f"{self.name}: refusing to arm: {why}")
        status, _ = self.command("E", "B")
        self._check_status(status)
        self._armed = True

    def _device_disarm(self) -> None:
        self.command("E", "A")

    def set_intensity(self, pct: float) -> float:
        level = round(pct)
        if not 0 <= level <= 100:
            raise StimulatorError(f"{self.name}: power {pct:g}% outside 0..100")
        self.command("@", f"{level:03d}")
        if self.model == "bistim":  # B at 0 %: one pulse at A (see the module docstring)
            self.command("A", "000")
            self._commanded = Commanded(float(level), None, 1, "standard")
        elif self.model == "rapid":  # the train setting is left as it was
            self._commanded = dataclasses.replace(self._commanded,
                                                  intensity_pct=float(level))
        else:
            self._commanded = Commanded(float(level), None, 1, "standard")
        self._intensity = float(level)
        p = self.read_parameters()
        got = p["power_a"]
        if got != level:
            raise StimulatorError(f"{self.name}: set power {level}% but device reads {got}%")
        if self.model == "bistim" and p["power_b"] != 0:
            raise StimulatorError(f"{self.name}: set power B 0% (one pulse per trigger) but "
                                  f"device reads {p['power_b']}%")
        return self._intensity

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        if self.model != "bistim":
            super().set_paired(conditioning_pct, test_pct, isi_ms)
        a, b = round(conditioning_pct), round(test_pct)
        hr = abs(isi_ms - round(isi_ms)) > 1e-9
        value = round(isi_ms * 10) if hr else round(isi_ms)
        if not 1 <= value <= 999:
            raise StimulatorError(f"{self.name}: interval {isi_ms:g} ms outside "
                                  f"{'0.1..99.9' if hr else '1..999'} ms")
        self.command("Y" if hr else "Z")
        self._hr = hr
        self.command("@", f"{a:03d}")
        self.command("A", f"{b:03d}")
        self.command("C", f"{value:03d}")
        self._commanded = Commanded(float(a), float(b), 2, "paired")
        self._intensity = float(max(a, b))
        p = self.read_parameters()
        if (p["power_a"], p["power_b"], p["interval"]) != (a, b, value):
            raise StimulatorError(f"{self.name}: set A={a}% B={b}% interval={value} but "
                                  f"device reads {p}")

    def configure_train(self, frequency_hz: float, pulses: int) -> dict[str, Any]:
        """Rapid only: set the device's internal train and read it back."""
        if self.model != "rapid":
            raise StimulatorError(f"{self.name}: only a Rapid has train settings")
        duration = round(pulses / frequency_hz * 10)
        want = (round(frequency_hz * 10), pulses, duration)
        self.command("B", f"{want[0]:04d}")
        self.command("D", f"{want[1]:04d}")
        self.command("[", f"{want[2]:03d}")
        self._commanded = dataclasses.replace(self._commanded, pulses_per_trigger=pulses,
                                              mode="train")
        p = self.read_parameters()
        got = (round(p["frequency_hz"] * 10), p["train_pulses"],
               round(p["train_duration_s"] * 10))
        if got != want:
            raise StimulatorError(f"{self.name}: set train {want} but device reads {got}")
        return p

    def _serial_fire(self) -> None:
        self.command("E", "H")

    def fire(self) -> float:
        t = super().fire()
        self._status &= ~(1 << READY)  # recharging: ready again when the device says so
        return t

    def status(self) -> dict[str, Any]:
        s = self._status
        return {**super().status(), "port": self.link.port, "model": self.model,
                "device_status": {"standby": _bit(s, STANDBY), "armed": _bit(s, ARMED),
                                  "ready": _bit(s, READY), "coil_present": _bit(s, COIL_PRESENT),
                                  "replace_coil": _bit(s, REPLACE_COIL),
                                  "error": _bit(s, ERROR), "remote": _bit(s, REMOTE)},
                "parameters": dict(self._params), "keepalives": self.keepalives}
