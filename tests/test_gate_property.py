"""The safety gate driven as a hostile operator would, judged by an independent oracle.

A fake clock and :class:`~closedloop.stim.fake.FakeStimulator` stand in for time and the
device; :class:`~closedloop.stim.gated.GatedStimulator` with a
:class:`~closedloop.stim.safety.SafetyGate` is the system under test. Each example draws
limits (with and without a motor threshold, short and long minimum intervals) and a list
of operations: advance the clock (mostly a little, so that much fires), start a unit
(single, a train, a burst, a TBS chunk, an arbitrary pattern), fire its next trigger (on
time, slightly late, early, far too late), fire a wrong index, change the intensity or the
paired pulse between and inside units, turn a knob or switch the front-panel mode (the
driver's watch thread reads it back at once), a driver fault, a failing fire, disarm,
arm, reconnect. The oracle (:mod:`tests.safety_oracle`) then judges the pulses the fake
device delivered (its ``delivered`` list: the truth), each labelled with the trigger,
unit and role the harness knows produced it, never with the gate's own records.

What is out of scope here, and tested on its own below: a knob turned and fired on before
any read-back (the gate cannot know; :mod:`closedloop.stim.gated` says so), a device whose
read-back lies (``pulses_per_trigger_fault``), reloading the limits.

``HYPOTHESIS_PROFILE=thorough`` runs many more examples, not derandomized.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from closedloop.config.schema import SafetyConfig
from closedloop.errors import StimulatorError
from closedloop.stim.fake import FakeStimulator
from closedloop.stim.gated import GatedStimulator
from closedloop.stim.safety import SafetyGate, SafetyLimits
from tests.safety_oracle import Limits, Pulse, violations

pytestmark = pytest.mark.compute  # CPU-bound, no real-time deadline (conftest.py)

# hypothesis's pytest plugin imports this (through libcst) to print a patch when a test
# fails; under ``filterwarnings = error`` libcst's DeprecationWarning would then replace
# the falsifying example with an INTERNALERROR. Imported once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

settings.register_profile(
    "thorough", max_examples=3000, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_CI = settings(max_examples=120, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GATE_SETTINGS = (settings.get_profile("thorough")
                 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else _CI)

T0 = 1000.0  # the fake clock's start (an LSL clock is never near 0)
# how late a trigger of a unit is fired after its planned time (negative: early)
LATENESS_S = [0.0, 0.0, 0.0, 0.0, 0.0005, -0.001, -0.003, 0.002, 0.01, 0.2, 1.5]
LAX = [False, False, False, True]  # whether max_lateness_s is left at its default (inf)
CREDIT = 1000  # day pulses the harness keeps reserved (the service: a unit + 20)


class FakeClock:
    """Time that moves only when told (as trio's MockClock)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += max(dt, 0.0)


class MemoryDay:
    """A :class:`~closedloop.stim.safety.DayBudget` in memory, starting at ``start``."""

    def __init__(self, start: int, limit: int) -> None:
        self._count = start
        self.limit = limit

    def reserve(self, n: int) -> int:
        got = max(0, min(n, self.limit - self._count))
        self._count += got
        return got

    def release(self, n: int) -> None:
        self._count -= n

    def count(self) -> int:
        return self._count

    def day(self) -> str:
        return "2026-12-01"


# --- the scenario: limits and operations ----------------------------------------------

@dataclass(frozen=True)
class Setup:
    """The limits of one example (all within what a configuration accepts)."""

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
    day_start: int | None  # None: no day budget (the gate counts from 0)
    max_units: int | None
    latency_s: float
    first_pct: float
    first_paired: tuple[float, float, float] | None

    def config(self) -> SafetyConfig:
        return SafetyConfig(
            min_interval_s=self.min_interval_s, max_intensity_pct=self.max_intensity_pct,
            max_pulses=self.max_pulses, rate_window_s=self.rate_window_s,
            max_pulses_per_window=self.max_pulses_per_window,
            max_pulses_per_day=self.max_pulses_per_day,
            motor_threshold_pct=self.motor_threshold_pct,
            train_duration_factor=self.train_duration_factor,
            min_inter_train_s=self.min_inter_train_s,
            max_burst_intensity_mt=self.max_burst_intensity_mt)

    def oracle_limits(self) -> Limits:
        # from the drawn values, not from the gate's SafetyLimits (all within the caps)
        return Limits(
            max_intensity_pct=self.max_intensity_pct, min_interval_s=self.min_interval_s,
            motor_threshold_pct=self.motor_threshold_pct,
            train_duration_factor=self.train_duration_factor,
            min_inter_train_s=self.min_inter_train_s,
            max_burst_intensity_mt=self.max_burst_intensity_mt, max_pulses=self.max_pulses,
            rate_window_s=self.rate_window_s,
            max_pulses_per_window=self.max_pulses_per_window,
            max_pulses_per_day=self.max_pulses_per_day, day_start=self.day_start or 0,
            max_units=self.max_units)


@dataclass(frozen=True)
class Advance:
    dt: float


@dataclass(frozen=True)
class Start:
    """A new unit (the one under way, if any, is abandoned without telling the gate)."""

    kind: str
    offsets: tuple[float, ...]


@dataclass(frozen=True)
class Fire:
    """The next trigger of the unit under way (a new single unit when none), ``late_s``
    after its planned time (negative: early). A later trigger refused ends the unit, as
    the scheduler does, unless ``persist`` (a caller that keeps going)."""

    late_s: float
    persist: bool = False
    lax: bool = False  # max_lateness_s left at fire_now's default (inf)


@dataclass(frozen=True)
class FireRest:
    """All remaining triggers of the unit, every ``every``-th ``late_s`` late."""

    late_s: float
    every: int
    persist: bool = False
    lax: bool = False


@dataclass(frozen=True)
class FireIndex:
    """A trigger of the unit under way with an index of the caller's choosing, now."""

    index: int


@dataclass(frozen=True)
class EndUnit:
    lie_s: float  # t_last given as the last pulse minus this


@dataclass(frozen=True)
class SetIntensity:
    pct: float


@dataclass(frozen=True)
class SetPaired:
    cond: float
    test: float
    isi_ms: float


@dataclass(frozen=True)
class Knob:
    """Front panel: an output turned; the watch thread reads it back at once."""

    pct: float
    output: str


@dataclass(frozen=True)
class Panel:
    """Front panel: pulses per trigger switched; read back at once."""

    pulses: int
    isi_ms: float


@dataclass(frozen=True)
class Fault:
    pass


@dataclass(frozen=True)
class FailFire:
    delivered: bool


@dataclass(frozen=True)
class Reconnect:
    pass


@dataclass(frozen=True)
class Arm:
    pass


@dataclass(frozen=True)
class Recover:
    """What an operator does after a fault: reopen, set the intensity, reconnect, arm."""

    pct: float


@dataclass(frozen=True)
class Disarm:
    pass


Op = (Advance | Start | Fire | FireRest | FireIndex | EndUnit | SetIntensity | SetPaired
      | Knob | Panel | Fault | FailFire | Reconnect | Arm | Recover | Disarm)


def _offsets_train(n: int, hz: float) -> tuple[float, ...]:
    return tuple(k / hz for k in range(n))


def _offsets_tbs(n: int, per_burst: int, burst_hz: float, intra_hz: float,
                 on_bursts: int | None) -> tuple[float, ...]:
    """Theta bursts; ``on_bursts`` bursts then 8 s off (iTBS) when given."""
    out = []
    for k in range(n):
        b, j = divmod(k, per_burst)
        t = b / burst_hz + j / intra_hz
        if on_bursts:
            t += (b // on_bursts) * 8.0
        out.append(t)
    return tuple(out)


def _starts() -> st.SearchStrategy[Start]:
    single = st.just(Start("single", (0.0,)))
    train = st.builds(lambda n, hz: Start(f"train {n}x{hz:g}Hz", _offsets_train(n, hz)),
                      st.integers(2, 40),
                      st.sampled_from([1.0, 2.0, 5.0, 10.0, 19.0, 20.0, 25.0, 30.0])
                      | st.floats(1.0, 30.0))
    burst = st.builds(lambda n, hz: Start(f"burst {n}x{hz:g}Hz", _offsets_train(n, hz)),
                      st.integers(2, 6),
                      st.sampled_from([20.0, 50.0, 100.0]) | st.floats(20.0, 100.0))
    tbs = st.builds(
        lambda n, per, bhz, ihz, on: Start(f"tbs {n} ({per}@{ihz:g}Hz, {bhz:g}Hz"
                                           f"{', iTBS' if on else ''})",
                                           _offsets_tbs(n, per, bhz, ihz, on)),
        st.sampled_from([3, 15, 30, 60, 600, 603]) | st.integers(2, 90),
        st.sampled_from([3, 3, 4, 5, 6]), st.sampled_from([5.0, 5.0, 1 / 0.19, 6.0]),
        st.sampled_from([50.0, 50.0, 100.0, 30.0]), st.sampled_from([None, None, 10]))
    custom = st.builds(
        lambda gaps: Start("custom", tuple(math.fsum(gaps[:k]) for k in range(len(gaps) + 1))),
        st.lists(st.sampled_from([0.001, 0.009, 0.01, 0.02, 0.039, 0.04, 0.05, 0.19, 0.2,
                                  0.5, 0.99, 1.0, 1.5]), min_size=1, max_size=12))
    return st.one_of(single, train, burst, tbs, custom)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Setup, list[Op]]:
    mt = draw(st.sampled_from([50.0, 40.0]) | st.floats(30.0, 90.0) | st.none())
    max_int = draw(st.sampled_from([80.0, 100.0, 60.0]) | st.floats(20.0, 100.0))
    per_day = draw(st.sampled_from([20_000, 2000]))
    day_start = draw(st.none() | st.sampled_from([0, 1000, per_day - 10]))

    # intensities near the limits that matter: % of MT when there is one, and the maximum
    near = [max_int, max_int + 0.5, max_int - 0.5]
    # % of MT where the rules change: the burst limits, the table's columns
    rel = [80.0, 100.0, 110.0, 120.0, 125.0, 130.0, 140.0]
    by_mt = [] if mt is None else [mt * r / 100.0 for r in rel if mt * r / 100.0 <= 100.0]
    valid = [p for p in [*near, *by_mt] if 0.0 <= p <= max_int]
    ok_pct = (st.sampled_from(valid) if valid else st.nothing()) | st.floats(
        0.0, max_int).map(lambda x: round(x, 2))
    if by_mt and any(p <= max_int for p in by_mt):
        ok_pct = st.sampled_from([p for p in by_mt if p <= max_int]) | ok_pct
    any_pct = (st.sampled_from([p for p in [*near, *by_mt] if 0.0 <= p <= 100.0])
               | st.floats(0.0, 100.0).map(lambda x: round(x, 2)))
    pct = st.one_of(ok_pct, ok_pct, ok_pct, any_pct)  # mostly allowed, sometimes not
    first_paired = draw(st.none() | st.tuples(ok_pct, ok_pct, st.sampled_from([2.0, 3.0, 15.0,
                                                                       50.0, 100.0])))
    setup = Setup(
        max_intensity_pct=max_int,
        min_interval_s=draw(st.sampled_from([0.05, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0])),
        motor_threshold_pct=mt,
        train_duration_factor=draw(st.sampled_from([0.75, 1.0, 0.5, 0.1])),
        min_inter_train_s=draw(st.sampled_from([1.0, 1.0, 2.0, 5.0])),
        max_burst_intensity_mt=draw(st.sampled_from([100.0, 80.0, 50.0])),
        max_pulses=draw(st.sampled_from([10_000, 10_000, 1000, 200, 20])),
        rate_window_s=draw(st.sampled_from([60.0, 10.0, 1.0])),
        max_pulses_per_window=draw(st.sampled_from([10_000, 10_000, 200, 40, 5])),
        max_pulses_per_day=per_day, day_start=day_start,
        max_units=draw(st.none() | st.integers(1, 20)),
        latency_s=draw(st.sampled_from([0.0, 0.0, 0.005])),
        first_pct=draw(ok_pct), first_paired=first_paired)

    late = st.sampled_from(LATENESS_S)
    persist = st.sampled_from([False, False, False, True])
    lax = st.sampled_from(LAX)
    step = (st.sampled_from([1.0, 0.001, 0.01, 0.02, 0.05, 0.05, 0.1, 0.19, 0.2, 0.5, 0.99,
                             1.001, 2.0, 5.0, 5.001])
            | st.floats(0.0, 1.2) | st.floats(1.0, 30.0))
    kinds: dict[str, tuple[int, st.SearchStrategy[Op]]] = {
        # name: (weight, strategy); most operations let pulses out, a few get in the way
        "fire": (8, st.builds(Fire, late, persist, lax)),
        "advance": (6, st.builds(Advance, step)),
        "rest": (4, st.builds(FireRest, late, st.integers(1, 7), persist, lax)),
        "start": (4, _starts()),
        "intensity": (2, st.builds(SetIntensity, pct)),
        "paired": (1, st.builds(SetPaired, pct, pct,
                                st.sampled_from([2.0, 3.0, 10.0, 15.0, 40.0, 100.0])
                                | st.floats(2.0, 100.0))),
        "recover": (4, st.builds(Recover, ok_pct)),
        "index": (1, st.builds(FireIndex, st.integers(0, 45))),
        "end": (1, st.builds(EndUnit, st.sampled_from([0.0, 0.0, 5.0, 1000.0]))),
        "knob": (1, st.builds(Knob, pct, st.sampled_from(["a", "b"]))),
        "panel": (1, st.builds(Panel, st.integers(1, 6),
                               st.sampled_from([3.0, 10.0, 20.0, 50.0]))),
        "arm": (1, st.builds(Arm)),
        "reconnect": (1, st.builds(Reconnect)),
        "disarm": (1, st.builds(Disarm)),
        "fault": (1, st.builds(Fault)),
        "failfire": (1, st.builds(FailFire, st.booleans())),
    }
    names = [name for name, (w, _) in kinds.items() for _ in range(w)]
    one = st.sampled_from(names).flatmap(lambda name: kinds[name][1]).map(lambda op: [op])
    # a protocol step: wait, start a unit, fire all of it
    block = st.builds(lambda pause, start, rest: [Advance(pause), start, rest],
                      st.sampled_from([5.001, 1.0, 2.0, 5.0, 0.05, 10.0])
                      | st.floats(0.0, 12.0),
                      _starts(), st.builds(FireRest, late, st.integers(1, 7), persist, lax))
    chunks = draw(st.lists(st.one_of(block, one, one), min_size=12, max_size=50))
    return setup, [op for chunk in chunks for op in chunk]


# --- the harness ----------------------------------------------------------------------

@dataclass
class _Unit:
    uid: int
    offsets: tuple[float, ...]
    next: int = 0
    t0: float | None = None  # when its first trigger left
    last: float | None = None


@dataclass
class Outcome:
    pulses: list[Pulse] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)


class Harness:
    """Applies operations to a gated fake stimulator; labels every delivered pulse."""

    def __init__(self, setup: Setup) -> None:
        self.clock = FakeClock()
        self.fake = FakeStimulator(clock=self.clock, latency_s=setup.latency_s)
        self.fake.open()
        day = (None if setup.day_start is None
               else MemoryDay(setup.day_start, setup.max_pulses_per_day))
        self.gate = SafetyGate(SafetyLimits.from_config(setup.config()), day=day,
                               max_units=setup.max_units)
        # the service keeps a unit's worth of day pulses reserved, topping up after fires
        self.gated = GatedStimulator(self.fake, self.gate, eeg_age_s=lambda: 0.0,
                                     clock=self.clock, credit_target=CREDIT)
        self.out = Outcome()
        self._trigger = 0
        self._unit_id = 0
        self.unit: _Unit | None = None
        self._seen = 0  # pulses of fake.delivered already labelled
        self._try(f"set_intensity({setup.first_pct:g})",
                  lambda: self.gated.set_intensity(setup.first_pct))
        if setup.first_paired is not None:
            c, t, isi = setup.first_paired
            self._try(f"set_paired({c:g}, {t:g}, {isi:g})",
                      lambda: self.gated.set_paired(c, t, isi))
        self._try("arm", self.gated.arm)

    # -- bookkeeping -----------------------------------------------------------------------
    def _new_unit(self, offsets: tuple[float, ...]) -> _Unit:
        self._unit_id += 1
        return _Unit(self._unit_id, offsets)

    def _try(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except StimulatorError as exc:
            self.out.refusals[what.split("(", maxsplit=1)[0]] += 1
            self.out.log.append(f"{self.clock.t - T0:.6f} {what}: refused ({exc})")
        else:
            self.out.log.append(f"{self.clock.t - T0:.6f} {what}: ok")
        self._label(None, paired=False)  # nothing should have left; if it did, count it

    def _paired_device(self) -> bool:
        f = self.fake
        return (f.pulses_per_trigger_fault is None and f.device_pulses == 2
                and f.device_b is not None)

    def _label(self, unit: _Unit | None, *, paired: bool) -> int:
        new = self.fake.delivered[self._seen:]
        self._seen = len(self.fake.delivered)
        if not new:
            return 0
        self._trigger += 1
        uid = unit.uid if unit is not None else self._new_unit((0.0,)).uid
        roles = (["conditioning", "test"] if paired and len(new) == 2
                 else ["single"] * len(new))
        for (t, pct), role in zip(new, roles, strict=True):
            self.out.pulses.append(Pulse(t, pct, self._trigger, uid, role))
        if unit is not None:
            unit.last = max(t for t, _ in new)
        return len(new)

    def _fire(self, unit: _Unit, index: int, planned: float | None, *,
              lax: bool = False) -> bool:
        if index == 0 and unit.last is not None:
            # a first trigger again (the gate checks a new unit): a new decision
            unit = self._new_unit(unit.offsets)
            self.unit = unit
        paired = self._paired_device()
        res = self.gated.fire_now(offsets=unit.offsets, index=index, planned=planned,
                                  max_lateness_s=math.inf if lax else 0.001)
        n = self._label(unit, paired=paired)
        self.gate.top_up(CREDIT)
        where = f"{self.clock.t - T0:.6f} fire u{unit.uid}[{index}/{len(unit.offsets)}]"
        if res.fired:
            self.out.log.append(f"{where}: {n} pulses")
        else:
            self.out.refusals[res.reason] += 1
            self.out.log.append(f"{where}: {res.reason}" + (f" ({n} pulses left)" if n else ""))
        if res.fired and index == 0:
            unit.t0 = res.lsl_time
        return res.fired

    def _fire_next(self, late_s: float, persist: bool, lax: bool) -> None:
        if self.unit is None or self.unit.next >= len(self.unit.offsets):
            self.unit = self._new_unit((0.0,))
        u = self.unit
        k = u.next
        if k == 0 or u.t0 is None:
            if self._fire(u, 0, None):
                u = self.unit or u
                u.next = 1
        else:
            planned = u.t0 + u.offsets[k]
            self.clock.t = max(self.clock.t, planned + late_s - self.fake.latency_s)
            u.next = k + 1
            if not self._fire(u, k, planned, lax=lax) and not persist:
                self.gated.end_unit(u.last)  # as the scheduler does
                self.unit = None
                return
        if u.next >= len(u.offsets):
            self.unit = None

    # -- operations ------------------------------------------------------------------------
    def apply(self, op: Op) -> None:
        g, f = self.gated, self.fake
        match op:
            case Advance(dt):
                self.clock.advance(dt)
                self.gate.top_up(CREDIT)
            case Start(kind, offsets):
                self.unit = self._new_unit(offsets)
                self.out.log.append(f"{self.clock.t - T0:.6f} start u{self.unit.uid} {kind}")
            case Fire(late_s, persist, lax):
                self._fire_next(late_s, persist, lax)
            case FireRest(late_s, every, persist, lax):
                start = self.unit
                k = 0
                while self.unit is start and start is not None:
                    self._fire_next(late_s if k % every == every - 1 else 0.0, persist, lax)
                    k += 1
                    if start.t0 is None:  # its first trigger was refused
                        break
            case FireIndex(index):
                cur = self.unit or self._new_unit((0.0,))
                self.unit = cur
                if self._fire(cur, index, self.clock.t + f.latency_s) and index == 0:
                    (self.unit or cur).next = 1
            case EndUnit(lie_s):
                last = self.unit.last if self.unit is not None else None
                t_last = self.clock.t if last is None else last
                self._try("end_unit", lambda: g.end_unit(t_last - lie_s))
                self.unit = None
            case SetIntensity(pct):
                self._try(f"set_intensity({pct:g})", lambda: g.set_intensity(pct))
            case SetPaired(cond, test, isi_ms):
                self._try(f"set_paired({cond:g}, {test:g}, {isi_ms:g})",
                          lambda: g.set_paired(cond, test, isi_ms))
            case Knob(pct, output):
                f.turn_knob(pct, output)
                self._try(f"knob {output}={pct:g} + poll", f.poll)
            case Panel(pulses, isi_ms):
                f.set_front_panel_mode(pulses, isi_ms)
                self._try(f"panel {pulses}@{isi_ms:g}ms + poll", f.poll)
            case Fault():
                f.report_fault("test fault")
                self.out.log.append(f"{self.clock.t - T0:.6f} fault")
            case FailFire(delivered):
                f.fail_next_fire(StimulatorError("test: fire failed"), delivered=delivered)
            case Reconnect():
                f.open()
                self._try("reconnected", g.reconnected)
            case Arm():
                self._try("arm", g.arm)
            case Recover(pct):
                f.open()
                self._try(f"set_intensity({pct:g})", lambda: g.set_intensity(pct))
                self._try("reconnected", g.reconnected)
                self._try("arm", g.arm)
            case Disarm():
                self._try("disarm", g.disarm)


def run(setup: Setup, ops: Sequence[Op]) -> Outcome:
    h = Harness(setup)
    for op in ops:
        h.apply(op)
    return h.out


def _judge(setup: Setup, out: Outcome) -> list[str]:
    return violations(out.pulses, setup.oracle_limits())


def _report(setup: Setup, out: Outcome, found: list[str]) -> str:
    shown = "\n".join(f"  t={p.t - T0:.6f} {p.pct:g}% trig{p.trigger} u{p.unit} {p.role}"
                      for p in out.pulses[:60])
    log = "\n".join(f"  {line}" for line in out.log[-60:])
    return ("the gate let through what the oracle forbids:\n  " + "\n  ".join(found)
            + f"\n{setup}\ndelivered ({len(out.pulses)}):\n{shown}\nlog (last 60):\n{log}")


def _note(out: Outcome) -> None:
    n = len(out.pulses)
    target(float(n), label="pulses delivered")
    target(float(len({p.trigger for p in out.pulses})), label="triggers delivered")
    event("pulses: " + ("0" if n == 0 else "1-9" if n < 10 else "10-99" if n < 100
                        else ">=100"))
    if any(p.role != "single" for p in out.pulses):
        event("paired pulses delivered")
    if len({p.trigger for p in out.pulses}) < len(out.pulses) - sum(
            p.role == "test" for p in out.pulses):
        event("device bursts delivered")
    for reason in out.refusals:
        event(f"refused: {reason.split(':')[0]}:{reason.split(':')[1][:20]}"
              if ":" in reason else f"refused: {reason}")


@GATE_SETTINGS
@given(scenarios())
def test_no_delivered_sequence_breaks_a_rule(scenario: tuple[Setup, list[Op]]) -> None:
    setup, ops = scenario
    out = run(setup, ops)
    _note(out)
    found = _judge(setup, out)
    assert not found, _report(setup, out, found)


def test_the_property_fires_a_lot() -> None:
    """A fixed-seed batch of the same examples delivers many pulses: the property cannot
    pass by firing nothing."""
    counts: list[int] = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scenarios())
    def sample(scenario: tuple[Setup, list[Op]]) -> None:
        setup, ops = scenario
        counts.append(len(run(setup, ops).pulses))  # judged by the property test

    sample()
    assert sum(counts) > 100, counts
    # (the rules over pulses refuse more than the first gate did: 4 of the 60 fire 10 or
    # more, several of them dozens)
    assert sum(n >= 10 for n in counts) >= 4, counts
    assert sum(n > 0 for n in counts) >= len(counts) // 2, counts


# --- the attacks of the issue, as plain sequences -------------------------------------

_PLAIN = Setup(max_intensity_pct=80.0, min_interval_s=0.05, motor_threshold_pct=None,
               train_duration_factor=0.75, min_inter_train_s=5.0, max_burst_intensity_mt=100.0,
               max_pulses=10_000, rate_window_s=60.0, max_pulses_per_window=10_000,
               max_pulses_per_day=20_000, day_start=None, max_units=None, latency_s=0.0,
               first_pct=60.0, first_paired=None)


def _setup(**kw: object) -> Setup:
    return replace(_PLAIN, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("mt", [None, 50.0])
def test_open_loop_20hz_singles_for_40s(mt: float | None) -> None:
    setup = _setup(motor_threshold_pct=mt, first_pct=60.0)  # 120 % MT when MT is 50
    h = Harness(setup)
    for _ in range(800):
        h.apply(Fire(0.0))
        h.apply(Advance(0.05))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)
    # and it is not stuck: single pulses about once a second at least
    assert len(h.out.pulses) >= 20, h.out.log[-20:]


def test_paired_pulses_every_50ms_without_mt() -> None:
    setup = _setup(first_paired=(40.0, 60.0, 3.0))
    h = Harness(setup)
    for _ in range(400):
        h.apply(Fire(0.0))
        h.apply(Advance(0.05))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)
    assert len(h.out.pulses) >= 20
    assert {p.role for p in h.out.pulses} == {"conditioning", "test"}


def test_knob_to_95_after_arming_is_read_back() -> None:
    setup = _setup(first_pct=50.0)
    h = Harness(setup)
    h.apply(Fire(0.0))
    h.apply(Advance(2.0))
    h.apply(Knob(95.0, "a"))  # the watch thread reads it back
    for _ in range(20):
        h.apply(Fire(0.0))
        h.apply(Advance(1.5))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)
    assert [p.pct for p in h.out.pulses] == [50.0]


@pytest.mark.xfail(strict=True, reason="a knob turned after the last read-back is not seen "
                   "until the next one (closedloop/stim/gated.py says so)")
def test_knob_to_95_fired_on_before_any_read_back() -> None:
    setup = _setup(first_pct=50.0)
    h = Harness(setup)
    h.fake.turn_knob(95.0)
    h.apply(Fire(0.0))
    assert not _judge(setup, h.out)


def test_125_mt_in_the_middle_of_ctbs() -> None:
    setup = _setup(motor_threshold_pct=40.0, first_pct=32.0, min_interval_s=1.0)  # 80 % MT
    h = Harness(setup)
    h.apply(Start("cTBS 600", _offsets_tbs(600, 3, 5.0, 50.0, None)))
    for k in range(600):
        if k == 300:
            h.apply(SetIntensity(50.0))  # 125 % MT
            h.apply(SetPaired(50.0, 50.0, 3.0))
        h.apply(Fire(0.0))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)
    assert len(h.out.pulses) == 600 and {p.pct for p in h.out.pulses} == {32.0}
    assert h.out.refusals["set_intensity"] == 1 and h.out.refusals["set_paired"] == 1


def test_knob_to_125_mt_in_the_middle_of_ctbs() -> None:
    setup = _setup(motor_threshold_pct=40.0, first_pct=32.0, min_interval_s=1.0)
    h = Harness(setup)
    h.apply(Start("cTBS 600", _offsets_tbs(600, 3, 5.0, 50.0, None)))
    for k in range(600):
        if k == 300:
            h.apply(Knob(50.0, "a"))
        h.apply(Fire(0.0))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)
    assert len(h.out.pulses) == 300 and {p.pct for p in h.out.pulses} == {32.0}


# --- what the property found: the gate judges a later trigger at its planned time -----

def test_found_early_second_trigger_makes_a_run() -> None:
    """Two triggers planned 1.0 s apart (not a run), the second 1 ms early (accepted as on
    time): delivered 0.999 s apart, a run of 2 triggers at 160 % MT (R3/R5: above the
    table)."""
    setup = _setup(motor_threshold_pct=50.0, first_pct=80.0, max_intensity_pct=80.0)
    h = Harness(setup)
    h.apply(Start("train 2x1Hz", (0.0, 1.0)))
    h.apply(Fire(0.0))
    h.apply(Fire(-0.001))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)


def test_found_late_triggers_with_default_max_lateness() -> None:
    """A 20 Hz train at 80 % MT whose odd triggers leave 40 ms late (``fire_now``'s default
    ``max_lateness_s`` is inf): delivered as pairs 10 ms apart, a patterned run (R4: above
    max_burst_intensity_mt, bursts 0.09-0.1 s apart)."""
    setup = _setup(motor_threshold_pct=50.0, first_pct=40.0, max_burst_intensity_mt=50.0)
    h = Harness(setup)
    h.apply(Start("train 10x20Hz", _offsets_train(10, 20.0)))
    h.apply(Fire(0.0))
    for k in range(1, 10):
        h.apply(Fire(0.04 if k % 2 else 0.0, lax=True))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)


def test_found_half_ms_late_trigger_makes_a_run_without_mt() -> None:
    """No motor threshold; a unit of three triggers 1.0 s apart (single pulses, not a
    run), the second 0.5 ms late (within max_lateness_s): the third leaves 0.9995 s after
    it, a run of 2 triggers, repetitive TMS without a motor threshold (R3)."""
    setup = _setup(motor_threshold_pct=None, first_pct=80.0)
    h = Harness(setup)
    h.apply(Start("train 3x1Hz", (0.0, 1.0, 2.0)))
    h.apply(Fire(0.0))
    h.apply(Fire(0.0005))
    h.apply(Fire(0.0))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)


def test_found_late_trigger_then_a_new_unit_at_the_same_instant() -> None:
    """A unit of two triggers 1 s apart, the second fired 0.2 s late (``max_lateness_s``
    left at inf), then a single-pulse unit at that same instant: two pulses of different
    triggers 0 ms apart (R2 min_interval, R7 10 ms), as if the late trigger had left at
    its planned time."""
    setup = _setup(motor_threshold_pct=50.0, first_pct=40.0)
    h = Harness(setup)
    h.apply(Start("train 2x1Hz", (0.0, 1.0)))
    h.apply(Fire(0.0))
    h.apply(Fire(0.2, lax=True))
    h.apply(Fire(0.0))
    found = _judge(setup, h.out)
    assert not found, _report(setup, h.out, found)
