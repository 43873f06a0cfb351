"""No input stops the daemon: hostile MQTT payloads, config files and event-log records.

Most tests are pure (the parser, the worker's handler with a fake client and a fake
service end, the plane's command with a fake service, the loader, the event log); one test
sends a batch of hostile payloads to a running service through the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from closedloop import cli
from closedloop.config import load as load_module
from closedloop.config import load_config
from closedloop.config.schema import MqttConfig
from closedloop.control.runtime import apply_live_settings
from closedloop.control.service import ClosedLoopService
from closedloop.errors import ConfigError, ControlError
from closedloop.mqtt.commands import MAX_DEPTH, CommandError, parse_command
from closedloop.mqtt.plane import MqttControlPlane
from closedloop.mqtt.worker import HEADER, PlaneWorker, insecure_connection
from closedloop.recording.events import EventLog, clean_json, read_events
from tests.conftest import Pusher, unique
from tests.mqtt_helpers import ThreadedService, raw_commands

NOW = 1.7e9


def parse(verb: str, raw: bytes | str, *, max_bytes: int = 8192) -> Any:
    body = raw.encode() if isinstance(raw, str) else raw
    return parse_command(verb, body, now_s=NOW, max_age_s=5.0, max_bytes=max_bytes)


def refused(verb: str, raw: bytes | str) -> CommandError:
    with pytest.raises(CommandError) as info:
        parse(verb, raw)
    return info.value


# -- parse_command: nesting and numbers ------------------------------------------------------
@pytest.mark.parametrize("raw", ["[" * 5000, "[" * 5000 + "]" * 5000,
                                 '{"a":' * 3000 + "1" + "}" * 3000,
                                 '{"ts": 1, "x": ' + "[" * 9 + "]" * 9 + "}"],
                         ids=["open", "balanced", "objects", "nine"])
def test_deep_nesting_is_refused_not_a_recursion_error(raw: str) -> None:
    with pytest.raises(CommandError) as info:
        parse("arm", raw, max_bytes=100_000)
    err = info.value
    assert err.key == "payload"
    assert "nested" in err.problem
    assert str(MAX_DEPTH) in err.problem


def test_nesting_up_to_the_limit_and_brackets_in_strings_are_fine() -> None:
    def band(levels: int) -> str:  # the object is one level, the lists the others
        return f'{{"ts": {NOW}, "band_hz": ' + "[" * levels + "]" * levels + "}"

    assert parse("set", band(MAX_DEPTH - 1)).args["band_hz"]  # the schema refuses it later
    assert "nested" in refused("set", band(MAX_DEPTH)).problem
    cmd = parse("status", json.dumps({"id": "[[[[[[[[[[[[{{{{{{{{{{\\\"[[[[[[[[["}))
    assert cmd.id.startswith("[[[[")


@pytest.mark.parametrize(("raw", "key"), [
    ('{"ts": ' + "9" * 1000 + "}", "ts"),
    ('{"ts": -' + "9" * 30 + "}", "ts"),
    ('{"ts": 1.7e9, "target_phase_deg": ' + "9" * 5000 + "}", "target_phase_deg"),
    ('{"ts": 1.7e9, "band_hz": [8, ' + "1" * 25 + "]}", "band_hz"),
    ('{"ts": 1e400}', "ts"),
    ('{"ts": 1.7e9, "tolerance_deg": -1e999}', "tolerance_deg"),
    ('{"ts": 1.7e9, "tolerance_deg": 0.' + "1" * 5000 + "}", "tolerance_deg"),
    ('{"ts": 1.7e9, "id": ' + "7" * 21 + "}", "id"),
], ids=["ts", "negative-ts", "setting", "in-list", "float-ts", "float-setting", "long-float",
        "id"])
def test_huge_numbers_are_refused_naming_the_field(raw: str, key: str) -> None:
    verb = "set" if "deg" in raw or "band" in raw else "arm"
    err = refused(verb, raw)
    assert err.key == key
    assert "number too large" in err.problem


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_refused(literal: str) -> None:
    err = refused("set", f'{{"ts": {NOW}, "tolerance_deg": {literal}}}')
    assert err.key == "tolerance_deg"
    assert "not a JSON number" in err.problem


def test_numbers_of_ordinary_size_still_work() -> None:
    cmd = parse("set", json.dumps({"ts": NOW, "id": 10**19, "target_phase_deg": -180.5,
                                   "tolerance_deg": 12345678901234567890}))
    assert cmd.id == 10**19
    assert cmd.args["tolerance_deg"] == 12345678901234567890  # the schema refuses it later


hostile = st.one_of(
    st.integers(1, 3000).map(lambda n: "[" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "0" + "}" * n),
    st.integers(15, 6000).map(lambda n: '{"ts": ' + "9" * n + "}"),
    st.sampled_from(["NaN", "-Infinity", '{"ts": 1e309}', '{"ts": -0.0e-99999}']),
    st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                 lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                     st.text(max_size=3), kids, max_size=3), max_leaves=40).map(
                         lambda v: json.dumps({"ts": NOW, "band_hz": v})),
)


@settings(max_examples=150, deadline=None)
@given(verb=st.sampled_from(["arm", "set", "start", "status", "calibrate"]), raw=hostile)
def test_hostile_payloads_only_ever_raise_command_error(verb: str, raw: str) -> None:
    with contextlib.suppress(CommandError):  # and nothing else
        parse(verb, raw, max_bytes=100_000)


# -- the worker: one exception barrier per message -----------------------------------------
class FakeWriter:
    """The worker's end of the socket to the service: frames kept, decoded."""

    def __init__(self) -> None:
        self.messages: list[tuple[Any, ...]] = []

    def write(self, data: bytes) -> None:
        (size,) = HEADER.unpack(data[:HEADER.size])
        self.messages.append(pickle.loads(data[HEADER.size:HEADER.size + size]))

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m[1], m[2]) for m in self.messages if m[0] == "record"]


class FakeClient:
    """Publishes into a list; refuses wildcard topics as paho does."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    async def publish(self, topic: str, payload: str, **_: Any) -> None:
        if "#" in topic or "+" in topic:
            raise ValueError("Publish topic cannot contain wildcards.")
        self.published.append((topic, json.loads(payload)))


def make_worker(call: Any) -> tuple[PlaneWorker, FakeWriter]:
    writer = FakeWriter()
    worker = PlaneWorker(MqttConfig(instance="hostile"), 1, None, writer)  # type: ignore[arg-type]
    worker._call = call  # type: ignore[method-assign]
    return worker, writer


def message(verb: str, payload: bytes, *, response_topic: str | None = None) -> aiomqtt.Message:
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
        props.CorrelationData = b"c"
    return aiomqtt.Message(f"closedloop/hostile/cmd/{verb}", payload, 1, False, 1, props)


def test_the_worker_replies_to_every_hostile_payload() -> None:
    async def call(name: str, **kwargs: Any) -> dict[str, Any]:
        return {"ok": True, "verb": kwargs["verb"], "id": None, "result": {}}

    worker, writer = make_worker(call)
    client = FakeClient()
    payloads = [b"[" * 8000, b'{"ts": ' + b"9" * 5000 + b"}", b'{"ts": NaN}',
                b'{"a":' * 2000 + b"1" + b"}" * 2000, b"\xff" * 100, b'{"ts": 1e999}']

    async def main() -> None:
        for p in payloads:
            await worker._handle(client, message("arm", p))  # type: ignore[arg-type]

    asyncio.run(main())
    assert len(client.published) == len(payloads)
    assert all(not reply["ok"] and reply["error"] for _, reply in client.published)
    assert len(writer.records()) == len(payloads)


def test_an_exception_while_handling_a_message_is_an_internal_error_reply() -> None:
    async def broken(name: str, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    worker, writer = make_worker(broken)
    client = FakeClient()
    asyncio.run(worker._handle(client, message(  # type: ignore[arg-type]
        "status", b"{}")))
    assert client.published
    topic, reply = client.published[0]
    assert topic == "closedloop/hostile/reply/status"
    assert reply["ok"] is False
    assert "internal error" in reply["error"]
    assert "RuntimeError" in reply["error"]
    kinds = writer.records()
    assert kinds and kinds[-1][0] == "command" and not kinds[-1][1]["ok"]


def test_a_reply_topic_that_cannot_be_published_to_falls_back_to_reply_verb() -> None:
    async def call(name: str, **kwargs: Any) -> dict[str, Any]:
        return {"ok": True, "verb": kwargs["verb"], "id": None, "result": {}}

    worker, _ = make_worker(call)
    client = FakeClient()
    asyncio.run(worker._handle(client, message(  # type: ignore[arg-type]
        "status", b"{}", response_topic="evil/#")))
    assert [t for t, _ in client.published] == ["closedloop/hostile/reply/status"]


def test_insecure_connection_is_named() -> None:
    assert insecure_connection(MqttConfig(enabled=True)) is None  # 127.0.0.1
    assert insecure_connection(MqttConfig(enabled=True, host="localhost")) is None
    assert insecure_connection(MqttConfig(enabled=True, host="::1")) is None
    assert insecure_connection(MqttConfig(enabled=False, host="10.0.0.2")) is None
    warning = insecure_connection(MqttConfig(enabled=True, host="broker.lab", username="u",
                                             password="secret"))
    assert warning is not None
    assert "broker.lab" in warning and "TLS" in warning and "secret" not in warning


# -- the plane: an unexpected exception in the service disarms, replies, records a fault --
class FakeService:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.disarmed_by: list[str] = []
        self.state = "idle"
        self.subscribers: list[Any] = []

    def subscribe(self, fn: Any) -> Any:
        self.subscribers.append(fn)
        return lambda: self.subscribers.remove(fn)

    def record(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def disarm(self, *, by: str) -> None:
        self.disarmed_by.append(by)

    def arm(self, *, by: str) -> None:
        raise ZeroDivisionError("a bug")

    def apply_settings(self, changes: dict[str, Any], *, by: str) -> dict[str, Any]:
        raise ControlError("band_hz: use the calibrate command")


def test_an_unexpected_service_exception_disarms_and_records_a_fault() -> None:
    svc = FakeService()
    plane = MqttControlPlane(MqttConfig())
    plane.bind(svc)  # type: ignore[arg-type]
    reply = plane.command("arm", {}, "x1")
    assert reply["ok"] is False
    assert reply["id"] == "x1"
    assert "internal error" in reply["error"] and "ZeroDivisionError" in reply["error"]
    assert svc.disarmed_by == ["internal_error"]
    kinds = [k for k, _ in svc.events]
    assert "fault" in kinds and kinds[-1] == "command"
    # an expected refusal stays a plain refusal
    svc.events.clear()
    reply = plane.command("set", {"band_hz": "auto"}, None)
    assert reply["ok"] is False and "calibrate" in reply["error"]
    assert svc.disarmed_by == ["internal_error"]
    assert [k for k, _ in svc.events] == ["command"]


def test_the_plane_records_an_insecure_broker_at_start() -> None:
    svc = FakeService()
    plane = MqttControlPlane(MqttConfig(
        enabled=True, host="192.0.2.1", instance=unique("insecure")))  # TEST-NET-1

    async def start_stop() -> None:
        await plane.start(svc)  # type: ignore[arg-type]
        await plane.stop()
        assert svc.subscribers == []  # unsubscribed on the way out

    asyncio.run(start_stop())
    insecure = [f for k, f in svc.events if k == "mqtt_insecure"]
    assert insecure and insecure[0]["host"] == "192.0.2.1"


# -- configuration files and values ------------------------------------------------------
def config_error(path: Any, overrides: tuple[str, ...] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


def test_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[session]\nparticipant = "J\xf6rg"\n'.encode("latin-1"))
    err = config_error(bad)
    assert err.source == str(bad)
    assert "UTF-8" in err.problem


def test_a_config_path_that_is_a_directory(tmp_path: Path) -> None:
    err = config_error(tmp_path)
    assert err.source == str(tmp_path)
    assert "directory" in err.problem


def test_an_unreadable_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.toml"
    locked.write_text("")

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(locked))

    monkeypatch.setattr(load_module, "open", denied, raising=False)  # root could read it
    err = config_error(locked)
    assert err.source == str(locked)
    assert "permission" in err.problem.lower()


def test_a_config_path_with_a_nul_byte() -> None:
    assert "path" in config_error("a\0b.toml").problem


@pytest.mark.parametrize("text", [
    "[trigger]\ntarget_phase_deg = " + "9" * 5000,  # past the int->str limit: tomllib fails
    "[trigger]\ntarget_phase_deg = " + "9" * 400,  # float() overflows
    "[trigger]\ntarget_phase_deg = " + "9" * 25,
    "[mqtt]\nport = " + "9" * 400,  # an int field: repr in the message
    "[mqtt]\nprotocol = " + "9" * 400,  # a Literal: str(value)
    "[trigger]\nseed = " + "9" * 4000,
    "[phase]\nband_hz = [8, " + "9" * 400 + "]",
], ids=["5000-digits", "400-digits", "25-digits", "int-field", "literal", "seed", "in-list"])
def test_huge_integers_in_a_config_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "huge.toml"
    path.write_text(text)
    err = config_error(path)
    assert err.source == str(path)
    assert "too large" in err.problem
    assert len(str(err)) < 400


def test_deeply_nested_toml(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("[trigger]\ntarget_phase_deg = " + "[" * 3000 + "]" * 3000)
    err = config_error(path)
    assert "nested" in err.problem


@pytest.mark.parametrize("override", ["trigger.target_phase_deg=" + "9" * 5000,
                                      "trigger.target_phase_deg=" + "9" * 400,
                                      "trigger.seed=" + "9" * 30,
                                      "trigger.target_phase_deg=" + "[" * 3000],
                         ids=["5000-digits", "400-digits", "seed", "deep"])
def test_huge_or_deep_set_overrides(override: str) -> None:
    err = config_error(None, (override,))
    assert err.source == "--set"
    assert err.key.startswith("trigger.")
    assert "too large" in err.problem or "nested" in err.problem
    assert len(str(err)) < 400


@pytest.mark.parametrize("digits", [5000, 400, 25, -30])
@pytest.mark.parametrize("key", ["target_phase_deg", "intensity_pct", "band_hz"])
def test_huge_live_settings(key: str, digits: int) -> None:
    value = 10 ** abs(digits) * (1 if digits > 0 else -1)
    change = [8, value] if key == "band_hz" else value
    with pytest.raises(ConfigError) as info:
        apply_live_settings(load_config(None), {key: change}, source="mqtt:set")
    assert info.value.source == "mqtt:set"
    assert "too large" in info.value.problem


def test_secrets_are_never_shown_in_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text('[mqtt]\nusername = "u"\npassword = 123456789\n')
    err = config_error(path)
    assert err.key == "mqtt.password"
    assert "123456789" not in str(err)


# -- reload: refusals are recorded (SIGHUP and MQTT use the same method) --------------------
@pytest.fixture
def idle_service(tmp_path: Path) -> Iterator[tuple[ClosedLoopService, Path]]:
    """A service that is not running, with its event log open (reload needs nothing else)."""
    file = tmp_path / "svc.toml"
    file.write_text("[trigger]\ntarget_phase_deg = 0\n")
    svc = ClosedLoopService(load_config(file), config_source=str(file))
    svc.log = EventLog(tmp_path / "ev.jsonl")
    yield svc, file
    svc.log.close()


@pytest.mark.parametrize("content", [b"\xff\xfe[trigger]\n", b"[trigger]\nseed = " + b"9" * 5000,
                                     b"[safety]\nmax_pulses = 5\n", None],
                         ids=["not-utf8", "huge-int", "needs-restart", "directory"])
def test_sighup_reload_refusals_are_recorded(idle_service: tuple[ClosedLoopService, Path],
                                             content: bytes | None, tmp_path: Path) -> None:
    svc, file = idle_service
    if content is None:  # the file was replaced by a directory
        file.unlink()
        file.mkdir()
    else:
        file.write_bytes(content)
    cli._sighup_reload(svc)  # never raises: a signal handler has nobody to raise to
    assert svc.log is not None
    svc.log.close()
    refusals = [e for e in read_events(tmp_path / "ev.jsonl") if e["event"] == "reload_refused"]
    assert len(refusals) == 1
    assert refusals[0]["by"] == "SIGHUP"
    assert str(file) in refusals[0]["error"] or "restart" in refusals[0]["error"]


# -- the event log survives any record -----------------------------------------------------
class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_the_event_log_writes_any_value_and_carries_on(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "ev.jsonl")
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    log.write("a", x=np.float32(1.5), n=np.int64(7), flag=np.bool_(True), arr=np.arange(3),
              s={3, 1, 2}, b=b"\x00\xff", o=Opaque(), bad=BadRepr(), p=Path("/x"),
              huge=10**5000, keys={np.int64(1): 1, (1, 2): 2})
    log.write("cyclic", c=cyclic)
    log.write("after", ok=True)
    log.close()
    assert log.error is None
    events = read_events(tmp_path / "ev.jsonl")
    assert [e["event"] for e in events] == ["a", "cyclic", "after"]
    a = events[0]
    assert a["x"] == 1.5 and a["n"] == 7 and a["flag"] is True and a["arr"] == [0, 1, 2]
    assert a["s"] == [1, 2, 3]
    assert a["b"] == repr(b"\x00\xff") and a["o"] == "<Opaque>" and a["p"] == "/x"
    assert "BadRepr" in a["bad"] and "digits" in a["huge"]
    assert set(a["keys"]) == {"1", "(1, 2)"}
    assert "unencodable" in events[1]


def test_an_event_log_write_error_is_kept_and_the_thread_drains(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "ev.jsonl")
    log._fh.close()  # writing now raises ValueError, not OSError
    log.write("lost")
    log.write("lost too")
    log.close()
    assert isinstance(log.error, ValueError)
    assert not log._thread.is_alive()


def test_an_event_log_thread_that_ends_sets_error(tmp_path: Path) -> None:
    class Fatal(BaseException):
        pass

    class Bomb:
        def __repr__(self) -> str:
            raise Fatal

    log = EventLog(tmp_path / "ev.jsonl")
    log.write("bomb", b=Bomb())
    log._thread.join(5)
    assert not log._thread.is_alive()
    assert isinstance(log.error, Fatal)
    log.close()


def test_clean_json_keeps_plain_values() -> None:
    value = {"a": [1, 2.5, None, "s", True], "b": (1,), "nan": float("nan")}
    assert clean_json(value) == {"a": [1, 2.5, None, "s", True], "b": [1], "nan": None}


# -- one end-to-end run: hostile payloads to a live service over the real broker ----------
LABELS = ("C3", "FC1", "FC5", "CP1", "CP5")


def _mu(t: np.ndarray) -> np.ndarray:
    x = np.random.default_rng(int(t[0] * 1000) % 2**32).normal(0, 1, (len(t), len(LABELS)))
    x[:, 0] += 10 * np.cos(2 * np.pi * 10 * t)
    return x


@pytest.mark.lsl
def test_a_live_service_survives_a_batch_of_hostile_payloads(tmp_path: Path,
                                                             pushers: list[Pusher]) -> None:
    eeg = unique("hostile-eeg")
    pushers.append(Pusher(eeg, LABELS, 1000.0, _mu))
    inst = unique("hostile")
    file = tmp_path / "svc.toml"
    file.write_text(f'[streams.eeg]\nname = "{eeg}"\n[mqtt]\nenabled = true\n'
                    f'instance = "{inst}"\n[recording]\nevents = "{tmp_path / "ev.jsonl"}"\n'
                    f'marker_stream = ""\n[stimulator]\ncoil_stream = "{unique("coil")}"\n')
    svc = ThreadedService(load_config(file), config_source=str(file))
    try:
        deadline = time.monotonic() + 10
        while not (svc.plane and svc.plane.connected):
            assert time.monotonic() < deadline, "the control plane never connected"
            time.sleep(0.05)
        plane = svc.plane
        worker_pid = plane.pid
        file.write_bytes(b"\xff\xfe not UTF-8")
        ts = f"{time.time():.3f}".encode()
        hostile_batch = [
            ("arm", b"[" * 8000), ("arm", b'{"a":' * 1500 + b"1" + b"}" * 1500),
            ("arm", b'{"ts": ' + b"9" * 1000 + b"}"),
            ("set", b'{"ts": ' + ts + b', "target_phase_deg": ' + b"9" * 5000 + b"}"),
            ("set", b'{"ts": ' + ts + b', "tolerance_deg": NaN}'),
            ("set", b'{"ts": ' + ts + b', "band_hz": [8, 1e999]}'),
            ("status", b'{"id": ' + b"1" * 4000 + b"}"),
            ("reload", b'{"ts": ' + ts + b"}"),
        ]
        replies = asyncio.run(raw_commands(f"closedloop/{inst}/", hostile_batch))
        for (verb, payload), reply in zip(hostile_batch, replies, strict=True):
            assert reply["ok"] is False, (verb, payload[:40], reply)
            assert reply["error"]
        assert str(file) in replies[-1]["error"] and "UTF-8" in replies[-1]["error"]
        status = asyncio.run(raw_commands(f"closedloop/{inst}/", [("status", b"{}")]))[0]
        assert status["ok"] and status["result"]["state"] == "idle"
        assert plane.pid == worker_pid and plane._proc is not None
        assert plane._proc.poll() is None
        assert svc.service.state == "idle"
    finally:
        svc.stop()
    assert svc.error is None
    events = read_events(tmp_path / "ev.jsonl")
    refusal = [e for e in events if e["event"] == "reload_refused"]
    assert refusal and refusal[0]["by"] == "mqtt:reload"
    assert not [e for e in events if e["event"] == "fault"]
