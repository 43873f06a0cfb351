"""The protocol runner on the in-memory stimulator: no LSL, no wall clock.

The MEP protocols wait for the MEP of the unit that fired, found by its decision id (a
paired pulse's MEP follows its test pulse, registered at another time than the unit's
first pulse: before, the protocol waited for it forever).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any

import pytest

from closedloop.config.schema import StimulationConfig
from closedloop.control.protocols import MAX_REJECTED_IN_A_ROW, ProtocolRunner
from closedloop.errors import ControlError, StimulatorError
from closedloop.mep.measure import MepMeasure
from closedloop.mep.tracker import MepRecord
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import unit_for
from closedloop.stim.safety import SafetyGate
from tests.test_gate_mutants import Clock, Eeg, limits


class Host:
    def __init__(self, clock: Clock, stim: GatedStimulator) -> None:
        self.clock_ = clock
        self.stim = stim
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.target_phase: list[float] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def clock(self) -> float:
        return self.clock_.t

    def arm(self, *, by: str) -> None:
        try:
            self.stim.arm()
        except StimulatorError as exc:  # as the service says it
            raise ControlError(f"arm: refused, {exc}") from exc
        self.events.append(("armed", {"by": by}))

    def disarm(self, *, by: str) -> None:
        self.stim.disarm()
        self.events.append(("disarmed", {"by": by}))

    def set_target_phase(self, deg: float) -> None:
        self.target_phase.append(deg)

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


def runner(pattern: str = "single") -> tuple[ProtocolRunner, Host, list[Coroutine[Any, Any,
                                                                                  None]]]:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    stim = GatedStimulator(drv, SafetyGate(limits()), eeg_age_s=Eeg(), clock=clock)
    cfg = StimulationConfig(pattern=pattern)
    unit = unit_for(cfg)
    if unit.paired:
        stim.set_paired(20.0, 40.0, 3.0)
    else:
        stim.set_intensity(40.0)
    host = Host(clock, stim)
    spawned: list[Coroutine[Any, Any, None]] = []
    return ProtocolRunner(host, stim=stim, unit=unit, settle_s=lambda: 0.5,
                          spawn=spawned.append), host, spawned


def start(r: ProtocolRunner, name: str, pulses: int | None = None, *, emg: bool = True) -> None:
    r.start(name, pulses=pulses, by="test", emg_connected=emg, intensity_pct=40.0,
            max_intensity_pct=80.0, seed=1)


def mep(decision_id: int | None, p2p: float = 200.0, *, t: float = 1.0,
        channel: str = "FDI", rejected: bool = False) -> MepRecord:
    m = MepMeasure(p2p, 22.0, 25.0, 1.0, 10.0, 3.0, rejected,
                   "preactivation" if rejected else None)
    return MepRecord(t, "closedloop", channel, m, decision_id)


def test_an_mep_protocol_waits_for_the_mep_of_the_unit_that_fired() -> None:
    r, host, _ = runner("paired")
    start(r, "mt-mlpest", pulses=10)
    assert r.run is not None and r.run.plan is not None
    host.clock_.t += 1.0  # the stimulator has settled
    assert not r.holds(host.clock_.t)
    r.unit_fired(decision_id=7)
    assert r.holds(host.clock_.t) and r.run.awaiting == 7
    # the paired pulse's MEP is stamped at the test pulse: another time, the same unit
    r.mep(mep(6), "FDI")  # an earlier unit's, or a marker's: not this one
    r.mep(mep(7, channel="APB"), "FDI")  # another channel
    assert r.run.awaiting == 7
    r.mep(mep(7, t=1.003), "FDI")
    assert r.run.awaiting is None
    assert r.holds(host.clock_.t)  # settling after the next pulse's intensity change
    host.clock_.t += 1.0
    assert not r.holds(host.clock_.t)


def test_rejected_meps_repeat_the_pulse_then_end_the_protocol_saying_why() -> None:
    r, host, _ = runner()
    start(r, "mt-mlpest", pulses=10)
    for k in range(MAX_REJECTED_IN_A_ROW):
        assert r.run is not None
        r.unit_fired(decision_id=k)
        r.mep(mep(k, rejected=True), "FDI")
    assert r.run is None
    errors = [f for kind, f in host.events if kind == "protocol_error"]
    assert errors == [{"protocol": "mt-mlpest",
                       "error": f"{MAX_REJECTED_IN_A_ROW} MEPs in a row rejected "
                                "(preactivation)"}]
    assert host.kinds()[-2:] == ["disarmed", "protocol_stopped"]


def test_a_finished_mep_protocol_reports_its_result_off_the_loop() -> None:
    r, host, spawned = runner()
    start(r, "io-curve", pulses=9)
    n = 0
    while r.run is not None:
        r.unit_fired(decision_id=n)
        r.mep(mep(n, p2p=50.0 + 10.0 * n), "FDI")
        n += 1
    assert n == 9 and ("protocol_stopped", {"by": "protocol_complete",
                                            "protocol": "io-curve", "fired": 0}) in host.events
    assert len(spawned) == 1
    asyncio.run(spawned[0])
    assert r.results and r.results[0]["protocol"] == "io-curve"
    assert host.kinds()[-1] == "protocol_result"


@pytest.mark.parametrize("pattern", ["train", "itbs", "ctbs"])
def test_an_mep_protocol_is_refused_for_units_without_an_mep(pattern: str) -> None:
    r, host, _ = runner(pattern)
    with pytest.raises(ControlError, match=f"stimulation.pattern = '{pattern}' gives none"):
        start(r, "mt-mlpest")
    assert r.run is None and host.events == []
    start(r, "phase-single")  # the closed-loop protocol runs any pattern
    assert r.run is not None


def test_an_mep_protocol_needs_the_emg() -> None:
    r, _, _ = runner()
    with pytest.raises(ControlError, match="needs the EMG stream"):
        start(r, "io-curve", emg=False)


def test_phase_single_stops_when_no_whole_unit_fits() -> None:
    r, host, _ = runner("paired")  # 2 pulses per unit
    start(r, "phase-single", pulses=5)
    assert r.stim.gate.budget == 5
    r.pulses_delivered(2)
    r.unit_fired(decision_id=1)
    assert r.run is not None  # 2 fired, 3 left: another unit fits
    r.pulses_delivered(2)
    r.unit_fired(decision_id=2)  # 4 fired, 1 left: no unit of 2 fits
    assert r.run is None
    assert ("protocol_stopped", {"by": "protocol_complete", "protocol": "phase-single",
                                 "fired": 4}) in host.events
    assert r.stim.gate.budget is None


def test_a_protocol_that_cannot_arm_does_not_run() -> None:
    r, host, _ = runner()
    r.stim.driver.report_fault("coil unplugged")
    with pytest.raises(ControlError):
        start(r, "phase-single")
    assert r.run is None
    assert ("protocol_stopped", {"by": "arm_refused", "protocol": "phase-single",
                                 "fired": 0}) in host.events


def test_phase_mapping_sets_the_target_phase_of_each_pulse() -> None:
    r, host, _ = runner()
    start(r, "phase-map", pulses=4)
    assert len(host.target_phase) == 1 and math.isfinite(host.target_phase[0])
    r.unit_fired(decision_id=1)
    r.mep(mep(1), "FDI")
    assert len(host.target_phase) == 2


def test_stopping_restores_the_intensity_the_protocol_found() -> None:
    r, host, _ = runner()
    start(r, "io-curve", pulses=9)
    assert r.run is not None and r.run.plan is not None
    assert r.stim.commanded == (r.run.plan.intensity_pct,) != (40.0,)
    r.stop(by="test")
    assert r.stim.commanded == (40.0,)
    assert ("intensity_restored", {"protocol": "io-curve", "intensity_pct": 40.0}
            ) in host.events
