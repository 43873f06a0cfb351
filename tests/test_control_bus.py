"""The event bus and the control seam between the service and its planes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from closedloop.config import load_config
from closedloop.control.bus import EventBus
from closedloop.control.service import ClosedLoopService
from closedloop.errors import ClosedLoopError


def test_events_are_written_then_handed_to_subscribers_until_they_unsubscribe() -> None:
    written: list[tuple[str, dict[str, Any]]] = []
    bus = EventBus(lambda kind, **f: written.append((kind, f)), clock=lambda: 12.5)
    seen: list[str] = []
    order: list[str] = []
    stop_a = bus.subscribe(lambda kind, _f: (seen.append(kind), order.append("a")))
    bus.subscribe(lambda _kind, _f: order.append("b"))
    bus.emit("armed", by="test")
    assert written == [("armed", {"by": "test", "lsl_time": 12.5})]
    assert seen == ["armed"] and order == ["a", "b"]
    stop_a()
    stop_a()  # twice is harmless
    bus.emit("disarmed", by="test", lsl_time=3.0)
    assert seen == ["armed"] and bus.subscribers == 1
    assert written[-1] == ("disarmed", {"by": "test", "lsl_time": 3.0})


def test_a_subscriber_may_unsubscribe_while_it_is_called() -> None:
    bus = EventBus(lambda _kind, **_f: None, clock=lambda: 0.0)
    calls: list[str] = []

    def once(kind: str, fields: dict[str, Any]) -> None:
        calls.append(kind)
        stop()

    stop = bus.subscribe(once)
    bus.subscribe(lambda _kind, _f: calls.append("other"))
    bus.emit("x")
    bus.emit("y")
    assert calls == ["x", "other", "other"]


def test_a_failing_subscriber_is_not_silent() -> None:
    bus = EventBus(lambda _kind, **_f: None, clock=lambda: 0.0)
    bus.subscribe(lambda _kind, _f: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bus.emit("x")


def test_mqtt_enabled_without_its_plane_is_refused(tmp_path: Path) -> None:
    cfg = load_config(None, ["mqtt.enabled=true", f'recording.events="{tmp_path / "e.jsonl"}"'])
    with pytest.raises(ClosedLoopError, match="no MQTT control plane was attached"):
        asyncio.run(ClosedLoopService(cfg).run(asyncio.Event()))
