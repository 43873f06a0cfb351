"""The only path to a pulse: a driver wrapped by the safety gate and the arm state.

:class:`GatedStimulator` owns the driver. Every pulse goes through :meth:`fire_now`, which,
under one lock, checks the arm state and the :class:`~closedloop.stim.safety.SafetyGate`,
fires, and records the pulse; a refusal is returned as a value with its reason, never
raised and never silent. A driver error disarms.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pylsl

from closedloop.errors import StimulatorError
from closedloop.stim.base import Stimulator
from closedloop.stim.safety import SafetyGate

__all__ = ["FireResult", "GatedStimulator"]


@dataclass(frozen=True, slots=True)
class FireResult:
    """What happened to one request: fired at ``lsl_time``, or refused for ``reason``."""

    fired: bool
    reason: str
    lsl_time: float | None
    command_time: float


class GatedStimulator:
    """A :class:`Stimulator` behind the arm state and the safety gate."""

    def __init__(self, driver: Stimulator, gate: SafetyGate,
                 eeg_age_s: Callable[[], float | None],
                 clock: Callable[[], float] = pylsl.local_clock) -> None:
        self.driver = driver
        self.gate = gate
        self._eeg_age_s = eeg_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._armed = False
        self._intensity = 0.0

    @property
    def latency_s(self) -> float:
        """The driver's known trigger latency."""
        return self.driver.latency_s

    @property
    def armed(self) -> bool:
        """Whether a request may fire at all."""
        return self._armed

    @property
    def intensity_pct(self) -> float:
        """The intensity that was last set."""
        return self._intensity

    def arm(self) -> None:
        """Arm the device; from now on requests that pass the gate fire."""
        with self._lock:
            self.driver.arm()
            self._armed = True

    def disarm(self) -> None:
        """Disarm; safe to call at any time, from any thread, more than once."""
        with self._lock:
            self._armed = False
            self.driver.disarm()

    def set_intensity(self, pct: float) -> None:
        """Set the intensity; a value above the gate's limit is refused, not clamped.

        Raises:
            StimulatorError: the value is beyond the safety limit.
        """
        if not 0.0 <= pct <= self.gate.limits.max_intensity_pct:
            raise StimulatorError(f"intensity {pct:g}% refused: outside 0..."
                                  f"{self.gate.limits.max_intensity_pct:g}% (safety limit)")
        with self._lock:
            self.driver.set_intensity(pct)
            self._intensity = pct

    def fire_now(self) -> FireResult:
        """Check everything and fire one pulse at the set intensity, now."""
        with self._lock:
            t_cmd = self._clock()
            if not self._armed:
                return FireResult(False, "disarmed", None, t_cmd)
            reason = self.gate.check(t=t_cmd + self.driver.latency_s,
                                     intensity_pct=self._intensity, eeg_age_s=self._eeg_age_s())
            if reason is not None:
                return FireResult(False, reason, None, t_cmd)
            try:
                t_pulse = self.driver.fire()
            except Exception as exc:
                self._armed = False
                # the fire error is the one to report; a failing disarm must not hide it
                with contextlib.suppress(Exception):
                    self.driver.disarm()
                raise StimulatorError(f"fire failed, disarmed: {exc}") from exc
            self.gate.commit(t_pulse)
            return FireResult(True, "fired", t_pulse, t_cmd)
