"""The command line's arguments: every option documented with its default, values checked
while parsing, and a user's mistake answered with one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pylsl
import pytest

from closedloop.cli import main
from closedloop.config.schema import PhaseConfig
from closedloop.control.protocols import PROTOCOLS
from tests.conftest import unique

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / "configs" / "lab-c3-mu.toml"


def build_parser() -> argparse.ArgumentParser:
    from closedloop.cli_args import build_parser  # noqa: PLC0415

    return build_parser()


def help_text(action: argparse.Action) -> str:
    from closedloop.cli_args import help_text  # noqa: PLC0415

    return help_text(action)


def _subparsers(parser: argparse.ArgumentParser, prog: str = "closedloop"
                ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's parser, the top one included."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prog} {name}")


def _options() -> Iterator[tuple[str, argparse.Action]]:
    for prog, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction |
                          argparse._VersionAction):
                continue
            yield prog, action


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def test_every_option_has_help_and_says_its_default() -> None:
    """An option without help, or whose default a user cannot see, fails here."""
    undocumented, no_default = [], []
    for prog, action in _options():
        if not action.help or action.help == argparse.SUPPRESS:
            undocumented.append(f"{prog} {_name(action)}")
            continue
        takes_value = action.nargs != 0 and not isinstance(action, argparse._AppendAction)
        required = action.required or (not action.option_strings and action.nargs is None)
        if not takes_value or required:
            continue  # flags, repeatable --set, what must be given
        text = help_text(action)  # a value is shown; None or [] is said in words
        if "default" not in text:
            no_default.append(f"{prog} {_name(action)}: {text!r}")
    assert not undocumented, f"options without help: {undocumented}"
    assert not no_default, f"options whose help does not say the default: {no_default}"


def test_every_help_page_renders() -> None:
    for prog, parser in _subparsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, (prog, option)


def test_numbers_show_their_default_as_written() -> None:
    parser = build_parser()
    shown = {prog: p.format_help() for prog, p in _subparsers(parser)}
    assert "(default: 60)" in shown["closedloop demo"]  # --duration, not 60.0
    assert "(default: 5000)" in shown["closedloop simulate"]  # --eeg-rate


def test_demo_protocols_come_from_the_registry() -> None:
    demo = dict(_subparsers(build_parser()))["closedloop demo"]
    (action,) = [a for a in demo._actions if "--protocol" in a.option_strings]
    assert action.choices is not None
    assert tuple(action.choices) == PROTOCOLS
    text = " ".join(help_text(action).split())
    for name in PROTOCOLS:
        assert name in text


def test_evaluate_phase_defaults_to_the_services_montage() -> None:
    args = build_parser().parse_args(["evaluate-phase", "rec.npz"])
    assert args.channel == PhaseConfig().channel
    assert tuple(args.reference) == PhaseConfig().reference
    raw = build_parser().parse_args(["evaluate-phase", "rec.npz", "--reference"])
    assert raw.reference == []


def test_check_config_takes_config_like_run_and_keeps_the_positional(
        capsys: pytest.CaptureFixture[str]) -> None:
    demo = str(REPO / "configs" / "demo.toml")
    for argv in (["check-config", "--config", demo], ["check-config", "-c", demo],
                 ["check-config", demo]):
        assert main(argv) == 0, argv
        assert capsys.readouterr().out.strip() == f"{demo}: OK"


def _cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "closedloop", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                          cwd=REPO)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4 s two-channel .npz recording (replay reads EDF/BDF: offline and evaluate-phase
    read this)."""
    fs = 250.0
    t = np.arange(int(4 * fs)) / fs
    path = tmp_path_factory.mktemp("rec") / "rec.npz"
    np.savez(path, data=np.column_stack([np.cos(2 * np.pi * 10 * t), 0 * t]),
             labels=np.array(["C3", "Cz"]), fs=fs)
    return path


@pytest.fixture(scope="module")
def edf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pyedflib = pytest.importorskip("pyedflib")
    fs, seconds = 250, 4
    path = tmp_path_factory.mktemp("edf") / "rec.edf"
    writer = pyedflib.EdfWriter(str(path), 2, file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setSignalHeaders([{"label": label, "dimension": "uV", "sample_frequency": fs,
                                  "physical_max": 100.0, "physical_min": -100.0,
                                  "digital_max": 32767, "digital_min": -32768}
                                 for label in ("C3", "Cz")])
        t = np.arange(fs * seconds) / fs
        writer.writeSamples([10 * np.cos(2 * np.pi * 10 * t), 0 * t])
    finally:
        writer.close()
    return path


# (argv, a word the one-line error must contain); "{edf}"/"{npz}" stand for recordings
MISTAKES = [
    (["run", "-c", "configs"], "configs"),
    (["run", "-c", "no-such.toml"], "no-such.toml"),
    (["replay", "{edf}", "--start", "99999"], "--start"),
    (["replay", "{edf}", "--start", "-1"], "--start"),
    (["replay", "{edf}", "--duration", "-3"], "--duration"),
    (["replay", "{edf}", "--duration", "0.0001"], "--duration"),
    (["replay", "{edf}", "--chunk-ms", "-5"], "--chunk-ms"),
    (["replay", "{edf}", "--speed", "0"], "--speed"),
    (["replay", "{edf}", "--stop", "1", "--start", "2"], "--stop"),
    (["replay", "no-such.edf"], "no-such.edf"),
    (["demo", "--duration", "0"], "--duration"),
    (["demo", "--duration", "-1"], "--duration"),
    (["demo", "--duration", "nan"], "--duration"),
    (["demo", "--eeg-rate", "0"], "--eeg-rate"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--protocol", "nope"], "--protocol"),
    (["simulate", "--eeg-rate", "0"], "--eeg-rate"),
    (["simulate", "--chunk-ms", "0"], "--chunk-ms"),
    (["simulate", "--duration", "-1"], "--duration"),
    (["ctl", "status", "--port", "0"], "--port"),
    (["ctl", "status", "--port", "65536"], "--port"),
    (["ctl", "status", "--timeout", "-1"], "--timeout"),
    (["offline", "{npz}", "--chunk-ms", "0"], "--chunk-ms"),
    (["offline", "{npz}"], "phase.reference"),  # the default montage is not in the file
    (["offline", "{npz}", "--set", 'phase.reference=["Cz"]', "--decisions",
      "/no-such-dir/d.jsonl"], "/no-such-dir/d.jsonl"),
    (["offline", "{npz}", "--set", 'phase.reference=["Cz"]', "--delay-ms", "500"],
     "--delay-ms"),
    (["evaluate-phase", "{npz}", "--train-s", "0"], "--train-s"),
    (["calibrate", "-c", "configs/demo.toml", "--seconds", "0"], "--seconds"),
    (["stimulator", "check", "--driver", "simulated", "--intensity", "101"], "--intensity"),
    (["check-config"], "--config"),
    (["check-config", "configs/demo.toml", "--config", "configs/demo.toml"], "--config"),
    (["streams", "--wait", "0"], "--wait"),
]


@pytest.mark.parametrize(("argv", "named"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_gets_one_line_and_no_traceback(argv: list[str], named: str, edf: Path,
                                                   recording: Path) -> None:
    argv = [a.replace("{edf}", str(edf)).replace("{npz}", str(recording)) for a in argv]
    proc = _cli(*argv)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("closedloop"), lines[0]
    assert named in lines[0], lines[0]


def test_the_lab_config_runs_on_the_simulated_stimulator(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A lab copies configs/lab-c3-mu.toml and rehearses with no stimulator first."""
    assert main(["check-config", "-c", str(LAB), "--set", "stimulator.driver=simulated"]) == 0
    assert capsys.readouterr().out.strip() == f"{LAB}: OK"


@pytest.mark.lsl
def test_streams_lists_what_lsl_sees() -> None:
    name = unique("streams")
    info = pylsl.StreamInfo(name, "EEG", 3, 500.0, pylsl.cf_float32, f"{name}-sid")
    chans = info.desc().append_child("channels")
    for label in ("C3", "Cz", "C4"):
        chans.append_child("channel").append_child_value("label", label)
    bare = pylsl.StreamInfo(f"{name}-markers", "Markers", 1, pylsl.IRREGULAR_RATE,
                            pylsl.cf_string, f"{name}-msid")
    outlets = [pylsl.StreamOutlet(info), pylsl.StreamOutlet(bare)]
    try:
        listed = _cli("streams", "--wait", "2", "--json")
        shown = _cli("streams", "--wait", "2")
    finally:
        del outlets  # pylsl closes an outlet only when it is destroyed
    assert listed.returncode == 0, listed.stderr
    found = {s["name"]: s for s in json.loads(listed.stdout)}
    eeg, markers = found[name], found[f"{name}-markers"]
    assert eeg == {"name": name, "type": "EEG", "source_id": f"{name}-sid",
                   "hostname": eeg["hostname"], "channel_count": 3, "nominal_srate": 500.0,
                   "channel_format": "float32", "labels": ["C3", "Cz", "C4"]}
    assert eeg["hostname"]
    assert markers["channel_count"] == 1
    assert markers["nominal_srate"] == 0.0
    assert markers["channel_format"] == "string"
    assert markers["labels"] == []
    assert shown.returncode == 0, shown.stderr
    block = shown.stdout.split(name + "\n", 1)[1]
    assert "EEG" in block and "3 channels" in block and "500 Hz" in block
    assert "C3 Cz C4" in block
    assert "irregular" in shown.stdout


@pytest.mark.lsl
def test_streams_says_when_it_sees_none_of_a_name() -> None:
    proc = _cli("streams", "--wait", "0.5", "--name", unique("absent"))
    assert proc.returncode == 1
    assert "no LSL stream" in proc.stderr
    assert "Traceback" not in proc.stderr
