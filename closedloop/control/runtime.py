"""Settings that may change while the service runs, validated like the config file.

Only a whitelist of keys is live-settable (target phase, tolerance, band, amplitude
and confidence gates, interval, jitter, intensity): the fields marked ``live`` in
:mod:`closedloop.config.schema`. Each change is run through the same
validation as a TOML file (its section rebuilt, then the rules across sections), so an
MQTT payload gets exactly the same error messages (naming the key) and the same bounds,
including the safety limits: a value beyond them is refused, never clamped. Safety limits
themselves, streams and drivers can only change by restarting with another file.

Whatever the value (a payload's huge integer, a nested list where a number belongs), the
outcome is a new config or a ``ConfigError``: the loader's checks name the key, and a value
that trips a rule in some other way is refused naming the exception (see
:func:`closedloop.config.load.validated`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from closedloop.config.load import check_cross_fields, config_to_dict, from_dict
from closedloop.config.schema import Config, live_keys
from closedloop.errors import ConfigError

__all__ = ["LIVE_KEYS", "apply_live_settings", "live_value", "restart_keys"]

# short name (as in MQTT payloads) -> dotted config key: the fields the schema marks live
LIVE_KEYS: dict[str, str] = live_keys()


def live_value(cfg: Config, dotted: str) -> Any:
    """The value of a dotted key such as ``trigger.target_phase_deg``."""
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def apply_live_settings(cfg: Config, changes: Mapping[str, Any], *, source: str) -> Config:
    """A new configuration with ``changes`` (short or dotted keys) applied and validated.

    Raises:
        ConfigError: an unknown or not live-settable key, or an invalid value.
    """
    dotted = set(LIVE_KEYS.values())
    sections: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        full = LIVE_KEYS.get(key, key)
        if full not in dotted:
            raise ConfigError(source=source, key=key, problem=(
                "not settable while running (settable: " + ", ".join(LIVE_KEYS) + ")"))
        section, name = full.split(".")
        sections.setdefault(section, {})[name] = value
    # only the sections that change are rebuilt (the same checks, with the same key names,
    # as a whole file); a `set` runs on the service's event loop, between pipeline updates
    rebuilt = {}
    try:
        for section, values in sections.items():
            old = getattr(cfg, section)
            rebuilt[section] = from_dict(type(old), {**config_to_dict(old), **values},
                                         source=source, prefix=f"{section}.")
        new = dataclasses.replace(cfg, **rebuilt)
        check_cross_fields(new, source)
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(source=source, key=", ".join(sorted(changes))[:80], problem=(
            f"cannot be validated ({type(exc).__name__}: {str(exc)[:200]})")) from exc
    return new


def restart_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys that differ between two configs and are not live-settable."""
    a, b = config_to_dict(old), config_to_dict(new)
    live = set(LIVE_KEYS.values())
    out = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y and prefix[:-1] not in live:
            out.append(prefix[:-1])

    walk(a, b, "")
    return out
