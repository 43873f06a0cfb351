"""Tests of the safety gate that mutation testing (tools/mutation.py) showed were missing.

Each states a rule of the gate (closedloop/stim/rules.py, safety.py, gated.py) at its
boundary: the limit itself is allowed, one step past it is refused, with the reason the
rule gives. They run on the in-memory driver and an injected clock, in milliseconds.
"""

from __future__ import annotations

from typing import Any

import pytest

from closedloop.config.schema import SafetyConfig
from closedloop.errors import StimulatorError
from closedloop.stim.base import DeviceState
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import FireResult, GatedStimulator, trigger_of
from closedloop.stim.rules import RunState, judge
from closedloop.stim.safety import SafetyGate, SafetyLimits, Trigger


def limits(**kw: Any) -> SafetyLimits:
    base: dict[str, Any] = {"min_interval_s": 0.05, "max_intensity_pct": 80.0,
                            "max_pulses": 5000, "rate_window_s": 60.0,
                            "max_pulses_per_window": 5000, "max_eeg_age_ms": 100.0,
                            "motor_threshold_pct": 50.0}
    base.update(kw)
    return SafetyLimits.from_config(SafetyConfig(**base))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Eeg:
    """The age of the newest EEG sample, set by the test."""

    def __init__(self) -> None:
        self.age: float | None = 0.0

    def __call__(self) -> float | None:
        return self.age


class WholePercent(FakeStimulator):
    """A device that stores whole percent (as the serial devices do): 60.4 reads 60."""

    def set_intensity(self, pct: float) -> float:
        super().set_intensity(float(round(pct)))
        return float(pct)  # what the driver was asked; the read-back says the truth


class Hot(FakeStimulator):
    """A device that reports its coil temperature."""

    temp_c: float | None = None

    @property
    def coil_temperature_c(self) -> float | None:
        return self.temp_c


def rig(lim: SafetyLimits | None = None, pct: float | None = 40.0, *,
        drv: FakeStimulator | None = None, clock: Clock | None = None, arm: bool = True,
        **gate_kw: Any) -> tuple[Clock, FakeStimulator, GatedStimulator, Eeg]:
    """A gated fake on a fake clock (pass both ``drv`` and its ``clock``, or neither)."""
    clock = clock or Clock()
    if drv is None:
        drv = FakeStimulator(clock=clock)
    drv.open()
    eeg = Eeg()
    faults: list[str] = []
    gated = GatedStimulator(drv, SafetyGate(lim or limits(), **gate_kw), eeg_age_s=eeg,
                            clock=clock, on_fault=faults.append)
    gated.faults = faults  # type: ignore[attr-defined]
    if pct is not None:
        gated.set_intensity(pct)
    if arm:
        gated.arm()
    return clock, drv, gated, eeg


def fire_unit(clock: Clock, gated: GatedStimulator, t0: float,
              offsets: tuple[float, ...]) -> list[str]:
    out = []
    for k, off in enumerate(offsets):
        clock.t = t0 + off
        out.append(gated.fire_now(offsets=offsets, index=k, planned=clock.t).reason)
    return out


def burst(t: float, n: int, pct: float, ipi: float = 0.01) -> Trigger:
    return Trigger(t, (pct,) * n, tuple(k * ipi for k in range(n)))


def commit_all(gate: SafetyGate, trig: Trigger, offsets: tuple[float, ...]) -> None:
    for k, off in enumerate(offsets):
        gate.commit(Trigger(trig.t + off, trig.pcts, trig.offsets, trig.paired),
                    start=k == 0, triggers=len(offsets))


# -- rules.py: the boundaries of each rule --------------------------------------------
def test_a_train_of_exactly_the_table_duration_is_allowed() -> None:
    """Rossi 2009 Table 4, 10 Hz at 100 % MT: 5 s; factor 1: 50 pulses is 5 s."""
    gate = SafetyGate(limits(train_duration_factor=1.0))
    offs = tuple(k / 10 for k in range(50))
    assert gate.check_start(Trigger(100.0, (50.0,)), offsets=offs, eeg_age_s=0.0) is None
    offs = tuple(k / 10 for k in range(51))
    assert gate.check_start(Trigger(100.0, (50.0,)), offsets=offs,
                            eeg_age_s=0.0) == "safety:train_duration"


def test_bursts_at_the_limits_of_patterned_stimulation() -> None:
    """5 pulses per burst, bursts 190 ms apart, at 100 % MT: allowed; one more: refused."""
    gate = SafetyGate(limits())
    five = burst(100.0, 5, 50.0)  # 100 % MT exactly
    assert gate.check_start(five, offsets=(0.0, 0.19), eeg_age_s=0.0) is None
    assert gate.check_start(burst(100.0, 6, 50.0), eeg_age_s=0.0) == "safety:burst_length"
    assert gate.check_start(five, offsets=(0.0, 0.18), eeg_age_s=0.0) == "safety:burst_rate"
    assert gate.check_start(burst(100.0, 5, 50.5), eeg_age_s=0.0) == \
        "safety:burst_intensity"


def test_bursts_of_one_trigger_each_at_the_limits() -> None:
    """The same limits when each burst is its own trigger (pulses 10 ms apart)."""
    gate = SafetyGate(limits())
    offs: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.04)  # 5 single triggers
    assert gate.check_start(Trigger(100.0, (45.0,)), offsets=offs, eeg_age_s=0.0) is None
    offs6 = (*offs, 0.05)
    assert gate.check_start(Trigger(100.0, (45.0,)), offsets=offs6,
                            eeg_age_s=0.0) == "safety:burst_length"
    # the burst gap is 40 ms: pulses 40 ms apart are a regular 25 Hz train, not a burst
    offs = tuple(k * 0.04 for k in range(6))
    assert gate.check_start(Trigger(100.0, (45.0,)), offsets=offs, eeg_age_s=0.0) is None


def test_patterned_runs_stop_at_600_pulses() -> None:
    gate = SafetyGate(limits(max_pulses_per_window=5000))
    trip = burst(0.0, 3, 40.0, 0.02)  # TBS: 50 Hz triplets every 200 ms
    offs = tuple(k * 0.2 for k in range(200))  # 600 pulses, 40 s
    assert gate.check_start(Trigger(100.0, trip.pcts, trip.offsets), offsets=offs,
                            eeg_age_s=0.0) is None
    offs = tuple(k * 0.2 for k in range(201))
    assert gate.check_start(Trigger(100.0, trip.pcts, trip.offsets), offsets=offs,
                            eeg_age_s=0.0) == "safety:train_pulses"


def test_a_device_burst_slower_than_25_hz_is_a_regular_train() -> None:
    """Its pulses are judged like any: 10 Hz at 80 % MT may last 5 s x 0.75."""
    gate = SafetyGate(limits())
    assert gate.check_start(burst(100.0, 3, 40.0, ipi=0.1), eeg_age_s=0.0) is None
    assert gate.check_start(burst(100.0, 38, 40.0, ipi=0.1), eeg_age_s=0.0) == \
        "safety:train_duration"  # 3.8 s > 3.75 s


def test_pulses_within_a_device_burst_are_at_least_10_ms_apart() -> None:
    gate = SafetyGate(limits())
    assert gate.check_start(burst(100.0, 3, 40.0, ipi=0.01), eeg_age_s=0.0) is None
    assert gate.check_start(burst(100.0, 3, 40.0, ipi=0.008), eeg_age_s=0.0) == \
        "safety:train_ipi"
    # the interval between the second and third pulse counts as well
    uneven = Trigger(100.0, (40.0,) * 3, (0.0, 0.02, 0.025))
    assert gate.check_start(uneven, eeg_age_s=0.0) == "safety:train_ipi"


def test_triggers_exactly_10_ms_after_the_last_pulse_are_allowed() -> None:
    gate = SafetyGate(limits())
    offs = (0.0, 0.01)
    assert gate.check_start(Trigger(100.0, (40.0,)), offsets=offs, eeg_age_s=0.0) is None
    assert gate.check_start(Trigger(100.0, (40.0,)), offsets=(0.0, 0.008),
                            eeg_age_s=0.0) == "safety:train_ipi"


def test_invalid_triggers_are_refused() -> None:
    gate = SafetyGate(limits())
    assert gate.check_start(Trigger(100.0, ()), eeg_age_s=0.0) == "safety:invalid_trigger"
    assert gate.check_start(Trigger(100.0, (40.0, 40.0), (0.0,)),
                            eeg_age_s=0.0) == "safety:invalid_trigger"
    assert gate.check_start(Trigger(float("nan"), (40.0,)), eeg_age_s=0.0) == \
        "safety:invalid_time"


def test_time_never_runs_backwards_in_the_ledger() -> None:
    gate = SafetyGate(limits())
    gate.commit(burst(100.0, 3, 40.0, 0.02), start=True)
    # a unit planned to start at 100.02 would overlap the burst still leaving
    assert gate.check_start(Trigger(100.02, (40.0,)), offsets=(0.0,),
                            eeg_age_s=0.0) in ("safety:invalid_time", "safety:min_interval")
    gate = SafetyGate(limits(min_interval_s=0.05))
    gate.commit(Trigger(100.0, (40.0,), (0.0,)), start=True)
    # a later trigger of a unit planned before the last pulse left
    gate.commit(Trigger(100.1, (40.0,)), start=True, triggers=2)
    assert gate.check_next(Trigger(100.05, (40.0,)), planned=100.05, max_lateness_s=1.0,
                           eeg_age_s=0.0) == "safety:invalid_time"


def test_pause_after_a_train_at_the_configured_minimum() -> None:
    """The next run comes at least ``min_inter_train_s`` after the last pulse."""
    gate = SafetyGate(limits(min_inter_train_s=3.0))
    offs = tuple(k / 10 for k in range(10))
    commit_all(gate, Trigger(100.0, (40.0,)), offs)
    last = 100.0 + offs[-1]
    assert gate.check_start(Trigger(last + 2.999, (40.0,)), eeg_age_s=0.0) == \
        "safety:inter_train"
    assert gate.check_start(Trigger(last + 3.0, (40.0,)), eeg_age_s=0.0) is None


def test_a_single_pulse_starts_no_run_and_needs_no_pause() -> None:
    """Two singles more than 1 s apart are not rTMS; a third neither. 1 s apart is (the
    1 Hz row), with 1 ms of timing tolerance."""
    gate = SafetyGate(limits(motor_threshold_pct=None))
    gate.commit(Trigger(100.0, (40.0,)), start=True)
    assert gate.check_start(Trigger(101.002, (40.0,)), eeg_age_s=0.0) is None
    gate.commit(Trigger(101.002, (40.0,)), start=True)
    assert gate.check_start(Trigger(102.004, (40.0,)), eeg_age_s=0.0) is None
    assert gate.check_start(Trigger(102.002, (40.0,)), eeg_age_s=0.0) == \
        "safety:rtms_needs_motor_threshold"


def test_the_run_is_judged_on_its_strongest_pulse() -> None:
    """A 20 Hz run that starts at 90 % MT and goes on at 110 % is judged at 110 %."""
    gate = SafetyGate(limits(train_duration_factor=1.0))
    offs = tuple(k / 20 for k in range(16))  # 0.8 s
    commit_all(gate, Trigger(100.0, (45.0,)), offs)  # 90 % MT: 2.05 s allowed
    # the run goes on at 110 % MT (1.0 s): 19 pulses pass, a 20th is 1 s of 20 Hz
    t = 100.0 + offs[-1] + 0.05
    gate.commit(Trigger(t, (55.0,)), start=True, triggers=3)
    for k in range(1, 3):
        assert gate.check_next(Trigger(t + k * 0.05, (55.0,)), planned=t + k * 0.05,
                               max_lateness_s=0.01, eeg_age_s=0.0) is None
        gate.commit(Trigger(t + k * 0.05, (55.0,)), start=False)
    assert gate.check_start(Trigger(t + 0.15, (55.0,)), eeg_age_s=0.0) == \
        "safety:train_duration"
    # at the intensity of its first pulses it could have gone on
    fresh = SafetyGate(limits(train_duration_factor=1.0))
    commit_all(fresh, Trigger(100.0, (45.0,)), tuple(k / 20 for k in range(20)))
    assert fresh.check_start(Trigger(101.001, (45.0,)), eeg_age_s=0.0) is None


def test_a_run_of_paired_pulses_is_judged_on_its_pulses() -> None:
    """Pairs at 3 ms every 200 ms are a pattern of doublets (the pairs' own gap counts once
    they are not alone): at 100 % MT allowed up to 600 pulses, at 110 % MT not at all.
    Pairs at 50 ms every 200 ms are a regular train at 20 Hz: its row of Table 4."""
    gate = SafetyGate(limits(train_duration_factor=1.0))
    pair = Trigger(100.0, (30.0, 50.0), (0.0, 0.003), paired=True)
    assert gate.check_start(pair, offsets=tuple(k * 0.2 for k in range(300)),
                            eeg_age_s=0.0) is None
    assert gate.check_start(pair, offsets=tuple(k * 0.2 for k in range(301)),
                            eeg_age_s=0.0) == "safety:train_pulses"
    strong = Trigger(100.0, (30.0, 55.0), (0.0, 0.003), paired=True)
    assert gate.check_start(strong, offsets=(0.0, 0.2), eeg_age_s=0.0) == \
        "safety:burst_intensity"
    slow = Trigger(100.0, (30.0, 50.0), (0.0, 0.05), paired=True)  # 20 Hz at 100 % MT
    assert gate.check_start(slow, offsets=tuple(k * 0.2 for k in range(8)),
                            eeg_age_s=0.0) is None  # 1.45 s + 0.05 s <= 1.6 s
    assert gate.check_start(slow, offsets=tuple(k * 0.2 for k in range(9)),
                            eeg_age_s=0.0) == "safety:train_duration"
    # a pair's 3 ms interval is no burst: above 100 % MT the pair is still fine alone
    strong = Trigger(100.0, (30.0, 60.0), (0.0, 0.003), paired=True)
    assert gate.check_start(strong, eeg_age_s=0.0) is None
    # but a conditioning + test pair at 3 ms that is not marked paired is a 2-pulse burst
    assert gate.check_start(Trigger(100.0, (30.0, 60.0), (0.0, 0.01)),
                            eeg_age_s=0.0) == "safety:burst_intensity"


def test_the_25_pulses_per_second_cap_holds_at_its_boundary() -> None:
    """Bursts of 5 every 190 ms: five (25 pulses in 0.8 s) pass, a sixth does not."""
    gate = SafetyGate(limits())
    five = burst(100.0, 5, 45.0)
    assert gate.check_start(five, offsets=tuple(k * 0.19 for k in range(5)),
                            eeg_age_s=0.0) is None
    assert gate.check_start(five, offsets=tuple(k * 0.19 for k in range(6)),
                            eeg_age_s=0.0) == "safety:hard_rate"


def test_the_hard_rate_counts_pulses_already_delivered() -> None:
    gate = SafetyGate(limits())
    commit_all(gate, burst(100.0, 5, 45.0), tuple(k * 0.19 for k in range(5)))
    # 25 pulses from 100.0 to 100.80: one more in the second after the first is too many
    assert gate.check_start(Trigger(100.99, (45.0,)), eeg_age_s=0.0) == "safety:hard_rate"
    assert gate.check_start(Trigger(101.0, (45.0,)), eeg_age_s=0.0) is None


def test_the_hard_rate_holds_inside_a_unit() -> None:
    """A unit's later trigger is refused when the second before it holds 25 pulses."""
    gate = SafetyGate(limits())
    five = burst(100.0, 5, 45.0)
    offs = tuple(k * 0.2 for k in range(5))
    gate.commit(five, start=True, triggers=len(offs))
    for k in range(1, 5):
        t = 100.0 + offs[k]
        assert gate.check_next(burst(t, 5, 45.0), planned=t, max_lateness_s=0.01,
                               eeg_age_s=0.0) is None
        gate.commit(burst(t, 5, 45.0), start=False)
    # a later trigger of a unit that somehow is still going (a unit of 6 planned)
    gate = SafetyGate(limits())
    gate.commit(five, start=True, triggers=6)
    for k in range(1, 5):
        gate.commit(burst(100.0 + offs[k], 5, 45.0), start=False)
    assert gate.check_next(burst(101.0, 5, 45.0), planned=101.0, max_lateness_s=0.01,
                           eeg_age_s=0.0) == "safety:hard_rate"


def test_the_sliding_window_counts_at_its_boundary() -> None:
    lim = limits(rate_window_s=10.0, max_pulses_per_window=3, min_interval_s=2.0)
    gate = SafetyGate(lim)
    for t in (100.0, 102.0, 104.0):
        assert gate.check_start(Trigger(t, (40.0,)), eeg_age_s=0.0) is None
        gate.commit(Trigger(t, (40.0,)), start=True)
    assert gate.check_start(Trigger(109.9, (40.0,)), eeg_age_s=0.0) == "safety:max_rate"
    # exactly one window after the first pulse, it has left the window
    assert gate.check_start(Trigger(110.0, (40.0,)), eeg_age_s=0.0) is None
    # a unit is counted whole against the window
    gate = SafetyGate(lim)
    gate.commit(Trigger(100.0, (40.0,)), start=True)
    assert gate.check_start(Trigger(102.0, (40.0,)), offsets=(0.0, 2.0),
                            eeg_age_s=0.0) is None
    assert gate.check_start(Trigger(102.0, (40.0,)), offsets=(0.0, 2.0, 4.0),
                            eeg_age_s=0.0) == "safety:max_rate"


def test_the_window_holds_inside_a_unit() -> None:
    lim = limits(rate_window_s=10.0, max_pulses_per_window=3, min_interval_s=2.0)
    gate = SafetyGate(lim)
    gate.commit(Trigger(90.0, (40.0,)), start=True)
    gate.commit(Trigger(95.0, (40.0,)), start=True)
    gate.commit(Trigger(98.0, (40.0,)), start=True, triggers=3)
    # the unit's second trigger: the window already holds 3 pulses
    assert gate.check_next(Trigger(99.9, (40.0,)), planned=99.9, max_lateness_s=0.01,
                           eeg_age_s=0.0) == "safety:max_rate"
    assert gate.check_next(Trigger(100.0, (40.0,)), planned=100.0, max_lateness_s=0.01,
                           eeg_age_s=0.0) is None


def test_session_and_protocol_budgets_allow_their_last_pulse() -> None:
    lim = limits(max_pulses=3, min_interval_s=2.0)
    gate = SafetyGate(lim)
    assert gate.check_start(Trigger(100.0, (40.0,)), offsets=(0.0, 2.0, 4.0),
                            eeg_age_s=0.0) is None
    assert gate.check_start(Trigger(100.0, (40.0,)), offsets=(0.0, 2.0, 4.0, 6.0),
                            eeg_age_s=0.0) == "safety:max_pulses"
    gate = SafetyGate(limits())
    gate.set_budget(2)
    pair = Trigger(100.0, (30.0, 40.0), (0.0, 0.003), paired=True)
    assert gate.check_start(pair, eeg_age_s=0.0) is None
    gate.set_budget(1)
    assert gate.check_start(pair, eeg_age_s=0.0) == "safety:protocol_pulses"


def test_the_days_pulses_without_a_shared_counter() -> None:
    gate = SafetyGate(limits(max_pulses_per_day=3, min_interval_s=2.0))
    assert gate.day_count == 0
    for t in (100.0, 102.0):
        gate.commit(Trigger(t, (40.0,)), start=True)
    assert gate.day_count == 2
    assert gate.check_start(Trigger(104.0, (40.0,)), eeg_age_s=0.0) is None
    assert gate.check_start(Trigger(104.0, (40.0,)), offsets=(0.0, 2.0),
                            eeg_age_s=0.0) == "safety:max_pulses_per_day"


class Budget:
    """A day budget in memory (the real one is tested in test_day_counter.py)."""

    def __init__(self, limit: int, used: int = 0) -> None:
        self.limit, self.used = limit, used

    def reserve(self, n: int) -> int:
        got = max(0, min(n, self.limit - self.used))
        self.used += got
        return got

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)

    def count(self) -> int:
        return self.used

    def day(self) -> str:
        return "2026-12-01"


def test_the_days_pulses_are_reserved_and_given_back() -> None:
    day = Budget(limit=100, used=7)  # 7 pulses earlier today, in another session
    gate = SafetyGate(limits(min_interval_s=2.0), day=day)
    assert gate.day_count == 7
    # nothing reserved yet: refused as pending, not as exhausted
    assert gate.check_start(Trigger(100.0, (40.0,)), eeg_age_s=0.0) == \
        "safety:day_count_pending"
    gate.top_up(5)
    assert (day.used, gate.credit, gate.day_count) == (12, 5, 12)
    gate.top_up(5)  # already held: nothing more
    assert day.used == 12
    for t in (100.0, 102.0, 104.0):
        gate.commit(Trigger(t, (40.0,)), start=True)
    assert gate.credit == 2
    gate.top_up(3)  # one more to hold 3
    assert (day.used, gate.credit) == (13, 3)
    gate.settle()  # the 3 unused go back
    assert (day.used, gate.credit, gate.day_count) == (10, 0, 10)


def test_a_day_budget_used_up_exactly_is_pending_then_exhausted() -> None:
    day = Budget(limit=10)
    gate = SafetyGate(limits(min_interval_s=2.0), day=day)
    gate.top_up(5)  # granted in full: the day is not used up
    for k in range(5):
        gate.commit(Trigger(100.0 + 2 * k, (40.0,)), start=True)
    assert gate.check_start(Trigger(120.0, (40.0,)), eeg_age_s=0.0) == \
        "safety:day_count_pending"
    gate.top_up(10)  # only 5 left today
    assert gate.credit == 5
    assert gate.check_start(Trigger(120.0, (40.0,)), offsets=tuple(2.0 * k for k in range(6)),
                            eeg_age_s=0.0) == "safety:max_pulses_per_day"


def test_a_unit_stopped_early_gives_its_pulses_back() -> None:
    day = Budget(limit=100)
    gate = SafetyGate(limits(min_interval_s=2.0), day=day)
    gate.top_up(10)
    gate.set_budget(10)
    gate.commit(Trigger(100.0, (40.0,)), start=True, triggers=5)  # 5 held, 1 delivered
    assert (gate.credit, gate.budget) == (5, 5)
    assert gate.unit_active
    gate.end_unit()
    assert not gate.unit_active
    assert (gate.credit, gate.budget) == (9, 9)
    gate.end_unit()  # nothing under way: nothing changes
    assert (gate.credit, gate.budget) == (9, 9)
    # a unit that delivered everything gives nothing back
    gate.commit(Trigger(110.0, (40.0,)), start=True, triggers=1)
    gate.end_unit()
    assert (gate.credit, gate.budget) == (8, 8)


def test_a_unit_stopped_early_without_a_day_budget() -> None:
    gate = SafetyGate(limits(min_interval_s=2.0))
    gate.set_budget(4)
    gate.commit(Trigger(100.0, (40.0,)), start=True, triggers=3)
    gate.end_unit()
    assert gate.budget == 3
    assert gate.credit == 0


def test_stale_eeg_stops_a_unit_under_way() -> None:
    gate = SafetyGate(limits(max_eeg_age_ms=100.0))
    assert gate.check_start(Trigger(100.0, (40.0,)), eeg_age_s=0.1) is None  # the limit
    assert gate.check_start(Trigger(100.0, (40.0,)), eeg_age_s=0.1001) == "safety:eeg_stale"
    assert gate.check_start(Trigger(100.0, (40.0,)), eeg_age_s=None) == "safety:eeg_stale"
    gate.commit(Trigger(100.0, (40.0,)), start=True, triggers=3)
    assert gate.check_next(Trigger(100.1, (40.0,)), planned=100.1, max_lateness_s=0.01,
                           eeg_age_s=0.2) == "safety:eeg_stale"
    assert gate.check_next(Trigger(100.1, (40.0,)), planned=100.1, max_lateness_s=0.01,
                           eeg_age_s=0.05) is None


def test_intensity_limits_at_their_boundary() -> None:
    gate = SafetyGate(limits(max_intensity_pct=80.0, motor_threshold_pct=None))
    for pct in (0.0, 0.5, 80.0):
        assert gate.check_start(Trigger(100.0, (pct,)), eeg_age_s=0.0) is None
    assert gate.check_start(Trigger(100.0, (80.01,)), eeg_age_s=0.0) == "safety:max_intensity"
    assert gate.check_start(Trigger(100.0, (-0.1,)), eeg_age_s=0.0) == \
        "safety:invalid_intensity"
    gate.commit(Trigger(100.0, (40.0,)), start=True, triggers=2)
    assert gate.check_next(Trigger(101.0, (90.0,)), planned=101.0, max_lateness_s=0.01,
                           eeg_age_s=0.0) == "safety:max_intensity"


def test_a_later_trigger_must_repeat_the_units_pulses() -> None:
    gate = SafetyGate(limits())
    trip = burst(100.0, 3, 40.0, 0.02)
    gate.commit(trip, start=True, triggers=3)
    assert gate.check_next(burst(100.2, 3, 40.0, 0.02), planned=100.2, max_lateness_s=0.01,
                           eeg_age_s=0.0) is None
    for other in (burst(100.2, 3, 40.0, 0.01), burst(100.2, 2, 40.0, 0.02),
                  burst(100.2, 3, 41.0, 0.02),
                  Trigger(100.2, (40.0, 40.0), (0.0, 0.02), paired=True)):
        assert gate.check_next(other, planned=100.2, max_lateness_s=0.01,
                               eeg_age_s=0.0) == "safety:unit_intensity_changed"
    gate = SafetyGate(limits())
    gate.commit(Trigger(100.0, (30.0, 40.0), (0.0, 0.003), paired=True), start=True,
                triggers=2)
    assert gate.check_next(Trigger(100.2, (30.0, 40.0), (0.0, 0.003)), planned=100.2,
                           max_lateness_s=0.01, eeg_age_s=0.0) == \
        "safety:unit_intensity_changed"


def test_a_later_trigger_is_on_time_within_its_window() -> None:
    gate = SafetyGate(limits())
    gate.commit(Trigger(100.0, (40.0,)), start=True, triggers=3)
    planned = 100.2
    assert gate.check_next(Trigger(planned - 0.002, (40.0,)), planned=planned,
                           max_lateness_s=0.005, eeg_age_s=0.0) is None
    assert gate.check_next(Trigger(planned + 0.005, (40.0,)), planned=planned,
                           max_lateness_s=0.005, eeg_age_s=0.0) is None
    assert gate.check_next(Trigger(planned - 0.0021, (40.0,)), planned=planned,
                           max_lateness_s=0.005, eeg_age_s=0.0) == "late"
    assert gate.check_next(Trigger(planned + 0.0051, (40.0,)), planned=planned,
                           max_lateness_s=0.005, eeg_age_s=0.0) == "late"


def test_only_one_unit_at_a_time_and_none_without_one() -> None:
    gate = SafetyGate(limits())
    assert gate.check_next(Trigger(100.0, (40.0,)), planned=100.0, max_lateness_s=0.01,
                           eeg_age_s=0.0) == "safety:no_unit"
    gate.commit(Trigger(100.0, (40.0,)), start=True, triggers=3)
    assert gate.check_start(Trigger(105.0, (40.0,)), eeg_age_s=0.0) == \
        "safety:unit_in_progress"


def test_a_units_triggers_must_be_in_order() -> None:
    gate = SafetyGate(limits())
    for offs in ((), (0.1, 0.2), (0.0, 0.1, 0.1)):
        assert gate.check_start(Trigger(100.0, (40.0,)), offsets=offs, eeg_age_s=0.0) == \
            "safety:invalid_train"


def test_a_unit_at_exactly_one_second_from_the_last_trigger() -> None:
    """A trigger 1 s after the last continues its run (the unit is judged with the pulse
    before it); just over 1 s after it starts a new run, judged whole on its own."""
    gate = SafetyGate(limits(train_duration_factor=1.0))
    gate.commit(Trigger(100.0, (50.0,)), start=True)
    offs = tuple(k / 10 for k in range(50))  # 5 s at 10 Hz and 100 % MT: allowed alone
    assert gate.check_start(Trigger(101.002, (50.0,)), offsets=offs, eeg_age_s=0.0) is None
    assert gate.check_start(Trigger(101.0, (50.0,)), offsets=offs, eeg_age_s=0.0) == \
        "safety:train_duration"  # with the pulse 1 s before: 6 s
    offs = tuple(k / 10 for k in range(51))
    assert gate.check_start(Trigger(101.002, (50.0,)), offsets=offs, eeg_age_s=0.0) == \
        "safety:train_duration"


def test_the_ledger_records_every_pulse() -> None:
    gate = SafetyGate(limits(motor_threshold_pct=50.0))
    gate.commit(Trigger(100.0, (40.0,)), start=True)
    gate.commit(Trigger(102.0, (30.0, 45.0), (0.0, 0.003), paired=True), start=True)
    gate.commit(burst(104.001, 3, 40.0, 0.02), start=True, triggers=2)
    got = [(round(p.t, 6), p.pct, p.mt_pct, p.role, p.unit) for p in gate.ledger]
    assert got == [(100.0, 40.0, 80.0, "single", 1),
                   (102.0, 30.0, 60.0, "conditioning", 2),
                   (102.003, 45.0, 90.0, "test", 2),
                   (104.001, 40.0, 80.0, "burst", 3),
                   (104.021, 40.0, 80.0, "burst", 3),
                   (104.041, 40.0, 80.0, "burst", 3)]
    assert gate.fired == 6
    gate = SafetyGate(limits(motor_threshold_pct=None))
    gate.commit(Trigger(100.0, (40.0,)), start=True)
    assert gate.ledger[0].mt_pct is None


def test_limits_are_clamped_by_the_hard_caps() -> None:
    cfg = SafetyConfig(min_interval_s=1.0, max_intensity_pct=80.0, max_eeg_age_ms=250.0,
                       motor_threshold_pct=50.0)
    lim = SafetyLimits.from_config(cfg)
    assert lim.max_eeg_age_s == pytest.approx(0.25)
    assert lim.max_coil_temp_c == cfg.max_coil_temp_c
    assert lim.max_pulses_per_day == cfg.max_pulses_per_day
    assert lim.train_duration_factor == cfg.train_duration_factor
    assert lim.max_burst_intensity_mt == cfg.max_burst_intensity_mt


# -- gated.py: the arm state, the device's truth and the fire path ---------------------
def test_nothing_fires_before_arming_or_after_disarming() -> None:
    clock, drv, gated, _ = rig(arm=False)
    assert not gated.armed
    assert gated.fire_now().reason == "disarmed"
    gated.arm()
    assert gated.armed
    clock.t += 10.0
    assert gated.fire_now().fired
    gated.disarm()
    assert not gated.armed
    clock.t += 10.0
    got = gated.fire_now()
    assert (got.fired, got.reason, got.lsl_time, got.command_time) == \
        (False, "disarmed", None, clock.t)
    assert len(drv.delivered) == 1


def test_a_hot_coil_and_a_device_not_ready_refuse() -> None:
    clock = Clock()
    drv = Hot(clock=clock)
    _, _, gated, _ = rig(limits(), drv=drv, clock=clock)
    drv.temp_c = 40.0  # the limit itself
    clock.t += 10.0
    assert gated.fire_now().fired
    drv.temp_c = 40.5
    clock.t += 10.0
    got = gated.fire_now()
    assert (got.fired, got.reason, got.command_time) == \
        (False, "safety:coil_temperature", clock.t)
    drv.temp_c = None
    drv.disarm()  # the device disarmed itself (a timeout on the device)
    clock.t += 10.0
    assert gated.fire_now().reason == "device_not_ready"
    assert len(drv.delivered) == 1


def test_a_device_fault_refuses_and_blocks_arming_until_reconnected() -> None:
    clock, drv, gated, _ = rig()
    drv.report_fault("keep-alive missed")
    assert not gated.armed
    assert gated.blocked == "keep-alive missed"
    assert gated.faults == ["keep-alive missed"]  # type: ignore[attr-defined]
    clock.t += 10.0
    assert gated.fire_now().reason == "disarmed"
    with pytest.raises(StimulatorError, match="keep-alive missed"):
        gated.arm()
    drv.open()  # reconnected: the fault is cleared on the driver, the gate still blocks
    with pytest.raises(StimulatorError, match="reconnected fully: keep-alive missed"):
        gated.arm()
    gated.reconnected()
    assert gated.blocked is None
    gated.arm()
    clock.t += 10.0
    assert gated.fire_now().fired


def test_a_fault_found_on_the_device_is_reported_once_and_blocks() -> None:
    clock, drv, gated, _ = rig()
    drv.turn_knob(70.0)  # the front panel, then a read-back that the driver does not judge
    drv.read_device()
    clock.t += 10.0
    got = gated.fire_now()
    assert (got.fired, got.reason, got.command_time) == \
        (False, "safety:device_mismatch", clock.t)
    assert not gated.armed
    assert drv.fault is not None and "70%" in drv.fault
    assert gated.blocked == drv.fault
    assert gated.faults == [drv.fault]  # type: ignore[attr-defined]
    assert drv.delivered == []
    drv.open()
    with pytest.raises(StimulatorError, match=r"reconnected, but .*70%"):
        gated.reconnected()  # the knob is still at 70 %
    assert gated.blocked is not None
    drv.turn_knob(40.0)
    drv.read_device()
    gated.reconnected()
    gated.arm()
    clock.t += 10.0
    assert gated.fire_now().fired


def test_a_unit_is_judged_whole_at_its_first_trigger() -> None:
    """A 10 Hz train of 4 s at 110 % MT is refused at its first trigger, not on the way."""
    clock, drv, gated, _ = rig(limits(), 55.0)
    offs = tuple(k / 10 for k in range(40))
    clock.t = 2000.0
    assert gated.fire_now(offsets=offs, index=0, planned=clock.t).reason == \
        "safety:train_duration"
    assert drv.delivered == []
    offs = tuple(k / 10 for k in range(30))
    assert fire_unit(clock, gated, 2000.0, offs) == ["fired"] * 30


def test_later_triggers_are_checked_against_their_plan() -> None:
    clock, drv, gated, _ = rig()
    offs = (0.0, 0.1, 0.2)
    clock.t = 2000.0
    assert gated.fire_now(offsets=offs, index=0, planned=2000.0).fired
    clock.t = 2000.2  # the second trigger, 100 ms late
    assert gated.fire_now(offsets=offs, index=1, planned=2000.1,
                          max_lateness_s=0.01).reason == "late"
    # a unit refused part-way is over: it is not retried, nor continued by another plan
    assert gated.fire_now(offsets=offs, index=1, planned=2000.1,
                          max_lateness_s=0.2).reason == "safety:no_unit"
    # a unit started without a plan: "now" (plus the trigger latency) is each trigger's plan
    clock.t = 2010.0
    assert gated.fire_now(offsets=offs, index=0).fired
    clock.t = 2010.1
    assert gated.fire_now(offsets=offs, index=1, max_lateness_s=0.0).fired
    gated.end_unit()  # stopped after two of its three triggers
    # with a plan, a later trigger must be the next one at its own planned time
    clock.t = 2020.0
    assert gated.fire_now(offsets=offs, index=0, planned=2020.0).fired
    clock.t = 2020.2
    assert gated.fire_now(offsets=offs, index=2, planned=2020.2).reason == \
        "safety:not_the_unit"
    assert len(drv.delivered) == 4


def test_the_latency_is_added_not_subtracted() -> None:
    """The gate judges when the pulse will leave: command time plus the latency."""
    clock = Clock()
    drv = FakeStimulator(clock=clock, latency_s=0.5)
    _, _, gated, _ = rig(limits(min_interval_s=2.0), drv=drv, clock=clock)
    clock.t = 2000.0
    got = gated.fire_now()
    assert got.fired and got.lsl_time == 2000.5
    clock.t = 2001.6  # leaves at 2002.1: 1.6 s after the last pulse
    assert gated.fire_now().reason == "safety:min_interval"
    clock.t = 2002.0  # leaves at 2002.5
    assert gated.fire_now().fired


def test_fire_results_say_what_left() -> None:
    clock, drv, gated, _ = rig(limits(), None, arm=False)
    gated.set_paired(30.0, 45.0, 3.0)
    gated.arm()
    clock.t = 2000.0
    got = gated.fire_now()
    assert (got.fired, got.reason, got.lsl_time, got.command_time) == \
        (True, "fired", 2000.0, 2000.0)
    assert got.pulses == tuple(drv.delivered)
    assert [round(t - 2000.0, 6) for t, _ in got.pulses] == [0.0, 0.003]
    assert [(round(p.t, 6), p.pct) for p in gated.gate.ledger] == \
        [(round(t, 6), p) for t, p in drv.delivered]


def test_fired_late_the_ledger_has_when_it_left() -> None:
    clock = Clock()
    drv = FakeStimulator(clock=clock, latency_s=0.001)
    _, _, gated, _ = rig(drv=drv, clock=clock)
    offs = (0.0, 0.1)
    clock.t = 2000.0
    assert gated.fire_now(offsets=offs, index=0, planned=2000.0).fired
    clock.t = 2000.103  # 4 ms late
    assert gated.fire_now(offsets=offs, index=1, planned=2000.1, max_lateness_s=0.01).fired
    assert [p.t for p in gated.gate.ledger] == [t for t, _ in drv.delivered] == \
        [2000.001, 2000.104]


def test_a_device_burst_is_judged_as_the_pulses_it_gives() -> None:
    """A device left in burst mode with no intensity commanded: the gate takes the
    device's settings and judges all the pulses of each trigger."""
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    drv.turn_knob(40.0)
    drv.set_front_panel_mode(3, 20.0)
    _, _, gated, _ = rig(limits(), None, drv=drv, clock=clock)
    assert gated.commanded == (40.0, 40.0, 40.0)
    offs = (0.0, 0.2, 0.4)
    clock.t = 2000.0
    got = gated.fire_now(offsets=offs, index=0, planned=clock.t)
    assert got.fired
    assert got.pulses == tuple(drv.delivered)
    assert [round(t - 2000.0, 6) for t, _ in got.pulses] == [0.0, 0.02, 0.04]
    assert [r.role for r in gated.gate.ledger] == ["burst"] * 3
    drv.turn_knob(45.0)  # raised on the panel: a mismatch with the adopted settings
    drv.read_device()
    clock.t = 2000.2
    assert gated.fire_now(offsets=offs, index=1, planned=clock.t).reason == \
        "safety:device_mismatch"


def test_the_device_state_gives_its_pulses() -> None:
    def dev(n: int, mode: str, a: float | None = 40.0, b: float | None = None,
            isi: float | None = 20.0) -> DeviceState:
        return DeviceState(intensity_pct=a, intensity_b_pct=b, pulses_per_trigger=n,
                           isi_ms=isi, mode=mode, source="device", read_at=0.0)

    assert trigger_of(dev(1, "standard", isi=None), 5.0) == Trigger(5.0, (40.0,))
    assert trigger_of(dev(2, "twin", b=50.0, isi=3.0), 5.0) == \
        Trigger(5.0, (40.0, 50.0), (0.0, 0.003), paired=True)
    assert trigger_of(dev(2, "twin", isi=3.0), 5.0) == \
        Trigger(5.0, (40.0, 40.0), (0.0, 0.003), paired=True)  # B not given: A's
    assert trigger_of(dev(2, "burst"), 5.0) == Trigger(5.0, (40.0, 40.0), (0.0, 0.02))
    assert trigger_of(dev(3, "train"), 5.0) == \
        Trigger(5.0, (40.0,) * 3, (0.0, 0.02, 0.04))
    assert trigger_of(dev(1, "standard", a=None), 5.0) is None


def test_intensities_are_checked_against_the_limit_when_set() -> None:
    clock, drv, gated, _ = rig(limits(max_intensity_pct=80.0), None, arm=False)
    gated.set_intensity(0.0)
    gated.set_intensity(80.0)  # the limit itself
    assert gated.intensity_pct == 80.0
    for bad in (80.5, -1.0, float("nan")):
        with pytest.raises(StimulatorError, match=r"refused: outside 0...80% \(safety"):
            gated.set_intensity(bad)
        with pytest.raises(StimulatorError, match="refused: outside"):
            gated.set_paired(bad, 40.0, 3.0)
        with pytest.raises(StimulatorError, match="refused: outside"):
            gated.set_paired(40.0, bad, 3.0)
    assert drv.device is not None and drv.device.intensity_pct == 80.0
    gated.arm()  # 80 % is allowed
    clock.t += 10.0
    assert gated.fire_now().fired


def test_a_device_that_stores_whole_percent() -> None:
    """The read-back is the truth: 60.5 % set is 60 % on the device, and fires."""
    clock = Clock()
    drv = WholePercent(clock=clock)
    _, _, gated, _ = rig(limits(), 60.5, drv=drv, clock=clock)
    assert gated.commanded == (60.0,)
    clock.t += 10.0
    assert gated.fire_now().pulses == ((clock.t, 60.0),)


def test_a_device_that_rounds_above_the_limit_is_disarmed() -> None:
    clock = Clock()
    drv = WholePercent(clock=clock)
    _, _, gated, _ = rig(limits(max_intensity_pct=79.8), None, drv=drv, clock=clock,
                         arm=False)
    with pytest.raises(StimulatorError, match="device set to 80%, above the safety limit"):
        gated.set_intensity(79.6)
    assert not gated.armed
    assert drv.fault is not None and "above the safety limit" in drv.fault


class Deaf(FakeStimulator):
    """A device that ignores intensity commands (a knob locked on the panel)."""

    def set_intensity(self, pct: float) -> float:
        keep = self.device_a
        super().set_intensity(pct)
        self.device_a = keep
        self.read_device()
        return float(pct)


def test_a_device_that_did_not_take_the_intensity_is_disarmed() -> None:
    clock = Clock()
    drv = Deaf(clock=clock)
    drv.open()
    drv.turn_knob(30.0)
    _, _, gated, _ = rig(limits(), None, drv=drv, clock=clock, arm=False)
    with pytest.raises(StimulatorError,
                       match="the device reads 30% after being set to 50%: disarmed"):
        gated.set_intensity(50.0)
    assert not gated.armed
    assert gated.commanded == (50.0,)  # what was asked: nothing fires until it is there
    assert drv.fault is not None and "asked for 50%, the device reads 30%" in drv.fault
    assert gated.faults == [drv.fault]  # type: ignore[attr-defined]


def test_set_intensity_in_paired_mode_changes_the_test_pulse() -> None:
    clock, _, gated, _ = rig(limits(), None, arm=False)
    gated.set_paired(30.0, 45.0, 3.0)
    assert gated.paired == (30.0, 3.0)
    gated.set_intensity(50.0)
    assert gated.commanded == (30.0, 50.0)
    assert gated.intensity_pct == 50.0
    gated.arm()
    clock.t = 2000.0
    got = gated.fire_now()
    assert [(round(t - 2000.0, 6), p) for t, p in got.pulses] == [(0.0, 30.0), (0.003, 50.0)]


def test_no_change_while_a_unit_is_under_way() -> None:
    clock, _, gated, _ = rig()
    offs = (0.0, 0.5)
    clock.t = 2000.0
    assert gated.fire_now(offsets=offs, index=0, planned=clock.t).fired
    with pytest.raises(StimulatorError, match="paired-pulse change refused: a unit"):
        gated.set_paired(30.0, 40.0, 3.0)
    with pytest.raises(StimulatorError, match="intensity change refused: a unit"):
        gated.set_intensity(40.0)
    gated.end_unit(2000.0)
    gated.set_intensity(45.0)  # the unit ended: allowed again


def test_a_failed_fire_counts_and_disarms() -> None:
    """The pulse may have left: it is in the ledger, the unit goes on counting."""
    clock, drv, gated, _ = rig()
    offs = (0.0, 0.5, 1.0)
    clock.t = 2000.0
    drv.fail_next_fire(StimulatorError("port gone"), delivered=True)
    got = gated.fire_now(offsets=offs, index=0, planned=clock.t)
    assert (got.fired, got.reason, got.lsl_time, got.command_time) == \
        (False, "fire_failed", None, 2000.0)
    assert not gated.armed
    assert gated.gate.fired == 1 and len(gated.gate.ledger) == 1
    assert gated.gate.units == 1 and gated.gate.unit_active  # two triggers still held
    assert gated.blocked is not None and "port gone" in gated.blocked


def test_a_failed_later_trigger_counts_in_its_unit() -> None:
    clock, drv, gated, _ = rig()
    offs = (0.0, 0.5)
    clock.t = 2000.0
    assert gated.fire_now(offsets=offs, index=0, planned=clock.t).fired
    clock.t = 2000.5
    drv.fail_next_fire(StimulatorError("error reply"))
    assert gated.fire_now(offsets=offs, index=1, planned=clock.t).reason == "fire_failed"
    assert gated.gate.units == 1 and not gated.gate.unit_active
    assert gated.gate.fired == 2


def test_a_bug_in_the_fire_path_disarms_and_propagates() -> None:
    clock, drv, gated, _ = rig()
    offs = (0.0, 0.5)
    clock.t = 2000.0
    drv.fail_next_fire(RuntimeError("driver bug"))
    with pytest.raises(StimulatorError, match="fire failed, disarmed: driver bug"):
        gated.fire_now(offsets=offs, index=0, planned=clock.t)
    assert not gated.armed
    assert drv.disarms >= 1
    assert gated.gate.fired == 1 and gated.gate.units == 1 and gated.gate.unit_active


def test_arming_refuses_a_device_above_the_limit_or_unknown() -> None:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(limits(max_intensity_pct=80.0)),
                            eeg_age_s=lambda: 0.0, clock=clock)
    with pytest.raises(StimulatorError, match="the device does not say its intensity"):
        gated.arm()
    drv.turn_knob(80.0)
    gated.arm()  # the limit itself
    assert gated.commanded == (80.0,)


def test_a_refusal_by_the_gate_is_not_a_fire() -> None:
    clock, drv, gated, _ = rig(limits(min_interval_s=2.0))
    clock.t = 2000.0
    assert gated.fire_now().fired
    clock.t = 2001.0
    got = gated.fire_now()
    assert (got.fired, got.reason, got.lsl_time, got.command_time, got.pulses) == \
        (False, "safety:min_interval", None, 2001.0, ())
    assert len(drv.delivered) == 1


def test_a_unit_of_26_pulses_in_a_second_is_refused_at_its_start() -> None:
    gate = SafetyGate(limits())
    offs = (*(k * 0.19 for k in range(5)), 0.95)  # 5 bursts of 5, then one more pulse
    five = burst(100.0, 5, 45.0)
    assert gate.check_start(five, offsets=offs[:5], eeg_age_s=0.0) is None
    # the single pulse is its own trigger here: the last one of the unit, 26th in 1 s
    singles = (*(o + k * 0.01 for o in offs[:5] for k in range(5)), 0.95)
    assert gate.check_start(Trigger(100.0, (45.0,)), offsets=singles,
                            eeg_age_s=0.0) == "safety:hard_rate"


def test_a_unit_stopped_with_one_pulse_left_gives_it_back() -> None:
    gate = SafetyGate(limits(min_interval_s=2.0))
    gate.set_budget(2)
    gate.commit(Trigger(100.0, (40.0,)), start=True, triggers=2)
    assert gate.budget == 0
    gate.end_unit()
    assert gate.budget == 1


# -- added after the second review: the fire path's own checks ---------------------------

def test_a_first_trigger_later_than_its_lateness_is_refused_by_the_gate() -> None:
    """The fire thread checks lateness before the gate; the gate checks it again once it
    holds the driver's port (a serial fire may have waited for a keep-alive)."""
    clock, drv, gated, _ = rig()
    clock.t = 2000.0
    got = gated.fire_now(planned=1999.995, max_lateness_s=0.001)
    assert got == FireResult(False, "late", None, 2000.0) and drv.delivered == []
    assert gated.fire_now(planned=1999.999, max_lateness_s=0.001).fired  # at its limit
    clock.t = 2010.0
    # a later trigger is judged by the unit's plan, not by this rule
    offs = (0.0, 0.1)
    assert gated.fire_now(offsets=offs, index=0, planned=2010.0).fired
    clock.t = 2010.1005
    assert gated.fire_now(offsets=offs, index=1, planned=2010.1, max_lateness_s=0.001).fired


def test_a_paired_interval_changed_on_the_device_is_a_mismatch() -> None:
    clock, drv, gated, _ = rig(pct=None, arm=False)
    gated.set_paired(30.0, 50.0, 3.0)
    gated.arm()
    drv.set_front_panel_mode(2, 3.4)  # within the half millisecond a device rounds to
    drv.read_device()
    clock.t += 10.0
    assert gated.fire_now().fired
    drv.set_front_panel_mode(2, 3.6)
    drv.read_device()
    clock.t += 10.0
    got = gated.fire_now()
    assert got.reason == "safety:device_mismatch" and not gated.armed
    assert len(drv.delivered) == 2  # the one pair at 3.4 ms only


def test_a_disarm_that_fails_during_a_fault_does_not_hide_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, drv, gated, _ = rig()
    drv.turn_knob(70.0)
    drv.read_device()

    def broken() -> None:
        raise RuntimeError("the port is gone")

    monkeypatch.setattr(drv, "disarm", broken)
    clock.t += 10.0
    got = gated.fire_now()  # the mismatch is found; the failing disarm is swallowed
    assert got.reason == "safety:device_mismatch" and not gated.armed
    assert gated.blocked is not None and drv.delivered == []


# -- the rules' run state at real times (a plan is simulated from t = 0, which hides
# -- mistakes that add instead of subtract times) -------------------------------------

RULES = limits(motor_threshold_pct=50.0).rules()


def deliver(*trigs: Trigger) -> tuple[str | None, RunState]:
    """Judge and deliver ``trigs`` in order; the first refusal, and the state."""
    s = RunState()
    for trig in trigs:
        reason, s = judge(s, trig, RULES)
        if reason is not None:
            return reason, s
    return None, s


def test_bursts_too_close_in_a_run_at_real_times() -> None:
    t = 5000.0
    tri = [Trigger(t + o, (40.0,)) for o in (0.0, 0.01, 0.02, 0.1, 0.11, 0.12)]
    assert deliver(*tri)[0] == "safety:burst_rate"
    ok = [Trigger(t + o, (40.0,)) for o in (0.0, 0.01, 0.02, 0.2, 0.21, 0.22)]
    assert deliver(*ok)[0] is None


def test_a_lone_pair_is_no_pattern_but_a_run_of_pairs_is() -> None:
    t = 5000.0
    strong = (30.0, 65.0)  # the test pulse at 130 % MT
    assert deliver(Trigger(t, strong, (0.0, 0.003), paired=True))[0] is None
    assert deliver(Trigger(t, strong, (0.0, 0.003), paired=True),
                   Trigger(t + 0.2, strong, (0.0, 0.003), paired=True))[0] == \
        "safety:burst_intensity"  # doublets: the burst rules, at most 100 % MT
    reason, s = deliver(Trigger(t, (30.0, 50.0), (0.0, 0.003), paired=True),
                        Trigger(t + 0.2, (30.0, 50.0), (0.0, 0.003), paired=True))
    assert reason is None and s.run_patterned and s.run_triggers == 2
    assert abs(s.run_min_gap - 0.003) < 1e-9  # the first pair's gap, folded in


def test_a_long_pair_then_a_pulse_is_judged_on_the_pair_gap() -> None:
    """A lone pair at 50 ms followed 250 ms later by a pulse: a run whose fastest gap is
    the pair's (20 Hz), not 4 Hz."""
    t = 5000.0
    reason, s = deliver(Trigger(t, (50.0, 50.0), (0.0, 0.05), paired=True),
                        Trigger(t + 0.3, (50.0,)))
    assert reason is None and abs(s.run_min_gap - 0.05) < 1e-9 and not s.run_patterned
    assert s.run_triggers == 2 and s.run_pulses == 3


def test_a_single_pulse_in_a_pattern_is_refused_once_the_next_burst_starts() -> None:
    t = 5000.0
    single, burst1 = Trigger(t, (40.0,)), [Trigger(t + 0.5 + o, (40.0,)) for o in (0.0, 0.02)]
    assert deliver(single, *burst1)[0] == "safety:burst_mixed"
    head = [Trigger(t + o, (40.0,)) for o in (0.0, 0.02, 0.04)]
    assert deliver(*head, Trigger(t + 0.5, (40.0,)))[0] is None  # a last single: allowed
    assert deliver(*head, Trigger(t + 0.5, (40.0,)), Trigger(t + 0.9, (40.0,)))[0] == \
        "safety:burst_mixed"
    reason, s = deliver(*head, *[Trigger(t + 0.2 + o, (40.0,)) for o in (0.0, 0.02)])
    assert reason is None and s.run_min_group == 3 and s.group_size == 2


def test_a_run_ends_after_more_than_one_second() -> None:
    t = 5000.0
    reason, s = deliver(Trigger(t, (40.0,)), Trigger(t + 1.0, (40.0,)))
    assert reason is None and s.run_triggers == 2 and s.run_repetitive
    reason, s = deliver(Trigger(t, (40.0,)), Trigger(t + 1.0011, (40.0,)))
    assert reason is None and s.run_triggers == 1 and not s.run_repetitive
    assert s.run_first == t + 1.0011 and s.run_max_group == 1 and s.group_onset == t + 1.0011
