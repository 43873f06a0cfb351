"""The stimulator seam: every driver implements :class:`Stimulator`.

A driver does exactly what it is told, as fast as it can; *when* to fire and *whether* it
is safe are decided elsewhere (:mod:`closedloop.stim.scheduler`,
:mod:`closedloop.stim.safety`). The only object the service holds is a
:class:`~closedloop.stim.gated.GatedStimulator` wrapping the driver, so no pulse can skip
the gate.

A driver that talks to a device reports trouble it finds on its own (a keep-alive that got
no answer, a port that vanished, an error flag) through :meth:`DriverBase.report_fault`;
the gate disarms on it. :class:`DriverBase` holds what every driver shares.

What the gate checks is what the *device* will deliver, not what the driver last asked
for: a Magstim left at 95 % by the previous user, or a front-panel knob turned after
arming, fires at the device's power. Every driver therefore reads its device back
(:meth:`Stimulator.read_device`) into a :class:`DeviceState`, caches the last one
(:attr:`Stimulator.device`), and a driver with a watch thread (keep-alive or poll) reports a
fault when a read-back differs from what it commanded (:func:`device_mismatch`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from closedloop.errors import StimulatorError

__all__ = ["Commanded", "DeviceState", "DriverBase", "Stimulator", "device_mismatch"]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the device will deliver on its next trigger, as last read back from it.

    ``intensity_pct`` is output A: the only pulse of a single-pulse trigger, the first
    pulse of a pair (the drivers' ``set_paired`` puts the conditioning pulse on A and the
    test pulse on B). ``intensity_b_pct`` is the second output where the mode uses one
    (BiStim B power, MagPro twin/dual B amplitude), else None.

    Attributes:
        intensity_pct: Output A, % of maximum output; None = unknown.
        intensity_b_pct: Output B where the mode uses one; else None.
        pulses_per_trigger: 1 standard; 2 paired (BiStim A+B with an interval, MagPro
            twin/dual); N for a MagPro burst or a Rapid train.
        isi_ms: Spacing between those pulses (None when 1).
        mode: Driver-specific name: ``standard``, ``twin``, ``dual``, ``power``,
            ``burst``, ``paired``, ``simultaneous``, ``train``...
        source: ``device`` when read back from the device; ``declared`` when the driver
            cannot read it back (ttl: the operator's declared value).
        read_at: When it was read back (``time.monotonic()``; the injected clock for
            :class:`~closedloop.stim.fake.FakeStimulator`).
    """

    intensity_pct: float | None
    intensity_b_pct: float | None
    pulses_per_trigger: int
    isi_ms: float | None
    mode: str
    source: Literal["device", "declared"]
    read_at: float

    @property
    def max_pct(self) -> float | None:
        """The highest intensity any pulse of a trigger will have (None if unknown)."""
        if self.intensity_pct is None:
            return None
        if self.intensity_b_pct is None:
            return self.intensity_pct
        return max(self.intensity_pct, self.intensity_b_pct)

    def as_dict(self) -> dict[str, Any]:
        """The fields (and ``max_pct``) as a JSON-ready dict."""
        return {"intensity_pct": self.intensity_pct, "intensity_b_pct": self.intensity_b_pct,
                "max_pct": self.max_pct, "pulses_per_trigger": self.pulses_per_trigger,
                "isi_ms": self.isi_ms, "mode": self.mode, "source": self.source,
                "read_at": self.read_at}


@dataclass(frozen=True, slots=True)
class Commanded:
    """What a driver last commanded; None = never commanded (not compared)."""

    intensity_pct: float | None = None
    intensity_b_pct: float | None = None
    pulses_per_trigger: int | None = None
    mode: str | None = None


def _pulses(n: int) -> str:
    return f"{n} pulse{'' if n == 1 else 's'} per trigger"


def device_mismatch(commanded: Commanded, device: DeviceState, *,
                    tolerance_pct: float = 0.5) -> str | None:
    """Why ``device`` is not what was ``commanded`` (None when it is, or nothing was).

    Intensities differ when they are ``tolerance_pct`` or more apart (the serial devices
    take whole percent); an intensity the device does not report (None) while one was
    commanded is a difference too.
    """
    def differ(want: float | None, got: float | None) -> bool:
        if want is None:
            return False
        return got is None or abs(want - got) >= tolerance_pct

    def pct(x: float | None) -> str:
        return "unknown" if x is None else f"{x:g} %"

    parts = []
    if differ(commanded.intensity_pct, device.intensity_pct):
        parts.append(f"commanded {pct(commanded.intensity_pct)}, device reads "
                     f"{pct(device.intensity_pct)}")
    if differ(commanded.intensity_b_pct, device.intensity_b_pct):
        parts.append(f"commanded B {pct(commanded.intensity_b_pct)}, device reads B "
                     f"{pct(device.intensity_b_pct)}")
    want_n, want_mode = commanded.pulses_per_trigger, commanded.mode
    if ((want_n is not None and want_n != device.pulses_per_trigger)
            or (want_mode is not None and want_mode != device.mode)):
        want = [f"mode {want_mode}"] if want_mode is not None else []
        if want_n is not None:
            want.append(f"({_pulses(want_n)})")
        parts.append(f"commanded {' '.join(want)}, device reads mode {device.mode} "
                     f"({_pulses(device.pulses_per_trigger)})")
    if not parts:
        return None
    return "device changed: " + "; ".join(parts) + " (front panel?)"


@runtime_checkable
class Stimulator(Protocol):
    """A TMS stimulator (or its simulation).

    Attributes:
        name: Driver name, as in ``[stimulator] driver``.
        latency_s: Known delay from :meth:`fire` being called to the pulse leaving the
            coil; the scheduler calls :meth:`fire` this much earlier.
        trigger_route: How a pulse is triggered (``serial``, ``ttl:rts``, ``lsl``...).
        supports_paired: Whether one :meth:`fire` can give a conditioning-test pair.
        fire_lock: Held by the gate from its checks through :meth:`fire` (a serial
            driver's port lock, so that a keep-alive in progress delays the checks, not
            the pulse after them); a no-op where firing waits for nothing.
    """

    name: str
    latency_s: float
    trigger_route: str
    supports_paired: bool
    fire_lock: AbstractContextManager[Any]

    def open(self) -> None:
        """Connect to the device; raise StimulatorError naming what failed."""

    def close(self) -> None:
        """Disarm if needed and release the device; safe to call twice."""

    def arm(self) -> None:
        """Make the device ready to fire."""

    def disarm(self) -> None:
        """Make the device unable to fire."""

    def set_intensity(self, pct: float) -> float:
        """Set the output, % of maximum; return the value the device now has."""

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        """Make the next :meth:`fire` give a conditioning pulse then a test pulse."""

    def fire(self) -> float:
        """Fire one pulse (or pair) now; return the LSL time the pulse leaves the coil."""

    @property
    def ready(self) -> bool:
        """Whether the device says it can fire now (charged, armed, no error)."""

    @property
    def fault(self) -> str | None:
        """The fault the driver found on its own, if any (cleared by a new open)."""

    @property
    def coil_temperature_c(self) -> float | None:
        """The last coil temperature the device reported (None: it does not say)."""

    def set_fault_handler(self, fn: Callable[[str], None] | None) -> None:
        """Have ``fn(reason)`` called (from any thread) when the driver finds a fault."""

    def report_fault(self, reason: str) -> None:
        """Record a fault (the first since open) and call the handler once."""

    def read_device(self) -> DeviceState:
        """Read what the device will deliver, now (device I/O); update :attr:`device`.

        Raises:
            StimulatorError: the read-back failed (the message names what failed).
        """

    @property
    def device(self) -> DeviceState | None:
        """The last read-back (no I/O): updated by :meth:`read_device`, by every
        ``set_*`` call and by the driver's watch thread; None before the first."""

    def status(self) -> dict[str, Any]:
        """A snapshot of what the driver knows; no device I/O.

        ``intensity_pct`` is the device's (read back), ``commanded_intensity_pct`` what
        the driver last commanded, ``device`` the last :class:`DeviceState` as a dict.
        """

    def take_pending(self) -> None:
        """Take in what the device sent on its own and is waiting at the host (a frame
        saying a knob was turned), without waiting for anything; the gate calls it, with
        :attr:`fire_lock` held, just before it reads :attr:`device` to fire."""


class DriverBase:
    """Fault reporting, the device read-back cache and the status snapshot."""

    name = "base"
    trigger_route = "none"
    supports_paired = False
    # intensities this far apart are a mismatch (the serial devices take whole percent)
    intensity_tolerance_pct = 0.5

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self._fault: str | None = None
        self._on_fault: Callable[[str], None] | None = None
        self._fault_lock = threading.Lock()
        self._temperature: float | None = None
        self._armed = False
        self._intensity: float | None = None
        self._device: DeviceState | None = None
        self._commanded = Commanded()
        self.fire_lock: AbstractContextManager[Any] = contextlib.nullcontext()

    @property
    def device(self) -> DeviceState | None:
        return self._device

    @property
    def commanded(self) -> Commanded:
        """What the driver last commanded (None fields: never commanded)."""
        return self._commanded

    def read_device(self) -> DeviceState:
        raise NotImplementedError

    def _seen(self, state: DeviceState) -> str | None:
        """Cache a read-back; return how it differs from what was commanded (or None)."""
        self._device = state
        return device_mismatch(self._commanded, state,
                               tolerance_pct=self.intensity_tolerance_pct)

    def _watch_seen(self, state: DeviceState) -> None:
        """A watch-thread read-back: cache it, and report a fault when it differs."""
        why = self._seen(state)
        if why is not None:
            self.report_fault(why)

    @property
    def ready(self) -> bool:
        return self._armed and self._fault is None

    @property
    def fault(self) -> str | None:
        return self._fault

    @property
    def coil_temperature_c(self) -> float | None:
        return self._temperature

    def set_fault_handler(self, fn: Callable[[str], None] | None) -> None:
        self._on_fault = fn

    def report_fault(self, reason: str) -> None:
        """Record the first fault since open and tell the owner (once)."""
        with self._fault_lock:
            if self._fault is not None:
                return
            self._fault = reason
            self._armed = False
        handler = self._on_fault
        if handler is not None:
            handler(reason)

    def clear_fault(self) -> None:
        with self._fault_lock:
            self._fault = None

    def take_pending(self) -> None:
        return None  # a device that says nothing on its own

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        raise StimulatorError(f"driver {self.name!r} cannot give paired pulses "
                              "(use magstim-bistim, magventure or simulated)")

    def status(self) -> dict[str, Any]:
        dev = self.device
        return {"driver": self.name, "trigger_route": self.trigger_route,
                "latency_ms": round(self.latency_s * 1000.0, 3), "armed": self._armed,
                "ready": self.ready, "fault": self._fault,
                "intensity_pct": None if dev is None else dev.intensity_pct,
                "commanded_intensity_pct": self._intensity,
                "device": None if dev is None else dev.as_dict(),
                "coil_temperature_c": self._temperature}
