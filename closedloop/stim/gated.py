"""The only path to a pulse: a driver wrapped by the safety gate and the arm state.

:class:`GatedStimulator` owns the driver. Every pulse goes through :meth:`fire_now`, which,
under one lock, checks the arm state, the device (a fault it reported, its readiness, its
coil temperature) and the :class:`~closedloop.stim.safety.SafetyGate`, fires, and records
the pulse; a refusal is returned as a value with its reason, never raised and never
silent. A driver error disarms, and so does a fault the driver finds on its own (a missed
keep-alive, a vanished port): the gate is told through the driver's fault handler. A
device error while firing (a :class:`StimulatorError`) ends as the refusal
``fire_failed`` (counted against the limits: the pulse may have left) and a driver fault;
any other exception in the pulse path is a bug and propagates (the service stops).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
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
                 clock: Callable[[], float] = pylsl.local_clock,
                 on_fault: Callable[[str], None] | None = None) -> None:
        self.driver = driver
        self.gate = gate
        self._eeg_age_s = eeg_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._armed = False
        self._intensity = 0.0
        self._paired: tuple[float, float] | None = None  # (conditioning %, isi ms)
        self._on_fault = on_fault
        driver.set_fault_handler(self._driver_fault)

    def _driver_fault(self, reason: str) -> None:
        # called from a driver thread: disarm without waiting on a fire in progress
        self._armed = False
        if self._on_fault is not None:
            self._on_fault(reason)

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
        """The (test) intensity that was last set."""
        return self._intensity

    @property
    def paired(self) -> tuple[float, float] | None:
        """(conditioning %, interval ms) when each trigger gives a paired pulse."""
        return self._paired

    def arm(self) -> None:
        """Arm the device; from now on requests that pass the gate fire."""
        with self._lock:
            if self.driver.fault is not None:
                raise StimulatorError(f"cannot arm: {self.driver.fault}")
            self.driver.arm()
            self._armed = True

    def disarm(self) -> None:
        """Disarm; safe to call at any time, from any thread, more than once."""
        self._armed = False
        with self._lock:
            self._armed = False
            self.driver.disarm()

    def _check_pct(self, pct: float) -> None:
        limit = self.gate.limits.max_intensity_pct
        if not (math.isfinite(pct) and 0.0 <= pct <= limit):
            raise StimulatorError(f"intensity {pct:g}% refused: outside 0...{limit:g}% "
                                  "(safety limit)")

    def _applied(self, got: float) -> None:
        if got > self.gate.limits.max_intensity_pct:  # a driver that rounded up past it
            self._armed = False
            with contextlib.suppress(Exception):
                self.driver.disarm()
            raise StimulatorError(f"device set to {got:g}%, above the safety limit: disarmed")

    def set_intensity(self, pct: float) -> None:
        """Set the (test) intensity; a value above the gate's limit is refused, not clamped.

        Raises:
            StimulatorError: the value is beyond the safety limit, or the device did not
                take it.
        """
        self._check_pct(pct)
        with self._lock:
            if self._paired is not None:
                cond, isi = self._paired
                self.driver.set_paired(cond, pct, isi)
                self._intensity = float(pct)
                return
            got = self.driver.set_intensity(pct)
            self._applied(got)
            self._intensity = got

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        """From now on each trigger gives a conditioning pulse, then the test pulse."""
        self._check_pct(conditioning_pct)
        self._check_pct(test_pct)
        with self._lock:
            self.driver.set_paired(conditioning_pct, test_pct, isi_ms)
            self._paired = (float(conditioning_pct), float(isi_ms))
            self._intensity = float(test_pct)

    def _device_reason(self) -> str | None:
        drv = self.driver
        if drv.fault is not None:
            return "device_fault"
        temp = drv.coil_temperature_c
        if temp is not None and temp > self.gate.limits.max_coil_temp_c:
            return "safety:coil_temperature"
        if not drv.ready:
            return "device_not_ready"
        return None

    def fire_now(self, *, offsets: Sequence[float] = (0.0,), index: int = 0,
                 planned: float | None = None,
                 max_lateness_s: float = math.inf) -> FireResult:
        """Check everything and fire one trigger at the set intensity, now.

        For a unit of several triggers (``offsets``), the first (``index`` 0) is checked
        for the whole unit; later ones must be on time (``planned`` ± ``max_lateness_s``).
        """
        with self._lock:
            t_cmd = self._clock()
            if not self._armed:
                return FireResult(False, "disarmed", None, t_cmd)
            reason = self._device_reason()
            t_pulse_est = t_cmd + self.driver.latency_s
            per_trigger = 2 if self._paired is not None else 1
            level = max(self._intensity, self._paired[0]) if self._paired else self._intensity
            if reason is None:
                if index == 0:
                    reason = self.gate.check(t=t_pulse_est, intensity_pct=level,
                                             eeg_age_s=self._eeg_age_s(), offsets=offsets,
                                             pulses_per_trigger=per_trigger)
                else:
                    reason = self.gate.check_next(
                        t=t_pulse_est, planned=t_pulse_est if planned is None else planned,
                        max_lateness_s=max_lateness_s, eeg_age_s=self._eeg_age_s())
            if reason is not None:
                return FireResult(False, reason, None, t_cmd)
            try:
                t_pulse = self.driver.fire()
            except StimulatorError as exc:
                # the device failed (port gone, error reply): disarm and say so; the pulse
                # may or may not have left, so the limits count it
                self._armed = False
                self.gate.commit(t_pulse_est, per_trigger)
                with contextlib.suppress(Exception):
                    self.driver.disarm()
                if self.driver.fault is None:
                    self.driver.report_fault(f"fire: {exc}")
                return FireResult(False, "fire_failed", None, t_cmd)
            except Exception as exc:
                self._armed = False
                # the fire error is the one to report; a failing disarm must not hide it
                with contextlib.suppress(Exception):
                    self.driver.disarm()
                raise StimulatorError(f"fire failed, disarmed: {exc}") from exc
            self.gate.commit(t_pulse, per_trigger)
            if len(offsets) > 1 and index == len(offsets) - 1:
                self.gate.end_unit(t_pulse)
            return FireResult(True, "fired", t_pulse, t_cmd)

    def end_unit(self, t_last: float) -> None:
        """A unit stopped early after a pulse at ``t_last``: the inter-train pause applies."""
        with self._lock:
            self.gate.end_unit(t_last)
