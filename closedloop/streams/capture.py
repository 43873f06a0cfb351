"""Record a few seconds of the configured EEG stream (for ``closedloop calibrate``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from closedloop.config.schema import Config
from closedloop.dsp.filters import Decimator
from closedloop.dsp.spatial import hjorth
from closedloop.streams.reader import StreamReader

__all__ = ["record_live"]


def record_live(cfg: Config, seconds: float,
                progress: Callable[[float], None] | None = None
                ) -> tuple[npt.NDArray[np.float64], float]:
    """Record ``seconds`` of the configured EEG stream, spatially filtered, decimated."""
    reader = StreamReader(role="eeg", selector=cfg.streams.eeg, acquisition=cfg.acquisition,
                          required_labels={"phase.channel": [cfg.phase.channel],
                                           "phase.reference": list(cfg.phase.reference)},
                          on_data=lambda: None, on_event=lambda _e: None)
    buffer_s = max(cfg.acquisition.buffer_s, seconds + 5.0)
    reader.acq = replace(cfg.acquisition, buffer_s=buffer_s)
    reader.start()
    try:
        summary = reader.wait_connected(cfg.acquisition.resolve_timeout_s)
        spatial = hjorth(summary.labels, cfg.phase.channel, cfg.phase.reference)
        dec = Decimator(summary.rate_hz, Decimator.factor_for(summary.rate_hz,
                                                              cfg.phase.processing_rate_hz))
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if reader.error is not None:
                raise reader.error
            if progress is not None:
                progress(elapsed)
            time.sleep(min(1.0, seconds - elapsed))
        assert reader.ring is not None
        got = reader.ring.latest(int(seconds * summary.rate_hz))
        x, _ = dec.process(spatial.apply(got.data), got.timestamps)
        return x, dec.fs_out
    finally:
        reader.stop()
