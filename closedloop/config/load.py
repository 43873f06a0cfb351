"""Load, override and validate configuration.

TOML tables map onto the frozen dataclasses of :mod:`closedloop.config.schema`. Every
problem raises :class:`~closedloop.errors.ConfigError` naming the source, the dotted key
and what was expected; unknown keys are errors too (a typo must not silently fall back to
a default). The same machinery validates ``--set KEY=VALUE`` overrides.

Reading a file fails as a ``ConfigError`` too, never as another exception: missing, a
directory or other non-regular file, unreadable, not UTF-8, not TOML, nested deeper than
the parser's recursion. Integers of more than :data:`MAX_INT_DIGITS` digits are refused as
"number too large" wherever they appear: Python cannot print one of more than 4300 digits
(so neither ``repr`` in a message nor ``tomllib`` on the file) and ``float()`` of a
400-digit one overflows. The values of :data:`SECRET_KEYS` never appear in a message.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from closedloop.config.schema import Config, FieldDoc, field_doc
from closedloop.errors import ConfigError

__all__ = ["MAX_INT_DIGITS", "SECRET_KEYS", "apply_override", "check_cross_fields",
           "config_to_dict", "from_dict", "load_config", "parse_overrides", "validated"]

T = TypeVar("T")

MAX_INT_DIGITS = 20  # no setting needs more (2**64 has 20); as MQTT payloads
SECRET_KEYS = frozenset({"mqtt.password", "stimulator.unlock_code"})
_INT_LIMIT: int = 10**MAX_INT_DIGITS
_MAX_FILE_BYTES = 4 << 20  # a configuration is a few kB; this is not one


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply ``KEY=VALUE`` overrides, validate.

    Args:
        path: TOML file, or None for the built-in defaults.
        overrides: Strings ``section.key=value``; the value is parsed as TOML (``180``,
            ``[8, 12]``, ``"auto"``, ``true``), and taken as a plain string otherwise.

    Raises:
        ConfigError: naming the file, key and problem.
    """
    source = str(path) if path is not None else "<defaults>"
    data = _read_toml(path, source) if path is not None else {}
    overridden = []
    for key, value in parse_overrides(overrides):
        apply_override(data, key, value)
        overridden.append(key)
    try:
        cfg = validated(data, source=source)
    except ConfigError as exc:
        if any(exc.key == k or exc.key.startswith(k + ".") or exc.key.startswith(k + "[")
               for k in overridden):
            raise ConfigError(source="--set", key=exc.key, problem=exc.problem) from exc
        raise
    return cfg


def validated(data: Mapping[str, Any], *, source: str) -> Config:
    """``from_dict`` and ``check_cross_fields``; any failure is a ConfigError.

    Every known way a value can fail is checked with a message naming its key; should a
    rule still trip over a value (a bug), the config is refused all the same, naming the
    exception, rather than the exception escaping to a caller that expects ConfigError.
    """
    try:
        cfg = from_dict(Config, data, source=source)
        check_cross_fields(cfg, source)
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(source=source, key="", problem=(
            f"cannot be validated ({type(exc).__name__}: {str(exc)[:200]})")) from exc
    return cfg


def _read_toml(path: str | Path, source: str) -> dict[str, Any]:
    """The parsed file; each way reading it can fail is a ConfigError naming it."""
    def refuse(problem: str) -> ConfigError:
        return ConfigError(source=source, key="", problem=problem)

    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise refuse("is a directory, not a configuration file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader, a device never end
            raise refuse("not a regular file")
        if info.st_size > _MAX_FILE_BYTES:
            raise refuse(f"{info.st_size} bytes: too large for a configuration file")
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise refuse("file not found") from exc
    except PermissionError as exc:
        raise refuse("permission denied: cannot read it") from exc
    except OSError as exc:
        raise refuse(f"cannot read it: {exc.strerror or exc}") from exc
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise refuse(f"not a usable path: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                     "save it as UTF-8") from exc
    return _parse_toml(text, refuse)


def _parse_toml(text: str, refuse: Callable[[str], ConfigError]) -> dict[str, Any]:
    """``tomllib.loads``, its failures as ``refuse(problem)`` (a ConfigError)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise refuse(f"not valid TOML: {exc}") from exc
    except ValueError as exc:  # tomllib converts integers with int(): its digit limit
        raise refuse(f"number too large: an integer of thousands of digits (at most "
                     f"{MAX_INT_DIGITS})") from exc
    except RecursionError as exc:
        raise refuse("nested too deeply (arrays or inline tables)") from exc


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """Split ``KEY=VALUE`` strings, parsing each value as a TOML value when possible."""
    out: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(source="--set", key=item[:80], problem="expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        except ValueError as exc:  # tomllib's int(): the digit limit
            raise ConfigError(source="--set", key=key, problem=(
                f"number too large: an integer of thousands of digits (at most "
                f"{MAX_INT_DIGITS})")) from exc
        except RecursionError as exc:
            raise ConfigError(source="--set", key=key, problem="nested too deeply") from exc
        out.append((key, value))
    return out


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, checking the key exists."""
    parts = key.split(".")
    cls: Any = Config
    node = data
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise ConfigError(source="--set", key=key,
                              problem=f"unknown key '{part}' (known: {', '.join(hints)})")
        if i == len(parts) - 1:
            node[part] = value
            return
        sub = _dataclass_in(hints[part])
        if sub is None:
            raise ConfigError(source="--set", key=key, problem=f"'{part}' is not a table")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(source="--set", key=key, problem=f"'{part}' is not a table")
        node, cls = child, sub


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating every value."""
    if not isinstance(data, Mapping):
        raise ConfigError(source=source, key=prefix.rstrip("."),
                          problem=f"expected a table, got {_show(data)}")
    klass: Any = cls  # classes are hashable; mypy cannot see it through the TypeVar
    hints = _hints(klass)
    fields = _fields(klass)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(source=source, key=prefix + unknown[0],
                          problem=f"unknown key (known: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _coerce(value, hints[name], key=key, source=source)
        _check_bounds(kwargs[name], field_doc(fields[name]), key=key, source=source)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - all fields have defaults
        raise ConfigError(source=source, key=prefix.rstrip("."), problem=str(exc)) from exc


def config_to_dict(obj: Any) -> Any:
    """The plain (JSON/TOML-compatible) form of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [config_to_dict(v) for v in obj]
    return obj


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    """Resolved annotations of a config class's fields (resolving them is slow; they never
    change). Only fields: a section's ``rules`` is a class variable, not a key."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _fields(cls: Any) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _dataclass_in(tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _show(value: Any, key: str = "") -> str:
    """The type and value for a message: short, secrets hidden, never raising."""
    if key in SECRET_KEYS:
        return f"{type(value).__name__} (value not shown: a secret)"
    if isinstance(value, int) and not isinstance(value, bool) and _too_many_digits(value):
        return f"an integer of about {_digits(value)} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # huge integers inside, or nesting
        text = "(too large to show)"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _digits(value: int) -> int:
    return int(abs(value).bit_length() * 0.30103) + 1  # without printing it


def _too_many_digits(value: int) -> bool:
    return abs(value) >= _INT_LIMIT


def _coerce(value: Any, tp: Any, *, key: str, source: str) -> Any:
    """Check ``value`` against type annotation ``tp`` and convert it (lists to tuples)."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(source=source, key=key, problem=f"expected {expected}, got "
                           f"{_show(value, key)}")

    if isinstance(value, int) and not isinstance(value, bool) and _too_many_digits(value):
        raise ConfigError(source=source, key=key, problem=(
            f"number too large: an integer of about {_digits(value)} digits (at most "
            f"{MAX_INT_DIGITS})"))
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key=key, source=source)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(source=source, key=key, problem=" or ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and str(value) in choices):
            return str(value)  # protocol = 5 means "5"
        if value not in choices:
            raise bad("one of " + ", ".join(repr(c) for c in choices))
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key=f"{key}[{i}]", source=source)
                         for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, key=f"{key}[{i}]", source=source)
                     for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise ConfigError(source=source, key=key, problem=f"unsupported type {tp!r}")


def _check_bounds(value: Any, doc: FieldDoc, *, key: str, source: str) -> None:
    """A number against the bounds its schema field declares."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if doc.lo is not None and (value <= doc.lo if doc.lo_open else value < doc.lo):
        relation = ">" if doc.lo_open else ">="
        raise ConfigError(source=source, key=key,
                          problem=f"expected a value {relation} {doc.lo:g}, got {value!r}")
    if doc.hi is not None and value > doc.hi:
        raise ConfigError(source=source, key=key,
                          problem=f"expected a value <= {doc.hi:g}, got {value!r}")


def check_cross_fields(cfg: Config, source: str) -> None:
    """The rules across keys: each section's ``rules`` (kept with it in
    :mod:`closedloop.config.schema`), sections in the schema's order; the first violation
    is raised, naming its key."""
    for section in cfg.sections():
        for rule in section.rules:
            for key, problem in rule.check(section, cfg):
                raise ConfigError(source=source, key=key, problem=problem)
