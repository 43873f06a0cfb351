"""The session recording: raw EEG and EMG as the service saw them, and every event, in XDF.

A background thread copies new samples from the acquisition ring buffers (each with its
own read position, so nothing is taken from the real-time path) and the events of the
event log (as JSON strings on a ``closedloop-events`` marker stream, stamped with their
LSL time) into an XDF file every ``period_s``. The configuration and software version are
in the first event (``session_start``). Every chunk is flushed whole: a session killed at
any moment leaves a file readable up to its last write.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from closedloop.recording.events import clean_json
from closedloop.recording.xdf import XdfWriter
from closedloop.streams.lsl_info import StreamSummary
from closedloop.streams.ring import RingBuffer

__all__ = ["SessionRecorder"]

_EVENTS_ID = 100


class SessionRecorder:
    """Copies rings and events into an XDF file from its own thread."""

    def __init__(self, path: str | Path, *, period_s: float = 0.5) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = XdfWriter(self.path)
        self._writer.add_stream(_EVENTS_ID, name="closedloop-events", stype="Markers",
                                labels=["event"], rate_hz=0.0, fmt="string")
        self._sources: list[tuple[int, RingBuffer, int]] = []
        # (LSL time, kind, fields): turned into JSON in the recorder's thread, not on the
        # event loop that records them
        self._events: queue.SimpleQueue[tuple[float, str, dict[str, Any]]] = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._period = period_s
        self.error: OSError | None = None
        self.samples_written = 0
        self._thread = threading.Thread(target=self._run, name="session-recorder",
                                        daemon=True)
        self._thread.start()

    def add_stream(self, stream_id: int, ring: RingBuffer, summary: StreamSummary,
                   stype: str, labels: Sequence[str] | None = None) -> None:
        """Record a ring from its oldest retained sample on (the pipeline starts there too)."""
        with self._lock:
            self._writer.add_stream(stream_id, name=summary.name, stype=stype,
                                    labels=labels or summary.labels, rate_hz=summary.rate_hz)
            self._sources.append((stream_id, ring, max(0, ring.count - ring.capacity)))

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        """A service listener: queue one event (never blocks)."""
        t = fields.get("lsl_time")
        if isinstance(t, int | float):
            self._events.put((float(t), kind, fields))

    def close(self) -> None:
        """Write what is left and the footers."""
        self._stop.set()
        self._thread.join(10.0)
        try:
            self._flush()
            self._writer.close()
        except OSError as exc:
            self.error = self.error or exc

    def _flush(self) -> None:
        with self._lock:
            for i, (sid, ring, pos) in enumerate(self._sources):
                got = ring.read_from(pos)
                if len(got.timestamps):
                    self._writer.write_samples(sid, got.data, got.timestamps)
                    self.samples_written += len(got.timestamps)
                self._sources[i] = (sid, ring, got.start + len(got.timestamps))
            events = []
            while True:
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            if events:
                self._writer.write_markers(
                    _EVENTS_ID, [json.dumps(clean_json({"event": kind, **fields}),
                                            separators=(",", ":"), default=str)
                                 for _, kind, fields in events], [e[0] for e in events])

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            if self.error is not None:
                continue
            try:
                self._flush()
            except OSError as exc:
                self.error = exc
