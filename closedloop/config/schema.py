"""Typed configuration of closedloop: one frozen dataclass per TOML table.

This module is the single source of what a setting is: every field carries a
:class:`FieldDoc` (its help text, its numeric bounds and whether it may change while the
service runs) in ``metadata["doc"]``. The loader (:mod:`closedloop.config.load`) validates
values against the bounds and names the bad key; the live-settable keys of MQTT ``set``
and SIGHUP reload (:data:`closedloop.control.runtime.LIVE_KEYS`) are those marked
``live``; and the configuration reference and its JSON Schemas
(:mod:`closedloop.config.reference`, ``closedloop config-reference``) are generated from
the same fields.

Rules that involve more than one key are kept with their section too: each top-level
section (a :class:`Section`) lists its :class:`Rule` objects in ``rules``, methods of the
section whose docstrings say the rule in words (the reference prints them under the
section). A rule that reads keys of other sections lives with the section whose key its
refusal names (``stimulator.intensity_pct`` at most ``safety.max_intensity_pct`` is a
rule of ``[stimulator]``). The loader checks them, section by section in the schema's
order, after every value passed its own type and bounds
(:func:`closedloop.config.load.check_cross_fields`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin, get_type_hints

__all__ = [
    "HARD_MAX_BURST_INTENSITY_MT",
    "HARD_MAX_COIL_TEMP_C",
    "HARD_MAX_INTENSITY_PCT",
    "HARD_MAX_PULSES_PER_DAY",
    "HARD_MAX_PULSES_PER_S",
    "HARD_MAX_PULSES_PER_SESSION",
    "HARD_MAX_TRAIN_DURATION_FACTOR",
    "HARD_MIN_INTERVAL_S",
    "HARD_MIN_INTER_TRAIN_S",
    "HARD_MIN_TRAIN_IPI_S",
    "HARD_RTMS_GAP_S",
    "MULTI_PULSE_PATTERNS",
    "PAIRED_DRIVERS",
    "TRAIN_DRIVERS",
    "AcquisitionConfig",
    "Config",
    "FieldDoc",
    "MepConfig",
    "MqttConfig",
    "PhaseConfig",
    "RecordingConfig",
    "Rule",
    "SafetyConfig",
    "Section",
    "SessionConfig",
    "StimulationConfig",
    "StimulatorConfig",
    "StreamSelector",
    "StreamsConfig",
    "TlsConfig",
    "TriggerConfig",
    "Violation",
    "field_doc",
    "live_keys",
    "rule",
    "tables_in",
]

# Hard caps in code: no configuration file or command can go beyond these. They are
# deliberately generous (they bound what any protocol may ask for); the per-session
# limits in [safety] are the ones a lab tunes. The 50 ms floor admits 20 Hz rTMS at most
# between single pulses, the upper end of the frequencies tabulated in Rossi et al. 2009.
HARD_MAX_INTENSITY_PCT = 100.0
HARD_MIN_INTERVAL_S = 0.05
HARD_MAX_PULSES_PER_SESSION = 10_000
# Trains and bursts (see closedloop.stim.safety for the rules and their sources).
HARD_MAX_PULSES_PER_DAY = 20_000
HARD_MIN_INTER_TRAIN_S = 1.0
HARD_MIN_TRAIN_IPI_S = 0.01  # 100 Hz, the fastest burst in use (Zrenner et al. 2018)
HARD_MAX_BURST_INTENSITY_MT = 100.0  # % of resting motor threshold, for > 25 Hz bursts
HARD_MAX_TRAIN_DURATION_FACTOR = 1.0  # x the Rossi et al. 2009 table, never more
HARD_MAX_COIL_TEMP_C = 45.0
# Triggers closer than this are repetitive TMS (rTMS): they need the motor threshold and
# obey the train rules; a pause after rTMS must be strictly longer (Chen et al. 1997).
HARD_RTMS_GAP_S = 1.0
# No configuration raises this: pulses in any 1-s window (25 Hz, the table's fastest row;
# theta-burst gives 15).
HARD_MAX_PULSES_PER_S = 25

# Drivers that can give a paired pulse from one trigger, and those that can fire trains
# (a Magstim 200² or BiStim² recharges for seconds after a pulse).
PAIRED_DRIVERS = ("simulated", "magstim-bistim", "magventure")
TRAIN_DRIVERS = ("simulated", "ttl", "magstim-rapid", "magventure")
# Patterns of several pulses per trigger: they need TRAIN_DRIVERS and the motor threshold.
MULTI_PULSE_PATTERNS = ("burst", "train", "itbs", "ctbs")


@dataclass(frozen=True, slots=True)
class FieldDoc:
    """What a setting means and which values it takes.

    Attributes:
        help: One line for the reference and for error messages' readers.
        lo: Smallest allowed value of a number (None = no bound).
        hi: Largest allowed value of a number (None = no bound).
        lo_open: ``lo`` itself is not allowed (a value must be strictly above it).
        live: The setting may change while the service runs (MQTT ``set``, SIGHUP
            reload); only keys of a top-level section can be, under their field name.
    """

    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    live: bool = False


def opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, live: bool = False) -> Any:
    """A dataclass field with its :class:`FieldDoc`."""
    doc = FieldDoc(help=help, lo=lo, hi=hi, lo_open=lo_open, live=live)
    return field(default=default, metadata={"doc": doc})


def field_doc(f: dataclasses.Field[Any]) -> FieldDoc:
    """The :class:`FieldDoc` of a configuration field."""
    doc = f.metadata["doc"]
    assert isinstance(doc, FieldDoc)
    return doc


def tables_in(tp: Any) -> tuple[type, ...]:
    """The config classes a field's annotation holds: itself, in ``X | None``, in tuples."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return (tp,)
    if get_origin(tp) in (typing.Union, types.UnionType, tuple):
        return tuple(t for arg in get_args(tp) for t in tables_in(arg))
    return ()


S = TypeVar("S")
Violation = tuple[str, str]  # (dotted key, problem): what a ConfigError names


@dataclass(frozen=True, slots=True)
class Rule(Generic[S]):
    """A rule across keys, kept with the section (of type ``S``) whose key it names.

    Attributes:
        name: The method that checks it, e.g. ``PhaseConfig._band_ordered``.
        keys: The dotted keys its refusals name (``[]`` stands for any index of a list
            of tables); each is written in ``text``.
        text: The rule in words, for the reference: the method's docstring.
        check: ``check(section, cfg)``: the violations of the rule in ``cfg`` (whose
            ``section`` is one of its tables), each a (key, problem) pair; none when it
            holds. It may assume every value passed its own type and bounds.
    """

    name: str
    keys: tuple[str, ...]
    text: str
    check: Callable[[S, Config], Iterator[Violation]]


def rule(check: Callable[[S, Config], Iterator[Violation]], *keys: str) -> Rule[S]:
    """The :class:`Rule` checked by method ``check``, naming ``keys``; its docstring is the
    text (one paragraph; RST literals)."""
    text = " ".join((check.__doc__ or "").split())
    if not text or not keys:
        raise TypeError(f"{check.__qualname__}: a rule needs a docstring and its keys")
    return Rule(name=check.__qualname__, keys=keys, text=text, check=check)


class Section:
    """A top-level table of the configuration (``[phase]``, ``[mqtt]``, ...).

    ``rules``: its rules across keys (see :class:`Rule`), checked in this order.
    """

    rules: ClassVar[tuple[Rule[Any], ...]] = ()


@dataclass(frozen=True, kw_only=True)
class StreamSelector:
    """Which LSL stream to use. At least one of name, type, source_id."""

    name: str | None = opt(None, "LSL stream name")
    type: str | None = opt(None, "LSL stream type (e.g. EEG)")
    source_id: str | None = opt(None, "LSL source_id of the amplifier")
    time_offset_ms: float = opt(
        0.0, "known delay of the amplifier and transport: the true acquisition time of a "
        "sample is its LSL timestamp minus this", lo=0.0, hi=1000.0)
    dejitter: bool = opt(True, "smooth timestamps of regular streams (LSL proc_dejitter)")

    def predicate(self) -> str:
        """The LSL XPath predicate selecting this stream."""
        parts = []
        for key in ("name", "type", "source_id"):
            value = getattr(self, key)
            if value is not None:
                escaped = value.replace("'", "")
                parts.append(f"{key}='{escaped}'")
        return " and ".join(parts)


@dataclass(frozen=True, kw_only=True)
class StreamsConfig(Section):
    """The input streams."""

    eeg: StreamSelector = opt(StreamSelector(name="EEG"), "the EEG stream (required)")
    emg: StreamSelector | None = opt(None, "the EMG stream (optional; without it no MEPs)")
    pulses: StreamSelector | None = opt(
        None, "marker stream of pulses fired by another system (optional)")

    def _selected(self, cfg: Config) -> Iterator[Violation]:
        """Each stream that is given (``streams.eeg``, ``streams.emg``, ``streams.pulses``)
        is selected by at least one of ``name``, ``type``, ``source_id``."""
        for role in ("eeg", "emg", "pulses"):
            sel = getattr(self, role)
            if sel is not None and not (sel.name or sel.type or sel.source_id):
                yield f"streams.{role}", "give at least one of name, type, source_id"

    rules = (rule(_selected, "streams.eeg", "streams.emg", "streams.pulses"),)


@dataclass(frozen=True, kw_only=True)
class AcquisitionConfig(Section):
    """How streams are read and watched."""

    resolve_timeout_s: float = opt(10.0, "how long to look for each stream at start",
                                   lo=0.1, hi=600.0)
    lost_after_ms: float = opt(100.0, "a stream with no new sample for this long is lost",
                               lo=5.0, hi=10_000.0)
    buffer_s: float = opt(10.0, "length of the ring buffer of each stream", lo=1.0, hi=600.0)


BandSpec = tuple[float, float] | Literal["auto"]


@dataclass(frozen=True, kw_only=True)
class PhaseConfig(Section):
    """Spatial filter, band and the phase estimator."""

    channel: str = opt("C3", "EEG channel label whose phase is targeted")
    reference: tuple[str, ...] = opt(("FC1", "FC5", "CP1", "CP5"),
                               "Hjorth/Laplacian: channel minus the mean of these; [] = none")
    band_hz: BandSpec = opt((8.0, 13.0), "pass band [low, high] in Hz, or \"auto\": "
                            "individual peak ± 2 Hz found during calibration_s", live=True)
    rhythm: Literal["alpha", "beta", "theta"] = opt(
        "alpha", "band_hz = \"auto\": where the individual peak is looked for: alpha/mu "
        "7-14 Hz (band: peak ± 2 Hz), beta 13-30 Hz (± 3 Hz), theta 4-8 Hz (± 1.5 Hz)")
    calibration_s: float = opt(30.0, "seconds of data used to find the peak when band_hz is "
                               "\"auto\", and to train the \"wiener\" and \"etp\" "
                               "estimators", lo=5.0, hi=600.0)
    estimator: Literal["ar", "echt", "etp", "resonator", "wiener"] = opt(
        "wiener", "phase estimator: \"ar\" (AR forward prediction, Zrenner et al. 2018), "
        "\"echt\" (endpoint-corrected Hilbert transform, Schreglmann et al. 2021), "
        "\"etp\" (educated temporal prediction, Shirinpour et al. 2020: trained on the "
        "first calibration_s, AR until then; uses window_ms and edge_ms), \"resonator\" "
        "(a complex resonator at the band's centre, per sample) or "
        "\"wiener\" (a causal filter trained on the person's first calibration_s of EEG "
        "to output the offline ground truth; AR until it is trained; reports the error it "
        "expects for each estimate)")
    wiener_file: str | None = opt(None, "wiener: a trained filter written by `closedloop "
                                  "calibrate` (.npz); none = train on the first "
                                  "calibration_s of the session")
    wiener_taps_ms: float = opt(500.0, "wiener: length of the trained filter", lo=100.0,
                                hi=2000.0)
    echt_window_ms: float = opt(1000.0, "ecHT: analysis window", lo=200.0, hi=4000.0)
    resonator_bandwidth_hz: float = opt(4.0, "resonator: its -3 dB bandwidth (at most the "
                                        "band's width)", lo=0.5, hi=20.0)
    resonator_retune_s: float = opt(10.0, "resonator: move its centre half way to the "
                                    "individual peak of the last 60 s this often; 0 = "
                                    "fixed on the peak found at calibration", lo=0.0,
                                    hi=3600.0)
    processing_rate_hz: float = opt(500.0, "EEG is low-passed and decimated to about this "
                                    "rate before phase estimation", lo=100.0, hi=5000.0)
    update_interval_ms: float = opt(2.0, "run the estimator at most this often",
                                    lo=0.0, hi=100.0)
    deterministic: bool = opt(False, "estimate at every multiple of update_interval_ms of "
                              "the data's own time and decide as if at that time + "
                              "decision_delay_ms: the same samples then give the same "
                              "decisions however they arrived (live = offline = replay); "
                              "use with update_interval_ms of about the amplifier's chunk")
    decision_delay_ms: float = opt(1.0, "deterministic: the processing delay decisions "
                                   "assume (a pulse that cannot make it is refused as late)",
                                   lo=0.0, hi=50.0)
    window_ms: float = opt(500.0, "AR and ETP: length of the analysis window", lo=200.0,
                           hi=4000.0)
    fir_ms: float = opt(128.0, "AR: length of the zero-phase FIR band-pass", lo=20.0,
                        hi=1000.0)
    edge_ms: float = opt(64.0, "AR and ETP: filtered samples dropped at each window edge",
                         lo=0.0, hi=1000.0)
    ar_order: int = opt(20, "AR: model order", lo=2, hi=100)
    hilbert_window_ms: float = opt(128.0, "AR: Hilbert transform window around now",
                                   lo=20.0, hi=1000.0)

    def _band_ordered(self, cfg: Config) -> Iterator[Violation]:
        """A fixed ``phase.band_hz`` has a low edge of at least 0.5 Hz, below its high
        edge."""
        band = self.band_hz
        if band != "auto" and not 0.5 <= band[0] < band[1]:
            yield "phase.band_hz", f"expected 0.5 <= low < high, got [{band[0]:g}, {band[1]:g}]"

    def _band_below_nyquist(self, cfg: Config) -> Iterator[Violation]:
        """A fixed ``phase.band_hz`` has its high edge below ``phase.processing_rate_hz``
        / 2.5 (clear of the processing rate's Nyquist frequency)."""
        band = self.band_hz
        if band != "auto" and band[1] >= self.processing_rate_hz / 2.5:
            yield "phase.band_hz", (
                f"high edge {band[1]:g} Hz too close to the processing rate's Nyquist "
                f"frequency (phase.processing_rate_hz = {self.processing_rate_hz:g})")

    def _window_fits_edges(self, cfg: Config) -> Iterator[Violation]:
        """``phase.window_ms`` is longer than 2 * ``phase.edge_ms`` + ``phase.fir_ms`` /
        2."""
        if 2 * self.edge_ms + self.fir_ms / 2 >= self.window_ms:
            yield "phase.window_ms", ("too short for its edges: needs window_ms > 2 * "
                                      "edge_ms + fir_ms / 2")

    def _reference_without_target(self, cfg: Config) -> Iterator[Violation]:
        """``phase.reference`` does not contain the target channel ``phase.channel``."""
        if self.channel in self.reference:
            yield "phase.reference", f"must not contain the target channel {self.channel}"

    rules = (rule(_band_ordered, "phase.band_hz"), rule(_band_below_nyquist, "phase.band_hz"),
             rule(_window_fits_edges, "phase.window_ms"),
             rule(_reference_without_target, "phase.reference"))


@dataclass(frozen=True, kw_only=True)
class PowerCondition:
    """A band-power condition that must hold too (e.g. beta power with the mu phase)."""

    band_hz: tuple[float, float] = opt((13.0, 30.0), "band whose amplitude is checked")
    channel: str | None = opt(None, "EEG channel (none = phase.channel)")
    reference: tuple[str, ...] | None = opt(None, "Hjorth reference channels (none = "
                                            "phase.reference when the channel is "
                                            "phase.channel, else no reference)")
    percentile: float = opt(50.0, "running percentile of the band's amplitude over "
                            "trigger.amplitude_window_s", lo=0.0, hi=100.0)
    above: bool = opt(True, "true: fire only when the amplitude is above the percentile; "
                      "false: only when below it")


@dataclass(frozen=True, kw_only=True)
class TriggerConfig(Section):
    """When to fire."""

    target_phase_deg: float = opt(0.0, "0 = positive peak of the band-passed signal, ±180 = "
                                  "trough, -90 = rising flank, +90 = falling flank",
                                  lo=-180.0, hi=180.0, live=True)
    tolerance_deg: float = opt(10.0, "largest predicted phase error at which a pulse may still "
                               "fire", lo=0.0, hi=180.0, live=True)
    amplitude_percentile: float = opt(50.0, "fire only when band amplitude is above this "
                                      "running percentile (0 = no gate)", lo=0.0, hi=100.0,
                                      live=True)
    max_expected_error_deg: float = opt(20.0, "fire only when the estimator expects a "
                                        "phase error (circular SD) at most this large for "
                                        "the estimate (estimators that report one: "
                                        "\"wiener\"); 0 = no confidence gate",
                                        lo=0.0, hi=180.0, live=True)
    wait_for_training: bool = opt(True, "trained estimators (phase.estimator \"wiener\" "
                                  "without a wiener_file, \"etp\"): no pulse until the "
                                  "trained one takes over (refused as estimator_training; "
                                  "estimator_untrained if its training failed); false: fire "
                                  "on AR forward prediction meanwhile, without a confidence",
                                  live=True)
    amplitude_window_s: float = opt(30.0, "length of the running amplitude history",
                                    lo=1.0, hi=3600.0)
    min_interval_s: float = opt(2.0, "minimum time between pulses (also enforced by the "
                                "safety gate: safety.min_interval_s)", lo=HARD_MIN_INTERVAL_S,
                                hi=3600.0, live=True)
    jitter_s: float = opt(0.5, "random extra interval, uniform in [0, jitter_s]",
                          lo=0.0, hi=3600.0, live=True)
    scheduling_margin_ms: float = opt(1.0, "time kept free between a decision and the "
                                      "earliest pulse it schedules", lo=0.0, hi=100.0)
    max_lateness_ms: float = opt(1.0, "a pulse that would leave later than this after its "
                                 "scheduled time is refused", lo=0.05, hi=50.0)
    seed: int | None = opt(None, "seed of the interval jitter (None = random)")
    power_conditions: tuple[PowerCondition, ...] = opt(
        (), "more conditions that must all hold for a pulse: [[trigger.power_conditions]] "
        "tables with band_hz, channel, reference, percentile, above")

    def _condition_bands(self, cfg: Config) -> Iterator[Violation]:
        """Each ``trigger.power_conditions[].band_hz`` has 0 < low < high <
        ``phase.processing_rate_hz`` / 2.5."""
        limit = cfg.phase.processing_rate_hz / 2.5
        for k, cond in enumerate(self.power_conditions):
            lo, hi = cond.band_hz
            if not 0 < lo < hi or hi >= limit:
                yield f"trigger.power_conditions[{k}].band_hz", (
                    f"expected 0 < low < high < processing rate / 2.5 ({limit:g} Hz), got "
                    f"[{lo:g}, {hi:g}]")

    rules = (rule(_condition_bands, "trigger.power_conditions[].band_hz"),)


@dataclass(frozen=True, kw_only=True)
class StimulatorConfig(Section):
    """The stimulator and its driver."""

    driver: Literal["simulated", "ttl", "magstim-200", "magstim-bistim", "magstim-rapid",
                    "magventure"] = opt("simulated", "stimulator driver")
    port: str = opt("", "serial port of the device (ttl, magstim-*, magventure), e.g. "
                    "/dev/ttyUSB0")
    intensity_pct: float = opt(60.0, "stimulator output, % of maximum (with ttl: what is set "
                               "on the device by hand); at most safety.max_intensity_pct",
                               lo=0.0, hi=HARD_MAX_INTENSITY_PCT, live=True)
    arm_on_start: bool = opt(False, "arm as soon as the service is ready (otherwise it "
                             "decides but never fires)")
    settle_ms: float = opt(0.0, "wait after an intensity change before the next pulse",
                           lo=0.0, hi=10_000.0)
    latency_ms: float | None = opt(None, "delay from fire command to pulse; default: the "
                                   "driver's known latency (0 simulated and RTS/DTR, one "
                                   "byte's wire time for a trigger box, the fire command's "
                                   "wire time for serial firing). Measure it on the bench.",
                                   lo=0.0, hi=100.0)
    ttl_line: Literal["rts", "dtr", "byte", "parport"] = opt(
        "rts", "ttl: the trigger line (byte = a serial trigger box; parport = a parallel "
        "port's data lines, port = /dev/parportN)")
    ttl_pulse_width_ms: float = opt(1.0, "ttl: pulse width", lo=0.01, hi=100.0)
    ttl_code: int = opt(1, "ttl byte: the value written for a pulse", lo=1, hi=255)
    trigger_port: str = opt("", "magstim-*/magventure: fire through a TTL line on this "
                            "port (ttl_line, ttl_pulse_width_ms) instead of the serial fire "
                            "command, which lags by milliseconds")
    keepalive_ms: float = opt(500.0, "magstim: keep-alive period (the device disarms "
                              "after about 1 s of silence)", lo=50.0, hi=500.0)
    poll_ms: float = opt(1000.0, "magventure: status poll period (a device that stops "
                         "answering is a fault)", lo=100.0, hi=10_000.0)
    reply_timeout_ms: float = opt(300.0, "serial devices: longest wait for an answer",
                                  lo=20.0, hi=5000.0)
    unlock_code: str = opt("", "magstim-rapid: unlock code (software version 9 and later)")
    coil_stream: str = opt("closedloop-sim-coil", "simulated: LSL stream on which the "
                           "simulated coil announces each pulse (the simulator listens)")

    def _port_given(self, cfg: Config) -> Iterator[Violation]:
        """Every driver but ``simulated`` needs ``stimulator.port``, the device's serial
        port."""
        if self.driver != "simulated" and not self.port:
            yield "stimulator.port", f"driver {self.driver!r} needs the device's serial port"

    def _trigger_port_driver(self, cfg: Config) -> Iterator[Violation]:
        """``stimulator.trigger_port`` is only for the magstim-* and magventure drivers
        (only they fire through a separate TTL port)."""
        if self.trigger_port and not self.driver.startswith(("magstim", "magventure")):
            yield "stimulator.trigger_port", ("only magstim-* and magventure fire through a "
                                              "separate TTL port")

    def _intensity_within_limit(self, cfg: Config) -> Iterator[Violation]:
        """``stimulator.intensity_pct`` is at most ``safety.max_intensity_pct`` (a higher
        one is refused, not clamped)."""
        limit = cfg.safety.max_intensity_pct
        if self.intensity_pct > limit:
            yield "stimulator.intensity_pct", (
                f"{self.intensity_pct:g} is above safety.max_intensity_pct ({limit:g}); "
                "refused, not clamped")

    rules = (rule(_port_given, "stimulator.port"),
             rule(_trigger_port_driver, "stimulator.trigger_port"),
             rule(_intensity_within_limit, "stimulator.intensity_pct"))


@dataclass(frozen=True, kw_only=True)
class StimulationConfig(Section):
    """What one trigger delivers, and what triggers it."""

    pattern: Literal["single", "paired", "burst", "train", "itbs", "ctbs"] = opt(
        "single", "single pulse; paired (conditioning + test, SICI/ICF/LICI); burst (e.g. "
        "100 Hz triplets); train (rTMS); itbs / ctbs (3 pulses at 50 Hz every 200 ms; iTBS "
        "2 s on, 8 s off)")
    timing: Literal["phase", "open_loop"] = opt(
        "phase", "phase: each unit starts at the target phase; open_loop: every "
        "trigger.min_interval_s + jitter, whatever the phase")
    conditioning_pct: float = opt(40.0, "paired: conditioning intensity (the test pulse is "
                                  "stimulator.intensity_pct)", lo=0.0,
                                  hi=HARD_MAX_INTENSITY_PCT)
    isi_ms: float = opt(3.0, "paired: conditioning-to-test interval (SICI 2-3, ICF 10-15, "
                        "LICI 100)", lo=1.0, hi=999.0)
    burst_pulses: int = opt(3, "burst: pulses in a burst", lo=2, hi=5)
    burst_frequency_hz: float = opt(100.0, "burst: frequency within the burst", lo=1.0,
                                    hi=1.0 / HARD_MIN_TRAIN_IPI_S)
    train_frequency_hz: float = opt(10.0, "train: pulse frequency", lo=0.1, hi=25.0)
    train_pulses: int = opt(20, "train: pulses in a train", lo=2, hi=2000)
    tbs_pulses: int = opt(600, "itbs/ctbs: pulses in the session (multiple of 3)", lo=3,
                          hi=3000)
    units: int | None = opt(None, "stop after this many units (None: until stopped or a "
                            "safety limit)", lo=1, hi=HARD_MAX_PULSES_PER_SESSION)

    def _paired_driver(self, cfg: Config) -> Iterator[Violation]:
        """``stimulation.pattern = "paired"`` needs a driver that sets the pair from one
        trigger: simulated, magstim-bistim or magventure."""
        driver = cfg.stimulator.driver
        if self.pattern == "paired" and driver not in PAIRED_DRIVERS:
            yield "stimulation.pattern", (
                f"paired pulses need a driver that sets the pair "
                f"({', '.join(PAIRED_DRIVERS)}), not {driver!r}")

    def _conditioning_within_limit(self, cfg: Config) -> Iterator[Violation]:
        """With ``stimulation.pattern = "paired"``, ``stimulation.conditioning_pct`` is at
        most ``safety.max_intensity_pct``."""
        limit = cfg.safety.max_intensity_pct
        if self.pattern == "paired" and self.conditioning_pct > limit:
            yield "stimulation.conditioning_pct", f"above safety.max_intensity_pct ({limit:g})"

    def _train_driver(self, cfg: Config) -> Iterator[Violation]:
        """A ``stimulation.pattern`` of several pulses ("burst", "train", "itbs", "ctbs")
        needs a driver that fires trains: simulated, ttl, magstim-rapid or magventure (a
        Magstim 200² or BiStim² recharges for seconds after a pulse)."""
        driver = cfg.stimulator.driver
        if self.pattern in MULTI_PULSE_PATTERNS and driver not in TRAIN_DRIVERS:
            yield "stimulation.pattern", (
                f"{driver} recharges for seconds after a pulse: no {self.pattern} (use "
                f"{', '.join(TRAIN_DRIVERS)})")

    def _tbs_whole_bursts(self, cfg: Config) -> Iterator[Violation]:
        """``stimulation.tbs_pulses`` is a multiple of 30 with pattern "itbs" (whole 2-s
        trains of ten bursts) and of 3 with "ctbs" (whole bursts)."""
        if self.pattern in ("itbs", "ctbs"):
            step = 30 if self.pattern == "itbs" else 3
            if self.tbs_pulses % step:
                yield "stimulation.tbs_pulses", f"{self.pattern} needs a multiple of {step}"

    rules = (rule(_paired_driver, "stimulation.pattern"),
             rule(_conditioning_within_limit, "stimulation.conditioning_pct"),
             rule(_train_driver, "stimulation.pattern"),
             rule(_tbs_whole_bursts, "stimulation.tbs_pulses"))


@dataclass(frozen=True, kw_only=True)
class SafetyConfig(Section):
    """Limits of the safety gate; each is clamped by a hard cap in code."""

    min_interval_s: float = opt(1.0, "minimum inter-pulse interval", lo=HARD_MIN_INTERVAL_S,
                                hi=3600.0)
    max_intensity_pct: float = opt(80.0, "highest intensity ever fired", lo=0.0,
                                   hi=HARD_MAX_INTENSITY_PCT)
    max_pulses: int = opt(1000, "most pulses in one session", lo=0,
                          hi=HARD_MAX_PULSES_PER_SESSION)
    rate_window_s: float = opt(60.0, "sliding window of the rate limit", lo=1.0, hi=3600.0)
    max_pulses_per_window: int = opt(40, "most pulses in any rate window", lo=1,
                                     hi=HARD_MAX_PULSES_PER_SESSION)
    max_eeg_age_ms: float = opt(100.0, "refuse to fire when the newest EEG sample arrived "
                                "longer ago than this", lo=5.0, hi=10_000.0)
    max_pulses_per_day: int = opt(2000, "most pulses in one calendar day, over all sessions "
                                  "per participant (counted in day_counter_dir)", lo=0,
                                  hi=HARD_MAX_PULSES_PER_DAY)
    day_counter_dir: str = opt("", "folder where the pulses of each day are counted per "
                               "participant (session.participant), across sessions, restarts "
                               "and processes (\"\" = the lab-wide state folder: "
                               "$CLOSEDLOOP_STATE_DIR, else $XDG_STATE_HOME/closedloop, else "
                               "~/.local/state/closedloop)")
    motor_threshold_pct: float | None = opt(None, "resting motor threshold, % of maximum: "
                                            "needed for any train or burst (the limits are "
                                            "in % of it); without it only single and paired "
                                            "pulses fire", lo=1.0, hi=100.0)
    train_duration_factor: float = opt(0.75, "allowed train duration as a fraction of the "
                                       "Rossi et al. 2009 table (Chen et al. 1997 advise "
                                       "0.75)", lo=0.1, hi=HARD_MAX_TRAIN_DURATION_FACTOR)
    min_inter_train_s: float = opt(5.0, "minimum pause after a train or burst",
                                   lo=HARD_MIN_INTER_TRAIN_S, hi=3600.0)
    max_burst_intensity_mt: float = opt(100.0, "bursts faster than 25 Hz (TBS, triplets): "
                                        "highest intensity, % of motor threshold", lo=10.0,
                                        hi=HARD_MAX_BURST_INTENSITY_MT)
    max_coil_temp_c: float = opt(40.0, "refuse to fire when the device reports a hotter "
                                 "coil", lo=20.0, hi=HARD_MAX_COIL_TEMP_C)
    watchdog_ms: float = opt(500.0, "disarm when the service's event loop has not run for "
                             "this long (a stalled controller must not keep a pulse path "
                             "armed)", lo=50.0, hi=10_000.0)

    def _motor_threshold_for_trains(self, cfg: Config) -> Iterator[Violation]:
        """A ``stimulation.pattern`` of several pulses ("burst", "train", "itbs", "ctbs")
        needs ``safety.motor_threshold_pct``: the train and burst limits are in % of it."""
        pattern = cfg.stimulation.pattern
        if pattern in MULTI_PULSE_PATTERNS and self.motor_threshold_pct is None:
            yield "safety.motor_threshold_pct", (
                f"pattern {pattern!r} needs the resting motor threshold: the train and burst "
                "limits are in % of it")

    rules = (rule(_motor_threshold_for_trains, "safety.motor_threshold_pct"),)


@dataclass(frozen=True, kw_only=True)
class SessionConfig(Section):
    """Who is stimulated: the daily pulse count is kept per participant."""

    participant: str = opt("", "participant id (letters, digits, '-', '_', '.'; at most 64): "
                           "the pulses of each day are counted per participant across "
                           "sessions and processes (\"\" = one shared counter, "
                           "\"unspecified\")")

    def _participant_id(self, cfg: Config) -> Iterator[Violation]:
        """``session.participant`` is empty or at most 64 letters, digits, '-', '_' or '.',
        not starting with '.' (it names the participant's pulse counter file)."""
        pid = self.participant
        if pid and (len(pid) > 64 or not all(c.isascii() and (c.isalnum() or c in "-_.")
                                             for c in pid) or pid.startswith(".")):
            yield "session.participant", (
                f"{pid[:80]!r}: use at most 64 letters, digits, '-', '_' or '.' (not "
                "starting with '.'); it names the participant's pulse counter file")

    rules = (rule(_participant_id, "session.participant"),)


@dataclass(frozen=True, kw_only=True)
class MepConfig(Section):
    """Motor-evoked potentials from the EMG stream."""

    channels: tuple[str, ...] = opt(("FDI",), "EMG channel labels to measure")
    window_ms: tuple[float, float] = opt((15.0, 50.0), "response window after the pulse")
    background_ms: tuple[float, float] = opt((-100.0, -5.0), "background window before "
                                             "the pulse")
    preactivation_uv: float = opt(50.0, "reject when background peak-to-peak exceeds this",
                                  lo=0.0, hi=100_000.0)
    onset_sd: float = opt(5.0, "onset = first sample above background mean + this many SD",
                          lo=0.5, hi=100.0)
    no_response_uv: float = opt(50.0, "peak-to-peak below this is 'no response'",
                                lo=0.0, hi=100_000.0)
    blank_ms: tuple[float, float] | None = opt(None, "TMS artefact blanking: samples in this "
                                               "window around the pulse are interpolated "
                                               "(e.g. [-1, 6]); None = off")
    bandpass_hz: tuple[float, float] | None = opt(None, "zero-phase band-pass of each epoch "
                                                  "(e.g. [10, 1000]); None = off")
    notch_hz: float | None = opt(None, "line frequency (50 or 60) removed from each epoch "
                                 "by a sinusoid fit to the background; None = off", lo=0.0,
                                 lo_open=True)
    timeout_s: float = opt(2.0, "give up on an MEP if the EMG does not cover its window "
                           "within this time", lo=0.1, hi=60.0)

    def _windows_ordered(self, cfg: Config) -> Iterator[Violation]:
        """``mep.window_ms`` and ``mep.background_ms`` each start before they end."""
        for key, (a, b) in (("mep.window_ms", self.window_ms),
                            ("mep.background_ms", self.background_ms)):
            if not a < b:
                yield key, f"expected start < end, got [{a:g}, {b:g}]"

    def _window_after_pulse(self, cfg: Config) -> Iterator[Violation]:
        """``mep.window_ms`` starts at or after the pulse (>= 0)."""
        if self.window_ms[0] < 0:
            yield "mep.window_ms", "the response window must start after the pulse (>= 0)"

    def _background_before_pulse(self, cfg: Config) -> Iterator[Violation]:
        """``mep.background_ms`` ends at or before the pulse (<= 0)."""
        if self.background_ms[1] > 0:
            yield "mep.background_ms", ("the background window must end before the pulse "
                                        "(<= 0)")

    def _blanking_before_window(self, cfg: Config) -> Iterator[Violation]:
        """``mep.blank_ms``, when set, starts before it ends and ends before
        ``mep.window_ms`` starts (blanking must not erase the MEP)."""
        blank = self.blank_ms
        if blank is not None and not blank[0] < blank[1] < self.window_ms[0]:
            yield "mep.blank_ms", ("expected start < end < the response window's start "
                                   "(blanking must not erase the MEP)")

    def _bandpass_ordered(self, cfg: Config) -> Iterator[Violation]:
        """``mep.bandpass_hz``, when set, has 0 < low < high."""
        band = self.bandpass_hz
        if band is not None and not 0 < band[0] < band[1]:
            yield "mep.bandpass_hz", "expected 0 < low < high"

    def _channels_for_emg(self, cfg: Config) -> Iterator[Violation]:
        """``mep.channels`` names at least one channel when ``streams.emg`` is set."""
        if not self.channels and cfg.streams.emg is not None:
            yield "mep.channels", "streams.emg is set but no MEP channel is named"

    rules = (rule(_windows_ordered, "mep.window_ms", "mep.background_ms"),
             rule(_window_after_pulse, "mep.window_ms"),
             rule(_background_before_pulse, "mep.background_ms"),
             rule(_blanking_before_window, "mep.blank_ms"),
             rule(_bandpass_ordered, "mep.bandpass_hz"),
             rule(_channels_for_emg, "mep.channels"))


@dataclass(frozen=True, kw_only=True)
class RecordingConfig(Section):
    """What is written where."""

    events: str = opt("sessions/events.jsonl", "append-only JSONL event log")
    marker_stream: str = opt("closedloop-pulses", "LSL marker stream of fired pulses "
                             "(\"\" = none)")
    xdf: str = opt("", "session recording (raw EEG and EMG, every event) as XDF; \"\" = none")
    status_file: str = opt("", "health summary rewritten every second (\"\" = status.json "
                           "beside the event log)")

    def status_path(self) -> str:
        """Where the health summary is written."""
        import os  # noqa: PLC0415

        return self.status_file or os.path.join(os.path.dirname(self.events) or ".",
                                                "status.json")



@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """TLS towards the broker; enabled when ``ca`` is set."""

    ca: str | None = opt(None, "CA certificate file (PEM); setting it enables TLS")
    cert: str | None = opt(None, "client certificate file (PEM), for brokers that require one")
    key: str | None = opt(None, "client private key file (PEM)")


@dataclass(frozen=True, kw_only=True)
class MqttConfig(Section):
    """The MQTT control plane (topics under ``closedloop/<instance>/``)."""

    enabled: bool = opt(False, "connect to the broker and accept commands")
    host: str = opt("127.0.0.1", "broker host")
    port: int = opt(1883, "broker port", lo=1, hi=65535)
    instance: str = opt("default", "this service's name in the topic prefix")
    prefix: str | None = opt(None, "topic prefix (default \"closedloop/<instance>/\")")
    protocol: Literal["5", "3.1.1"] = opt("5", "MQTT protocol version")
    username: str | None = opt(None, "broker user name")
    password: str | None = opt(None, "broker password")
    tls: TlsConfig = opt(TlsConfig(), "TLS settings")
    keepalive_s: int = opt(10, "MQTT keep-alive", lo=2, hi=3600)
    metrics_interval_s: float = opt(5.0, "publish metrics this often", lo=0.1, hi=3600.0)
    status_interval_s: float = opt(5.0, "re-publish the retained status this often (and on "
                                   "every change)", lo=0.1, hi=3600.0)
    max_command_age_s: float = opt(5.0, "refuse arm/start/set/calibrate/reload commands whose "
                                   "\"ts\" is older than this", lo=0.1, hi=3600.0)
    max_payload_bytes: int = opt(8192, "larger command payloads are refused", lo=64,
                                 hi=1_000_000)
    on_disconnect: Literal["keep", "disarm"] = opt("keep", "when the broker is lost: keep "
                                                   "running, or disarm")
    decision_rate_hz: float = opt(10.0, "most decision events published per second",
                                  lo=0.0, hi=10_000.0)
    telemetry_queue: int = opt(1000, "telemetry held while publishing; beyond it, and while "
                               "disconnected, telemetry is dropped and counted", lo=1,
                               hi=1_000_000)
    reconnect_max_s: float = opt(10.0, "longest wait between reconnection attempts",
                                 lo=0.1, hi=3600.0)
    nice: int = opt(10, "lower the control plane process's CPU priority by this much "
                    "(Linux nice), so that on a busy machine the real-time path runs first; "
                    "0 keeps it equal", lo=0, hi=19)

    def topic_prefix(self) -> str:
        """The prefix ending in '/'."""
        p = self.prefix if self.prefix is not None else f"closedloop/{self.instance}/"
        return p if p.endswith("/") else p + "/"

    def _instance_in_topic(self, cfg: Config) -> Iterator[Violation]:
        """``mqtt.instance`` is not empty and has no '+', '#' or '/' (it is one level of
        the topics)."""
        value = self.instance
        if not value or any(c in value for c in "+#/"):
            yield "mqtt.instance", (f"{value!r} is not usable in a topic (no '+', '#', '/'; "
                                    "not empty)")

    def _prefix_in_topic(self, cfg: Config) -> Iterator[Violation]:
        """``mqtt.prefix``, when set, has no '+' or '#' (MQTT's wildcards)."""
        value = self.prefix or ""
        if any(c in value for c in "+#"):
            yield "mqtt.prefix", f"{value!r} is not usable in a topic (no '+', '#'; not empty)"

    def _tls_pair(self, cfg: Config) -> Iterator[Violation]:
        """``mqtt.tls`` has both ``cert`` and ``key`` or neither."""
        if (self.tls.cert is None) != (self.tls.key is None):
            yield "mqtt.tls", "cert and key go together: give both or neither"

    def _password_with_user(self, cfg: Config) -> Iterator[Violation]:
        """``mqtt.password`` needs ``mqtt.username``."""
        if self.username is None and self.password is not None:
            yield "mqtt.password", "a password needs mqtt.username"

    rules = (rule(_instance_in_topic, "mqtt.instance"), rule(_prefix_in_topic, "mqtt.prefix"),
             rule(_tls_pair, "mqtt.tls"), rule(_password_with_user, "mqtt.password"))


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration."""

    streams: StreamsConfig = opt(StreamsConfig(), "input streams")
    acquisition: AcquisitionConfig = opt(AcquisitionConfig(), "acquisition")
    phase: PhaseConfig = opt(PhaseConfig(), "phase estimation")
    trigger: TriggerConfig = opt(TriggerConfig(), "trigger policy")
    stimulator: StimulatorConfig = opt(StimulatorConfig(), "stimulator")
    stimulation: StimulationConfig = opt(StimulationConfig(), "what one trigger delivers")
    safety: SafetyConfig = opt(SafetyConfig(), "safety gate")
    session: SessionConfig = opt(SessionConfig(), "the participant")
    mep: MepConfig = opt(MepConfig(), "MEP measurement")
    recording: RecordingConfig = opt(RecordingConfig(), "recording")
    mqtt: MqttConfig = opt(MqttConfig(), "MQTT control plane")

    def sections(self) -> tuple[Section, ...]:
        """The top-level tables, in the schema's order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def live_keys(root: type | None = None) -> dict[str, str]:
    """Short name (as in MQTT payloads) -> dotted key of every field marked ``live``.

    In the order of the schema (``root``, by default :class:`Config`). Raises TypeError
    (at import of the module that calls it) when a live field is not directly in a
    top-level section, or when two live fields share a name: a short name must say which
    key it sets.
    """
    out: dict[str, str] = {}

    def visit(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if field_doc(f).live:
                if key.count(".") != 1:
                    raise TypeError(f"{key}: only keys of a top-level section can be live")
                if f.name in out:
                    raise TypeError(f"{key}: live like {out[f.name]}; short names must "
                                    "be unique")
                out[f.name] = key
            for sub in tables_in(hints[f.name]):
                visit(sub, key + ".")

    visit(Config if root is None else root, "")
    return out
