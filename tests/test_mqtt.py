"""The MQTT control plane against real Mosquitto brokers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.config import load_config
from closedloop.config.schema import Config
from closedloop.control.runtime import apply_live_settings
from closedloop.mqtt.commands import VERBS, CommandError, parse_command
from closedloop.mqtt.worker import lower_thread_priority
from closedloop.recording.events import read_events
from tests.conftest import Pusher, unique
from tests.mqtt_helpers import Broker, ThreadedService, command, raw_command, retained

# one service with its MQTT worker at a time (a worker of its own): four at once, beside
# the rest of the suite, starved the MQTT workers (they run at a lower CPU priority)
pytestmark = [pytest.mark.lsl, pytest.mark.slow, pytest.mark.xdist_group("mqtt")]

LABELS = ("C3", "FC1", "FC5", "CP1", "CP5")


def mu(t: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(int(t[0] * 1000) % 2**32)
    x = rng.normal(0, 1, (len(t), len(LABELS)))
    x[:, 0] += 10 * np.cos(2 * np.pi * 10 * t)
    return x


@pytest.fixture
def eeg(pushers: list[Pusher]) -> str:
    name = unique("mq-eeg")
    pushers.append(Pusher(name, LABELS, 1000.0, mu))
    return name


def mqtt_config(tmp_path: Path, eeg: str, instance: str, *extra: str, port: int = 1883) -> Config:
    return load_config(None, [
        "safety.motor_threshold_pct=60", "safety.min_inter_train_s=1",  # see test_service
        f'streams.eeg.name="{eeg}"', f'recording.events="{tmp_path / "ev.jsonl"}"',
        f'stimulator.coil_stream="{unique("coil")}"', 'recording.marker_stream=""',
        "mqtt.enabled=true", f'mqtt.instance="{instance}"', f"mqtt.port={port}",
        "mqtt.metrics_interval_s=0.5", "mqtt.status_interval_s=0.5",
        "trigger.amplitude_percentile=0", "trigger.min_interval_s=0.3", "trigger.jitter_s=0",
        "safety.min_interval_s=0.3", "mqtt.reconnect_max_s=0.5",
        "trigger.wait_for_training=false", *extra])  # pulses from the start (as test_service)


@pytest.fixture
def service(tmp_path: Path, eeg: str) -> Iterator[tuple[ThreadedService, str]]:
    inst = unique("inst")
    svc = ThreadedService(mqtt_config(tmp_path, eeg, inst))
    wait_connected(svc)
    yield svc, f"closedloop/{inst}/"
    svc.stop()


def wait_connected(svc: ThreadedService, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        plane = svc.plane
        if plane is not None and plane.connected:
            return
        time.sleep(0.05)
    raise AssertionError("the control plane never connected")


def test_every_verb_round_trips(service: tuple[ThreadedService, str], tmp_path: Path) -> None:
    svc, prefix = service
    plane = svc.plane
    assert plane is not None and plane.pid is not None and plane.pid != os.getpid()
    # the MQTT client runs in its own process, below the real-time path's CPU priority
    assert os.getpriority(os.PRIO_PROCESS, plane.pid) == min(
        19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 10)
    st_ = command(prefix, "status")
    assert st_["ok"]
    assert st_["result"]["state"] == "idle"
    assert st_["result"]["streams"]["eeg"]["connected"]
    assert command(prefix, "arm")["result"]["state"] == "armed"
    reply = command(prefix, "set", target_phase_deg=180, tolerance_deg=15, intensity_pct=55)
    assert reply["ok"], reply
    assert reply["result"]["target_phase_deg"] == 180
    assert svc.service.cfg.trigger.tolerance_deg == 15
    assert svc.service.rig.stim is not None
    assert svc.service.rig.stim.intensity_pct == 55
    assert command(prefix, "set", band_hz=[8.5, 12.5])["result"]["band_hz"] == [8.5, 12.5]
    time.sleep(1.0)
    assert svc.service.stats.fired >= 1
    assert command(prefix, "disarm")["result"]["state"] == "idle"
    started = command(prefix, "start", protocol="phase-single", pulses=2)
    assert started["result"]["state"] == "running"
    deadline = time.monotonic() + 5
    while svc.service.state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.service.state == "idle"  # stopped by itself after 2 pulses
    assert command(prefix, "start")["result"]["state"] == "running"
    assert command(prefix, "stop")["result"]["state"] == "idle"
    time.sleep(4.2)  # at least 4 s of EEG for the peak search
    cal = command(prefix, "calibrate", seconds=4)
    assert cal["ok"], cal
    assert abs(cal["result"]["peak_hz"] - 10.0) <= 0.5
    # reload: this service was not started from a file
    assert not command(prefix, "reload")["ok"]
    events = [e["event"] for e in read_events(tmp_path / "ev.jsonl")]
    for kind in ("armed", "settings_changed", "protocol_started", "protocol_stopped",
                 "calibrated", "command"):
        assert kind in events


def test_set_is_revalidated_when_the_config_changed_meanwhile(
        service: tuple[ThreadedService, str]) -> None:
    """A `set` validated in the plane's thread against one config, while another change
    lands first on the service's loop, must not undo that change."""
    svc, prefix = service
    base_target = svc.service.cfg.trigger.target_phase_deg
    go = threading.Event()

    def other_change_first() -> None:  # holds the service's loop until `go`
        go.wait(2.0)
        new = apply_live_settings(svc.service.cfg, {"target_phase_deg": base_target + 90},
                                  source="test")
        svc.service.api.apply_config(new, by="test")

    svc.loop.call_soon_threadsafe(other_change_first)
    replies: list[dict[str, Any]] = []
    sender = threading.Thread(target=lambda: replies.append(
        command(prefix, "set", tolerance_deg=20)))
    sender.start()
    time.sleep(0.25)  # the plane has received and validated the set; its swap is queued
    go.set()
    sender.join(10)
    assert replies and replies[0]["ok"], replies
    assert replies[0]["result"]["tolerance_deg"] == 20
    assert svc.service.cfg.trigger.tolerance_deg == 20
    assert svc.service.cfg.trigger.target_phase_deg == base_target + 90  # not undone


def test_reload_applies_live_keys_and_refuses_the_rest(tmp_path: Path, eeg: str) -> None:
    inst = unique("reload")
    file = tmp_path / "svc.toml"
    base = (f'[streams.eeg]\nname = "{eeg}"\n[mqtt]\nenabled = true\ninstance = "{inst}"\n'
            f'[recording]\nevents = "{tmp_path / "r.jsonl"}"\nmarker_stream = ""\n'
            f'[stimulator]\ncoil_stream = "{unique("coil")}"\n')
    file.write_text(base + "[trigger]\ntarget_phase_deg = 0\n")
    svc = ThreadedService(load_config(file), config_source=str(file))
    try:
        wait_connected(svc)
        prefix = f"closedloop/{inst}/"
        file.write_text(base + "[trigger]\ntarget_phase_deg = -90\n")
        reply = command(prefix, "reload")
        assert reply["ok"], reply
        assert svc.service.cfg.trigger.target_phase_deg == -90
        file.write_text(base + "[trigger]\ntarget_phase_deg = -90\n[safety]\nmax_pulses = 5\n")
        reply = command(prefix, "reload")
        assert not reply["ok"]
        assert "safety.max_pulses" in reply["error"]
        file.write_text(base + "[trigger]\ntarget_phase_deg = 999\n")
        reply = command(prefix, "reload")
        assert not reply["ok"]
        assert "trigger.target_phase_deg" in reply["error"]
        assert svc.service.cfg.trigger.target_phase_deg == -90
    finally:
        svc.stop()


def test_bad_commands_change_nothing(service: tuple[ThreadedService, str]) -> None:
    svc, prefix = service
    before = svc.call(svc.service.api.status)
    bad = [
        ("arm", b"{not json"), ("arm", b"[1, 2]"), ("arm", b"{}"),  # no ts
        ("arm", json.dumps({"ts": time.time() - 60}).encode()),  # stale
        ("arm", json.dumps({"ts": time.time() + 60}).encode()),  # from the future
        ("set", json.dumps({"ts": time.time(), "target_phase_deg": 500}).encode()),
        ("set", json.dumps({"ts": time.time(), "target_phase_deg": "peak"}).encode()),
        ("set", json.dumps({"ts": time.time(), "intensity_pct": 95}).encode()),  # > safety
        ("set", json.dumps({"ts": time.time(), "safety.max_pulses": 1}).encode()),
        ("set", json.dumps({"ts": time.time(), "nope": 1}).encode()),
        ("start", json.dumps({"ts": time.time(), "protocol": "rTMS-100Hz"}).encode()),
        ("start", json.dumps({"ts": time.time(), "pulses": -3}).encode()),
        ("fire", b"{}"), ("arm", b"x" * 20000), ("status", b"\xff\xfe"),
    ]
    for verb, payload in bad:
        reply = asyncio.run(raw_command(prefix, verb, payload))
        assert reply["ok"] is False, (verb, payload[:50], reply)
        assert reply["error"]
    intensity = asyncio.run(raw_command(prefix, "set", json.dumps(
        {"ts": time.time(), "intensity_pct": 95}).encode()))
    assert "intensity_pct" in intensity["error"]
    assert "refused, not clamped" in intensity["error"]
    # a retained arm is never executed
    reply = asyncio.run(raw_command(prefix, "arm", json.dumps({"ts": time.time()}).encode(),
                                    retain=True))
    assert reply["ok"] is False
    assert reply["key"] == "retain"
    after = svc.call(svc.service.api.status)
    assert after["state"] == before["state"] == "idle"
    assert after["settings"] == before["settings"]
    assert svc.service.stats.fired == 0


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=st.sampled_from([*VERBS, "bogus"]),
       payload=st.one_of(
           st.binary(max_size=200),
           st.dictionaries(st.sampled_from(["ts", "id", "target_phase_deg", "band_hz",
                                            "pulses", "protocol", "seconds", "x",
                                            "intensity_pct", "tolerance_deg"]),
                           st.one_of(st.none(), st.booleans(), st.integers(),
                                     st.floats(allow_nan=True), st.text(max_size=10),
                                     st.lists(st.floats(), max_size=3)),
                           max_size=4).map(lambda d: json.dumps(d).encode())))
def test_fuzzed_payloads_never_crash_or_change_state(
        service: tuple[ThreadedService, str], verb: str, payload: bytes) -> None:
    svc, prefix = service
    before = svc.call(svc.service.api.status)
    reply = asyncio.run(raw_command(prefix, verb, payload))
    assert isinstance(reply["ok"], bool)
    assert svc.service.state != "fault"
    if not reply["ok"]:
        after = svc.call(svc.service.api.status)
        assert after["settings"] == before["settings"]
        assert after["state"] == before["state"]
    else:  # the rare valid one: put the state back
        svc.call(svc.service.api.stop_protocol, by="test")


@given(verb=st.text(max_size=12), raw=st.binary(max_size=300), age=st.floats(-1e6, 1e6))
def test_parser_only_ever_raises_command_error(verb: str, raw: bytes, age: float) -> None:
    try:
        cmd = parse_command(verb, raw, now_s=1e9, max_age_s=5.0, max_bytes=256)
    except CommandError as exc:
        problem = exc.problem
        assert problem
    else:
        assert cmd.verb in VERBS
    body = json.dumps({"ts": 1e9 - age}).encode()
    try:
        parse_command("arm", body, now_s=1e9, max_age_s=5.0, max_bytes=256)
        assert abs(age) <= 5.0
    except CommandError:
        assert abs(age) > 5.0


def test_retained_status_and_last_will_after_kill(tmp_path: Path, eeg: str) -> None:
    inst = unique("will")
    cfg = tmp_path / "will.toml"
    cfg.write_text(f'[streams.eeg]\nname = "{eeg}"\n[mqtt]\nenabled = true\n'
                   f'instance = "{inst}"\n[recording]\nevents = "{tmp_path / "w.jsonl"}"\n'
                   f'marker_stream = ""\n[stimulator]\ncoil_stream = "{unique("coil")}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "closedloop", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    topic = f"closedloop/{inst}/status"
    try:
        status = wait_retained_state(topic, "idle", 20.0)
        assert status["pid"] == proc.pid
        workers = children(proc.pid)
        assert len(workers) == 1  # the MQTT worker process
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        wait_retained_state(topic, "offline", 10.0)  # the last will
        deadline = time.monotonic() + 5
        while Path(f"/proc/{workers[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{workers[0]}").exists()  # no orphan left behind
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        assert proc.stderr is not None
        proc.stderr.close()
        asyncio.run(_clear(topic))


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_dead_worker_stops_the_service_with_a_fault(tmp_path: Path, eeg: str) -> None:
    svc = ThreadedService(mqtt_config(tmp_path, eeg, unique("dead"),
                                      "stimulator.arm_on_start=true"))
    try:
        wait_connected(svc)
        plane = svc.plane
        assert svc.service.state == "armed"
        os.kill(plane.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while svc.service.state not in ("fault", "stopped") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.service.state == "fault"
        assert svc.service.rig.stim is not None and not svc.service.rig.stim.armed
    finally:
        svc.stop()
    assert svc.error is not None and "control plane's process ended" in str(svc.error)
    events = read_events(tmp_path / "ev.jsonl")
    assert any(e["event"] == "fault" and "control plane" in str(e) for e in events)


def test_a_clean_stop_ends_the_worker(tmp_path: Path, eeg: str) -> None:
    inst = unique("clean")
    prefix = f"closedloop/{inst}/"
    svc = ThreadedService(mqtt_config(tmp_path, eeg, inst))
    wait_connected(svc)
    plane = svc.plane
    assert command(prefix, "status")["ok"]
    svc.stop()
    assert plane._proc is not None and plane._proc.poll() == 0
    status = asyncio.run(retained(prefix + "status", timeout=2.0))
    assert status is not None and status["state"] == "offline"
    assert status["reason"] == "stopped"
    asyncio.run(_clear(prefix + "status"))


def wait_retained_state(topic: str, state: str, timeout: float) -> dict[str, object]:
    """Poll the retained message on ``topic`` until its state is ``state``."""
    status = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = asyncio.run(retained(topic, timeout=1.0))
        if status is not None and status.get("state") == state:
            return status
    raise AssertionError(f"retained {topic} never said {state!r}; last: {status}")


async def _clear(topic: str) -> None:
    import aiomqtt  # noqa: PLC0415

    async with aiomqtt.Client("127.0.0.1", 1883) as c:
        await c.publish(topic, b"", qos=1, retain=True)


def test_broker_restart_during_a_run(tmp_path: Path, eeg: str) -> None:
    broker = Broker(tmp_path)
    inst = unique("restart")
    svc = ThreadedService(mqtt_config(tmp_path, eeg, inst, "stimulator.arm_on_start=true",
                                      port=broker.port))
    try:
        wait_connected(svc)
        prefix = f"closedloop/{inst}/"
        assert command(prefix, "status", port=broker.port)["ok"]
        fired = svc.service.stats.fired
        broker.stop()
        time.sleep(2.0)
        plane = svc.plane
        assert not plane.connected
        assert svc.service.stats.fired > fired  # the loop kept stimulating without a broker
        assert svc.service.state == "armed"  # on_disconnect = "keep"
        dropped = plane.dropped
        assert dropped > 0  # telemetry while down is counted, not queued
        broker.start()
        wait_connected(svc, timeout=10)
        reply = command(prefix, "status", port=broker.port)
        assert reply["ok"]
        assert reply["result"]["state"] == "armed"
        events = [e["event"] for e in read_events(tmp_path / "ev.jsonl")]
        assert "control_lost" in events
        assert "control_restored" in events
    finally:
        svc.stop()
        broker.stop()


def test_disarm_on_disconnect_policy(tmp_path: Path, eeg: str) -> None:
    broker = Broker(tmp_path)
    inst = unique("disarm")
    svc = ThreadedService(mqtt_config(tmp_path, eeg, inst, "stimulator.arm_on_start=true",
                                      'mqtt.on_disconnect="disarm"', port=broker.port))
    try:
        wait_connected(svc)
        assert svc.service.state == "armed"
        broker.stop()
        deadline = time.monotonic() + 5
        while svc.service.state == "armed" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.service.state == "idle"
    finally:
        svc.stop()
        broker.stop()


def test_wrong_credentials_are_refused(tmp_path: Path, eeg: str) -> None:
    broker = Broker(tmp_path, users={"lab": "secret"})
    try:
        inst = unique("auth")
        good = mqtt_config(tmp_path, eeg, inst, 'mqtt.username="lab"', 'mqtt.password="secret"',
                           port=broker.port)
        svc = ThreadedService(good)
        try:
            wait_connected(svc)
        finally:
            svc.stop()
        bad = subprocess.run(
            [sys.executable, "-m", "closedloop", "ctl", "status", "--port", str(broker.port),
             "--instance", inst, "--set", 'mqtt.username="lab"', "--set",
             'mqtt.password="wrong"'], capture_output=True, text=True, timeout=30, check=False)
        assert bad.returncode == 1
        assert "Not authorized" in bad.stderr or "password" in bad.stderr.lower()
        anon = mqtt_config(tmp_path, eeg, unique("anon"), port=broker.port)
        svc = ThreadedService(anon)
        try:
            time.sleep(1.5)
            assert not svc.plane.connected
            assert svc.service.state == "idle"  # the service itself runs on
        finally:
            svc.stop()
        events = read_events(tmp_path / "ev.jsonl")
        lost = [e for e in events if e["event"] == "control_lost"]
        assert lost
        assert "authori" in lost[-1]["error"].lower()
    finally:
        broker.stop()


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_local_brokers_for_the_demo(tmp_path: Path, eeg: str, kind: str) -> None:
    """The demo's brokers, including MQTT 3.1.1 (replies on reply/<verb>)."""
    from closedloop.mqtt.ctl import send_command  # noqa: PLC0415
    from closedloop.mqtt.local_broker import local_broker  # noqa: PLC0415

    async def scenario() -> None:
        async with local_broker(kinds=(kind,)) as broker:
            assert broker.kind == kind
            inst = unique("local")
            cfg = mqtt_config(tmp_path, eeg, inst, f'mqtt.protocol="{broker.protocol}"',
                              port=broker.port)
            svc = await asyncio.to_thread(ThreadedService, cfg)
            try:
                await asyncio.to_thread(wait_connected, svc)
                reply = await send_command(cfg.mqtt, "status", {})
                assert reply["ok"]
                assert reply["result"]["state"] == "idle"
                reply = await send_command(cfg.mqtt, "set", {"target_phase_deg": 45})
                assert reply["result"]["target_phase_deg"] == 45
            finally:
                await asyncio.to_thread(svc.stop)

    asyncio.run(scenario())


def test_tls_with_credentials(tmp_path: Path, eeg: str) -> None:
    broker = Broker(tmp_path, users={"rig": "pw"}, tls=True)
    try:
        inst = unique("tls")
        cfg = mqtt_config(tmp_path, eeg, inst, 'mqtt.username="rig"', 'mqtt.password="pw"',
                          f'mqtt.tls.ca="{broker.ca}"', port=broker.port)
        svc = ThreadedService(cfg)
        try:
            wait_connected(svc)
            ok = subprocess.run(
                [sys.executable, "-m", "closedloop", "ctl", "status", "--port", str(broker.port),
                 "--instance", inst, "--set", 'mqtt.username="rig"', "--set",
                 'mqtt.password="pw"', "--set", f'mqtt.tls.ca="{broker.ca}"'],
                capture_output=True, text=True, timeout=30, check=False)
            assert ok.returncode == 0, ok.stderr
            assert json.loads(ok.stdout)["result"]["state"] == "idle"
            plain = subprocess.run(  # the same port without TLS does not get through
                [sys.executable, "-m", "closedloop", "ctl", "status", "--port", str(broker.port),
                 "--instance", inst, "--set", 'mqtt.username="rig"', "--set",
                 'mqtt.password="pw"', "--timeout", "2"],
                capture_output=True, text=True, timeout=30, check=False)
            assert plain.returncode != 0
        finally:
            svc.stop()
    finally:
        broker.stop()


def test_broker_down_at_start(tmp_path: Path, eeg: str) -> None:
    """No broker at all: the service starts, stimulates, reports, and keeps trying."""
    from tests.mqtt_helpers import free_port  # noqa: PLC0415

    port = free_port()  # nothing listens here
    svc = ThreadedService(mqtt_config(tmp_path, eeg, unique("down"),
                                      "stimulator.arm_on_start=true", port=port))
    try:
        time.sleep(2.0)
        assert not svc.plane.connected
        assert svc.service.state == "armed"
        assert svc.service.stats.fired >= 2
    finally:
        svc.stop()
    events = read_events(tmp_path / "ev.jsonl")
    lost = [e for e in events if e["event"] == "control_lost"]
    assert lost
    assert "refused" in lost[0]["error"].lower() or "connect" in lost[0]["error"].lower()


def test_lower_thread_priority_is_per_thread_and_clamped() -> None:
    results: dict[str, tuple[int, str | None]] = {}

    def run(name: str, increment: int) -> None:
        error = lower_thread_priority(increment)
        results[name] = (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), error)

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for name, increment in (("five", 5), ("zero", 0), ("forty", 40)):
        t = threading.Thread(target=run, args=(name, increment))
        t.start()
        t.join()
    assert results["five"] == (min(19, base + 5), None)
    assert results["zero"] == (base, None)
    assert results["forty"] == (19, None)
    # this thread (and so the process's other threads) kept its priority
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
