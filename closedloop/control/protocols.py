"""The protocol runner: ``start``/``stop`` of a protocol and, for the MEP-driven ones, the
loop pulse → MEP → next pulse.

A protocol runs until it is stopped, its pulses have fired, or (MEP protocols) its
algorithm is done. An MEP protocol plans one pulse (intensity, maybe target phase), holds
further decisions until the stimulator has settled, lets one unit fire, and then waits
for **that unit's** MEP, found by the unit's decision id (the MEP of a paired pulse follows
its test pulse; of a burst, its last pulse). A rejected or missing MEP (no EMG) repeats
the same pulse; :data:`MAX_REJECTED_IN_A_ROW` of them end the protocol with a
``protocol_error`` that says why. Patterns that give no MEP to measure (trains, theta
bursts) are refused at ``start``.

The runner's state is one :class:`ProtocolRun` (None when no protocol runs); the
service's stimulator, arm state and settings are reached through the :class:`Host` it is
given, so the runner holds no I/O of its own.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from closedloop.errors import ControlError, StimulatorError
from closedloop.mep.protocols import MEP_PROTOCOLS, MepProtocol, PulsePlan, make_mep_protocol
from closedloop.mep.tracker import MepRecord
from closedloop.stim.patterns import Unit

__all__ = ["MAX_REJECTED_IN_A_ROW", "MEP_UNIT_KINDS", "PROTOCOLS", "ProtocolRun",
           "ProtocolRunner"]

# "phase-single": single units at the target phase until stopped or `pulses` have fired
PROTOCOLS = ("phase-single", *MEP_PROTOCOLS)
MAX_REJECTED_IN_A_ROW = 5
MEP_UNIT_KINDS = ("single", "paired", "burst")  # units after which an MEP is measured


@dataclass
class ProtocolRun:
    """The running protocol's state."""

    name: str
    pulses: int | None  # phase-single: pulses to fire (None: until stopped)
    started_lsl_time: float
    mep: MepProtocol | None = None
    fired: int = 0  # pulses delivered (conditioning pulses included)
    plan: PulsePlan | None = None  # the MEP protocol's pulse now planned
    awaiting: int | None = None  # the decision id of the unit whose MEP it waits for
    hold_until: float = 0.0  # no decision before this LSL time (the stimulator settles)
    rejected: int = 0  # MEPs rejected in a row

    def summary(self) -> dict[str, Any]:
        """What ``status`` shows."""
        return {"name": self.name, "pulses": self.pulses, "fired": self.fired,
                "started_lsl_time": self.started_lsl_time,
                "awaiting_mep_of": self.awaiting}


class Host(Protocol):
    """What the runner needs of the service."""

    def emit(self, kind: str, **fields: Any) -> None: ...

    def clock(self) -> float: ...

    def arm(self, *, by: str) -> None: ...

    def disarm(self, *, by: str) -> None: ...

    def set_target_phase(self, deg: float) -> None: ...


class ProtocolRunner:
    """Starts, drives and stops protocols on the service's stimulator."""

    def __init__(self, host: Host, *, stim: Any, unit: Unit, settle_s: Callable[[], float],
                 spawn: Callable[[Coroutine[Any, Any, None]], None],
                 results: list[dict[str, Any]] | None = None) -> None:
        self.host = host
        self.stim = stim  # the GatedStimulator
        self.unit = unit
        self._settle_s = settle_s
        self._spawn = spawn
        self.run: ProtocolRun | None = None
        self._restore: tuple[float, ...] | None = None
        self.results: list[dict[str, Any]] = [] if results is None else results

    # -- start and stop ------------------------------------------------------------------
    def start(self, name: str, *, pulses: int | None, by: str, emg_connected: bool,
              intensity_pct: float, max_intensity_pct: float, seed: int | None) -> None:
        """Check, set up and arm; see :meth:`ClosedLoopService.start_protocol`.

        Raises:
            ControlError: unknown protocol, one already running, no EMG or no MEP to
                measure for an MEP protocol, a unit still being delivered, or arming
                refused (then nothing runs).
        """
        if name not in PROTOCOLS:
            raise ControlError(f"protocol: unknown '{name}' (known: {', '.join(PROTOCOLS)})")
        if self.run is not None:
            raise ControlError(f"start: protocol '{self.run.name}' is running; stop it first")
        mep: MepProtocol | None = None
        if name in MEP_PROTOCOLS:
            if self.unit.kind not in MEP_UNIT_KINDS:
                raise ControlError(
                    f"start: '{name}' measures the MEP of each pulse, and stimulation.pattern"
                    f" = '{self.unit.kind}' gives none to measure (use single, paired or "
                    "burst)")
            if not emg_connected:
                raise ControlError(f"start: '{name}' needs the EMG stream (streams.emg), "
                                   "which is not connected")
            mep = make_mep_protocol(name, pulses=pulses, intensity_pct=intensity_pct,
                                    max_intensity_pct=max_intensity_pct, seed=seed)
        if self.stim.gate.unit_active:
            raise ControlError("start: a unit is still being delivered; start again when it "
                               "has ended")
        # the gate holds the protocol to its pulses (conditioning pulses included; an MEP
        # protocol's `pulses` are trials of one unit each)
        self.stim.gate.set_budget(None if pulses is None
                                  else pulses * (self.unit.pulses if mep else 1))
        self._restore = self.stim.commanded
        # an MEP protocol holds decisions until its first pulse is set up (_next): the
        # pipeline decides in another thread
        self.run = ProtocolRun(name, None if mep else pulses, self.host.clock(), mep,
                               hold_until=math.inf if mep else 0.0)
        self.host.emit("protocol_started", by=by, protocol=name, pulses=pulses)
        if mep is not None:
            self._next()
        if self.run is not None:
            try:
                self.host.arm(by=by)
            except ControlError:
                self.stop(by="arm_refused")
                raise

    def stop(self, *, by: str) -> None:
        """Stop the running protocol (if any), disarm, and restore the intensity it found."""
        run, self.run = self.run, None
        self.host.disarm(by=by)
        if run is None:
            return
        self.stim.gate.set_budget(None)
        self.host.emit("protocol_stopped", by=by, protocol=run.name, fired=run.fired)
        restore, self._restore = self._restore, None
        if restore is not None and self.stim.commanded != restore:
            # (the scheduler was cancelled by the disarm; a unit still ending refuses the
            # change, and says so)
            try:
                self.stim.set_intensity(restore[-1])
                self.host.emit("intensity_restored", protocol=run.name,
                               intensity_pct=restore[-1])
            except StimulatorError as exc:
                self.host.emit("protocol_error", protocol=run.name,
                               error=f"could not restore the intensity {restore[-1]:g}%: {exc}")

    # -- what the pipeline and the ledger tell it ----------------------------------------
    def holds(self, now: float) -> bool:
        """An MEP protocol waits for its unit's MEP and for the stimulator to settle."""
        run = self.run
        return (run is not None and run.mep is not None
                and (run.awaiting is not None or now < run.hold_until))

    def pulses_delivered(self, n: int) -> None:
        if self.run is not None:
            self.run.fired += n

    def unit_fired(self, decision_id: int) -> None:
        """A whole unit left: an MEP protocol now waits for its MEP; a counted one may be
        complete."""
        run = self.run
        if run is None:
            return
        if run.mep is not None:
            run.awaiting = decision_id
        elif run.pulses is not None and run.pulses - run.fired < self.unit.pulses:
            self.stop(by="protocol_complete")  # no whole unit fits any more

    def mep(self, rec: MepRecord, channel: str) -> None:
        """An MEP was measured: the protocol's, if it is for the unit it waits for."""
        run = self.run
        if (run is None or run.mep is None or run.awaiting is None
                or rec.decision_id != run.awaiting or rec.channel != channel):
            return
        if rec.measure.rejected:  # no usable MEP: give the same pulse again
            run.awaiting = None
            run.rejected += 1
            if run.rejected >= MAX_REJECTED_IN_A_ROW:
                self.host.emit("protocol_error", protocol=run.name, error=(
                    f"{run.rejected} MEPs in a row rejected ({rec.measure.reason})"))
                self.stop(by="protocol_error")
            return
        run.rejected = 0
        assert run.plan is not None
        run.mep.record(run.plan, rec.measure.p2p_uv)
        if run.mep.done:
            self.stop(by="protocol_complete")
            # the final fit (a bootstrap, hundreds of ms) runs in a worker thread: the EEG
            # pipeline on this loop must not stall
            self._spawn(self._result(run.name, run.mep))
        else:
            self._next()

    def _next(self) -> None:
        """Set up the next pulse of an MEP protocol (intensity, maybe target phase)."""
        run = self.run
        assert run is not None and run.mep is not None
        plan = run.mep.next_pulse()
        try:
            if plan.intensity_pct != self.stim.intensity_pct:
                self.stim.set_intensity(plan.intensity_pct)
        except StimulatorError as exc:
            self.host.emit("protocol_error", protocol=run.name, error=str(exc))
            self.stop(by="protocol_error")
            return
        if plan.target_phase_deg is not None:
            self.host.set_target_phase(plan.target_phase_deg)
        run.plan = plan
        # the hold ends last, once the intensity and the target are set: the pipeline
        # (another thread) reads its settings after it finds no hold
        run.hold_until = self.host.clock() + self._settle_s()
        run.awaiting = None

    async def _result(self, name: str, mep: MepProtocol) -> None:
        try:
            result = await asyncio.to_thread(mep.result)
        except ValueError as exc:
            result = {"error": str(exc)}
        self.results.append({"protocol": name, **result})
        self.host.emit("protocol_result", protocol=name, **result)
