"""Why a pulse was not fired: one enumeration per layer, the values the event log
records (``pulse_refused``'s ``reason``; the gate's start with ``safety:``).

- :class:`GateReason`: the safety gate (:mod:`closedloop.stim.rules`,
  :mod:`closedloop.stim.safety`), over the delivered sequence and the plan;
- :class:`DeviceReason`: the gated stimulator (:mod:`closedloop.stim.gated`): the arm
  state, the device's state and truth, the driver's fire.

The trigger policy's reasons are :class:`closedloop.control.trigger_policy.PolicyReason`;
the scheduler's are ``late``, ``cancelled:<why>`` and ``unit_aborted:<reason>``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DEVICE_DOCS", "GATE_DOCS", "DeviceReason", "GateReason"]


class GateReason(StrEnum):
    """The safety gate's refusals."""

    BURST_INTENSITY = "safety:burst_intensity"
    BURST_LENGTH = "safety:burst_length"
    BURST_MIXED = "safety:burst_mixed"
    BURST_RATE = "safety:burst_rate"
    DAY_COUNT_PENDING = "safety:day_count_pending"
    EEG_STALE = "safety:eeg_stale"
    HARD_RATE = "safety:hard_rate"
    INTER_TRAIN = "safety:inter_train"
    INVALID_INTENSITY = "safety:invalid_intensity"
    INVALID_TIME = "safety:invalid_time"
    INVALID_TRAIN = "safety:invalid_train"
    INVALID_TRIGGER = "safety:invalid_trigger"
    MAX_INTENSITY = "safety:max_intensity"
    MAX_PULSES = "safety:max_pulses"
    MAX_PULSES_PER_DAY = "safety:max_pulses_per_day"
    MAX_RATE = "safety:max_rate"
    MAX_UNITS = "safety:max_units"
    MIN_INTERVAL = "safety:min_interval"
    NO_UNIT = "safety:no_unit"
    NOT_THE_UNIT = "safety:not_the_unit"
    PROTOCOL_PULSES = "safety:protocol_pulses"
    RTMS_NEEDS_MOTOR_THRESHOLD = "safety:rtms_needs_motor_threshold"
    TRAIN_DURATION = "safety:train_duration"
    TRAIN_IPI = "safety:train_ipi"
    TRAIN_OUTSIDE_TABLE = "safety:train_outside_table"
    TRAIN_PULSES = "safety:train_pulses"
    UNIT_IN_PROGRESS = "safety:unit_in_progress"
    UNIT_INTENSITY_CHANGED = "safety:unit_intensity_changed"
    LATE = "late"


class DeviceReason(StrEnum):
    """The gated stimulator's refusals (before the gate is asked, or its fire)."""

    DISARMED = "disarmed"
    LATE = "late"
    DEVICE_FAULT = "device_fault"
    DEVICE_NOT_READY = "device_not_ready"
    COIL_TEMPERATURE = "safety:coil_temperature"
    DEVICE_MISMATCH = "safety:device_mismatch"
    FIRE_FAILED = "fire_failed"
    FIRED = "fired"


# what each reason means (docs/refusals.md is made from these)
GATE_DOCS: dict[GateReason, str] = {
    GateReason.BURST_INTENSITY: 'a patterned run above safety.max_burst_intensity_mt',
    GateReason.BURST_LENGTH: 'more than 5 pulses in a burst',
    GateReason.BURST_MIXED: 'single pulses in a patterned run',
    GateReason.BURST_RATE: 'burst onsets closer than 190 ms',
    GateReason.DAY_COUNT_PENDING: "the participant's day budget could not be reserved yet",
    GateReason.EEG_STALE: 'the newest EEG sample is older than safety.max_eeg_age_ms (or none)',
    GateReason.HARD_RATE: 'more than 25 pulses in a second (hard cap)',
    GateReason.INTER_TRAIN: (
        'the pause after a run is not more than 1 s and safety.min_inter_train_s'
    ),
    GateReason.INVALID_INTENSITY: 'an intensity that is not a number in 0...100',
    GateReason.INVALID_TIME: 'a trigger before the last pulse (the clock went back)',
    GateReason.INVALID_TRAIN: 'a unit whose offsets are not increasing from 0',
    GateReason.INVALID_TRIGGER: (
        'a trigger with no time, no pulses, or pulses and offsets that differ'
    ),
    GateReason.MAX_INTENSITY: 'above safety.max_intensity_pct',
    GateReason.MAX_PULSES: 'safety.max_pulses reached in this session',
    GateReason.MAX_PULSES_PER_DAY: 'safety.max_pulses_per_day reached for the participant',
    GateReason.MAX_RATE: 'safety.max_pulses_per_window reached in safety.rate_window_s',
    GateReason.MAX_UNITS: 'stimulation.units (or the TBS length) reached',
    GateReason.MIN_INTERVAL: 'closer than safety.min_interval_s to the last unit',
    GateReason.NO_UNIT: 'a later trigger with no unit under way',
    GateReason.NOT_THE_UNIT: "a later trigger that is not the unit's next one at its planned time",
    GateReason.PROTOCOL_PULSES: "the running protocol's pulses reached",
    GateReason.RTMS_NEEDS_MOTOR_THRESHOLD: (
        'triggers 1 s or less apart without safety.motor_threshold_pct'
    ),
    GateReason.TRAIN_DURATION: 'a regular run longer than Rossi et al. 2009 Table 4 allows',
    GateReason.TRAIN_IPI: 'pulses closer than the hard 10 ms floor',
    GateReason.TRAIN_OUTSIDE_TABLE: "a run's frequency or intensity beyond Table 4",
    GateReason.TRAIN_PULSES: 'a patterned run of more than 600 pulses',
    GateReason.UNIT_IN_PROGRESS: 'a first trigger while a unit is still being delivered',
    GateReason.UNIT_INTENSITY_CHANGED: (
        "a later trigger whose intensities or shape differ from its unit's"
    ),
    GateReason.LATE: 'a later trigger outside its planned time and trigger.max_lateness_ms',
}
DEVICE_DOCS: dict[DeviceReason, str] = {
    DeviceReason.DISARMED: 'not armed',
    DeviceReason.LATE: 'the first trigger would leave later than trigger.max_lateness_ms',
    DeviceReason.DEVICE_FAULT: 'the driver reported a fault, or reading it failed',
    DeviceReason.DEVICE_NOT_READY: 'the device is not ready (not armed, charging, in standby)',
    DeviceReason.COIL_TEMPERATURE: 'above safety.max_coil_temp_c',
    DeviceReason.DEVICE_MISMATCH: 'the device will not give what was commanded',
    DeviceReason.FIRE_FAILED: 'the driver failed while firing (counted: it may have left)',
    DeviceReason.FIRED: '(not a refusal: what a fired result says)',
}
