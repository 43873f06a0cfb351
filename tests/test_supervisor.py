"""The supervisor on the in-memory stimulator and a fake clock: the watchdog, a driver's
fault and the reconnection after it, in milliseconds (test_stim_service.py and
test_faults.py keep them over real LSL and pseudo-terminals)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from closedloop.config import load_config
from closedloop.control.supervisor import RECONNECT_S, Supervisor
from closedloop.errors import ClosedLoopError, StimulatorError
from closedloop.stim.gated import GatedStimulator
from tests.test_gate_mutants import Clock, rig


class Host:
    def __init__(self, stim: GatedStimulator) -> None:
        self.cfg = load_config(None, ["safety.watchdog_ms=200"])
        self.stim = stim
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.refused: list[str] = []
        self.stopped: list[str] = []

    def cancel_pending(self, reason: str) -> None:
        self.cancelled.append(reason)

    def record(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def count_refusal(self, reason: str) -> None:
        self.refused.append(reason)

    def stop_protocol_if_running(self, by: str) -> None:
        self.stopped.append(by)

    def poll_meps(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}

    def write_error(self) -> ClosedLoopError | None:
        return None

    def fail(self, exc: BaseException) -> None:
        raise AssertionError(exc)

    def heap_trimmed(self, ms: float) -> None:
        pass


def setup() -> tuple[Supervisor, Host, Clock, GatedStimulator]:
    clock, _, gated, _ = rig()
    host = Host(gated)
    return Supervisor(host, clock=clock), host, clock, gated


def test_the_watchdog_disarms_a_stalled_loop_once_armed() -> None:
    sup, host, clock, gated = setup()
    sup.heartbeat = clock.t
    clock.t += 0.19
    assert not sup.check(0.2) and gated.armed
    clock.t += 0.02  # 210 ms without a beat
    assert sup.check(0.2)
    assert not gated.armed and host.cancelled == ["watchdog"]
    assert sup.watchdog_trip == pytest.approx(0.21)
    assert not sup.check(0.2)  # disarmed: nothing more to do


def test_a_driver_fault_disarms_stops_the_protocol_and_schedules_a_reconnect() -> None:
    sup, host, clock, gated = setup()
    gated.driver.report_fault("keep-alive missed")  # the driver disarms the gate
    sup.driver_fault("keep-alive missed")
    assert not gated.armed and host.cancelled == ["stimulator_fault"]
    assert host.stopped == ["stimulator_fault"] and host.refused == ["stimulator_fault"]
    assert host.events[0][0] == "fault" and host.events[0][1]["error"] == "stimulator"
    assert sup.next_reconnect == clock.t + RECONNECT_S
    with pytest.raises(StimulatorError):
        gated.arm()


def test_a_reconnect_restores_the_settings_and_allows_arming_again() -> None:
    sup, host, _, gated = setup()
    gated.driver.report_fault("port vanished")
    sup.driver_fault("port vanished")
    gated.driver.turn_knob(70.0)  # the device came back with another setting
    asyncio.run(sup.reconnect())
    assert host.events[-1][0] == "stimulator_reconnected"
    assert sup.stim_fault is None and sup.next_reconnect == float("inf")
    assert gated.driver.device is not None and gated.driver.device.intensity_pct == 40.0
    gated.arm()
    assert gated.armed




def test_a_failed_reconnect_is_said_and_tried_again() -> None:
    sup, host, clock, gated = setup()
    gated.driver.report_fault("port vanished")
    sup.driver_fault("port vanished")

    def no_port() -> None:
        raise StimulatorError("fake: /dev/ttyUSB0 is gone")

    gated.driver.open = no_port  # type: ignore[method-assign]
    clock.t += RECONNECT_S
    asyncio.run(sup.reconnect())
    assert host.events[-1] == ("stimulator_reconnect_failed",
                               {"message": "fake: /dev/ttyUSB0 is gone"})
    assert sup.next_reconnect == clock.t + RECONNECT_S
    with pytest.raises(StimulatorError):
        gated.arm()
