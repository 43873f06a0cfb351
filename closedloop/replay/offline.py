"""Offline mode: the whole decision pipeline over a recording, without LSL, at CPU speed.

The EEG is fed in the chunks an amplifier (or ``closedloop replay``) would push, through
the same :class:`~closedloop.control.core.DecisionCore` the live service uses (filters,
estimator, amplitude gate, trigger policy with the stimulator's latency and the scheduling
margin). Time is the recording's: a decision is taken at ``now = newest sample + delay``
(the live service's processing delay, modelled), so the same file and configuration always
give the same decisions, and the same decisions as the live path wherever its real delay
did not change them. The stimulator is simulated: a pulse lands exactly when scheduled,
after the safety gate (with the recording's clock; the EEG is never stale offline). MEPs
are measured from the recording's EMG, when it has one, by the live path's
:class:`~closedloop.mep.tracker.MepTracker`.

Samples are rounded to float32 first, as LSL carries them to the live service.

The decision *fingerprint* is a SHA-256 over every decision (crossing time relative to
the first sample to 0.1 ms, fire or not, reason): two runs agree exactly when their
fingerprints do.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from closedloop.blas import single_threaded_blas
from closedloop.config.schema import Config
from closedloop.control.core import DecisionCore
from closedloop.mep.tracker import MepTracker
from closedloop.phase.tracker import PhaseTracker
from closedloop.replay.recording import Recording
from closedloop.stim.safety import SafetyGate, SafetyLimits, Trigger
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


def run_offline(cfg: Config, eeg: Recording, *, emg: Recording | None = None,
                chunk_ms: float = 10.0, delay_ms: float = 1.0, t0: float | None = None,
                armed: bool = True) -> OfflineResult:
    """Run the decision pipeline over ``eeg`` (samples stamped ``t0 + i / fs``)."""
    single_threaded_blas()
    start_wall = time.perf_counter()
    t0 = eeg.first_timestamp if t0 is None else t0
    tracker = PhaseTracker(fs_in=eeg.fs, labels=eeg.labels, cfg=cfg.phase,
                           conditions=cfg.trigger.power_conditions)
    latency = (cfg.stimulator.latency_ms or 0.0) / 1000.0
    core = DecisionCore(cfg, tracker, latency_s=latency,
                        rng=np.random.default_rng(cfg.trigger.seed))
    gate = SafetyGate(SafetyLimits.from_config(cfg.safety), max_units=core.unit.max_units)
    # what one trigger gives (the simulated device delivers what it is told)
    trig = (Trigger(0.0, (cfg.stimulation.conditioning_pct, cfg.stimulator.intensity_pct),
                    (0.0, cfg.stimulation.isi_ms / 1000.0), paired=True)
            if core.unit.paired else Trigger(0.0, (cfg.stimulator.intensity_pct,)))
    out = OfflineResult(t0=t0, seconds=eeg.duration_s)
    offset_s = cfg.streams.eeg.time_offset_ms / 1000.0
    # deterministic configurations fix the delay decisions assume; otherwise it is modelled
    delay = (cfg.phase.decision_delay_ms if cfg.phase.deterministic else delay_ms) / 1000.0
    n_chunk = max(1, round(chunk_ms / 1000.0 * eeg.fs))
    # the live path receives float32 samples over LSL: give the pipeline the same numbers
    data = np.asarray(eeg.data, dtype=np.float32).astype(np.float64)
    busy_until = -math.inf
    units = 0
    unit = core.unit
    n_total = data.shape[0]
    # Once the band is known, chunks are pushed through the filters in blocks of many
    # (their per-call cost dominates otherwise) and the updates inside a block are then
    # taken at their own samples of the tracker's history: the filters give the same
    # numbers however the samples are split, so the decisions are the same.
    n_block = n_chunk * max(1, round(_BLOCK_S * eeg.fs / n_chunk))
    i = 0
    while i < n_total:
        j = min(n_total, i + (n_block if tracker.band is not None else n_chunk))
        stamps = t0 + np.arange(i, j) / eeg.fs
        if i == 0:
            core.begin(float(stamps[0]) + offset_s)
        if tracker.band is None:  # calibrating: the chunk as it comes, the band may change
            for a, b, update_here in core.segments(stamps, offset_s):
                tracker.push(data[i + a:i + b], stamps[a:b])
                if update_here:
                    units, busy_until = _update(core, float(stamps[b - 1]) + offset_s, delay,
                                                armed, units, busy_until, gate, trig, cfg, out)
            i = j
            continue
        # where the updates fall, chunk by chunk as the live path would see them
        updates: list[tuple[int, float, float]] = []
        for c in range(0, j - i, n_chunk):
            part = stamps[c:c + n_chunk]
            for _, b, update_here in core.segments(part, offset_s):
                if update_here:
                    updates.append((tracker.decimated_count(c + b),
                                    float(part[b - 1]) + offset_s, core.spacing))
        kept = tracker.decimated_count(j - i)
        tracker.push(data[i:j], stamps)
        for k, newest, spacing in updates:
            core.spacing = spacing
            units, busy_until = _update(core, newest, delay, armed, units, busy_until, gate,
                                        trig, cfg, out, back=kept - k)
        i = j
    if emg is not None and out.pulses:
        out.meps = _meps(cfg, emg, out.pulses, unit.kind, t0)
    out.wall_s = time.perf_counter() - start_wall
    return out


def _update(core: DecisionCore, newest: float, delay: float, armed: bool, units: int,
            busy_until: float, gate: SafetyGate, trig: Trigger, cfg: Config,
            out: OfflineResult, back: int = 0) -> tuple[int, float]:
    """One estimator update and its decision, as the live service would make them
    (``back``: the update's sample is this many samples before the tracker's newest)."""
    unit = core.unit
    update = core.estimate(back, t=newest)
    if update is None:
        return units, busy_until
    out.updates += 1
    now = newest + delay
    limit_reached = unit.max_units is not None and units >= unit.max_units
    decision = core.decide(update, now=now, armed=armed and not limit_reached,
                           busy=now < busy_until)
    if decision is None:
        return units, busy_until
    reason = decision.reason
    fire = decision.fire
    if fire and now < busy_until:  # the live scheduler still delivers the last unit
        fire, reason = False, "scheduler_busy"
    if fire:
        first = replace(trig, t=decision.fire_time)
        refusal = gate.check_start(first, offsets=unit.offsets, eeg_age_s=0.0)
        core.scheduled(decision)
        busy_until = decision.fire_time + unit.duration_s
        if refusal is not None:
            out.refused.append({"scheduled_lsl_time": decision.fire_time, "reason": refusal})
        else:
            units += 1
            for k, off in enumerate(unit.offsets):
                t = decision.fire_time + off
                now_trig = replace(trig, t=t)
                if k > 0 and (why := gate.check_next(now_trig, planned=t, max_lateness_s=0.0,
                                                     eeg_age_s=0.0)) is not None:
                    gate.end_unit()
                    out.refused.append({"scheduled_lsl_time": t,
                                        "reason": f"unit_aborted:{why}"})
                    break
                gate.commit(now_trig, start=k == 0, triggers=len(unit.offsets))
                out.pulses.append({
                    "lsl_time": t, "intensity_pct": cfg.stimulator.intensity_pct,
                    "predicted_phase_deg": round(math.degrees(update.est.phase_at(t)), 2),
                    "target_phase_deg": cfg.trigger.target_phase_deg, "unit_index": k})
    out.decisions.append({
        "fire": fire, "reason": reason, "crossing_lsl_time": decision.crossing_time,
        "fire_lsl_time": decision.fire_time,
        "predicted_phase_deg": round(math.degrees(decision.predicted_phase_rad), 2),
        "estimate_lsl_time": update.est.lsl_time, "freq_hz": round(update.est.freq_hz, 3),
        "band_amplitude": round(update.amplitude, 3)})
    return units, busy_until


def _meps(cfg: Config, emg: Recording, pulses: list[dict[str, Any]], kind: str,
          t0: float) -> list[dict[str, Any]]:
    if kind not in ("single", "paired", "burst"):
        return []
    missing = [c for c in cfg.mep.channels if c not in emg.labels]
    if missing:
        return []
    ring = RingBuffer(emg.data.shape[0] + 1, emg.data.shape[1])
    ring.write(emg.data, t0 + np.arange(emg.data.shape[0]) / emg.fs)
    meps = MepTracker(cfg.mep, channels=cfg.mep.channels, labels=emg.labels)
    last_of_unit = [p for p, nxt in zip(pulses, [*pulses[1:], None], strict=True)
                    if nxt is None or nxt["unit_index"] == 0]
    isi = cfg.stimulation.isi_ms / 1000.0 if kind == "paired" else 0.0
    for p in last_of_unit:
        meps.add_pulse(p["lsl_time"] + isi, "offline", 0.0)
    records = meps.poll(ring, 0.0) + meps.flush()
    return [{"pulse_lsl_time": r.pulse_lsl_time, "channel": r.channel,
             "p2p_uv": r.measure.p2p_uv, "rejected": r.measure.rejected,
             "reason": r.measure.reason} for r in records]
