#!/usr/bin/env python3
"""Speed of the offline mode (``closedloop offline``), printed as JSON.

Runs the decision pipeline over (a) 120 s of simulated EEG, 64 channels at 1000 Hz (the
target: at least 50x real time with the default estimator), with each estimator (the
default ``wiener`` trains on the first 30 s, in the run's time), and (b) a real EEGMAT recording
(``../shared/data``, when present), ``--repeats`` times each: the speed is the median of
the runs (all are listed; these machines are shared and noisy), and every run must give
the same fingerprint.

Usage: ``python tools/bench_offline.py [--seconds 120]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from closedloop.config.load import load_config  # noqa: E402
from closedloop.config.schema import PhaseConfig  # noqa: E402
from closedloop.replay.offline import run_offline  # noqa: E402
from closedloop.replay.recording import Recording, load_edf  # noqa: E402
from closedloop.sim.eeg_model import LABELS_10_10_64, EegGenerator, EegSimParams  # noqa: E402

DATA = Path(os.environ.get("CLOSEDLOOP_SHARED_DATA", ROOT.parent / "shared" / "data"))


def simulated(seconds: float, fs: float = 1000.0) -> Recording:
    gen = EegGenerator(EegSimParams(fs=fs), np.random.default_rng(7))
    block = gen.generate(int(seconds * fs))
    return Recording(data=block.data.astype(np.float64), labels=LABELS_10_10_64, fs=fs,
                     unit="uV", source="simulated")


def _repeat(cfg: Any, rec: Recording, repeats: int) -> dict[str, Any]:
    runs = [run_offline(cfg, rec) for _ in range(max(1, repeats))]
    speeds = sorted(r.speed_x for r in runs)
    return {**runs[0].summary(), "speed_x": round(float(np.median(speeds)), 1),
            "speed_x_runs": [round(v, 1) for v in speeds],
            "repeat_same_fingerprint": len({r.fingerprint for r in runs}) == 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out: dict[str, Any] = {}
    rec = simulated(args.seconds)
    for est in ("wiener", "ar", "echt", "etp", "resonator"):
        cfg = load_config(None, [f'phase.estimator="{est}"', "trigger.amplitude_percentile=50",
                                 "trigger.seed=1"])
        out[f"simulated_64ch_1000Hz_{est}"] = _repeat(cfg, rec, args.repeats)
    edf = DATA / "eeg" / "eegmat" / "Subject19_1.edf"
    if edf.exists():
        real = load_edf(edf)
        cfg = load_config(None, ['phase.reference=["F3", "T3", "Cz", "P3"]', "trigger.seed=1"])
        out["eegmat_subject19_500Hz_ar"] = {**_repeat(cfg, real, args.repeats),
                                            "channels": len(real.labels)}
    out["target_speed_x"] = 50
    default = PhaseConfig().estimator
    out["default_estimator"] = default
    out["met"] = out[f"simulated_64ch_1000Hz_{default}"]["speed_x"] >= 50
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
