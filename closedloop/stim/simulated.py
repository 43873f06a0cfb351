"""A simulated stimulator whose "coil" is an LSL marker stream.

Each pulse is pushed on the ``coil_stream`` (a string marker stream carrying the JSON
``{"intensity_pct": ...}``) stamped with the LSL time it leaves the coil. The simulator
(:mod:`closedloop.sim`) listens to that stream and puts a TMS artefact and an MEP into its
EMG at that time, exactly as a real coil would act on a real participant; so the service
and the simulator can run in different processes, as the service and a lab's amplifier do.

A paired pulse is two markers: the conditioning pulse at the fire time, the test pulse
``isi_ms`` later, each with its own intensity.

It simulates a device, not only a coil: the device's own state (output A and B, pulses per
trigger and their spacing) is kept apart from what was commanded, and the front panel can
change it (:meth:`SimulatedStimulator.turn_knob`,
:meth:`SimulatedStimulator.set_front_panel_mode`), as a colleague at the stimulator would.
:meth:`~SimulatedStimulator.fire` delivers at the device's state (a turned knob really fires
at the new power on the coil stream). Reading the simulated device costs nothing, so
:attr:`~SimulatedStimulator.device` is its live state, and a front-panel change that
differs from what was commanded is reported as a fault at once (a real driver's watch
thread sees it at its next read-back).
"""

from __future__ import annotations

import json
import threading
import time

import pylsl

from closedloop.errors import StimulatorError
from closedloop.stim.base import Commanded, DeviceState, DriverBase

__all__ = ["SimulatedStimulator"]


class SimulatedStimulator(DriverBase):
    """Implements :class:`~closedloop.stim.base.Stimulator` with an LSL 'coil'."""

    name = "simulated"
    trigger_route = "lsl"
    supports_paired = True
    intensity_tolerance_pct = 1e-9

    def __init__(self, *, coil_stream: str, latency_s: float = 0.0,
                 initial_pct: float | None = None) -> None:
        super().__init__(latency_s)
        self.coil_stream = coil_stream
        self._outlet: pylsl.StreamOutlet | None = None
        self._lock = threading.Lock()
        # the device's own state: output A, output B, pulses per trigger, their spacing
        self._dev_a = initial_pct
        self._dev_b: float | None = None
        self._dev_pulses = 1
        self._dev_isi_ms: float | None = None
        self.pulses: list[tuple[float, float]] = []  # (lsl_time, intensity_pct)

    # -- the device ----------------------------------------------------------------------
    def _live(self) -> DeviceState:
        n = self._dev_pulses
        b = self._dev_b if n == 2 else None
        mode = "standard" if n == 1 else "paired" if b is not None else "burst"
        return DeviceState(intensity_pct=self._dev_a, intensity_b_pct=b,
                           pulses_per_trigger=n, isi_ms=self._dev_isi_ms if n > 1 else None,
                           mode=mode, source="device", read_at=time.monotonic())

    @property
    def device(self) -> DeviceState:
        """The live state of the simulated device (reading it costs nothing)."""
        state = self._live()
        self._device = state
        return state

    def read_device(self) -> DeviceState:
        return self.device

    def _front_panel_changed(self) -> None:
        self._watch_seen(self.device)

    def turn_knob(self, pct: float, output: str = "a") -> None:
        """Front panel: set output ``a`` or ``b`` on the device."""
        if output not in ("a", "b"):
            raise ValueError(f"output must be 'a' or 'b', not {output!r}")
        with self._lock:
            if output == "a":
                self._dev_a = float(pct)
            else:
                self._dev_b = float(pct)
        self._front_panel_changed()

    def set_front_panel_mode(self, pulses_per_trigger: int, isi_ms: float | None) -> None:
        """Front panel: 1 standard, 2 paired (A then B), N a burst at output A."""
        if pulses_per_trigger < 1:
            raise ValueError("pulses_per_trigger must be >= 1")
        if pulses_per_trigger > 1 and isi_ms is None:
            raise ValueError("isi_ms is needed for more than one pulse per trigger")
        with self._lock:
            self._dev_pulses = pulses_per_trigger
            self._dev_isi_ms = isi_ms if pulses_per_trigger > 1 else None
        self._front_panel_changed()

    def open(self) -> None:
        info = pylsl.StreamInfo(self.coil_stream, "Markers", 1, pylsl.IRREGULAR_RATE,
                                pylsl.cf_string, f"{self.coil_stream}-coil")
        self._outlet = pylsl.StreamOutlet(info)
        self.clear_fault()
        self.read_device()

    def close(self) -> None:
        self.disarm()
        self._outlet = None

    def arm(self) -> None:
        why = self._seen(self.device)
        if why is not None:
            self.report_fault(why)
            raise StimulatorError(f"simulated stimulator: refusing to arm: {why}")
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    @property
    def armed(self) -> bool:
        """Whether the (simulated) device would fire."""
        return self._armed

    def set_intensity(self, pct: float) -> float:
        with self._lock:
            self._dev_a, self._dev_b = float(pct), None
            self._dev_pulses, self._dev_isi_ms = 1, None
            self._intensity = float(pct)
            self._commanded = Commanded(float(pct), None, 1, "standard")
        self.read_device()
        return self._intensity

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        with self._lock:
            self._dev_a, self._dev_b = float(conditioning_pct), float(test_pct)
            self._dev_pulses, self._dev_isi_ms = 2, float(isi_ms)
            self._intensity = float(max(conditioning_pct, test_pct))
            self._commanded = Commanded(float(conditioning_pct), float(test_pct), 2,
                                        "paired")
        self.read_device()

    def fire(self) -> float:
        with self._lock:
            if self._outlet is None:
                raise StimulatorError("simulated stimulator is not open")
            if not self._armed:
                raise StimulatorError("simulated stimulator is not armed")
            t = float(pylsl.local_clock()) + self.latency_s
            a, isi = self._dev_a or 0.0, (self._dev_isi_ms or 0.0) / 1000.0
            if self._dev_pulses == 2 and self._dev_b is not None:
                shots = [(t, a), (t + isi, self._dev_b)]
            else:  # one pulse, or a burst at output A
                shots = [(t + k * isi, a) for k in range(self._dev_pulses)]
            for when, pct in shots:
                self._outlet.push_sample([json.dumps({"intensity_pct": pct})], when)
                self.pulses.append((when, pct))
            return t
