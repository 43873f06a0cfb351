"""The stimulator seam: every driver implements :class:`Stimulator`.

A driver does exactly what it is told, as fast as it can; *when* to fire and *whether* it
is safe are decided elsewhere (:mod:`closedloop.stim.scheduler`,
:mod:`closedloop.stim.safety`). The only object the service holds is a
:class:`~closedloop.stim.gated.GatedStimulator` wrapping the driver, so no pulse can skip
the gate.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Stimulator"]


@runtime_checkable
class Stimulator(Protocol):
    """A TMS stimulator (or its simulation).

    Attributes:
        name: Driver name, as in ``[stimulator] driver``.
        latency_s: Known delay from :meth:`fire` being called to the pulse leaving the
            coil; the scheduler calls :meth:`fire` this much earlier.
    """

    name: str
    latency_s: float

    def open(self) -> None:
        """Connect to the device."""

    def close(self) -> None:
        """Disarm if needed and release the device."""

    def arm(self) -> None:
        """Make the device ready to fire."""

    def disarm(self) -> None:
        """Make the device unable to fire."""

    def set_intensity(self, pct: float) -> None:
        """Set the output, % of maximum."""

    def fire(self) -> float:
        """Fire one pulse now; return the LSL time the pulse leaves the coil."""
