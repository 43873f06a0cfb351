"""More tests of the gate that mutation testing (tools/mutation.py) showed were missing.

The device's truth (``GatedStimulator._mismatch``) with the messages an operator reads,
the fire path's results and faults at each of its exits, the shape of a unit judged
ahead when it is armed, and the day budget's and limits' edges. In-memory driver,
injected clock, milliseconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from closedloop.config.schema import SafetyConfig
from closedloop.errors import StimulatorError
from closedloop.stim.base import DeviceState
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import FireResult, GatedStimulator
from closedloop.stim.rules import BURST_GAP_S, RunState, judge
from closedloop.stim.safety import SafetyGate, SafetyLimits, Trigger
from tests.test_gate_mutants import Budget, Clock, Eeg, limits, rig


class Scripted(FakeStimulator):
    """A device whose read-back the test writes (``script``), whatever was commanded."""

    script: DeviceState | None = None

    def _state(self) -> DeviceState:
        return self.script if self.script is not None else super()._state()


def state(a: float | None, *, b: float | None = None, n: int = 1, isi: float | None = None,
          mode: str = "standard") -> DeviceState:
    return DeviceState(intensity_pct=a, intensity_b_pct=b, pulses_per_trigger=n,
                       isi_ms=isi, mode=mode, source="device", read_at=0.0)


def scripted(dev: DeviceState | None, lim: SafetyLimits | None = None
             ) -> tuple[Clock, Scripted, GatedStimulator]:
    clock = Clock()
    drv = Scripted(clock=clock)
    drv.script = dev
    _, _, gated, _ = rig(lim, None, drv=drv, clock=clock, arm=False)
    return clock, drv, gated


def arm_refusal(gated: GatedStimulator) -> str:
    with pytest.raises(StimulatorError) as info:
        gated.arm()
    return str(info.value)


# -- the device's truth, and what the operator is told ---------------------------------
def test_a_device_that_was_never_read_cannot_be_fired_on() -> None:
    _, drv, gated = scripted(None)
    drv._device = None  # nothing read back yet
    assert gated._mismatch(None) == "the device's settings are unknown (not read back yet)"


def test_a_device_that_does_not_say_its_intensity_is_refused() -> None:
    _, _, gated = scripted(state(None))
    assert arm_refusal(gated) == "cannot arm: the device does not say its intensity"


def test_simultaneous_discharge_is_named() -> None:
    _, _, gated = scripted(state(30.0, b=30.0, n=2, isi=0.0, mode="simultaneous"))
    assert arm_refusal(gated) == (
        "cannot arm: the device is in simultaneous-discharge mode (interval 0), whose "
        "strength the gate cannot judge")


def test_a_second_output_above_the_limit_counts_even_when_the_mode_does_not_use_it() -> None:
    # a burst mode gives output A only; B above the limit is still refused (the mode may
    # change on the front panel)
    _, _, gated = scripted(state(30.0, b=95.0, n=3, isi=20.0, mode="burst"))
    assert arm_refusal(gated) == ("cannot arm: the device is set to 95%, above the safety "
                                  "limit (80%)")


def test_a_paired_interval_of_exactly_one_ms_is_allowed() -> None:
    _, _, gated = scripted(state(30.0, b=40.0, n=2, isi=1.0, mode="paired"))
    gated.arm()
    got = gated.fire_now()
    assert got.fired
    assert got.pulses == ((1000.0, 30.0), (1000.001, 40.0))


def test_a_paired_interval_under_one_ms_says_how_long_it_is() -> None:
    _, _, gated = scripted(state(30.0, b=40.0, n=2, isi=0.5, mode="paired"))
    assert arm_refusal(gated) == (
        "cannot arm: the device's paired-pulse interval is 0.5 ms: two pulses at once, "
        "whose strength the gate cannot judge")


def test_a_paired_device_that_does_not_say_its_interval_is_two_pulses_at_once() -> None:
    _, _, gated = scripted(state(30.0, b=40.0, n=2, isi=None, mode="paired"))
    assert "interval is 0 ms: two pulses at once" in arm_refusal(gated)


def test_a_device_left_in_paired_mode_is_fired_as_it_reads() -> None:
    """Nothing commanded: the device's own pair is what the gate watches, and fires."""
    _, _, gated = scripted(state(30.0, b=40.0, n=2, isi=3.0, mode="paired"))
    gated.arm()
    assert gated.commanded == (30.0, 40.0)
    got = gated.fire_now()
    assert got.fired and [p for _, p in got.pulses] == [30.0, 40.0]


def test_paired_interval_within_half_a_millisecond_is_the_commanded_one() -> None:
    """A device that stores whole milliseconds: 3.5 ms asked, 3.0 read back is the same
    setting (0.5 ms); 3.0 read for 3.6 asked is not."""
    clock, drv, gated = scripted(None)
    gated.set_paired(30.0, 40.0, 3.5)
    drv.script = state(30.0, b=40.0, n=2, isi=3.0, mode="paired")
    gated.arm()
    assert gated.fire_now().fired
    gated.disarm()
    clock.t += 5.0
    gated.set_paired(30.0, 40.0, 3.6)
    assert arm_refusal(gated) == (
        "cannot arm: the device's paired-pulse interval is 3 ms but 3.6 ms was commanded "
        "(front panel?)")


def test_the_mismatch_names_both_settings() -> None:
    _, drv, gated = scripted(None)
    gated.set_paired(30.0, 40.0, 3.0)
    drv.script = state(30.0, b=50.0, n=2, isi=3.0, mode="paired")
    assert arm_refusal(gated) == (
        "cannot arm: the device will give 30% + 50% per trigger (paired) but 30% + 40% was "
        "commanded (front panel? a failed restore?)")


def test_a_change_during_a_unit_says_when_it_may_be_made() -> None:
    clock, _, gated, _ = rig(limits(), 40.0)
    clock.t = 1000.0
    assert gated.fire_now(offsets=(0.0, 0.5), index=0, planned=1000.0).fired
    with pytest.raises(StimulatorError) as info:
        gated.set_intensity(45.0)
    assert str(info.value) == ("intensity change refused: a unit is being delivered and "
                               "its intensities are fixed; set it again when the unit has "
                               "ended")


class NoReadBack(FakeStimulator):
    """A driver that has read nothing back after a setting (its state is unknown)."""

    def set_intensity(self, pct: float) -> float:
        got = super().set_intensity(pct)
        self._device = None
        return got


def test_a_setting_with_no_read_back_is_taken_as_asked_and_not_prepared() -> None:
    clock = Clock()
    drv = NoReadBack(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(limits()), eeg_age_s=Eeg(), clock=clock,
                            unit_offsets=(0.0, 0.2))
    gated.set_intensity(40.0)
    assert gated.commanded == (40.0,)
    assert gated.gate._shapes == {}


# -- the unit's shape is judged when it is armed or set, not at its first pulse --------
def shapes(gated: GatedStimulator) -> list[tuple[object, ...]]:
    return list(gated.gate._shapes)


def test_arming_judges_the_units_shape_ahead() -> None:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    drv.set_intensity(40.0)
    gated = GatedStimulator(drv, SafetyGate(limits()), eeg_age_s=Eeg(), clock=clock,
                            unit_offsets=(0.0, 0.2))
    gated.arm()
    assert shapes(gated) == [((40.0,), (0.0,), False, (0.0, 0.2))]
    gated.disarm()
    gated.set_intensity(45.0)  # and again when the intensity changes
    assert ((45.0,), (0.0,), False, (0.0, 0.2)) in shapes(gated)


def test_a_unit_of_one_trigger_has_no_shape_to_prepare() -> None:
    _, _, gated, _ = rig(limits(), 40.0)
    assert shapes(gated) == []


def test_a_prepared_shape_is_the_one_the_first_trigger_uses() -> None:
    gate = SafetyGate(limits())
    gate.prepare(Trigger(5.0, (40.0,)), (0.0, 0.2, 0.4))
    assert list(gate._shapes) == [((40.0,), (0.0,), False, (0.0, 0.2, 0.4))]
    assert gate.check_start(Trigger(100.0, (40.0,)), offsets=(0.0, 0.2, 0.4),
                            eeg_age_s=0.0) is None
    assert len(gate._shapes) == 1


# -- the fire path: each exit's result, and the fault it leaves ------------------------
class FailingRead(FakeStimulator):
    def take_pending(self) -> None:
        raise StimulatorError("port vanished")


def test_a_failed_read_before_the_pulse_is_a_fault_until_reconnected() -> None:
    clock = Clock(1234.5)
    drv = FailingRead(clock=clock)
    _, _, gated, _ = rig(limits(), 40.0, drv=drv, clock=clock)
    assert gated.fire_now() == FireResult(False, "device_fault", None, 1234.5)
    assert drv.fires == 0 and not gated.armed
    assert gated.blocked == "reading the device: port vanished"
    assert "reading the device: port vanished" in arm_refusal(gated)


class SilentFailure(FakeStimulator):
    """A fire error the driver does not report as a fault itself."""

    def fire(self) -> float:
        raise StimulatorError("no reply")


def test_a_failed_fire_blocks_arming_even_when_the_driver_said_nothing() -> None:
    clock = Clock()
    drv = SilentFailure(clock=clock)
    _, _, gated, _ = rig(limits(), 40.0, drv=drv, clock=clock)
    assert gated.fire_now().reason == "fire_failed"
    assert gated.blocked == "fire: no reply"
    assert drv.fault == "fire: no reply"
    assert "fire: no reply" in arm_refusal(gated)


class BrokenDisarm(FakeStimulator):
    def fire(self) -> float:
        raise RuntimeError("driver bug")

    def disarm(self) -> None:
        raise OSError("disarm failed too")


def test_a_bug_in_fire_is_reported_even_when_disarm_fails() -> None:
    clock = Clock()
    drv = BrokenDisarm(clock=clock)
    drv.open()
    drv.set_intensity(40.0)
    gated = GatedStimulator(drv, SafetyGate(limits()), eeg_age_s=Eeg(), clock=clock)
    gated._armed = True  # (arming would call the broken disarm path only on faults)
    drv._armed = True
    with pytest.raises(StimulatorError, match="fire failed, disarmed: driver bug"):
        gated.fire_now()
    assert not gated.armed


def test_a_fault_already_flagged_by_the_driver_refuses_the_pulse() -> None:
    clock, drv, gated, _ = rig(limits(), 40.0)
    drv._fault = "coil disconnected"  # seen by the driver, its handler not run yet
    assert gated.fire_now() == FireResult(False, "device_fault", None, clock.t)
    assert drv.fires == 0


def test_a_units_later_trigger_must_keep_to_the_plan_made_when_it_started() -> None:
    clock, drv, gated, _ = rig(limits(), 40.0)
    offsets = (0.0, 0.5)
    clock.t = 1000.0
    assert gated.fire_now(offsets=offsets, index=0, planned=1000.0).fired
    assert gated.gate._unit is not None and gated.gate._unit.plan == (1000.0, 1000.5)
    clock.t = 1000.9  # a second trigger that claims another plan
    got = gated.fire_now(offsets=offsets, index=1, planned=1000.9, max_lateness_s=1.0)
    assert got.reason == "safety:not_the_unit" and drv.fires == 1


def test_a_first_trigger_without_a_plan_records_none() -> None:
    _, _, gated, _ = rig(limits(), 40.0)
    assert gated.fire_now(offsets=(0.0, 0.5), index=0).fired
    assert gated.gate._unit is not None and gated.gate._unit.plan == ()


def test_lateness_counts_the_latency() -> None:
    clock = Clock()
    drv = FakeStimulator(clock=clock, latency_s=0.004)
    _, _, gated, _ = rig(limits(), 40.0, drv=drv, clock=clock)
    clock.t = 2000.0
    # leaves at 2000.004: 3 ms after the planned 2000.001, more than the 2 ms allowed
    assert gated.fire_now(planned=2000.001, max_lateness_s=0.002).reason == "late"
    assert gated.fire_now(planned=2000.001, max_lateness_s=0.004).fired


# -- the gate's own edges --------------------------------------------------------------
def test_limits_below_the_hard_caps_are_taken_from_the_config() -> None:
    base = {"min_interval_s": 0.05, "max_intensity_pct": 80.0}
    lim = SafetyLimits.from_config(SafetyConfig(**base, max_burst_intensity_mt=70.0,
                                                max_coil_temp_c=35.0))
    assert lim.max_burst_intensity_mt == 70.0
    assert lim.max_coil_temp_c == 35.0


def test_a_fresh_gate_with_a_day_budget_asks_for_credit() -> None:
    gate = SafetyGate(limits(), day=Budget(limit=100))
    assert gate.day_exhausted is False
    assert gate.needs_credit(1)
    gate.top_up(10)
    assert gate.credit == 10
    assert not gate.needs_credit(10)
    assert gate.needs_credit(11)


def test_no_credit_is_needed_without_a_day_budget_or_once_the_day_is_spent() -> None:
    assert not SafetyGate(limits()).needs_credit(5)
    gate = SafetyGate(limits(), day=Budget(limit=3))
    gate.top_up(10)
    assert gate.credit == 3 and gate.day_exhausted
    assert not gate.needs_credit(10)


class CountingBudget(Budget):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.asked: list[int] = []

    def reserve(self, n: int) -> int:
        self.asked.append(n)
        return super().reserve(n)


def test_a_full_credit_asks_the_budget_nothing() -> None:
    day = CountingBudget(limit=100)
    gate = SafetyGate(limits(), day=day)
    gate.top_up(10)
    gate.top_up(10)
    gate.top_up(4)
    assert day.asked == [10]


def test_the_pulse_cap_looks_at_the_last_second_only() -> None:
    """20 pulses 1.5 s ago and a unit of 10 now: 10 in any second, allowed."""
    gate = SafetyGate(limits(min_interval_s=0.0, min_inter_train_s=1.0))
    t0 = 100.0
    for k in range(20):
        trig = Trigger(t0 + k * 0.05, (30.0,))
        assert gate.check_start(trig, eeg_age_s=0.0) is None
        gate.commit(trig, start=True, triggers=1)
    last = t0 + 19 * 0.05
    offsets = tuple(k * 0.05 for k in range(10))
    assert gate.check_start(Trigger(last + 1.5, (30.0,)), offsets=offsets,
                            eeg_age_s=0.0) is None


def test_the_ledger_keeps_the_plan_of_a_committed_unit() -> None:
    gate = SafetyGate(limits())
    trig = Trigger(100.0, (40.0,))
    gate.commit(trig, start=True, triggers=2, plan=(100.0, 100.5))
    assert gate._unit is not None and gate._unit.plan == (100.0, 100.5)
    assert gate.check_next(Trigger(100.3, (40.0,)), planned=100.3, max_lateness_s=1.0,
                           eeg_age_s=0.0, index=1) == "safety:not_the_unit"


# -- rules at the tolerance's edge -----------------------------------------------------
def test_the_first_pairs_interval_is_judged_with_the_tolerance_added() -> None:
    """A pair whose measured interval is just under the burst gap but within the timing
    tolerance of it is judged as a train at its frequency, not as a burst."""
    lim = limits(min_interval_s=0.0, max_burst_intensity_mt=80.0).rules()
    gap = BURST_GAP_S - 0.0005  # within the 1 ms tolerance of the burst gap
    pair = Trigger(100.0, (45.0, 45.0), (0.0, gap), paired=True)  # 90 % MT
    s = RunState()
    why, s = judge(s, pair, lim)
    assert why is None
    why, s2 = judge(s, dataclasses.replace(pair, t=100.5), lim)
    assert why is None and not s2.run_patterned  # a burst at 90 % MT would be refused
    assert math.isclose(s2.run_min_gap, gap)


def test_a_plan_is_judged_as_written() -> None:
    """The same pairs as planned (no tolerance): the interval is under the burst gap, so
    it is a pattern of doublets, and 90 % MT is above the burst limit."""
    lim = limits(min_interval_s=0.0, max_burst_intensity_mt=80.0).rules()
    pair = Trigger(100.0, (45.0, 45.0), (0.0, BURST_GAP_S - 0.0005), paired=True)
    why, s = judge(RunState(), pair, lim, tolerance_s=0.0)
    assert why is None
    why, _ = judge(s, dataclasses.replace(pair, t=100.5), lim, tolerance_s=0.0)
    assert why == "safety:burst_intensity"


def test_a_trigger_at_no_time_is_invalid() -> None:
    lim = limits().rules()
    assert judge(RunState(), Trigger(math.nan, (40.0,)), lim)[0] == "safety:invalid_trigger"
    assert judge(RunState(), Trigger(math.inf, (40.0,)), lim)[0] == "safety:invalid_trigger"
