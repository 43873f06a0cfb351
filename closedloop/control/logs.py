"""Structured logs on stdout, for a daemon under systemd (journald) or a container.

The event log (JSONL file) is the complete record; these logs are the operator's view:
session start and end, arm state, stream health, faults, control-plane changes and every
pulse, one line each, as text or as JSON objects (``closedloop run --log-format json``).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime
from typing import Any

from closedloop.recording.events import clean_json

__all__ = ["LOGGER_NAME", "log_event", "setup_logging"]

LOGGER_NAME = "closedloop"

_LEVELS: dict[str, int] = {
    "session_start": logging.INFO, "ready": logging.INFO, "session_end": logging.INFO,
    "armed": logging.INFO, "disarmed": logging.INFO, "pulse": logging.INFO,
    "calibrated": logging.INFO, "settings_changed": logging.INFO,
    "protocol_started": logging.INFO, "protocol_stopped": logging.INFO,
    "stream_connected": logging.INFO, "stream_recovered": logging.INFO,
    "control_restored": logging.INFO, "eeg_clock_ok": logging.INFO,
    "reloaded": logging.INFO, "command": logging.INFO,
    "stream_lost": logging.WARNING, "stream_missing": logging.WARNING,
    "control_lost": logging.WARNING, "external_pulse_ignored": logging.WARNING,
    "samples_lost": logging.WARNING, "reload_refused": logging.WARNING,
    "fault": logging.ERROR, "stream_error": logging.ERROR,
}
_BRIEF = {"pulse": ("lsl_time", "scheduled_lsl_time", "fire_error_ms", "intensity_pct",
                    "target_phase_deg", "pulse_number"),
          "session_start": ("version", "config_source", "pid")}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(
                   timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        return json.dumps(clean_json(out), separators=(",", ":"), default=str)


class _Enqueue(logging.handlers.QueueHandler):
    """Hand the record to the writer thread as it is (formatting, JSON and the write to
    stdout happen there, never on the event loop that logs)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def setup_logging(fmt: str = "text", level: int = logging.INFO
                  ) -> logging.handlers.QueueListener:
    """Send closedloop's logs to stdout as ``text`` or ``json``, from a thread of their
    own; returns the listener (``stop()`` it at exit: it writes what is left)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    logger.addHandler(_Enqueue(records))
    logger.setLevel(level)
    logger.propagate = False
    listener.start()
    return listener


def log_event(kind: str, fields: dict[str, Any]) -> None:
    """A service listener: log the events an operator should see."""
    level = _LEVELS.get(kind)
    if level is None:
        return
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.isEnabledFor(level):
        return
    keep = _BRIEF.get(kind)
    shown = {k: v for k, v in fields.items() if keep is None or k in keep}
    shown.pop("config", None)
    text = " ".join(f"{k}={v}" for k, v in shown.items())
    logger.log(level, "%s %s", kind, text, extra={"fields": {"event": kind, **shown}})
