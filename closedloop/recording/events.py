"""Append-only JSONL event log, written by its own thread.

One JSON object per line, flushed per event, so a session killed at any moment leaves a
log that is complete up to its last line. Writing happens in a dedicated thread so that
disk latency never delays the real-time path; a write error is kept and reported through
:attr:`EventLog.error` (the service treats it as a fault) instead of vanishing.

Every record has ``"event"`` (its kind) and ``"wall_time"`` (ISO 8601, UTC); records that
concern a moment of the experiment carry LSL times (``"lsl_time"`` and friends).
"""

from __future__ import annotations

import json
import math
import queue
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["EventLog", "clean_json", "read_events"]


def clean_json(value: Any) -> Any:
    """JSON has no NaN: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


class EventLog:
    """A JSONL file written line by line from a background thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self.error: OSError | None = None
        self.written = 0
        self._thread.start()

    def write(self, event: str, **fields: Any) -> None:
        """Queue one record (never blocks on the disk)."""
        rec = {"event": event, "wall_time": datetime.now(UTC).isoformat(timespec="microseconds")}
        rec.update(fields)
        self._q.put(rec)

    def close(self) -> None:
        """Write everything queued, then close the file."""
        self._q.put(None)
        self._thread.join(10.0)
        try:
            self._fh.close()
        except OSError as exc:  # the last flush failed: keep it as the log's error
            self.error = self.error or exc

    def _run(self) -> None:
        while True:
            rec = self._q.get()
            if rec is None:
                return
            if self.error is not None:
                continue
            try:
                self._fh.write(json.dumps(clean_json(rec), separators=(",", ":")) + "\n")
                self._fh.flush()
                self.written += 1
            except OSError as exc:
                self.error = exc


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL log (a torn last line is skipped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
