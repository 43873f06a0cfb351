"""The command line as users run it: demo summary, run with SIGTERM, public names."""

from __future__ import annotations

import importlib
import json
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import closedloop
from closedloop.recording.events import read_events
from tests.conftest import unique

REPO = Path(__file__).resolve().parent.parent


def run_side_by_side(*commands: list[str], timeout: float
                     ) -> list[subprocess.CompletedProcess[str]]:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` of each
    command, all started at once; the timeout is for each."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    try:
        done = []
        for cmd, proc in zip(commands, procs, strict=True):
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
        return done
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.xdist_group("simulator")  # one full simulated session at a time
@pytest.mark.lsl
@pytest.mark.slow
def test_demo_summary_is_safe_complete_and_bounded(tmp_path: Path) -> None:
    events = tmp_path / "demo.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "closedloop", "demo", "--duration", "26", "--eeg-rate", "1000",
         "--seed", "11", "--json", "--events", str(events),
         "--set", "trigger.min_interval_s=0.7", "--set", "safety.min_interval_s=0.6",
         "--set", "safety.motor_threshold_pct=60",  # pulses < 1 s apart are rTMS
         "--set", "safety.min_inter_train_s=1"],
        capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["pulses_fired"] >= 5
    assert s["min_inter_pulse_interval_s"] >= 0.6  # no pulse broke the safety interval
    assert s["max_intensity_pct"] <= 80
    assert s["mep"]["pulses_with_mep_record"] == s["pulses_fired"]
    pe = s["phase_error_vs_truth"]
    assert pe["matched_pulses"] == s["pulses_fired"]
    assert abs(pe["mean_deg"]) < 30
    assert pe["sd_deg"] < 45
    for key in ("chunk_to_decision", "chunk_to_fire_request", "fire_error"):
        assert s["latency_ms"][key]["count"] > 0
    kinds = [e["event"] for e in read_events(events)]
    assert kinds.count("pulse") == s["pulses_fired"]


@pytest.mark.xdist_group("simulator")  # one full simulated session at a time
@pytest.mark.lsl
@pytest.mark.slow
def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    prefix = unique("run")
    events = tmp_path / "run.jsonl"
    sim = subprocess.Popen([sys.executable, "-m", "closedloop", "simulate", "--prefix", prefix,
                            "--eeg-rate", "1000", "--emg-rate", "1000", "--coil-stream",
                            f"{prefix}-coil", "--seed", "1"], stdin=subprocess.DEVNULL)
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "closedloop", "run", "--config",
             str(REPO / "configs" / "demo.toml"),
             "--set", f'streams.eeg.name="{prefix}-EEG"',
             "--set", f'streams.emg.name="{prefix}-EMG"',
             "--set", f'stimulator.coil_stream="{prefix}-coil"',
             "--set", f'recording.events="{events}"',
             "--set", f'recording.marker_stream="{prefix}-pulses"',
             "--set", "trigger.min_interval_s=0.5", "--set", "safety.min_interval_s=0.5",
             "--set", "safety.motor_threshold_pct=60",  # pulses < 1 s apart are rTMS
             "--set", "safety.min_inter_train_s=1",
             "--set", "trigger.wait_for_training=false"],  # a pulse soon
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if events.exists() and any(e["event"] == "pulse" for e in read_events(events)):
                break
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=20)
    finally:
        sim.terminate()
        sim.wait(5)
    assert run.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["fired"] >= 1
    kinds = [e["event"] for e in read_events(events)]
    assert "pulse" in kinds
    assert kinds[-1] == "session_end"
    assert kinds.index("disarmed") > max(i for i, k in enumerate(kinds) if k == "pulse")


def test_run_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[trigger]\ntarget_phase_deg = 270\n")
    proc = subprocess.run([sys.executable, "-m", "closedloop", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "trigger.target_phase_deg" in proc.stderr
    assert "<= 180" in proc.stderr


def test_every_public_name_exists() -> None:
    for mod in pkgutil.walk_packages(closedloop.__path__, "closedloop."):
        if mod.name.endswith("__main__"):
            continue
        module = importlib.import_module(mod.name)
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{mod.name}.__all__ names missing {name}"


@pytest.mark.xdist_group("simulator")  # one full simulated session at a time
@pytest.mark.lsl
@pytest.mark.slow
def test_daemon_sighup_reload_json_logs_and_status(tmp_path: Path) -> None:
    prefix = unique("daemon")
    events = tmp_path / "d.jsonl"
    cfg = tmp_path / "d.toml"
    base = (f'[streams.eeg]\nname = "{prefix}-EEG"\n[stimulator]\ncoil_stream = "{prefix}-coil"\n'
            f'arm_on_start = true\n[recording]\nevents = "{events}"\nmarker_stream = ""\n'
            "[safety]\nmotor_threshold_pct = 60\nmin_inter_train_s = 1\n"  # < 1 s: rTMS
            "[trigger]\nmin_interval_s = 0.5\namplitude_percentile = 0\n")
    cfg.write_text(base + "target_phase_deg = 0\n")
    sim = subprocess.Popen([sys.executable, "-m", "closedloop", "simulate", "--prefix", prefix,
                            "--eeg-rate", "1000", "--emg-rate", "1000", "--coil-stream",
                            f"{prefix}-coil", "--seed", "2"], stdin=subprocess.DEVNULL)
    run = subprocess.Popen([sys.executable, "-m", "closedloop", "run", "--config", str(cfg),
                            "--log-format", "json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (tmp_path / "status.json").exists():
            time.sleep(0.2)
        status = subprocess.run([sys.executable, "-m", "closedloop", "status", "-c", str(cfg)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state"] == "armed"
        cfg.write_text(base + "target_phase_deg = 90\n")
        run.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        cfg.write_text(base + "target_phase_deg = 900\n")  # invalid: refused, old kept
        run.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=20)
    finally:
        sim.terminate()
        sim.wait(5)
    assert run.returncode == 0, err
    kinds = [e["event"] for e in read_events(events)]
    assert "reloaded" in kinds
    assert "reload_refused" in kinds
    changed = [e for e in read_events(events) if e["event"] == "settings_changed"]
    assert changed[-1]["changes"] == {"target_phase_deg": 90.0}
    lines = [json.loads(line) for line in out.strip().splitlines()[:-1]]
    assert {"session_start", "armed", "reloaded", "reload_refused", "session_end"} <= {
        line.get("event") for line in lines}
    assert all({"time", "level"} <= set(line) for line in lines)
    stopped = subprocess.run([sys.executable, "-m", "closedloop", "status", "--file",
                              str(tmp_path / "status.json")],
                             capture_output=True, text=True, timeout=30, check=False)
    assert stopped.returncode == 1
    assert "stopped" in stopped.stderr


@pytest.mark.compute
def test_evaluate_phase_on_an_npz_recording(tmp_path: Path) -> None:
    fs = 250.0
    t = np.arange(int(90 * fs)) / fs
    rng = np.random.default_rng(4)
    env = 1.0 + 0.8 * np.sin(2 * np.pi * 0.2 * t)
    c3 = 15 * env * np.cos(2 * np.pi * 10.5 * t) + rng.normal(0, 5, len(t))
    data = np.column_stack([c3, rng.normal(0, 5, len(t))])
    rec = tmp_path / "rec.npz"
    np.savez(rec, data=data, labels=np.array(["C3", "Cz"]), fs=fs)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run([sys.executable, "-m", "closedloop", "evaluate-phase", str(rec),
                           "--reference", "Cz", "--train-s", "30", "--json", str(out),
                           "--png", str(png)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert abs(report["peak_hz"] - 10.5) <= 0.25
    for name in ("ar", "etp", "echt", "resonator"):
        s = report["estimators"][name]["scores"]["amp>median"]
        assert s["circ_sd_deg"] < 40, (name, s)
        assert abs(s["bias_deg"]) < 15, (name, s)
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "closedloop", "evaluate-phase", str(rec),
                          "--channel", "C4"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert bad.returncode == 1
    assert "no channel(s) C4" in bad.stderr
    assert "it has C3, Cz" in bad.stderr


@pytest.mark.compute
@pytest.mark.slow
def test_calibrate_from_a_file_writes_a_usable_config(tmp_path: Path) -> None:
    data = REPO.parent / "shared" / "data" / "eeg" / "eegmat"
    if not (data / "Subject19_1.edf").exists():
        pytest.skip("real data not found")
    out = tmp_path / "cal.toml"
    calibrate = [sys.executable, "-m", "closedloop", "calibrate", "-c",
                 str(REPO / "configs" / "eegmat-replay.toml"), "--file"]
    # two independent calibrations (each one CPU-bound for ~15 s): side by side
    good, weak = run_side_by_side([*calibrate, str(data / "Subject19_1.edf"), "--out", str(out)],
                                  [*calibrate, str(data / "Subject01_1.edf")],
                                  timeout=400)  # a guard against a hang: it runs last, at
    # the lowest CPU priority, while other workers may still be busy
    assert good.returncode == 0, good.stderr
    result = json.loads(good.stdout.strip().splitlines()[-1])
    assert result["useful"]
    assert abs(result["peak_hz"] - 10.5) <= 0.5
    from closedloop.config import load_config  # noqa: PLC0415

    cfg = load_config(out)
    assert cfg.phase.estimator == result["estimator"] == "wiener"
    assert cfg.phase.band_hz == tuple(result["band_hz"])
    # the trained filter is written beside the config, and the tracker starts with it
    assert cfg.phase.wiener_file == str(out.with_suffix(".wiener.npz").resolve())
    from closedloop.phase.tracker import PhaseTracker  # noqa: PLC0415

    tracker = PhaseTracker(fs_in=500.0, labels=["C3", "F3", "T3", "Cz", "P3"], cfg=cfg.phase)
    assert tracker.training_state == "ready"
    assert tracker.band == tracker.wiener.band_hz  # type: ignore[union-attr]
    assert weak.returncode == 3  # says plainly that phase targeting is not useful
    assert "NOT usable for phase targeting" in weak.stdout


@pytest.mark.lsl
def test_calibrate_records_the_live_stream(pushers: list) -> None:  # type: ignore[type-arg]
    from closedloop.config import load_config  # noqa: PLC0415
    from closedloop.streams.capture import record_live  # noqa: PLC0415
    from tests.conftest import Pusher  # noqa: PLC0415

    name = unique("cal")
    pushers.append(Pusher(name, ("C3", "Cz"), 1000.0,
                          lambda t: np.column_stack([np.cos(2 * np.pi * 10 * t), 0 * t])))
    cfg = load_config(None, [f'streams.eeg.name="{name}"', 'phase.reference=["Cz"]'])
    x, fs = record_live(cfg, 2.0)
    assert fs == 500.0
    assert 900 <= len(x) <= 1000
    assert np.std(x) > 0.5


@pytest.mark.xdist_group("simulator")  # one full simulated session at a time
@pytest.mark.lsl
@pytest.mark.slow
def test_a_killed_session_leaves_readable_recordings(tmp_path: Path) -> None:
    from closedloop.replay.recording import load_xdf  # noqa: PLC0415

    prefix = unique("kill9")
    events, xdf = tmp_path / "k.jsonl", tmp_path / "k.xdf"
    sim = subprocess.Popen([sys.executable, "-m", "closedloop", "simulate", "--prefix", prefix,
                            "--eeg-rate", "1000", "--emg-rate", "1000", "--coil-stream",
                            f"{prefix}-coil", "--seed", "3"], stdin=subprocess.DEVNULL)
    sets = [f'streams.eeg.name="{prefix}-EEG"', f'streams.emg.name="{prefix}-EMG"',
            f'stimulator.coil_stream="{prefix}-coil"', f'recording.events="{events}"',
            f'recording.xdf="{xdf}"', 'recording.marker_stream=""',
            "trigger.min_interval_s=0.5", "safety.min_interval_s=0.5",
            "safety.motor_threshold_pct=60",  # pulses < 1 s apart are rTMS
            "safety.min_inter_train_s=1", "trigger.wait_for_training=false"]  # a pulse soon
    run = subprocess.Popen(
        [sys.executable, "-m", "closedloop", "run", "--config",
         str(REPO / "configs" / "demo.toml"), *(a for s in sets for a in ("--set", s))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if events.exists() and any(e["event"] == "pulse" for e in read_events(events)):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        run.send_signal(signal.SIGKILL)
        run.wait(10)
    finally:
        sim.terminate()
        sim.wait(5)
    log = read_events(events)  # every line written is complete
    assert any(e["event"] == "pulse" for e in log)
    content = load_xdf(xdf)  # no footers, cut anywhere: still readable
    assert len(content.first("EEG").data) > 1000
    assert content.markers


def test_calibrate_scores_parameter_variants_and_writes_the_best(tmp_path: Path) -> None:
    """Every live estimator is a candidate, each main parameter with its variants and
    the configured value; the chosen one's parameter goes into the written config."""
    from closedloop.config import load_config  # noqa: PLC0415
    from closedloop.config.schema import PhaseConfig  # noqa: PLC0415
    from closedloop.phase.calibrate import (  # noqa: PLC0415
        LIVE_ESTIMATORS,
        VARIANTS,
        candidates,
        write_config,
    )

    cands = candidates(PhaseConfig(ar_order=25))
    assert {name for name, _, _ in cands.values()} == set(LIVE_ESTIMATORS)
    orders = sorted(p.ar_order for name, p, _ in cands.values() if name == "ar")
    assert orders == [10, 20, 25, 30]
    for name, params, varied in cands.values():
        assert params.estimator == name
        for key, value in varied.items():
            assert key == VARIANTS[name][0] and getattr(params, key) == value
    cfg = load_config(None, [])
    result = {"peak_hz": 10.5, "snr_db": 12.0, "band_hz": [8.5, 12.5],
              "estimator": "resonator", "parameters": {"resonator_bandwidth_hz": 3.0},
              "expected_circ_sd_deg": 19.0, "verdict": "usable for phase targeting"}
    out = tmp_path / "cal.toml"
    assert write_config(cfg, result, out) is None
    written = load_config(out)
    assert written.phase.estimator == "resonator"
    assert written.phase.resonator_bandwidth_hz == 3.0
    assert written.phase.band_hz == (8.5, 12.5)
    assert "resonator resonator_bandwidth_hz=3" in out.read_text().splitlines()[0]


@pytest.mark.xdist_group("simulator")  # one full simulated session at a time
@pytest.mark.lsl
def test_demo_with_mqtt(tmp_path: Path) -> None:
    """(Here, not in test_mqtt.py: a full simulated session, never beside another.)"""
    proc = subprocess.run(
        [sys.executable, "-m", "closedloop", "demo", "--duration", "8", "--eeg-rate", "1000",
         "--mqtt", "--json", "--events", str(tmp_path / "d.jsonl"),
         # under the suite's load a command has waited over 5 s in the MQTT worker (at a
         # lower priority) and was refused as stale, as it should be: not this test's subject
         "--set", "mqtt.max_command_age_s=30"],
        capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["mqtt"]["commands"] == 3
    assert s["mqtt"]["messages_seen"].get("status", 0) >= 1
    events = read_events(tmp_path / "d.jsonl")
    commands = [e for e in events if e["event"] == "command"]
    assert [c["verb"] for c in commands] == ["status", "set", "status"]
    assert all(c["ok"] for c in commands), commands
