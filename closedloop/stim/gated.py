"""The only path to a pulse: a driver wrapped by the safety gate and the arm state.

:class:`GatedStimulator` owns the driver. Every pulse goes through :meth:`fire_now`, which,
under one lock, checks the arm state, the device (a fault it reported, its readiness, its
coil temperature), **what the device says it will deliver** (the intensities and the
number of pulses per trigger it last read back: the gate judges those, not what was
commanded), and the :class:`~closedloop.stim.safety.SafetyGate`; fires; and records the
pulses in the gate's ledger. A refusal is returned as a value with its reason, never
raised and never silent.

The device's truth: every driver reports a :class:`~closedloop.stim.base.DeviceState`
read back from the device (a TTL line cannot read one: there it is what the operator
declared). Arming reads the device first; a device whose settings differ from what was
commanded (a knob turned on the front panel, a reconnect whose restore failed, a MagPro
left in twin mode) is a fault that disarms, and arming is refused until a reconnect has
fully succeeded (:meth:`reconnected`). What the gate cannot know: a knob turned after the
driver's last read-back (every keep-alive or poll, at most 0.5-1 s ago) is seen only at the
next one; the pulses of that interval leave at the device's setting.

A unit is atomic: while one is being delivered, intensity changes are refused (the reply
says to set it again after the unit), and every later trigger must have the unit's
intensities. A driver error disarms, and so does a fault the driver finds on its own (a
missed keep-alive, a vanished port). A device error while firing (a
:class:`StimulatorError`) ends as the refusal ``fire_failed`` (counted in the ledger: the
pulse may have left) and a driver fault; any other exception in the pulse path is a bug
and propagates (the service stops).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pylsl

from closedloop.errors import StimulatorError
from closedloop.stim.base import DeviceState, Stimulator
from closedloop.stim.reasons import DeviceReason, GateReason
from closedloop.stim.safety import SafetyGate, Trigger

__all__ = ["FireResult", "GatedStimulator", "trigger_of"]

_MATCH_PCT = 1e-6  # read-back equal to the command (drivers return the device's value)
_ROUNDING_PCT = 0.5  # a device that stores whole percent
_ISI_MS = 0.5  # a device that stores whole milliseconds


@dataclass(frozen=True, slots=True)
class FireResult:
    """What happened to one request: fired at ``lsl_time``, or refused for ``reason``.

    ``pulses`` are the (LSL time, % of maximum output) of every pulse that left.
    """

    fired: bool
    reason: str
    lsl_time: float | None
    command_time: float
    pulses: tuple[tuple[float, float], ...] = ()


def trigger_of(dev: DeviceState, t: float) -> Trigger | None:
    """The pulses one trigger gives at ``t`` in the device's state (None: unknown)."""
    a = dev.intensity_pct
    if a is None:
        return None
    n = dev.pulses_per_trigger
    isi = (dev.isi_ms or 0.0) / 1000.0
    if n <= 1:
        return Trigger(t, (a,))
    if n == 2 and dev.mode != "burst":
        b = dev.intensity_b_pct if dev.intensity_b_pct is not None else a
        return Trigger(t, (a, b), (0.0, isi), paired=True)
    return Trigger(t, (a,) * n, tuple(k * isi for k in range(n)))


def _same(a: Sequence[float], b: Sequence[float], tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


class GatedStimulator:
    """A :class:`Stimulator` behind the arm state, the device's truth and the safety gate."""

    def __init__(self, driver: Stimulator, gate: SafetyGate,
                 eeg_age_s: Callable[[], float | None],
                 clock: Callable[[], float] = pylsl.local_clock,
                 on_fault: Callable[[str], None] | None = None,
                 credit_target: int = 20, unit_offsets: Sequence[float] = (0.0,)) -> None:
        self.driver = driver
        self.gate = gate
        self._eeg_age_s = eeg_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._armed = False
        self._commanded: tuple[float, ...] | None = None  # pulses of a trigger, in order
        self._paired: tuple[float, float] | None = None  # (conditioning %, isi ms)
        self._blocked: str | None = None  # a fault that only a full reconnect clears
        self._on_fault = on_fault
        self.credit_target = credit_target
        self.unit_offsets = tuple(unit_offsets)  # the session's unit, judged ahead
        driver.set_fault_handler(self._driver_fault)

    def _driver_fault(self, reason: str) -> None:
        # called from a driver thread: disarm without waiting on a fire in progress
        self._armed = False
        self._blocked = reason
        if self._on_fault is not None:
            self._on_fault(reason)

    def _fault(self, reason: str) -> None:
        """A fault found here (the device's truth): disarm and tell the owner."""
        self._armed = False
        with contextlib.suppress(Exception):
            self.driver.disarm()
        if self.driver.fault is None:
            self.driver.report_fault(reason)  # -> _driver_fault, which tells the owner
        self._blocked = self._blocked or reason  # (a fault already reported was told)

    @property
    def latency_s(self) -> float:
        """The driver's known trigger latency."""
        return self.driver.latency_s

    @property
    def armed(self) -> bool:
        """Whether a request may fire at all."""
        return self._armed

    @property
    def blocked(self) -> str | None:
        """The fault that keeps arming refused until a reconnect has fully succeeded."""
        return self._blocked

    @property
    def intensity_pct(self) -> float:
        """The (test) intensity commanded last (0 before any)."""
        return self._commanded[-1] if self._commanded else 0.0

    @property
    def commanded(self) -> tuple[float, ...] | None:
        """The intensities of one trigger's pulses as commanded (None: never set)."""
        return self._commanded

    @property
    def paired(self) -> tuple[float, float] | None:
        """(conditioning %, interval ms) when each trigger gives a paired pulse."""
        return self._paired

    def device_state(self) -> DeviceState | None:
        """What the device will deliver, as it last read back (no I/O)."""
        return self.driver.device

    def _mismatch(self, dev: DeviceState | None) -> str | None:
        """Why the device's state cannot be fired on, or None."""
        if dev is None:
            return "the device's settings are unknown (not read back yet)"
        trig = trigger_of(dev, 0.0)
        if trig is None:
            return "the device does not say its intensity"
        if dev.mode == "simultaneous":  # two stimulators into one coil: a stronger pulse
            return ("the device is in simultaneous-discharge mode (interval 0), whose "
                    "strength the gate cannot judge")
        limit = self.gate.limits.max_intensity_pct
        highest = max(*trig.pcts, dev.max_pct or 0.0)  # an output the mode may not use
        if highest > limit:
            return (f"the device is set to {highest:g}%, above the safety limit "
                    f"({limit:g}%)")
        want = self._commanded
        if want is not None and not _same(sorted(trig.pcts), sorted(want), _MATCH_PCT):
            return (f"the device will give {_show(trig.pcts)} per trigger ({dev.mode}) but "
                    f"{_show(want)} was commanded (front panel? a failed restore?)")
        if trig.paired and trig.offsets[1] < 0.001:  # (the schema's isi_ms is >= 1)
            return (f"the device's paired-pulse interval is {trig.offsets[1] * 1e3:g} ms: "
                    "two pulses at once, whose strength the gate cannot judge")
        if want is not None and self._paired is not None and len(trig.pcts) == 2:
            isi = self._paired[1]
            got = (dev.isi_ms or 0.0)
            if abs(got - isi) > _ISI_MS:
                return (f"the device's paired-pulse interval is {got:g} ms but {isi:g} ms "
                        "was commanded (front panel?)")
        return None

    def arm(self) -> None:
        """Read the device back, then arm it; from now on requests that pass the gate fire.

        Raises:
            StimulatorError: a fault (also one not yet cleared by a full reconnect), the
                device's settings differ from the commanded ones or exceed the limit, or
                the day's pulses cannot be reserved.
        """
        with self._lock:
            if self.driver.fault is not None:
                raise StimulatorError(f"cannot arm: {self.driver.fault}")
            if self._blocked is not None:
                raise StimulatorError(f"cannot arm until the stimulator has reconnected "
                                      f"fully: {self._blocked}")
            dev = self.driver.read_device()
            why = self._mismatch(dev)
            if why is not None:
                raise StimulatorError(f"cannot arm: {why}")
            if self._commanded is None:  # nothing set: the device's own settings, watched
                trig = trigger_of(dev, 0.0)
                assert trig is not None
                self._commanded = trig.pcts
            self.gate.top_up(self.credit_target)
            self._prepare(dev)
            self.driver.arm()
            self._armed = True

    def _prepare(self, dev: DeviceState | None) -> None:
        trig = trigger_of(dev, 0.0) if dev is not None else None
        if trig is not None and len(self.unit_offsets) > 1:
            self.gate.prepare(trig, self.unit_offsets)

    def disarm(self) -> None:
        """Disarm; safe to call at any time, from any thread, more than once."""
        self._armed = False
        with self._lock:
            self._armed = False
            self.driver.disarm()

    def reconnected(self) -> None:
        """The driver was reopened and its settings restored and read back: arming is
        allowed again."""
        with self._lock:
            why = self._mismatch(self.driver.device)
            if why is not None:
                raise StimulatorError(f"reconnected, but {why}")
            self._blocked = None

    def _check_pct(self, pct: float) -> None:
        limit = self.gate.limits.max_intensity_pct
        if not (math.isfinite(pct) and 0.0 <= pct <= limit):
            raise StimulatorError(f"intensity {pct:g}% refused: outside 0...{limit:g}% "
                                  "(safety limit)")

    def _not_in_unit(self, what: str) -> None:
        if self.gate.unit_active:
            raise StimulatorError(f"{what} refused: a unit is being delivered and its "
                                  "intensities are fixed; set it again when the unit has "
                                  "ended")

    def _adopt(self, want: tuple[float, ...]) -> None:
        """Take the device's read-back as the commanded state, if it is what was asked."""
        dev = self.driver.device
        trig = trigger_of(dev, 0.0) if dev is not None else None
        got = trig.pcts if trig is not None else want
        if not _same(sorted(got), sorted(want), _ROUNDING_PCT):
            self._commanded = want  # the device differs from it: nothing fires until fixed
            self._fault(f"asked for {_show(want)}, the device reads {_show(got)}")
            raise StimulatorError(f"the device reads {_show(got)} after being set to "
                                  f"{_show(want)}: disarmed")
        self._commanded = tuple(got)
        self._prepare(dev)
        if max(got) > self.gate.limits.max_intensity_pct:  # a driver that rounded up
            self._fault(f"device set to {max(got):g}%, above the safety limit")
            raise StimulatorError(f"device set to {max(got):g}%, above the safety limit: "
                                  "disarmed")

    def set_intensity(self, pct: float) -> None:
        """Set the (test) intensity; a value above the gate's limit is refused, not clamped.

        Raises:
            StimulatorError: beyond the safety limit, a unit under way, or the device did
                not take it (then the device is left disarmed).
        """
        self._check_pct(pct)
        with self._lock:
            self._not_in_unit("intensity change")
            if self._paired is not None:
                cond, isi = self._paired
                self.driver.set_paired(cond, pct, isi)
                self._adopt((cond, float(pct)))
                return
            got = self.driver.set_intensity(pct)
            self._adopt((float(got),))

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        """From now on each trigger gives a conditioning pulse, then the test pulse."""
        self._check_pct(conditioning_pct)
        self._check_pct(test_pct)
        with self._lock:
            self._not_in_unit("paired-pulse change")
            self.driver.set_paired(conditioning_pct, test_pct, isi_ms)
            self._paired = (float(conditioning_pct), float(isi_ms))
            self._adopt((float(conditioning_pct), float(test_pct)))

    def _device_reason(self) -> str | None:
        drv = self.driver
        if drv.fault is not None:
            return DeviceReason.DEVICE_FAULT
        temp = drv.coil_temperature_c
        if temp is not None and temp > self.gate.limits.max_coil_temp_c:
            return DeviceReason.COIL_TEMPERATURE
        if not drv.ready:
            return DeviceReason.DEVICE_NOT_READY
        return None

    def fire_now(self, *, offsets: Sequence[float] = (0.0,), index: int = 0,
                 planned: float | None = None,
                 max_lateness_s: float = math.inf) -> FireResult:
        """Check everything and fire one trigger, now, at the device's settings.

        For a unit of several triggers (``offsets``), the first (``index`` 0) is checked
        for the whole unit; later ones must be on time (``planned`` ± ``max_lateness_s``)
        and have the unit's intensities.
        """
        # the driver's own port lock is taken before the checks, so that the pulse leaves
        # right after them (a serial fire command waits for a keep-alive in progress)
        with self._lock, self.driver.fire_lock:
            t_cmd = self._clock()
            if not self._armed:
                return FireResult(False, DeviceReason.DISARMED, None, t_cmd)
            if index == 0 and planned is not None and (
                    t_cmd + self.driver.latency_s > planned + max_lateness_s):
                return FireResult(False, DeviceReason.LATE, None, t_cmd)
            reason = self._device_reason()
            if reason is not None:
                return FireResult(False, reason, None, t_cmd)
            try:  # what the device said on its own (a knob turned), waiting at the host
                self.driver.take_pending()
            except StimulatorError as exc:
                self._fault(f"reading the device: {exc}")
                return FireResult(False, DeviceReason.DEVICE_FAULT, None, t_cmd)
            dev = self.driver.device
            why = self._mismatch(dev)
            if why is not None:
                self._fault(why)
                return FireResult(False, DeviceReason.DEVICE_MISMATCH, None, t_cmd)
            assert dev is not None
            t_est = t_cmd + self.driver.latency_s
            trig = trigger_of(dev, t_est)
            assert trig is not None
            # every trigger is judged at the time it will leave (now + the latency), and
            # recorded at the time it left: the rules hold over what was delivered
            if index == 0:
                reason = self.gate.check_start(trig, offsets=offsets,
                                               eeg_age_s=self._eeg_age_s())
            else:
                reason = self.gate.check_next(
                    trig, planned=t_est if planned is None else planned,
                    max_lateness_s=max_lateness_s, eeg_age_s=self._eeg_age_s(),
                    index=index)
                if reason is not None and reason != GateReason.NO_UNIT:
                    self.gate.end_unit()  # a unit refused part-way is over: it never resumes
            if reason is not None:
                return FireResult(False, reason, None, t_cmd)
            try:
                t_pulse = self.driver.fire()
            except StimulatorError as exc:
                # the device failed (port gone, error reply): the pulse may or may not have
                # left, so the ledger counts it
                self.gate.commit(trig, start=index == 0, triggers=len(offsets),
                                 plan=self._plan(planned, offsets, index))
                self._fault(f"fire: {exc}")
                return FireResult(False, DeviceReason.FIRE_FAILED, None, t_cmd)
            except Exception as exc:
                self._armed = False
                self.gate.commit(trig, start=index == 0, triggers=len(offsets),
                                 plan=self._plan(planned, offsets, index))
                # the fire error is the one to report; a failing disarm must not hide it
                with contextlib.suppress(Exception):
                    self.driver.disarm()
                raise StimulatorError(f"fire failed, disarmed: {exc}") from exc
            done = Trigger(t_pulse, trig.pcts, trig.offsets, trig.paired)
            self.gate.commit(done, start=index == 0, triggers=len(offsets),
                             plan=self._plan(planned, offsets, index))
            return FireResult(True, DeviceReason.FIRED, t_pulse, t_cmd,
                              tuple((t_pulse + o, p)
                                    for o, p in zip(trig.offsets, trig.pcts, strict=True)))

    @staticmethod
    def _plan(planned: float | None, offsets: Sequence[float], index: int) -> tuple[float, ...]:
        """The planned time of each trigger of a unit starting now (none without a plan)."""
        if index != 0 or planned is None:
            return ()
        return tuple(planned + off for off in offsets)

    def end_unit(self, t_last: float | None = None) -> None:
        """A unit stopped early (after a pulse at ``t_last``): its undelivered pulses go
        back to the budgets; the inter-train pause is the ledger's."""
        with self._lock:
            self.gate.end_unit()


def _show(pcts: Sequence[float]) -> str:
    return " + ".join(f"{p:g}%" for p in pcts)
