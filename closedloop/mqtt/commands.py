"""Validation of MQTT command payloads: pure functions, no broker.

A command is ``<prefix>cmd/<verb>`` with a JSON object payload (empty = ``{}``). Every
payload is checked before anything is done: size, JSON, object, known verb, known keys,
types. Commands that could lead to a pulse or change what is targeted (``arm``, ``start``,
``set``, ``calibrate``, ``reload``) must carry ``"ts"`` (the sender's Unix time, seconds)
no older than ``mqtt.max_command_age_s``, and retained messages are never executed: a
command that sat in a broker or a queue must not fire pulses late. ``disarm``, ``stop``
and ``status`` are always safe and need no ``ts``.

Hostile payloads are refused, never crash the parser (it runs in the MQTT worker, whose
death stops the service): nesting deeper than :data:`MAX_DEPTH` is measured before
``json.loads`` (whose recursion would otherwise end in ``RecursionError``), and numbers are
bounded while parsing (``parse_int``/``parse_float``/``parse_constant`` hooks): integers of
more than :data:`MAX_DIGITS` digits (Python's int->str limit makes a 5000-digit one
unprintable, and ``float()`` of a 400-digit one overflows), floats that overflow or are
written with more than :data:`MAX_NUMBER_CHARS` characters, and the ``NaN``/``Infinity``
literals that JSON does not have are all "number too large" or "not a JSON number".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from closedloop.control.runtime import LIVE_KEYS

__all__ = ["MAX_DEPTH", "MAX_DIGITS", "MAX_NUMBER_CHARS", "VERBS", "Command", "CommandError",
           "parse_command"]

MAX_DEPTH = 8  # nested objects/lists; the deepest real payload (`set band_hz`) has 2
MAX_DIGITS = 20  # an integer with more is refused (2**64 has 20)
MAX_NUMBER_CHARS = 40  # a float written longer is refused (17 significant digits suffice)

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


# a JSON string (its closing quote optional, so that every match succeeds at once and the
# scan stays linear), or a bracket
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


@dataclass(frozen=True, slots=True)
class _BadNumber:
    """What the parsing hooks put in place of a refused number (the key is found after)."""

    problem: str


def _too_deep(raw: bytes) -> bool:
    """Whether objects and lists nest deeper than MAX_DEPTH (brackets in strings skipped).

    Linear, without recursion, and it stops at the first level too deep: safe on any input.
    Strings are delimited as JSON delimits them; where the JSON is malformed, the parser
    stops there anyway.
    """
    depth = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _parse_int(text: str) -> int | _BadNumber:
    digits = len(text) - text.startswith("-")
    if digits > MAX_DIGITS:
        return _BadNumber(f"number too large: an integer of {digits} digits (at most "
                          f"{MAX_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float | _BadNumber:
    if len(text) > MAX_NUMBER_CHARS:
        return _BadNumber(f"number too large: {len(text)} characters (at most "
                          f"{MAX_NUMBER_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        return _BadNumber(f"number too large: {text[:24]} overflows a float")
    return value


def _parse_constant(text: str) -> _BadNumber:
    return _BadNumber(f"{text} is not a JSON number")


def _bad_number(value: Any) -> _BadNumber | None:
    """The first refused number in a parsed value (bounded by MAX_DEPTH: recursion is safe)."""
    if isinstance(value, _BadNumber):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    for item in value if isinstance(value, list) else ():
        bad = _bad_number(item)
        if bad is not None:
            return bad
    return None


def _load(raw: bytes) -> Any:
    """The parsed payload, or CommandError: bounded in depth and number size."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError("payload", f"not valid JSON: {exc}") from None
    if _too_deep(raw):
        raise CommandError("payload", f"nested too deeply (at most {MAX_DEPTH} levels of "
                                      "objects and lists)")
    try:
        payload = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                             parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise CommandError("payload", f"not valid JSON: {exc}") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise CommandError("payload", "nested too deeply") from None
    if isinstance(payload, dict):  # name the key that holds the refused number
        for key, value in payload.items():
            bad = _bad_number(value)
            if bad is not None:
                raise CommandError(key[:60], bad.problem)
    elif (bad := _bad_number(payload)) is not None:
        raise CommandError("payload", bad.problem)
    return payload


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
    payload = _load(raw)
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
