"""The stimulator seam: every driver implements :class:`Stimulator`.

A driver does exactly what it is told, as fast as it can; *when* to fire and *whether* it
is safe are decided elsewhere (:mod:`closedloop.stim.scheduler`,
:mod:`closedloop.stim.safety`). The only object the service holds is a
:class:`~closedloop.stim.gated.GatedStimulator` wrapping the driver, so no pulse can skip
the gate.

A driver that talks to a device reports trouble it finds on its own (a keep-alive that got
no answer, a port that vanished, an error flag) through :meth:`DriverBase.report_fault`;
the gate disarms on it. :class:`DriverBase` holds what every driver shares.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from closedloop.errors import StimulatorError

__all__ = ["DriverBase", "Stimulator"]


@runtime_checkable
class Stimulator(Protocol):
    """A TMS stimulator (or its simulation).

    Attributes:
        name: Driver name, as in ``[stimulator] driver``.
        latency_s: Known delay from :meth:`fire` being called to the pulse leaving the
            coil; the scheduler calls :meth:`fire` this much earlier.
        trigger_route: How a pulse is triggered (``serial``, ``ttl:rts``, ``lsl``...).
        supports_paired: Whether one :meth:`fire` can give a conditioning-test pair.
    """

    name: str
    latency_s: float
    trigger_route: str
    supports_paired: bool

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

    def status(self) -> dict[str, Any]:
        """A snapshot of what the driver knows; no device I/O."""


class DriverBase:
    """Fault reporting and the status snapshot, shared by the drivers."""

    name = "base"
    trigger_route = "none"
    supports_paired = False

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self._fault: str | None = None
        self._on_fault: Callable[[str], None] | None = None
        self._fault_lock = threading.Lock()
        self._temperature: float | None = None
        self._armed = False
        self._intensity: float | None = None

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

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        raise StimulatorError(f"driver {self.name!r} cannot give paired pulses "
                              "(use magstim-bistim, magventure or simulated)")

    def status(self) -> dict[str, Any]:
        return {"driver": self.name, "trigger_route": self.trigger_route,
                "latency_ms": round(self.latency_s * 1000.0, 3), "armed": self._armed,
                "ready": self.ready, "fault": self._fault, "intensity_pct": self._intensity,
                "coil_temperature_c": self._temperature}
