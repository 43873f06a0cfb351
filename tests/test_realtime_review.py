"""Review of the EEG pipeline stepped in the acquisition thread (closedloop.control.realtime).

Each test forces one interleaving of the acquisition thread (the step) with the event
loop (a command) that the old design (the step on the loop, serialised with the
commands) could not produce, and asserts what must hold. No LSL outlet, no MQTT: the
in-memory stimulator behind the real gate and the real fire thread, the real pipeline
on synthetic EEG, the real commands and protocol runner.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pylsl
import pytest

from closedloop.config import load_config
from closedloop.control.commands import ServiceControl
from closedloop.control.core import DecisionCore
from closedloop.control.pipeline import EegPipeline
from closedloop.control.realtime import RealtimeHost, RealtimeStep, start_realtime
from closedloop.control.service import ClosedLoopService
from closedloop.control.stats import ServiceStats
from closedloop.phase.tracker import PhaseTracker
from closedloop.sim.eeg_model import LABELS_10_10_64, EegGenerator, EegSimParams
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import unit_for
from closedloop.stim.requests import PulseRequest
from closedloop.stim.safety import SafetyGate
from closedloop.stim.scheduler import FireScheduler
from closedloop.streams.ring import RingBuffer
from tests.test_protocol_runner import mep, runner, start
from tests.test_stimulator import LIMITS, Outcomes

FS = 1000.0
CHUNK = 10
def stimulator() -> tuple[FakeStimulator, GatedStimulator, FireScheduler, Outcomes]:
    """The in-memory device behind the real gate and the real fire thread, on the LSL
    clock (no stream is opened)."""
    drv = FakeStimulator(clock=pylsl.local_clock)
    drv.open()
    stim = GatedStimulator(drv, SafetyGate(LIMITS), eeg_age_s=lambda: 0.0)
    stim.set_intensity(50.0)
    outcomes = Outcomes()
    # a generous lateness: a loaded machine must not turn the pulse into a `late`
    # refusal and hide what the test looks for
    sched = FireScheduler(stim, on_outcome=outcomes, max_lateness_s=0.05,
                          on_error=outcomes.errors.append)
    sched.start()
    return drv, stim, sched, outcomes


def config() -> Any:
    # the 50 ms margin puts every fire time at least 50 ms after its decision, so the
    # re-arm below lands before it whatever the machine's load
    return load_config(None, ["phase.estimator=\"ar\"", "trigger.min_interval_s=0.5",
                              "trigger.amplitude_percentile=0", "trigger.jitter_s=0",
                              "safety.max_eeg_age_ms=100", "trigger.scheduling_margin_ms=50"])


class Session:
    """What ServiceControl needs of the service (the real commands run on it)."""

    def __init__(self, stim: GatedStimulator, sched: FireScheduler) -> None:
        self.rig = SimpleNamespace(stim=stim, scheduler=sched, tracker_lock=threading.Lock(),
                                   eeg=SimpleNamespace(lost=False))
        self.state = "idle"
        self.fault = None
        self.records: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, **fields: Any) -> None:
        self.records.append((kind, fields))


# -- (a) a decision taken before a disarm survives it -----------------------------------
def test_a_decision_taken_before_a_disarm_never_fires() -> None:
    """Acquisition thread: core.decide(armed=True) -> fire.  Loop: disarm (stim.disarm,
    scheduler.cancel: nothing pending, a no-op).  Acquisition thread: scheduler.submit
    -> pending.  Loop: arm (the operator's next command, or start of the next protocol).
    Fire thread: the stale request passes the gate (armed again) and fires.

    The old code ran the step on the loop: the submit was before the disarm's cancel
    (which dropped it) or the decision saw armed=False."""
    cfg = config()
    drv, stim, sched, outcomes = stimulator()
    session = Session(stim, sched)
    control = ServiceControl(session)  # type: ignore[arg-type]
    tracker = PhaseTracker(fs_in=FS, labels=LABELS_10_10_64, cfg=cfg.phase)
    core = DecisionCore(cfg, tracker, latency_s=stim.latency_s, rng=np.random.default_rng(1))
    ring = RingBuffer(int(60 * FS), len(LABELS_10_10_64))
    host = RealtimeHost(clock=pylsl.local_clock, holds=lambda _now: False,
                        reopen=lambda: None)
    pipe = EegPipeline(lambda: cfg, tracker, core, ring, host=host, scheduler=sched,
                       armed=lambda: stim.armed, unit=unit_for(cfg.stimulation),
                       stats=ServiceStats(), clock=pylsl.local_clock)
    failures: list[BaseException] = []
    step = RealtimeStep(pipe, host, lock=session.rig.tracker_lock,
                        next_command=sched.next_command_time, clock=pylsl.local_clock,
                        deliver=lambda _events: None, failed=failures.append)
    forced: dict[str, Any] = {}
    decide = core.decide

    def decide_then_the_loop_disarms(u: Any, *, now: float, armed: bool, busy: bool) -> Any:
        decision = decide(u, now=now, armed=armed, busy=busy)
        if decision is not None and decision.fire and "loop" not in forced:
            # the loop gets the GIL between the decision and the hand-off: the operator's
            # disarm runs there (a fix that makes the disarm wait for the step makes this
            # join time out; then the disarm completes after the step, as it must)
            loop = threading.Thread(target=control.disarm, kwargs={"by": "operator"})
            loop.start()
            loop.join(0.5)
            forced["loop"] = loop
            forced["decision"] = decision
        return decision

    core.decide = decide_then_the_loop_disarms  # type: ignore[method-assign]
    gen = EegGenerator(EegSimParams(fs=FS), np.random.default_rng(7))
    stim.arm()
    try:
        t = pylsl.local_clock() - 3.0  # a backlog to warm the filters up, then real time
        deadline = time.monotonic() + 15.0
        while "loop" not in forced and time.monotonic() < deadline:
            stamps = t + np.arange(CHUNK) / FS
            while pylsl.local_clock() < stamps[-1]:  # as the amplifier delivers it
                time.sleep(0.0005)
            ring.write(gen.generate(CHUNK).data, stamps)
            t = float(stamps[-1]) + 1.0 / FS
            step.on_data()  # what the reader does after each ring write
        assert "loop" in forced, "no decision to fire within 15 s of EEG"
        forced["loop"].join(5)
        assert not failures
        assert not stim.armed
        pending_after_disarm = sched.busy
        control.arm(by="operator")  # the next command: arm, or start the next protocol
        got = outcomes.wait(1, timeout=0.5)
    finally:
        sched.stop()
    fired = [o for o in got if o.fired]
    assert not fired, (
        f"decision {forced['decision']} was taken before the disarm and fired after the "
        f"re-arm (pending after the disarm: {pending_after_disarm}; delivered "
        f"{drv.delivered})")


# -- (a) an error in a step does not disarm at once -----------------------------------------
def test_an_error_in_a_step_disarms_before_the_step_returns() -> None:
    """Acquisition thread: the step hands a request to the fire thread, then raises
    (a bug in the rest of the step).  RealtimeStep.on_data calls ``failed`` which only
    *queues* ``fail`` (disarm, cancel) on the loop.  Loop: busy (a calibrate, a reload,
    a status: ~tens of ms).  Fire thread: the request's time comes, the stimulator is
    still armed: it fires.

    The old code called ``self.fail(exc)`` (disarm and cancel) synchronously in
    ``_eeg_loop``'s except clause."""
    cfg = config()
    drv, stim, sched, _outcomes = stimulator()
    service = ClosedLoopService(cfg)
    loop = asyncio.new_event_loop()  # not running: the loop is busy elsewhere
    service._loop = loop
    tracker = PhaseTracker(fs_in=FS, labels=LABELS_10_10_64, cfg=cfg.phase)
    ring = RingBuffer(int(60 * FS), len(LABELS_10_10_64))
    rig = SimpleNamespace(eeg=SimpleNamespace(ring=ring, request_reopen=lambda: None,
                                              lost=False),
                          tracker=tracker, stim=stim, scheduler=sched,
                          tracker_lock=threading.Lock())
    service.rig = rig  # type: ignore[assignment]
    records = SimpleNamespace(pipeline_events=lambda _events: None)
    protocols = SimpleNamespace(holds=lambda _now: False)
    rt = start_realtime(rig, records, protocols,  # type: ignore[arg-type]
                        cfg=lambda: service.cfg, unit=service.unit, stats=service.stats,
                        call_soon=service.call_soon, fail=service.fail)

    def step_that_fails_after_the_hand_off() -> list[Any]:
        assert sched.submit(PulseRequest(1, pylsl.local_clock() + 0.03))
        raise ZeroDivisionError("a bug after the hand-off")

    rt.pipeline.step = step_that_fails_after_the_hand_off  # type: ignore[method-assign]
    stim.arm()
    try:
        rt.on_data()
        armed_after_the_error = stim.armed
        # (cancelled at once; the fire thread drops it when it next runs)
        pending_after_the_error = sched.busy and sched._cancel_reason is None
        time.sleep(0.15)  # the loop is busy for 150 ms
        delivered = list(drv.delivered)
        loop.run_until_complete(asyncio.sleep(0))  # the loop comes round: fail() runs
        assert not stim.armed and service.fault is not None
    finally:
        sched.stop()
        loop.close()
    assert not rt.running
    assert not armed_after_the_error and not pending_after_the_error and not delivered, (
        f"after the step raised: armed={armed_after_the_error}, request pending="
        f"{pending_after_the_error}; delivered while the loop was busy: {delivered}")


# -- (a) an MEP protocol does not hold while it sets up its next pulse -----------------------
@pytest.mark.parametrize("protocol", ["io-curve", "phase-map"])
def test_an_mep_protocol_holds_while_it_sets_up_the_next_pulse(protocol: str) -> None:
    """Loop: ProtocolRunner.mep() clears ``awaiting`` first, then ``_next()`` sets the
    intensity (device I/O on a serial stimulator: tens of ms, the GIL released), then the
    target phase (a config rebuild), then ``hold_until``.  Acquisition thread, in that
    window: holds() is False (the previous hold_until is long past), the step decides at
    the previous plan's target phase; the pulse fires at whatever the device is set to
    by then, before the settle time, and its MEP is booked to the new plan.

    The old code ran mep() -> _next() on the loop without a step in between."""
    r, host, _ = runner()
    start(r, protocol, pulses=6)
    seen: list[tuple[str, bool]] = []
    set_intensity = r.stim.set_intensity

    def probe_intensity(pct: float) -> None:
        seen.append(("intensity", r.holds(host.clock_.t)))  # a step reads holds() here
        set_intensity(pct)

    set_target_phase = host.set_target_phase

    def probe_phase(deg: float) -> None:
        seen.append(("target_phase", r.holds(host.clock_.t)))
        set_target_phase(deg)

    r.stim.set_intensity = probe_intensity  # type: ignore[method-assign]
    host.set_target_phase = probe_phase  # type: ignore[method-assign]
    for k in range(1, 4):
        host.clock_.t += 1.0  # the stimulator settled, the unit fired
        r.unit_fired(decision_id=k)
        assert r.holds(host.clock_.t)
        host.clock_.t += 0.3  # its MEP is measured
        r.mep(mep(k, p2p=100.0 + 50.0 * k), "FDI")
    assert seen, "the protocol changed neither intensity nor target phase"
    assert all(held for _, held in seen), (
        f"holds() was False while the next pulse was being set up: {seen}")
