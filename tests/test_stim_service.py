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
from closedloop.recording.events import read_events
from tests.conftest import Pusher, unique
from tests.test_faults import LABELS, mu
from tests.test_service import config, run_service
from tools.stim_emulator import MagstimEmulator, TriggerBoxEmulator

pytestmark = [pytest.mark.lsl, pytest.mark.slow]


@pytest.mark.asyncio
async def test_open_loop_bursts_record_every_pulse(tmp_path: Path,
                                                   pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulation.pattern="burst"', 'stimulation.timing="open_loop"',
                 "stimulation.burst_pulses=3", "stimulation.burst_frequency_hz=100",
                 "stimulation.units=3", "safety.motor_threshold_pct=70",
                 "stimulator.intensity_pct=60", "trigger.min_interval_s=1.0",
                 "trigger.jitter_s=0", "safety.min_inter_train_s=1.0",
                 "safety.min_interval_s=1.0")
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
    counter = json.loads((tmp_path / "pulses-per-day.json").read_text())
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
    assert service.stim is not None
    drv = service.stim.driver
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
        assert service.stim is not None and not service.stim.armed
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


@pytest.mark.asyncio
async def test_ttl_trigger_box_session(tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    box = TriggerBoxEmulator().start()
    cfg = config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                 'stimulator.driver="ttl"', f'stimulator.port="{box.port}"',
                 'stimulator.ttl_line="byte"', "trigger.min_interval_s=0.4",
                 "trigger.jitter_s=0", "safety.min_interval_s=0.4",
                 "trigger.amplitude_percentile=0")
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
                           f'safety.day_counter_file="{tmp_path / "day.json"}"'])
    finally:
        emu.stop()
    report = json.loads(out.getvalue())
    assert rc == 0 and report["ok"]
    assert [s["step"] for s in report["steps"]] == ["open", "set_intensity", "arm",
                                                    "wait_ready", "fire", "disarm"]
    assert report["fire"]["fired"] and len(emu.fired) == 1 and emu.power_a == 45
    # above the safety limit: refused before anything is sent
    out = io.StringIO()
    emu2 = MagstimEmulator("200").start()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli_main(["stimulator", "check", "--driver", "magstim-200", "--port",
                           emu2.port, "--intensity", "95", "--fire", "--set",
                           f'safety.day_counter_file="{tmp_path / "day.json"}"'])
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
        assert service.stim is not None and service.stim.armed
        time.sleep(0.6)  # the controller hangs (blocks its own event loop)
        assert not service.stim.armed  # disarmed from the watchdog's thread meanwhile
        await asyncio.sleep(0.5)

    await run_service(cfg, 0, scenario)
    events = read_events(tmp_path / "events.jsonl")
    trip = next(e for e in events if e["event"] == "fault" and e["error"] == "watchdog")
    assert "did not run" in trip["message"]
    assert not [e for e in events if e["event"] == "pulse" and e["lsl_time"] > trip["lsl_time"]]
