"""From EEG chunks to decisions: the part of the pipeline the live service and the
offline mode share, so that the same samples give the same decisions in both.

Pure apart from the phase tracker's filter state and the jitter's random generator; no
clock is read here: the caller says what time ``now`` is (the LSL clock live, the newest
sample's time plus a modelled processing delay offline).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from closedloop.config.schema import Config
from closedloop.control.trigger_policy import (
    Decision,
    PolicyParams,
    PolicyReason,
    TriggerState,
    decide,
    decide_open_loop,
)
from closedloop.phase.amplitude import RunningPercentile
from closedloop.phase.estimate import PhaseEstimate
from closedloop.phase.tracker import PhaseTracker
from closedloop.stim.patterns import unit_for

__all__ = ["AMPLITUDE_WARMUP_S", "DecisionCore", "Update"]

# The amplitude gate trusts its percentile after this much data, and recomputes it on a
# grid of the data's own time: a chunk the live reader received merged with the next one
# (one update fewer) then changes neither when the gate opens nor when it is updated.
AMPLITUDE_WARMUP_S = 2.0
THRESHOLD_EVERY_S = 0.1


class Update:
    """One estimator update: the estimate, the band amplitude and the gate's threshold,
    and the power conditions' verdict (None: all hold, else the refusal reason)."""

    __slots__ = ("amplitude", "condition_failure", "est", "threshold")

    def __init__(self, est: PhaseEstimate, amplitude: float, threshold: float,
                 condition_failure: str | None = None) -> None:
        self.est = est
        self.amplitude = amplitude
        self.threshold = threshold
        self.condition_failure = condition_failure


class DecisionCore:
    """The update cadence, the amplitude gate and the trigger policy, with their state."""

    def __init__(self, cfg: Config, tracker: PhaseTracker, *, latency_s: float,
                 rng: np.random.Generator) -> None:
        self.tracker = tracker
        self.latency_s = latency_s
        self.rng = rng
        # decide crossings up to the next expected update: the larger of the configured
        # interval and the observed spacing of updates (amplifiers push chunks of 1-40 ms)
        self.min_horizon = max(cfg.phase.update_interval_ms / 1000.0, 1.0 / tracker.fs)
        self.spacing = self.min_horizon
        self.amp_hist = RunningPercentile(cfg.trigger.amplitude_percentile,
                                          int(cfg.trigger.amplitude_window_s * 1000.0
                                              / max(cfg.phase.update_interval_ms, 1.0)),
                                          recompute_every=0)
        self.conditions = cfg.trigger.power_conditions  # fixed for the session
        self.cond_hist = [RunningPercentile(c.percentile, self.amp_hist.capacity,
                                            recompute_every=0) for c in self.conditions]
        self.state = TriggerState()
        self.last_update = -math.inf
        self._warm_at = math.inf  # data time from which the gate's percentile is trusted
        self._recompute_at = -math.inf
        self._next_grid = math.inf
        self._grid_origin = math.inf
        self.set_config(cfg)

    def set_config(self, cfg: Config) -> None:
        """Take new (live) settings."""
        self.cfg = cfg
        trig = cfg.trigger
        self.params = PolicyParams(target_rad=math.radians(trig.target_phase_deg),
                                   tolerance_rad=math.radians(trig.tolerance_deg),
                                   min_interval_s=trig.min_interval_s,
                                   lead_s=self.latency_s + trig.scheduling_margin_ms / 1000.0,
                                   max_expected_error_deg=trig.max_expected_error_deg)
        if self.amp_hist.q != trig.amplitude_percentile:
            self.amp_hist.q = trig.amplitude_percentile
            self._recompute_at = -math.inf
        self.interval_s = cfg.phase.update_interval_ms / 1000.0
        self.deterministic = cfg.phase.deterministic and self.interval_s > 0
        self.decision_delay_s = cfg.phase.decision_delay_ms / 1000.0
        self.unit = unit_for(cfg.stimulation)
        self.wait_for_training = trig.wait_for_training

    def begin(self, first_sample_time: float) -> None:
        """The first sample's time: the gate's warm-up is counted from it, and the
        deterministic update grid starts at it (so it is the same for a recording and
        its replay, whatever their absolute times)."""
        if not math.isfinite(self._warm_at):
            self._warm_at = first_sample_time + AMPLITUDE_WARMUP_S
        if not math.isfinite(self._grid_origin):
            self._grid_origin = first_sample_time

    def segments(self, ts: npt.NDArray[np.float64], offset_s: float
                 ) -> list[tuple[int, int, bool]]:
        """How to feed a chunk with timestamps ``ts``: ``(start, end, update_after)``.

        Normally one segment, with an update when one is due at its newest sample. With
        ``phase.deterministic`` the chunk is cut after the sample nearest each multiple of
        the update interval from the first sample (in the data's time), with an update
        there, so the updates do not depend on how the samples were chunked.
        """
        n = len(ts)
        if not self.deterministic:
            return [(0, n, self.due(float(ts[-1]) + offset_s))]
        grid = self.interval_s
        t = ts + offset_s
        if not math.isfinite(self._grid_origin):
            self._grid_origin = float(t[0])
        origin = self._grid_origin
        half = 0.5 / self.tracker.fs_in
        if not math.isfinite(self._next_grid):
            self._next_grid = origin + math.ceil((float(t[0]) - half - origin) / grid) * grid
        out: list[tuple[int, int, bool]] = []
        start = 0
        while True:
            # the sample nearest the grid point (timestamps may jitter by some µs: LSL's
            # clock correction), known as soon as it arrives
            idx = int(np.searchsorted(t, self._next_grid - half, side="left"))
            if idx >= n:
                break
            end = idx + 1
            k = math.floor((float(t[idx]) + half - origin) / grid) + 1
            self._next_grid = origin + k * grid
            if end > start:
                out.append((start, end, True))
                self.last_update = float(t[idx])
                start = end
        if start < n:
            out.append((start, n, False))
        return out

    def decision_time(self, newest: float, clock_now: float) -> float:
        """The ``now`` a decision is taken at: the clock's, or (deterministic) the data's."""
        return newest + self.decision_delay_s if self.deterministic else clock_now

    def due(self, newest: float) -> bool:
        """Whether an update is due for data up to LSL time ``newest``."""
        if newest - self.last_update < self.interval_s:
            return False
        if math.isfinite(self.last_update):
            self.spacing += 0.05 * (min(newest - self.last_update, 0.1) - self.spacing)
        self.last_update = newest
        return True

    def estimate(self, back: int = 0, t: float | None = None) -> Update | None:
        """Run the estimator; feed the amplitude gate.

        At the update's sample, ``back`` samples of the tracker's history before the
        newest (a block pushed at once: the pipeline's ``process``), at its data time ``t``
        (default: :attr:`last_update`, right only when a read holds one update).
        """
        est = self.tracker.estimate(back)
        if est is None:
            return None
        amp = self.tracker.amplitude_at(back)
        self.amp_hist.push(amp)
        cond_amps = self.tracker.condition_amplitudes(back) if self.conditions else ()
        for hist, value in zip(self.cond_hist, cond_amps, strict=True):
            hist.push(value)
        if t is None:
            t = self.last_update
        if not math.isfinite(self._warm_at):
            self._warm_at = t + AMPLITUDE_WARMUP_S
        if t >= self._recompute_at and t >= self._warm_at - THRESHOLD_EVERY_S:
            self.amp_hist.recompute()
            for hist in self.cond_hist:
                hist.recompute()
            self._recompute_at = (math.floor(t / THRESHOLD_EVERY_S) + 1) * THRESHOLD_EVERY_S
        q = self.cfg.trigger.amplitude_percentile
        threshold = (-math.inf if q <= 0 else self.amp_hist.threshold()
                     if t >= self._warm_at else math.inf)
        return Update(est, amp, threshold, self._condition_failure(cond_amps, t))

    def _condition_failure(self, amps: tuple[float, ...], t: float) -> str | None:
        """Why the power conditions do not all hold (None when they do)."""
        if not self.conditions:
            return None
        if t < self._warm_at:
            return PolicyReason.POWER_CONDITION_UNKNOWN
        for k, (cond, hist, amp) in enumerate(zip(self.conditions, self.cond_hist, amps,
                                                  strict=True)):
            threshold = hist.threshold()
            if cond.above and amp < threshold:
                return f"power_condition_{k}_below"
            if not cond.above and amp > threshold:
                return f"power_condition_{k}_above"
        return None

    def decide(self, u: Update, *, now: float, armed: bool, busy: bool) -> Decision | None:
        """The trigger policy's decision at ``now`` (None: nothing to decide yet)."""
        if self.cfg.stimulation.timing == "open_loop":
            decision, self.state = decide_open_loop(u.est, now=now, params=self.params,
                                                    state=self.state, armed=armed, busy=busy)
        else:
            decision, self.state = decide(
                u.est, now=now, params=self.params, state=self.state, armed=armed,
                horizon_s=max(self.min_horizon, 1.5 * self.spacing), amplitude=u.amplitude,
                amplitude_threshold=u.threshold, condition_failure=u.condition_failure,
                not_ready=self.not_ready())
        return decision

    def not_ready(self) -> str | None:
        """Why no pulse may fire on the current estimator yet: a trained estimator that
        has not taken over (``trigger.wait_for_training``)."""
        state = self.tracker.training_state
        if not self.wait_for_training or state in ("off", "ready"):
            return None
        return (PolicyReason.ESTIMATOR_UNTRAINED if state.startswith("failed")
                else PolicyReason.ESTIMATOR_TRAINING)

    def scheduled(self, decision: Decision) -> None:
        """A unit was scheduled for ``decision``: the next may start after it, its pause
        and the jitter."""
        trig, unit = self.cfg.trigger, self.unit
        jitter = float(self.rng.uniform(0.0, trig.jitter_s)) if trig.jitter_s else 0.0
        pause = trig.min_interval_s if unit.pause_after_s is None else unit.pause_after_s
        self.state = replace(self.state, next_allowed=decision.fire_time + unit.duration_s
                             + pause + jitter)
