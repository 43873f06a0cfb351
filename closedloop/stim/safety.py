"""The safety gate: every trigger is judged against the ledger of pulses that really left.

The gate can only refuse. Its limits come from ``[safety]`` and are clamped again here by
the hard caps of :mod:`closedloop.config.schema`, so that neither a config file nor a
command can raise them. It keeps its own ledger of every pulse delivered (time, intensity
in % of maximum output and % of motor threshold, output, role) and judges each new trigger
against that history with the rules of :mod:`closedloop.stim.rules`, whatever produced
it: the phase loop, a pattern, a protocol, ``stimulator check``, a paired pulse.

A *unit* is what one decision schedules: one trigger, or several at given offsets (a
burst, a train, a block of theta-burst). A unit is atomic:

- its first trigger is checked for the whole unit (the rules simulated over all its
  triggers, every count for all its pulses), and its pulses are held against the session,
  day and protocol budgets until it ends;
- its intensities are fixed when its first trigger is checked: every later trigger must
  have exactly the same intensities (role by role) or it is refused, and no other unit
  can start while one is under way.

Counts are pulses, conditioning pulses included: pulses per session, per sliding window,
per calendar day and participant (a :class:`DayBudget`, reserved ahead in blocks and
settled when the session ends, so that a crash never forgets a pulse), units per session
(``stimulation.units``, the theta-burst session length), and pulses per protocol run. A
hard cap of 25 pulses in any second holds whatever the configuration. Re-arming resets
none of them.

EEG freshness is part of the gate: a pulse is never fired on a phase estimate made from a
stream that has stopped. The minimum interval between units is enforced here *and*,
independently, by the trigger policy.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from closedloop.config.schema import (
    HARD_MAX_BURST_INTENSITY_MT,
    HARD_MAX_COIL_TEMP_C,
    HARD_MAX_INTENSITY_PCT,
    HARD_MAX_PULSES_PER_DAY,
    HARD_MAX_PULSES_PER_S,
    HARD_MAX_PULSES_PER_SESSION,
    HARD_MAX_TRAIN_DURATION_FACTOR,
    HARD_MIN_INTER_TRAIN_S,
    HARD_MIN_INTERVAL_S,
    SafetyConfig,
)
from closedloop.stim.reasons import GateReason
from closedloop.stim.rules import (
    RuleLimits,
    RunState,
    Trigger,
    advance,
    continues,
    judge,
    max_train_duration_s,
)

__all__ = ["DayBudget", "LedgerPulse", "SafetyGate", "SafetyLimits", "Trigger",
           "max_train_duration_s"]

_EARLY_S = 0.002  # a later trigger of a unit may leave this much before its plan
# between the check and the pulse (the check path takes tens of microseconds; a serial fire
# command is in the driver's known latency): every trigger is judged at both ends of it
FIRE_UNCERTAINTY_S = 0.001
_MAX_LEDGER = HARD_MAX_PULSES_PER_SESSION
_SHAPE_CACHE = 32


@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Effective limits, already clamped by the hard caps."""

    min_interval_s: float
    max_intensity_pct: float
    max_pulses: int
    rate_window_s: float
    max_pulses_per_window: int
    max_eeg_age_s: float
    max_pulses_per_day: int = 2000
    motor_threshold_pct: float | None = None
    train_duration_factor: float = 0.75
    min_inter_train_s: float = 5.0
    max_burst_intensity_mt: float = 100.0
    max_coil_temp_c: float = 40.0

    @classmethod
    def from_config(cls, cfg: SafetyConfig) -> SafetyLimits:
        """Clamp the configured limits by the hard caps in code."""
        return cls(
            min_interval_s=max(cfg.min_interval_s, HARD_MIN_INTERVAL_S),
            max_intensity_pct=min(cfg.max_intensity_pct, HARD_MAX_INTENSITY_PCT),
            max_pulses=min(cfg.max_pulses, HARD_MAX_PULSES_PER_SESSION),
            rate_window_s=cfg.rate_window_s,
            max_pulses_per_window=min(cfg.max_pulses_per_window, HARD_MAX_PULSES_PER_SESSION),
            max_eeg_age_s=cfg.max_eeg_age_ms / 1000.0,
            max_pulses_per_day=min(cfg.max_pulses_per_day, HARD_MAX_PULSES_PER_DAY),
            motor_threshold_pct=cfg.motor_threshold_pct,
            train_duration_factor=min(cfg.train_duration_factor,
                                      HARD_MAX_TRAIN_DURATION_FACTOR),
            min_inter_train_s=max(cfg.min_inter_train_s, HARD_MIN_INTER_TRAIN_S),
            max_burst_intensity_mt=min(cfg.max_burst_intensity_mt,
                                       HARD_MAX_BURST_INTENSITY_MT),
            max_coil_temp_c=min(cfg.max_coil_temp_c, HARD_MAX_COIL_TEMP_C),
        )

    def rules(self) -> RuleLimits:
        return RuleLimits(motor_threshold_pct=self.motor_threshold_pct,
                          train_duration_factor=self.train_duration_factor,
                          min_inter_train_s=self.min_inter_train_s,
                          max_burst_intensity_mt=self.max_burst_intensity_mt)


class DayBudget(Protocol):
    """The pulses of a participant's day, shared by every process (see
    :class:`closedloop.stim.day_counter.DayCounter`)."""

    def reserve(self, n: int) -> int:
        """Count up to ``n`` more pulses today (durably); return how many were granted."""

    def release(self, n: int) -> None:
        """Give back ``n`` reserved pulses that were not delivered."""

    def count(self) -> int:
        """Today's pulses, reservations included."""

    def day(self) -> str:
        """The calendar day the budget counts in now (``YYYY-MM-DD``)."""


@dataclass(frozen=True, slots=True)
class LedgerPulse:
    """One pulse that left the coil, as the gate recorded it."""

    t: float
    pct: float  # % of maximum output
    mt_pct: float | None  # % of the resting motor threshold, when it is known
    role: str  # "single", "conditioning", "test" or "burst"
    unit: int  # the unit's number in the session (1, 2, ...)


@dataclass(slots=True)
class _Unit:
    number: int
    pcts: tuple[float, ...]
    offsets: tuple[float, ...]
    paired: bool
    triggers: int
    delivered: int = 0
    held: int = 0  # pulses still held against the budgets
    plan: tuple[float, ...] = ()  # planned time of each trigger, when the unit has a plan
    credit_day: str | None = None  # the day whose credit its pulses were taken from


class SafetyGate:
    """Judges triggers against the limits and the ledger; records what was delivered.

    Args:
        limits: The clamped limits.
        day: The participant's daily budget (None: counted in this process only, from 0).
        max_units: Most units in the session (``stimulation.units``, a TBS session).
    """

    def __init__(self, limits: SafetyLimits, *, day: DayBudget | None = None,
                 max_units: int | None = None) -> None:
        self.limits = limits
        self._rules = limits.rules()
        self.day = day
        self.max_units = max_units
        self.run = RunState()
        self.fired = 0  # pulses delivered this session
        self.units = 0  # units started this session
        self.ledger: deque[LedgerPulse] = deque(maxlen=_MAX_LEDGER)
        self._times: list[float] = []  # pulse times (sorted), from index _t0 on
        self._t0 = 0
        self._unit: _Unit | None = None
        self.budget: int | None = None  # pulses left for the running protocol
        self._credit = 0  # pulses reserved in the day budget and not used yet
        self.day_exhausted = False
        self.day_count = 0 if day is None else day.count()
        self._credit_day: str | None = None  # the day the credit was reserved on
        self._credit_lock = threading.Lock()
        self._shapes: dict[tuple[object, ...], tuple[str | None, int]] = {}

    # -- budgets -------------------------------------------------------------------------
    @property
    def unit_active(self) -> bool:
        """Whether a unit of several triggers is being delivered."""
        return self._unit is not None

    @property
    def credit(self) -> int:
        """Pulses reserved in the day budget and not yet used."""
        return self._credit

    def needs_credit(self, keep: int) -> bool:
        """Whether the day budget should be topped up: a new day began (yesterday's credit
        is not today's), or fewer than ``keep`` pulses are held and the day's limit has not
        been reached."""
        if self.day is None:
            return False
        if self.day.day() != self._credit_day:
            return True
        return not self.day_exhausted and self._credit < keep

    def top_up(self, target: int) -> None:
        """Reserve day pulses until ``target`` are held (does file I/O: not on the fire
        path). Raises what the day budget raises."""
        if self.day is None:
            return
        today = self.day.day()
        if today != self._credit_day:  # a new day: yesterday's credit stays yesterday's
            with self._credit_lock:
                self._credit = 0
            self._credit_day = today
        want = target - self._credit
        if want <= 0:
            return
        granted = self.day.reserve(want)
        with self._credit_lock:
            self._credit += granted
        self.day_exhausted = granted < want
        self.day_count = self.day.count()

    def settle(self) -> None:
        """Give the unused reservation back (at the end of a session)."""
        with self._credit_lock:
            unused, self._credit = self._credit, 0
        if self.day is not None and unused:
            self.day.release(unused)
            self.day_count = self.day.count()

    def set_budget(self, pulses: int | None) -> None:
        """Pulses the running protocol may still deliver (None: no protocol limit)."""
        self.budget = pulses

    # -- checks --------------------------------------------------------------------------
    def _intensity_reason(self, trig: Trigger) -> str | None:
        for pct in trig.pcts:
            if not math.isfinite(pct) or pct < 0:
                return GateReason.INVALID_INTENSITY
            if pct > self.limits.max_intensity_pct:
                return GateReason.MAX_INTENSITY
        return None

    def _eeg_reason(self, eeg_age_s: float | None) -> str | None:
        if eeg_age_s is None or not eeg_age_s <= self.limits.max_eeg_age_s:
            return GateReason.EEG_STALE
        return None

    def _recent(self, t: float, window: float) -> int:
        """Pulses of the ledger later than ``t - window`` (counted, never dropped here: a
        refused request at a strange time must not erase the history)."""
        times = self._times
        return len(times) - bisect.bisect_right(times, t - window, lo=self._t0)

    def _shape(self, trig: Trigger, offsets: Sequence[float]) -> tuple[str | None, int]:
        """The rules over a unit starting a new run (independent of the history before
        it), and its most pulses in any second; cached per shape."""
        key = (trig.pcts, trig.offsets, trig.paired, tuple(offsets))  # not the time
        hit = self._shapes.get(key)
        if hit is not None:
            return hit
        reason, _ = self._simulate(RunState(), trig, offsets, 0.0, tolerance_s=0.0)
        times = sorted(off + p for off in offsets for p in trig.offsets)
        most, j = 0, 0
        for i, x in enumerate(times):
            while times[j] <= x - 1.0:
                j += 1
            most = max(most, i - j + 1)
        if len(self._shapes) >= _SHAPE_CACHE:
            self._shapes.clear()
        self._shapes[key] = (reason, most)
        return reason, most

    def _judge(self, trig: Trigger) -> str | None:
        """The rules for ``trig`` leaving at any moment of [t, t + the time a fire takes]:
        a pulse that leaves a little later than judged must not cross a rule's boundary
        (a run that ends, a pause that is too short) unjudged."""
        reason, _ = judge(self.run, trig, self._rules)
        if reason is None:
            later = Trigger(trig.t + FIRE_UNCERTAINTY_S, trig.pcts, trig.offsets, trig.paired)
            reason, _ = judge(self.run, later, self._rules)
        return reason

    def prepare(self, trig: Trigger, offsets: Sequence[float]) -> None:
        """Judge the shape of a unit ahead (a 600-pulse theta-burst block takes a few
        milliseconds), so that its first trigger is not delayed by it on the fire path."""
        self._shape(Trigger(0.0, trig.pcts, trig.offsets, trig.paired), offsets)

    def _simulate(self, s: RunState, trig: Trigger, offsets: Sequence[float],
                  t0: float, *, tolerance_s: float) -> tuple[str | None, RunState]:
        for off in offsets:
            reason, s = judge(s, Trigger(t0 + off, trig.pcts, trig.offsets, trig.paired),
                              self._rules, tolerance_s)
            if reason is not None:
                return reason, s
        return None, s

    def check_start(self, trig: Trigger, *, offsets: Sequence[float] = (0.0,),
                    eeg_age_s: float | None) -> str | None:
        """Whether a unit may start with ``trig``; its triggers start at ``trig.t`` +
        ``offsets``, each like ``trig``. Returns None or the reason."""
        lim = self.limits
        reason = self._intensity_reason(trig) or self._eeg_reason(eeg_age_s)
        if reason is not None:
            return reason
        if not math.isfinite(trig.t):
            return GateReason.INVALID_TIME
        if (not offsets or offsets[0] != 0.0
                or any(not b > a for a, b in itertools.pairwise(offsets))):
            return GateReason.INVALID_TRAIN
        if self._unit is not None:
            return GateReason.UNIT_IN_PROGRESS
        if trig.t - self.run.last_start < lim.min_interval_s - 1e-9:  # (float round-off)
            return GateReason.MIN_INTERVAL
        if self.max_units is not None and self.units >= self.max_units:
            return GateReason.MAX_UNITS
        n = len(offsets) * len(trig.pcts)
        if self.fired + n > lim.max_pulses:
            return GateReason.MAX_PULSES
        if self.budget is not None and n > self.budget:
            return GateReason.PROTOCOL_PULSES
        if self.day is None:
            if self.fired + n > lim.max_pulses_per_day:
                return GateReason.MAX_PULSES_PER_DAY
        elif n > self._credit or self.day.day() != self._credit_day:
            # (after midnight the credit reserved yesterday is not today's)
            return (GateReason.MAX_PULSES_PER_DAY
                    if self.day_exhausted and self.day.day() == self._credit_day
                    else GateReason.DAY_COUNT_PENDING)
        if self._recent(trig.t, lim.rate_window_s) + n > lim.max_pulses_per_window:
            return GateReason.MAX_RATE
        if not continues(trig.t - self.run.last_pulse, 0.0):  # a new run
            reason = self._judge(trig)
            if reason is None:
                reason, most = self._shape(trig, offsets)
                if reason is None and self._recent(trig.t, 1.0) + most > HARD_MAX_PULSES_PER_S:
                    reason = GateReason.HARD_RATE
            return reason
        reason = self._judge(trig)
        if reason is None:  # the plan as written (the later triggers are judged again)
            reason, _ = self._simulate(self.run, trig, offsets, trig.t, tolerance_s=0.0)
        if reason is None and self._recent(trig.t, 1.0) + n > HARD_MAX_PULSES_PER_S:
            reason = GateReason.HARD_RATE
        return reason

    def check_next(self, trig: Trigger, *, planned: float, max_lateness_s: float,
                   eeg_age_s: float | None, index: int | None = None) -> str | None:
        """Whether a later trigger of the unit under way may leave now (``index``: which of
        its triggers the caller means; it must be the next one, at its planned time)."""
        unit = self._unit
        if unit is None:
            return GateReason.NO_UNIT
        if index is not None and (index != unit.delivered or (
                unit.plan and abs(planned - unit.plan[index]) > _EARLY_S)):
            return GateReason.NOT_THE_UNIT  # another unit's trigger, or out of order
        reason = self._eeg_reason(eeg_age_s) or self._intensity_reason(trig)
        if reason is not None:
            return reason
        if (trig.paired != unit.paired or len(trig.pcts) != len(unit.pcts)
                or any(abs(a - b) > 1e-9 for a, b in zip(trig.pcts, unit.pcts, strict=True))
                or any(abs(a - b) > 1e-9
                       for a, b in zip(trig.offsets, unit.offsets, strict=True))):
            return GateReason.UNIT_INTENSITY_CHANGED
        if not planned - _EARLY_S <= trig.t <= planned + max_lateness_s:
            return GateReason.LATE
        if self._recent(trig.t, 1.0) + len(trig.pcts) > HARD_MAX_PULSES_PER_S:
            return GateReason.HARD_RATE
        if (self._recent(trig.t, self.limits.rate_window_s) + len(trig.pcts)
                > self.limits.max_pulses_per_window):
            return GateReason.MAX_RATE
        return self._judge(trig)

    # -- records -------------------------------------------------------------------------
    def commit(self, trig: Trigger, *, start: bool, triggers: int = 1,
               plan: Sequence[float] = ()) -> None:
        """Record a trigger that fired (or may have: a failed fire counts too), at the
        time it left.

        Args:
            start: The first trigger of a unit of ``triggers`` triggers.
            plan: With ``start``: the planned time of each of the unit's triggers; a later
                trigger must then come at its own (see :meth:`check_next`).
        """
        actual = trig.t
        if start:
            self.units += 1
            n = triggers * len(trig.pcts)
            self._unit = _Unit(self.units, trig.pcts, trig.offsets, trig.paired, triggers,
                               held=n, plan=tuple(plan), credit_day=self._credit_day)
            with self._credit_lock:
                if self.day is not None:
                    self._credit -= n
            if self.budget is not None:
                self.budget -= n
        unit = self._unit
        number = unit.number if unit is not None else self.units
        mt = self.limits.motor_threshold_pct
        for k, (off, pct) in enumerate(zip(trig.offsets, trig.pcts, strict=True)):
            role = ("conditioning" if k == 0 else "test") if trig.paired else (
                "burst" if trig.burst else "single")
            self.ledger.append(LedgerPulse(actual + off, pct,
                                           None if mt is None else pct / mt * 100.0,
                                           role, number))
            bisect.insort(self._times, actual + off, lo=self._t0)
        self._forget(actual)
        self.run = advance(self.run, trig)
        self.fired += len(trig.pcts)
        if self.day is None:
            self.day_count += len(trig.pcts)
        if unit is not None:
            unit.delivered += 1
            unit.held -= len(trig.pcts)
            if unit.delivered >= unit.triggers:
                self._unit = None

    def _forget(self, now: float) -> None:
        """Drop pulse times older than the longest window, once a pulse has left."""
        times, longest = self._times, max(self.limits.rate_window_s, 1.0)
        self._t0 = bisect.bisect_right(times, now - longest, lo=self._t0)
        if self._t0 > 4096:
            del times[:self._t0]
            self._t0 = 0

    def end_unit(self) -> None:
        """The unit under way stopped early: its undelivered pulses go back."""
        unit, self._unit = self._unit, None
        if unit is None or unit.held <= 0:
            return
        with self._credit_lock:
            # pulses taken from yesterday's credit stay yesterday's: never today's credit
            if self.day is not None and unit.credit_day == self._credit_day:
                self._credit += unit.held
        if self.budget is not None:
            self.budget += unit.held
