"""MagVenture MagPro (R30, X100...) over its serial port (COM2 on the device).

The protocol (38400 baud, 8N1): a frame is ``FE``, the number of command bytes, the
command bytes, a CRC-8 (Dallas/Maxim, polynomial 0x31 reflected, initial value 0) of the
command bytes, and ``FF``. The device answers in the same framing; it also sends frames of
its own (e.g. when a knob on the front panel is turned), so a reader skips frames it did not
ask for. Writes are **not acknowledged**: after every setting the driver asks for the
status and compares, and a mismatch is an error.

============================  ===============================================
command bytes                 meaning
============================  ===============================================
``00``                        status → ``00 mode sn sn sn temp coil ampA ampB``
``01 A`` / ``01 A B``         amplitude (standard / twin and dual)
``02 01`` / ``02 00``         enable / disable
``03 01``                     single trigger
``06 rr rr pp pp tt tt ii ii`` train: rate ×10, pulses, trains, inter-train ×10 s
``06``                        read the train settings back (same layout)
``09 00 0…``                  read mode, waveform, burst, IPI, B/A ratio
``09 01 model mode dir wave burst ipi ipi ba ba``  set them (IPI ×10 ms)
============================  ===============================================

The ``mode`` byte: bits 7–5 model, bit 4 enabled, bits 3–2 waveform (0 monophasic,
1 biphasic, 2 half sine, 3 biphasic burst), bits 1–0 mode (0 standard, 1 power, 2 twin,
3 dual). The command codes follow the MAGIC toolbox (Saatlou et al. 2018) and its Python
port MAGICPy; they are tested against the emulator in ``tools/stim_emulator.py``, not yet
against a physical MagPro (the train read-back frame in particular is this project's
reading of the protocol).

What a trigger delivers is read back from the device (:meth:`read_device`): amplitudes A
and B and the mode from the status frame, and, where the mode needs them, the burst count
and the interval from the waveform frame (``09``). Twin and dual give 2 pulses per trigger
(A, then B after the IPI); the *Biphasic Burst* waveform gives 2–5 (the burst setting, at
the IPI; MAGIC treats the burst as a waveform: ``setWaveform('BiphasicBurst')``,
``setBurst``). The status poll builds this state every cycle and reports a fault when it
differs from what the driver commanded (a knob turned: ``device changed: ...``). The
frames the device sends when a knob is turned (``01 ampA ampB mode``, MAGIC's amplitude
response) update the cached state whenever the driver reads: every request first takes
what the device sent on its own, and frames skipped while waiting for an answer are read
too; the next poll compares.

**Open** (so every reconnect) disables the device and puts it in standard single-pulse
mode (mode standard, and a burst waveform back to biphasic: 1 pulse per trigger) and reads
that back; a device that does not take it is an open error. Only :meth:`set_paired` (twin)
and :meth:`configure_burst` lead out of it, and :meth:`set_intensity` leads back.

Unsure: MAGIC's get-waveform answer has one more byte after the ``09`` (before the model)
than the layout above, and encodes the IPI and the B/A ratio as indices into tables, not
×10 ms / ×100; this driver and its emulator use the layout above, which is to be checked
against a physical MagPro before the read-back interval is trusted.
"""

from __future__ import annotations

import time
from typing import Any

from closedloop.errors import StimulatorError
from closedloop.stim.base import Commanded, DeviceState
from closedloop.stim.serial_driver import SerialDriver
from closedloop.stim.serial_link import SerialLink, wire_time_s
from closedloop.stim.trigger_line import TriggerLine

__all__ = ["MagVentureStimulator", "crc8", "device_state", "frame"]

BAUD = 38400
MODE_STANDARD, MODE_POWER, MODE_TWIN, MODE_DUAL = range(4)
MODE_NAMES = ("standard", "power", "twin", "dual")
WAVEFORM_MONOPHASIC, WAVEFORM_BIPHASIC, WAVEFORM_HALF_SINE, WAVEFORM_BURST = range(4)
_BURST_INDEX = {2: 3, 3: 2, 4: 1, 5: 0}
_BURST_PULSES = {v: k for k, v in _BURST_INDEX.items()}
AMPLITUDE_FRAME = 0x01  # also what the device sends when a knob is turned


def device_state(st: dict[str, Any], wf: dict[str, Any] | None, *,
                 read_at: float) -> DeviceState:
    """What a trigger delivers, from a status ``st`` and (if needed) a waveform ``wf``.

    Without ``wf`` a burst counts as the most a MagPro gives (5), with no interval.
    """
    mode, burst = st["mode"], st["waveform"] == WAVEFORM_BURST
    two = mode in (MODE_TWIN, MODE_DUAL)
    n = 2 if two else 1
    if burst:
        n *= _BURST_PULSES.get(wf["burst_index"], 5) if wf is not None else 5
    name = MODE_NAMES[mode] if two or not burst else "burst"
    isi = wf["ipi_ms"] if wf is not None and n > 1 else None
    return DeviceState(intensity_pct=float(st["amplitude_a"]),
                       intensity_b_pct=float(st["amplitude_b"]) if two else None,
                       pulses_per_trigger=n, isi_ms=isi, mode=name, source="device",
                       read_at=read_at)


def crc8(data: bytes) -> int:
    """CRC-8 Dallas/Maxim (reflected polynomial 0x8C, initial value 0)."""
    c = 0
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ 0x8C if c & 1 else c >> 1
    return c


def frame(body: bytes) -> bytes:
    """``FE len body crc FF``."""
    return bytes([0xFE, len(body)]) + body + bytes([crc8(body), 0xFF])


def _u16(x: int) -> bytes:
    return bytes([x >> 8 & 0xFF, x & 0xFF])


def _mode_bits(mode: int) -> dict[str, Any]:
    return {"model": mode >> 5, "enabled": bool(mode >> 4 & 1), "waveform": mode >> 2 & 3,
            "mode": mode & 3}


class MagVentureStimulator(SerialDriver):
    """A MagPro on a serial port (see the module docstring for the protocol)."""

    name = "magventure"
    supports_paired = True
    watch_name = "poll"

    def __init__(self, *, port: str, timeout_s: float = 0.3, poll_s: float = 1.0,
                 trigger: TriggerLine | None = None, latency_s: float | None = None) -> None:
        self.link = SerialLink(port, baud=BAUD, timeout_s=timeout_s, what=self.name)
        self.trigger = trigger
        self.trigger_route = f"ttl:{trigger.line}" if trigger is not None else "serial"
        known = trigger.latency_s if trigger is not None else wire_time_s(6, BAUD)
        super().__init__(known if latency_s is None else latency_s)
        self.poll_s = poll_s
        self._state: dict[str, Any] = {}
        self._wave: dict[str, Any] | None = None
        self.polls = 0
        self.unsolicited = 0  # frames the device sent on its own that were read

    # -- protocol ----------------------------------------------------------------------
    def _read_frame(self, deadline: float) -> bytes:
        while self.link.read_exact(1, deadline) != b"\xfe":
            pass  # resynchronise on the start byte
        n = self.link.read_exact(1, deadline)[0]
        rest = self.link.read_exact(n + 2, deadline)
        body, check, end = rest[:n], rest[n], rest[n + 1]
        if end != 0xFF:
            raise StimulatorError(f"{self.name}: frame {body.hex()} does not end in FF")
        if check != crc8(body):
            raise StimulatorError(f"{self.name}: frame {body.hex()} has a bad CRC")
        return body

    def request(self, body: bytes, answer_id: int | None) -> bytes:
        """Send ``body``; if ``answer_id`` is given, return the first frame with that id.

        What the device sent on its own before (a knob turned) is read first, and frames
        skipped while waiting for the answer are taken too: they update the cached state.
        """
        def read(deadline: float) -> bytes:
            while True:
                got = self._read_frame(deadline)
                if got and got[0] == answer_id:
                    return got
                self._take(got)

        with self.link.lock:
            if self.link.is_open:
                self._take_pending(self.link.drain())
            return self.link.transact(frame(body), None if answer_id is None else read)

    def take_pending(self) -> None:
        """Read the frames the device sent on its own (a knob turned) before a fire."""
        with self.link.lock:
            if self.link.is_open:
                self._take_pending(self.link.drain())

    def _take_pending(self, data: bytes) -> None:
        """Take the whole, valid frames in ``data`` (bytes the device sent on its own)."""
        i = 0
        while (i := data.find(b"\xfe", i)) >= 0 and i + 1 < len(data):
            n = data[i + 1]
            end = i + 2 + n + 2
            if end > len(data):
                return
            body = data[i + 2:i + 2 + n]
            if data[end - 1] == 0xFF and data[end - 2] == crc8(body):
                self._take(body)
                i = end
            else:
                i += 1

    def _take(self, body: bytes) -> None:
        """A frame the driver did not ask for: a knob turned updates the cached state."""
        if len(body) >= 4 and body[0] == AMPLITUDE_FRAME and self._state:
            self.unsolicited += 1
            self._state.update(amplitude_a=body[1], amplitude_b=body[2], **_mode_bits(body[3]))
            self._cache()
        elif len(body) >= 9 and body[0] == 0x00:
            self.unsolicited += 1
            self._status_frame(body)

    def _cache(self) -> DeviceState:
        state = device_state(self._state, self._wave, read_at=time.monotonic())
        self._device = state
        return state

    def read_status(self) -> dict[str, Any]:
        b = self.request(b"\x00", 0x00)
        if len(b) < 9:
            raise StimulatorError(f"{self.name}: short status frame {b.hex()}")
        return self._status_frame(b)

    def _status_frame(self, b: bytes) -> dict[str, Any]:
        st = {**_mode_bits(b[1]), "serial_no": int.from_bytes(b[2:5], "big"),
              "temperature_c": b[5], "coil_type": b[6], "amplitude_a": b[7],
              "amplitude_b": b[8]}
        self._state.update(st)
        self._temperature = float(b[5])
        self._cache()
        return st

    def read_train(self) -> dict[str, Any]:
        b = self.request(b"\x06", 0x06)
        if len(b) < 9:
            raise StimulatorError(f"{self.name}: short train frame {b.hex()}")
        v = [int.from_bytes(b[i:i + 2], "big") for i in (1, 3, 5, 7)]
        return {"rate_hz": v[0] / 10.0, "pulses": v[1], "trains": v[2], "iti_s": v[3] / 10.0}

    def read_waveform(self) -> dict[str, Any]:
        b = self.request(b"\x09\x00" + bytes(9), 0x09)
        if len(b) < 10:
            raise StimulatorError(f"{self.name}: short waveform frame {b.hex()}")
        wf = {"model": b[1], "mode": b[2], "current_dir": b[3], "waveform": b[4],
              "burst_index": b[5], "ipi_ms": int.from_bytes(b[6:8], "big") / 10.0,
              "ba_ratio": int.from_bytes(b[8:10], "big") / 100.0}
        self._wave = wf
        return wf

    def read_device(self) -> DeviceState:
        """Status, then the waveform frame when the mode needs it (twin, dual, burst)."""
        st = self.read_status()
        if st["mode"] in (MODE_TWIN, MODE_DUAL) or st["waveform"] == WAVEFORM_BURST:
            self.read_waveform()
        return self._cache()

    def _write_waveform(self, cur: dict[str, Any], *, mode: int, waveform: int,
                        burst_index: int, ipi10: int) -> None:
        self.request(bytes([0x09, 0x01, cur["model"], mode, cur["current_dir"], waveform,
                            burst_index]) + _u16(ipi10) + _u16(100), None)

    def _to_standard(self) -> DeviceState:
        """Standard mode, a burst waveform back to biphasic; read back: 1 pulse a trigger."""
        cur = self.read_waveform()
        before = self.read_device()
        if cur["mode"] != MODE_STANDARD or cur["waveform"] == WAVEFORM_BURST \
                or before.pulses_per_trigger != 1:
            wave = WAVEFORM_BIPHASIC if cur["waveform"] == WAVEFORM_BURST else cur["waveform"]
            self._write_waveform(cur, mode=MODE_STANDARD, waveform=wave,
                                 burst_index=cur["burst_index"],
                                 ipi10=round(cur["ipi_ms"] * 10))
        dev = self.read_device()
        if dev.mode != "standard" or dev.pulses_per_trigger != 1:
            raise StimulatorError(
                f"{self.name}: the device is in {before.mode} mode "
                f"({before.pulses_per_trigger} pulses per trigger) and did not go back to "
                f"standard single-pulse mode: it reads {dev.mode} "
                f"({dev.pulses_per_trigger} pulses per trigger)")
        return dev

    # -- Stimulator --------------------------------------------------------------------
    def _handshake(self) -> None:
        self.read_status()
        self._set_enabled(False)  # it may have been left enabled
        self._to_standard()
        self._commanded = Commanded(self._commanded.intensity_pct, None, 1, "standard")

    def _goodbye(self) -> None:
        self.request(b"\x02\x00", None)

    def _watch(self) -> None:  # the status poll
        while not self._stop.wait(self.poll_s):
            try:
                dev = self.read_device()
                self.polls += 1
                if self._armed and not self._state["enabled"]:
                    raise StimulatorError(f"{self.name}: device was disabled (front panel?)")
                self._watch_seen(dev)  # a mismatch: a fault, and the poll goes on
            except StimulatorError as exc:
                if not self._stop.is_set():
                    self.report_fault(f"status poll: {exc}")
                return

    def _set_enabled(self, on: bool) -> None:
        self.request(b"\x02" + (b"\x01" if on else b"\x00"), None)
        st = self.read_status()
        if st["enabled"] != on:
            raise StimulatorError(f"{self.name}: asked to {'enable' if on else 'disable'} "
                                  "but the device status says otherwise")

    def arm(self) -> None:
        self._set_enabled(True)
        self._armed = True

    def _device_disarm(self) -> None:
        self._set_enabled(False)

    def set_intensity(self, pct: float) -> float:
        level = round(pct)
        if not 0 <= level <= 100:
            raise StimulatorError(f"{self.name}: amplitude {pct:g}% outside 0..100")
        dev = self._device
        if dev is None or dev.mode != "standard" or dev.pulses_per_trigger != 1:
            self._to_standard()
        self._commanded = Commanded(float(level), None, 1, "standard")
        self._intensity = float(level)
        self.request(bytes([0x01, level]), None)
        got = self.read_device().intensity_pct
        if got != level:
            raise StimulatorError(f"{self.name}: set amplitude {level}% but device reads "
                                  f"{got:g}%")
        return self._intensity

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        a, b = round(conditioning_pct), round(test_pct)
        ipi = round(isi_ms * 10)
        if not 10 <= ipi <= 1000:
            raise StimulatorError(f"{self.name}: twin-pulse interval {isi_ms:g} ms outside "
                                  "1..100 ms")
        cur = self.read_waveform()
        wave = WAVEFORM_BIPHASIC if cur["waveform"] == WAVEFORM_BURST else cur["waveform"]
        self._write_waveform(cur, mode=MODE_TWIN, waveform=wave,
                             burst_index=cur["burst_index"], ipi10=ipi)
        self.request(bytes([0x01, a, b]), None)
        self._commanded = Commanded(float(a), float(b), 2, "twin")
        self._intensity = float(max(a, b))
        dev = self.read_device()
        wf = self._wave
        assert wf is not None
        got = (wf["mode"], round(wf["ipi_ms"] * 10), self._state["amplitude_a"],
               self._state["amplitude_b"], dev.pulses_per_trigger)
        if got != (MODE_TWIN, ipi, a, b, 2):
            raise StimulatorError(f"{self.name}: set twin mode A={a}% B={b}% IPI={isi_ms:g} "
                                  f"ms but device reads mode={dev.mode} IPI={got[1] / 10:g} "
                                  f"ms A={got[2]}% B={got[3]}% ({got[4]} pulses per trigger)")

    def configure_train(self, rate_hz: float, pulses: int, trains: int = 1,
                        iti_s: float = 1.0) -> dict[str, Any]:
        """Set the device's internal train (for device-timed rTMS) and read it back."""
        want = (round(rate_hz * 10), pulses, trains, round(iti_s * 10))
        self.request(b"\x06" + b"".join(_u16(v) for v in want), None)
        got = self.read_train()
        back = (round(got["rate_hz"] * 10), got["pulses"], got["trains"],
                round(got["iti_s"] * 10))
        if back != want:
            raise StimulatorError(f"{self.name}: set train {want} but device reads {back}")
        return got

    def configure_burst(self, pulses: int, ipi_ms: float) -> dict[str, Any]:
        """Give each trigger a burst (2–5 pulses at ``ipi_ms``: standard mode, the Biphasic
        Burst waveform) and read it back."""
        if pulses not in _BURST_INDEX:
            raise StimulatorError(f"{self.name}: a burst has 2..5 pulses, not {pulses}")
        cur = self.read_waveform()
        ipi = round(ipi_ms * 10)
        self._write_waveform(cur, mode=MODE_STANDARD, waveform=WAVEFORM_BURST,
                             burst_index=_BURST_INDEX[pulses], ipi10=ipi)
        self._commanded = Commanded(self._commanded.intensity_pct, None, pulses, "burst")
        dev = self.read_device()
        wf = self._wave
        assert wf is not None
        if (wf["burst_index"], round(wf["ipi_ms"] * 10), dev.pulses_per_trigger) != (
                _BURST_INDEX[pulses], ipi, pulses):
            raise StimulatorError(f"{self.name}: set burst {pulses}×{ipi_ms:g} ms but device "
                                  f"reads {dev.mode} ({dev.pulses_per_trigger} pulses per "
                                  f"trigger), {wf}")
        return wf

    def _serial_fire(self) -> None:
        self.request(b"\x03\x01", None)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "port": self.link.port,
                "device_status": dict(self._state), "waveform": dict(self._wave or {}),
                "polls": self.polls, "unsolicited_frames": self.unsolicited}


