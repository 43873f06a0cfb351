"""Trigger policy and safety gate: pure logic, plus property tests of the invariants."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.config.schema import HARD_MIN_INTERVAL_S, SafetyConfig
from closedloop.control.trigger_policy import PolicyParams, TriggerState, decide
from closedloop.phase.estimate import PhaseEstimate, wrap_rad
from closedloop.stim.safety import SafetyGate, SafetyLimits, Trigger

PARAMS = PolicyParams(target_rad=0.0, tolerance_rad=math.radians(10), min_interval_s=2.0,
                      lead_s=0.001)


def est_at(t: float, phase: float, freq: float = 10.0) -> PhaseEstimate:
    return PhaseEstimate(lsl_time=t, phase_rad=phase, freq_hz=freq, amplitude=10.0)


def run(phase_deg: float, **kw: object):  # type: ignore[no-untyped-def]
    args = {"now": 100.0, "params": PARAMS, "state": TriggerState(), "armed": True,
            "amplitude": 10.0, "amplitude_threshold": 5.0, "horizon_s": 0.002}
    args.update(kw)
    return decide(est_at(100.0, math.radians(phase_deg)), **args)  # type: ignore[arg-type]


def test_fires_exactly_at_the_predicted_crossing() -> None:
    # 10 Hz: 3.6°/ms; at -9° the target is 2.5 ms ahead, within lead + horizon (3 ms)
    d, state = run(-9.0)
    assert d is not None
    assert d.fire
    assert d.reason == "target_phase"
    assert math.isclose(d.fire_time, 100.0025, abs_tol=1e-9)
    assert abs(d.predicted_phase_rad) < 1e-9
    assert state.last_crossing == d.crossing_time


def test_waits_when_the_crossing_is_beyond_the_horizon() -> None:
    d, state = run(-90.0)
    assert d is None
    assert state == TriggerState()


def test_just_missed_but_within_tolerance_fires_at_the_earliest_instant() -> None:
    d, _ = run(3.0)  # at now+lead the phase is 6.6°, within 10°
    assert d is not None
    assert d.fire
    assert math.isclose(d.fire_time, 100.001)
    d, _ = run(8.0)  # 11.6° at the earliest instant: outside the tolerance, wait a cycle
    assert d is None


def test_each_crossing_is_decided_once() -> None:
    d1, state = run(-9.0)
    assert d1 is not None
    d2, state2 = decide(est_at(100.0005, math.radians(-7.2)), now=100.0005, params=PARAMS,
                        state=state, armed=True, amplitude=10.0, amplitude_threshold=5.0,
                        horizon_s=0.002)
    assert d2 is None
    assert state2 == state


def test_refusals_have_reasons() -> None:
    assert run(-9.0, armed=False)[0].reason == "disarmed"  # type: ignore[union-attr]
    blocked = TriggerState(next_allowed=101.0)
    assert run(-9.0, state=blocked)[0].reason == "min_interval"  # type: ignore[union-attr]
    assert run(-9.0, amplitude=1.0)[0].reason == "amplitude_below_gate"  # type: ignore[union-attr]
    unknown = run(-9.0, amplitude_threshold=math.inf)[0]
    assert unknown.reason == "amplitude_unknown"  # type: ignore[union-attr]
    assert not unknown.fire  # type: ignore[union-attr]
    no_gate = run(-9.0, amplitude=0.0, amplitude_threshold=-math.inf)[0]
    assert no_gate.fire  # type: ignore[union-attr]


def test_negative_or_zero_frequency_never_fires() -> None:
    d, _ = decide(est_at(100.0, -0.01, freq=-10.0), now=100.0, params=PARAMS,
                  state=TriggerState(), armed=True, amplitude=10.0, amplitude_threshold=0.0,
                  horizon_s=0.002)
    assert d is None


@settings(max_examples=300, deadline=None)
@given(phase=st.floats(-math.pi, math.pi), freq=st.floats(4.0, 40.0),
       target=st.floats(-math.pi, math.pi), tol=st.floats(0.0, 0.5),
       lag=st.floats(0.0, 0.02))
def test_a_fired_pulse_is_never_early_and_lands_within_tolerance(
        phase: float, freq: float, target: float, tol: float, lag: float) -> None:
    params = PolicyParams(target_rad=target, tolerance_rad=tol, min_interval_s=1.0,
                          lead_s=0.001)
    now = 50.0 + lag
    d, _ = decide(est_at(50.0, phase, freq), now=now, params=params, state=TriggerState(),
                  armed=True, amplitude=1.0, amplitude_threshold=0.0, horizon_s=0.005)
    if d is not None and d.fire:
        assert d.fire_time >= now + params.lead_s - 1e-9
        assert d.fire_time <= now + params.lead_s + 0.005 + 1e-9
        assert abs(wrap_rad(d.predicted_phase_rad - target)) <= tol + 1e-6


def limits(**kw: float) -> SafetyLimits:
    base = {"min_interval_s": 1.0, "max_intensity_pct": 70.0, "max_pulses": 5,
            "rate_window_s": 10.0, "max_pulses_per_window": 3, "max_eeg_age_s": 0.1}
    base.update(kw)
    return SafetyLimits(**base)  # type: ignore[arg-type]


def check(gate: SafetyGate, *, t: float, intensity_pct: float, eeg_age_s: float | None
          ) -> str | None:
    return gate.check_start(Trigger(t, (intensity_pct,)), eeg_age_s=eeg_age_s)


def commit(gate: SafetyGate, t: float) -> None:
    gate.commit(Trigger(t, (60.0,)), start=True)


def test_gate_rules() -> None:
    gate = SafetyGate(limits(min_interval_s=1.0))
    ok = {"intensity_pct": 60.0, "eeg_age_s": 0.01}
    assert check(gate, t=0.0, **ok) is None
    commit(gate, 0.0)
    assert check(gate, t=0.5, **ok) == "safety:min_interval"
    assert check(gate, t=1.0, intensity_pct=71.0, eeg_age_s=0.01) == "safety:max_intensity"
    assert check(gate, t=1.0, intensity_pct=math.nan, eeg_age_s=0.01) == "safety:invalid_intensity"
    assert check(gate, t=1.0, intensity_pct=60.0, eeg_age_s=None) == "safety:eeg_stale"
    assert check(gate, t=1.0, intensity_pct=60.0, eeg_age_s=0.5) == "safety:eeg_stale"
    commit(gate, 1.0)
    commit(gate, 2.0)
    assert check(gate, t=3.0, **ok) == "safety:max_rate"  # 3 in the last 10 s
    assert check(gate, t=10.5, **ok) is None
    commit(gate, 10.5)
    commit(gate, 12.0)
    assert check(gate, t=30.0, **ok) == "safety:max_pulses"


def test_hard_caps_clamp_configured_limits() -> None:
    lim = SafetyLimits.from_config(SafetyConfig(min_interval_s=HARD_MIN_INTERVAL_S))
    assert lim.min_interval_s >= HARD_MIN_INTERVAL_S
    # a config object built around the loader still cannot go past the caps
    raw = SafetyConfig.__new__(SafetyConfig)
    for name, value in {"min_interval_s": 0.0, "max_intensity_pct": 500.0, "max_pulses": 10**9,
                        "rate_window_s": 1.0, "max_pulses_per_window": 10**9,
                        "max_eeg_age_ms": 50.0}.items():
        object.__setattr__(raw, name, value)
    lim = SafetyLimits.from_config(raw)
    assert lim.min_interval_s == HARD_MIN_INTERVAL_S
    assert lim.max_intensity_pct == 100.0
    assert lim.max_pulses == 10_000


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.tuples(st.floats(0.0, 0.7), st.floats(-10.0, 120.0),
                                   st.one_of(st.none(), st.floats(0.0, 0.3))),
                         max_size=80),
       min_interval=st.floats(0.05, 1.0), max_pulses=st.integers(0, 30),
       per_window=st.integers(1, 10), window=st.floats(1.0, 5.0))
def test_no_request_sequence_breaks_a_limit(
        requests: list[tuple[float, float, float | None]], min_interval: float,
        max_pulses: int, per_window: int, window: float) -> None:
    lim = limits(min_interval_s=min_interval, max_pulses=max_pulses,
                 max_pulses_per_window=per_window, rate_window_s=window)
    gate = SafetyGate(lim)
    t = 0.0
    fired: list[tuple[float, float]] = []
    for dt, intensity, age in requests:
        t += dt
        if check(gate, t=t, intensity_pct=intensity, eeg_age_s=age) is None:
            commit(gate, t)
            fired.append((t, intensity))
    times = [f[0] for f in fired]
    assert len(fired) <= max_pulses
    assert all(0 <= i <= lim.max_intensity_pct for _, i in fired)
    assert all(b - a >= min_interval - 1e-12 for a, b in itertools.pairwise(times))
    for i, ti in enumerate(times):
        in_window = [x for x in times[:i + 1] if x > ti - window]
        assert len(in_window) <= per_window
