"""A simulated stimulator whose "coil" is an LSL marker stream.

Each pulse is pushed on the ``coil_stream`` (a string marker stream carrying the JSON
``{"intensity_pct": ...}``) stamped with the LSL time it leaves the coil. The simulator
(:mod:`closedloop.sim`) listens to that stream and puts a TMS artefact and an MEP into its
EMG at that time, exactly as a real coil would act on a real participant; so the service
and the simulator can run in different processes, as the service and a lab's amplifier do.
"""

from __future__ import annotations

import json
import threading

import pylsl

from closedloop.errors import StimulatorError

__all__ = ["SimulatedStimulator"]


class SimulatedStimulator:
    """Implements :class:`~closedloop.stim.base.Stimulator` with an LSL 'coil'."""

    name = "simulated"

    def __init__(self, *, coil_stream: str, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.coil_stream = coil_stream
        self._outlet: pylsl.StreamOutlet | None = None
        self._armed = False
        self._intensity = 0.0
        self._lock = threading.Lock()
        self.pulses: list[tuple[float, float]] = []  # (lsl_time, intensity_pct)

    def open(self) -> None:
        info = pylsl.StreamInfo(self.coil_stream, "Markers", 1, pylsl.IRREGULAR_RATE,
                                pylsl.cf_string, f"{self.coil_stream}-coil")
        self._outlet = pylsl.StreamOutlet(info)

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

    def set_intensity(self, pct: float) -> None:
        self._intensity = float(pct)

    def fire(self) -> float:
        with self._lock:
            if self._outlet is None:
                raise StimulatorError("simulated stimulator is not open")
            if not self._armed:
                raise StimulatorError("simulated stimulator is not armed")
            t = float(pylsl.local_clock()) + self.latency_s
            self._outlet.push_sample([json.dumps({"intensity_pct": self._intensity})], t)
            self.pulses.append((t, self._intensity))
            return t
