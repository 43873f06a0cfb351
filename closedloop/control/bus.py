"""The event bus: every event the service records goes to the event log, then to the
subscribers (the MQTT plane, the session recorder, the console, a test).

A subscriber is called on the event loop, in the order of subscription, with
``(kind, fields)``; it must not block (the pulse path records through it). A subscriber
that raises is a bug in it: the error reaches the caller of :meth:`EventBus.emit` (which
in the pulse path stops the service, visibly), not a silent log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from closedloop.control.api import Listener, Unsubscribe

__all__ = ["EventBus"]


class EventBus:
    """Write each event with ``write(kind, **fields)``, then hand it to the subscribers."""

    def __init__(self, write: Callable[..., None], clock: Callable[[], float]) -> None:
        self._write = write
        self._clock = clock
        self._subscribers: list[Listener] = []

    def emit(self, kind: str, **fields: Any) -> None:
        """Record an event; ``lsl_time`` defaults to now."""
        fields.setdefault("lsl_time", self._clock())
        self._write(kind, **fields)
        for fn in tuple(self._subscribers):  # one may unsubscribe while being called
            fn(kind, fields)

    def subscribe(self, fn: Listener) -> Unsubscribe:
        """Call ``fn(kind, fields)`` for every event from now on; returns the unsubscribe
        (calling it twice is harmless)."""
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

        return unsubscribe

    @property
    def subscribers(self) -> int:
        """How many subscribers there are now."""
        return len(self._subscribers)
