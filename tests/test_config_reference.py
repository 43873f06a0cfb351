"""The configuration reference and its JSON Schemas agree with the loader and the MQTT parser."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from closedloop.cli import main
from closedloop.config.load import config_to_dict, load_config, validated
from closedloop.config.reference import (
    FORMATS,
    config_json_schema,
    markdown_reference,
    render,
    set_json_schema,
)
from closedloop.control.runtime import LIVE_KEYS, apply_live_settings
from closedloop.errors import ConfigError
from closedloop.mqtt.commands import CommandError, parse_command

REPO = Path(__file__).resolve().parent.parent


def _keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of a plain configuration (tables' keys, not the tables)."""
    out = []
    for k, v in tree.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def _validator(schema: dict[str, Any]) -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the 'test' extra")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_schemas_are_valid_draft_2020_12_and_accept_every_shipped_config() -> None:
    check = _validator(config_json_schema())
    check.validate(config_to_dict(load_config(None)))  # the JSON form, with its nulls
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        check.validate(tomllib.loads(path.read_text(encoding="utf-8")))
    _validator(set_json_schema())


@pytest.mark.parametrize("data", [
    {"trigger": {"tolerance_deg": 200}},  # above its bound
    {"trigger": {"tolerance_deg": "wide"}},  # wrong type
    {"trigger": {"target_phase": 0}},  # unknown key
    {"stimulator": {"driver": "magic"}},  # not one of the drivers
    {"mep": {"notch_hz": 0}},  # an open lower bound
    {"phase": {"band_hz": [8, 10, 12]}},  # three edges
    {"phase": {"band_hz": "alpha"}},
    {"stimulation": {"burst_pulses": 2.5}},  # an integer
    {"streams": {"emg": {"nme": "EMG"}}},  # unknown key in an optional table
    {"trigger": {"power_conditions": [{"percentile": 120}]}},  # in a list of tables
    {"mqtt": {"tls": {"ca": 3}}},
])
def test_what_the_schema_refuses_the_loader_refuses(data: dict[str, Any]) -> None:
    assert not _validator(config_json_schema()).is_valid(data)
    with pytest.raises(ConfigError):
        validated(data, source="t")


def test_a_numeric_protocol_is_accepted_by_both() -> None:
    data = {"mqtt": {"protocol": 5}}
    assert _validator(config_json_schema()).is_valid(data)
    assert validated(data, source="t").mqtt.protocol == "5"


def test_defaults_bounds_and_live_flags_come_from_the_schema() -> None:
    schema = config_json_schema()
    tol = schema["properties"]["trigger"]["properties"]["tolerance_deg"]
    assert (tol["default"], tol["minimum"], tol["maximum"], tol["x-live"]) == (10.0, 0, 180,
                                                                                True)
    eeg = schema["properties"]["streams"]["properties"]["eeg"]["properties"]
    assert eeg["name"]["default"] == "EEG"  # the table's own default, not the class's
    notch = schema["properties"]["mep"]["properties"]["notch_hz"]
    assert notch["exclusiveMinimum"] == 0 and "minimum" not in notch

    live = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, prop in node.get("properties", {}).items():
            if prop.get("x-live"):
                live.append(prefix + name)
            for sub in (prop, *prop.get("anyOf", [])):
                walk(sub, f"{prefix}{name}.")

    walk(schema, "")
    assert sorted(live) == sorted(LIVE_KEYS.values())


def test_the_markdown_reference_has_every_key_once() -> None:
    text = markdown_reference()
    rows = [line.split("|")[1].strip().strip("`") for line in text.splitlines()
            if line.startswith("| `")]
    assert len(rows) == len(set(rows))
    for key in _keys(config_to_dict(load_config(None))):
        assert key in rows, key
    assert "streams.emg.name" in rows and "trigger.power_conditions[].band_hz" in rows
    for short, dotted in LIVE_KEYS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{dotted}` |"))
        assert f"| `{short}` |" in row
    assert "`closedloop/<instance>/`" in text  # in a code span it stays as written
    assert '"closedloop/&lt;instance&gt;/"' in text  # outside one: not an HTML tag
    assert "magstim-\\*" in text  # outside code: not emphasis


def _set(payload: dict[str, Any]) -> dict[str, Any]:
    return {"ts": time.time(), **payload}


@pytest.mark.parametrize(("payload", "valid"), [
    ({"target_phase_deg": 180, "tolerance_deg": 8}, True),
    ({"band_hz": [8.5, 12.5], "id": "a1"}, True),
    ({"wait_for_training": False, "id": 7}, True),
    ({}, False),  # nothing to set
    ({"tolerance_deg": 500}, False),
    ({"max_intensity_pct": 100}, False),  # a safety limit is not live
    ({"intensity_pct": 101}, False),  # beyond the hard cap
    ({"wait_for_training": 1}, False),
    ({"id": True, "jitter_s": 0.1}, False),
])
def test_the_set_schema_agrees_with_the_command_parser_and_the_service_rules(
        payload: dict[str, Any], valid: bool) -> None:
    check = _validator(set_json_schema())
    assert check.is_valid(_set(payload)) is valid
    assert not check.is_valid(payload)  # without "ts": the service refuses it too

    def accepted() -> bool:
        try:
            cmd = parse_command("set", json.dumps(_set(payload)).encode(),
                                now_s=time.time(), max_age_s=5.0, max_bytes=8192)
        except CommandError:
            return False
        try:
            apply_live_settings(load_config(None), cmd.args, source="mqtt")
        except ConfigError:
            return False
        return True

    assert accepted() is valid


def test_the_set_schema_lists_exactly_the_live_keys() -> None:
    schema = set_json_schema()
    assert set(schema["properties"]) == {"ts", "id", *LIVE_KEYS}
    assert schema["required"] == ["ts"] and schema["additionalProperties"] is False


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_reference_writes_each_format(tmp_path: Path, fmt: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ref"
    assert main(["config-reference", "--format", fmt, "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render(fmt)
    assert main(["config-reference", "--format", fmt]) == 0
    assert capsys.readouterr().out == render(fmt)


def test_config_reference_refuses_bad_arguments_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["config-reference", "--format", "yaml"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'yaml'" in err and "Traceback" not in err
    assert main(["config-reference", "-o", str(tmp_path / "missing" / "x.md")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "No such file or directory" in err
    assert main(["config-reference", "-o", str(tmp_path)]) == 1
    assert "Is a directory" in capsys.readouterr().err
