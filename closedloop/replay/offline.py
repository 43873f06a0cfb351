"""Offline mode: the live decision pipeline over a recording, without LSL, at CPU speed.

The EEG is fed to the live :class:`~closedloop.control.pipeline.EegPipeline` (filters,
estimator, amplitude gate, clock guard, trigger policy with the stimulator's latency and
the scheduling margin, decision traces): not through the ring, but in blocks of about a
second, with the chunk size an amplifier (or ``closedloop replay``) would push, from which
the pipeline places the updates as the live reads would. Time is the recording's: the
pipeline's clock is the data's, so a decision is taken at ``now = the update's newest
sample + delay`` (the live service's processing delay, modelled; with
``phase.deterministic``, ``phase.decision_delay_ms`` as live), and the same file and
configuration always give the same decisions, the live path's wherever its real delay did
not change them. No protocol holds decisions, the EEG is never stale (a delay the clock
guard would refuse is refused here first), and nothing is timed (``stages_us`` is None).

The stimulation side is the live one on a simulated device: the live
:class:`~closedloop.stim.gated.GatedStimulator` and safety gate over an in-memory
stimulator on the recording's clock, behind
:class:`~closedloop.stim.scheduler.SimulatedScheduler`, which lands each trigger exactly
when scheduled; pulses and refusals are recorded by the live builders
(:mod:`closedloop.control.ledger`), so every record has the live event's fields. MEPs are
measured from the recording's EMG, when it has one, by the live path's
:class:`~closedloop.mep.tracker.MepTracker`, joined to their pulses by decision id.

Samples are rounded to float32 first, as LSL carries them to the live service.

The decision *fingerprint* is a SHA-256 over every decision (crossing time relative to
the first sample to 0.1 ms, fire or not, reason): two runs agree exactly when their
fingerprints do.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from closedloop.blas import single_threaded_blas
from closedloop.config.schema import Config
from closedloop.control.core import DecisionCore
from closedloop.control.ledger import (
    PulseLedger,
    mep_fields,
    mep_time,
    refusal_fields,
)
from closedloop.control.pipeline import EegPipeline, PipelineStats
from closedloop.control.rig import set_unit_intensities
from closedloop.errors import ClosedLoopError
from closedloop.mep.tracker import MepTracker
from closedloop.phase.tracker import PhaseTracker
from closedloop.replay.recording import Recording
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.patterns import Unit
from closedloop.stim.safety import SafetyGate, SafetyLimits
from closedloop.stim.scheduler import PulseOutcome, SimClock, SimulatedScheduler
from closedloop.streams.ring import RingBuffer

__all__ = ["OfflineResult", "fingerprint", "run_offline"]

_BLOCK_S = 1.0  # seconds of EEG pushed through the filters at once


@dataclass
class OfflineResult:
    """Decisions, pulses and MEPs of an offline run, and how fast it went."""

    decisions: list[dict[str, Any]] = field(default_factory=list)
    pulses: list[dict[str, Any]] = field(default_factory=list)
    meps: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0
    seconds: float = 0.0  # of recording
    wall_s: float = 0.0
    updates: int = 0

    @property
    def speed_x(self) -> float:
        """Recording seconds per wall-clock second."""
        return self.seconds / self.wall_s if self.wall_s > 0 else math.inf

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.decisions, self.t0)

    def summary(self) -> dict[str, Any]:
        fired = [d for d in self.decisions if d["fire"]]
        return {"seconds": round(self.seconds, 3), "wall_s": round(self.wall_s, 3),
                "speed_x": round(self.speed_x, 1), "updates": self.updates,
                "decisions": len(self.decisions), "fired": len(fired),
                "pulses": len(self.pulses), "refused": len(self.refused),
                "meps": len(self.meps), "fingerprint": self.fingerprint}


def fingerprint(decisions: list[dict[str, Any]], t0: float) -> str:
    """SHA-256 of (crossing time − t0 to 0.1 ms, fire, reason) over the decisions."""
    h = hashlib.sha256()
    for d in decisions:
        h.update(f"{(d['crossing_lsl_time'] - t0) * 1e4:.0f}|{int(d['fire'])}|{d['reason']}\n"
                 .encode())
    return h.hexdigest()


class _Rig:
    """Offline's side of the live pipeline: its host (the decisions go to the result), its
    clock (the data's), and the live stimulation path: the gated stimulator on an
    in-memory device and a simulated clock, behind the simulated scheduler; the pulses
    and refusals recorded by the live ledger."""

    def __init__(self, cfg: Config, unit: Unit, out: OfflineResult, *, latency_s: float,
                 delay_s: float, armed: bool) -> None:
        self.out, self.unit, self.delay_s = out, unit, delay_s
        self.clock = SimClock()
        self.now = -math.inf  # data time of the decision being made
        drv = FakeStimulator(clock=self.clock, latency_s=latency_s)
        drv.name = "offline"
        drv.open()
        self.stim = GatedStimulator(
            drv, SafetyGate(SafetyLimits.from_config(cfg.safety), max_units=unit.max_units),
            eeg_age_s=lambda: 0.0, clock=self.clock, unit_offsets=unit.offsets)
        set_unit_intensities(self.stim, cfg, unit)
        if armed:
            self.stim.arm()
        self.scheduler = SimulatedScheduler(
            self.stim, on_outcome=self._on_outcome,
            max_lateness_s=cfg.trigger.max_lateness_ms / 1000.0, clock=self.clock,
            now=lambda: self.now)
        self.ledger = PulseLedger(driver=drv.name, unit=unit)
        self.units_fired = 0
        self.mep_pulses: list[tuple[float, int]] = []  # (MEP's pulse time, decision id)

    # -- the pipeline's clock: the data's time
    def at(self, newest: float) -> float:
        """The time at an update whose newest sample is at ``newest``: that plus the
        modelled delay; the stimulator's clock moves on to it."""
        self.now = newest + self.delay_s
        self.clock.t = max(self.clock.t, self.now)
        return self.now

    def time(self) -> float:
        return self.now

    # -- the pipeline's host
    def emit(self, kind: str, **fields: Any) -> None:
        if kind != "decision":  # nothing is lost, and the data is never stale, offline
            raise RuntimeError(f"offline mode: unexpected {kind!r} event {fields}")
        self.out.decisions.append({**fields, "lsl_time": self.now})

    def holds(self, now: float) -> bool:
        return False  # no protocol runs offline

    def reopen_eeg(self) -> None:
        raise RuntimeError("offline mode: the clock guard asked to reopen the EEG inlet")

    def estimator_changed(self, tracker: PhaseTracker) -> None:
        pass  # (live: a phase_estimator event)

    def calibrated(self, tracker: PhaseTracker) -> None:
        pass  # (live: a calibrated event)

    def _on_outcome(self, o: PulseOutcome) -> None:
        paired = self.stim.paired
        for rec in self.ledger.records(o, paired=paired, intensity_pct=self.stim.intensity_pct):
            self.out.pulses.append(rec.fields())
        # (the live events' lsl_time is when they were recorded: here, when they happened)
        t_mep = mep_time(o, self.unit, paired)
        if t_mep is not None:
            self.mep_pulses.append((t_mep, o.request.id))
        if not o.fired:
            self.out.refused.append({**refusal_fields(o), "lsl_time": self.clock.t})
            return
        self.units_fired += 1
        limit = self.unit.max_units
        if limit is not None and self.units_fired >= limit:
            self.stim.disarm()  # stimulation complete, as the live service does


def run_offline(cfg: Config, eeg: Recording, *, emg: Recording | None = None,
                chunk_ms: float = 10.0, delay_ms: float = 1.0, t0: float | None = None,
                armed: bool = True) -> OfflineResult:
    """Run the decision pipeline over ``eeg`` (samples stamped ``t0 + i / fs``)."""
    single_threaded_blas()
    start_wall = time.perf_counter()
    t0 = eeg.first_timestamp if t0 is None else t0
    # deterministic configurations fix the delay decisions assume; otherwise it is modelled
    delay = (cfg.phase.decision_delay_ms if cfg.phase.deterministic else delay_ms) / 1000.0
    if not 0.0 <= delay < cfg.safety.max_eeg_age_ms / 1000.0:
        raise ClosedLoopError(
            f"a processing delay of {delay * 1000.0:g} ms (--delay-ms, or "
            "phase.decision_delay_ms when phase.deterministic) is outside [0, "
            f"safety.max_eeg_age_ms = {cfg.safety.max_eeg_age_ms:g} ms): the clock guard "
            "would refuse every decision")
    tracker = PhaseTracker(fs_in=eeg.fs, labels=eeg.labels, cfg=cfg.phase,
                           conditions=cfg.trigger.power_conditions)
    latency = (cfg.stimulator.latency_ms or 0.0) / 1000.0
    core = DecisionCore(cfg, tracker, latency_s=latency,
                        rng=np.random.default_rng(cfg.trigger.seed))
    out = OfflineResult(t0=t0, seconds=eeg.duration_s)
    rig = _Rig(cfg, core.unit, out, latency_s=latency, delay_s=delay, armed=armed)
    stats = PipelineStats()
    pipe = EegPipeline(lambda: cfg, tracker, core, None, host=rig, scheduler=rig.scheduler,
                       armed=lambda: rig.stim.armed, unit=core.unit, stats=stats,
                       clock=rig.time, clock_at=rig.at, timed=False)
    n_chunk = max(1, round(chunk_ms / 1000.0 * eeg.fs))
    # the live path receives float32 samples over LSL: give the pipeline the same numbers
    data = np.asarray(eeg.data, dtype=np.float32).astype(np.float64)
    stamps = t0 + np.arange(data.shape[0]) / eeg.fs
    # blocks of about a second, in the amplifier's chunks: the pipeline finds the updates
    # chunk by chunk, and once the band is known pushes the block through the filters at once
    n_block = n_chunk * max(1, round(_BLOCK_S * eeg.fs / n_chunk))
    for i in range(0, data.shape[0], n_block):
        pipe.process(data[i:i + n_block], stamps[i:i + n_block], chunk=n_chunk)
    out.updates = stats.estimates
    if emg is not None and rig.mep_pulses:
        out.meps = _meps(cfg, emg, rig.mep_pulses, t0)
    out.wall_s = time.perf_counter() - start_wall
    return out


def _meps(cfg: Config, emg: Recording, pulses: list[tuple[float, int]],
          t0: float) -> list[dict[str, Any]]:
    missing = [c for c in cfg.mep.channels if c not in emg.labels]
    if missing:
        return []
    ring = RingBuffer(emg.data.shape[0] + 1, emg.data.shape[1])
    ring.write(emg.data, t0 + np.arange(emg.data.shape[0]) / emg.fs)
    meps = MepTracker(cfg.mep, channels=cfg.mep.channels, labels=emg.labels)
    for t, decision_id in pulses:
        meps.add_pulse(t, "offline", 0.0, decision_id=decision_id)
    records = meps.poll(ring, 0.0) + meps.flush()
    end_s = cfg.mep.window_ms[1] / 1000.0  # measured when its window was complete
    return [{**mep_fields(r), "lsl_time": r.pulse_lsl_time + end_s} for r in records]
