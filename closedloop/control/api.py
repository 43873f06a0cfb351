"""What a control plane (MQTT, SIGHUP, a console) may ask of the running service.

A plane depends on this protocol, never on the service class: it is built beside the
service (see :func:`closedloop.control.attach.planes_for`), handed the service when the
service is ready (:meth:`Attachment.start`), subscribes to its events there, and
unsubscribes in :meth:`Attachment.stop`, which the service awaits on its way out.

Every method runs on the service's event loop. Refusals are raised as
:class:`~closedloop.errors.ControlError` (not allowed now) or
:class:`~closedloop.errors.ConfigError` (a bad value, naming the key); anything else a
method raises is a bug.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Attachment", "ControlApi", "Listener", "Unsubscribe"]

Listener = Callable[[str, dict[str, Any]], None]
"""Called with ``(kind, fields)`` for every event the service records."""

Unsubscribe = Callable[[], None]


class ControlApi(Protocol):
    """The service as a control plane sees it."""

    @property
    def state(self) -> str:
        """``starting``, ``idle``, ``armed``, ``running``, ``fault`` or ``stopped``."""
        ...

    def arm(self, *, by: str) -> None: ...

    def disarm(self, *, by: str) -> None: ...

    def start_protocol(self, name: str, *, pulses: int | None, by: str) -> None: ...

    def stop_protocol(self, *, by: str) -> None: ...

    def apply_settings(self, changes: dict[str, Any], *, by: str) -> dict[str, Any]: ...

    def calibrate(self, *, seconds: float, by: str) -> dict[str, Any]: ...

    def reload(self, *, by: str) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...

    def record(self, kind: str, **fields: Any) -> None:
        """Record an event in the log (and hand it to the subscribers)."""
        ...

    def subscribe(self, fn: Listener) -> Unsubscribe:
        """Call ``fn(kind, fields)`` for every recorded event; returns the unsubscribe."""
        ...

    def fail(self, exc: BaseException) -> None:
        """A fault that stops the service: it disarms at once, records it, stops."""
        ...


class Attachment(Protocol):
    """Something that runs beside the service while it is up (a control plane)."""

    async def start(self, api: ControlApi) -> None:
        """Called once the service is ready; subscribe here."""
        ...

    async def stop(self) -> None:
        """Called first on the way out (before the stimulator closes); unsubscribe."""
        ...
