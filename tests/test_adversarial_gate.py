"""A hostile review of the safety gate: the holes it found (each now a regression test)
and the attacks the gate stopped.

Sequences are judged by the independent oracle (tests/safety_oracle.py) on what the fake
device or the emulator really delivered, with the pulses' trigger ids as the harness
knows them. The holes: paired pulses with a long interval made 50 Hz doublets without a
motor threshold; a serial fire waiting behind a keep-alive was stamped before it left; a
front-panel interval change was no mismatch; BiStim simultaneous discharge hid output B;
a refused far-future request erased the rate window; the timing tolerance loosened plans.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import threading
import time
from typing import Any

import pylsl
import pytest

from closedloop.config.schema import SafetyConfig
from closedloop.errors import StimulatorError
from closedloop.stim.day_counter import DayCounter
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.magstim import MagstimStimulator
from closedloop.stim.safety import SafetyGate, SafetyLimits, Trigger
from tests.safety_oracle import Limits, Pulse, violations
from tools.stim_emulator import MagstimEmulator


# -- harness -------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limits(**kw: Any) -> SafetyLimits:
    base: dict[str, Any] = {"min_interval_s": 1.0, "max_intensity_pct": 80.0,
                            "max_pulses": 5000, "rate_window_s": 60.0,
                            "max_pulses_per_window": 5000, "max_eeg_age_ms": 100.0}
    base.update(kw)
    return SafetyLimits.from_config(SafetyConfig(**base))


def oracle_limits(lim: SafetyLimits, *, day_start: int = 0,
                  max_units: int | None = None) -> Limits:
    return Limits(max_intensity_pct=lim.max_intensity_pct, min_interval_s=lim.min_interval_s,
                  motor_threshold_pct=lim.motor_threshold_pct,
                  train_duration_factor=lim.train_duration_factor,
                  min_inter_train_s=lim.min_inter_train_s,
                  max_burst_intensity_mt=lim.max_burst_intensity_mt,
                  max_pulses=lim.max_pulses, rate_window_s=lim.rate_window_s,
                  max_pulses_per_window=lim.max_pulses_per_window,
                  max_pulses_per_day=lim.max_pulses_per_day, day_start=day_start,
                  max_units=max_units)


def rig(lim: SafetyLimits, **gate_kw: Any) -> tuple[Clock, FakeStimulator, GatedStimulator]:
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(lim, **gate_kw), eeg_age_s=lambda: 0.0,
                            clock=clock)
    return clock, drv, gated


class Recorder:
    """Fires through the gate and keeps what the fake device delivered, per trigger."""

    def __init__(self, drv: FakeStimulator, gated: GatedStimulator) -> None:
        self.drv, self.gated = drv, gated
        self.pulses: list[Pulse] = []
        self.trigger = 0
        self.unit = 0

    def fire(self, *, offsets: tuple[float, ...] = (0.0,), index: int = 0,
             planned: float | None = None, paired: bool = False) -> str:
        n0 = len(self.drv.delivered)
        if index == 0:
            self.unit += 1
        r = self.gated.fire_now(offsets=offsets, index=index, planned=planned)
        self.trigger += 1
        for j, (t, p) in enumerate(self.drv.delivered[n0:]):
            role = ("conditioning" if j == 0 else "test") if paired else "single"
            self.pulses.append(Pulse(t, p, trigger=self.trigger, unit=self.unit, role=role))
        return r.reason


def as_single_pulses(pulses: list[Pulse]) -> list[Pulse]:
    """The same pulses, each its own trigger of one unit (so R2 does not fire)."""
    return [Pulse(p.t, p.pct, trigger=i, unit=0)
            for i, p in enumerate(sorted(pulses, key=lambda p: p.t))]


# =========================================================================================
# HOLES FOUND (fixed; regression tests)
# =========================================================================================

def test_paired_long_isi_makes_unjudged_doublets_without_motor_threshold() -> None:
    lim = limits(motor_threshold_pct=None)
    clock, drv, gated = rig(lim)
    gated.set_paired(80.0, 80.0, 980.0)  # isi_ms <= 999 is allowed by the schema
    gated.arm()
    rec = Recorder(drv, gated)
    reasons = []
    for _ in range(30):
        reasons.append(rec.fire(paired=True))
        clock.t += 1.0
    # pulses at 0, .98, 1.0, 1.98, 2.0, ... would be 20-ms doublets once a second: the
    # runs are made of pulses, so a pair 20 ms after the last one's test pulse continues
    # its run (rTMS: refused without a motor threshold); only every other one fires
    assert reasons[:4] == ["fired", "safety:rtms_needs_motor_threshold"] * 2
    assert not violations(rec.pulses, oracle_limits(lim))
    times = sorted(p.t for p in rec.pulses)
    cross = [b - a for a, b in itertools.pairwise(times)][1::2]  # test -> next conditioning
    assert min(cross) > 1.0


def test_front_panel_isi_change_is_a_fault() -> None:
    lim = limits(motor_threshold_pct=50.0)
    faults: list[str] = []
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(lim), eeg_age_s=lambda: 0.0, clock=clock,
                            on_fault=faults.append)
    gated.set_paired(40.0, 60.0, 3.0)
    gated.arm()
    drv.set_front_panel_mode(2, 980.0)  # the ISI knob; intensities and mode unchanged
    drv.poll()  # the watch thread's read-back sees isi_ms = 980
    assert drv.device is not None and drv.device.isi_ms == 980.0
    clock.t += 2.0
    r = gated.fire_now()
    assert faults, "an ISI that differs from the command should be a fault"
    assert not r.fired


@pytest.mark.timing
def test_serial_fire_delayed_by_the_keepalive_lock_is_recorded_when_it_left() -> None:

    lim = limits(motor_threshold_pct=None, min_interval_s=1.0)
    emu = MagstimEmulator("200").start()
    drv = MagstimStimulator(port=emu.port, model="200")
    gated = GatedStimulator(drv, SafetyGate(lim), eeg_age_s=lambda: 0.0)
    try:
        drv.open()
        gated.set_intensity(40)
        gated.arm()
        end = time.monotonic() + 3.0
        while not drv.ready and time.monotonic() < end:
            time.sleep(0.005)
        held = threading.Event()

        def slow_keepalive() -> None:  # a keep-alive whose reply is slow (flaky device)
            with drv.link.lock:
                held.set()
                time.sleep(0.05)

        th = threading.Thread(target=slow_keepalive)
        th.start()
        held.wait()
        first = gated.fire_now()
        th.join()
        assert first.fired and first.lsl_time is not None
        # wait until the ledger says 1.0 s has passed since the first pulse
        end = time.monotonic() + 3.0
        while not drv.ready and time.monotonic() < end:
            time.sleep(0.005)
        while pylsl.local_clock() + drv.latency_s < first.lsl_time + 1.002:
            time.sleep(0.0005)
        second = gated.fire_now()
        assert second.fired
        time.sleep(0.1)
        actual = emu.fired[-2:]
        pulses = [Pulse(t, 40.0, trigger=k, unit=k) for k, t in enumerate(actual)]
        ledger = [p.t for p in gated.gate.ledger]
        gap = actual[1] - actual[0]
        assert not violations(pulses, oracle_limits(lim)), (
            f"at the coil {gap:.4f} s apart; ledger {ledger[0] - actual[0]:+.4f} s off")
        # the ledger is the command's time plus the serial wire time (the emulator on a
        # pty receives the bytes at once): within 2 ms of when the device saw it
        assert abs(ledger[0] - drv.latency_s - actual[0]) < 0.002
    finally:
        drv.close()
        emu.stop()


def test_bistim_simultaneous_discharge_judges_output_b() -> None:

    emu = MagstimEmulator("bistim", power_a=50, power_b=0).start()
    drv = MagstimStimulator(port=emu.port, model="bistim")
    faults: list[str] = []
    gated = GatedStimulator(drv, SafetyGate(limits(max_intensity_pct=60.0)),
                            eeg_age_s=lambda: 0.0, on_fault=faults.append)
    try:
        drv.open()
        gated.arm()  # nothing commanded: the device's own settings (50 %), watched
        end = time.monotonic() + 3.0
        while not drv.ready and time.monotonic() < end:
            time.sleep(0.005)
        with emu.lock:  # front panel: B up to 95 %, interval 0 = simultaneous discharge
            emu.power_b, emu.interval = 95, 0
        drv.read_device()  # the read-back says it: mode simultaneous, B 95 %
        assert drv.device is not None and drv.device.max_pct == 95.0
        r = gated.fire_now()
        time.sleep(0.05)
        delivered_b = [d.power_b for d in emu.delivered]
        assert not r.fired and not delivered_b, (
            f"fired {r.reason}; delivered B powers {delivered_b}, limit 60 %")
    finally:
        drv.close()
        emu.stop()


def test_a_refused_future_request_does_not_erase_the_rate_window() -> None:
    lim = limits(motor_threshold_pct=None, max_pulses_per_window=10, rate_window_s=60.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(50.0)
    gated.arm()
    rec = Recorder(drv, gated)
    for _ in range(10):
        clock.t += 1.1
        assert rec.fire() == "fired"
    clock.t += 1.1
    assert rec.fire() == "safety:max_rate"  # the window is full
    back = clock.t
    clock.t += 100.0  # the clock glitches forward for one request...
    assert rec.fire(offsets=(0.0, 0.005)) == "safety:train_ipi"  # ...which is refused
    clock.t = back  # ...and comes back
    got = []
    for _ in range(10):
        clock.t += 1.1
        got.append(rec.fire())
    assert not violations(rec.pulses, oracle_limits(lim)), got


def test_a_planned_train_above_10_hz_is_judged_on_the_20_hz_row() -> None:
    gate = SafetyGate(limits(motor_threshold_pct=50.0))
    ipi = round(1.0 / 10.1, 6)  # as closedloop.stim.patterns.unit_for plans it
    offsets = tuple(round(k * ipi, 6) for k in range(37))  # 3.66 s at 10.1 Hz
    got = gate.check_start(Trigger(100.0, (55.0,)), offsets=offsets, eeg_age_s=0.0)
    assert got == "safety:train_duration"


# =========================================================================================
# ATTACKS THE GATE STOPS (plain tests, not already covered elsewhere)
# =========================================================================================

def test_end_unit_mid_train_then_restart_needs_the_pause() -> None:
    """Aborting a 10 Hz train part-way with end_unit() and starting a new unit at once
    does not reset the run: the min interval, then the inter-train pause hold."""
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(50.0)
    gated.arm()
    rec = Recorder(drv, gated)
    offs = tuple(k * 0.1 for k in range(20))
    t0 = clock.t
    assert rec.fire(offsets=offs) == "fired"
    for k in range(1, 5):
        clock.t = t0 + offs[k]
        assert rec.fire(offsets=offs, index=k, planned=clock.t) == "fired"
    gated.end_unit()
    clock.t += 0.1
    assert rec.fire(offsets=offs) == "safety:min_interval"
    clock.t += 1.0
    assert rec.fire(offsets=offs) == "safety:inter_train"
    clock.t += 5.0
    assert rec.fire(offsets=offs) == "fired"
    assert not violations(rec.pulses, oracle_limits(lim))


def test_later_triggers_fired_without_a_plan_are_still_judged() -> None:
    """index > 0 with planned=None skips the on-time check, but every trigger is still
    judged against the ledger: a slow unit (2 Hz at 120 % MT, allowed) whose second
    trigger is fired 20 ms after the first becomes a 50 Hz doublet at 120 % MT: refused."""
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(60.0)
    gated.arm()
    rec = Recorder(drv, gated)
    offs = (0.0, 0.5, 1.0)  # a slow unit (2 Hz)
    assert rec.fire(offsets=offs) == "fired"
    clock.t += 0.02
    assert rec.fire(offsets=offs, index=1) == "safety:burst_intensity"
    assert not violations(rec.pulses, oracle_limits(lim))


def test_knob_turned_and_polled_mid_unit_stops_the_unit() -> None:
    lim = limits(motor_threshold_pct=50.0)
    faults: list[str] = []
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    gated = GatedStimulator(drv, SafetyGate(lim), eeg_age_s=lambda: 0.0, clock=clock,
                            on_fault=faults.append)
    gated.set_intensity(50.0)
    gated.arm()
    offs = tuple(k * 0.1 for k in range(10))
    t0 = clock.t
    assert gated.fire_now(offsets=offs).fired
    drv.turn_knob(64.0)  # 128 % MT, still under max_intensity_pct
    drv.poll()
    clock.t = t0 + 0.1
    assert gated.fire_now(offsets=offs, index=1, planned=clock.t).reason == "disarmed"
    assert faults and not gated.armed
    with pytest.raises(StimulatorError):
        gated.arm()
    assert [p for _, p in drv.delivered] == [50.0]


def test_knob_turned_and_read_without_poll_is_refused_at_the_next_trigger() -> None:
    """A read-back that is not a watch-thread poll (no fault from the driver) still
    reaches the gate: the next trigger compares it with the command."""
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(50.0)
    gated.arm()
    offs = tuple(k * 0.1 for k in range(10))
    t0 = clock.t
    assert gated.fire_now(offsets=offs).fired
    drv.turn_knob(64.0)
    drv.read_device()
    clock.t = t0 + 0.1
    assert gated.fire_now(offsets=offs, index=1,
                          planned=clock.t).reason == "safety:device_mismatch"
    assert [p for _, p in drv.delivered] == [50.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -5.0])
def test_device_left_at_a_non_finite_or_negative_power_never_fires(bad: float) -> None:
    """Arming with nothing commanded adopts the device's read-back; a NaN / inf /
    negative power must not be adopted into a pulse."""
    clock, drv, gated = rig(limits())
    drv.device_a = bad
    drv.read_device()
    try:
        gated.arm()
    except StimulatorError:
        return
    clock.t += 2.0
    assert not gated.fire_now().fired
    assert drv.delivered == []


def test_clock_forward_then_back_fires_nothing_until_time_catches_up() -> None:
    lim = limits()
    clock, _drv, gated = rig(lim)
    gated.set_intensity(50.0)
    gated.arm()
    clock.t += 2.0
    assert gated.fire_now().fired
    back = clock.t
    clock.t += 100.0
    assert gated.fire_now().fired  # the glitched time is in the ledger now
    clock.t = back + 2.0
    assert gated.fire_now().reason == "safety:min_interval"
    clock.t = back + 50.0
    assert gated.fire_now().reason == "safety:min_interval"  # never before the glitch


def test_two_gates_sharing_one_day_counter_folder_never_exceed_the_day() -> None:
    """Two sessions (two processes' gates) of one participant in one folder."""
    with tempfile.TemporaryDirectory() as d:
        lim = limits(max_pulses_per_day=25)
        delivered = 0
        rigs = []
        for _ in range(2):
            day = DayCounter(d, "P7", limit=25, today=lambda: "2026-12-01")
            clock, drv, gated = rig(lim, day=day)
            gated.credit_target = 20
            gated.set_intensity(50.0)
            gated.arm()
            rigs.append((clock, drv, gated))
        for _ in range(40):
            for clock, _drv, gated in rigs:
                clock.t += 1.5
                if gated.fire_now().fired:
                    delivered += 1
                if gated.gate.credit < 5:
                    gated.gate.top_up(gated.credit_target)
        for _, _, gated in rigs:
            gated.gate.settle()
        assert delivered == 25
        assert DayCounter(d, "P7", limit=25, today=lambda: "2026-12-01").count() == 25


def test_fire_failure_mid_unit_with_pulse_delivered_is_in_the_ledger_and_blocks() -> None:
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(50.0)
    gated.arm()
    offs = tuple(k * 0.1 for k in range(5))
    t0 = clock.t
    assert gated.fire_now(offsets=offs).fired
    drv.fail_next_fire(StimulatorError("port gone"), delivered=True)
    clock.t = t0 + 0.1
    assert gated.fire_now(offsets=offs, index=1, planned=clock.t).reason == "fire_failed"
    gated.end_unit()
    assert len(gated.gate.ledger) == 2 == len(drv.delivered)
    with pytest.raises(StimulatorError):
        gated.arm()
    # a full reconnect, then the inter-train pause still counts from the failed pulse
    drv.close()
    drv.open()
    gated.set_intensity(50.0)
    gated.reconnected()
    gated.arm()
    clock.t = t0 + 1.2
    assert gated.fire_now().reason == "safety:inter_train"
