"""Fire pulses at scheduled LSL times from a dedicated thread.

The asyncio side decides *when* a pulse should land; this thread makes it happen on time:
it sleeps until shortly before the command time (landing time minus the driver's known
latency), then waits out the rest in a loop that yields the GIL at every turn (a plain
busy loop would hold it for the interpreter's switch interval and stall the other
threads). The checks between the end of that wait and the driver's fire (lock, arm state,
safety gate: some tens of microseconds) are measured on every pulse and the wait ends
that much earlier. A request whose command time has passed by more than ``max_lateness_s`` is
refused as ``late``: a late pulse hits the wrong phase.

A request is a *unit*: one trigger, or several at given offsets (a burst, a train, a TBS
block), each timed the same way and each passing the gate (the first for the whole unit).
If a later trigger is refused or late, or the unit is cancelled, the rest of the unit is
dropped and the outcome says how many of how many were delivered, and when.

One request may be pending at a time; :meth:`FireScheduler.cancel` drops it (on disarm,
stream loss, shutdown). Every request ends in exactly one :class:`PulseOutcome`, handed
to ``on_outcome`` from this thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import pylsl

from closedloop.stim.gated import FireResult, GatedStimulator
from closedloop.stim.reasons import DeviceReason
from closedloop.stim.requests import PulseOutcome, PulseRequest

__all__ = ["FireScheduler", "PulseOutcome", "PulseRequest", "SimClock", "SimulatedScheduler",
           "run_unit"]

_SPIN_S = 0.002
_OVERHEAD_ALPHA = 0.1  # running estimate of the check path's duration
_MAX_OVERHEAD_S = 0.0005


# the cancel reason of a request handed over while the stimulator was disarmed: refused
# as "disarmed" at once, even if it is armed again before the request's time
_HANDED_DISARMED = "handed over while disarmed"


def run_unit(stim: GatedStimulator, req: PulseRequest, handed: float, *,
             wait: Callable[[float], str | None], clock: Callable[[], float],
             max_lateness_s: float,
             on_fired: Callable[[FireResult, float], None] | None = None) -> PulseOutcome:
    """Deliver the triggers of ``req`` through ``stim``, each after ``wait(command time)``
    (which returns a reason to stop, or None), and say how it ended.

    The first trigger is refused as ``late`` when ``clock()`` is past its command time by
    more than ``max_lateness_s``; a unit stopped part-way ends as
    ``unit_aborted:<reason>`` with the triggers that were delivered, and the gate is told
    the unit is over. The live fire thread and the simulated scheduler both deliver here.
    """
    times: list[float] = []
    commands: list[float] = []
    pulses: list[tuple[tuple[float, float], ...]] = []
    for k, off in enumerate(req.offsets):
        planned = req.fire_time + off
        t_cmd = planned - stim.latency_s
        reason = wait(t_cmd)
        now = clock()
        if reason is None and k == 0 and now - t_cmd > max_lateness_s:
            reason = "late"
        if reason is not None:
            result = FireResult(False, reason, None, now)
        else:
            result = stim.fire_now(offsets=req.offsets, index=k, planned=planned,
                                   max_lateness_s=max_lateness_s)
        if result.fired and on_fired is not None:
            on_fired(result, now)
        if not result.fired:
            if k > 0 or result.reason == DeviceReason.FIRE_FAILED:
                stim.end_unit(times[-1] if times else None)
            if times:  # a unit stopped part-way: say so, keep its pulses
                result = FireResult(False, f"unit_aborted:{result.reason}", times[0],
                                    result.command_time)
            return PulseOutcome(req, False, result.reason, result.lsl_time,
                                result.command_time, handed, tuple(times), tuple(commands),
                                tuple(pulses))
        assert result.lsl_time is not None
        times.append(result.lsl_time)
        commands.append(result.command_time)
        pulses.append(result.pulses)
    return PulseOutcome(req, True, "fired", times[0], commands[0], handed, tuple(times),
                        tuple(commands), tuple(pulses))


class SimulatedScheduler:
    """The fire thread's stand-in for offline mode: a request is delivered at once, on a
    simulated clock set to each trigger's command time (the pulse lands exactly when
    scheduled), through the same gated stimulator; it is busy until the unit's last
    trigger in data time (``now``)."""

    def __init__(self, stim: GatedStimulator, *, on_outcome: Callable[[PulseOutcome], None],
                 max_lateness_s: float, clock: SimClock, now: Callable[[], float]) -> None:
        self.stim = stim
        self._on_outcome = on_outcome
        self.max_lateness_s = max_lateness_s
        self._clock = clock
        self._now = now
        self._busy_until = -math.inf

    @property
    def busy(self) -> bool:
        return self._now() < self._busy_until

    def next_command_time(self) -> float | None:
        return None  # nothing waits: a request is delivered when it is submitted

    def submit(self, request: PulseRequest) -> bool:
        if self.busy:
            return False
        self._busy_until = request.fire_time + request.offsets[-1]

        def wait(t_cmd: float) -> str | None:
            self._clock.t = max(self._clock.t, t_cmd)
            return None

        self._on_outcome(run_unit(self.stim, request, self._now(), wait=wait,
                                  clock=self._clock, max_lateness_s=self.max_lateness_s))
        return True

    def cancel(self, reason: str) -> None:
        """Nothing is ever pending."""


class SimClock:
    """A clock the simulated scheduler moves forward (never back)."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FireScheduler:
    """The precise-timing thread in front of a :class:`GatedStimulator`."""

    def __init__(self, stim: GatedStimulator, *, on_outcome: Callable[[PulseOutcome], None],
                 max_lateness_s: float, on_error: Callable[[BaseException], None],
                 clock: Callable[[], float] = pylsl.local_clock) -> None:
        self.stim = stim
        self._on_outcome = on_outcome
        self._on_error = on_error
        self.max_lateness_s = max_lateness_s
        self._clock = clock
        self._cv = threading.Condition()
        self._pending: tuple[PulseRequest, float] | None = None
        self._cancel_reason: str | None = None
        self._stopping = False
        self._overhead_s = 0.0  # from the end of the wait to the driver's pulse instant
        self._thread = threading.Thread(target=self._run, name="fire-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel any pending request and end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(2.0)

    @property
    def busy(self) -> bool:
        """Whether a request is pending."""
        return self._pending is not None

    def next_command_time(self) -> float | None:
        """LSL time at which the pending pulse's fire command is due (None: nothing due)."""
        pending = self._pending
        if pending is None:
            return None
        return pending[0].fire_time - self.stim.latency_s

    def submit(self, request: PulseRequest) -> bool:
        """Hand over a request; False (and nothing queued) if one is already pending.

        A request handed over while the stimulator is disarmed is cancelled at once
        (``disarmed``): a disarm between a decision and its hand-off (in another thread)
        found nothing to cancel, and the request must not wait for the next arm."""
        with self._cv:
            if self._pending is not None or self._stopping:
                return False
            self._pending = (request, self._clock())
            self._cancel_reason = None if self.stim.armed else _HANDED_DISARMED
            self._cv.notify_all()
            return True

    def cancel(self, reason: str) -> None:
        """Drop the pending request, if any; its outcome says ``reason``."""
        with self._cv:
            if self._pending is not None:
                self._cancel_reason = reason
                self._cv.notify_all()

    def _wait_until(self, t_cmd: float) -> str | None:
        """Sleep (interruptibly) until shortly before ``t_cmd``; return a cancel reason."""
        with self._cv:
            while self._cancel_reason is None and not self._stopping:
                remaining = t_cmd - self._clock() - _SPIN_S
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            reason = self._cancel_reason or ("shutdown" if self._stopping else None)
        if reason is None:
            while self._clock() < t_cmd:
                time.sleep(0)
            reason = self._cancel_reason
        if reason is None:
            return None
        if reason == _HANDED_DISARMED:
            return DeviceReason.DISARMED  # (as the gated stimulator says it)
        return reason if reason.startswith("cancelled") else f"cancelled:{reason}"

    def _run_unit(self, req: PulseRequest, handed: float) -> None:
        def wait(t_cmd: float) -> str | None:
            # start early by what the checks before the driver's fire() take
            return self._wait_until(t_cmd - self._overhead_s)

        def fired(result: FireResult, now: float) -> None:
            assert result.lsl_time is not None
            spent = result.lsl_time - self.stim.latency_s - now
            self._overhead_s += _OVERHEAD_ALPHA * (
                min(max(spent, 0.0), _MAX_OVERHEAD_S) - self._overhead_s)

        outcome = run_unit(self.stim, req, handed, wait=wait, clock=self._clock,
                           max_lateness_s=self.max_lateness_s, on_fired=fired)
        with self._cv:
            self._pending = None
            self._cancel_reason = None
        self._on_outcome(outcome)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while self._pending is None and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        if self._pending is not None:
                            req, handed = self._pending
                            self._pending = None
                            self._on_outcome(PulseOutcome(req, False, "cancelled:shutdown",
                                                          None, self._clock(), handed))
                        return
                    assert self._pending is not None
                    req, handed = self._pending
                self._run_unit(req, handed)
        except BaseException as exc:  # the pulse path failed: disarm and report, loudly
            self.stim.disarm()
            self._on_error(exc)
