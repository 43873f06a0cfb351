"""Typed configuration of closedloop: one frozen dataclass per TOML table.

Every field carries its documentation and its bounds in ``metadata`` so that the loader
(:mod:`closedloop.config.load`) can validate values and name the bad key, and the README's
configuration reference is generated from the same source (``closedloop config-reference``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "HARD_MAX_INTENSITY_PCT",
    "HARD_MAX_PULSES_PER_SESSION",
    "HARD_MIN_INTERVAL_S",
    "AcquisitionConfig",
    "Config",
    "MepConfig",
    "MqttConfig",
    "PhaseConfig",
    "RecordingConfig",
    "SafetyConfig",
    "StimulatorConfig",
    "StreamSelector",
    "StreamsConfig",
    "TlsConfig",
    "TriggerConfig",
]

# Hard caps in code: no configuration file or command can go beyond these. They are
# deliberately generous (they bound what any protocol may ask for); the per-session
# limits in [safety] are the ones a lab tunes. The 50 ms floor admits 20 Hz rTMS at most
# between single pulses, the upper end of the frequencies tabulated in Rossi et al. 2009.
HARD_MAX_INTENSITY_PCT = 100.0
HARD_MIN_INTERVAL_S = 0.05
HARD_MAX_PULSES_PER_SESSION = 10_000


def opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False) -> Any:
    """A dataclass field with documentation and numeric bounds for the loader."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open}
    return field(default=default, metadata=meta)


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
class StreamsConfig:
    """The input streams."""

    eeg: StreamSelector = opt(StreamSelector(name="EEG"), "the EEG stream (required)")
    emg: StreamSelector | None = opt(None, "the EMG stream (optional; without it no MEPs)")
    pulses: StreamSelector | None = opt(
        None, "marker stream of pulses fired by another system (optional)")


@dataclass(frozen=True, kw_only=True)
class AcquisitionConfig:
    """How streams are read and watched."""

    resolve_timeout_s: float = opt(10.0, "how long to look for each stream at start",
                                   lo=0.1, hi=600.0)
    lost_after_ms: float = opt(100.0, "a stream with no new sample for this long is lost",
                               lo=5.0, hi=10_000.0)
    buffer_s: float = opt(10.0, "length of the ring buffer of each stream", lo=1.0, hi=600.0)


BandSpec = tuple[float, float] | Literal["auto"]


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    """Spatial filter, band and the phase estimator (AR forward prediction)."""

    channel: str = opt("C3", "EEG channel label whose phase is targeted")
    reference: tuple[str, ...] = opt(("FC1", "FC5", "CP1", "CP5"),
                               "Hjorth/Laplacian: channel minus the mean of these; [] = none")
    band_hz: BandSpec = opt((8.0, 13.0), "pass band [low, high] in Hz, or \"auto\": "
                            "individual peak ± 2 Hz found during calibration_s")
    calibration_s: float = opt(30.0, "seconds of data used to find the peak when band_hz is "
                               "\"auto\"", lo=5.0, hi=600.0)
    estimator: Literal["ar", "echt"] = opt("ar", "phase estimator: \"ar\" (AR forward "
                                           "prediction, Zrenner et al. 2018) or \"echt\" "
                                           "(endpoint-corrected Hilbert transform, "
                                           "Schreglmann et al. 2021)")
    echt_window_ms: float = opt(1000.0, "ecHT: analysis window", lo=200.0, hi=4000.0)
    processing_rate_hz: float = opt(500.0, "EEG is low-passed and decimated to about this "
                                    "rate before phase estimation", lo=100.0, hi=5000.0)
    update_interval_ms: float = opt(2.0, "run the estimator at most this often",
                                    lo=0.0, hi=100.0)
    window_ms: float = opt(500.0, "AR: length of the analysis window", lo=200.0, hi=4000.0)
    fir_ms: float = opt(128.0, "AR: length of the zero-phase FIR band-pass", lo=20.0,
                        hi=1000.0)
    edge_ms: float = opt(64.0, "AR: filtered samples dropped at each window edge",
                         lo=0.0, hi=1000.0)
    ar_order: int = opt(20, "AR: model order", lo=2, hi=100)
    hilbert_window_ms: float = opt(128.0, "AR: Hilbert transform window around now",
                                   lo=20.0, hi=1000.0)


@dataclass(frozen=True, kw_only=True)
class TriggerConfig:
    """When to fire."""

    target_phase_deg: float = opt(0.0, "0 = positive peak of the band-passed signal, ±180 = "
                                  "trough, -90 = rising flank, +90 = falling flank",
                                  lo=-180.0, hi=180.0)
    tolerance_deg: float = opt(10.0, "largest predicted phase error at which a pulse may still "
                               "fire", lo=0.0, hi=180.0)
    amplitude_percentile: float = opt(50.0, "fire only when band amplitude is above this "
                                      "running percentile (0 = no gate)", lo=0.0, hi=100.0)
    amplitude_window_s: float = opt(30.0, "length of the running amplitude history",
                                    lo=1.0, hi=3600.0)
    min_interval_s: float = opt(2.0, "minimum time between pulses", lo=HARD_MIN_INTERVAL_S,
                                hi=3600.0)
    jitter_s: float = opt(0.5, "random extra interval, uniform in [0, jitter_s]",
                          lo=0.0, hi=3600.0)
    scheduling_margin_ms: float = opt(1.0, "time kept free between a decision and the "
                                      "earliest pulse it schedules", lo=0.0, hi=100.0)
    max_lateness_ms: float = opt(1.0, "a pulse that would leave later than this after its "
                                 "scheduled time is refused", lo=0.05, hi=50.0)
    seed: int | None = opt(None, "seed of the interval jitter (None = random)")


@dataclass(frozen=True, kw_only=True)
class StimulatorConfig:
    """The stimulator and its driver."""

    driver: Literal["simulated"] = opt("simulated", "stimulator driver")
    intensity_pct: float = opt(60.0, "stimulator output, % of maximum", lo=0.0,
                               hi=HARD_MAX_INTENSITY_PCT)
    arm_on_start: bool = opt(False, "arm as soon as the service is ready (otherwise it "
                             "decides but never fires)")
    settle_ms: float = opt(0.0, "wait after an intensity change before the next pulse",
                           lo=0.0, hi=10_000.0)
    latency_ms: float = opt(0.0, "simulated: delay from fire command to pulse",
                            lo=0.0, hi=100.0)
    coil_stream: str = opt("closedloop-sim-coil", "simulated: LSL stream on which the "
                           "simulated coil announces each pulse (the simulator listens)")


@dataclass(frozen=True, kw_only=True)
class SafetyConfig:
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


@dataclass(frozen=True, kw_only=True)
class MepConfig:
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
                                 "by a sinusoid fit to the background; None = off")
    timeout_s: float = opt(2.0, "give up on an MEP if the EMG does not cover its window "
                           "within this time", lo=0.1, hi=60.0)


@dataclass(frozen=True, kw_only=True)
class RecordingConfig:
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
class MqttConfig:
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

    def topic_prefix(self) -> str:
        """The prefix ending in '/'."""
        p = self.prefix if self.prefix is not None else f"closedloop/{self.instance}/"
        return p if p.endswith("/") else p + "/"


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration."""

    streams: StreamsConfig = opt(StreamsConfig(), "input streams")
    acquisition: AcquisitionConfig = opt(AcquisitionConfig(), "acquisition")
    phase: PhaseConfig = opt(PhaseConfig(), "phase estimation")
    trigger: TriggerConfig = opt(TriggerConfig(), "trigger policy")
    stimulator: StimulatorConfig = opt(StimulatorConfig(), "stimulator")
    safety: SafetyConfig = opt(SafetyConfig(), "safety gate")
    mep: MepConfig = opt(MepConfig(), "MEP measurement")
    recording: RecordingConfig = opt(RecordingConfig(), "recording")
    mqtt: MqttConfig = opt(MqttConfig(), "MQTT control plane")
