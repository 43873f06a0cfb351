"""The trigger policy: when does a phase estimate become a pulse?

A pure function of an estimate, the time now, the configuration and a small explicit
state. Phase-locked stimulation must land the pulse *at* the target phase, so the policy
reasons about the future: the earliest instant a pulse could land is
``now + stimulator latency + scheduling margin`` (the amplifier/transport offset and the
processing time are already in the gap between the estimate's time and ``now``). The
policy extrapolates the phase to that instant and:

- if the target will be crossed before the next update could catch it, schedules the
  pulse exactly at the predicted crossing (a *decision* for that crossing);
- if the crossing was just missed but the landing phase is still within the tolerance,
  schedules it at the earliest instant;
- otherwise waits (not a decision: nothing is logged).

Each crossing gets exactly one decision: fire, or refuse with a reason (disarmed,
interval, amplitude gate). The safety gate is a separate, later and independent check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

from closedloop.phase.estimate import PhaseEstimate, wrap_rad

__all__ = ["POLICY_DOCS", "Decision", "PolicyParams", "PolicyReason", "TriggerState", "decide",
           "decide_open_loop"]

_OPEN_LOOP_SLACK_S = 0.02  # open loop: scheduled this far ahead, never late



class PolicyReason(StrEnum):
    """What the trigger policy decided, and why (a decision's ``reason``). The power
    conditions add ``power_condition_<k>_below`` / ``_above`` for condition ``k``."""

    TARGET_PHASE = "target_phase"
    OPEN_LOOP = "open_loop"
    DISARMED = "disarmed"
    MIN_INTERVAL = "min_interval"
    ESTIMATOR_TRAINING = "estimator_training"
    ESTIMATOR_UNTRAINED = "estimator_untrained"
    AMPLITUDE_UNKNOWN = "amplitude_unknown"
    AMPLITUDE_BELOW_GATE = "amplitude_below_gate"
    POWER_CONDITION_UNKNOWN = "power_condition_unknown"
    LOW_CONFIDENCE = "low_confidence"


POLICY_DOCS: dict[PolicyReason, str] = {
    PolicyReason.TARGET_PHASE: 'fire: the target phase is predicted at the landing time',
    PolicyReason.OPEN_LOOP: 'fire: open-loop timing',
    PolicyReason.DISARMED: 'the stimulator is not armed',
    PolicyReason.MIN_INTERVAL: 'trigger.min_interval_s (and its jitter) has not passed',
    PolicyReason.ESTIMATOR_TRAINING: ('the trained estimator is still training and '
                                      'trigger.wait_for_training is set'),
    PolicyReason.ESTIMATOR_UNTRAINED: 'the trained estimator could not be trained',
    PolicyReason.AMPLITUDE_UNKNOWN: 'the amplitude gate has no history yet',
    PolicyReason.AMPLITUDE_BELOW_GATE: ('the band amplitude is below its '
                                        'trigger.amplitude_percentile of the last '
                                        'trigger.amplitude_window_s'),
    PolicyReason.POWER_CONDITION_UNKNOWN: 'a trigger.power_conditions entry has no history yet',
    PolicyReason.LOW_CONFIDENCE: ("the estimate's expected error is above "
                                  "trigger.max_expected_error_deg"),
}


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """The trigger settings the policy needs, in SI units and radians."""

    target_rad: float
    tolerance_rad: float
    min_interval_s: float
    lead_s: float  # stimulator latency + scheduling margin
    # refuse estimates whose own expected error is larger (0 = no confidence gate)
    max_expected_error_deg: float = 0.0


@dataclass(frozen=True, slots=True)
class TriggerState:
    """What the policy remembers between calls."""

    next_allowed: float = -math.inf  # earliest LSL time of the next pulse (interval+jitter)
    last_crossing: float = -math.inf  # the crossing most recently decided


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision about one crossing of the target phase.

    Attributes:
        fire: Whether to request a pulse.
        reason: ``"target_phase"`` when firing, otherwise why not.
        fire_time: LSL time at which the pulse should land.
        crossing_time: Predicted time of the target crossing this decision is about.
        predicted_phase_rad: Phase predicted at ``fire_time``.
    """

    fire: bool
    reason: str
    fire_time: float
    crossing_time: float
    predicted_phase_rad: float


def decide(est: PhaseEstimate, *, now: float, params: PolicyParams, state: TriggerState,
           armed: bool, amplitude: float, amplitude_threshold: float, horizon_s: float,
           condition_failure: str | None = None, not_ready: str | None = None
           ) -> tuple[Decision | None, TriggerState]:
    """Decide about the next crossing of the target phase, if it is due now.

    Args:
        horizon_s: How far beyond the earliest instant a crossing is decided now: the
            time until the next update is expected (a later crossing waits for a fresher
            estimate).
        condition_failure: Why the trigger's power conditions do not hold (a refusal
            reason), or None when they all do.
        not_ready: Why the estimator is not to be trusted yet (a refusal reason: the
            trained estimator has not taken over), or None.

    Returns:
        ``(decision, new_state)``; ``decision`` is None when there is nothing to decide yet.
    """
    omega = 2.0 * math.pi * est.freq_hz
    if omega <= 0.0:
        return None, state
    t_min = now + params.lead_s
    # error of a pulse landing at t_min: positive = after the target
    late = wrap_rad(est.phase_at(t_min) - params.target_rad)
    if 0.0 <= late <= params.tolerance_rad:
        crossing, fire_time = t_min - late / omega, t_min
    else:
        ahead = (-late) % (2.0 * math.pi)
        crossing = t_min + ahead / omega
        if crossing - t_min > horizon_s:
            return None, state
        fire_time = crossing
    half_cycle = math.pi / omega
    if abs(crossing - state.last_crossing) < half_cycle:
        return None, state  # this crossing was decided already
    new_state = replace(state, last_crossing=crossing)
    predicted = est.phase_at(fire_time)

    def refuse(reason: str) -> tuple[Decision, TriggerState]:
        return Decision(False, reason, fire_time, crossing, predicted), new_state

    if not armed:
        return refuse(PolicyReason.DISARMED)
    if fire_time < state.next_allowed:
        return refuse(PolicyReason.MIN_INTERVAL)
    if not_ready is not None:
        return refuse(not_ready)
    if math.isnan(amplitude_threshold) or amplitude_threshold == math.inf:
        return refuse(PolicyReason.AMPLITUDE_UNKNOWN)  # the gate has no history yet
    if amplitude < amplitude_threshold:
        return refuse(PolicyReason.AMPLITUDE_BELOW_GATE)
    if condition_failure is not None:
        return refuse(condition_failure)
    if (params.max_expected_error_deg > 0.0 and est.expected_error_deg is not None
            and est.expected_error_deg > params.max_expected_error_deg):
        return refuse(PolicyReason.LOW_CONFIDENCE)
    return Decision(True, PolicyReason.TARGET_PHASE, fire_time, crossing, predicted), new_state


def decide_open_loop(est: PhaseEstimate, *, now: float, params: PolicyParams,
                     state: TriggerState, armed: bool, busy: bool
                     ) -> tuple[Decision | None, TriggerState]:
    """Open-loop timing: fire as soon as the interval (with its jitter) has passed.

    The phase plays no part; the phase predicted at the landing time is reported so that
    open-loop sessions can be analysed the same way. Nothing is decided while disarmed
    or while a unit is still being delivered.
    """
    t_min = now + params.lead_s + _OPEN_LOOP_SLACK_S  # no phase to hit: no need to hurry
    if not armed or busy or t_min < state.next_allowed:
        return None, state
    fire_time = max(t_min, state.next_allowed)
    return (Decision(True, PolicyReason.OPEN_LOOP, fire_time, fire_time, est.phase_at(fire_time)),
            replace(state, last_crossing=fire_time))
