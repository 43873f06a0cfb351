"""The configuration reference, generated from the schema: markdown and JSON Schema.

Pure functions of :mod:`closedloop.config.schema` (no I/O): ``closedloop config-reference``
prints them, and ``docs/configuration.md``, ``docs/closedloop-config.schema.json`` and
``docs/closedloop-set.schema.json`` are their output, committed and checked to be up to
date by the tests. The JSON Schemas follow draft 2020-12 (https://json-schema.org): the
configuration's, for editors that validate TOML against a JSON Schema and for tools that
write configurations; the MQTT ``set`` payload's, for clients of the control plane. Keys
that may change while the service runs carry ``"x-live": true``.

What a JSON Schema cannot say (rules across keys, such as ``stimulator.intensity_pct`` at
most ``safety.max_intensity_pct``) is checked by the loader; the markdown reference lists
each section's rules under its table, in the words of their docstrings
(:class:`closedloop.config.schema.Rule`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin, get_type_hints

from closedloop.config.schema import (
    Config,
    FieldDoc,
    Section,
    field_doc,
    live_keys,
    tables_in,
)

__all__ = ["FORMATS", "config_json_schema", "markdown_reference", "render", "set_json_schema"]

FORMATS = ("markdown", "json", "set-json", "refusals")
_DRAFT = "https://json-schema.org/draft/2020-12/schema"


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    """One key of the reference: a setting, or a table that holds settings."""

    key: str
    tp: Any
    doc: FieldDoc
    default: Any
    absent: bool  # an optional table that is not there by default


def _rows(cls: type, default: Any, prefix: str) -> Iterator[_Row]:
    """Every key under ``cls`` with its default; tables before their keys."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, doc = hints[f.name], field_doc(f)
        value = getattr(default, f.name) if default is not None else f.default
        key = prefix + f.name
        table = _table(tp)
        yield _Row(key, tp, doc, value, absent=table is not None and value is None)
        if table is not None:
            repeated = get_origin(tp) is tuple
            yield from _rows(table, None if repeated else value,
                             key + ("[]." if repeated else "."))


def _table(tp: Any) -> type | None:
    """The config class a field holds (itself, optional, or a list of them)."""
    found = tables_in(tp)
    return found[0] if found else None


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


# -- markdown ----------------------------------------------------------------------------

_INTRO = """\
# Configuration reference

<!-- Generated from closedloop/config/schema.py by
     `closedloop config-reference --format markdown -o docs/configuration.md`;
     do not edit by hand (a test fails when it is out of date). -->

The configuration is a TOML file, validated on load: an unknown key, a wrong type or a
value out of range stops the service with the file, the key and what was expected.
`closedloop check-config FILE` validates a file without running anything, and
`check-config FILE --print` shows the effective configuration (secrets redacted).

Any key can be overridden on the command line with `--set section.key=value`; the value
is read as TOML (`180`, `[8, 12]`, `"auto"`, `true`) and taken as a plain string
otherwise.

Keys with a name in the **live** column can change while the service runs: over MQTT
with `set` and that short name (see [MQTT](mqtt.md)), or by editing the file and sending
SIGHUP (`systemctl reload closedloop`). A change to any other key needs a restart; a
reload that changes one is refused and the running configuration kept. Live changes are
validated exactly like the file, with the same messages and bounds: a value beyond a
safety limit is refused, never clamped.

The same information, machine-readable (JSON Schema, draft 2020-12):
[closedloop-config.schema.json](closedloop-config.schema.json) for a whole
configuration (editors that check TOML against a JSON Schema can use it), and
[closedloop-set.schema.json](closedloop-set.schema.json) for the payload of the MQTT
`set` command. Rules across keys (such as `stimulator.intensity_pct` at most
`safety.max_intensity_pct`, or a paired pulse needing a driver that can give one) are
checked on load and on every live change too, and listed under the table of the section
whose key a refusal names; a JSON Schema cannot express them.
"""


def markdown_reference() -> str:
    """The configuration reference page (``docs/configuration.md``)."""
    live = {dotted: short for short, dotted in live_keys().items()}
    parts = [_INTRO]
    hints = get_type_hints(Config)
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        summary = _md_cell(_summary(cls))
        parts.append(f"\n## `[{f.name}]`\n\n{summary}\n\n"
                     "| key | type | default | range | live | description |\n"
                     "|---|---|---|---|---|---|\n")
        for row in _rows(cls, getattr(Config(), f.name), f.name + "."):
            short = live.get(row.key)
            parts.append("| " + " | ".join((
                f"`{row.key}`", _md_type(row.tp), _md_default(row),
                _md_range(row.doc), f"`{short}`" if short else "",
                _md_cell(row.doc.help))) + " |\n")
        parts.append(_md_rules(cls))
    return "".join(parts)


def _md_rules(cls: type[Section]) -> str:
    """The section's rules across keys, one item each in its docstring's words (RST
    literals as code spans); nothing when it has none."""
    if not cls.rules:
        return ""
    items = "".join(f"- {_md_text(r.text.replace('``', '`'))}\n" for r in cls.rules)
    return f"\n**Rules across keys:**\n\n{items}"


def _summary(cls: type) -> str:
    """The first line of a config class's docstring, its RST literals as markdown's."""
    return (cls.__doc__ or "").strip().splitlines()[0].replace("``", "`")


def _md_type(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_md_type(a) for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is Literal:
        choices = ", ".join(f"`{_toml(c)}`" for c in get_args(tp))
        return choices if len(get_args(tp)) == 1 else f"one of {choices}"
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if _table(args[0]) is not None:
                return "list of tables"
            return f"list of {_md_type(args[0])}s"
        return "[" + ", ".join(_md_type(a) for a in args) + "]"
    if _table(tp) is not None:
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def _md_default(row: _Row) -> str:
    if row.absent:
        return "absent"
    if _table(row.tp) is not None and get_origin(row.tp) is not tuple:
        return ""  # a table: its keys have the defaults
    return "none" if row.default is None else f"`{_toml(row.default)}`"


def _md_range(doc: FieldDoc) -> str:
    lo = None if doc.lo is None else _number(doc.lo)
    hi = None if doc.hi is None else _number(doc.hi)
    if lo is not None and hi is not None:
        return f"{lo} to {hi}" if not doc.lo_open else f"> {lo}, ≤ {hi}"
    if lo is not None:
        return f"> {lo}" if doc.lo_open else f"≥ {lo}"
    if hi is not None:
        return f"≤ {hi}"
    return ""


def _md_cell(text: str) -> str:
    """Help text for a table cell: pipes escaped, and as :func:`_md_text`."""
    return _md_text(text.replace("|", "\\|"))


def _md_text(text: str) -> str:
    """Text for markdown: outside code spans, the characters markdown would read as HTML
    or emphasis escaped (``<instance>``, ``magstim-*``)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace("*", "\\*"))
    return "`".join(parts)


def _number(value: float) -> str:
    """A number as written in TOML, without a needless ``.0``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _toml(value: Any) -> str:
    """A value as written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


# -- JSON Schema -------------------------------------------------------------------------

def config_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a whole configuration."""
    live = set(live_keys().values())
    schema = _object(Config, Config(), "", live)
    return {"$schema": _DRAFT, "$id": "closedloop-config.schema.json",
            "title": "closedloop configuration", **schema}


def set_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the MQTT ``set`` command's payload.

    The live keys under their short names, plus the command's ``ts`` (required: the
    service refuses a ``set`` without it) and ``id``; at least one live key.
    """
    props: dict[str, Any] = {}
    for short, dotted in live_keys().items():
        section, name = dotted.split(".")
        cls = type(getattr(Config(), section))
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        doc = field_doc(f)
        props[short] = {**_value(get_type_hints(cls)[name], doc),
                        "description": f"{doc.help} (the configuration's `{dotted}`)",
                        "x-live": True}
    return {
        "$schema": _DRAFT, "$id": "closedloop-set.schema.json",
        "title": "closedloop MQTT set command",
        "description": "Payload of <prefix>cmd/set: live settings by their short names "
                       "(the service also takes their dotted configuration keys). Each "
                       "value is validated by the service like the configuration file, "
                       "with the rules across keys; a refused set changes nothing.",
        "type": "object",
        "properties": {
            "ts": {"type": "number", "description": "the sender's Unix time in seconds; "
                   "refused when older than mqtt.max_command_age_s"},
            "id": {"type": ["string", "integer"],
                   "description": "echoed in the reply"},
            **props,
        },
        "required": ["ts"],
        "anyOf": [{"required": [k]} for k in props],
        "additionalProperties": False,
    }


def _object(cls: type, default: Any, prefix: str, live: set[str]) -> dict[str, Any]:
    hints = get_type_hints(cls)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, doc = hints[f.name], field_doc(f)
        value = getattr(default, f.name) if default is not None else f.default
        key = prefix + f.name
        prop = _value(tp, doc, value, key + ".", live)
        prop["description"] = doc.help
        if _table(tp) is None and value is not None:
            prop["default"] = _json_default(value)
        if key in live:
            prop["x-live"] = True
        props[f.name] = prop
    return {"type": "object", "description": _summary(cls),
            "properties": props, "additionalProperties": False}


def _value(tp: Any, doc: FieldDoc, default: Any = None, prefix: str = "",
           live: set[str] | None = None) -> dict[str, Any]:
    """The schema of a value of annotation ``tp`` (bounds from ``doc`` on numbers)."""
    if _is_union(tp):
        options = [_value(a, doc, default, prefix, live) for a in get_args(tp)
                   if a is not type(None)]
        if type(None) in get_args(tp):  # TOML has no null; JSON forms of a config have it
            if len(options) == 1 and isinstance(options[0].get("type"), str):
                return {**options[0], "type": [options[0]["type"], "null"]}
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if get_origin(tp) is Literal:
        choices: list[Any] = list(get_args(tp))
        choices += [n for c in get_args(tp) if (n := _numeric(c)) is not None]
        return {"enum": choices}
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _value(args[0], doc, None, prefix, live)}
        items = [_value(a, doc, None, prefix, live) for a in args]
        if all(i == items[0] for i in items):
            return {"type": "array", "items": items[0], "minItems": len(items),
                    "maxItems": len(items)}
        return {"type": "array", "prefixItems": items, "items": False}
    table = _table(tp)
    if table is not None:
        return _object(table, default, prefix, live or set())
    if tp is bool:
        return {"type": "boolean"}
    if tp is str:
        return {"type": "string"}
    out: dict[str, Any] = {"type": "integer" if tp is int else "number"}
    if doc.lo is not None:
        out["exclusiveMinimum" if doc.lo_open else "minimum"] = doc.lo
    if doc.hi is not None:
        out["maximum"] = doc.hi
    return out


def _numeric(choice: str) -> int | float | None:
    """The number a string choice may be written as (``protocol = 5`` means "5")."""
    for kind in (int, float):
        try:
            number = kind(choice)
        except ValueError:
            continue
        if str(number) == choice and math.isfinite(number):
            return number
    return None


def _json_default(value: Any) -> Any:
    """A setting's default as JSON (tuples as lists; tables have no default of their own)."""
    if isinstance(value, tuple | list):
        return [_json_default(v) for v in value]
    return value


def render(fmt: str) -> str:
    """The text ``closedloop config-reference --format FMT`` writes (see :data:`FORMATS`)."""
    if fmt == "markdown":
        return markdown_reference()
    if fmt == "json":
        return json.dumps(config_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "set-json":
        return json.dumps(set_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "refusals":  # the refusal reasons of every layer (docs/refusals.md)
        from closedloop.control.refusals import markdown  # noqa: PLC0415

        return markdown()
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
