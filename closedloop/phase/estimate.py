"""What every phase estimator returns."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PhaseEstimate", "wrap_rad"]


def wrap_rad(x: float) -> float:
    """Wrap an angle to ``(-pi, pi]``."""
    y = math.remainder(x, 2 * math.pi)
    return math.pi if y == -math.pi else y


@dataclass(frozen=True, slots=True)
class PhaseEstimate:
    """Phase of the band-limited signal at one instant, and how to extrapolate it.

    Attributes:
        lsl_time: The instant (LSL clock, true acquisition time) the phase refers to.
        phase_rad: Phase in ``(-pi, pi]``; 0 = positive peak, pi = trough.
        freq_hz: Instantaneous frequency, for extrapolating ``phase_at``.
        amplitude: Envelope of the band-limited signal at ``lsl_time`` (signal units).
        expected_error_deg: The estimator's confidence: the circular SD of phase error it
            expects for this estimate (measured on held-out calibration data), or None
            when it cannot say.
    """

    lsl_time: float
    phase_rad: float
    freq_hz: float
    amplitude: float
    expected_error_deg: float | None = None

    def phase_at(self, t: float) -> float:
        """Phase extrapolated to LSL time ``t`` at constant frequency."""
        return wrap_rad(self.phase_rad + 2 * math.pi * self.freq_hz * (t - self.lsl_time))
