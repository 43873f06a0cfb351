"""The one exception tree of closedloop.

::

    ClosedLoopError
    ├── ConfigError            a configuration file, override or payload is invalid
    ├── StreamError            something is wrong with an LSL stream
    │   ├── StreamNotFoundError    no stream matched the selector in time
    │   └── ChannelNotFoundError   a channel label the config asks for is absent
    ├── StimulatorError        the stimulator (or its driver) failed
    ├── ControlError           a command cannot be carried out now (state, staleness)
    ├── MissingDependencyError an optional dependency (an extra) is not installed
    └── DayCounterError        the participant's pulse counter cannot be read or written
                               (closedloop.stim.day_counter: the daily limit cannot be kept)

Safety refusals are *not* exceptions: a refused pulse is a normal, recorded outcome
(see :mod:`closedloop.stim.safety`). Lower-layer errors (pylsl, OSError) are re-raised as
the closest of these ``from exc`` so callers handle one tree.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ChannelNotFoundError",
    "ClosedLoopError",
    "ConfigError",
    "ControlError",
    "MissingDependencyError",
    "StimulatorError",
    "StreamError",
    "StreamNotFoundError",
]


class ClosedLoopError(Exception):
    """Base of every error raised by closedloop."""


class ConfigError(ClosedLoopError):
    """An invalid configuration value.

    Attributes:
        source: The file (or ``--set``, or payload) the value came from.
        key: The dotted key, e.g. ``trigger.tolerance_deg``.
        problem: What was expected and what was found.
    """

    def __init__(self, *, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class StreamError(ClosedLoopError):
    """An LSL stream could not be used."""


class StreamNotFoundError(StreamError):
    """No LSL stream matched a selector within the timeout.

    Attributes:
        role: Which configured stream (``eeg``, ``emg``, ``pulses``).
        predicate: The LSL predicate that was searched for.
        visible: Names of the streams that were visible instead.
    """

    def __init__(self, *, role: str, predicate: str, timeout_s: float,
                 visible: Sequence[str]) -> None:
        self.role = role
        self.predicate = predicate
        self.visible = list(visible)
        seen = ", ".join(self.visible) if self.visible else "none"
        super().__init__(
            f"streams.{role}: no LSL stream matching {predicate} found within "
            f"{timeout_s:g} s (visible streams: {seen})"
        )


class ChannelNotFoundError(StreamError):
    """A configured channel label is absent from a stream's metadata.

    Attributes:
        stream: The stream's name.
        missing: The labels asked for but not found.
        available: The labels the stream has.
    """

    def __init__(self, *, key: str, stream: str, missing: Sequence[str],
                 available: Sequence[str]) -> None:
        self.key = key
        self.stream = stream
        self.missing = list(missing)
        self.available = list(available)
        super().__init__(
            f"{key}: channel(s) {', '.join(self.missing)} not in stream '{stream}'; "
            f"it has: {', '.join(self.available) if self.available else '(no labels)'}"
        )


class StimulatorError(ClosedLoopError):
    """The stimulator driver failed (connection, command, read-back)."""


class ControlError(ClosedLoopError):
    """A command that is valid but cannot be carried out now (e.g. arm while faulted)."""


class MissingDependencyError(ClosedLoopError):
    """A command needs an optional dependency that is not installed.

    Attributes:
        module: The module that could not be imported (``matplotlib``).
        extra: The extra of closedloop that installs it (``report``).
        purpose: What needs it (``session reports``).
    """

    def __init__(self, *, module: str, extra: str, purpose: str) -> None:
        self.module = module
        self.extra = extra
        self.purpose = purpose
        super().__init__(f"{purpose} need {module}, which is not installed: "
                         f"pip install 'closedloop[{extra}]'")
