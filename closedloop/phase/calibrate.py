"""``closedloop calibrate``: find the peak, the SNR and the best estimator for a person.

From a few minutes of resting EEG (recorded live from the configured stream, or read from
a file), with the configured spatial filter: the individual peak frequency and its SNR on
the 1/f-corrected spectrum, then every live-capable estimator scored causally against the
Zrenner 2020 ground truth on that same data, each with the configured parameters and a
few variants of its main one (:data:`VARIANTS`). The best (lowest circular SD where the
rhythm is above its median amplitude), its parameter and the band around the peak are
written into a copy of the configuration. When the rhythm is too weak for useful phase
targeting, it says so plainly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tomli_w

from closedloop.config.load import config_to_dict
from closedloop.config.schema import Config, PhaseConfig
from closedloop.dsp.filters import Decimator
from closedloop.dsp.spatial import hjorth
from closedloop.errors import ClosedLoopError
from closedloop.phase.evaluate import evaluate_signal
from closedloop.phase.wiener import MIN_SNR_DB, train_wiener
from closedloop.replay.recording import load_recording

__all__ = ["LIVE_ESTIMATORS", "MIN_SNR_DB", "VARIANTS", "calibrate_signal", "candidates",
           "write_config"]

LIVE_ESTIMATORS = ("ar", "echt", "etp", "resonator", "wiener")
# estimator -> the parameter whose values are tried besides the configured one
VARIANTS: dict[str, tuple[str, tuple[float, ...]]] = {
    "ar": ("ar_order", (10, 20, 30)),
    "echt": ("echt_window_ms", (500.0, 1000.0, 2000.0)),
    "resonator": ("resonator_bandwidth_hz", (2.0, 3.0, 4.0)),  # at most the band width
    "wiener": ("wiener_taps_ms", (250.0, 500.0, 1000.0)),
}
# Below these the phase is not worth targeting: the published methods reach about 45-50°
# on the weakest EEGMAT subjects, close to a uniform error on the gated trials.
MAX_USEFUL_SD_DEG = 40.0


def candidates(phase: PhaseConfig) -> dict[str, tuple[str, PhaseConfig, dict[str, Any]]]:
    """label -> (estimator, its parameters, the parameter varied and its value)."""
    out: dict[str, tuple[str, PhaseConfig, dict[str, Any]]] = {}
    for name in LIVE_ESTIMATORS:
        if name not in VARIANTS:
            out[name] = (name, replace(phase, estimator=name), {})  # type: ignore[arg-type]
            continue
        key, values = VARIANTS[name]
        current = getattr(phase, key)
        for v in sorted({*values, current}):
            value = type(current)(v)
            params = replace(phase, estimator=name, **{key: value})  # type: ignore[arg-type]
            out[f"{name} {key}={value:g}"] = (name, params, {key: value})
    return out


def calibrate_signal(x: npt.NDArray[np.float64], fs: float,
                     phase: PhaseConfig | None = None) -> dict[str, Any]:
    """Peak, SNR and the scores of the live estimators and their variants on ``x``
    (the first third, at most 60 s, trains and gives the peak; the rest is scored)."""
    phase = phase or PhaseConfig()
    train_s = min(60.0, len(x) / fs / 3.0)
    if len(x) / fs < 40.0:
        raise ClosedLoopError(f"{len(x) / fs:.0f} s of EEG is too little to calibrate "
                              "(at least 40 s; a few minutes are better)")
    cands = candidates(phase)
    info, results = evaluate_signal(x, fs, train_s=train_s, rhythm=phase.rhythm,
                                    variants={k: (n, c) for k, (n, c, _) in cands.items()})
    scores = {r.name: r.scores["amp>median"] for r in results}
    label = min(scores, key=lambda n: float(scores[n]["circ_sd_deg"] or 1e9))
    best, _, parameters = cands[label]
    sd = float(scores[label]["circ_sd_deg"] or 1e9)
    useful = info["snr_db"] >= MIN_SNR_DB and sd <= MAX_USEFUL_SD_DEG
    verdict = ("usable for phase targeting" if useful else
               "NOT usable for phase targeting: the rhythm is too weak (SNR "
               f"{info['snr_db']:.1f} dB, expected error {sd:.0f}°); consider another "
               "channel or montage, or do not target phase with this person")
    return {"peak_hz": info["peak_hz"], "snr_db": info["snr_db"],
            "band_hz": info["estimator_band_hz"], "estimator": best,
            "parameters": parameters, "expected_circ_sd_deg": sd,
            "expected_bias_deg": scores[label]["bias_deg"],
            "scores_amp_above_median": scores, "useful": useful, "verdict": verdict,
            "seconds": round(len(x) / fs, 1)}


def signal_from_file(cfg: Config, path: Path) -> tuple[npt.NDArray[np.float64], float]:
    """The configured spatial filter applied to a recording, decimated to the processing
    rate as the live tracker does."""
    rec = load_recording(path)
    try:
        spatial = hjorth(rec.labels, cfg.phase.channel, cfg.phase.reference)
    except ValueError as exc:
        raise ClosedLoopError(f"{path}: {exc}; it has {', '.join(rec.labels)}") from exc
    dec = Decimator(rec.fs, Decimator.factor_for(rec.fs, cfg.phase.processing_rate_hz))
    x, _ = dec.process(spatial.apply(rec.data), np.arange(len(rec.data)) / rec.fs)
    return x, dec.fs_out


def write_config(cfg: Config, result: dict[str, Any], path: Path,
                 x: npt.NDArray[np.float64] | None = None, fs: float = 0.0) -> Path | None:
    """A copy of ``cfg`` with the calibrated band and estimator, as TOML.

    When the best estimator is ``wiener``, its filter is trained on all of ``x`` and
    written beside the config (``<name>.wiener.npz``, referenced by ``phase.wiener_file``);
    that path is returned.
    """
    data = config_to_dict(cfg)
    band = (float(result["band_hz"][0]), float(result["band_hz"][1]))
    data["phase"]["band_hz"] = [round(v, 3) for v in band]
    data["phase"]["estimator"] = result["estimator"]
    data["phase"].update(result.get("parameters", {}))
    model_path = None
    if result["estimator"] == "wiener":
        if x is None:
            raise ValueError("the wiener estimator needs the calibration data to train on")
        model_path = path.with_suffix(".wiener.npz").resolve()
        train_wiener(x, fs, taps_ms=data["phase"]["wiener_taps_ms"], band_hz=band,
                     rhythm=cfg.phase.rhythm).save(model_path)
        data["phase"]["wiener_file"] = str(model_path)

    def drop_none(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: drop_none(v) for k, v in d.items() if v is not None}
        return d

    shown = " ".join(f"{k}={v:g}" for k, v in result.get("parameters", {}).items())
    header = (f"# written by closedloop calibrate: peak {result['peak_hz']} Hz, SNR "
              f"{result['snr_db']} dB, {result['estimator']} {shown} expected circular SD "
              f"{result['expected_circ_sd_deg']}°; {result['verdict']}\n")
    path.write_text(header + tomli_w.dumps(drop_none(data)))
    return model_path
