"""The command line's arguments: every subcommand's options, and the types that check them.

A value out of range (a negative duration, a chunk of 0 ms, port 70000) is refused while
the arguments are parsed, before anything opens a file, a stream or a serial port, with
one line that names the option: ``closedloop demo: error: argument --duration: must be
> 0, got -1 (see closedloop demo --help)``. Every option's help says its default, in
words where the default is "none"; ``tests/test_cli_args.py`` walks this tree and fails
on an option that does not.

Choices come from the registries they name (the protocols, the stimulator drivers, the
service's montage), so that the help cannot fall behind them.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar, overload

from closedloop import __version__
from closedloop.config.schema import MqttConfig, PhaseConfig, StimulatorConfig

__all__ = ["build_parser", "finite_float", "help_text", "non_negative_float", "non_negative_int",
           "percent", "port_number", "positive_float", "positive_int"]


T = TypeVar("T", int, float)

def finite_float(text: str) -> float:
    """Any finite number (angles)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _checked(parse: Callable[[str], T], ok: Callable[[T], bool], must: str, name: str,
             doc: str) -> Callable[[str], T]:
    """An argument type: ``parse``, then refused unless ``ok`` (``must`` says what it
    must be, in the error)."""
    def check(text: str) -> T:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value

    check.__name__ = check.__qualname__ = name
    check.__doc__ = doc
    return check


positive_float = _checked(finite_float, lambda v: v > 0, "> 0", "positive_float",
                          "A finite number > 0 (durations, rates, chunk lengths).")
non_negative_float = _checked(finite_float, lambda v: v >= 0, ">= 0", "non_negative_float",
                              "A finite number >= 0 (start times, delays, amplitudes).")
positive_int = _checked(_integer, lambda v: v >= 1, ">= 1", "positive_int",
                        "A whole number >= 1 (counts).")
non_negative_int = _checked(_integer, lambda v: v >= 0, ">= 0", "non_negative_int",
                            "A whole number >= 0 (random seeds: numpy takes no negative one).")
percent = _checked(finite_float, lambda v: 0 <= v <= 100, "0-100 (% of the maximum output)",
                   "percent", "A stimulator output, 0-100 % of its maximum.")
port_number = _checked(_integer, lambda v: 1 <= v <= 65535, "1-65535", "port_number",
                       "A TCP port, 1-65535.")


class _RegistryNames(Sequence[str]):
    """The names of a registry, read when first needed (help, or checking a value).

    The protocol registry imports the MEP protocols and with them scipy.optimize, about
    0.8 s that every other command (``ctl status``, ``--help``) would pay at start-up if
    the parser read it while being built.
    """

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self._names: tuple[str, ...] | None = None

    def _all(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()


def _protocol_names() -> Sequence[str]:
    from closedloop.control.protocols import PROTOCOLS  # noqa: PLC0415 - imports scipy

    return PROTOCOLS


def _shown(value: Any) -> str:
    """A default as a user would type it: 60, not 60.0; lists space-separated."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return " ".join(_shown(v) for v in value)
    return str(value)


def help_text(action: argparse.Action) -> str:
    """An option's help as printed, its default appended unless the help says it.

    A default of None, False or an empty list is not shown: such an option's help says in
    words what happens without it (``(default: a temporary file)``).
    """
    text = (action.help or "") % {**vars(action), "prog": "", "choices": ", ".join(
        map(str, action.choices or ())), "default": _shown(action.default)}
    default = action.default
    if (default is None or default is False or default is argparse.SUPPRESS or default == []
            or "default" in text or isinstance(action, argparse._AppendAction)):
        return text
    return f"{text} (default: {_shown(action.default)})"


class _Formatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        return help_text(action).replace("%", "%%")

    def _split_lines(self, text: str, width: int) -> list[str]:
        # names such as io-curve and phase-map-random stay whole
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """Errors on one line, pointing at the help (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(sub: Any, name: str, summary: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=summary[:1].upper() + summary[1:] + ".",
        formatter_class=_Formatter)
    return parser


def _add_config(p: argparse.ArgumentParser, *, required: bool,
                what: str = "TOML configuration file", without: str = "the built-in defaults",
                example: str = "trigger.target_phase_deg=180") -> None:
    """``--config/-c`` and ``--set``, the same on every command that reads a config."""
    p.add_argument("--config", "-c", required=required, metavar="FILE",
                   help=what + ("" if required else f" (default: {without})"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a configuration key, e.g. --set {example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The ``closedloop`` parser, every subcommand included."""
    ap = _Parser(prog="closedloop", formatter_class=_Formatter, description=(
        "Brain-state-dependent TMS: phase-locked pulses from EEG over Lab Streaming Layer."))
    ap.add_argument("--version", action="version", version=f"closedloop {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_service_commands(sub)
    _add_stream_commands(sub)
    _add_control_commands(sub)
    _add_analysis_commands(sub)
    _add_config_commands(sub)
    return ap


def _add_service_commands(sub: Any) -> None:
    p = _command(sub, "run", "run the service until SIGINT/SIGTERM (SIGHUP reloads)")
    _add_config(p, required=True)
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="logs on stdout as text lines or JSON objects")

    p = _command(sub, "demo", "simulator + service + simulated stimulator, then a summary")
    p.add_argument("--duration", type=positive_float, default=60.0, metavar="SECONDS",
                   help="how long the demo runs, seconds")
    p.add_argument("--eeg-rate", type=positive_float, default=5000.0, metavar="HZ",
                   help="simulated EEG rate, Hz")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="simulator seed (default: a new random one each run)")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="event log path (default: a temporary file)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--protocol", default=None, metavar="NAME",
                   choices=_RegistryNames(_protocol_names),
                   help="run a protocol: %(choices)s (default: none, phase-triggered single "
                   "pulses until the end)")
    p.add_argument("--mqtt", action="store_true", help="also run the MQTT control plane, "
                   "driven by a scripted operator (uses a local broker, or starts one)")
    p.add_argument("--report", default=None, metavar="DIR", help="record the session (XDF) "
                   "and write its HTML report into DIR (default: no recording, no report)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a service setting, e.g. --set trigger.target_phase_deg=180 "
                   "(repeatable)")

    p = _command(sub, "calibrate", "find the peak, SNR and best phase estimator from "
                 "resting EEG (live or a file) and write them into a config")
    _add_config(p, required=True)
    p.add_argument("--seconds", type=positive_float, default=120.0,
                   help="live recording length, seconds")
    p.add_argument("--file", default=None, help="use a recording (EDF/BDF/npz) instead "
                   "(default: record the configured live stream)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the calibrated config "
                   "here (default: print the result only)")

    p = _command(sub, "stimulator", "bench-test a stimulator: 'stimulator check'")
    ssub = p.add_subparsers(dest="stim_command", required=True, metavar="check")
    c = _command(ssub, "check", "connect, print status, optionally set intensity, arm, "
                 "fire once and disarm; print a JSON report")
    drivers = typing.get_args(typing.get_type_hints(StimulatorConfig)["driver"])
    c.add_argument("--driver", required=True, choices=drivers, help="the device: %(choices)s")
    c.add_argument("--port", default="", help="serial port of the device (default: none; "
                   "every driver but simulated needs one)")
    c.add_argument("--intensity", type=percent, default=None, metavar="PCT",
                   help="set this output, %% of the maximum (default: leave it as it is)")
    c.add_argument("--fire", action="store_true", help="arm, fire one pulse, disarm")
    _add_config(c, required=False, what="take the other settings (safety limits, ttl line, "
                "unlock code...) from this TOML file", example="stimulator.ttl_line=rts")


def _add_stream_commands(sub: Any) -> None:
    p = _command(sub, "streams", "list the LSL streams this machine sees: name, type, "
                 "rate, channels and their labels")
    p.add_argument("--wait", type=positive_float, default=2.0, metavar="SECONDS",
                   help="how long to look for streams")
    p.add_argument("--name", default=None, help="only the streams of this name "
                   "(default: every stream)")
    p.add_argument("--type", default=None, help="only the streams of this type, e.g. EEG "
                   "(default: every type)")
    p.add_argument("--json", action="store_true", help="print a JSON list, for scripts")

    p = _command(sub, "simulate", "publish simulated EEG and EMG over LSL")
    p.add_argument("--prefix", default="closedloop-sim", help="stream name prefix")
    p.add_argument("--eeg-rate", type=positive_float, default=5000.0, metavar="HZ",
                   help="EEG sampling rate, Hz")
    p.add_argument("--emg-rate", type=positive_float, default=5000.0, metavar="HZ",
                   help="EMG sampling rate, Hz")
    p.add_argument("--chunk-ms", type=positive_float, default=2.0, metavar="MS",
                   help="chunk length, ms, like an amplifier's")
    p.add_argument("--coil-stream", default="closedloop-sim-coil",
                   help="stream of the simulated stimulator to listen to")
    p.add_argument("--mu-freq", type=positive_float, default=10.0, metavar="HZ",
                   help="mu frequency, Hz")
    p.add_argument("--mu-amplitude", type=non_negative_float, default=20.0, metavar="UV",
                   help="mu amplitude, µV")
    p.add_argument("--s50", type=percent, default=50.0, metavar="PCT",
                   help="intensity of the half-maximal MEP, %% of the maximum output")
    p.add_argument("--best-phase-deg", type=finite_float, default=180.0, metavar="DEG",
                   help="mu phase of the largest MEPs, degrees")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="random seed (default: a new random one each run)")
    p.add_argument("--duration", type=positive_float, default=None, metavar="SECONDS",
                   help="seconds (default: until Ctrl-C or SIGTERM)")

    p = _command(sub, "replay", "play an EDF/BDF/XDF recording over LSL in real time")
    p.add_argument("file", help="EDF, BDF or XDF file")
    edf = "EDF/BDF: "
    p.add_argument("--name", default=None,
                   help=f"{edf}LSL stream name (default: the file's stem; XDF streams keep "
                   "their own)")
    p.add_argument("--type", default="EEG", help=f"{edf}LSL stream type")
    p.add_argument("--chunk-ms", type=positive_float, default=10.0, metavar="MS",
                   help="chunk length, ms, like an amplifier's")
    p.add_argument("--start", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help=f"{edf}start at this second of the recording")
    p.add_argument("--duration", type=positive_float, default=None, metavar="SECONDS",
                   help=f"{edf}play this many seconds (default: to the end)")
    p.add_argument("--stop", type=positive_float, default=None, metavar="SECONDS",
                   help=f"{edf}stop at this second of the recording (default: the end)")
    p.add_argument("--loop", action="store_true", help=f"{edf}start again at the end")
    p.add_argument("--streams", nargs="+", default=None, metavar="NAME",
                   help="XDF: replay only these streams (default: every stream)")
    p.add_argument("--progress", action="store_true", help=f"{edf}show progress on stderr")
    p.add_argument("--speed", type=positive_float, default=1.0, help="push N times faster, "
                   "keeping the recording's time base (for recorders and offline consumers; "
                   "the closed-loop service needs 1)")


def _add_control_commands(sub: Any) -> None:
    mqtt = MqttConfig()
    p = _command(sub, "ctl", "send a command over MQTT and print the reply; or 'watch'")
    p.add_argument("verb", help="arm, disarm, start, stop, set, calibrate, status, reload, "
                                "or watch")
    p.add_argument("args", nargs="*", metavar="KEY=VALUE", help="command fields, e.g. "
                   "target_phase_deg=180, values read as TOML (default: none)")
    _add_config(p, required=False, what="TOML file with the [mqtt] section",
                without="the built-in [mqtt] settings", example="mqtt.instance=rig1")
    p.add_argument("--host", default=None, help="broker host (default: the config's "
                   f"mqtt.host, {mqtt.host} unless set)")
    p.add_argument("--port", type=port_number, default=None,
                   help=f"broker port (default: the config's mqtt.port, {mqtt.port} unless set)")
    p.add_argument("--instance", default=None, help="the service to talk to (default: the "
                   f"config's mqtt.instance, {mqtt.instance!r} unless set)")
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="seconds to wait for the reply")
    p.add_argument("--count", type=positive_int, default=None, metavar="N",
                   help="watch: stop after N messages (default: until Ctrl-C)")

    p = _command(sub, "status", "print the health summary of a running service")
    _add_config(p, required=False, what="the service's TOML config (it says where the status "
                "file is)", example="recording.events=sessions/rig1.jsonl")
    p.add_argument("--file", default=None, help="the status file itself (default: the one "
                   "beside the config's recording.events)")


def _add_analysis_commands(sub: Any) -> None:
    montage = PhaseConfig()
    p = _command(sub, "evaluate-phase", "score the phase estimators on a recording against "
                 "the Zrenner 2020 ground truth")
    p.add_argument("file", help="EDF, BDF, or .npz (data, labels, fs)")
    p.add_argument("--channel", default=montage.channel,
                   help="target channel, as the service's phase.channel")
    p.add_argument("--reference", nargs="*", default=list(montage.reference), metavar="LABEL",
                   help="Hjorth reference channels, subtracted as their mean (default: "
                   f"{' '.join(montage.reference)}, the service's phase.reference; "
                   "--reference alone: the raw channel)")
    p.add_argument("--estimators", nargs="+", default=None, metavar="NAME",
                   help="estimators to score (default: every one)")
    p.add_argument("--train-s", type=positive_float, default=60.0, metavar="SECONDS",
                   help="seconds that train ETP and wiener and give the peak; scored after")
    p.add_argument("--rhythm", choices=["alpha", "beta", "theta"], default="alpha",
                   help="where the individual peak is looked for")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="write the report here (default: not written)")
    p.add_argument("--png", dest="png_out", default=None, metavar="FILE",
                   help="polar histogram PNG (default: not drawn)")

    p = _command(sub, "offline", "run the decision pipeline over a recording without LSL, "
                 "as fast as the CPU allows; print decisions summary (JSON)")
    _add_config(p, required=False)
    p.add_argument("file", help="EDF/BDF, XDF (EEG and, when present, EMG) or .npz")
    p.add_argument("--chunk-ms", type=positive_float, default=10.0, metavar="MS",
                   help="the amplifier's chunk length, ms")
    p.add_argument("--delay-ms", type=non_negative_float, default=1.0, metavar="MS",
                   help="modelled processing delay: decisions are taken at the newest "
                   "sample + this, ms")
    p.add_argument("--decisions", default=None, metavar="FILE", help="write every decision "
                   "and pulse here, JSONL (default: not written)")

    p = _command(sub, "report", "write a session's HTML report (figures as PNGs too)")
    p.add_argument("events", help="the session's event log (recording.events)")
    p.add_argument("--xdf", default=None, help="the session recording (recording.xdf): "
                   "gives the true phase of every pulse (default: none, no true phase)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: beside the log)")


def _add_config_commands(sub: Any) -> None:
    p = _command(sub, "check-config", "validate a configuration file and exit")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", "-c", default=None, metavar="FILE",
                       help="TOML configuration file (default: none; this or FILE is needed)")
    which.add_argument("file", nargs="?", default=None, metavar="FILE",
                       help="the same as --config FILE, kept for older scripts (default: none, "
                       "use --config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set stimulator.driver=simulated "
                   "(repeatable)")
    p.add_argument("--print", action="store_true", help="print the effective configuration")

    p = _command(sub, "config-reference", "print the configuration reference, generated from "
                 "the schema: markdown, or a JSON Schema")
    p.add_argument("--format", default="markdown",
                   choices=("markdown", "json", "set-json", "refusals"),
                   help="markdown: the reference table (docs/configuration.md); json: JSON "
                   "Schema of a configuration; set-json: JSON Schema of the MQTT set payload; "
                   "refusals: every refusal reason (docs/refusals.md)")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write it here (default: standard output)")
