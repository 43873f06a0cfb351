"""The published limits of repetitive TMS, as pure functions over the delivered sequence.

The safety gate (:mod:`closedloop.stim.safety`) keeps a :class:`RunState`, a summary of
every pulse that left the coil, and asks :func:`judge` about each new *trigger* (what one
fire command delivers: one pulse, a paired pulse, or the pulses of a device burst) before
it is released, whatever produced it: the phase loop, a pattern, a protocol, ``stimulator
check``. The rules, and where they come from:

- **rTMS.** A trigger whose first pulse comes 1 s or less after the last pulse of the
  trigger before continues its *run* (repetitive TMS, from Table 4's 1 Hz row up; so does
  a trigger that gives a burst of pulses). A run needs the resting motor threshold (MT),
  since its limits are in % of it; without ``safety.motor_threshold_pct`` the second
  trigger of a run is refused.
- **Regular runs** obey Rossi et al. 2009 (Clin Neurophysiol 120:2008-2039), Table 4
  (after Wassermann 1998, Electroencephalogr Clin Neurophysiol 108:1-16): the maximum safe
  duration of a single train by frequency and intensity, looked up at the next higher
  tabulated frequency (of the run's smallest gap between consecutive pulses) and the next
  higher tabulated intensity (of the run's strongest pulse), times
  ``train_duration_factor`` (Chen et al. 1997, Electroencephalogr Clin Neurophysiol
  105:415-421, advise 0.75). Above 25 Hz or 130 % MT no regular run is allowed. The
  duration of a run is the time from its first to its last pulse plus its smallest gap
  (``n / f`` for a regular train).
- **Pauses.** After a run, the next trigger comes strictly more than 1 s (Chen et al. 1997
  found 1 s or less unsafe at 20 Hz: a trigger 1 s after a run continues it) and at least
  ``min_inter_train_s`` after its last pulse.
- **Patterned runs** (some pulses closer than 40 ms, i.e. faster than 25 Hz: theta-burst,
  100 Hz triplets; made of bursts only: a single pulse in one is refused, so that a burst
  does not take the pulses after it out of the table) are not covered by the table.
  Rossi et al. 2009 and 2021 (Clin Neurophysiol 132:269-306) report them safe at the
  intensities used (TBS at 80 % active MT) with one seizure at 100 % rest MT cTBS: every
  pulse at most ``max_burst_intensity_mt`` (≤ 100 % MT), bursts of at most 5 pulses
  starting at least 190 ms apart (TBS: every 200 ms), at most 600 pulses in a run (one
  cTBS block).
- The two pulses of a **paired pulse** (conditioning and test, one trigger) belong
  together while the pair is alone: its own interval (1-999 ms) is then neither a burst
  gap nor a train's gap (Rossi et al. 2009 rank paired-pulse TMS with single pulses). A
  run of paired triggers is rTMS like any other, judged on all its gaps, the pairs' own
  included (pairs at 3 ms every 200 ms are a pattern of doublets).
- Hard floors no configuration changes: pulses of different triggers at least 10 ms apart,
  pulses within a device burst too; time never runs backwards in the ledger.

Counts over windows (pulses per session, per day, per sliding window, the 25 pulses per
second hard cap) are the gate's; they need the pulse times, not only this summary.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

from closedloop.config.schema import HARD_MIN_TRAIN_IPI_S, HARD_RTMS_GAP_S
from closedloop.stim.reasons import GateReason

__all__ = ["RuleLimits", "RunState", "Trigger", "advance", "judge", "max_train_duration_s"]

# Rossi et al. 2009, Table 4 (Wassermann 1998): maximum safe duration (s) of a single
# rTMS train, by frequency (rows) and intensity in % of MT (columns). ">x" is taken as x.
# Secondary sources print the 20 and 25 Hz rows with the columns shifted by one (e.g.
# 2.05 s at 100 % MT and 1.6 s at 110 %, which Chen et al. 1997 tested at 20 Hz); where
# transcriptions disagree the stricter value is kept, as here.
_TABLE_FREQS = (1.0, 5.0, 10.0, 20.0, 25.0)
_TABLE_INTENS = (90.0, 100.0, 110.0, 120.0, 130.0)
_TABLE_S = (
    (1800.0, 1800.0, 1800.0, 360.0, 50.0),
    (10.0, 10.0, 10.0, 10.0, 10.0),
    (5.0, 5.0, 5.0, 4.2, 2.9),
    (2.05, 1.6, 1.0, 0.55, 0.35),
    (1.28, 0.84, 0.4, 0.24, 0.2),
)
BURST_GAP_S = 0.04  # pulses closer than this (> 25 Hz) form a burst
MAX_BURST_PULSES = 5
MIN_BURST_ONSET_S = 0.19
MAX_PATTERNED_PULSES = 600
# Gaps are judged this much longer than measured where a shorter gap means a faster
# pattern (the run's frequency, the burst gap, the hard floor, burst onsets): the fire
# thread's timing error (tens of microseconds, ~1 ms at worst) is not a faster train, so a
# 10 Hz train whose gaps are 99.9 ms is judged at 10 Hz, not on the 20 Hz row, and a
# 100 Hz burst whose gap is 9.9 ms is not below the 10 ms floor.
TIMING_TOLERANCE_S = 0.001
_EPS = 1e-9


def max_train_duration_s(freq_hz: float, intensity_mt_pct: float) -> float | None:
    """Longest safe regular train (Rossi 2009 Table 4), or None if outside the table."""
    i = bisect.bisect_left(_TABLE_FREQS, freq_hz - _EPS)
    j = bisect.bisect_left(_TABLE_INTENS, intensity_mt_pct - _EPS)
    if i >= len(_TABLE_FREQS) or j >= len(_TABLE_INTENS):
        return None
    return _TABLE_S[i][j]


@dataclass(frozen=True, slots=True)
class Trigger:
    """What one fire command delivers.

    Attributes:
        t: LSL time of its first pulse.
        pcts: Intensity of each pulse, % of maximum output, in firing order.
        offsets: Time of each pulse after ``t`` (the first is 0).
        paired: The two pulses are a conditioning and a test pulse.
    """

    t: float
    pcts: tuple[float, ...]
    offsets: tuple[float, ...] = (0.0,)
    paired: bool = False

    @property
    def last(self) -> float:
        return self.t + self.offsets[-1]

    @property
    def burst(self) -> bool:
        """A device burst: several pulses from one trigger that are not a pair."""
        return len(self.pcts) > 1 and not self.paired


@dataclass(frozen=True, slots=True)
class RuleLimits:
    """The parameters of the rules (already clamped by the hard caps)."""

    motor_threshold_pct: float | None
    train_duration_factor: float
    min_inter_train_s: float
    max_burst_intensity_mt: float


@dataclass(frozen=True, slots=True)
class RunState:
    """What the rules remember of the delivered sequence: the current run, summarised.

    All fields are monotonic summaries of the run so far, so judging a trigger against
    them is the same as judging the whole run again from its first pulse.
    """

    last_start: float = -math.inf  # start of the last trigger
    last_pulse: float = -math.inf
    run_first: float = -math.inf  # the run's first pulse
    run_triggers: int = 0
    run_pulses: int = 0
    # smallest gap between consecutive pulses of the run (a lone pair's interval aside)
    run_min_gap: float = math.inf
    run_max_pct: float = 0.0
    run_repetitive: bool = False
    run_patterned: bool = False
    group_size: int = 0  # pulses in the newest burst group
    group_onset: float = -math.inf
    run_max_group: int = 0
    run_min_group: int = 0  # pulses in the run's smallest completed or current group
    run_min_onset_gap: float = math.inf  # smallest gap between burst group onsets
    first_pair_gap: float = math.inf  # the interval of the run's first trigger, a pair


def continues(gap_s: float, tolerance_s: float) -> bool:
    """Whether a trigger ``gap_s`` after the last pulse continues its run: 1 s or less (a
    pulse every second is the 1 Hz row of Table 4; a pause must be longer than 1 s)."""
    return gap_s <= HARD_RTMS_GAP_S + tolerance_s + _EPS


def advance(s: RunState, trig: Trigger, tolerance_s: float = TIMING_TOLERANCE_S) -> RunState:
    """The state after ``trig`` was delivered.

    A trigger whose first pulse comes 1 s or less after the last pulse of the one before
    continues its run: runs are made of pulses, so the test pulse of a long-interval pair
    and the next trigger's first pulse are judged together (a pair every second with a
    980 ms interval is a 50 Hz doublet every second, not single pulses). A pair's own
    interval is exempt only while the pair is alone: in a run of pairs it is a gap like
    any other (pairs at 3 ms every 200 ms are a pattern of doublets).
    """
    tol = tolerance_s
    if continues(trig.t - s.last_pulse, tol):  # the run goes on
        first, triggers, pulses = s.run_first, s.run_triggers + 1, s.run_pulses
        min_gap, max_pct, repetitive = s.run_min_gap, s.run_max_pct, True
        patterned, group, onset = s.run_patterned, s.group_size, s.group_onset
        max_group, min_onset = s.run_max_group, s.run_min_onset_gap
        min_group, pair_gap = s.run_min_group, s.first_pair_gap
        if triggers == 2 and math.isfinite(pair_gap):  # the first pair is no longer alone
            min_gap = min(min_gap, pair_gap)
            patterned = patterned or pair_gap + tol < BURST_GAP_S - _EPS
    else:
        first, triggers, pulses, min_gap, max_pct, repetitive = trig.t, 1, 0, math.inf, 0.0, False
        patterned, group, onset, max_group, min_onset = False, 0, -math.inf, 0, math.inf
        min_group, pair_gap = 0, math.inf
    last = s.last_pulse
    for k, (off, pct) in enumerate(zip(trig.offsets, trig.pcts, strict=True)):
        t = trig.t + off
        in_pair = trig.paired and k == 1
        lone_pair = in_pair and triggers == 1  # its interval is the pair's, not a train's
        if in_pair and triggers == 1:
            pair_gap = t - last
        if pulses > 0 and not lone_pair:
            min_gap = min(min_gap, t - last)
        if pulses > 0 and (in_pair or t - last + tol < BURST_GAP_S - _EPS):
            group += 1
            patterned = patterned or (not lone_pair and t - last + tol < BURST_GAP_S - _EPS)
        else:
            if pulses > 0:
                min_onset = min(min_onset, t - onset)
                min_group = group if min_group == 0 else min(min_group, group)
            group, onset = 1, t
        max_group = max(max_group, group)
        last, pulses, max_pct = t, pulses + 1, max(max_pct, pct)
    return RunState(last_start=trig.t, last_pulse=last, run_first=first, run_triggers=triggers,
                    run_pulses=pulses, run_min_gap=min_gap, run_max_pct=max_pct,
                    run_repetitive=repetitive or trig.burst, run_patterned=patterned,
                    group_size=group, group_onset=onset, run_max_group=max_group,
                    run_min_group=min_group, run_min_onset_gap=min_onset,
                    first_pair_gap=pair_gap)


def judge(s: RunState, trig: Trigger, lim: RuleLimits,
          tolerance_s: float = TIMING_TOLERANCE_S) -> tuple[str | None, RunState]:
    """Whether ``trig`` may follow the sequence summarised by ``s``.

    Args:
        tolerance_s: How much longer than measured a gap is judged where a shorter gap
            means a faster pattern: :data:`TIMING_TOLERANCE_S` for pulses as they leave
            (the fire thread's timing error); 0 for a plan, which is judged as written.

    Returns:
        ``(None, state after it)`` when allowed, else ``(reason, s)``.
    """
    tol = tolerance_s
    if not math.isfinite(trig.t) or not trig.pcts or len(trig.pcts) != len(trig.offsets):
        return GateReason.INVALID_TRIGGER, s
    if trig.t < s.last_pulse:
        return GateReason.INVALID_TIME, s  # the clock went back, or overlapping triggers
    if trig.t - s.last_pulse + tol < HARD_MIN_TRAIN_IPI_S - _EPS:
        return GateReason.TRAIN_IPI, s
    if trig.burst and any(b - a + tol < HARD_MIN_TRAIN_IPI_S - _EPS
                          for a, b in itertools.pairwise(trig.offsets)):
        return GateReason.TRAIN_IPI, s
    if not continues(trig.t - s.last_pulse, tol) and s.run_repetitive:
        pause = trig.t - s.last_pulse
        if not (pause > HARD_RTMS_GAP_S + _EPS and pause >= lim.min_inter_train_s - _EPS):
            return GateReason.INTER_TRAIN, s
    new = advance(s, trig, tol)
    if not new.run_repetitive:
        return None, new
    mt = lim.motor_threshold_pct
    if mt is None:
        return GateReason.RTMS_NEEDS_MOTOR_THRESHOLD, s
    rel = new.run_max_pct / mt * 100.0
    if new.run_patterned:
        if rel > lim.max_burst_intensity_mt + _EPS:
            return GateReason.BURST_INTENSITY, s
        if new.run_max_group > MAX_BURST_PULSES:
            return GateReason.BURST_LENGTH, s
        if new.run_min_onset_gap + tol < MIN_BURST_ONSET_S - _EPS:
            return GateReason.BURST_RATE, s
        if new.run_pulses > MAX_PATTERNED_PULSES:
            return GateReason.TRAIN_PULSES, s
        # a pattern is made of bursts: single pulses in it would escape Table 4 (a burst,
        # then pulses at 5 Hz for minutes). A group is judged once the next one starts.
        if new.run_min_group == 1:
            return GateReason.BURST_MIXED, s
        return None, new
    if not math.isfinite(new.run_min_gap):  # one trigger whose pulses are one pair
        return None, new
    limit = max_train_duration_s(1.0 / (new.run_min_gap + tol), rel)
    if limit is None:
        return GateReason.TRAIN_OUTSIDE_TABLE, s
    duration = new.last_pulse - new.run_first + new.run_min_gap
    if duration > limit * lim.train_duration_factor + _EPS:
        return GateReason.TRAIN_DURATION, s
    return None, new
