"""Faults the service must survive or stop on, visibly, without a wrong pulse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pylsl
import pytest

from closedloop.control.service import ClosedLoopService
from closedloop.control.supervisor import Supervisor
from closedloop.errors import ClosedLoopError
from closedloop.phase.tracker import PhaseTracker
from closedloop.recording.events import read_events
from tests.conftest import Pusher, unique
from tests.test_service import config, run_service

pytestmark = [pytest.mark.lsl, pytest.mark.slow, pytest.mark.asyncio]

LABELS = ("C3", "FC1", "FC5", "CP1", "CP5")


def mu(t: np.ndarray) -> np.ndarray:
    x = np.random.default_rng(int(t[0] * 1000) % 2**32).normal(0, 1, (len(t), len(LABELS)))
    x[:, 0] += 10 * np.cos(2 * np.pi * 10 * t)
    return x


def fast(tmp_path: Path, eeg: str, *extra: str):  # type: ignore[no-untyped-def]
    return config(tmp_path, f'streams.eeg.name="{eeg}"', "stimulator.arm_on_start=true",
                  "trigger.min_interval_s=0.3", "trigger.jitter_s=0",
                  "safety.min_interval_s=0.3", "trigger.amplitude_percentile=0", *extra)


async def test_emg_missing_pulses_still_recorded(tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = fast(tmp_path, eeg, f'streams.emg.name="{unique("no-emg")}"',
               "acquisition.resolve_timeout_s=1", "mep.timeout_s=0.5")
    _stats, _ = await run_service(cfg, 4.0)
    events = read_events(tmp_path / "events.jsonl")
    assert any(e["event"] == "stream_missing" and e["role"] == "emg" for e in events)
    pulses = [e for e in events if e["event"] == "pulse"]
    assert len(pulses) >= 3
    meps = [e for e in events if e["event"] == "mep"]
    assert {m["reason"] for m in meps} == {"emg_unavailable"}
    assert {m["pulse_lsl_time"] for m in meps} == {p["lsl_time"] for p in pulses}


async def test_garbage_on_the_marker_stream(tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg, marks = unique("eeg"), unique("marks")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(marks, "Markers", 1, 0, "string", marks))
    cfg = fast(tmp_path, eeg, f'streams.pulses.name="{marks}"')

    async def scenario(service: ClosedLoopService) -> None:
        await asyncio.sleep(1.0)
        now = pylsl.local_clock()
        for text, t in [("", now), ("x" * 5000, now), ("\x00\x01\x02", now),
                        ("TMS", now - 0.2), ("TMS", now - 0.19),  # 10 ms apart: not pulses
                        ("TMS", now - 3600.0), ("TMS", now)]:
            outlet.push_sample([text], t)
        await asyncio.sleep(1.5)

    stats, _service = await run_service(cfg, 0, scenario)
    events = read_events(tmp_path / "events.jsonl")
    ignored = [e for e in events if e["event"] == "external_pulse_ignored"]
    taken = [e for e in events if e["event"] == "external_pulse"]
    assert len(ignored) == 5
    assert len(taken) == 2
    assert stats.fired >= 3  # stimulation went on throughout
    assert not [e for e in events if e["event"] == "fault"]


async def test_a_numeric_marker_stream_is_a_fault_but_not_a_stop(
        tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg, marks = unique("eeg"), unique("marks")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    pushers.append(Pusher(marks, ("m",), 100.0, lambda t: np.zeros((len(t), 1)),
                          stype="Markers"))
    cfg = fast(tmp_path, eeg, f'streams.pulses.name="{marks}"')
    stats, _service = await run_service(cfg, 3.0)
    events = read_events(tmp_path / "events.jsonl")
    faults = [e for e in events if e["event"] == "fault"]
    assert faults
    assert faults[0]["role"] == "pulses"
    assert "not a string marker stream" in faults[0]["message"]
    assert stats.fired >= 2


async def test_event_log_disk_full_stops_visibly(tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = fast(tmp_path, eeg, 'recording.events="/dev/full"',
               f'safety.day_counter_dir="{tmp_path / "day"}"')
    service = ClosedLoopService(cfg)
    stop = asyncio.Event()
    with pytest.raises(ClosedLoopError, match=r"recording\.events: cannot write /dev/full"):
        await asyncio.wait_for(service.run(stop), 15)
    assert service.rig.stim is not None
    assert not service.rig.stim.armed


async def test_session_recording_disk_full_stops_visibly(tmp_path: Path,
                                                         pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = fast(tmp_path, eeg, 'recording.xdf="/dev/full"')
    service = ClosedLoopService(cfg)
    stop = asyncio.Event()
    with pytest.raises(ClosedLoopError, match=r"recording\.xdf: cannot write /dev/full"):
        await asyncio.wait_for(service.run(stop), 15)
    # the rig was closed again (the stimulator opened, never armed, closed)
    assert service.rig is None
    events = read_events(tmp_path / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert "stimulator_ready" in kinds and "armed" not in kinds
    assert events[-1]["event"] == "session_end"
    assert "recording.xdf" in (events[-1]["error"] or "")


async def test_an_exception_in_the_estimator_disarms_and_stops(
        tmp_path: Path, pushers: list[Pusher], monkeypatch: pytest.MonkeyPatch) -> None:
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    calls = {"n": 0}
    real = PhaseTracker.estimate

    def flaky(self: PhaseTracker, back: int = 0):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 300:
            raise FloatingPointError("injected")
        return real(self, back)

    monkeypatch.setattr(PhaseTracker, "estimate", flaky)
    service = ClosedLoopService(fast(tmp_path, eeg))
    with pytest.raises(ClosedLoopError, match=r"internal error.*injected"):
        await asyncio.wait_for(service.run(asyncio.Event()), 20)
    assert service.rig.stim is not None
    assert not service.rig.stim.armed
    events = read_events(tmp_path / "events.jsonl")
    fault = [e for e in events if e["event"] == "fault"]
    assert fault
    assert "injected" in fault[0]["message"]
    last_pulse = max((e["lsl_time"] for e in events if e["event"] == "pulse"), default=0)
    assert last_pulse <= fault[0]["lsl_time"]
    assert events[-1]["event"] == "session_end"


async def test_eeg_clock_jump_blocks_decisions(tmp_path: Path, pushers: list[Pusher]) -> None:
    eeg = unique("eeg")
    pusher = Pusher(eeg, LABELS, 1000.0, mu)
    pushers.append(pusher)
    cfg = fast(tmp_path, eeg)
    marks: dict[str, float] = {}

    async def scenario(service: ClosedLoopService) -> None:
        await asyncio.sleep(2.5)
        pusher.time_shift = 0.5  # the source's clock jumps half a second ahead
        marks["jump"] = pylsl.local_clock()
        await asyncio.sleep(2.0)
        marks["back"] = pylsl.local_clock()
        pusher.time_shift = 0.0
        await asyncio.sleep(2.5)

    _stats, _ = await run_service(cfg, 0, scenario)
    events = read_events(tmp_path / "events.jsonl")
    faults = [e for e in events if e["event"] == "fault" and e["error"] == "eeg_clock_mismatch"]
    assert faults
    pulses = [e["lsl_time"] for e in events if e["event"] == "pulse"]
    assert not [t for t in pulses if marks["jump"] + 0.05 < t < marks["back"]]
    assert [t for t in pulses if t < marks["jump"]]
    assert [t for t in pulses if t > marks["back"]], "pulses resume once the clock is sane"



async def test_non_finite_eeg_is_reported_never_fired_on_and_recovered(
        tmp_path: Path, pushers: list[Pusher]) -> None:
    """One NaN sample used to stop phase estimation for good, without a word."""
    eeg = unique("eeg")
    window: dict[str, float] = {}
    nan_at: list[float] = []  # the time of every NaN sample, as the pusher stamps it

    def signal(t: np.ndarray) -> np.ndarray:
        x = mu(t)
        if window and window["from"] <= t[0] < window["to"]:
            x[:, 1] = np.nan  # a reference electrode flat-lines to NaN
            nan_at.extend(t)
        return x

    pushers.append(Pusher(eeg, LABELS, 1000.0, signal))
    # no dejitter: the service sees the pusher's own stamps, the ones the oracle knows
    cfg = fast(tmp_path, eeg, "streams.eeg.dejitter=false")

    async def scenario(service: ClosedLoopService) -> None:
        await asyncio.sleep(2.0)
        now = pylsl.local_clock()
        window.update({"from": now, "to": now + 0.5})
        await asyncio.sleep(3.0)

    stats, service = await run_service(cfg, 0, scenario)
    events = read_events(tmp_path / "events.jsonl")
    said = [e for e in events if e["event"] == "stream_error"]
    assert said and said[0]["reason"] == "non_finite_samples" and said[0]["fatal"] is False
    assert service.rig.tracker is not None and service.rig.tracker.nonfinite >= 400
    # no pulse from a decision whose estimate window held a NaN sample (the window of the
    # estimate: phase.window_ms before it), and pulses again afterwards
    pulses = [e for e in events if e["event"] == "pulse"]
    # the estimate's window: the newest phase.window_ms of samples at the processing rate,
    # its oldest (window - 1) periods before its newest, which is the estimate's time plus
    # the decimator's phase delay (estimates are stamped for the delay the filter adds)
    reach = cfg.phase.window_ms / 1000.0 - 1.0 / service.rig.tracker.fs
    delay = service.rig.tracker._delay_s
    first, last = min(nan_at), max(nan_at)
    held_nan = [(p["estimate_lsl_time"] - last, reach, delay) for p in pulses
                if p["estimate_lsl_time"] + delay >= first
                and p["estimate_lsl_time"] + delay - reach <= last]
    assert not held_nan
    assert [p for p in pulses if p["lsl_time"] > window["to"] + 1.0]
    assert stats.fired >= 3 and not [e for e in events if e["event"] == "fault"]


async def test_a_watchdog_that_fails_disarms_and_stops_the_service(
        tmp_path: Path, pushers: list[Pusher], monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog thread must not die silently: a hung loop would then stay armed."""
    eeg = unique("eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, mu))
    cfg = fast(tmp_path, eeg)

    def broken(self: Supervisor) -> None:
        raise RuntimeError("a bug in the watchdog")

    monkeypatch.setattr(Supervisor, "watch", broken)
    with pytest.raises(ClosedLoopError, match="watchdog thread failed"):
        await run_service(cfg, 3.0)
    events = read_events(tmp_path / "events.jsonl")
    fault = next(e for e in events if e["event"] == "fault")
    assert "watchdog thread failed" in fault["message"]
    assert [e["event"] for e in events][-2:] == ["disarmed", "session_end"]
