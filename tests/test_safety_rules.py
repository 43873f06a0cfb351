"""The safety gate's rules for units (trains, bursts, paired pulses) and daily counts,
and a property test: no sequence of requests, limits and faults yields a pulse train that
breaks a limit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from closedloop.config.schema import (
    HARD_MIN_TRAIN_IPI_S,
    SafetyConfig,
    StimulationConfig,
)
from closedloop.errors import ConfigError, StimulatorError
from closedloop.stim.base import DriverBase
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import unit_for
from closedloop.stim.safety import DayCounter, SafetyGate, SafetyLimits, max_train_duration_s


def limits(**kw: Any) -> SafetyLimits:
    base: dict[str, Any] = {"min_interval_s": 1.0, "max_intensity_pct": 80.0,
                            "max_pulses": 5000, "rate_window_s": 60.0,
                            "max_pulses_per_window": 5000, "max_eeg_age_ms": 100.0,
                            "motor_threshold_pct": 50.0}
    base.update(kw)
    return SafetyLimits.from_config(SafetyConfig(**base))


def offsets(n: int, hz: float) -> tuple[float, ...]:
    return tuple(k / hz for k in range(n))


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
    got = gate.check(t=100.0, intensity_pct=intensity, eeg_age_s=0.01, offsets=units)
    assert got == expect


def test_theta_burst_units_pass_at_80_percent_mt() -> None:
    for pattern in ("itbs", "ctbs"):
        unit = unit_for(StimulationConfig(pattern=pattern))
        gate = SafetyGate(limits(max_pulses_per_window=1000))
        assert gate.check(t=10.0, intensity_pct=40.0, eeg_age_s=0.0,
                          offsets=unit.offsets) is None
        assert gate.check(t=10.0, intensity_pct=51.0, eeg_age_s=0.0,
                          offsets=unit.offsets) == "safety:burst_intensity"


def test_trains_need_the_motor_threshold() -> None:
    gate = SafetyGate(limits(motor_threshold_pct=None))
    assert gate.check(t=1.0, intensity_pct=40.0, eeg_age_s=0.0,
                      offsets=offsets(3, 100)) == "safety:train_needs_motor_threshold"
    assert gate.check(t=1.0, intensity_pct=40.0, eeg_age_s=0.0) is None  # single: fine


def test_inter_train_pause_and_counts() -> None:
    gate = SafetyGate(limits(min_inter_train_s=5.0, max_pulses=10, max_pulses_per_day=7),
                      day_count=2)
    tr = offsets(3, 100)
    assert gate.check(t=10.0, intensity_pct=40.0, eeg_age_s=0.0, offsets=tr) is None
    for k, off in enumerate(tr):
        gate.commit(10.0 + off)
        if k == 2:
            gate.end_unit(10.0 + off)
    assert gate.check(t=13.0, intensity_pct=40.0, eeg_age_s=0.0) == "safety:inter_train"
    assert gate.check(t=15.1, intensity_pct=40.0, eeg_age_s=0.0, offsets=tr) == \
        "safety:max_pulses_per_day"  # 2 + 3 + 3 > 7
    assert gate.check(t=15.1, intensity_pct=40.0, eeg_age_s=0.0, pulses_per_trigger=2) \
        is None
    assert gate.day_count == 5 and gate.fired == 3


def test_day_counter_persists_and_refuses_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "d" / "pulses.json"
    day = ["2026-11-26"]
    c = DayCounter(path, today=lambda: day[0])
    assert c.today == 0
    c.add(5)
    c.add(2)
    assert DayCounter(path, today=lambda: day[0]).today == 7
    day[0] = "2026-11-27"
    assert DayCounter(path, today=lambda: day[0]).today == 0
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="day_counter_file"):
        DayCounter(path)
    path.write_text(json.dumps({"2026-11-26": -3}))
    with pytest.raises(ConfigError, match="unreadable"):
        DayCounter(path)


# -- property test ------------------------------------------------------------------------
class BenchDriver(DriverBase):
    """An in-memory device for the gate's property test: records what it is made to do."""

    name = "bench"
    trigger_route = "memory"
    supports_paired = True

    def __init__(self, clock: list[float]) -> None:
        super().__init__(0.0)
        self.clock = clock
        self.shots: list[tuple[float, float]] = []

    def open(self) -> None: ...
    def close(self) -> None: ...

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def set_intensity(self, pct: float) -> float:
        self._intensity = pct
        return pct

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        self._intensity = test_pct

    def fire(self) -> float:
        assert self._armed and self._fault is None  # the gate never fires a faulted device
        self.shots.append((self.clock[0], self._intensity or 0.0))
        return self.clock[0]


unit_shapes = st.one_of(
    st.just((0.0,)),
    st.builds(offsets, st.integers(2, 8), st.floats(5.0, 200.0)),
    st.builds(offsets, st.integers(2, 60), st.floats(0.5, 30.0)),
    st.lists(st.floats(0.0, 0.5), min_size=2, max_size=10).map(
        lambda xs: tuple(sorted({0.0, *(round(x, 3) for x in xs)}))),
)
fire_action = st.tuples(st.just("fire"), unit_shapes,
                        st.one_of(st.just(0.0), st.floats(0.0, 0.05)),
                        st.one_of(st.just(0.01), st.just(0.01), st.floats(0.0, 0.12),
                                  st.none()))
disturbance = st.one_of(
    st.tuples(st.just("intensity"), st.floats(-10.0, 120.0)),
    st.tuples(st.just("arm")), st.tuples(st.just("disarm")),
    st.tuples(st.just("fault")), st.tuples(st.just("temperature"), st.floats(20.0, 50.0)))
# each step: a request, a wait, and now and then something else happening
actions = st.lists(st.tuples(fire_action, st.tuples(st.just("wait"), st.floats(0.0, 12.0)),
                             st.one_of(st.none(), st.none(), st.none(), disturbance)),
                   min_size=1, max_size=30).map(
    lambda steps: [a for step in steps for a in step if a is not None])
safety_cfgs = st.builds(
    SafetyConfig, min_interval_s=st.floats(0.05, 3.0), max_intensity_pct=st.floats(10, 100),
    max_pulses=st.integers(0, 400), rate_window_s=st.floats(1.0, 60.0),
    max_pulses_per_window=st.integers(1, 200), max_pulses_per_day=st.integers(0, 600),
    motor_threshold_pct=st.one_of(st.none(), st.floats(20.0, 90.0)),
    train_duration_factor=st.floats(0.1, 1.0), min_inter_train_s=st.floats(1.0, 20.0),
    max_burst_intensity_mt=st.floats(10.0, 100.0), max_coil_temp_c=st.floats(20.0, 45.0))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=safety_cfgs, day_start=st.integers(0, 300), start_pct=st.floats(0.0, 60.0),
       plan=actions)
def test_no_sequence_breaks_a_limit(cfg: SafetyConfig, day_start: int, start_pct: float,
                                    plan: list[tuple[Any, ...]]) -> None:
    lim = SafetyLimits.from_config(cfg)
    clock = [1000.0]
    drv = BenchDriver(clock)
    gated = GatedStimulator(drv, SafetyGate(lim, day_count=day_start),
                            eeg_age_s=lambda: eeg_age[0], clock=lambda: clock[0])
    eeg_age: list[float | None] = [0.01]
    units: list[tuple[tuple[float, ...], list[tuple[float, float]]]] = []
    for act in [("intensity", start_pct), ("arm",), *plan]:
        kind = act[0]
        if kind == "wait":
            clock[0] += act[1]
        elif kind == "intensity":
            try:
                gated.set_intensity(act[1])
            except StimulatorError:
                assert not 0.0 <= act[1] <= lim.max_intensity_pct
        elif kind == "arm":
            try:
                gated.arm()
            except StimulatorError:
                assert drv.fault is not None
        elif kind == "disarm":
            gated.disarm()
        elif kind == "fault":
            drv.report_fault("injected")
        elif kind == "temperature":
            drv._temperature = act[1]
        else:
            _, offs, late, age = act
            eeg_age[0] = age
            start = clock[0]
            before = len(drv.shots)
            for k, off in enumerate(offs):
                clock[0] = start + off + (late if k == len(offs) - 1 else 0.0)
                r = gated.fire_now(offsets=offs, index=k, planned=start + off,
                                   max_lateness_s=0.01)
                if not r.fired:
                    event(f"refused: {r.reason}")
                    if k:
                        gated.end_unit(drv.shots[-1][0])
                    break
                assert drv.fault is None and drv.ready
                assert drv.coil_temperature_c is None or \
                    drv.coil_temperature_c <= lim.max_coil_temp_c
                assert age is not None and age <= lim.max_eeg_age_s
            if len(drv.shots) > before:
                units.append((offs, drv.shots[before:]))
    shots = [s for _, u in units for s in u]
    event(f"units fired: {min(len(units), 3)}+" if units else "nothing fired")
    event("a train or burst fired" if any(len(o) > 1 for o, _ in units) else "singles only")
    # intensity and counts
    assert all(pct <= lim.max_intensity_pct for _, pct in shots)
    assert len(shots) <= lim.max_pulses
    assert day_start + len(shots) <= max(lim.max_pulses_per_day, day_start)
    times = [t for t, _ in shots]
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[:i + 1] if u > t - lim.rate_window_s)
        assert in_window <= lim.max_pulses_per_window
    # spacing between units, and the pause after a train or burst
    for (prev_offs, prev), (_, cur) in itertools.pairwise(units):
        gap = cur[0][0] - prev[-1][0]
        assert gap >= lim.min_interval_s - 1e-9
        if len(prev_offs) > 1:
            assert gap >= lim.min_inter_train_s - 1e-9
    # each delivered train or burst obeys the published limits
    for offs, delivered in units:
        if len(offs) == 1:
            continue
        assert lim.motor_threshold_pct is not None
        gaps = [b - a for a, b in itertools.pairwise(offs)]
        assert min(gaps) >= HARD_MIN_TRAIN_IPI_S - 1e-9
        rel = max(p for _, p in delivered) / lim.motor_threshold_pct * 100.0
        if min(gaps) < 0.04:
            assert rel <= lim.max_burst_intensity_mt + 1e-6
        else:
            table = max_train_duration_s(1.0 / min(gaps), rel)
            assert table is not None
            assert len(offs) * min(gaps) <= table * lim.train_duration_factor + 1e-6
        # delivered on schedule (a late pulse ends the unit instead)
        t0 = delivered[0][0]
        assert all(abs(t - t0 - off) <= 0.01 + 1e-9 for (t, _), off in
                   zip(delivered, offs, strict=False))
