"""The EEG clock guard (pure): whether a decision may be made on EEG of a given age.

No decision is made on EEG whose newest timestamp is in the future or older than
``safety.max_eeg_age_ms``: a phase at such a time cannot be trusted. A backlog passes; a
lasting mismatch is a fault, said once per episode, and the inlet is reopened (LSL's
dejitter would take minutes to forget a clock jump). The pipeline
(:mod:`closedloop.control.pipeline`) acts on the verdicts; offline, where the clock is
the data's own, every update passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CLOCK_GRACE_S", "MAX_FUTURE_S", "ClockGuard", "ClockVerdict", "guard_clock"]

MAX_FUTURE_S = 0.005  # EEG stamped later than now by more than this is a clock problem
CLOCK_GRACE_S = 2.0  # EEG stamped too old for this long is a clock problem, not a backlog


@dataclass(frozen=True, slots=True)
class ClockGuard:
    """What the guard remembers: a mismatch said, since when EEG has been too old, when
    the inlet was last reopened."""

    bad: bool = False
    behind_since: float | None = None
    last_reopen: float = -math.inf


@dataclass(frozen=True, slots=True)
class ClockVerdict:
    """What to do about one update."""

    ok: bool  # decide on this update
    fault: bool = False  # the mismatch begins: say so (once)
    recovered: bool = False  # consistent again after a mismatch
    reopen: bool = False  # reopen the EEG inlet now


_OK = ClockVerdict(True)


def guard_clock(g: ClockGuard, *, skew: float, now: float, max_age_s: float
                ) -> tuple[ClockGuard, ClockVerdict]:
    """Judge the newest sample's age ``skew`` (now minus its timestamp) at ``now``."""
    if -MAX_FUTURE_S <= skew <= max_age_s:
        if not g.bad and g.behind_since is None:
            return g, _OK  # (every update, nearly: nothing new to remember)
        return ClockGuard(last_reopen=g.last_reopen), ClockVerdict(True, recovered=g.bad)
    since = now if g.behind_since is None else g.behind_since
    fault = not g.bad and (skew < 0 or now - since > CLOCK_GRACE_S)
    bad = g.bad or fault
    reopen = bad and now - g.last_reopen > CLOCK_GRACE_S
    return (ClockGuard(bad, since, now if reopen else g.last_reopen),
            ClockVerdict(False, fault=fault, reopen=reopen))
