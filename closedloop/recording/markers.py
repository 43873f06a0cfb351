"""Pulses as an LSL marker stream, so that LabRecorder records them beside the EEG."""

from __future__ import annotations

import json
from typing import Any

import pylsl

__all__ = ["PulseMarkerOutlet"]


class PulseMarkerOutlet:
    """A string marker stream; each pulse is a JSON object stamped with its LSL time."""

    def __init__(self, name: str, source_id: str) -> None:
        info = pylsl.StreamInfo(name, "Markers", 1, pylsl.IRREGULAR_RATE, pylsl.cf_string,
                                source_id)
        info.desc().append_child_value("manufacturer", "closedloop")
        self._outlet = pylsl.StreamOutlet(info)

    def push(self, lsl_time: float, payload: dict[str, Any]) -> None:
        """Push one marker at ``lsl_time``."""
        self._outlet.push_sample([json.dumps(payload, separators=(",", ":"))], lsl_time)
