"""An in-memory stimulator for instant, deterministic tests: no I/O, no LSL, no threads.

:class:`FakeStimulator` implements the whole :class:`~closedloop.stim.base.Stimulator`
protocol against a device held in memory, with time from an injected clock (as trio's
``MockClock``), so the gate, the scheduler and the service can be tested with a fake clock
and no sleeping. Like a real device it keeps its own state apart from what was commanded:

- the front panel (:meth:`~FakeStimulator.turn_knob`,
  :meth:`~FakeStimulator.set_front_panel_mode`) changes the device, not the commands;
- :attr:`~FakeStimulator.device` is the last read-back, updated by
  :meth:`~FakeStimulator.read_device`, every ``set_*`` call and
  :meth:`~FakeStimulator.poll` (one cycle of a real driver's watch thread: read back, and
  report a fault when the device differs from what was commanded); a knob turned between
  two read-backs is not seen until the next one, as with a real device;
- :meth:`~FakeStimulator.fire` delivers at the device's state and appends every pulse that
  left to :attr:`~FakeStimulator.delivered`: one pulse, a pair (output A at the fire time,
  output B ``isi_ms`` later) or a burst of N pulses.

Fault injection: :meth:`~FakeStimulator.fail_next_fire`, :meth:`report_fault`, and
``pulses_per_trigger_fault`` (a device that delivers that many pulses per trigger whatever
it reads back: what no read-back can catch, for testing what the record shows).
"""

from __future__ import annotations

from collections.abc import Callable

from closedloop.errors import StimulatorError
from closedloop.stim.base import Commanded, DeviceState, DriverBase

__all__ = ["FakeStimulator"]


def _mode_name(pulses: int, b_pct: float | None) -> str:
    if pulses == 1:
        return "standard"
    if pulses == 2 and b_pct is not None:
        return "paired"
    return "burst"


class FakeStimulator(DriverBase):
    """A stimulator held in memory, on an injected clock.

    Args:
        clock: The time base (e.g. a fake clock's ``time``); :meth:`fire` returns
            ``clock() + latency_s`` and read-backs are stamped with ``clock()``.
        latency_s: The known delay from :meth:`fire` to the pulse leaving the coil.
        pulses_per_trigger_fault: When set, every trigger delivers this many pulses (at
            output A, ``isi_ms`` apart, 1 ms if none) while the read-back still reports the
            device's mode: a device whose read-back is wrong.
    """

    name = "fake"
    trigger_route = "memory"
    supports_paired = True
    intensity_tolerance_pct = 1e-9

    def __init__(self, *, clock: Callable[[], float], latency_s: float = 0.0,
                 pulses_per_trigger_fault: int | None = None) -> None:
        if pulses_per_trigger_fault is not None and pulses_per_trigger_fault < 1:
            raise StimulatorError("fake: pulses_per_trigger_fault must be >= 1")
        super().__init__(latency_s)
        self._clock = clock
        self.pulses_per_trigger_fault = pulses_per_trigger_fault
        self._open = False
        self._fail_next: tuple[BaseException, bool] | None = None
        # the device's own state (what the front panel shows)
        self.device_a: float | None = None
        self.device_b: float | None = None
        self.device_pulses = 1
        self.device_isi_ms: float | None = None
        self.delivered: list[tuple[float, float]] = []  # (time, % of max) of every pulse
        self.fires = 0
        self.reads = 0
        self.disarms = 0

    # -- the device ----------------------------------------------------------------------
    def _state(self) -> DeviceState:
        b = self.device_b if self.device_pulses == 2 else None
        return DeviceState(intensity_pct=self.device_a, intensity_b_pct=b,
                           pulses_per_trigger=self.device_pulses,
                           isi_ms=self.device_isi_ms if self.device_pulses > 1 else None,
                           mode=_mode_name(self.device_pulses, b), source="device",
                           read_at=self._clock())

    def turn_knob(self, pct: float, output: str = "a") -> None:
        """Front panel: set output ``a`` or ``b`` on the device (not seen until a read)."""
        if output not in ("a", "b"):
            raise ValueError(f"output must be 'a' or 'b', not {output!r}")
        if output == "a":
            self.device_a = float(pct)
        else:
            self.device_b = float(pct)

    def set_front_panel_mode(self, pulses_per_trigger: int, isi_ms: float | None) -> None:
        """Front panel: 1 standard, 2 paired (A then B), N a burst at output A."""
        if pulses_per_trigger < 1:
            raise ValueError("pulses_per_trigger must be >= 1")
        if pulses_per_trigger > 1 and isi_ms is None:
            raise ValueError("isi_ms is needed for more than one pulse per trigger")
        self.device_pulses = pulses_per_trigger
        self.device_isi_ms = isi_ms if pulses_per_trigger > 1 else None

    def fail_next_fire(self, exc: BaseException, *, delivered: bool = False) -> None:
        """Make the next :meth:`fire` raise ``exc`` (after delivering, if ``delivered``).

        A :class:`StimulatorError` is also reported as a fault, as the serial drivers do.
        """
        self._fail_next = (exc, delivered)

    # -- Stimulator ----------------------------------------------------------------------
    def open(self) -> None:
        self._open = True
        self.clear_fault()
        self._seen(self._state())

    def close(self) -> None:
        if self._open:
            self.disarm()
        self._open = False

    def arm(self) -> None:
        if not self._open:
            raise StimulatorError("fake: not open")
        why = self._seen(self._state())
        if why is not None:
            self.report_fault(why)
            raise StimulatorError(f"fake: refusing to arm: {why}")
        self._armed = True

    def disarm(self) -> None:
        self._armed = False
        self.disarms += 1

    @property
    def ready(self) -> bool:
        return self._open and self._armed and self._fault is None

    def read_device(self) -> DeviceState:
        if not self._open:
            raise StimulatorError("fake: cannot read the device: not open")
        self.reads += 1
        state = self._state()
        self._seen(state)
        return state

    def poll(self) -> DeviceState:
        """One watch-thread cycle: read back, and report a fault on a difference."""
        state = self.read_device()
        self._watch_seen(state)
        return state

    def set_intensity(self, pct: float) -> float:
        if not self._open:
            raise StimulatorError("fake: not open")
        self.device_a, self.device_b = float(pct), None
        self.device_pulses, self.device_isi_ms = 1, None
        self._intensity = float(pct)
        self._commanded = Commanded(intensity_pct=float(pct), pulses_per_trigger=1,
                                    mode="standard")
        self.read_device()
        return self._intensity

    def set_paired(self, conditioning_pct: float, test_pct: float, isi_ms: float) -> None:
        if not self._open:
            raise StimulatorError("fake: not open")
        self.device_a, self.device_b = float(conditioning_pct), float(test_pct)
        self.device_pulses, self.device_isi_ms = 2, float(isi_ms)
        self._intensity = float(max(conditioning_pct, test_pct))
        self._commanded = Commanded(intensity_pct=float(conditioning_pct),
                                    intensity_b_pct=float(test_pct), pulses_per_trigger=2,
                                    mode="paired")
        self.read_device()

    def _deliver(self, t: float) -> None:
        a = self.device_a or 0.0
        isi = (self.device_isi_ms or 1.0) / 1000.0
        if self.pulses_per_trigger_fault is not None:
            shots = [(t + k * isi, a) for k in range(self.pulses_per_trigger_fault)]
        elif self.device_pulses == 2 and self.device_b is not None:
            shots = [(t, a), (t + isi, self.device_b)]
        else:
            shots = [(t + k * isi, a) for k in range(self.device_pulses)]
        self.delivered.extend(shots)

    def fire(self) -> float:
        if not self._open:
            raise StimulatorError("fake: not open")
        if not self._armed:
            raise StimulatorError("fake: not armed")
        t = self._clock() + self.latency_s
        if self._fail_next is not None:
            exc, delivered = self._fail_next
            self._fail_next = None
            if delivered:
                self._deliver(t)
            if isinstance(exc, StimulatorError):
                self.report_fault(f"fire: {exc}")
            raise exc
        self.fires += 1
        self._deliver(t)
        return t
