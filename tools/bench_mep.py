#!/usr/bin/env python3
"""MEP-driven closed loops against a simulated participant (known truth), JSON out.

The simulated participant is closedloop's MEP model (``closedloop.sim.emg_model``):
Boltzmann recruitment (S50 50 %MSO, slope 3.5 %), phase modulation (best at the mu
trough, 180°) and log-normal variability. Reported over ``--runs`` seeded runs:

- ML-PEST: threshold error and pulses (target: within ±2 %MSO in <= 20 pulses in >= 80%);
- IFCN relative frequency: threshold error and pulses;
- input-output curve: S50 error of the Boltzmann fit (target: within ±3 %MSO);
- adaptive phase search (4 bins, 200 pulses, targeting error SD 30°): how often it names
  the true best bin (target: >= 80%).

It also fits the real recruitment curve in ``../shared/data/emg/oxford_mep/``.

Usage: ``python tools/bench_mep.py [--runs 50]``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.io import loadmat

from closedloop.mep.phase_search import PhaseSearch
from closedloop.mep.recruitment import fit_boltzmann
from closedloop.mep.threshold import IfcnRelativeFrequency, MlPest
from closedloop.sim.emg_model import MepModel

REPO = Path(__file__).resolve().parent.parent


def true_threshold(model: MepModel, response_uv: float = 50.0) -> float:
    """Intensity where P(MEP >= 50 µV) = 0.5 with the phase at random (Monte Carlo)."""
    rng = np.random.default_rng(12345)
    phase = rng.uniform(-math.pi, math.pi, 40_000)
    noise = np.exp(rng.normal(0.0, model.variability, phase.size))
    grid = np.arange(20.0, 80.0, 0.05)
    mod = 1.0 + model.phase_depth * np.cos(phase - model.best_phase_rad)
    for intensity in grid:
        base = model.mep_max_uv / (1.0 + math.exp((model.s50_pct - intensity) / model.slope_pct))
        if np.mean(base * mod * noise >= response_uv) >= 0.5:
            return float(intensity)
    return math.nan


def draw(model: MepModel, intensity: float, rng: np.random.Generator,
         phase: float | None = None) -> float:
    ph = rng.uniform(-math.pi, math.pi) if phase is None else phase
    return model.draw_p2p_uv(intensity, ph, rng) + abs(rng.normal(0.0, 8.0))  # + noise p2p


def run_hunt(hunt: Any, model: MepModel, rng: np.random.Generator) -> Any:
    while not hunt.done:
        i = hunt.next_intensity()
        hunt.record(i, draw(model, i, rng))
    return hunt.result()


def oxford(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    xs, ys = [], []
    for f in sorted(path.glob("S1_Magstim_*percent.mat")):
        pct = float(f.stem.split("_")[-1].removesuffix("percent"))
        values = loadmat(f)["Values"] * 1000.0  # mV -> µV; pulse at sample 1000, 10 kHz
        win = values[1150:1500]  # 15-50 ms
        for p2p in win.max(axis=0) - win.min(axis=0):
            xs.append(pct)
            ys.append(float(p2p))
    fit = fit_boltzmann(np.array(xs), np.array(ys))
    return {"pulses": fit.n, "mep_max_uv": round(fit.mep_max_uv, 1),
            "s50_pct": round(fit.s50_pct, 2), "slope_pct": round(fit.slope_pct, 2),
            "threshold_pct": round(fit.threshold_pct, 2),
            "ci95": {k: [round(v[0], 2), round(v[1], 2)] for k, v in fit.ci.items()},
            "responses_at_29_32_pct": int(sum(1 for x, y in zip(xs, ys, strict=True)
                                              if x <= 32 and y >= 50))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    model = MepModel()
    mt = true_threshold(model)
    pest, ifcn, io, phase = [], [], [], []
    for seed in range(args.runs):
        rng = np.random.default_rng(seed)
        r = run_hunt(MlPest(start_pct=50.0), model, rng)
        pest.append((r.threshold_pct - mt, r.pulses))
        r = run_hunt(IfcnRelativeFrequency(start_pct=50.0), model, rng)
        ifcn.append((r.threshold_pct - mt, r.pulses))
        levels = np.repeat(np.arange(30.0, 71.0, 4.0), 8)
        rng.shuffle(levels)
        fit = fit_boltzmann(levels, np.array([draw(model, i, rng) for i in levels]), seed=seed)
        io.append(fit.s50_pct - model.s50_pct)
        search = PhaseSearch(n_bins=4, seed=seed)
        for _ in range(200):
            k = search.next_bin()
            landed = math.radians(search.bin_phase_deg(k)) + rng.normal(0.0, math.radians(30))
            search.record(k, draw(model, 60.0, rng, phase=landed))
        rep = search.report()
        phase.append(rep["best_phase_deg"] == 180.0)
    pe = np.array(pest)
    ie = np.array(ifcn)
    result = {
        "benchmark": "mep-closed-loops", "runs": args.runs, "true_threshold_pct": round(mt, 2),
        "ml_pest": {"within_2pct": float(np.mean(np.abs(pe[:, 0]) <= 2.0)),
                    "median_abs_error_pct": round(float(np.median(np.abs(pe[:, 0]))), 2),
                    "median_pulses": float(np.median(pe[:, 1])),
                    "max_pulses": int(pe[:, 1].max()),
                    "target": "within ±2 %MSO in <= 20 pulses in >= 80% of runs"},
        "ifcn_relative_frequency": {
            "within_2pct": float(np.mean(np.abs(ie[:, 0]) <= 2.0)),
            "median_abs_error_pct": round(float(np.nanmedian(np.abs(ie[:, 0]))), 2),
            "median_pulses": float(np.median(ie[:, 1]))},
        "io_curve": {"s50_within_3pct": float(np.mean(np.abs(io) <= 3.0)),
                     "median_abs_s50_error_pct": round(float(np.median(np.abs(io))), 2),
                     "pulses_per_curve": 88},
        "phase_search": {"found_best_bin": float(np.mean(phase)), "pulses": 200,
                         "target": ">= 80% of runs"},
        "oxford_recruitment_curve": oxford(REPO.parent / "shared" / "data" / "emg"
                                           / "oxford_mep"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
