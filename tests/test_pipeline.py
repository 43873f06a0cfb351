"""The EEG pipeline step and its clock guard, on a fake clock: no LSL, milliseconds.

The clock scenarios (EEG stamped in the future, a backlog, a clock gone back) run here
in simulated time; tests/test_faults.py keeps one of them over real LSL.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from closedloop.config import load_config
from closedloop.control.core import DecisionCore
from closedloop.control.pipeline import (
    CLOCK_GRACE_S,
    MAX_FUTURE_S,
    ClockGuard,
    EegPipeline,
    guard_clock,
)
from closedloop.control.service import ServiceStats
from closedloop.phase.tracker import PhaseTracker
from closedloop.sim.eeg_model import LABELS_10_10_64, EegGenerator, EegSimParams
from closedloop.stim.patterns import unit_for
from closedloop.stim.requests import PulseRequest
from closedloop.streams.ring import RingBuffer

AGE = 0.1  # safety.max_eeg_age_ms = 100


# -- the guard, against its rules written out ----------------------------------------------
def test_fresh_eeg_is_decided_on() -> None:
    g, v = guard_clock(ClockGuard(), skew=0.01, now=10.0, max_age_s=AGE)
    assert v.ok and not (v.fault or v.reopen or v.recovered) and g == ClockGuard()
    assert guard_clock(ClockGuard(), skew=-MAX_FUTURE_S, now=10.0, max_age_s=AGE)[1].ok
    assert guard_clock(ClockGuard(), skew=AGE, now=10.0, max_age_s=AGE)[1].ok


def test_eeg_from_the_future_is_a_fault_at_once_and_the_inlet_is_reopened() -> None:
    g, v = guard_clock(ClockGuard(), skew=-0.5, now=10.0, max_age_s=AGE)
    assert not v.ok and v.fault and v.reopen
    g, v = guard_clock(g, skew=-0.5, now=10.5, max_age_s=AGE)
    assert not v.ok and not v.fault and not v.reopen  # said once; reopened 0.5 s ago
    g, v = guard_clock(g, skew=-0.5, now=10.0 + CLOCK_GRACE_S + 0.1, max_age_s=AGE)
    assert v.reopen and not v.fault  # still wrong: reopened again, not said again
    g, v = guard_clock(g, skew=0.01, now=13.0, max_age_s=AGE)
    assert v.ok and v.recovered and not g.bad and g.behind_since is None


def test_a_backlog_passes_until_it_lasts() -> None:
    g, v = guard_clock(ClockGuard(), skew=0.3, now=10.0, max_age_s=AGE)
    assert not v.ok and not v.fault and not v.reopen  # behind: no decision, no fault yet
    g, v = guard_clock(g, skew=0.3, now=10.0 + CLOCK_GRACE_S, max_age_s=AGE)
    assert not v.fault  # exactly the grace: still a backlog
    g, v = guard_clock(g, skew=0.3, now=10.0 + CLOCK_GRACE_S + 0.01, max_age_s=AGE)
    assert v.fault and v.reopen and g.behind_since == 10.0
    _, v = guard_clock(g, skew=0.0, now=13.0, max_age_s=AGE)
    assert v.ok and v.recovered


def test_a_backlog_that_clears_leaves_no_trace() -> None:
    g, _ = guard_clock(ClockGuard(), skew=0.3, now=10.0, max_age_s=AGE)
    g, v = guard_clock(g, skew=0.0, now=11.0, max_age_s=AGE)
    assert v.ok and not v.recovered and g == ClockGuard()


# -- the pipeline on a fake clock ----------------------------------------------------------
class Host:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.reopened = 0
        self.hold = False

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def holds(self, now: float) -> bool:
        return self.hold

    def reopen_eeg(self) -> None:
        self.reopened += 1

    def estimator_changed(self, tracker: PhaseTracker) -> None:
        self.events.append(("phase_estimator", {}))

    def calibrated(self, tracker: PhaseTracker) -> None:
        self.events.append(("calibrated", {}))

    def kinds(self) -> Counter[str]:
        return Counter(k for k, _ in self.events)


class Scheduler:
    def __init__(self) -> None:
        self.requests: list[PulseRequest] = []
        self.busy = False

    def submit(self, request: PulseRequest) -> bool:
        self.requests.append(request)
        return True


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


FS = 1000.0


def rig(*overrides: str) -> tuple[EegPipeline, RingBuffer, Host, Scheduler, Clock]:
    cfg = load_config(None, ["phase.estimator=\"ar\"", "trigger.min_interval_s=0.5",
                             "trigger.amplitude_percentile=0", "trigger.jitter_s=0",
                             "safety.max_eeg_age_ms=100", *overrides])
    tracker = PhaseTracker(fs_in=FS, labels=LABELS_10_10_64, cfg=cfg.phase)
    core = DecisionCore(cfg, tracker, latency_s=0.0, rng=np.random.default_rng(1))
    ring = RingBuffer(int(60 * FS), len(LABELS_10_10_64))
    host, sched, clock = Host(), Scheduler(), Clock()
    pipe = EegPipeline(lambda: cfg, tracker, core, ring, host=host, scheduler=sched,
                       armed=lambda: True, unit=unit_for(cfg.stimulation),
                       stats=ServiceStats(), clock=clock)
    return pipe, ring, host, sched, clock


def feed(pipe: EegPipeline, ring: RingBuffer, clock: Clock, gen: EegGenerator,
         seconds: float, *, t0: float, skew: float = 0.0, chunk: int = 10) -> float:
    """Push ``seconds`` of EEG in chunks, stepping the pipeline after each, with the
    clock ``skew`` after the newest sample's timestamp; returns the next sample time."""
    t = t0
    for _ in range(int(seconds * FS) // chunk):
        block = gen.generate(chunk).data
        stamps = t + np.arange(chunk) / FS
        ring.write(block, stamps)
        t = float(stamps[-1]) + 1.0 / FS
        clock.t = float(stamps[-1]) + skew
        pipe.step()
    return t


@pytest.fixture
def gen() -> EegGenerator:
    return EegGenerator(EegSimParams(fs=FS), np.random.default_rng(7))


def test_the_pipeline_decides_and_requests_with_the_decisions_id(gen: EegGenerator) -> None:
    pipe, ring, host, sched, clock = rig()
    feed(pipe, ring, clock, gen, 8.0, t0=100.0, skew=0.001)
    decisions = [f for k, f in host.events if k == "decision"]
    assert len(sched.requests) >= 3
    fired = [d for d in decisions if d["fire"]]
    assert [r.id for r in sched.requests] == [d["decision_id"] for d in fired]
    assert [d["decision_id"] for d in decisions] == list(range(1, len(decisions) + 1))
    assert all(r.context["stages_us"]["decide_us"] >= 0 for r in sched.requests)
    assert pipe.stats.decisions == len(decisions)


def test_no_decision_on_eeg_from_the_future_and_a_fault_said_once(gen: EegGenerator) -> None:
    pipe, ring, host, sched, clock = rig()
    t = feed(pipe, ring, clock, gen, 6.0, t0=100.0, skew=0.001)
    n = len(sched.requests)
    assert n >= 1
    t = feed(pipe, ring, clock, gen, 5.0, t0=t, skew=-0.5)  # stamps 0.5 s ahead of now
    assert len(sched.requests) == n  # nothing requested
    faults = [f for k, f in host.events if k == "fault"]
    assert len(faults) == 1 and faults[0]["error"] == "eeg_clock_mismatch"
    assert host.reopened == 3  # at once, then every CLOCK_GRACE_S while it lasts
    assert pipe.stats.refused["eeg_timestamps"] > 0
    feed(pipe, ring, clock, gen, 6.0, t0=t, skew=0.001)
    assert host.kinds()["eeg_clock_ok"] == 1
    assert len(sched.requests) > n  # decisions again


def test_a_protocol_hold_stops_decisions(gen: EegGenerator) -> None:
    pipe, ring, host, sched, clock = rig()
    host.hold = True
    feed(pipe, ring, clock, gen, 8.0, t0=100.0, skew=0.001)
    assert sched.requests == [] and host.kinds()["decision"] == 0


def test_a_busy_scheduler_refuses_with_its_reason(gen: EegGenerator) -> None:
    pipe, ring, host, sched, clock = rig()

    def refuse(request: PulseRequest) -> bool:
        return False

    sched.submit = refuse  # type: ignore[method-assign]
    t = 100.0
    for _ in range(80):
        t = feed(pipe, ring, clock, gen, 0.1, t0=t, skew=0.001)
    traces = [f for k, f in host.events if k == "decision"]
    busy = [d for d in traces if d["reason"] == "scheduler_busy"]
    assert busy and all(not d["fire"] for d in busy)
    assert pipe.stats.refused["scheduler_busy"] == len(busy)


def _decisions_in_chunks(data: np.ndarray, chunk: int) -> list[dict[str, Any]]:
    pipe, ring, host, _, clock = rig("phase.deterministic=true", "phase.update_interval_ms=10",
                                     "trigger.amplitude_percentile=50")
    for i in range(0, len(data), chunk):
        stamps = 100.0 + np.arange(i, min(i + chunk, len(data))) / FS
        ring.write(data[i:i + chunk], stamps)
        clock.t = float(stamps[-1]) + 0.001
        pipe.step()
    return [{k: v for k, v in f.items() if k != "stages_us"}  # (timings: wall clock)
            for k, f in host.events if k == "decision"]


def test_deterministic_decisions_do_not_depend_on_the_chunks(gen: EegGenerator) -> None:
    """A read that holds several updates (40 ms chunks, 10 ms updates) estimates each at
    its own time: the amplitude gate's threshold, and so every decision, is the one of
    10 ms chunks (before, the gate was fed the read's last update time for all of them)."""
    data = gen.generate(int(12 * FS)).data
    a, b = _decisions_in_chunks(data, 10), _decisions_in_chunks(data, 40)
    assert len(a) > 50 and a == b
