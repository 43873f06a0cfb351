"""An independent judge of a delivered pulse sequence: which safety rule, if any, it breaks.

This is the test oracle for the safety gate (:mod:`closedloop.stim.safety`,
:mod:`closedloop.stim.gated`). It is written from the rules' prose, not from the gate's
code, and it judges what *left the coil* (a driver's record of delivered pulses, with the
trigger, unit and role that the test harness knows produced each), never the gate's own
bookkeeping. It shares no table, constant or formula with the gate on purpose: a shared
mistake would make the two agree on a wrong answer.

The table of safe train durations
---------------------------------
:data:`TABLE4_S` is Table 4 of Rossi et al. 2009 (Clin Neurophysiol 120:2008-2039), taken
from Wassermann 1998 (Electroencephalogr Clin Neurophysiol 108:1-16, itself based on
Pascual-Leone et al. 1993 and Chen et al. 1997): the longest single rTMS train, in
seconds, that was safe at each frequency and intensity (% of resting motor threshold);
an entry ">x" (the longest duration tested, no upper limit found) is taken as x. Only the
rows 1-25 Hz and the columns 90-130 % are used.

Where it comes from: the full text of Rossi et al. 2009 is mirrored publicly (e.g.
vdocuments.mx, "transcranial-magnetic-stimulation-in-clinical-practice-and-guidelines-
safety"; pdffox.com, "safety-ethical-considerations-and-application-guidelines-for-the-use-
of-transcranial-magnetic"), but only its opening page could be read from here, not the
table. The values were therefore transcribed from the best secondary source found: a
public MATLAB class ``TMSTriggerer`` (method ``assertPulseTimesSafe``, commented "based on
table 4 from Rossi et al. 2009"), and cross-checked against the abstract of Chen et al.
1997 (Electroencephalogr Clin Neurophysiol 105:415-421, PubMed 9448642), which tested
trains "at 20 Hz for 1.6 s and a stimulus intensity of 110% of motor threshold", the
20 Hz / 110 % entry below. In that source the 90 % column repeats the 100 % one
(Wassermann's table starts at 100 %); this transcription does the same.

The rules (R1-R9) are documented on :func:`violations`.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TABLE4_FREQS_HZ", "TABLE4_INTENSITIES_MT", "TABLE4_S", "Limits", "Pulse",
           "max_train_s", "violations"]

EPS = 1e-9  # float round-off only; a boundary value is judged as the rule's prose says

TABLE4_FREQS_HZ = (1.0, 5.0, 10.0, 20.0, 25.0)
TABLE4_INTENSITIES_MT = (90.0, 100.0, 110.0, 120.0, 130.0)
# rows: frequency (Hz); columns: intensity (% MT) as in TABLE4_INTENSITIES_MT
TABLE4_S: dict[float, tuple[float, float, float, float, float]] = {
    1.0: (1800.0, 1800.0, 1800.0, 360.0, 50.0),
    5.0: (10.0, 10.0, 10.0, 10.0, 10.0),
    10.0: (5.0, 5.0, 5.0, 4.2, 2.9),
    20.0: (2.05, 2.05, 1.6, 1.0, 0.55),
    25.0: (1.28, 1.28, 0.84, 0.4, 0.24),
}

RUN_GAP_S = 1.0  # a trigger this close (or closer) to the last pulse continues its run
GROUP_GAP_S = 0.040      # pulses closer than this form one group (a burst)
MIN_GROUP_ONSETS_S = 0.19  # patterned runs: group onsets at most ~5 Hz
MAX_GROUP_PULSES = 5
MAX_PATTERNED_RUN_PULSES = 600
MAX_PULSES_PER_S = 25    # hard cap, any 1-s window
MIN_CROSS_TRIGGER_S = 0.010  # pulses of different triggers
# The rules' timing tolerance (part of their prose): a gap is judged 1 ms longer than
# measured where a shorter gap means a faster pattern (grouping, R4 onsets, R5 frequency,
# R7): the fire thread's timing error is not a faster train.
TIMING_TOL_S = 0.001


@dataclass(frozen=True)
class Pulse:
    """One pulse that left the coil.

    Attributes:
        t: When it left the coil (s).
        pct: Its intensity, % of maximum stimulator output.
        trigger: Id of the fire command that produced it (both pulses of a paired pulse,
            all pulses of a device burst, share it).
        unit: Id of the unit (one decision: a single trigger, or a train/burst/TBS block).
        role: ``"conditioning"`` or ``"test"`` for the two pulses of a paired trigger,
            ``"single"`` otherwise.
    """

    t: float
    pct: float
    trigger: int
    unit: int
    role: str = "single"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The parameters of the rules (what a configuration sets, after the hard caps)."""

    max_intensity_pct: float
    min_interval_s: float
    motor_threshold_pct: float | None
    train_duration_factor: float
    min_inter_train_s: float
    max_burst_intensity_mt: float
    max_pulses: int
    rate_window_s: float
    max_pulses_per_window: int
    max_pulses_per_day: int
    day_start: int
    max_units: int | None


def max_train_s(freq_hz: float, intensity_mt: float) -> float | None:
    """Table 4 at the next tabulated frequency and intensity at or above the given ones.

    Returns None when the train is not allowed at all (above 25 Hz or 130 % MT).
    """
    row = next((f for f in TABLE4_FREQS_HZ if freq_hz <= f * (1.0 + EPS)), None)
    col = next((i for i, level in enumerate(TABLE4_INTENSITIES_MT)
                if intensity_mt <= level * (1.0 + EPS)), None)
    if row is None or col is None:
        return None
    return TABLE4_S[row][col]


@dataclass(frozen=True)
class _Trigger:
    tid: int
    unit: int
    pulses: tuple[Pulse, ...]  # in time order

    @property
    def start(self) -> float:
        return self.pulses[0].t

    @property
    def paired(self) -> bool:
        return sorted(p.role for p in self.pulses) == ["conditioning", "test"]

    @property
    def device_burst(self) -> bool:
        return len(self.pulses) > 1 and not self.paired


def _f(t: float) -> str:
    return f"{t:.6f}"


def _triggers(pulses: Sequence[Pulse]) -> list[_Trigger]:
    by_id: dict[int, list[Pulse]] = {}
    for p in pulses:
        by_id.setdefault(p.trigger, []).append(p)
    out = []
    for tid, ps in by_id.items():
        ps.sort(key=lambda p: p.t)
        out.append(_Trigger(tid, ps[0].unit, tuple(ps)))
    out.sort(key=lambda tr: (tr.start, tr.tid))
    return out


def _runs(triggers: list[_Trigger]) -> list[list[_Trigger]]:
    runs: list[list[_Trigger]] = []
    for tr in triggers:
        # from the previous trigger's LAST pulse: a long-interval pair's test pulse and the
        # next trigger's first pulse belong together
        if runs and (tr.start - max(p.t for p in runs[-1][-1].pulses)
                     <= RUN_GAP_S + TIMING_TOL_S + EPS):
            runs[-1].append(tr)
        else:
            runs.append([tr])
    return runs


def _groups(run: list[_Trigger]) -> tuple[list[list[Pulse]], bool]:
    """The run's groups (pulses in time order) and whether any short gap is a burst gap."""
    pulses = sorted((p for tr in run for p in tr.pulses), key=lambda p: (p.t, p.trigger))
    paired = {tr.tid for tr in run if tr.paired}
    n = len(pulses)
    joined = [False] * max(n - 1, 0)  # joined[i]: pulses i and i+1 in one group
    short_gap = False
    for i in range(n - 1):
        a, b = pulses[i], pulses[i + 1]
        # a pair's own gap is exempt only while the pair is alone in its run
        pair_gap = (a.trigger == b.trigger and a.trigger in paired and len(run) == 1
                    and a.role == "conditioning" and b.role == "test")
        if b.t - a.t + TIMING_TOL_S < GROUP_GAP_S - EPS and not pair_gap:
            joined[i] = True
            short_gap = True
    # the two pulses of a paired trigger are always in one group (with all in between)
    where: dict[int, list[int]] = {}
    for i, p in enumerate(pulses):
        if p.trigger in paired:
            where.setdefault(p.trigger, []).append(i)
    for idx in where.values():
        for i in range(min(idx), max(idx)):
            joined[i] = True
    groups: list[list[Pulse]] = []
    for i, p in enumerate(pulses):
        if i > 0 and joined[i - 1]:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups, short_gap


def _count_in_window(times: list[float], window_s: float, limit: int) -> tuple[int, float]:
    """Most pulses in any window (t - window_s, t] ending on a pulse, and that t."""
    worst, at = 0, math.nan
    for j, t in enumerate(times):
        i = bisect.bisect_right(times, t - window_s + EPS)
        if j + 1 - i > worst:
            worst, at = j + 1 - i, t
            if worst > limit:
                break
    return worst, at


def violations(pulses: Sequence[Pulse], lim: Limits) -> list[str]:
    """Judge a delivered sequence; one line per broken rule, empty when it is allowed.

    The rules (times are when pulses left the coil; a trigger starts with its first
    pulse):

    - R1 every pulse: 0 <= pct <= max_intensity_pct (and <= 100).
    - R2 the first trigger of a unit starts >= min_interval_s after the start of the
      previous trigger (of any unit); triggers within one unit may be closer.
    - R3 a *run* is a maximal sequence of triggers each starting 1.0 s or less after
      the previous one's last pulse. A run of >= 2 triggers, or a trigger giving several
      pulses that is not a paired pulse (a device burst), is repetitive TMS and needs
      motor_threshold_pct.
    - R4 in a run, *groups* are maximal sets of consecutive pulses less than 40 ms apart;
      the two pulses of a paired trigger are always in one group; their mutual gap does
      not count as short while the pair is alone in its run. A run is *patterned* if some
      gap < 40 ms is not a lone pair's conditioning-test gap; a patterned run has no group
      of a single pulse. Patterned runs: every pulse <= max_burst_intensity_mt % of
      MT, each group <= 5 pulses, consecutive group onsets >= 0.19 s apart, <= 600
      pulses in the run.
    - R5 a run of >= 2 triggers that is not patterned is a regular train: its frequency
      is 1 / (smallest gap between consecutive pulses, pairs' own gaps included), its
      intensity the highest pulse in % of MT;
      above 25 Hz or 130 % MT it is not allowed; else its duration (last pulse - first
      pulse + smallest gap) must be <= Table 4 x train_duration_factor (looked up at the
      next tabulated frequency and intensity at or above; below 1 Hz the 1 Hz row, below
      90 % the 90 % column).
    - R6 after a repetitive run, the next trigger's first pulse comes strictly more than
      1.0 s, and at least min_inter_train_s, after the run's last pulse.
    - R7 hard caps: at most 25 pulses in any 1-s window (t - 1, t]; pulses of different
      triggers at least 10 ms apart.
    - R8 counts: total <= max_pulses; pulses in any (t - rate_window_s, t] <=
      max_pulses_per_window; day_start + total <= max_pulses_per_day; units <=
      max_units (when set).
    - R9 a unit is atomic: every trigger of a unit has, role by role, exactly the
      intensities of the unit's first trigger.
    """
    out: list[str] = []
    if not pulses:
        return out
    mt = lim.motor_threshold_pct
    ordered = sorted(pulses, key=lambda p: (p.t, p.trigger))
    triggers = _triggers(ordered)
    runs = _runs(triggers)

    # R1
    top = min(lim.max_intensity_pct, 100.0)
    for p in ordered:
        if not (-EPS <= p.pct <= top + EPS) or not math.isfinite(p.pct):
            out.append(f"R1 intensity: pulse at t={_f(p.t)} has {p.pct:g}% "
                       f"(allowed 0...{top:g}%)")

    # R2
    seen_units: set[int] = set()
    for k, tr in enumerate(triggers):
        if tr.unit in seen_units:
            continue
        seen_units.add(tr.unit)
        if k > 0:
            prev = triggers[k - 1]
            gap = tr.start - prev.start
            if gap < lim.min_interval_s - EPS:
                out.append(f"R2 min_interval: unit {tr.unit} starts at t={_f(tr.start)}, "
                           f"{gap:.6f} s after the trigger at t={_f(prev.start)} "
                           f"(< {lim.min_interval_s:g} s)")

    for r, run in enumerate(runs):
        first, last = run[0], run[-1]
        where = f"run t={_f(first.start)}...{_f(last.start)} ({len(run)} triggers)"
        repetitive = len(run) >= 2 or any(tr.device_burst for tr in run)
        # R3
        if repetitive and mt is None:
            out.append(f"R3 rTMS without motor threshold: {where}")
        groups, patterned = _groups(run)
        run_pulses = [p for g in groups for p in g]
        # R4
        if patterned:
            if mt is not None:
                level = max(p.pct for p in run_pulses) * 100.0 / mt
                if level > lim.max_burst_intensity_mt + EPS:
                    out.append(f"R4 burst intensity: {where} reaches {level:.3f}% MT "
                               f"(> {lim.max_burst_intensity_mt:g}% MT)")
            for g in groups:
                if len(g) > MAX_GROUP_PULSES:
                    out.append(f"R4 burst size: group at t={_f(g[0].t)} has {len(g)} "
                               f"pulses (> {MAX_GROUP_PULSES})")
            for g in groups[:-1]:  # (the run's last group may be a burst cut short)
                if len(g) == 1:
                    out.append(f"R4 single pulse in a pattern: t={_f(g[0].t)}")
            for g0, g1 in itertools.pairwise(groups):
                if g1[0].t - g0[0].t + TIMING_TOL_S < MIN_GROUP_ONSETS_S - EPS:
                    out.append(f"R4 burst rate: groups at t={_f(g0[0].t)} and "
                               f"t={_f(g1[0].t)} are {g1[0].t - g0[0].t:.6f} s apart "
                               f"(< {MIN_GROUP_ONSETS_S:g} s)")
            if len(run_pulses) > MAX_PATTERNED_RUN_PULSES:
                out.append(f"R4 patterned run length: {where} has {len(run_pulses)} "
                           f"pulses (> {MAX_PATTERNED_RUN_PULSES})")
        # R5
        elif len(run) >= 2 and mt is not None:
            in_run = sorted(run_pulses, key=lambda p: (p.t, p.trigger))
            gap = min(b.t - a.t for a, b in itertools.pairwise(in_run))  # pairs' gaps too
            level = max(p.pct for p in run_pulses) * 100.0 / mt
            freq = 1.0 / (gap + TIMING_TOL_S)
            table = max_train_s(freq, level)
            if table is None:
                out.append(f"R5 train not allowed: {where} at {freq:.3f} Hz, "
                           f"{level:.3f}% MT (table ends at 25 Hz, 130% MT)")
            else:
                duration = in_run[-1].t - in_run[0].t + gap
                allowed = table * lim.train_duration_factor
                if duration > allowed + EPS:
                    out.append(f"R5 train duration: {where} at {freq:.3f} Hz, "
                               f"{level:.3f}% MT lasts {duration:.6f} s (> {table:g} s x "
                               f"{lim.train_duration_factor:g} = {allowed:.6f} s)")
        # R6
        if repetitive and r + 1 < len(runs):
            end = max(p.t for p in run_pulses)
            nxt = runs[r + 1][0].start
            pause = nxt - end
            need = max(lim.min_inter_train_s, RUN_GAP_S)
            if pause <= RUN_GAP_S + EPS or pause < lim.min_inter_train_s - EPS:
                out.append(f"R6 inter-train pause: {where} ends at t={_f(end)}, next "
                           f"trigger at t={_f(nxt)} after {pause:.6f} s (need > 1 s and "
                           f">= {need:g} s)")

    # R7
    times = [p.t for p in ordered]
    worst, at = _count_in_window(times, 1.0, MAX_PULSES_PER_S)
    if worst > MAX_PULSES_PER_S:
        out.append(f"R7 rate cap: {worst} pulses in the 1 s up to t={_f(at)} "
                   f"(> {MAX_PULSES_PER_S})")
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.t - a.t + TIMING_TOL_S >= MIN_CROSS_TRIGGER_S - EPS:
                break
            if b.trigger != a.trigger:
                out.append(f"R7 pulse spacing: pulses at t={_f(a.t)} and t={_f(b.t)} of "
                           f"different triggers are {(b.t - a.t) * 1000:.3f} ms apart "
                           f"(< {MIN_CROSS_TRIGGER_S * 1000:g} ms)")

    # R8
    total = len(ordered)
    if total > lim.max_pulses:
        out.append(f"R8 session pulses: {total} delivered (> {lim.max_pulses}); the "
                   f"{lim.max_pulses + 1}th at t={_f(ordered[lim.max_pulses].t)}")
    worst, at = _count_in_window(times, lim.rate_window_s, lim.max_pulses_per_window)
    if worst > lim.max_pulses_per_window:
        out.append(f"R8 rate window: {worst} pulses in the {lim.rate_window_s:g} s up to "
                   f"t={_f(at)} (> {lim.max_pulses_per_window})")
    if lim.day_start + total > lim.max_pulses_per_day:
        out.append(f"R8 day pulses: {lim.day_start} before + {total} delivered "
                   f"(> {lim.max_pulses_per_day})")
    units = {p.unit for p in ordered}
    if lim.max_units is not None and len(units) > lim.max_units:
        out.append(f"R8 units: {len(units)} units delivered pulses (> {lim.max_units})")

    # R9
    first_of: dict[int, _Trigger] = {}
    for tr in triggers:
        ref = first_of.setdefault(tr.unit, tr)
        if tr is ref:
            continue
        want, got = _roles(ref), _roles(tr)
        same = want.keys() == got.keys() and all(
            len(want[k]) == len(got[k])
            and all(abs(x - y) <= EPS for x, y in zip(want[k], got[k], strict=True))
            for k in want)
        if not same:
            out.append(f"R9 unit not atomic: unit {tr.unit}'s trigger at t={_f(tr.start)} "
                       f"gives {_show(got)}, its first (t={_f(ref.start)}) {_show(want)}")
    return out


def _roles(tr: _Trigger) -> dict[str, tuple[float, ...]]:
    """The distinct intensities of each role in a trigger."""
    out: dict[str, set[float]] = {}
    for p in tr.pulses:
        out.setdefault(p.role, set()).add(p.pct)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def _show(roles: dict[str, tuple[float, ...]]) -> str:
    return ", ".join(f"{k} {'/'.join(f'{x:g}' for x in v)}%" for k, v in sorted(roles.items()))
