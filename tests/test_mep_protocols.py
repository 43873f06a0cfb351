"""MEP-driven closed loops as pure algorithms, against the simulated participant's truth."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from closedloop.mep.phase_search import PhaseSearch
from closedloop.mep.recruitment import fit_boltzmann
from closedloop.mep.threshold import IfcnRelativeFrequency, MlPest
from closedloop.sim.emg_model import MepModel
from tests.conftest import need_data

_spec = importlib.util.spec_from_file_location(
    "bench_mep", Path(__file__).resolve().parent.parent / "tools" / "bench_mep.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MODEL = MepModel()
MT = bench.true_threshold(MODEL)


def test_ml_pest_finds_the_threshold_in_few_pulses() -> None:
    hits = 0
    for seed in range(20):
        result = bench.run_hunt(MlPest(start_pct=50.0), MODEL, np.random.default_rng(seed))
        assert result.pulses <= 20
        assert result.low_pct <= result.threshold_pct <= result.high_pct
        hits += abs(result.threshold_pct - MT) <= 2.0
    assert hits >= 14  # the benchmark's 50 runs: 92% within ±2 %MSO


def test_ml_pest_survives_a_lost_pulse() -> None:
    """A miss at a high intensity (a pulse that never reached the coil) is an outlier."""
    close = 0
    for seed in range(10):
        hunt = MlPest(start_pct=50.0)
        hunt.record(50.0, 0.0)  # lost: no MEP at a clearly suprathreshold intensity
        result = bench.run_hunt(hunt, MODEL, np.random.default_rng(seed))
        assert result.pulses <= 20
        close += abs(result.threshold_pct - MT) <= 3.0
    assert close >= 7  # without the lapse rate: none of them


def test_ifcn_relative_frequency() -> None:
    errors = [bench.run_hunt(IfcnRelativeFrequency(start_pct=50.0), MODEL,
                             np.random.default_rng(seed)).threshold_pct - MT
              for seed in range(10)]
    assert np.median(np.abs(errors)) <= 2.0


def test_ifcn_goes_up_when_started_below_threshold() -> None:
    result = bench.run_hunt(IfcnRelativeFrequency(start_pct=26.0), MODEL,
                            np.random.default_rng(1))
    assert result.converged
    assert abs(result.threshold_pct - MT) <= 3.0


def test_boltzmann_fit_recovers_s50_with_intervals() -> None:
    rng = np.random.default_rng(3)
    levels = np.repeat(np.arange(30.0, 71.0, 4.0), 8)
    rng.shuffle(levels)
    fit = fit_boltzmann(levels, np.array([bench.draw(MODEL, i, rng) for i in levels]))
    assert abs(fit.s50_pct - MODEL.s50_pct) <= 3.0
    lo, hi = fit.ci["s50_pct"]
    assert lo <= fit.s50_pct <= hi
    assert fit.threshold_pct < fit.s50_pct
    with pytest.raises(ValueError, match="at least 5 pulses"):
        fit_boltzmann(np.array([40.0, 50.0]), np.array([10.0, 100.0]))


def test_phase_search_names_the_best_phase() -> None:
    found = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        search = PhaseSearch(n_bins=4, seed=seed)
        for _ in range(200):
            k = search.next_bin()
            landed = math.radians(search.bin_phase_deg(k)) + rng.normal(0, math.radians(30))
            search.record(k, bench.draw(MODEL, 60.0, rng, phase=landed))
        report = search.report()
        found += report["best_phase_deg"] == 180.0
        pulses = report["pulses"]
        assert isinstance(pulses, list)
        assert pulses[2] == max(pulses)  # most pulses went to the best bin
    assert found >= 8


def test_real_recruitment_curve_gives_a_sensible_threshold() -> None:
    result = bench.oxford(need_data("emg", "oxford_mep"))
    assert result is not None
    assert result["pulses"] == 150
    assert 29.0 < result["threshold_pct"] < 38.0  # no response at 29-32 %MSO
    lo, hi = result["ci95"]["threshold_pct"]
    assert lo <= result["threshold_pct"] <= hi
    assert 35.0 < result["s50_pct"] < 50.0


def test_randomised_phase_map_is_balanced_with_intervals() -> None:
    search = PhaseSearch(n_bins=4, seed=1, adaptive=False)
    rng = np.random.default_rng(1)
    for _ in range(40):
        k = search.next_bin()
        search.record(k, bench.draw(MODEL, 60.0, rng, phase=math.radians(search.bin_phase_deg(k))))
    report = search.report()
    assert report["pulses"] == [10, 10, 10, 10]
    ci = report["geometric_mean_ci95_uv"]
    assert isinstance(ci, list)
    lo, hi = ci[2]  # 180°: the largest MEPs
    assert lo < hi
    assert report["best_phase_deg"] == 180.0
