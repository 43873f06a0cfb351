"""Validation of MQTT command payloads: pure functions, no broker.

A command is ``<prefix>cmd/<verb>`` with a JSON object payload (empty = ``{}``). Every
payload is checked before anything is done: size, JSON, object, known verb, known keys,
types. Commands that could lead to a pulse or change what is targeted (``arm``, ``start``,
``set``, ``calibrate``, ``reload``) must carry ``"ts"`` (the sender's Unix time, seconds)
no older than ``mqtt.max_command_age_s``, and retained messages are never executed: a
command that sat in a broker or a queue must not fire pulses late. ``disarm``, ``stop``
and ``status`` are always safe and need no ``ts``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from closedloop.control.runtime import LIVE_KEYS

__all__ = ["VERBS", "Command", "CommandError", "parse_command"]

_COMMON = {"ts", "id"}
VERBS: dict[str, frozenset[str]] = {
    "arm": frozenset(_COMMON),
    "disarm": frozenset(_COMMON),
    "start": frozenset(_COMMON | {"protocol", "pulses"}),
    "stop": frozenset(_COMMON),
    "set": frozenset(_COMMON | set(LIVE_KEYS) | set(LIVE_KEYS.values())),
    "calibrate": frozenset(_COMMON | {"seconds"}),
    "status": frozenset(_COMMON),
    "reload": frozenset(_COMMON),
}
_NEEDS_FRESH = frozenset({"arm", "start", "set", "calibrate", "reload"})


class CommandError(ValueError):
    """A command payload that is refused; ``key`` names the offending field (or "")."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


@dataclass(frozen=True, slots=True)
class Command:
    """A validated command."""

    verb: str
    args: dict[str, Any]
    id: str | int | None


def _number(payload: dict[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CommandError(key, f"expected a finite number, got {json.dumps(value)[:40]}")
    return float(value)


def parse_command(verb: str, raw: bytes, *, now_s: float, max_age_s: float, max_bytes: int,
                  retained: bool = False) -> Command:
    """Validate one command message.

    Args:
        verb: The topic part after ``cmd/``.
        raw: The payload bytes.
        now_s: The receiver's Unix time.

    Raises:
        CommandError: what is wrong, naming the field.
    """
    if verb not in VERBS:
        raise CommandError("verb", f"unknown verb '{verb[:40]}' (known: {', '.join(VERBS)})")
    if len(raw) > max_bytes:
        raise CommandError("payload", f"{len(raw)} bytes, more than the {max_bytes} allowed")
    if retained:
        raise CommandError("retain", "retained commands are never executed (they are stale "
                                     "by nature); publish commands without the retain flag")
    try:
        payload = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError("payload", f"not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise CommandError("payload", "expected a JSON object")
    unknown = sorted(k for k in payload if k not in VERBS[verb])
    if unknown:
        raise CommandError(unknown[0][:60], f"unknown key for '{verb}' (known: "
                                            f"{', '.join(sorted(VERBS[verb]))})")
    cid = payload.get("id")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, str | int)):
        raise CommandError("id", "expected a string or an integer")
    ts = _number(payload, "ts")
    if verb in _NEEDS_FRESH and ts is None:
        raise CommandError("ts", f"'{verb}' needs 'ts' (the sender's Unix time in seconds), so "
                                 "that a delayed command is never executed late")
    if ts is not None:
        age = now_s - ts
        if age > max_age_s:
            raise CommandError("ts", f"command is {age:.1f} s old (limit {max_age_s:g} s): "
                                     "refused as stale")
        if age < -max_age_s:
            raise CommandError("ts", f"command is {-age:.1f} s in the future: check the "
                                     "sender's clock")
    args = {k: v for k, v in payload.items() if k not in _COMMON}
    if verb == "start":
        protocol = args.get("protocol", "phase-single")  # the service checks the name
        if not isinstance(protocol, str):
            raise CommandError("protocol", "expected a string")
        pulses = args.get("pulses")
        if pulses is not None and (isinstance(pulses, bool) or not isinstance(pulses, int)
                                   or pulses < 1):
            raise CommandError("pulses", "expected a positive integer")
        args = {"protocol": protocol, "pulses": pulses}
    elif verb == "calibrate":
        seconds = _number(args, "seconds")
        seconds = 30.0 if seconds is None else seconds
        if not 4.0 <= seconds <= 600.0:
            raise CommandError("seconds", f"expected 4 to 600, got {seconds:g}")
        args = {"seconds": seconds}
    elif verb == "set" and not args:
        raise CommandError("payload", "nothing to set (settable: " + ", ".join(LIVE_KEYS) + ")")
    return Command(verb=verb, args=args, id=cid)
