"""What the pipeline asks the fire thread for, and what it answers (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PulseOutcome", "PulseRequest"]


@dataclass(frozen=True, slots=True)
class PulseRequest:
    """A pulse to land at LSL time ``fire_time``; ``context`` is carried to the outcome."""

    id: int
    fire_time: float
    context: dict[str, Any] = field(default_factory=dict)
    offsets: tuple[float, ...] = (0.0,)  # trigger times after fire_time


@dataclass(frozen=True, slots=True)
class PulseOutcome:
    """The end of one request."""

    request: PulseRequest
    fired: bool
    reason: str
    lsl_time: float | None
    command_time: float
    handed_over: float  # when the thread received the request (LSL clock)
    times: tuple[float, ...] = ()  # every trigger delivered (all of them when fired)
    command_times: tuple[float, ...] = ()
    # per trigger delivered: (LSL time, % of maximum output) of each of its pulses, as the
    # device's read-back said it would deliver them (conditioning pulses included)
    pulses: tuple[tuple[tuple[float, float], ...], ...] = ()
