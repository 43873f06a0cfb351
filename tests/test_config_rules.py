"""Rules across keys: each is reachable, listed with its section and in the reference.

Every rule of every section (:class:`closedloop.config.schema.Rule`) has a row in
``CASES``: a configuration that breaks that rule and no other, the key its refusal names
and the message, word for word.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterator
from typing import Any, get_type_hints

import pytest

from closedloop.config.load import from_dict, validated
from closedloop.config.reference import markdown_reference
from closedloop.config.schema import (
    PAIRED_DRIVERS,
    TRAIN_DRIVERS,
    Config,
    Rule,
    Section,
    Violation,
)
from closedloop.errors import ConfigError

SECTIONS: dict[str, type[Section]] = {
    f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
RULES: dict[str, Rule[Any]] = {r.name: r for cls in SECTIONS.values() for r in cls.rules}

# (rule, data that breaks only it, the key its refusal names, the exact problem)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("StreamsConfig._selected", {"streams": {"emg": {"time_offset_ms": 1}}}, "streams.emg",
     "give at least one of name, type, source_id"),
    ("PhaseConfig._band_ordered", {"phase": {"band_hz": [13, 8]}}, "phase.band_hz",
     "expected 0.5 <= low < high, got [13, 8]"),
    ("PhaseConfig._band_below_nyquist", {"phase": {"band_hz": [8, 250]}}, "phase.band_hz",
     "high edge 250 Hz too close to the processing rate's Nyquist frequency "
     "(phase.processing_rate_hz = 500)"),
    ("PhaseConfig._window_fits_edges", {"phase": {"edge_ms": 220}}, "phase.window_ms",
     "too short for its edges: needs window_ms > 2 * edge_ms + fir_ms / 2"),
    ("PhaseConfig._reference_without_target", {"phase": {"reference": ["FC1", "C3"]}},
     "phase.reference", "must not contain the target channel C3"),
    ("TriggerConfig._condition_bands", {"trigger": {"power_conditions": [
        {}, {"band_hz": [13, 250]}]}}, "trigger.power_conditions[1].band_hz",
     "expected 0 < low < high < processing rate / 2.5 (200 Hz), got [13, 250]"),
    ("StimulatorConfig._port_given", {"stimulator": {"driver": "ttl"}}, "stimulator.port",
     "driver 'ttl' needs the device's serial port"),
    ("StimulatorConfig._trigger_port_driver", {"stimulator": {"trigger_port": "/dev/ttyS0"}},
     "stimulator.trigger_port",
     "only magstim-* and magventure fire through a separate TTL port"),
    ("StimulatorConfig._intensity_within_limit", {"stimulator": {"intensity_pct": 90}},
     "stimulator.intensity_pct",
     "90 is above safety.max_intensity_pct (80); refused, not clamped"),
    ("StimulationConfig._paired_driver",
     {"stimulator": {"driver": "ttl", "port": "/dev/ttyS0"},
      "stimulation": {"pattern": "paired"}}, "stimulation.pattern",
     "paired pulses need a driver that sets the pair (simulated, magstim-bistim, "
     "magventure), not 'ttl'"),
    ("StimulationConfig._conditioning_within_limit",
     {"stimulation": {"pattern": "paired", "conditioning_pct": 90}},
     "stimulation.conditioning_pct", "above safety.max_intensity_pct (80)"),
    ("StimulationConfig._train_driver",
     {"stimulator": {"driver": "magstim-200", "port": "/dev/ttyS0"},
      "stimulation": {"pattern": "burst"}, "safety": {"motor_threshold_pct": 50}},
     "stimulation.pattern",
     "magstim-200 recharges for seconds after a pulse: no burst (use simulated, ttl, "
     "magstim-rapid, magventure)"),
    ("StimulationConfig._tbs_whole_bursts",
     {"stimulation": {"pattern": "itbs", "tbs_pulses": 603},
      "safety": {"motor_threshold_pct": 50}}, "stimulation.tbs_pulses",
     "itbs needs a multiple of 30"),
    ("SafetyConfig._motor_threshold_for_trains", {"stimulation": {"pattern": "train"}},
     "safety.motor_threshold_pct",
     "pattern 'train' needs the resting motor threshold: the train and burst limits are in "
     "% of it"),
    ("SessionConfig._participant_id", {"session": {"participant": "../x"}},
     "session.participant",
     "'../x': use at most 64 letters, digits, '-', '_' or '.' (not starting with '.'); it "
     "names the participant's pulse counter file"),
    ("MepConfig._windows_ordered", {"mep": {"background_ms": [-5, -100]}},
     "mep.background_ms", "expected start < end, got [-5, -100]"),
    ("MepConfig._window_after_pulse", {"mep": {"window_ms": [-2, 50]}}, "mep.window_ms",
     "the response window must start after the pulse (>= 0)"),
    ("MepConfig._background_before_pulse", {"mep": {"background_ms": [-100, 5]}},
     "mep.background_ms", "the background window must end before the pulse (<= 0)"),
    ("MepConfig._blanking_before_window", {"mep": {"blank_ms": [-1, 20]}}, "mep.blank_ms",
     "expected start < end < the response window's start (blanking must not erase the MEP)"),
    ("MepConfig._bandpass_ordered", {"mep": {"bandpass_hz": [1000, 10]}}, "mep.bandpass_hz",
     "expected 0 < low < high"),
    ("MepConfig._channels_for_emg", {"mep": {"channels": []},
                                     "streams": {"emg": {"name": "EMG"}}},
     "mep.channels", "streams.emg is set but no MEP channel is named"),
    ("MqttConfig._instance_in_topic", {"mqtt": {"instance": "lab/1"}}, "mqtt.instance",
     "'lab/1' is not usable in a topic (no '+', '#', '/'; not empty)"),
    ("MqttConfig._prefix_in_topic", {"mqtt": {"prefix": "lab/#/"}}, "mqtt.prefix",
     "'lab/#/' is not usable in a topic (no '+', '#'; not empty)"),
    ("MqttConfig._tls_pair", {"mqtt": {"tls": {"cert": "c.pem"}}}, "mqtt.tls",
     "cert and key go together: give both or neither"),
    ("MqttConfig._password_with_user", {"mqtt": {"password": "x"}}, "mqtt.password",
     "a password needs mqtt.username"),
]


def test_every_rule_has_a_case_and_names_are_unique() -> None:
    names = [r.name for cls in SECTIONS.values() for r in cls.rules]
    assert len(names) == len(set(names))
    assert sorted(case[0] for case in CASES) == sorted(names)


@pytest.mark.parametrize(("name", "data", "key", "problem"), CASES,
                         ids=[case[0] for case in CASES])
def test_a_config_that_breaks_only_one_rule_is_refused_with_its_key(
        name: str, data: dict[str, Any], key: str, problem: str) -> None:
    cfg = from_dict(Config, data, source="t")  # every value passes its own checks
    broken = [r.name for s in cfg.sections() for r in s.rules if list(r.check(s, cfg))]
    assert broken == [name]
    with pytest.raises(ConfigError) as info:
        validated(data, source="t")
    assert (info.value.source, info.value.key, info.value.problem) == ("t", key, problem)
    assert re.sub(r"\[\d+\]", "[]", key) in RULES[name].keys


def test_the_defaults_break_no_rule() -> None:
    cfg = Config()
    assert [r.name for s in cfg.sections() for r in s.rules if list(r.check(s, cfg))] == []


def test_every_section_is_a_section_and_its_rules_are_its_own() -> None:
    for section, cls in SECTIONS.items():
        assert issubclass(cls, Section), section
        for r in cls.rules:
            assert r.name.startswith(f"{cls.__name__}._"), r.name
            for key in r.keys:
                assert key.startswith(f"{section}."), (r.name, key)
                assert f"``{key}" in r.text, (r.name, key)  # the words name each key


def test_every_check_method_is_listed_in_rules() -> None:
    """A method that yields violations but is missing from ``rules`` would never run."""
    for cls in SECTIONS.values():
        listed = {r.name for r in cls.rules}
        for attr, fn in vars(cls).items():
            if inspect.isfunction(fn) and get_type_hints(fn).get("return") == Iterator[
                    Violation]:
                assert f"{cls.__name__}.{attr}" in listed


def test_the_driver_rules_name_every_capable_driver() -> None:
    for name, drivers in (("StimulationConfig._paired_driver", PAIRED_DRIVERS),
                          ("StimulationConfig._train_driver", TRAIN_DRIVERS)):
        for driver in drivers:
            assert driver in RULES[name].text, (name, driver)


def _unescaped(markdown: str) -> str:
    return (markdown.replace("\\*", "*").replace("&lt;", "<").replace("&gt;", ">")
            .replace("&amp;", "&"))


def test_the_reference_lists_every_rule_under_its_section() -> None:
    text = markdown_reference()
    chunks = {chunk.split("]`", 1)[0]: chunk for chunk in text.split("\n## `[")[1:]}
    assert set(chunks) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        chunk = chunks[section]
        listed = []
        if "**Rules across keys:**" in chunk:
            after = chunk.split("**Rules across keys:**\n\n", 1)[1]
            listed = [_unescaped(line[2:]) for line in after.splitlines()
                      if line.startswith("- ")]
        assert listed == [r.text.replace("``", "`") for r in cls.rules], section
