"""The safety gate's rules over the delivered sequence: trains, bursts, paired pulses, the
pauses between them, and the attacks that got through the old gate (rTMS made of single
pulses, intensities changed inside a unit, a device that was not at its commanded
setting). The property test with an independent oracle is in test_gate_property.py."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from closedloop.config.schema import SafetyConfig, StimulationConfig
from closedloop.errors import StimulatorError
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import unit_for
from closedloop.stim.safety import SafetyGate, SafetyLimits, Trigger, max_train_duration_s


def limits(**kw: Any) -> SafetyLimits:
    base: dict[str, Any] = {"min_interval_s": 1.0, "max_intensity_pct": 80.0,
                            "max_pulses": 5000, "rate_window_s": 60.0,
                            "max_pulses_per_window": 5000, "max_eeg_age_ms": 100.0,
                            "motor_threshold_pct": 50.0}
    base.update(kw)
    return SafetyLimits.from_config(SafetyConfig(**base))


def offsets(n: int, hz: float) -> tuple[float, ...]:
    return tuple(k / hz for k in range(n))


def single(t: float, pct: float) -> Trigger:
    return Trigger(t, (pct,))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rig(lim: SafetyLimits, pct: float = 60.0, **gate_kw: Any
        ) -> tuple[Clock, FakeStimulator, GatedStimulator]:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(lim, **gate_kw), eeg_age_s=lambda: 0.0,
                            clock=clock)
    gated.set_intensity(pct)
    gated.arm()
    return clock, drv, gated


def test_rossi_table_lookup_rounds_up() -> None:
    assert max_train_duration_s(10, 110) == 5.0
    assert max_train_duration_s(10, 115) == 4.2  # the 120 % column
    assert max_train_duration_s(20, 100) == 1.6
    assert max_train_duration_s(12, 100) == 1.6  # the 20 Hz row
    assert max_train_duration_s(0.5, 80) == 1800.0
    assert max_train_duration_s(26, 100) is None
    assert max_train_duration_s(10, 131) is None


@pytest.mark.parametrize(("units", "intensity", "expect"), [
    (offsets(30, 10), 55.0, None),  # 10 Hz, 3 s, 110 % MT: 5 s x 0.75 allowed
    (offsets(40, 10), 55.0, "safety:train_duration"),  # 4 s > 3.75 s
    (offsets(30, 20), 50.0, "safety:train_duration"),  # 20 Hz 1.5 s, 100 % MT > 1.2 s
    (offsets(20, 20), 50.0, None),  # 20 Hz 1 s at 100 % MT: 1.6 s x 0.75 allowed
    (offsets(10, 25), 66.0, "safety:train_outside_table"),  # 132 % MT
    (offsets(3, 100), 45.0, None),  # a 100 Hz triplet at 90 % MT
    (offsets(3, 100), 55.0, "safety:burst_intensity"),  # at 110 % MT
    (offsets(6, 100), 45.0, "safety:burst_length"),
    ((0.0, 0.01, 0.02, 0.1, 0.11, 0.12), 45.0, "safety:burst_rate"),  # bursts 100 ms apart
    ((0.0, 0.005), 40.0, "safety:train_ipi"),  # 200 Hz
    ((0.0, 0.5, 0.3), 40.0, "safety:invalid_train"),
])
def test_unit_rules(units: tuple[float, ...], intensity: float, expect: str | None) -> None:
    gate = SafetyGate(limits())
    got = gate.check_start(single(100.0, intensity), offsets=units, eeg_age_s=0.01)
    assert got == expect


def test_theta_burst_units_pass_at_80_percent_mt() -> None:
    for pattern in ("itbs", "ctbs"):
        unit = unit_for(StimulationConfig(pattern=pattern))
        gate = SafetyGate(limits(max_pulses_per_window=1000))
        assert gate.check_start(single(10.0, 40.0), offsets=unit.offsets,
                                eeg_age_s=0.0) is None
        assert gate.check_start(single(10.0, 51.0), offsets=unit.offsets,
                                eeg_age_s=0.0) == "safety:burst_intensity"


def test_trains_need_the_motor_threshold() -> None:
    gate = SafetyGate(limits(motor_threshold_pct=None))
    assert gate.check_start(single(1.0, 40.0), offsets=offsets(3, 100),
                            eeg_age_s=0.0) == "safety:rtms_needs_motor_threshold"
    assert gate.check_start(single(1.0, 40.0), eeg_age_s=0.0) is None  # single: fine




def fire_for(clock: Clock, gated: GatedStimulator, seconds: float, every_s: float,
             ) -> list[str]:
    """Ask for one trigger every ``every_s`` for ``seconds``; the reasons of the answers."""
    out = []
    end = clock.t + seconds
    while clock.t < end:
        clock.t += every_s
        out.append(gated.fire_now().reason)
    return out


def pulse_times(drv: FakeStimulator) -> list[float]:
    return [t for t, _ in drv.delivered]


@pytest.mark.parametrize("mt", [None, 50.0])
def test_single_pulses_at_20_hz_are_rtms(mt: float | None) -> None:
    """The issue's attack: min_interval_s = 0.05 made 657 open-loop pulses in 40 s."""
    clock, drv, gated = rig(limits(min_interval_s=0.05, motor_threshold_pct=mt), 60.0)
    reasons = fire_for(clock, gated, 40.0, 0.05)
    times = pulse_times(drv)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if mt is None:  # no motor threshold: no two triggers less than 1 s apart
        assert min(gaps) >= 1.0 - 1e-9
        assert "safety:rtms_needs_motor_threshold" in reasons
        assert len(times) <= 41
    else:  # 120 % MT at 20 Hz: 0.55 s x 0.75 per train, then more than the 5 s pause
        runs: list[list[float]] = [[times[0]]]
        for a, b in itertools.pairwise(times):
            if b - a < 1.0:
                runs[-1].append(b)
            else:
                assert b - a >= 5.0 - 1e-9
                runs.append([b])
        assert len(runs) >= 5
        # Table 4's 120 % column (Rossi et al. 2009) at the next tabulated frequency
        column = {5.0: 10.0, 10.0: 4.2, 20.0: 0.55, 25.0: 0.24}
        for r in runs[:-1]:
            gap = min(b - a for a, b in itertools.pairwise(r))
            row = min(f for f in column if f >= 1.0 / gap - 1e-6)
            assert r[-1] - r[0] + gap <= column[row] * 0.75 + 1e-9
        assert {"safety:train_duration", "safety:inter_train"} <= set(reasons)


def test_paired_pulses_every_50_ms_need_the_motor_threshold() -> None:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(limits(min_interval_s=0.05,
                                                   motor_threshold_pct=None)),
                            eeg_age_s=lambda: 0.0, clock=clock)
    gated.set_paired(30.0, 60.0, 3.0)
    gated.arm()
    reasons = fire_for(clock, gated, 10.0, 0.05)
    assert reasons.count("fired") <= 11
    assert len(drv.delivered) == 2 * reasons.count("fired")  # conditioning pulses too
    assert gated.gate.fired == len(drv.delivered)


def test_pause_after_a_train_is_strictly_more_than_one_second() -> None:
    """Chen et al. 1997: 20 Hz trains 1 s or less apart above 100 % MT were unsafe. A pause
    of 1 s is no pause: the next train continues the run and is judged with it."""
    lim = limits(min_interval_s=0.05, min_inter_train_s=1.0)
    clock, _, gated = rig(lim, 55.0)  # 110 % MT: 1.6 s x 0.75 = 1.2 s at 20 Hz
    offs = offsets(10, 20)  # 0.5 s
    for k, off in enumerate(offs):
        clock.t = 2000.0 + off
        assert gated.fire_now(offsets=offs, index=k, planned=clock.t).fired
    start = 2000.0 + offs[-1] + 1.0  # exactly 1 s after its last pulse
    clock.t = start
    assert gated.fire_now(offsets=offs, index=0, planned=start).reason == \
        "safety:train_duration"  # with the first: 1.95 s
    start += 0.01  # more than 1 s: a new run
    clock.t = start
    assert gated.fire_now(offsets=offs, index=0, planned=start).fired


def test_a_unit_under_way_cannot_be_raised() -> None:
    """The issue's attack: set intensity_pct during cTBS at 80 % MT made the rest 125 % MT."""
    lim = limits(max_pulses_per_window=2000, motor_threshold_pct=50.0,
                 max_intensity_pct=80.0)
    clock, drv, gated = rig(lim, 40.0)
    offs = unit_for(StimulationConfig(pattern="ctbs")).offsets
    for k in range(5):
        clock.t = 3000.0 + offs[k]
        assert gated.fire_now(offsets=offs, index=k, planned=clock.t).fired
    with pytest.raises(StimulatorError, match="unit is being delivered"):
        gated.set_intensity(62.5)
    drv.turn_knob(62.5)  # the front panel: the driver's next read-back sees it
    drv.poll()
    clock.t = 3000.0 + offs[5]
    got = gated.fire_now(offsets=offs, index=5, planned=clock.t)
    assert not got.fired and not gated.armed
    assert {p for _, p in drv.delivered} == {40.0}


def test_a_later_trigger_is_checked_on_intensity() -> None:
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim, 40.0)
    offs = offsets(5, 10)
    clock.t = 4000.0
    assert gated.fire_now(offsets=offs, index=0, planned=clock.t).fired
    # a device that changed without the driver noticing a difference (no commanded value
    # to compare with): the unit's lock still refuses it
    gated._commanded = None  # what a driver without read-back would leave
    drv.turn_knob(45.0)
    drv.read_device()
    clock.t += 0.1
    assert gated.fire_now(offsets=offs, index=1, planned=clock.t).reason == \
        "safety:unit_intensity_changed"


def test_the_device_is_judged_not_the_command() -> None:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    drv.turn_knob(95.0)  # left at 95 % by the previous user
    gated = GatedStimulator(drv, SafetyGate(limits()), eeg_age_s=lambda: 0.0, clock=clock)
    with pytest.raises(StimulatorError, match="95%, above the safety limit"):
        gated.arm()
    gated.set_intensity(60.0)
    drv.set_front_panel_mode(2, 3.0)  # twin mode, set on the device after the command
    with pytest.raises(StimulatorError, match="was commanded"):
        gated.arm()
    assert drv.delivered == []


def test_units_and_protocol_pulses_are_limits_of_the_gate() -> None:
    clock, drv, gated = rig(limits(), 50.0, max_units=2)
    for _ in range(2):
        clock.t += 10.0
        assert gated.fire_now().fired
    gated.disarm()
    gated.arm()  # re-arming resets nothing
    clock.t += 10.0
    assert gated.fire_now().reason == "safety:max_units"
    clock, drv, gated = rig(limits(), 50.0)
    gated.set_paired(30.0, 50.0, 3.0)
    gated.gate.set_budget(5)  # a protocol's `pulses` are pulses, conditioning included
    fired = []
    for _ in range(4):
        clock.t += 10.0
        fired.append(gated.fire_now().reason)
    assert fired == ["fired", "fired", "safety:protocol_pulses", "safety:protocol_pulses"]
    assert len(drv.delivered) == 4


class Budget:
    """A day budget in memory (the real one is tested in test_day_counter.py)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.calls = limit, 0, 0
        self.today = "2026-12-01"

    def reserve(self, n: int) -> int:
        self.calls += 1
        got = max(0, min(n, self.limit - self.used))
        self.used += got
        return got

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)

    def count(self) -> int:
        return self.used

    def day(self) -> str:
        return self.today


def test_day_pulses_are_reserved_before_they_leave() -> None:
    day = Budget(limit=7)
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(limits(), day=day), eeg_age_s=lambda: 0.0,
                            clock=clock, credit_target=5)
    gated.set_intensity(50.0)
    gated.arm()
    assert day.used == 5  # reserved on arming, before any pulse
    reasons = []
    for _ in range(7):
        clock.t += 10.0
        reasons.append(gated.fire_now().reason)
        if gated.gate.credit < 1:
            gated.gate.top_up(5)  # the service does this off the fire path
    assert reasons.count("fired") == 7
    clock.t += 10.0
    assert gated.fire_now().reason == "safety:max_pulses_per_day"
    gated.gate.settle()
    assert day.used == 7 == len(drv.delivered)


def test_credit_reserved_yesterday_is_not_spent_today() -> None:
    """A session across midnight: pulses after it are reserved in the new day's count."""
    day = Budget(limit=100)
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(limits(), day=day), eeg_age_s=lambda: 0.0,
                            clock=clock, credit_target=5)
    gated.set_intensity(50.0)
    gated.arm()
    clock.t += 10.0
    assert gated.fire_now().fired
    day.today, day.used = "2026-12-02", 0  # midnight: the new day's count starts at 0
    clock.t += 10.0
    assert gated.fire_now().reason == "safety:day_count_pending"
    assert gated.gate.needs_credit(1)  # a new day, whatever is held
    gated.gate.top_up(5)
    assert day.used == 5  # the new day holds its own reservation
    assert gated.fire_now().fired
