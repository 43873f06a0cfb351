"""The safety oracle on hand-made pulse sequences: each rule, allowed and broken, at its edges."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.safety_oracle import (
    TABLE4_INTENSITIES_MT,
    TABLE4_S,
    Limits,
    Pulse,
    max_train_s,
    violations,
)

BASE = Limits(max_intensity_pct=100.0, min_interval_s=0.05, motor_threshold_pct=50.0,
              train_duration_factor=1.0, min_inter_train_s=1.0, max_burst_intensity_mt=100.0,
              max_pulses=10_000, rate_window_s=60.0, max_pulses_per_window=10_000,
              max_pulses_per_day=20_000, day_start=0, max_units=None)


def lim(**changes: object) -> Limits:
    return replace(BASE, **changes)  # type: ignore[arg-type]


class Seq:
    """Builds a delivered sequence, handing out trigger and unit ids as a harness would."""

    def __init__(self) -> None:
        self.pulses: list[Pulse] = []
        self._trigger = 0
        self._unit = 0

    def unit(self) -> int:
        self._unit += 1
        return self._unit

    def _tid(self) -> int:
        self._trigger += 1
        return self._trigger

    def single(self, t: float, pct: float, unit: int | None = None) -> Seq:
        u = self.unit() if unit is None else unit
        self.pulses.append(Pulse(t, pct, self._tid(), u))
        return self

    def paired(self, t: float, cond: float, test: float, isi_ms: float,
               unit: int | None = None) -> Seq:
        u = self.unit() if unit is None else unit
        tid = self._tid()
        self.pulses += [Pulse(t, cond, tid, u, "conditioning"),
                        Pulse(t + isi_ms / 1000.0, test, tid, u, "test")]
        return self

    def burst(self, t: float, pct: float, n: int, isi_ms: float,
              unit: int | None = None) -> Seq:
        """One trigger giving ``n`` pulses (a device burst)."""
        u = self.unit() if unit is None else unit
        tid = self._tid()
        self.pulses += [Pulse(t + k * isi_ms / 1000.0, pct, tid, u) for k in range(n)]
        return self

    def train(self, t0: float, hz: float, n: int, pct: float) -> Seq:
        """One unit of ``n`` single-pulse triggers at ``hz``."""
        u = self.unit()
        for k in range(n):
            self.single(t0 + k / hz, pct, unit=u)
        return self

    def tbs(self, t0: float, n_pulses: int, pct: float, *, per_burst: int = 3,
            burst_hz: float = 5.0, intra_hz: float = 50.0) -> Seq:
        """One unit of single-pulse triggers in theta bursts (cTBS by default)."""
        u = self.unit()
        for k in range(n_pulses):
            b, j = divmod(k, per_burst)
            self.single(t0 + b / burst_hz + j / intra_hz, pct, unit=u)
        return self


def rules(found: list[str]) -> set[str]:
    return {line.split(" ", 1)[0] for line in found}


# --- the table ------------------------------------------------------------------------

def test_table_as_transcribed() -> None:
    assert TABLE4_INTENSITIES_MT == (90.0, 100.0, 110.0, 120.0, 130.0)
    assert TABLE4_S[20.0] == (2.05, 2.05, 1.6, 1.0, 0.55)
    assert TABLE4_S[25.0] == (1.28, 1.28, 0.84, 0.4, 0.24)
    assert TABLE4_S[10.0] == (5.0, 5.0, 5.0, 4.2, 2.9)
    assert TABLE4_S[5.0] == (10.0,) * 5
    assert TABLE4_S[1.0] == (1800.0, 1800.0, 1800.0, 360.0, 50.0)


@pytest.mark.parametrize(("hz", "mt", "want"), [
    (0.5, 50.0, 1800.0),      # below 1 Hz: the 1 Hz row; below 90 %: the 90 % column
    (1.0, 120.0, 360.0),
    (1.01, 120.0, 10.0),      # just above 1 Hz: the 5 Hz row
    (20.0, 120.0, 1.0),
    (20.0, 120.01, 0.55),     # just above 120 %: the 130 % column
    (19.0, 105.0, 1.6),
    (25.0, 130.0, 0.24),
    (25.01, 90.0, None),      # above 25 Hz: not allowed
    (10.0, 130.01, None),     # above 130 % MT: not allowed
])
def test_table_lookup(hz: float, mt: float, want: float | None) -> None:
    assert max_train_s(hz, mt) == want


def test_empty_sequence_is_allowed() -> None:
    assert violations([], BASE) == []


# --- R1 intensity ---------------------------------------------------------------------

def test_r1_intensity() -> None:
    assert violations(Seq().single(0.0, 80.0).pulses, lim(max_intensity_pct=80.0)) == []
    assert violations(Seq().single(0.0, 0.0).pulses, BASE) == []
    found = violations(Seq().single(0.0, 80.5).pulses, lim(max_intensity_pct=80.0))
    assert rules(found) == {"R1"} and "t=0.000000" in found[0]
    assert rules(violations(Seq().single(0.0, -1.0).pulses, BASE)) == {"R1"}
    # never above 100 %, whatever the configuration says
    assert rules(violations(Seq().single(0.0, 100.5).pulses,
                            lim(max_intensity_pct=120.0))) == {"R1"}
    # a paired pulse: both pulses count
    assert rules(violations(Seq().paired(0.0, 85.0, 40.0, 3).pulses,
                            lim(max_intensity_pct=80.0))) == {"R1"}


# --- R2 minimum interval between units ------------------------------------------------

def test_r2_min_interval_between_units() -> None:
    assert violations(Seq().single(0.0, 50).single(2.0, 50).pulses,
                      lim(min_interval_s=2.0)) == []
    found = violations(Seq().single(0.0, 50).single(1.5, 50).pulses, lim(min_interval_s=2.0))
    assert rules(found) == {"R2"} and "t=1.500000" in found[0]


def test_r2_does_not_apply_inside_a_unit() -> None:
    # a 10 Hz train in one unit: triggers 0.1 s apart, min_interval_s 1 s
    seq = Seq().train(0.0, 10.0, 5, 40.0)
    assert violations(seq.pulses, lim(min_interval_s=1.0)) == []
    # the same triggers as five single units are five decisions: each too soon
    seq = Seq()
    for k in range(5):
        seq.single(k * 0.1, 40.0)
    assert "R2" in rules(violations(seq.pulses, lim(min_interval_s=1.0)))


def test_r2_counts_from_any_previous_trigger() -> None:
    # unit 2 starts 0.3 s after the last trigger of unit 1 (a train)
    seq = Seq().train(0.0, 10.0, 3, 40.0).single(0.5, 40.0)
    assert "R2" in rules(violations(seq.pulses, lim(min_interval_s=0.5)))


# --- R3 repetitive TMS needs the motor threshold --------------------------------------

def test_r3_run_of_singles_needs_mt() -> None:
    seq = Seq().single(0.0, 50).single(0.5, 50)
    assert rules(violations(seq.pulses, lim(motor_threshold_pct=None))) == {"R3"}
    assert violations(seq.pulses, BASE) == []
    # 1.0 s apart is a run (Table 4's 1 Hz row); more than 1 s (+ the 1 ms tolerance) not
    seq = Seq().single(0.0, 50).single(1.0, 50)
    assert rules(violations(seq.pulses, lim(motor_threshold_pct=None))) == {"R3"}
    seq = Seq().single(0.0, 50).single(1.002, 50)
    assert violations(seq.pulses, lim(motor_threshold_pct=None)) == []


def test_r3_device_burst_needs_mt_paired_does_not() -> None:
    nomt = lim(motor_threshold_pct=None)
    assert rules(violations(Seq().burst(0.0, 40, 2, 100).pulses, nomt)) == {"R3"}
    assert violations(Seq().paired(0.0, 30, 50, 3).pulses, nomt) == []
    assert violations(Seq().paired(0.0, 30, 50, 100).pulses, nomt) == []


def test_r3_paired_every_50ms_without_mt() -> None:
    seq = Seq()
    for k in range(20):
        seq.paired(k * 0.05, 40.0, 60.0, 3)
    assert "R3" in rules(violations(seq.pulses, lim(motor_threshold_pct=None)))


# --- R4 patterned runs ----------------------------------------------------------------

def test_r4_ctbs_600_allowed_603_not() -> None:
    # 80 % MT: MT 50 %, pulses at 40 %
    assert violations(Seq().tbs(0.0, 600, 40.0).pulses, BASE) == []
    found = violations(Seq().tbs(0.0, 603, 40.0).pulses, BASE)
    assert rules(found) == {"R4"} and "603 pulses" in found[0]


def test_r4_ctbs_as_device_bursts() -> None:
    seq = Seq()
    u = seq.unit()
    for b in range(200):
        seq.burst(b * 0.2, 40.0, 3, 20, unit=u)
    assert violations(seq.pulses, BASE) == []
    seq.burst(200 * 0.2, 40.0, 3, 20, unit=u)
    assert rules(violations(seq.pulses, BASE)) == {"R4"}


def test_r4_burst_intensity() -> None:
    seq = Seq().tbs(0.0, 30, 40.0)  # 80 % MT
    assert violations(seq.pulses, lim(max_burst_intensity_mt=80.0)) == []
    found = violations(Seq().tbs(0.0, 30, 40.5).pulses, lim(max_burst_intensity_mt=80.0))
    assert rules(found) == {"R4"} and "81.000% MT" in found[0]


def test_r4_group_size() -> None:
    ok = Seq().burst(0.0, 40, 5, 10)
    assert violations(ok.pulses, BASE) == []
    found = violations(Seq().burst(0.0, 40, 6, 10).pulses, BASE)
    assert rules(found) == {"R4"} and "6 pulses" in found[0]


def test_r4_group_onsets() -> None:
    seq = Seq().tbs(0.0, 30, 40.0, burst_hz=1 / 0.19)
    assert violations(seq.pulses, BASE) == []
    seq = Seq().tbs(0.0, 30, 40.0, burst_hz=1 / 0.18)
    assert rules(violations(seq.pulses, BASE)) == {"R4"}


def test_r4_paired_gap_is_not_a_burst_gap() -> None:
    # a pair alone: its 3 ms interval is no burst (120 % MT is fine)
    assert violations(Seq().paired(0.0, 20.0, 60.0, 3).pulses, BASE) == []
    # in a run of pairs it is: doublets every 200 ms at 80 % MT are a pattern that obeys
    # the burst rules; every 50 ms their onsets are too close
    seq = Seq()
    u = seq.unit()
    for k in range(10):
        seq.paired(k * 0.2, 20.0, 40.0, 3, unit=u)
    assert violations(seq.pulses, BASE) == []
    seq = Seq()
    u = seq.unit()
    for k in range(10):
        seq.paired(k * 0.05, 20.0, 40.0, 3, unit=u)
    assert "R4" in rules(violations(seq.pulses, BASE))
    # the test pulse 35 ms before the next conditioning pulse: a burst gap; groups of
    # 4 pulses 40 ms apart, onsets too close
    seq = Seq()
    u = seq.unit()
    for k in range(4):
        seq.paired(k * 0.05, 20.0, 40.0, 15, unit=u)
    assert "R4" in rules(violations(seq.pulses, BASE))


def test_r4_gap_of_exactly_40ms_is_not_short() -> None:
    seq = Seq().train(0.0, 25.0, 10, 40.0)  # 25 Hz, 80 % MT: 0.4 s <= 1.28 s
    assert violations(seq.pulses, lim(max_burst_intensity_mt=10.0)) == []


# --- R5 regular trains ----------------------------------------------------------------

def test_r5_20hz_120mt() -> None:
    # MT 50 %, 60 % = 120 % MT: table 1.0 s x 0.75 = 0.75 s
    f = lim(train_duration_factor=0.75)
    assert violations(Seq().train(0.0, 20.0, 15, 60.0).pulses, f) == []   # 0.75 s
    found = violations(Seq().train(0.0, 20.0, 16, 60.0).pulses, f)      # 0.80 s
    assert rules(found) == {"R5"} and "0.750000 s" in found[0]
    # one second of it
    assert rules(violations(Seq().train(0.0, 20.0, 20, 60.0).pulses, f)) == {"R5"}


def test_r5_frequency_from_the_smallest_gap() -> None:
    # 10 Hz at 130 % MT: 2.9 s; one gap of 45 ms makes it a 25 Hz train: 0.24 s
    seq = Seq()
    u = seq.unit()
    times = [0.0, 0.1, 0.145, 0.245]
    for t in times:
        seq.single(t, 65.0, unit=u)
    found = violations(seq.pulses, BASE)
    # the frequency of the 45 ms gap, judged 1 ms longer (the timing tolerance)
    assert rules(found) == {"R5"} and "21.739 Hz" in found[0]


def test_r5_just_above_1hz_uses_the_5hz_row() -> None:
    # triggers 0.99 s apart at 130 % MT: 1.01 Hz -> 10 s, not 50 s
    seq = Seq().train(0.0, 1 / 0.99, 10, 65.0)   # duration 9.9 s
    assert violations(seq.pulses, BASE) == []
    seq = Seq().train(0.0, 1 / 0.99, 11, 65.0)   # 10.89 s
    assert rules(violations(seq.pulses, BASE)) == {"R5"}


def test_r5_above_130_mt_not_allowed() -> None:
    found = violations(Seq().train(0.0, 5.0, 2, 70.5).pulses, BASE)  # 141 % MT
    assert rules(found) == {"R5"} and "not allowed" in found[0]


def test_r5_runs_across_units() -> None:
    # single units every 0.5 s at 130 % MT: one run at 2 Hz (5 Hz row, 10 s)
    seq = Seq()
    for k in range(20):
        seq.single(k * 0.5, 65.0)
    assert violations(seq.pulses, BASE) == []   # 10.0 s
    seq.single(10.0, 65.0)
    assert rules(violations(seq.pulses, BASE)) == {"R5"}


def test_r5_highest_pulse_of_the_run_counts() -> None:
    # a 20 Hz train of 12 (0.6 s) at 100 % MT, one pulse at 130 % MT: 0.55 s
    seq = Seq()
    u = seq.unit()
    for k in range(12):
        seq.single(k * 0.05, 65.0 if k == 5 else 50.0, unit=u)
    assert "R5" in rules(violations(seq.pulses, BASE))


# --- R6 inter-train pause -------------------------------------------------------------

def test_r6_a_pause_of_one_second_is_no_pause() -> None:
    # Chen et al. 1997: 20 Hz trains 1 s apart above 100 % MT were unsafe. Two 0.5-s trains
    # at 110 % MT with a 1-s pause are one run of 1.95 s (> 1.6 s); just over 1 s apart
    # (beyond the 1 ms tolerance) they are two runs of 0.5 s
    seq = Seq().train(0.0, 20.0, 10, 55.0).train(1.45, 20.0, 10, 55.0)
    assert rules(violations(seq.pulses, BASE)) == {"R5"}
    seq = Seq().train(0.0, 20.0, 10, 55.0).train(1.452, 20.0, 10, 55.0)
    assert violations(seq.pulses, BASE) == []


def test_r6_min_inter_train() -> None:
    five = lim(min_inter_train_s=5.0)
    seq = Seq().train(0.0, 10.0, 5, 40.0).single(0.4 + 5.0, 40.0)
    assert violations(seq.pulses, five) == []
    seq = Seq().train(0.0, 10.0, 5, 40.0).single(0.4 + 4.9, 40.0)
    assert rules(violations(seq.pulses, five)) == {"R6"}


def test_r6_counts_from_the_last_pulse_of_a_burst() -> None:
    # a device burst: its last pulse is 80 ms after the trigger; a pulse 0.97 s after that
    # continues its (patterned) run, one exactly 1 s after it starts a run too early
    seq = Seq().burst(0.0, 40.0, 5, 20).single(1.05, 40.0)
    assert violations(seq.pulses, BASE) == []
    two = lim(min_inter_train_s=2.0)
    seq = Seq().burst(0.0, 40.0, 5, 20).single(1.5, 40.0)  # 1.42 s after its last pulse
    assert rules(violations(seq.pulses, two)) == {"R6"}
    seq = Seq().burst(0.0, 40.0, 5, 20).single(2.081, 40.0)
    assert violations(seq.pulses, two) == []


def test_r6_not_after_single_or_paired() -> None:
    five = lim(min_inter_train_s=5.0, min_interval_s=1.0)
    assert violations(Seq().single(0.0, 40).single(1.0, 40).pulses, five) == []
    assert violations(Seq().paired(0.0, 30, 40, 50).paired(1.0, 30, 40, 50).pulses,
                      five) == []


# --- R7 hard caps ---------------------------------------------------------------------

def test_r7_25_pulses_per_second() -> None:
    # quintuplets (100 Hz) every 0.2 s: 25 pulses in any 1 s
    seq = Seq()
    u = seq.unit()
    for b in range(8):
        seq.burst(b * 0.2, 40.0, 5, 10, unit=u)
    assert violations(seq.pulses, BASE) == []
    # every 0.19 s: allowed by R4, but 30 pulses in one second
    seq = Seq()
    u = seq.unit()
    for b in range(8):
        seq.burst(b * 0.19, 40.0, 5, 10, unit=u)
    assert rules(violations(seq.pulses, BASE)) == {"R7"}


def test_r7_pulses_of_different_triggers() -> None:
    seq = Seq()
    u = seq.unit()
    seq.burst(0.0, 40, 2, 10, unit=u).burst(0.02, 40, 2, 10, unit=u)   # 10 ms apart
    assert violations(seq.pulses, BASE) == []
    seq = Seq()
    u = seq.unit()
    # 9 ms apart is 10 ms within the 1-ms timing tolerance; 8.9 ms is not
    seq.burst(0.0, 40, 2, 10, unit=u).burst(0.019, 40, 2, 10, unit=u)
    assert "R7" not in rules(violations(seq.pulses, BASE))
    seq = Seq()
    u = seq.unit()
    seq.burst(0.0, 40, 2, 10, unit=u).burst(0.0189, 40, 2, 10, unit=u)
    found = violations(seq.pulses, BASE)
    assert "R7" in rules(found) and any("8.900 ms" in line for line in found)
    # within one trigger a 2 ms ISI is fine
    assert violations(Seq().paired(0.0, 40, 40, 2).pulses, BASE) == []


# --- R8 counts ------------------------------------------------------------------------

def test_r8_session_pulses() -> None:
    seq = Seq().single(0.0, 40).single(2.0, 40).single(4.0, 40)
    assert violations(seq.pulses, lim(max_pulses=3)) == []
    seq.single(6.0, 40)
    found = violations(seq.pulses, lim(max_pulses=3))
    assert rules(found) == {"R8"} and "t=6.000000" in found[0]
    # a paired trigger is two pulses
    assert rules(violations(Seq().paired(0.0, 30, 40, 3).pulses, lim(max_pulses=1))) == {"R8"}


def test_r8_rate_window() -> None:
    w = lim(rate_window_s=10.0, max_pulses_per_window=3)
    at = [0.0, 3.5, 7.0, 10.0]        # (0, 10] holds 3
    seq = Seq()
    for t in at:
        seq.single(t, 40)
    assert violations(seq.pulses, w) == []
    seq = Seq()
    for t in [0.0, 3.5, 7.0, 9.9]:
        seq.single(t, 40)
    assert rules(violations(seq.pulses, w)) == {"R8"}


def test_r8_day() -> None:
    seq = Seq().single(0.0, 40).single(2.0, 40)
    assert violations(seq.pulses, lim(day_start=1998, max_pulses_per_day=2000)) == []
    seq.single(4.0, 40)
    assert rules(violations(seq.pulses, lim(day_start=1998, max_pulses_per_day=2000))) \
        == {"R8"}


def test_r8_units() -> None:
    seq = Seq().train(0.0, 10.0, 3, 40).single(2.0, 40)
    assert violations(seq.pulses, lim(max_units=2)) == []
    seq.single(4.0, 40)
    assert rules(violations(seq.pulses, lim(max_units=2))) == {"R8"}


# --- R9 atomic units ------------------------------------------------------------------

def test_r9_intensity_changed_inside_a_unit() -> None:
    seq = Seq()
    u = seq.unit()
    for k in range(6):
        seq.single(k * 0.2, 40.0 if k < 3 else 45.0, unit=u)
    found = violations(seq.pulses, BASE)
    assert rules(found) == {"R9"} and "t=0.600000" in found[0]


def test_r9_paired_becomes_single_inside_a_unit() -> None:
    seq = Seq()
    u = seq.unit()
    seq.paired(0.0, 30.0, 40.0, 3, unit=u).paired(0.2, 30.0, 40.0, 3, unit=u)
    assert violations(seq.pulses, BASE) == []
    seq.single(0.4, 40.0, unit=u)
    assert rules(violations(seq.pulses, BASE)) == {"R9"}
    seq = Seq()
    u = seq.unit()
    seq.paired(0.0, 30.0, 40.0, 3, unit=u).paired(0.2, 35.0, 40.0, 3, unit=u)
    assert rules(violations(seq.pulses, BASE)) == {"R9"}


def test_r9_not_across_units() -> None:
    seq = Seq().single(0.0, 40.0).single(2.0, 45.0)
    assert violations(seq.pulses, BASE) == []


# --- the attacks of the issue, as sequences -------------------------------------------

def test_attack_open_loop_20hz_singles() -> None:
    seq = Seq()
    for k in range(800):  # 40 s
        seq.single(k * 0.05, 60.0)
    assert "R3" in rules(violations(seq.pulses, lim(motor_threshold_pct=None)))
    assert "R5" in rules(violations(seq.pulses, BASE))


def test_lines_name_the_rule_and_times() -> None:
    seq = Seq().train(0.0, 20.0, 10, 40.0).single(1.95, 40.0)
    (line,) = violations(seq.pulses, lim(min_inter_train_s=2.0))
    assert line.startswith("R6 ") and "t=0.450000" in line and "t=1.950000" in line
