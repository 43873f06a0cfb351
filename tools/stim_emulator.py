#!/usr/bin/env python3
"""Emulators of stimulator serial protocols on a pseudo-terminal pair.

Each emulator opens a pty, serves the device protocol on the master side, and gives the
slave's path (``/dev/pts/N``) to the driver, which opens it through pyserial like a real
port: the whole serial stack is real. They follow the protocols documented in
:mod:`closedloop.stim.magstim` and :mod:`closedloop.stim.magventure`, including device
behaviour a driver must cope with: the Magstim's self-disarm when the keep-alive stops, its
recharge time, error replies, and faults you can inject (``silent``: stops answering,
``bad_crc``: corrupt checksums, ``ignore_writes``: settings silently not applied,
``error_flag``: the device reports an error, :meth:`Emulator.unplug`: the cable is pulled).

The device's own state is what fires, as on a real one: a knob turned on the front panel
(:meth:`MagstimEmulator.turn_knob`, :meth:`MagVentureEmulator.turn_knob`, which on a MagPro
also sends the device's unsolicited amplitude frame), a device left at a high power by the
previous user (``power_a=95`` / ``amplitude_a=95``), a MagPro left in twin or burst mode
(``mode="twin"``, ``waveform="burst"``; ``locked_mode=True``: it does not take a mode
change). Each fire records what it really delivered in ``delivered`` (:class:`Delivery`:
time, power A, power B, pulses).

Rehearse without hardware::

    python tools/stim_emulator.py magstim-200        # prints the port to use
    closedloop stimulator check --driver magstim-200 --port /dev/pts/5 --intensity 40 --fire

Kinds: magstim-200, magstim-bistim, magstim-rapid, magventure, ttl-byte (a serial
trigger box that records the bytes it receives).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import select
import sys
import threading
import time
import tty
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import pylsl

from closedloop.stim.magstim import crc
from closedloop.stim.magventure import crc8
from closedloop.stim.magventure import frame as mv_frame

__all__ = ["Delivery", "MagVentureEmulator", "MagstimEmulator", "TriggerBoxEmulator",
           "make_emulator"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one trigger really delivered: when, at which powers, how many pulses."""

    lsl_time: float
    power_a: int
    power_b: int | None  # the second output, where the mode fires it
    pulses: int


class Emulator:
    """A device on the master side of a fresh pty; ``port`` is what the driver opens."""

    baud = 9600

    def __init__(self, *, wire_delay: bool = False) -> None:
        self.master, self._slave = pty.openpty()
        self._fds_open = True
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self.wire_delay = wire_delay
        self.fault: str | None = None
        self.received = bytearray()
        self.fired: list[float] = []  # LSL times at which pulses left the "coil"
        self.delivered: list[Delivery] = []  # what each of those triggers delivered
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._unplugged = False
        self._thread = threading.Thread(target=self._run, name=type(self).__name__,
                                        daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _close_fds(self) -> None:
        # once only: a descriptor number closed twice may by then belong to another file
        # of the process (an event log, a day counter's lock), which the second close
        # would pull from under it
        with self.lock:
            fds, self._fds_open = (self.master, self._slave) if self._fds_open else (), False
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._close_fds()

    def unplug(self) -> None:
        """Pull the cable: the port vanishes under the driver."""
        self._unplugged = True
        self._stop.set()
        self._thread.join(2.0)
        self._close_fds()

    def send(self, data: bytes) -> None:
        if self.wire_delay:
            time.sleep(len(data) * 10.0 / self.baud)
        os.write(self.master, data)

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.master], [], [], 0.02)
            self.tick()
            if not r:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            t = float(pylsl.local_clock())
            if self.wire_delay:  # the last byte would have arrived this much later
                t += len(data) * 10.0 / self.baud
            with self.lock:
                self.received += data
                self.on_bytes(data, t)

    def tick(self) -> None:
        """Called about every 20 ms: device timers."""

    def on_bytes(self, data: bytes, t: float) -> None:
        raise NotImplementedError


class TriggerBoxEmulator(Emulator):
    """A serial trigger box: each byte sets the output lines; a rising edge is a pulse."""

    baud = 115200

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.level = 0
        self.edges: list[tuple[float, int]] = []

    def on_bytes(self, data: bytes, t: float) -> None:
        for b in data:
            if b and not self.level:
                self.edges.append((t, b))
                self.fired.append(t)
                self.log.append({"event": "edge", "lsl_time": t, "code": b})
            self.level = b


class MagstimEmulator(Emulator):
    """Magstim 200² / BiStim² / Rapid² (see :mod:`closedloop.stim.magstim`)."""

    _DATA_LEN: ClassVar[dict[str, int]] = {"@": 3, "A": 3, "C": 3, "B": 4, "D": 4, "[": 3}

    def __init__(self, model: str = "200", *, unlock_code: str = "", arm_delay_s: float = 0.2,
                 recharge_s: float = 0.0, watchdog_s: float = 1.0,
                 temperature_c: float = 24.0, power_a: int = 30, power_b: int = 30,
                 interval: int = 10, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model
        self.unlock_code = unlock_code
        self.arm_delay_s = arm_delay_s
        self.recharge_s = recharge_s
        self.watchdog_s = watchdog_s
        self.temperature_c = temperature_c
        self.remote = False
        self.armed = False
        self.ready = False
        self.coil_present = True
        self.power_a, self.power_b, self.interval, self.hr = power_a, power_b, interval, False
        self.freq10, self.pulses, self.dur10 = 10, 1, 10
        self.single_pulse = True  # Rapid: single-pulse mode (a train duration of 0)
        self.commands: list[str] = []  # every valid command, e.g. "EA"
        self.buf = bytearray()
        self._armed_at = 0.0
        self._last_valid = time.monotonic()
        self.disarmed_by_watchdog = 0

    def status(self) -> int:
        bits = [not (self.armed or self.ready), self.armed and not self.ready, self.ready,
                self.coil_present, False, self.fault == "error_flag",
                self.fault == "error_flag", self.remote]
        return sum(int(b) << i for i, b in enumerate(bits))

    def tick(self) -> None:
        now = time.monotonic()
        with self.lock:
            if self.armed and not self.ready and now - self._armed_at >= self.arm_delay_s:
                self.ready = True
            if (self.armed or self.ready) and now - self._last_valid > self.watchdog_s:
                self.armed = self.ready = False
                self.remote = False
                self.disarmed_by_watchdog += 1
                self.log.append({"event": "watchdog_disarm"})

    def turn_knob(self, pct: int, output: str = "a") -> None:
        """A power knob on the front panel: output ``a`` or (BiStim) ``b``."""
        with self.lock:
            if output == "a":
                self.power_a = pct
            else:
                self.power_b = pct
            self.log.append({"event": "knob", "output": output, "power": pct})

    def _delivery(self, t: float) -> Delivery:
        if self.model == "bistim":
            if self.interval == 0:  # simultaneous discharge: one pulse from both units
                return Delivery(t, self.power_a, self.power_b, 1)
            if self.power_b == 0:
                return Delivery(t, self.power_a, None, 1)
            return Delivery(t, self.power_a, self.power_b, 2)
        if self.model == "rapid" and not self.single_pulse:
            return Delivery(t, self.power_a, None, self.pulses)
        return Delivery(t, self.power_a, None, 1)

    def _rapid_status(self) -> str:
        return chr(0x10 | (0x08 if self.single_pulse else 0))

    def _length(self, cmd: str) -> int:
        if cmd == "Q" and self.unlock_code:
            return 1 + len(self.unlock_code) + 1
        return 1 + self._DATA_LEN.get(cmd, 1) + 1

    def on_bytes(self, data: bytes, t: float) -> None:
        self.buf += data
        while self.buf:
            cmd = chr(self.buf[0])
            n = self._length(cmd)
            if len(self.buf) < n:
                return
            msg, self.buf = bytes(self.buf[:n]), self.buf[n:]
            reply = self.handle(msg, t)
            if reply is not None and self.fault != "silent":
                if self.fault == "bad_crc":
                    reply = reply[:-1] + bytes([reply[-1] ^ 0x5A])
                self.send(reply)

    def _reply(self, cmd: str, data: str = "", status: int | None = None) -> bytes:
        body = cmd.encode("latin-1") + bytes([self.status() if status is None else status])
        body += data.encode("latin-1")
        return body + bytes([crc(body)])

    def _error(self, cmd: str, what: str) -> bytes:
        body = (cmd + what).encode("latin-1")
        return body + bytes([crc(body)])

    def handle(self, msg: bytes, t: float) -> bytes | None:
        cmd, data = chr(msg[0]), msg[1:-1].decode("latin-1")
        if msg[-1] != crc(msg[:-1]):
            return self._error(cmd, "?")
        self._last_valid = time.monotonic()
        self.commands.append(cmd + data)
        if self.fault == "refuse":
            return self._error(cmd, "S")
        before = self.status()
        if cmd == "Q":
            if self.unlock_code and data != self.unlock_code:
                return self._error(cmd, "?")
            self.remote = True
            return self._reply(cmd)
        if cmd == "R":
            self.remote = self.armed = self.ready = False
            return self._reply(cmd)
        if cmd == "F":
            t10 = round(self.temperature_c * 10)
            return self._reply(cmd, f"{t10:03d}{t10:03d}")
        if cmd == "J" and self.model != "rapid":
            b = self.power_b if self.model == "bistim" else 0
            i = self.interval if self.model == "bistim" else 0
            return self._reply(cmd, f"{self.power_a:03d}{b:03d}{i:03d}")
        if cmd == "\\" and self.model == "rapid":
            return self._reply(cmd, self._rapid_status() + f"{self.power_a:03d}"
                               f"{self.freq10:04d}{self.pulses:04d}{self.dur10:03d}001")
        if cmd == "x" and self.model == "rapid":
            return self._reply(cmd, "\x10\x00\x00")
        if not self.remote:
            return self._error(cmd, "S")
        if cmd == "E":
            if data == "A":
                self.armed = self.ready = False
            elif data == "B":
                if not (self.armed or self.ready):
                    self.armed, self._armed_at = True, time.monotonic()
            elif data == "H":
                if not self.ready:
                    return self._error(cmd, "S")
                self.fired.append(t)
                self.delivered.append(self._delivery(t))
                self.log.append({"event": "fire", "lsl_time": t, "power": self.power_a})
                self.ready = self.recharge_s <= 0
                self._armed_at = time.monotonic() - self.arm_delay_s + self.recharge_s
            else:
                return self._error(cmd, "?")
            return self._reply(cmd, status=before)
        if cmd in "@ACBD[" and not data.isdigit():
            return self._error(cmd, "?")
        if self.fault == "ignore_writes" and cmd in "@ACBD[":
            return self._reply(cmd)
        if cmd == "@":
            if not 0 <= int(data) <= 100:
                return self._error(cmd, "S")
            self.power_a = int(data)
            return self._reply(cmd, status=before)
        if cmd == "A" and self.model == "bistim":
            self.power_b = int(data)
            return self._reply(cmd, status=before)
        if cmd == "C" and self.model == "bistim":
            self.interval = int(data)
            return self._reply(cmd, status=before)
        if cmd in "YZ" and self.model == "bistim":
            if self.armed or self.ready:  # MagPy: not while armed
                return self._error(cmd, "S")
            self.hr = cmd == "Y"
            self.interval = 10  # MagPy: 1 ms (HR) or 10 ms after a change of resolution
            return self._reply(cmd, status=before)
        if cmd in "BD[" and self.model == "rapid":
            v = int(data)
            if cmd == "B":
                self.freq10 = v
            elif cmd == "D":
                self.pulses = v
            else:
                self.dur10 = v
                self.single_pulse = v == 0  # MagPy's rTMSMode: a duration of 0 or not
            return self._reply(cmd, self._rapid_status(), status=before)
        return self._error(cmd, "?")


class MagVentureEmulator(Emulator):
    """MagPro (see :mod:`closedloop.stim.magventure`); writes are never acknowledged."""

    baud = 38400

    MODES: ClassVar[dict[str, int]] = {"standard": 0, "power": 1, "twin": 2, "dual": 3}
    WAVEFORMS: ClassVar[dict[str, int]] = {"monophasic": 0, "biphasic": 1, "half_sine": 2,
                                           "burst": 3}
    _BURST_PULSES: ClassVar[dict[int, int]] = {0: 5, 1: 4, 2: 3, 3: 2}

    def __init__(self, *, temperature_c: int = 25, amplitude_a: int = 0,
                 amplitude_b: int = 0, mode: str = "standard", waveform: str = "biphasic",
                 burst_pulses: int = 2, enabled: bool = False, locked_mode: bool = False,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.enabled = enabled
        self.amp_a, self.amp_b = amplitude_a, amplitude_b
        self.model, self.mode, self.current_dir = 1, self.MODES[mode], 0
        self.waveform = self.WAVEFORMS[waveform]
        self.burst_index = {v: k for k, v in self._BURST_PULSES.items()}[burst_pulses]
        self.ipi10, self.ba100 = 30, 100
        self.train = [10, 10, 1, 10]
        self.temperature_c = temperature_c
        self.locked_mode = locked_mode  # does not take a mode or waveform change
        self.buf = bytearray()
        self.chatty = False  # send a frame of its own before each answer
        self.commands: list[bytes] = []  # every valid frame body received

    def disable_from_panel(self) -> None:
        with self.lock:
            self.enabled = False

    def turn_knob(self, pct: int, output: str = "a") -> None:
        """An amplitude knob on the front panel; the device says so in a frame of its own."""
        with self.lock:
            if output == "a":
                self.amp_a = pct
            else:
                self.amp_b = pct
            self.log.append({"event": "knob", "output": output, "amplitude": pct})
            self.send(mv_frame(bytes([0x01, self.amp_a, self.amp_b, self._mode_byte()])))

    def pulses_per_trigger(self) -> int:
        n = 2 if self.mode in (2, 3) else 1
        if self.waveform == 3:
            n *= self._BURST_PULSES[self.burst_index]
        return n

    def on_bytes(self, data: bytes, t: float) -> None:
        self.buf += data
        while True:
            start = self.buf.find(b"\xfe")
            if start < 0:
                self.buf.clear()
                return
            del self.buf[:start]
            if len(self.buf) < 2 or len(self.buf) < self.buf[1] + 4:
                return
            n = self.buf[1]
            body, check, end = bytes(self.buf[2:2 + n]), self.buf[2 + n], self.buf[3 + n]
            del self.buf[:n + 4]
            if end != 0xFF or check != crc8(body) or not body:
                self.log.append({"event": "bad_frame", "body": body.hex()})
                continue
            self.commands.append(body)
            reply = self.handle(body, t)
            if reply is not None and self.fault != "silent":
                out = mv_frame(reply)
                if self.fault == "bad_crc":
                    out = out[:-2] + bytes([out[-2] ^ 0x5A]) + out[-1:]
                if self.chatty:
                    self.send(mv_frame(bytes([0x01, self.amp_a, self.amp_b, self._mode_byte()])))
                self.send(out)

    def _mode_byte(self) -> int:
        return (self.model << 5 | int(self.enabled) << 4 | self.waveform << 2 | self.mode)

    def handle(self, body: bytes, t: float) -> bytes | None:
        cmd, ignore = body[0], self.fault == "ignore_writes"
        if cmd == 0x00:
            return bytes([0x00, self._mode_byte(), 0x01, 0x23, 0x45, self.temperature_c, 60,
                          self.amp_a, self.amp_b])
        if cmd == 0x01 and len(body) in (2, 3) and not ignore:
            self.amp_a = min(body[1], 100)
            if len(body) == 3:
                self.amp_b = min(body[2], 100)
        elif cmd == 0x02 and len(body) == 2 and not ignore:
            self.enabled = body[1] == 1
        elif cmd == 0x03 and len(body) == 2 and body[1] == 1:
            if self.enabled:
                self.fired.append(t)
                self.delivered.append(Delivery(t, self.amp_a, self.amp_b if self.mode in (2, 3)
                                               else None, self.pulses_per_trigger()))
                self.log.append({"event": "fire", "lsl_time": t, "amplitude": self.amp_a})
        elif cmd == 0x06 and len(body) == 1:
            return b"\x06" + b"".join(v.to_bytes(2, "big") for v in self.train)
        elif cmd == 0x06 and len(body) == 9 and not ignore:
            self.train = [int.from_bytes(body[i:i + 2], "big") for i in (1, 3, 5, 7)]
        elif cmd == 0x09 and len(body) == 11:
            if body[1] == 1 and not ignore and not self.locked_mode:
                (self.model, self.mode, self.current_dir, self.waveform,
                 self.burst_index) = body[2:7]
                self.ipi10 = int.from_bytes(body[7:9], "big")
                self.ba100 = int.from_bytes(body[9:11], "big")
            return bytes([0x09, self.model, self.mode, self.current_dir, self.waveform,
                          self.burst_index]) + self.ipi10.to_bytes(2, "big") + \
                self.ba100.to_bytes(2, "big")
        return None


def make_emulator(kind: str, **kw: Any) -> Emulator:
    """``magstim-200``, ``magstim-bistim``, ``magstim-rapid``, ``magventure``, ``ttl-byte``."""
    if kind.startswith("magstim-"):
        return MagstimEmulator(kind.removeprefix("magstim-"), **kw)
    if kind == "magventure":
        return MagVentureEmulator(**kw)
    if kind == "ttl-byte":
        return TriggerBoxEmulator(**kw)
    raise ValueError(f"unknown emulator {kind!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["magstim-200", "magstim-bistim", "magstim-rapid",
                                     "magventure", "ttl-byte"])
    ap.add_argument("--wire-delay", action="store_true", help="delay replies by their "
                    "transmission time at the device's baud rate")
    ap.add_argument("--unlock-code", default="", help="magstim-rapid: require this code")
    args = ap.parse_args(argv)
    kw: dict[str, Any] = {"wire_delay": args.wire_delay}
    if args.kind == "magstim-rapid" and args.unlock_code:
        kw["unlock_code"] = args.unlock_code
    emu = make_emulator(args.kind, **kw).start()
    print(json.dumps({"emulator": args.kind, "port": emu.port}), flush=True)
    seen = 0
    try:
        while True:
            time.sleep(0.1)
            with emu.lock:
                new = emu.log[seen:]
                seen = len(emu.log)
            for entry in new:
                print(json.dumps(entry), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
