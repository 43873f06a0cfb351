"""Stimulation patterns and real-device drivers inside the running service.

EEG over real LSL; the stimulator is the simulated one or a serial driver talking to its
protocol emulator on a pseudo-terminal pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from closedloop.cli import main as cli_main
from closedloop.control.service import ClosedLoopService
from closedloop.errors import ControlError
from closedloop.recording.events import read_events
from tests.conftest import Pusher, unique
from tests.test_faults import LABELS, mu
from tests.test_service import config, run_service
from tools.stim_emulator import MagstimEmulator, TriggerBoxEmulator

pytestmark = [pytest.mark.lsl, pytest.mark.slow]


@pytest.mark.timing
@pytest.mark.asyncio
async def test_open_loop_bursts_record_every_pulse(tmp_path: Path,
                                                   pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulation.pattern="burst"', 'stimulation.timing="open_loop"',
                 "stimulation.burst_pulses=3", "stimulation.burst_frequency_hz=100",
                 "stimulation.units=3", "safety.motor_threshold_pct=70",
                 "stimulator.intensity_pct=60", "trigger.min_interval_s=1.1",
                 "trigger.jitter_s=0", "safety.min_inter_train_s=1.0",
                 "safety.min_interval_s=1.0", 'session.participant="p01"',
                 f'safety.day_counter_dir="{tmp_path / "days"}"')
    await run_service(cfg, 5.5)
    events = read_events(tmp_path / "events.jsonl")
    pulses = [e for e in events if e["event"] == "pulse"]
    assert len(pulses) == 9  # 3 units of 3, then the session is complete
    assert [p["unit_index"] for p in pulses] == [0, 1, 2] * 3
    for u in range(3):
        times = [p["lsl_time"] for p in pulses[3 * u:3 * u + 3]]
        assert np.allclose(np.diff(times), 0.010, atol=0.0005)  # 100 Hz, to the half ms
    assert all(abs(p["fire_error_ms"]) < 1.0 for p in pulses)
    assert any(e["event"] == "stimulation_complete" for e in events)
    # the participant's day: the 9 pulses, the reservation not used given back at the end
    counter = json.loads((tmp_path / "days" / "pulses-p01.json").read_text())
    assert sum(counter.values()) == 9


@pytest.mark.asyncio
async def test_trains_refused_by_the_rossi_table(tmp_path: Path,
                                                 pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    # 20 Hz for 2 s at 120 % MT: the table allows 0.55 s (x 0.75)
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulation.pattern="train"', 'stimulation.timing="open_loop"',
                 "stimulation.train_frequency_hz=20", "stimulation.train_pulses=40",
                 "safety.motor_threshold_pct=50", "stimulator.intensity_pct=60",
                 "safety.max_pulses_per_window=200", "trigger.min_interval_s=1.0",
                 "trigger.jitter_s=0")
    stats, _ = await run_service(cfg, 2.5)
    events = read_events(tmp_path / "events.jsonl")
    assert not [e for e in events if e["event"] == "pulse"]
    refused = [e for e in events if e["event"] == "pulse_refused"]
    assert refused and {e["reason"] for e in refused} == {"safety:train_duration"}
    assert stats.fired == 0


@pytest.mark.asyncio
async def test_paired_pulses_through_the_gate(tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulation.pattern="paired"', "stimulation.conditioning_pct=30",
                 "stimulation.isi_ms=3", "stimulator.intensity_pct=60",
                 "trigger.min_interval_s=0.4", "trigger.jitter_s=0",
                 "safety.min_interval_s=0.4", "trigger.amplitude_percentile=0")
    stats, service = await run_service(cfg, 3.0)
    events = read_events(tmp_path / "events.jsonl")
    pulses = [e for e in events if e["event"] == "pulse"]
    assert pulses and all(p["paired"] == {"conditioning_pct": 30.0, "isi_ms": 3.0}
                          for p in pulses)
    assert stats.fired == 2 * len(pulses)  # each trigger is two pulses
    assert service.rig.stim is not None
    drv = service.rig.stim.driver
    shots = drv.pulses  # type: ignore[attr-defined]
    assert len(shots) == stats.fired
    assert [round(b[0] - a[0], 4) for a, b in zip(shots[::2], shots[1::2], strict=True)] == \
        [0.003] * len(pulses)


@pytest.mark.asyncio
async def test_serial_stimulator_unplugged_mid_session(tmp_path: Path,
                                                       pushers: list[Pusher]) -> None:
    """The cable is pulled: disarm, say why, keep running, reconnect when it is back."""
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    emu = MagstimEmulator("200", arm_delay_s=0.1).start()
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulator.driver="magstim-200"', f'stimulator.port="{emu.port}"',
                 "stimulator.intensity_pct=40", "trigger.min_interval_s=0.5",
                 "trigger.jitter_s=0", "safety.min_interval_s=0.5",
                 "trigger.amplitude_percentile=0")

    async def scenario(service: ClosedLoopService) -> None:
        await asyncio.sleep(2.5)
        emu.unplug()
        await asyncio.sleep(2.0)
        assert service.rig.stim is not None and not service.rig.stim.armed
        assert service.state == "idle"  # alive, disarmed

    try:
        stats, _ = await run_service(cfg, 0, scenario)
    finally:
        emu.stop()
    events = read_events(tmp_path / "events.jsonl")
    pulses = [e for e in events if e["event"] == "pulse"]
    assert pulses and len(pulses) == len(emu.fired)
    fault = next(e for e in events if e["event"] == "fault" and e["error"] == "stimulator")
    # noticed by the keep-alive or by a fire command, whichever came first
    assert "unplugged?" in fault["message"] or "no answer" in fault["message"]
    assert all(p["lsl_time"] < fault["lsl_time"] for p in pulses)
    assert stats.refused["stimulator_fault"] == 1


@pytest.mark.timing
@pytest.mark.asyncio
async def test_ttl_trigger_box_session(tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    box = TriggerBoxEmulator().start()
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulator.driver="ttl"', f'stimulator.port="{box.port}"',
                 'stimulator.ttl_line="byte"', "trigger.min_interval_s=0.4",
                 "trigger.jitter_s=0", "safety.min_interval_s=0.4",
                 "trigger.amplitude_percentile=0",
                 # 2.5 Hz is rTMS: at 100 % MT the table allows 10 s x 0.75
                 "safety.motor_threshold_pct=60", "stimulator.intensity_pct=60")
    try:
        await run_service(cfg, 3.0)
    finally:
        box.stop()
    pulses = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "pulse"]
    assert len(pulses) >= 3 and len(box.edges) == len(pulses)
    # the box saw each edge when the service said it fired (to a few ms: the emulator
    # shares this process's GIL; tools/bench_timing.py measures it from another process)
    for p, (t_edge, _) in zip(pulses, box.edges, strict=True):
        assert abs(p["lsl_time"] - t_edge) < 0.005


def test_stimulator_check_cli(tmp_path: Path) -> None:
    emu = MagstimEmulator("bistim", arm_delay_s=0.1).start()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli_main(["stimulator", "check", "--driver", "magstim-bistim", "--port",
                           emu.port, "--intensity", "45", "--fire", "--set",
                           f'safety.day_counter_dir="{tmp_path / "day"}"'])
    finally:
        emu.stop()
    report = json.loads(out.getvalue())
    assert rc == 0 and report["ok"]
    assert [s["step"] for s in report["steps"]] == ["open", "read_device", "set_intensity",
                                                    "arm", "wait_ready", "fire", "disarm"]
    assert report["fire"]["fired"] and len(emu.fired) == 1 and emu.power_a == 45
    # above the safety limit: refused before anything is sent
    out = io.StringIO()
    emu2 = MagstimEmulator("200").start()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli_main(["stimulator", "check", "--driver", "magstim-200", "--port",
                           emu2.port, "--intensity", "95", "--fire", "--set",
                           f'safety.day_counter_dir="{tmp_path / "day"}"'])
    finally:
        emu2.stop()
    report = json.loads(out.getvalue())
    assert rc == 1 and "safety limit" in report["error"] and emu2.fired == []


@pytest.mark.asyncio
async def test_watchdog_disarms_a_stalled_service(tmp_path: Path,
                                                  pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 "safety.watchdog_ms=200", "trigger.amplitude_percentile=0",
                 "trigger.min_interval_s=0.3", "safety.min_interval_s=0.3")

    async def scenario(service: ClosedLoopService) -> None:
        await asyncio.sleep(1.0)
        assert service.rig.stim is not None and service.rig.stim.armed
        time.sleep(0.6)  # the controller hangs (blocks its own event loop)
        assert not service.rig.stim.armed  # disarmed from the watchdog's thread meanwhile
        await asyncio.sleep(0.5)

    await run_service(cfg, 0, scenario)
    events = read_events(tmp_path / "events.jsonl")
    trip = next(e for e in events if e["event"] == "fault" and e["error"] == "watchdog")
    assert "did not run" in trip["message"]
    assert not [e for e in events if e["event"] == "pulse" and e["lsl_time"] > trip["lsl_time"]]


def test_stimulator_check_refuses_a_device_left_at_a_high_power(tmp_path: Path) -> None:
    """The issue's attack: a Magstim left at 95 % fired at 95 % when --intensity was left
    out (the gate believed 0 %)."""
    emu = MagstimEmulator("200", power_a=95).start()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli_main(["stimulator", "check", "--driver", "magstim-200", "--port",
                           emu.port, "--fire", "--set",
                           f'safety.day_counter_dir="{tmp_path / "day"}"'])
    finally:
        emu.stop()
    report = json.loads(out.getvalue())
    assert rc == 1 and not report["ok"]
    assert report["device"]["intensity_pct"] == 95
    assert "95%, above safety.max_intensity_pct" in report["error"]
    assert emu.fired == [] and "arm" not in [s["step"] for s in report["steps"]]


@pytest.mark.asyncio
async def test_a_knob_turned_after_arming_disarms_and_blocks_arming(
        tmp_path: Path, pushers: list[Pusher]) -> None:
    """The issue's attack: a front-panel knob turned after arming fired at the new power.
    Now the keep-alive's read-back sees it: a fault that disarms; no pulse at the new power;
    arming is refused until the reconnect has put the commanded power back."""
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    emu = MagstimEmulator("200", arm_delay_s=0.05).start()
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulator.driver="magstim-200"', f'stimulator.port="{emu.port}"',
                 "stimulator.intensity_pct=40", "trigger.min_interval_s=1.1",
                 "trigger.jitter_s=0", "trigger.amplitude_percentile=0",
                 "stimulator.keepalive_ms=100")
    refused: list[str] = []

    async def scenario(service: ClosedLoopService) -> None:
        await asyncio.sleep(1.5)
        emu.turn_knob(75)  # below the limit, but not what was commanded
        await asyncio.sleep(0.5)
        assert service.rig.stim is not None and not service.rig.stim.armed
        try:
            service.api.arm(by="test")
        except ControlError as exc:
            refused.append(str(exc))
        await asyncio.sleep(5.5)  # the reconnect restores 40 % and reads it back
        service.api.arm(by="test")
        await asyncio.sleep(1.5)

    try:
        await run_service(cfg, 0, scenario)
    finally:
        emu.stop()
    events = read_events(tmp_path / "events.jsonl")
    assert refused and "cannot arm" in refused[0] and "75" in refused[0]
    fault = next(e for e in events if e["event"] == "fault" and e["error"] == "stimulator")
    assert "75" in fault["message"] and "40" in fault["message"]
    assert any(e["event"] == "stimulator_reconnected" for e in events)
    assert {d.power_a for d in emu.delivered} == {40}  # nothing left at 75 %


@pytest.mark.timing
@pytest.mark.asyncio
async def test_a_theta_burst_unit_under_way_cannot_be_raised(tmp_path: Path,
                                                             pushers: list[Pusher]) -> None:
    """The issue's attack: `set intensity_pct` during cTBS raised the rest of the unit."""
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulation.pattern="ctbs"', "stimulation.tbs_pulses=60",
                 'stimulation.timing="open_loop"', "safety.motor_threshold_pct=50",
                 "stimulator.intensity_pct=40", "safety.max_burst_intensity_mt=100",
                 "safety.max_intensity_pct=80", "safety.max_pulses_per_window=1000")
    replies: list[str] = []

    async def scenario(service: ClosedLoopService) -> None:
        for _ in range(300):  # until the unit is under way
            if service.rig.stim is not None and service.rig.stim.gate.unit_active:
                break
            await asyncio.sleep(0.01)
        try:
            service.api.apply_settings({"intensity_pct": 62.5}, by="test")
        except ControlError as exc:
            replies.append(str(exc))
        await asyncio.sleep(5.0)

    await run_service(cfg, 0, scenario)
    events = read_events(tmp_path / "events.jsonl")
    pulses = [e for e in events if e["event"] == "pulse"]
    assert replies and "unit is being delivered" in replies[0]
    assert len(pulses) == 60 and {p["intensity_pct"] for p in pulses} == {40.0}
    assert not [e for e in events if e["event"] == "settings_changed"]
