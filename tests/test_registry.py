"""One estimator registry: the live tracker builds the estimator that evaluate-phase and
calibrate score (before, the live ecHT had another centre and width)."""

from __future__ import annotations

import numpy as np
import pytest

from closedloop.config.schema import PhaseConfig
from closedloop.phase.echt import EcHT
from closedloop.phase.peak import PeakFit
from closedloop.phase.registry import centre_of, make_echt, make_resonator
from closedloop.phase.resonator import Resonator
from closedloop.phase.tracker import PhaseTracker
from closedloop.sim.eeg_model import LABELS_10_10_64

FS_IN = 1000.0


def tracker(estimator: str) -> PhaseTracker:
    return PhaseTracker(fs_in=FS_IN, labels=LABELS_10_10_64,
                        cfg=PhaseConfig(estimator=estimator))  # type: ignore[arg-type]


def test_the_centre_is_the_peak_when_the_band_is_the_peaks() -> None:
    peak = PeakFit(10.5, 6.0, (8.5, 12.5))
    assert centre_of((8.5, 12.5), peak) == 10.5
    assert centre_of((8.0, 13.0), peak) == pytest.approx(np.sqrt(8.0 * 13.0))
    assert centre_of((8.0, 13.0), None) == pytest.approx(np.sqrt(8.0 * 13.0))


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_live_echt_is_the_evaluated_one(calibrated: bool) -> None:
    tr = tracker("echt")
    band = (8.5, 12.5)
    if calibrated:
        tr.peak = PeakFit(10.5, 6.0, band)
    tr.set_band(band)
    assert isinstance(tr.estimator, EcHT)
    built = make_echt(tr.cfg, tr.fs, 10.5 if calibrated else float(np.sqrt(8.5 * 12.5)))
    assert tr.estimator.window == built.window
    assert np.allclose(tr.estimator._spectrum_gain, built._spectrum_gain)


def test_the_live_resonator_is_the_evaluated_one() -> None:
    tr = tracker("resonator")
    band = (8.5, 12.5)
    tr.peak = PeakFit(10.5, 6.0, band)
    tr.set_band(band)
    assert isinstance(tr.estimator, Resonator)
    built = make_resonator(tr.cfg, tr.fs, 10.5, band)
    x = np.sin(2 * np.pi * 10.5 * np.arange(2000) / tr.fs)
    tr.estimator.process(x)
    built.process(x)
    a, b = tr.estimator.estimate(1.0), built.estimate(1.0)
    assert a is not None and b is not None and a.phase_rad == b.phase_rad
