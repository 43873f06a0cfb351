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

The ``mode`` byte: bits 7–5 model, bit 4 enabled, bits 3–2 waveform, bits 1–0 mode
(0 standard, 1 power, 2 twin, 3 dual). The command codes follow the MAGIC toolbox
(Saatlou et al. 2018) and its Python port MAGICPy; they are tested against the emulator in
``tools/stim_emulator.py``, not yet against a physical MagPro (the train read-back frame
in particular is this project's reading of the protocol).
"""

from __future__ import annotations

from typing import Any

from closedloop.errors import StimulatorError
from closedloop.stim.serial_link import SerialDriver, SerialLink, wire_time_s
from closedloop.stim.ttl import TtlLine

__all__ = ["MagVentureStimulator", "crc8", "frame"]

BAUD = 38400
MODE_STANDARD, MODE_POWER, MODE_TWIN, MODE_DUAL = range(4)
_BURST_INDEX = {2: 3, 3: 2, 4: 1, 5: 0}


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


class MagVentureStimulator(SerialDriver):
    """A MagPro on a serial port (see the module docstring for the protocol)."""

    name = "magventure"
    supports_paired = True
    watch_name = "poll"

    def __init__(self, *, port: str, timeout_s: float = 0.3, poll_s: float = 1.0,
                 trigger: TtlLine | None = None, latency_s: float | None = None) -> None:
        self.link = SerialLink(port, baud=BAUD, timeout_s=timeout_s, what=self.name)
        self.trigger = trigger
        self.trigger_route = f"ttl:{trigger.line}" if trigger is not None else "serial"
        known = trigger.latency_s if trigger is not None else wire_time_s(6, BAUD)
        super().__init__(known if latency_s is None else latency_s)
        self.poll_s = poll_s
        self._state: dict[str, Any] = {}
        self.polls = 0

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
        """Send ``body``; if ``answer_id`` is given, return the first frame with that id."""
        def read(deadline: float) -> bytes:
            while True:
                got = self._read_frame(deadline)
                if got and got[0] == answer_id:
                    return got

        return self.link.transact(frame(body), None if answer_id is None else read)

    def read_status(self) -> dict[str, Any]:
        b = self.request(b"\x00", 0x00)
        if len(b) < 9:
            raise StimulatorError(f"{self.name}: short status frame {b.hex()}")
        mode = b[1]
        st = {"model": mode >> 5, "enabled": bool(mode >> 4 & 1), "waveform": mode >> 2 & 3,
              "mode": mode & 3, "serial_no": int.from_bytes(b[2:5], "big"),
              "temperature_c": b[5], "coil_type": b[6], "amplitude_a": b[7],
              "amplitude_b": b[8]}
        self._state.update(st)
        self._temperature = float(b[5])
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
        return {"model": b[1], "mode": b[2], "current_dir": b[3], "waveform": b[4],
                "burst_index": b[5], "ipi_ms": int.from_bytes(b[6:8], "big") / 10.0,
                "ba_ratio": int.from_bytes(b[8:10], "big") / 100.0}

    # -- Stimulator --------------------------------------------------------------------
    def _handshake(self) -> None:
        self.read_status()

    def _goodbye(self) -> None:
        self.request(b"\x02\x00", None)

    def _watch(self) -> None:  # the status poll
        while not self._stop.wait(self.poll_s):
            try:
                st = self.read_status()
                self.polls += 1
                if self._armed and not st["enabled"]:
                    raise StimulatorError(f"{self.name}: device was disabled (front panel?)")
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
        self.request(bytes([0x01, level]), None)
        got = self.read_status()["amplitude_a"]
        if got != level:
            raise StimulatorError(f"{self.name}: set amplitude {level}% but device reads "
                                  f"{got}%")
        self._intensity = float(level)
        return self._intensity

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        a, b = round(conditioning_pct), round(test_pct)
        ipi = round(isi_ms * 10)
        if not 10 <= ipi <= 1000:
            raise StimulatorError(f"{self.name}: twin-pulse interval {isi_ms:g} ms outside "
                                  "1..100 ms")
        cur = self.read_waveform()
        self.request(bytes([0x09, 0x01, cur["model"], MODE_TWIN, cur["current_dir"],
                            cur["waveform"], cur["burst_index"]]) + _u16(ipi) + _u16(100),
                     None)
        self.request(bytes([0x01, a, b]), None)
        wf, st = self.read_waveform(), self.read_status()
        got = (wf["mode"], round(wf["ipi_ms"] * 10), st["amplitude_a"], st["amplitude_b"])
        if got != (MODE_TWIN, ipi, a, b):
            raise StimulatorError(f"{self.name}: set twin mode A={a}% B={b}% IPI={isi_ms:g} "
                                  f"ms but device reads mode={got[0]} IPI={got[1] / 10:g} ms "
                                  f"A={got[2]}% B={got[3]}%")
        self._intensity = float(max(a, b))

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
        """Set the device's burst (2–5 pulses at ``ipi_ms``) and read it back."""
        if pulses not in _BURST_INDEX:
            raise StimulatorError(f"{self.name}: a burst has 2..5 pulses, not {pulses}")
        cur = self.read_waveform()
        ipi = round(ipi_ms * 10)
        self.request(bytes([0x09, 0x01, cur["model"], cur["mode"], cur["current_dir"],
                            cur["waveform"], _BURST_INDEX[pulses]]) + _u16(ipi) + _u16(100),
                     None)
        wf = self.read_waveform()
        if (wf["burst_index"], round(wf["ipi_ms"] * 10)) != (_BURST_INDEX[pulses], ipi):
            raise StimulatorError(f"{self.name}: set burst {pulses}×{ipi_ms:g} ms but device "
                                  f"reads {wf}")
        return wf

    def _serial_fire(self) -> None:
        self.request(b"\x03\x01", None)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "port": self.link.port, "device": dict(self._state),
                "polls": self.polls}


