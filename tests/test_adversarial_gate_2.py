"""A second hostile review of the safety gate, after the fixes of "runs made of pulses".

Holes (each found by a hostile review, now fixed; the test states what a safe gate does):

- a MagPro knob frame already at the host is read by the fire request itself, after the
  gate judged the stale cache: a pulse above ``max_intensity_pct`` leaves;
- a run of paired pulses is never patterned and its frequency ignores the pairs' own gap:
  3 ms doublets at 5 Hz at 130 % MT, 20 ms doublets every 60 ms (34 pulses/s);
- one burst makes the whole run "patterned", and a patterned run is never held to Table 4:
  5 Hz single pulses at 100 % MT for 40 s (Table 4: 10 s x 0.75);
- Table 4's 1 Hz row is unreachable: single pulses exactly 1 s apart never form a run, so
  1 Hz at 130 % MT runs for ever (Table 4: 50 s x 0.75);
- a unit's undelivered pulses, reserved yesterday, are given back into today's credit
  (re-arm across midnight, then the unit stops): more pulses today than the day counter.

The oracle (tests/safety_oracle.py) agrees with the gate on the three rule holes: it shares
the same ideas (a pair's gap never short, patterned runs exempt from R5, runs < 1 s).
Then the attacks the gate stopped (plain tests).
"""

from __future__ import annotations

import tempfile
import threading
import time

import pytest

from closedloop.errors import StimulatorError
from closedloop.stim.day_counter import DayCounter
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.magstim import MagstimStimulator
from closedloop.stim.magventure import MagVentureStimulator
from closedloop.stim.patterns import _tbs
from closedloop.stim.safety import SafetyGate, Trigger
from tests.safety_oracle import violations
from tests.test_adversarial_gate import Clock, Recorder, limits, oracle_limits, rig
from tools.stim_emulator import MagstimEmulator, MagVentureEmulator


def _unit(rec: Recorder, clock: Clock, offs: tuple[float, ...], *, paired: bool = False,
          late: dict[int, float] | None = None) -> list[str]:
    """Fire a unit trigger by trigger at its planned times (``late``: k -> seconds off)."""
    t0 = clock.t
    got = [rec.fire(offsets=offs, paired=paired)]
    for k in range(1, len(offs)):
        if got[-1] != "fired":
            break
        planned = t0 + offs[k]
        clock.t = planned + (late or {}).get(k, 0.0)
        got.append(rec.fire(offsets=offs, index=k, planned=planned, paired=paired))
    if got[-1] != "fired":
        rec.gated.end_unit()
    return got


# =========================================================================================
# HOLES FOUND (fixed)
# =========================================================================================

def test_magventure_knob_frame_at_the_host_is_judged_before_the_fire() -> None:
    emu = MagVentureEmulator().start()
    drv = MagVentureStimulator(port=emu.port, poll_s=30.0)  # the poll is not the point
    gated = GatedStimulator(drv, SafetyGate(limits(max_intensity_pct=60.0)),
                            eeg_age_s=lambda: 0.0, on_fault=lambda _r: None)
    try:
        drv.open()
        gated.set_intensity(50)
        gated.arm()
        emu.turn_knob(75)  # the device says so at once, in a frame of its own
        time.sleep(0.1)  # ...which is in the host's input buffer now
        r = gated.fire_now()
        time.sleep(0.1)
        delivered = [d.power_a for d in emu.delivered]
        # today: fired at 75 % (limit 60 %); the driver's cache says 75 right after the fire
        assert not r.fired and not delivered, (r.reason, delivered, drv.device)
    finally:
        drv.close()
        emu.stop()


@pytest.mark.parametrize(("isi_ms", "period_s", "pct"), [
    (3.0, 0.2, 65.0),   # 333 Hz doublets at 5 Hz (a TBS-like pattern) at 130 % MT
    (20.0, 0.06, 50.0),  # 50 Hz doublets every 60 ms: 34 pulses/s at 100 % MT
])
def test_a_run_of_short_interval_pairs_is_a_patterned_run(isi_ms: float, period_s: float,
                                                          pct: float) -> None:
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_paired(pct, pct, isi_ms)
    gated.arm()
    rec = Recorder(drv, gated)
    got = _unit(rec, clock, tuple(round(k * period_s, 6) for k in range(10)), paired=True)
    assert not violations(rec.pulses, oracle_limits(lim))
    # as pulses they are bursts of 2 (< 40 ms) repeated < 1 s apart: patterned rTMS, at
    # most 100 % MT and with onsets >= 190 ms: the unit is refused before its first pair
    assert got[0] in ("safety:burst_intensity", "safety:burst_rate"), got


def test_a_burst_does_not_exempt_the_rest_of_the_run_from_table_4() -> None:
    lim = limits(motor_threshold_pct=50.0, min_interval_s=0.2)
    clock, drv, gated = rig(lim)
    gated.set_intensity(50.0)  # 100 % MT
    gated.arm()
    rec = Recorder(drv, gated)
    assert _unit(rec, clock, (0.0, 0.02, 0.04)) == ["fired"] * 3  # one TBS burst
    t0 = clock.t
    fired = 0
    for i in range(200):  # then single pulses at 5 Hz
        clock.t = t0 + 0.2 * (i + 1)
        if rec.fire() != "fired":
            break
        fired += 1
    assert not violations(rec.pulses, oracle_limits(lim))  # the oracle shares the idea
    # without the burst the 38th pulse is refused (Table 4, 5 Hz, 100 % MT: 10 s x 0.75);
    # with it, all 200 fire (40 s), and up to 600 would
    assert fired <= 38, fired


def test_1_hz_at_130_percent_mt_is_held_to_the_1_hz_row() -> None:
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(65.0)  # 130 % MT
    gated.arm()
    rec = Recorder(drv, gated)
    got = []
    for _ in range(60):
        clock.t += 1.0
        got.append(rec.fire())
    assert not violations(rec.pulses, oracle_limits(lim))
    # Table 4, 1 Hz, 130 % MT: 50 s x 0.75 = 37.5 s, i.e. 37 pulses (n / f), then the pause
    assert got[:37] == ["fired"] * 37 and got[37] == "safety:train_duration", got


def test_a_unit_stopped_after_midnight_gives_back_to_yesterday_not_today() -> None:
    with tempfile.TemporaryDirectory() as d:
        today = ["2026-12-01"]
        day = DayCounter(d, "P1", limit=20, today=lambda: today[0])
        lim = limits(motor_threshold_pct=50.0, max_pulses_per_day=20)
        clock = Clock()
        drv = FakeStimulator(clock=clock)
        drv.open()
        gated = GatedStimulator(drv, SafetyGate(lim, day=day), eeg_age_s=lambda: 0.0,
                                clock=clock, credit_target=20)
        gated.set_intensity(40.0)
        gated.arm()
        offs = tuple(round(k * 0.2, 6) for k in range(10))  # 10 pulses, reserved on day 1
        t0 = clock.t
        assert gated.fire_now(offsets=offs).fired
        clock.t = t0 + 0.2
        assert gated.fire_now(offsets=offs, index=1, planned=clock.t).fired
        today[0] = "2026-12-02"  # midnight, the unit under way
        gated.arm()  # arming again while armed is allowed: it tops the day up
        clock.t = t0 + 0.45
        assert gated.fire_now(offsets=offs, index=2, planned=t0 + 0.4,
                              max_lateness_s=0.001).reason == "late"
        gated.end_unit()  # as the scheduler does: 8 pulses of day 1 "given back"
        fired = 0
        clock.t += 6.0
        for _ in range(60):
            clock.t += 1.5
            fired += gated.fire_now().fired
            if gated.gate.credit < 5 and gated.gate.needs_credit(5):
                gated.gate.top_up(20)
        gated.gate.settle()
        # today: 28 pulses delivered on 2026-12-02, the counter says 20 (its limit)
        assert fired <= 20 and day.count() >= fired, (fired, day.count())


# =========================================================================================
# ATTACKS THE GATE STOPPED
# =========================================================================================

def test_a_prepared_unit_shape_does_not_skip_the_pause_after_a_run() -> None:
    """The TBS shape judged ahead on arming (cached "allowed", independent of history) is
    reused for a unit that starts a new run 1.5 s after a repetitive run: the first
    trigger is still judged against the ledger (the pause), and the oracle agrees."""
    lim = limits(motor_threshold_pct=50.0, min_interval_s=0.05)
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    block = _tbs(10)
    gated = GatedStimulator(drv, SafetyGate(lim), eeg_age_s=lambda: 0.0, clock=clock,
                            unit_offsets=block)
    gated.set_intensity(40.0)  # prepares the shape (80 % MT: allowed)
    gated.arm()
    assert any(v[0] is None for v in gated.gate._shapes.values())
    rec = Recorder(drv, gated)
    assert _unit(rec, clock, tuple(round(k * 0.1, 6) for k in range(5))) == ["fired"] * 5
    clock.t += 1.5
    assert rec.fire(offsets=block) == "safety:inter_train"
    clock.t += 3.6
    assert _unit(rec, clock, block) == ["fired"] * len(block)
    assert not violations(rec.pulses, oracle_limits(lim))


def test_a_cached_shape_is_not_reused_for_other_intensities() -> None:
    lim = limits(motor_threshold_pct=50.0, min_interval_s=0.05)
    clock = Clock()
    drv = FakeStimulator(clock=clock)
    drv.open()
    block = _tbs(3)
    gated = GatedStimulator(drv, SafetyGate(lim), eeg_age_s=lambda: 0.0, clock=clock,
                            unit_offsets=block)
    gated.set_intensity(40.0)  # 80 % MT: prepared, allowed
    gated.arm()
    gated.set_intensity(55.0)  # 110 % MT: above the burst cap
    rec = Recorder(drv, gated)
    assert rec.fire(offsets=block) == "safety:burst_intensity"
    assert drv.delivered == []


def test_long_interval_pairs_chained_20_ms_apart_are_one_group() -> None:
    """Pairs with a 100 ms interval whose conditioning pulse comes 20 ms after the
    previous pair's test pulse: the chain is a patterned run whose groups grow (a pair's
    test pulse joins its conditioning pulse's group); the unit is refused whole."""
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_paired(40.0, 40.0, 100.0)
    gated.arm()
    rec = Recorder(drv, gated)
    got = _unit(rec, clock, tuple(round(k * 0.12, 6) for k in range(6)), paired=True)
    assert got == ["safety:burst_length"] and drv.delivered == []
    clock.t += 2.0
    assert _unit(rec, clock, (0.0, 0.12), paired=True) == ["fired"] * 2  # a group of 4
    assert not violations(rec.pulses, oracle_limits(lim))


def test_a_device_burst_spanning_seconds_is_a_run_and_needs_its_pause() -> None:
    """A device left giving 3 pulses 2 s apart per trigger (adopted on arming): one
    trigger is a run (needs the motor threshold); the pause counts from its last pulse."""
    for mt, first in ((None, "safety:rtms_needs_motor_threshold"), (50.0, "fired")):
        lim = limits(motor_threshold_pct=mt)
        clock, drv, gated = rig(lim)
        drv.device_a = 40.0
        drv.set_front_panel_mode(3, 2000.0)
        drv.read_device()
        gated.arm()  # nothing commanded: the device's own settings
        rec = Recorder(drv, gated)
        assert rec.fire() == first
        if mt is None:
            continue
        clock.t += 4.0 + 1.5  # 1.5 s after its last pulse
        assert rec.fire() == "safety:inter_train"
        clock.t += 3.6
        assert rec.fire() == "fired"
        assert not violations(rec.pulses, oracle_limits(lim))


def test_later_triggers_drifting_late_then_early_never_break_the_rules() -> None:
    """A 25 Hz plan (judged as written, on the 25 Hz row) whose triggers alternate 1 ms
    late and 2 ms early (inside the fire window): 37 ms gaps are judged as bursts and the
    unit stops; what left is allowed."""
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(40.0)
    gated.arm()
    rec = Recorder(drv, gated)
    offs = tuple(round(k * 0.04, 6) for k in range(15))
    late = {k: (0.001 if k % 2 else -0.002) for k in range(1, 15)}
    got = _unit(rec, clock, offs, late=late)
    assert got[0] == "fired" and got[-1] != "fired"
    assert not violations(rec.pulses, oracle_limits(lim))


def test_a_trigger_1_ms_late_across_the_run_boundary_needs_the_pause() -> None:
    """A unit planned with a 0.9995 s gap after a 10 Hz part (one run as written); its
    last trigger 1 ms late would start a new run after a 1.0005 s pause: refused."""
    lim = limits(motor_threshold_pct=50.0)
    clock, drv, gated = rig(lim)
    gated.set_intensity(40.0)
    gated.arm()
    rec = Recorder(drv, gated)
    offs = (*tuple(round(k * 0.1, 6) for k in range(5)), 1.3995)
    got = _unit(rec, clock, offs, late={5: 0.001})
    assert got == ["fired"] * 5 + ["safety:inter_train"]
    assert not violations(rec.pulses, oracle_limits(lim))


def test_a_large_unit_never_starts_inside_a_run() -> None:
    """A unit of more than 25 pulses that would continue a run is refused whole (the
    hard rate counts all its pulses), so the slow simulation of a long plan never delays
    a pulse that is allowed."""
    gate = SafetyGate(limits(motor_threshold_pct=50.0, min_interval_s=0.05))
    t = Trigger(1000.0, (40.0,))
    assert gate.check_start(t, offsets=(0.0,), eeg_age_s=0.0) is None
    gate.commit(t, start=True)
    nxt = Trigger(1000.2, (40.0,))
    assert gate.check_start(nxt, offsets=_tbs(9), eeg_age_s=0.0) in (
        "safety:hard_rate", "safety:burst_mixed")


def test_a_serial_fire_that_gets_no_answer_under_the_port_lock_does_not_deadlock() -> None:
    """The gate holds the port (fire_lock) from its checks through the fire: a device
    that stops answering the fire command faults, the fault handler and the disarm that
    follow run under that lock, and the call returns; disarming from another thread
    afterwards does not hang."""
    emu = MagstimEmulator("200").start()
    drv = MagstimStimulator(port=emu.port, model="200")
    faults: list[str] = []
    gated = GatedStimulator(drv, SafetyGate(limits()), eeg_age_s=lambda: 0.0,
                            on_fault=faults.append)
    try:
        drv.open()
        gated.set_intensity(40)
        gated.arm()
        end = time.monotonic() + 3.0
        while not drv.ready and time.monotonic() < end:
            time.sleep(0.005)
        emu.fault = "silent"
        out: list[object] = []
        th = threading.Thread(target=lambda: out.append(gated.fire_now()))
        th.start()
        th.join(5.0)
        assert not th.is_alive(), "fire_now hung under the port lock"
        assert out and getattr(out[0], "reason", None) == "fire_failed"
        assert faults and not gated.armed
        d = threading.Thread(target=gated.disarm)
        d.start()
        d.join(5.0)
        assert not d.is_alive()
        with pytest.raises(StimulatorError):
            gated.arm()
    finally:
        drv.close()
        emu.stop()
