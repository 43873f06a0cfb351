"""What a running service says of itself: the status (state, streams, counts, settings,
the estimator, the stimulator) and the metrics (latency percentiles, the predicted phase
error, the EEG buffer's fill). Pure functions of the rig and the session's stats."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pylsl

from closedloop import __version__
from closedloop.control.rig import Rig
from closedloop.control.stats import ServiceStats
from closedloop.dsp.circular import circular_stats_deg
from closedloop.phase.tracker import PhaseTracker
from closedloop.streams.reader import MarkerReader, StreamReader

__all__ = ["metrics", "phase_status", "status"]


def _stream(reader: StreamReader | MarkerReader | None, now: float) -> dict[str, Any] | None:
    if reader is None:
        return None
    age = (now - reader.last_arrival) if reader.last_arrival is not None else None
    return {"name": reader.summary.name if reader.summary else None,
            "connected": reader.summary is not None, "lost": reader.lost,
            "last_sample_age_ms": round(age * 1000.0, 1) if age is not None else None}


def status(rig: Rig | None, s: ServiceStats, *, state: str, settings: dict[str, Any],
           protocol: dict[str, Any] | None, fault: str | None, uptime_s: float,
           pattern: str, units_fired: int) -> dict[str, Any]:
    """What ``status`` replies and publishes (``rig`` None: not opened yet)."""
    now = pylsl.local_clock()
    last = s.pulses[-1]["lsl_time"] if s.pulses else None
    return {
        "state": state, "version": __version__, "pid": os.getpid(),
        "uptime_s": round(uptime_s, 1),
        "streams": {"eeg": _stream(rig.eeg if rig else None, now),
                    "emg": _stream(rig.emg if rig else None, now),
                    "pulses": _stream(rig.pulse_markers if rig else None, now)},
        "protocol": protocol,
        "counts": {"pulses": s.fired, "decisions": s.decisions,
                   "refused": sum(s.refused.values()), "meps": len(s.meps),
                   "samples_lost": s.samples_lost},
        "last_pulse_lsl_time": last,
        "settings": settings,
        "phase": phase_status(rig.tracker) if rig else None,
        "fault": fault,
        "stimulator": rig.stim.driver.status() if rig else None,
        "stimulation": {"pattern": pattern, "units_fired": units_fired,
                        "pulses_today": rig.stim.gate.day_count if rig else None},
    }


def phase_status(tr: PhaseTracker) -> dict[str, Any]:
    """The estimator in use, its band and (trained ones) their training and (wiener)
    expected error."""
    out: dict[str, Any] = {"estimator": type(tr.estimator).__name__ if tr.estimator
                           else None, "tracker": tr.status().state,
                           "band_hz": list(tr.band) if tr.band else None}
    if tr.training_state != "off":
        out["training"] = tr.training_state
        if tr.wiener is not None:
            out["wiener_expected_sd_deg_above_median"] = round(
                tr.wiener.holdout_sd_deg_above_median, 1)
    return out


def metrics(rig: Rig | None, s: ServiceStats) -> dict[str, Any]:
    """Latency percentiles, phase accuracy proxy, buffer fill, dropped samples."""
    ring = rig.eeg.ring if rig is not None else None
    fill = None
    if ring is not None:
        fill = round(min(ring.count, ring.capacity) / ring.capacity, 3)
    recent = itertools.islice(reversed(s.pulses), 200)  # no copy of the whole history
    predicted = [p["predicted_phase_deg"] - p["target_phase_deg"] for p in recent]
    return {
        "latency_ms": {"chunk_to_decision": s.chunk_to_decision_ms.summary(),
                       "chunk_to_fire_request": s.chunk_to_handoff_ms.summary(),
                       "fire_error": s.fire_error_ms.summary()},
        "update_cost_us": s.update_cost_us.summary(),
        "predicted_phase_error_deg": circular_stats_deg(predicted),
        "eeg_buffer_fill": fill, "samples_lost": s.samples_lost,
        "pulses": s.fired, "refused": dict(s.refused),
    }
