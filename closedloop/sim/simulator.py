"""``closedloop simulate``: EEG and EMG published over LSL like real amplifiers.

Publishes ``<prefix>-EEG`` (64 channels, 10-10 labels, µV, default 5000 Hz) and
``<prefix>-EMG`` (FDI, APB) in small chunks paced in real time (sample times on an
absolute schedule, so no drift accumulates), and listens to the simulated stimulator's
coil stream. For each pulse it writes a TMS artefact and an MEP into the EMG and publishes
the ground truth on ``<prefix>-truth`` (JSON markers): the true mu phase and amplitude at
the pulse and the MEP it generated, so the loop can be checked against known truth.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pylsl
from pylsl.util import LostError

from closedloop.sim.eeg_model import LABELS_10_10_64, EegBlock, EegGenerator, EegSimParams
from closedloop.sim.emg_model import (
    EMG_LABELS,
    EmgSimParams,
    MepModel,
    mep_waveform,
    tms_artefact,
)

__all__ = ["Simulator", "SimulatorSettings", "make_outlet"]

_RESPONSE_S = 0.08  # how long after a pulse its artefact and MEP last
_HISTORY_S = 5.0


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """What ``closedloop simulate`` publishes."""

    prefix: str = "closedloop-sim"
    eeg: EegSimParams = field(default_factory=EegSimParams)
    emg: EmgSimParams = field(default_factory=EmgSimParams)
    mep: MepModel = field(default_factory=MepModel)
    chunk_ms: float = 2.0
    coil_stream: str = "closedloop-sim-coil"
    seed: int | None = None


def make_outlet(name: str, stype: str, labels: tuple[str, ...], rate: float,
                source_id: str, unit: str = "microvolts") -> pylsl.StreamOutlet:
    """A float32 outlet with ``desc/channels/channel/label`` metadata."""
    info = pylsl.StreamInfo(name, stype, len(labels), rate, pylsl.cf_float32, source_id)
    chans = info.desc().append_child("channels")
    for label in labels:
        ch = chans.append_child("channel")
        ch.append_child_value("label", label)
        ch.append_child_value("unit", unit)
        ch.append_child_value("type", stype)
    return pylsl.StreamOutlet(info, chunk_size=0, max_buffered=60)


@dataclass(slots=True)
class _Pulse:
    t: float
    intensity: float
    p2p: float | None = None
    phase: float | None = None


class Simulator:
    """Runs until :meth:`stop`; construct, then call :meth:`run` (blocking)."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.s = settings
        self.rng = np.random.default_rng(settings.seed)
        self.eeg_gen = EegGenerator(settings.eeg, self.rng)
        self._stop = threading.Event()
        self.pulses_seen = 0
        fs = settings.eeg.fs
        self._hist_phase = np.zeros(int(_HISTORY_S * fs))
        self._hist_amp = np.zeros(int(_HISTORY_S * fs))
        self._hist_n = 0  # absolute index of the next EEG sample
        self._pulses: list[_Pulse] = []
        self._preact_until = -math.inf
        self.ready = threading.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    def run(self, duration_s: float | None = None) -> None:
        """Publish until stopped (or for ``duration_s``)."""
        s = self.s
        p = s.prefix
        eeg_out = make_outlet(f"{p}-EEG", "EEG", LABELS_10_10_64, s.eeg.fs, f"{p}-eeg")
        emg_out = make_outlet(f"{p}-EMG", "EMG", EMG_LABELS, s.emg.fs, f"{p}-emg")
        truth_info = pylsl.StreamInfo(f"{p}-truth", "Markers", 1, pylsl.IRREGULAR_RATE,
                                      pylsl.cf_string, f"{p}-truth")
        truth_out = pylsl.StreamOutlet(truth_info)
        coil = _CoilListener(s.coil_stream, self._stop)
        coil.start()
        self.ready.set()
        fs_eeg, fs_emg = s.eeg.fs, s.emg.fs
        n_eeg = max(1, round(s.chunk_ms / 1000.0 * fs_eeg))
        t0 = pylsl.local_clock()
        k_eeg = 0  # EEG samples pushed
        k_emg = 0
        # blocks of 20 ms, each generated right after a push (in the slack before the next
        # one) so that generating never delays a chunk
        block = max(n_eeg, int(0.02 * fs_eeg))
        buf = self.eeg_gen.generate(block)
        next_buf: EegBlock | None = None
        buf_pos = 0
        end = math.inf if duration_s is None else t0 + duration_s
        try:
            while not self._stop.is_set():
                t_next = t0 + (k_eeg + n_eeg) / fs_eeg
                if t_next > end:
                    break
                wait = t_next - pylsl.local_clock()
                if wait > 0.0015:
                    time.sleep(wait - 0.001)
                while pylsl.local_clock() < t_next:
                    time.sleep(0.0002)
                if buf_pos + n_eeg > len(buf.data):
                    buf = next_buf if next_buf is not None else self.eeg_gen.generate(block)
                    next_buf = None
                    buf_pos = 0
                chunk = buf.data[buf_pos:buf_pos + n_eeg]
                self._remember(buf.mu_phase[buf_pos:buf_pos + n_eeg],
                               buf.mu_amplitude[buf_pos:buf_pos + n_eeg])
                buf_pos += n_eeg
                eeg_out.push_chunk(chunk, t0 + (k_eeg + n_eeg - 1) / fs_eeg)
                k_eeg += n_eeg
                for t_pulse, intensity in coil.take():
                    self._pulses.append(_Pulse(t_pulse, intensity))
                self._resolve_pulses(t0, truth_out)
                # EMG up to the same time
                m = int((k_eeg / fs_eeg) * fs_emg) - k_emg
                if m > 0:
                    t_emg = t0 + (k_emg + np.arange(m)) / fs_emg
                    emg_out.push_chunk(self._emg(t_emg), float(t_emg[-1]))
                    k_emg += m
                if next_buf is None:
                    next_buf = self.eeg_gen.generate(block)
        finally:
            self._stop.set()
            coil.join(1.0)

    def _remember(self, phase: np.ndarray, amp: np.ndarray) -> None:
        n = len(phase)
        cap = len(self._hist_phase)
        idx = (self._hist_n + np.arange(n)) % cap
        self._hist_phase[idx] = phase
        self._hist_amp[idx] = amp
        self._hist_n += n

    def _resolve_pulses(self, t0: float, truth_out: pylsl.StreamOutlet) -> None:
        """Fix phase and MEP of pulses whose EEG sample exists; publish their truth."""
        fs = self.s.eeg.fs
        for pulse in self._pulses:
            if pulse.p2p is not None:
                continue
            i = round((pulse.t - t0) * fs)
            if i >= self._hist_n:
                continue  # the pulse lands in the future: wait for its sample
            cap = len(self._hist_phase)
            if i < self._hist_n - cap or i < 0:
                pulse.p2p, pulse.phase = 0.0, float("nan")
                continue
            pulse.phase = float(self._hist_phase[i % cap])
            pulse.p2p = self.s.mep.draw_p2p_uv(pulse.intensity, pulse.phase, self.rng)
            self.pulses_seen += 1
            truth = {
                "pulse_lsl_time": pulse.t, "intensity_pct": pulse.intensity,
                "true_phase_deg": math.degrees(pulse.phase),
                "true_mu_amplitude_uv": float(self._hist_amp[i % cap]),
                "mep_p2p_uv": {ch: pulse.p2p * g for ch, g in
                               zip(EMG_LABELS, self.s.mep.channel_gain, strict=True)},
            }
            truth_out.push_sample([json.dumps(truth)], pulse.t)

    def _emg(self, t: np.ndarray) -> np.ndarray:
        s = self.s.emg
        m = len(t)
        out = self.rng.normal(0.0, s.noise_uv, (m, len(EMG_LABELS)))
        if self.rng.random() < s.preactivation_rate_hz * m / s.fs:
            self._preact_until = float(t[0]) + s.preactivation_s
        if t[0] < self._preact_until:
            out += self.rng.normal(0.0, s.preactivation_uv, out.shape)
        self._pulses = [p for p in self._pulses if p.t + _RESPONSE_S >= t[0]]
        for pulse in self._pulses:
            if pulse.t > t[-1]:
                continue
            rel = t - pulse.t
            art = tms_artefact(rel)
            wave = mep_waveform(rel, pulse.p2p or 0.0, self.s.mep)
            for c, gain in enumerate(self.s.mep.channel_gain):
                out[:, c] += art + wave * gain
        return out.astype(np.float32)


class _CoilListener(threading.Thread):
    """Pulls pulses from the simulated stimulator's coil stream, whenever it exists."""

    def __init__(self, name: str, stop: threading.Event) -> None:
        super().__init__(name="sim-coil", daemon=True)
        self.stream_name = name
        self._stopped = stop
        self._lock = threading.Lock()
        self._items: list[tuple[float, float]] = []

    def take(self) -> list[tuple[float, float]]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def run(self) -> None:
        inlet: pylsl.StreamInlet | None = None
        while not self._stopped.is_set():
            if inlet is None:
                found = pylsl.resolve_byprop("name", self.stream_name, 1, 0.5)
                if not found:
                    continue
                inlet = pylsl.StreamInlet(found[0], recover=True,
                                          processing_flags=pylsl.proc_clocksync)
                inlet.open_stream(timeout=2.0)
            try:
                sample, ts = inlet.pull_sample(timeout=0.05)
            except LostError:
                inlet = None
                continue
            if sample is None:
                continue
            try:
                intensity = float(json.loads(sample[0])["intensity_pct"])
            except (ValueError, KeyError, TypeError):
                continue  # not a pulse marker: a real coil ignores noise on the line too
            with self._lock:
                self._items.append((float(ts), intensity))
