"""Configuration: typed loading, errors that name file/key/problem, overrides, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from closedloop.cli import main
from closedloop.config import load_config
from closedloop.config.load import check_cross_fields, config_to_dict, from_dict
from closedloop.config.redact import redacted_config
from closedloop.config.schema import HARD_MAX_INTENSITY_PCT, Config, live_keys, opt
from closedloop.control.runtime import LIVE_KEYS, apply_live_settings
from closedloop.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_have_the_documented_keys() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.streams.eeg.name == "EEG"
    assert cfg.phase.channel == "C3"
    assert cfg.phase.reference == ("FC1", "FC5", "CP1", "CP5")
    assert cfg.phase.band_hz == (8.0, 13.0)
    assert cfg.trigger.target_phase_deg == 0.0
    assert cfg.trigger.tolerance_deg == 10.0
    assert cfg.trigger.amplitude_percentile == 50.0
    assert cfg.trigger.min_interval_s == 2.0
    assert cfg.trigger.jitter_s == 0.5
    assert cfg.stimulator.driver == "simulated"
    assert cfg.stimulator.intensity_pct == 60.0
    assert cfg.mep.channels == ("FDI",)
    assert cfg.mep.window_ms == (15.0, 50.0)
    assert cfg.mep.preactivation_uv == 50.0
    assert cfg.recording.events == "sessions/events.jsonl"
    assert cfg.streams.pulses is None


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    load_config(path)


def test_issue_example_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[streams.eeg]
name = "EEG"
[streams.emg]
name = "EMG"
[streams.pulses]
name = "TMS-Markers"
[phase]
channel = "C3"
reference = ["FC1", "FC5", "CP1", "CP5"]
band_hz = "auto"
[trigger]
target_phase_deg = 0
tolerance_deg = 10
amplitude_percentile = 50
min_interval_s = 2.0
jitter_s = 0.5
[stimulator]
driver = "simulated"
intensity_pct = 60
[mep]
channels = ["FDI"]
window_ms = [15, 50]
preactivation_uv = 50
[recording]
events = "sessions/events.jsonl"
"""))
    assert cfg.phase.band_hz == "auto"
    assert cfg.streams.pulses is not None
    assert cfg.streams.pulses.name == "TMS-Markers"


@pytest.mark.parametrize(("text", "key", "words"), [
    ("[trigger]\ntolerance_deg = 'wide'", "trigger.tolerance_deg", "expected a number"),
    ("[trigger]\ntolerance_deg = 200", "trigger.tolerance_deg", "<= 180"),
    ("[trigger]\ntarget_phase = 0", "trigger.target_phase", "unknown key"),
    ("[phase]\nband_hz = [13, 8]", "phase.band_hz", "low < high"),
    ("[phase]\nband_hz = 'alpha'", "phase.band_hz", "'auto'"),
    ("[phase]\nreference = 'FC1'", "phase.reference", "expected a list"),
    ("[safety]\nmax_intensity_pct = 120", "safety.max_intensity_pct", "<= 100"),
    ("[stimulator]\ndriver = 'magic'", "stimulator.driver", "'simulated'"),
    ("[stimulator]\nintensity_pct = 90", "stimulator.intensity_pct", "refused, not clamped"),
    ("[streams.eeg]\ndejitter = 1", "streams.eeg.dejitter", "true or false"),
    ("[streams.emg]\ntime_offset_ms = 1", "streams.emg", "at least one of name"),
    ("[mep]\nwindow_ms = [50, 15]", "mep.window_ms", "start < end"),
    ("[trigger]\nmin_interval_s = 0.001", "trigger.min_interval_s", ">= 0.05"),
    ("streams = 3", "streams", "expected a table"),
    ("[mep]\nblank_ms = [-1, 20]", "mep.blank_ms", "must not erase"),
    ("[mep]\nbandpass_hz = [1000, 10]", "mep.bandpass_hz", "0 < low < high"),
])
def test_errors_name_file_key_and_problem(tmp_path: Path, text: str, key: str,
                                          words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert words in info.value.problem
    assert str(path) in str(info.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[trigger\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_set_overrides_any_key_with_typed_values() -> None:
    cfg = load_config(None, ["trigger.target_phase_deg=180", "phase.band_hz=[9, 12]",
                             "phase.reference=[]", "streams.emg.name=EMG",
                             'recording.events="x.jsonl"', "recording.marker_stream=plain"])
    assert cfg.trigger.target_phase_deg == 180.0
    assert cfg.phase.band_hz == (9.0, 12.0)
    assert cfg.phase.reference == ()
    assert cfg.streams.emg is not None
    assert cfg.streams.emg.name == "EMG"
    assert cfg.recording.events == "x.jsonl"
    assert cfg.recording.marker_stream == "plain"


@pytest.mark.parametrize(("override", "words"), [
    ("trigger.nope=1", "unknown key 'nope'"),
    ("trigger=1", "expected a table"),
    ("trigger.tolerance_deg", "expected KEY=VALUE"),
    ("trigger.tolerance_deg.x=1", "not a table"),
    ("trigger.tolerance_deg=-1", ">= 0"),
])
def test_bad_overrides_are_named(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        load_config(None, [override])
    assert info.value.source == "--set"


def test_hard_caps_cannot_be_raised_by_config() -> None:
    with pytest.raises(ConfigError):
        load_config(None, [f"safety.max_intensity_pct={HARD_MAX_INTENSITY_PCT + 1}"])
    with pytest.raises(ConfigError):
        load_config(None, ["safety.max_pulses=1000000"])


def test_check_config_cli(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "closedloop", "check-config",
                           str(REPO / "configs" / "demo.toml")], capture_output=True, text=True,
                          check=False)
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
    bad = subprocess.run([sys.executable, "-m", "closedloop", "check-config",
                          str(write(tmp_path, "[trigger]\ntolerance_deg = -3")),
                          "--set", "phase.channel=C4"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2
    assert "trigger.tolerance_deg" in bad.stderr
    assert ">= 0" in bad.stderr


@pytest.mark.parametrize(("overrides", "key", "words"), [
    (['stimulator.driver="magstim-200"'], "stimulator.port", "serial port"),
    (['stimulator.driver="ttl"', 'stimulator.port="/dev/x"', 'stimulation.pattern="paired"'],
     "stimulation.pattern", "paired pulses need"),
    (['stimulator.driver="magstim-bistim"', 'stimulator.port="/dev/x"',
      'stimulation.pattern="burst"', "safety.motor_threshold_pct=50"],
     "stimulation.pattern", "recharges"),
    (['stimulation.pattern="train"'], "safety.motor_threshold_pct", "motor threshold"),
    (['stimulation.pattern="itbs"', "safety.motor_threshold_pct=50",
      "stimulation.tbs_pulses=45"], "stimulation.tbs_pulses", "multiple of 30"),
    (['stimulation.pattern="paired"', "stimulation.conditioning_pct=90"],
     "stimulation.conditioning_pct", "max_intensity_pct"),
    (['stimulator.trigger_port="/dev/y"'], "stimulator.trigger_port", "only magstim"),
    (["stimulator.keepalive_ms=900"], "stimulator.keepalive_ms", "500"),
    (["safety.max_pulses_per_day=50000"], "safety.max_pulses_per_day", "20000"),
    (["safety.train_duration_factor=1.5"], "safety.train_duration_factor", "1"),
    (["safety.min_inter_train_s=0.2"], "safety.min_inter_train_s", "1"),
    (["safety.max_coil_temp_c=60"], "safety.max_coil_temp_c", "45"),
])
def test_stimulation_settings_that_do_not_fit_together(overrides: list[str], key: str,
                                                        words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.parametrize(("changes", "error_key"), [
    ({"tolerance_deg": 20, "target_phase_deg": 90}, None),
    ({"band_hz": [8.5, 12.5], "intensity_pct": 55, "jitter_s": 0.1}, None),
    ({"wait_for_training": False}, None),
    ({"tolerance_deg": "wide"}, "trigger.tolerance_deg"),  # wrong type
    ({"tolerance_deg": 500}, "trigger.tolerance_deg"),  # out of range
    ({"min_interval_s": 0.01}, "trigger.min_interval_s"),  # below its bound
    ({"band_hz": [13, 8]}, "phase.band_hz"),  # a rule checked across the config
    ({"intensity_pct": HARD_MAX_INTENSITY_PCT + 1}, "stimulator.intensity_pct"),
    ({"intensity_pct": 90}, "stimulator.intensity_pct"),  # over safety.max_intensity_pct
    ({"safety.max_intensity_pct": 100}, "safety.max_intensity_pct"),  # not live-settable
])
def test_live_settings_validate_like_a_whole_config(changes: dict[str, object],
                                                    error_key: str | None) -> None:
    """apply_live_settings rebuilds only the changed sections: it must accept, refuse and
    name keys exactly as validating the whole configuration with the change does."""
    base = load_config(None)
    assert base.safety.max_intensity_pct < 90
    data = config_to_dict(base)
    for key, value in changes.items():
        section, name = LIVE_KEYS.get(key, key).split(".")
        data[section][name] = value
    if error_key is not None:
        with pytest.raises(ConfigError) as live:
            apply_live_settings(base, changes, source="t")
        assert live.value.key == error_key
        if error_key != "safety.max_intensity_pct":  # the whole file would accept that one
            with pytest.raises(ConfigError) as whole:
                check_cross_fields(from_dict(Config, data, source="t"), "t")
            assert whole.value.key == error_key
        return
    new = apply_live_settings(base, changes, source="t")
    assert new == from_dict(Config, data, source="t")
    assert new != base


def test_redacted_config_hides_only_the_secrets_that_are_set() -> None:
    cfg = load_config(None, ['mqtt.username="op"', 'mqtt.password="hunter2"',
                             'stimulator.unlock_code="1234-abcd"', 'mqtt.tls.ca="/etc/ca.pem"'])
    plain, shown = config_to_dict(cfg), redacted_config(cfg)
    assert shown["mqtt"]["password"] == shown["stimulator"]["unlock_code"] == "<redacted>"
    assert "hunter2" not in json.dumps(shown) and "1234-abcd" not in json.dumps(shown)
    assert shown["mqtt"]["tls"]["ca"] == "/etc/ca.pem"  # a path, its content never read
    shown["mqtt"]["password"] = plain["mqtt"]["password"]
    shown["stimulator"]["unlock_code"] = plain["stimulator"]["unlock_code"]
    assert shown == plain  # nothing else changed
    unset = redacted_config(load_config(None))
    assert unset["mqtt"]["password"] is None and unset["stimulator"]["unlock_code"] == ""


def test_check_config_print_redacts_and_warns_of_a_broker_in_clear(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[mqtt]\nenabled = true\nhost = "10.1.2.3"\nusername = "op"\n'
                           'password = "hunter2"\n')
    assert main(["check-config", str(path), "--print"]) == 0
    out, err = capsys.readouterr()
    assert "hunter2" not in out and "<redacted>" in out
    assert json.loads(out)["mqtt"]["host"] == "10.1.2.3"
    assert "warning" in err and "10.1.2.3" in err and "TLS" in err and "hunter2" not in err
    assert main(["check-config", str(write(tmp_path, "[mqtt]\nenabled = true\n"))]) == 0
    assert "warning" not in capsys.readouterr().err  # the default broker is this machine


@pytest.mark.parametrize("kind", ["not-utf8", "directory", "huge-int"])
def test_check_config_refuses_unusable_files_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "c.toml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe[trigger]" if kind == "not-utf8" else
                         b"[trigger]\ntarget_phase_deg = " + b"9" * 5000)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert not out
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err


def test_live_keys_are_the_fields_the_schema_marks_live() -> None:
    """Written out on purpose: making another key live (a safety limit, a driver) must be
    a deliberate change here too, not a flag set in passing."""
    assert LIVE_KEYS == {
        "band_hz": "phase.band_hz",
        "target_phase_deg": "trigger.target_phase_deg",
        "tolerance_deg": "trigger.tolerance_deg",
        "amplitude_percentile": "trigger.amplitude_percentile",
        "max_expected_error_deg": "trigger.max_expected_error_deg",
        "wait_for_training": "trigger.wait_for_training",
        "min_interval_s": "trigger.min_interval_s",
        "jitter_s": "trigger.jitter_s",
        "intensity_pct": "stimulator.intensity_pct",
    }


@dataclass(frozen=True, kw_only=True)
class _Inner:
    x: float = opt(1.0, "x", live=True)


@dataclass(frozen=True, kw_only=True)
class _Section:
    x: float = opt(1.0, "x", live=True)
    inner: _Inner | None = opt(None, "nested table")


@dataclass(frozen=True, kw_only=True)
class _Deep:
    a: _Section | None = opt(None, "a section with a live key in a nested table")


@dataclass(frozen=True, kw_only=True)
class _Twice:
    a: _Inner | None = opt(None, "a")
    b: _Inner | None = opt(None, "b, with the same live field name")


@dataclass(frozen=True, kw_only=True)
class _OneSection:
    a: _Inner | None = opt(None, "a")


def test_live_keys_refuse_nested_and_ambiguous_fields() -> None:
    with pytest.raises(TypeError, match=r"a\.inner\.x: only keys of a top-level section"):
        live_keys(_Deep)
    with pytest.raises(TypeError, match=r"b\.x: live like a\.x"):
        live_keys(_Twice)
    with pytest.raises(TypeError, match="x: only keys of a top-level section"):
        live_keys(_Section)  # x is beside the sections, not in one
    assert live_keys(_OneSection) == {"x": "a.x"}


def test_an_open_lower_bound_refuses_the_bound_itself() -> None:
    with pytest.raises(ConfigError, match="expected a value > 0") as info:
        load_config(None, ["mep.notch_hz=0"])
    assert info.value.key == "mep.notch_hz"
    assert load_config(None, ["mep.notch_hz=0.5"]).mep.notch_hz == 0.5
