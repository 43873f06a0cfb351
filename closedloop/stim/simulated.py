"""A simulated stimulator whose "coil" is an LSL marker stream.

Each pulse is pushed on the ``coil_stream`` (a string marker stream carrying the JSON
``{"intensity_pct": ...}``) stamped with the LSL time it leaves the coil. The simulator
(:mod:`closedloop.sim`) listens to that stream and puts a TMS artefact and an MEP into its
EMG at that time, exactly as a real coil would act on a real participant; so the service
and the simulator can run in different processes, as the service and a lab's amplifier do.

A paired pulse is two markers: the conditioning pulse at the fire time, the test pulse
``isi_ms`` later, each with its own intensity.
"""

from __future__ import annotations

import json
import threading

import pylsl

from closedloop.errors import StimulatorError
from closedloop.stim.base import DriverBase

__all__ = ["SimulatedStimulator"]


class SimulatedStimulator(DriverBase):
    """Implements :class:`~closedloop.stim.base.Stimulator` with an LSL 'coil'."""

    name = "simulated"
    trigger_route = "lsl"
    supports_paired = True

    def __init__(self, *, coil_stream: str, latency_s: float = 0.0) -> None:
        super().__init__(latency_s)
        self.coil_stream = coil_stream
        self._outlet: pylsl.StreamOutlet | None = None
        self._lock = threading.Lock()
        self._paired: tuple[float, float, float] | None = None
        self.pulses: list[tuple[float, float]] = []  # (lsl_time, intensity_pct)

    def open(self) -> None:
        info = pylsl.StreamInfo(self.coil_stream, "Markers", 1, pylsl.IRREGULAR_RATE,
                                pylsl.cf_string, f"{self.coil_stream}-coil")
        self._outlet = pylsl.StreamOutlet(info)
        self.clear_fault()

    def close(self) -> None:
        self.disarm()
        self._outlet = None

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    @property
    def armed(self) -> bool:
        """Whether the (simulated) device would fire."""
        return self._armed

    def set_intensity(self, pct: float) -> float:
        self._intensity = float(pct)
        self._paired = None
        return self._intensity

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        self._paired = (float(conditioning_pct), float(test_pct), float(isi_ms))
        self._intensity = max(conditioning_pct, test_pct)

    def fire(self) -> float:
        with self._lock:
            if self._outlet is None:
                raise StimulatorError("simulated stimulator is not open")
            if not self._armed:
                raise StimulatorError("simulated stimulator is not armed")
            t = float(pylsl.local_clock()) + self.latency_s
            if self._paired is None:
                shots = [(t, self._intensity or 0.0)]
            else:
                cond, test, isi_ms = self._paired
                shots = [(t, cond), (t + isi_ms / 1000.0, test)]
            for when, pct in shots:
                self._outlet.push_sample([json.dumps({"intensity_pct": pct})], when)
                self.pulses.append((when, pct))
            return t
