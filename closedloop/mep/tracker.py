"""Turn pulses into MEP records once the EMG covers their response window.

Pulses come from our own stimulator and from the ``[streams.pulses]`` marker stream. Each
waits until the EMG ring holds samples past the end of its window, then is cut from the
ring by LSL time and measured on each configured channel. A pulse whose window the EMG
does not cover within ``timeout_s`` (EMG stalled or absent) still gets a record per
channel, rejected with reason ``emg_unavailable``: every pulse has its MEP records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from closedloop.config.schema import MepConfig
from closedloop.mep.measure import MepMeasure, blank_artefact, condition_epoch, measure_mep
from closedloop.streams.ring import RingBuffer

__all__ = ["MepRecord", "MepTracker"]


@dataclass(frozen=True, slots=True)
class MepRecord:
    """One channel's measures for one pulse (``decision_id``: the decision whose unit
    gave it; None for a pulse from elsewhere, a marker)."""

    pulse_lsl_time: float
    source: str
    channel: str
    measure: MepMeasure
    decision_id: int | None = None


@dataclass(slots=True)
class _Pending:
    t: float
    source: str
    since: float
    decision_id: int | None


class MepTracker:
    """Pending pulses, measured when their window is complete."""

    def __init__(self, cfg: MepConfig, *, channels: Sequence[str],
                 labels: Sequence[str] | None) -> None:
        self.cfg = cfg
        self.channels = list(channels)
        self._index = ([list(labels).index(c) for c in channels] if labels is not None
                       else None)
        self._pending: list[_Pending] = []

    @property
    def pending(self) -> int:
        """Pulses waiting for their window."""
        return len(self._pending)

    def add_pulse(self, t: float, source: str, now: float,
                  decision_id: int | None = None) -> None:
        """Register a pulse at LSL time ``t`` (of the unit of ``decision_id``)."""
        self._pending.append(_Pending(t, source, now, decision_id))

    def poll(self, ring: RingBuffer | None, now: float) -> list[MepRecord]:
        """Measure every pending pulse whose window is complete or timed out."""
        if not self._pending:
            return []
        newest = ring.newest_timestamp() if ring is not None else None
        end_s = self.cfg.window_ms[1] / 1000.0
        out: list[MepRecord] = []
        keep: list[_Pending] = []
        for p in self._pending:
            if newest is not None and newest >= p.t + end_s and ring is not None:
                out.extend(self._measure(ring, p))
            elif now - p.since > self.cfg.timeout_s:
                out.extend(self._unavailable(p))
            else:
                keep.append(p)
        self._pending = keep
        return out

    def flush(self) -> list[MepRecord]:
        """Records for every pulse still pending (at shutdown)."""
        out = [r for p in self._pending for r in self._unavailable(p)]
        self._pending = []
        return out

    def _unavailable(self, p: _Pending) -> list[MepRecord]:
        nan = float("nan")
        m = MepMeasure(nan, None, nan, nan, nan, nan, True, "emg_unavailable")
        return [MepRecord(p.t, p.source, ch, m, p.decision_id) for ch in self.channels]

    def _measure(self, ring: RingBuffer, p: _Pending) -> list[MepRecord]:
        c = self.cfg
        assert self._index is not None
        seg = ring.between(p.t + c.background_ms[0] / 1000.0, p.t + c.window_ms[1] / 1000.0)
        t_rel = seg.timestamps - p.t
        out = []
        fs = (len(t_rel) - 1) / (t_rel[-1] - t_rel[0]) if len(t_rel) > 1 else 0.0
        for ch, idx in zip(self.channels, self._index, strict=True):
            x = np.asarray(seg.data[:, idx], dtype=np.float64)
            if c.blank_ms is not None and len(x):
                x = blank_artefact(x, t_rel, c.blank_ms)
            if (c.bandpass_hz is not None or c.notch_hz is not None) and len(x) > 12 and fs:
                x = condition_epoch(x, t_rel, fs, bandpass_hz=c.bandpass_hz,
                                    notch_hz=c.notch_hz, background_ms=c.background_ms)
            m = measure_mep(x, t_rel, window_ms=c.window_ms, background_ms=c.background_ms,
                            preactivation_uv=c.preactivation_uv, onset_sd=c.onset_sd,
                            no_response_uv=c.no_response_uv)
            out.append(MepRecord(p.t, p.source, ch, m, p.decision_id))
        return out
