"""``closedloop evaluate-phase``: score every estimator on a recording; JSON and a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from closedloop.errors import ClosedLoopError
from closedloop.extras import require_matplotlib
from closedloop.phase.evaluate import ESTIMATORS, EvaluationResult, evaluate_signal
from closedloop.replay.recording import load_recording

__all__ = ["evaluate_file", "load_signal", "polar_png"]


def load_signal(path: Path, channel: str, reference: Sequence[str]
                ) -> tuple[npt.NDArray[np.float64], float]:
    """The channel minus the mean of ``reference`` (Hjorth), and the rate."""
    rec = load_recording(path)
    missing = [c for c in (channel, *reference) if c not in rec.labels]
    if missing:
        raise ClosedLoopError(f"{path}: no channel(s) {', '.join(missing)}; it has "
                              f"{', '.join(rec.labels)}")
    x = rec.channel(channel)
    if reference:
        x = x - np.mean([rec.channel(c) for c in reference], axis=0)
    return x, rec.fs


def polar_png(results: Sequence[EvaluationResult], path: Path, title: str) -> None:
    """Polar histograms of the phase error at amplitude above the median."""
    require_matplotlib("polar histograms (--png)")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(results), subplot_kw={"projection": "polar"},
                             figsize=(3.2 * len(results), 3.6))
    axes = np.atleast_1d(axes)
    bins = np.linspace(-math.pi, math.pi, 37)
    for ax, r in zip(axes, results, strict=True):
        e = r.errors[r.gates["amp>median"]]
        e = e[np.isfinite(e)]
        counts, _ = np.histogram(np.angle(np.exp(1j * e)), bins=bins)
        ax.bar(bins[:-1], counts, width=np.diff(bins), align="edge", alpha=0.8)
        s = r.scores["amp>median"]
        ax.set_title(f"{r.name}\nSD {s['circ_sd_deg']}°, bias {s['bias_deg']}°", fontsize=9)
        ax.set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_file(path: Path, *, channel: str, reference: Sequence[str],
                  estimators: Sequence[str] = ESTIMATORS, train_s: float = 60.0,
                  json_out: Path | None = None, png_out: Path | None = None,
                  rhythm: str = "alpha") -> dict[str, Any]:
    """Evaluate, write the JSON and PNG when asked, and return the report."""
    if png_out is not None:  # before a minute of computing, not after
        require_matplotlib("polar histograms (--png)")
    x, fs = load_signal(path, channel, reference)
    if len(x) < (train_s + 20.0) * fs:
        raise ClosedLoopError(f"{path}: {len(x) / fs:.0f} s is too short: {train_s:g} s of "
                              "training plus at least 20 s to score")
    info, results = evaluate_signal(x, fs, estimators=tuple(estimators), train_s=train_s,
                                    rhythm=rhythm)
    report = {"file": str(path), "signal": f"{channel}" + (
        f" - mean({', '.join(reference)})" if reference else ""), "fs": fs, **info,
        "estimators": {r.name: {"scores": r.scores, "cost_us": r.cost_us} for r in results}}
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1))
    if png_out is not None:
        polar_png(results, png_out, f"{path.name}: {report['signal']}, amplitude > median")
    return report
