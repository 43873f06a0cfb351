"""Append-only JSONL event log, written by its own thread.

One JSON object per line, flushed per event, so a session killed at any moment leaves a
log that is complete up to its last line. Writing happens in a dedicated thread so that
disk latency never delays the real-time path; a write error is kept and reported through
:attr:`EventLog.error` (the service treats it as a fault) instead of vanishing.

Every record has ``"event"`` (its kind) and ``"wall_time"`` (ISO 8601, UTC); records that
concern a moment of the experiment carry LSL times (``"lsl_time"`` and friends).

No record can stop the writer: :func:`clean_json` makes every value representable (numpy
scalars and arrays as numbers and lists, sets as sorted lists, anything else as its
``repr``), and a record that still cannot be encoded (a cyclic structure) is written as
its kind with the reason, under ``"unencodable"``. A write error stops the writing and is
kept in :attr:`EventLog.error`; so is whatever ends the thread.
"""

from __future__ import annotations

import json
import math
import queue
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

__all__ = ["EventLog", "clean_json", "read_events"]


_MAX_INT = 10**1000  # beyond this an int is named, not written (int->str is quadratic)


def clean_json(value: Any) -> Any:
    """``value`` in a form ``json.dumps`` always encodes.

    NaN and infinities become null (JSON has none); numpy scalars and arrays become Python
    numbers and lists; tuples and sets lists (sets sorted); paths strings; dictionary keys
    that JSON cannot take their ``repr``; integers too long to print (Python refuses to
    print one of more than 4300 digits) a description; any other value its ``repr``.
    Cycles are not broken (they end in ``RecursionError``).
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT < value < _MAX_INT else _describe_int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_clean_key(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    np = sys.modules.get("numpy")  # without numpy loaded there are no numpy values
    if np is not None and isinstance(value, np.generic | np.ndarray):
        plain = value.tolist()
        return _safe_repr(value) if isinstance(plain, np.generic) else clean_json(plain)
    if isinstance(value, set | frozenset):
        return [clean_json(v) for v in sorted(value, key=_safe_repr)]
    if isinstance(value, PurePath):
        return str(value)
    return _safe_repr(value)


def _clean_key(key: Any) -> str | int | float | bool | None:
    if isinstance(key, str):
        return key
    plain = clean_json(key)
    return plain if plain is None or isinstance(plain, str | int | float) else _safe_repr(key)


def _describe_int(value: int) -> str:
    digits = int(value.bit_length() * 0.30103) + 1
    return f"<{'negative ' if value < 0 else ''}integer of about {digits} digits>"


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)[:10_000]
    except Exception:  # a broken __repr__: the type is still worth writing
        return f"<unrepresentable {type(value).__name__}>"


class EventLog:
    """A JSONL file written line by line from a background thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self.error: BaseException | None = None
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
        try:
            self._drain()
        except BaseException as exc:  # the thread ends: the service sees log.error and stops
            self.error = self.error or exc

    def _drain(self) -> None:
        while True:
            rec = self._q.get()
            if rec is None:
                return
            if self.error is not None:
                continue
            line = _encode(rec)
            try:
                self._fh.write(line + "\n")
                self._fh.flush()
                self.written += 1
            except (OSError, ValueError) as exc:  # ValueError: the file was closed
                self.error = exc


def _encode(rec: dict[str, Any]) -> str:
    """One record as a JSON line; a record that cannot be encoded still leaves a line."""
    try:
        return json.dumps(clean_json(rec), separators=(",", ":"))
    except (ValueError, TypeError, RecursionError) as exc:
        return json.dumps({"event": str(rec.get("event")), "wall_time": rec.get("wall_time"),
                           "unencodable": f"{type(exc).__name__}: {exc}"[:500]},
                          separators=(",", ":"))


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
