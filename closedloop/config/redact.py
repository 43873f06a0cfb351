"""The configuration as it may be written down: secrets replaced.

Every record of a configuration (the event log's ``session_start``, the XDF header,
``closedloop check-config --print``) goes through :func:`redacted_config`, so that the
broker password and the stimulator's unlock code never reach a file that is shared with
the data. TLS keys and certificates are configured as paths, and only the paths are
recorded: their contents are never read into any record.
"""

from __future__ import annotations

from typing import Any

from closedloop.config.load import SECRET_KEYS, config_to_dict
from closedloop.config.schema import Config

__all__ = ["REDACTED", "redacted_config"]

REDACTED = "<redacted>"


def redacted_config(cfg: Config) -> dict[str, Any]:
    """The plain dict of ``config_to_dict(cfg)`` with each secret that is set (see
    :data:`~closedloop.config.load.SECRET_KEYS`: ``mqtt.password``,
    ``stimulator.unlock_code``) replaced by ``"<redacted>"``; nothing else changed.

    A secret that is not set (None, or empty) stays as it is: the record then shows that
    there is none.
    """
    data: dict[str, Any] = config_to_dict(cfg)
    for dotted in sorted(SECRET_KEYS):
        section, name = dotted.split(".")
        if data[section][name]:
            data[section][name] = REDACTED
    return data
