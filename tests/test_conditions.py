"""Several conditions at once: the mu phase, and band power on the same or another
channel (as the bossdevice offers), through the offline pipeline the live one shares."""

from __future__ import annotations

import numpy as np
import pytest

from closedloop.config.load import load_config
from closedloop.errors import ConfigError
from closedloop.replay.offline import run_offline
from closedloop.replay.recording import Recording

pytestmark = pytest.mark.compute  # CPU-bound, no real-time deadline (conftest.py)

FS = 1000.0
LABELS = ["C3", "FC1", "FC5", "CP1", "CP5", "C4"]


def recording(seconds: float = 60.0) -> tuple[Recording, np.ndarray]:
    """A steady 10.5 Hz mu rhythm under C3; 22 Hz beta on C4 only in alternate 2 s
    blocks. Returns the recording and, per sample, whether beta is on."""
    rng = np.random.default_rng(3)
    n = int(seconds * FS)
    t = np.arange(n) / FS
    data = rng.normal(0.0, 1.0, (n, len(LABELS)))
    data[:, 0] += 6.0 * np.cos(2 * np.pi * 10.5 * t)
    beta_on = (t // 2.0) % 2 == 1
    data[:, 5] += np.where(beta_on, 5.0, 0.0) * np.cos(2 * np.pi * 22.0 * t)
    return Recording(data=data, labels=LABELS, fs=FS, unit="uV", source="test"), beta_on


def pulses_in_beta(sets: list[str]) -> tuple[int, float, dict[str, int]]:
    rec, beta_on = recording()
    cfg = load_config(None, ['phase.estimator="ar"', "trigger.min_interval_s=0.5",
                             "safety.motor_threshold_pct=60",  # < 1 s apart is rTMS
                             "safety.min_inter_train_s=1",
                             "trigger.jitter_s=0", "trigger.seed=1",
                             "trigger.amplitude_percentile=0", *sets])
    result = run_offline(cfg, rec)
    idx = [round((p["lsl_time"] - rec.first_timestamp) * FS) for p in result.pulses]
    inside = [bool(beta_on[i]) for i in idx if 0 <= i < len(beta_on)]
    reasons: dict[str, int] = {}
    for d in result.decisions:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    return len(idx), (sum(inside) / len(inside)) if inside else float("nan"), reasons


def test_pulses_only_while_beta_is_high_or_only_while_low() -> None:
    base = ['trigger.power_conditions=[{band_hz=[19, 25], channel="C4", percentile=50, '
            'above=%s}]']
    n_any, frac_any, _ = pulses_in_beta([])
    n_hi, frac_hi, why_hi = pulses_in_beta([base[0] % "true"])
    n_lo, frac_lo, why_lo = pulses_in_beta([base[0] % "false"])
    assert n_any > 25 and 0.25 < frac_any < 0.75  # the phase alone ignores beta
    assert n_hi > 15 and frac_hi > 0.9
    assert n_lo > 15 and frac_lo < 0.1
    assert why_hi.get("power_condition_0_below", 0) > 10
    assert why_lo.get("power_condition_0_above", 0) > 10


def test_a_power_condition_on_a_missing_channel_or_bad_band_is_refused() -> None:
    rec, _ = recording(5.0)
    cfg = load_config(None, ['trigger.power_conditions=[{band_hz=[13, 30], channel="Oz"}]'])
    with pytest.raises(ValueError, match="labels not found: Oz"):
        run_offline(cfg, rec)
    with pytest.raises(ConfigError, match=r"trigger\.power_conditions\[0\]\.band_hz"):
        load_config(None, ["trigger.power_conditions=[{band_hz=[30, 13]}]"])
