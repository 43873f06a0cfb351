"""The trigger line a serial driver may fire through (a TTL pulse on a parallel port or
a serial control line), as the driver sees it: :class:`closedloop.stim.ttl.TtlLine` is
the one we have."""

from __future__ import annotations

from typing import Protocol

__all__ = ["TriggerLine"]


class TriggerLine(Protocol):
    """Open it, pulse it (returns the LSL time the pulse left), close it; ``line`` names
    it (``dtr``, ``rts``, ``byte``, ``parallel``) and ``latency_s`` is its known delay."""

    @property
    def line(self) -> str: ...

    @property
    def latency_s(self) -> float: ...

    def open(self) -> None: ...

    def pulse(self) -> float: ...

    def close(self) -> None: ...
