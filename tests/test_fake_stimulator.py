"""The in-package fake driver: device truth, deliveries and fault injection, on a fake clock.

No LSL, no I/O, no sleeping: every test runs in microseconds.
"""

from __future__ import annotations

import pytest

import closedloop.stim.fake as fake_module
from closedloop.errors import StimulatorError
from closedloop.stim.base import Commanded, DeviceState, Stimulator, device_mismatch
from closedloop.stim.fake import FakeStimulator


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeStimulator:
    f = FakeStimulator(clock=clock, latency_s=0.002)
    f.open()
    return f


def state(a: float | None = 50.0, b: float | None = None, n: int = 1,
          mode: str = "standard") -> DeviceState:
    return DeviceState(intensity_pct=a, intensity_b_pct=b, pulses_per_trigger=n,
                       isi_ms=None if n == 1 else 3.0, mode=mode, source="device",
                       read_at=0.0)


def test_all_is_complete() -> None:
    assert fake_module.__all__ == ["FakeStimulator"]
    assert isinstance(FakeStimulator(clock=Clock()), Stimulator)


def test_max_pct_and_as_dict() -> None:
    assert state(40.0, 70.0, 2, "paired").max_pct == 70.0
    assert state(40.0).max_pct == 40.0
    assert state(None).max_pct is None
    d = state(40.0, 70.0, 2, "paired").as_dict()
    assert d["max_pct"] == 70.0 and d["pulses_per_trigger"] == 2 and d["source"] == "device"


def test_device_mismatch_names_the_values() -> None:
    assert device_mismatch(Commanded(), state(95.0)) is None  # nothing commanded yet
    assert device_mismatch(Commanded(intensity_pct=60.0), state(60.2)) is None
    why = device_mismatch(Commanded(intensity_pct=60.0), state(95.0))
    assert why == "device changed: commanded 60 %, device reads 95 % (front panel?)"
    why = device_mismatch(Commanded(intensity_pct=60.0, pulses_per_trigger=1,
                                    mode="standard"), state(60.0, 60.0, 2, "twin"))
    assert why is not None
    assert "commanded mode standard (1 pulse per trigger)" in why
    assert "device reads mode twin (2 pulses per trigger)" in why
    why = device_mismatch(Commanded(intensity_pct=30.0, intensity_b_pct=60.0),
                          state(30.0, 80.0, 2, "paired"))
    assert why is not None and "commanded B 60 %, device reads B 80 %" in why
    # a commanded intensity the device no longer reports is a difference too
    assert device_mismatch(Commanded(intensity_pct=30.0), state(None)) is not None


def test_fire_returns_clock_plus_latency_and_records_the_pulse(fake: FakeStimulator,
                                                                clock: Clock) -> None:
    assert fake.set_intensity(40.0) == 40.0
    with pytest.raises(StimulatorError, match="not armed"):
        fake.fire()
    fake.arm()
    assert fake.ready
    assert fake.fire() == pytest.approx(100.002)
    clock.t = 101.0
    assert fake.fire() == pytest.approx(101.002)
    assert [p for _, p in fake.delivered] == [40.0, 40.0]
    assert [t for t, _ in fake.delivered] == pytest.approx([100.002, 101.002])


def test_paired_trigger_delivers_conditioning_then_test(fake: FakeStimulator) -> None:
    fake.set_paired(30.0, 70.0, 3.0)
    dev = fake.device
    assert dev is not None
    assert (dev.intensity_pct, dev.intensity_b_pct, dev.pulses_per_trigger, dev.isi_ms,
            dev.mode) == (30.0, 70.0, 2, 3.0, "paired")
    assert dev.max_pct == 70.0
    fake.arm()
    t = fake.fire()
    assert fake.delivered == [(t, 30.0), (pytest.approx(t + 0.003), 70.0)]


def test_knob_is_seen_at_the_next_read_back_and_fires_at_the_new_power(
        fake: FakeStimulator) -> None:
    faults: list[str] = []
    fake.set_fault_handler(faults.append)
    fake.set_intensity(60.0)
    fake.arm()
    fake.turn_knob(95.0)
    dev = fake.device
    assert dev is not None and dev.intensity_pct == 60.0  # not read back yet
    fake.fire()
    assert fake.delivered[-1][1] == 95.0  # the device fires at its own power
    fake.poll()
    dev = fake.device
    assert dev is not None and dev.intensity_pct == 95.0
    assert faults == ["device changed: commanded 60 %, device reads 95 % (front panel?)"]
    assert not fake.ready
    assert fake.status()["intensity_pct"] == 95.0
    assert fake.status()["commanded_intensity_pct"] == 60.0


def test_front_panel_burst_delivers_n_pulses(fake: FakeStimulator) -> None:
    faults: list[str] = []
    fake.set_fault_handler(faults.append)
    fake.set_intensity(50.0)
    fake.set_front_panel_mode(4, 10.0)
    with pytest.raises(StimulatorError, match=r"refusing to arm.*burst \(4 pulses"):
        fake.arm()
    assert faults and not fake.ready
    dev = fake.device
    assert dev is not None and (dev.pulses_per_trigger, dev.mode) == (4, "burst")


def test_burst_fire_records_every_pulse(clock: Clock) -> None:
    f = FakeStimulator(clock=clock)
    f.open()
    f.turn_knob(45.0)
    f.set_front_panel_mode(3, 5.0)
    f.arm()  # nothing commanded: no mismatch (the gate refuses on the state instead)
    t = f.fire()
    assert f.delivered == [(t, 45.0), (pytest.approx(t + 0.005), 45.0),
                           (pytest.approx(t + 0.010), 45.0)]


def test_state_before_any_command_is_cached_without_a_fault(clock: Clock) -> None:
    f = FakeStimulator(clock=clock)
    faults: list[str] = []
    f.set_fault_handler(faults.append)
    assert f.device is None
    f.turn_knob(95.0)  # left at 95 % by the previous user
    f.open()
    dev = f.device
    assert dev is not None and dev.intensity_pct == 95.0 and dev.read_at == 100.0
    f.poll()
    assert faults == []
    assert f.status()["device"]["intensity_pct"] == 95.0


def test_fail_next_fire(fake: FakeStimulator) -> None:
    faults: list[str] = []
    fake.set_fault_handler(faults.append)
    fake.set_intensity(40.0)
    fake.arm()
    fake.fail_next_fire(StimulatorError("port gone"), delivered=True)
    with pytest.raises(StimulatorError, match="port gone"):
        fake.fire()
    assert len(fake.delivered) == 1  # the pulse left before the error
    assert faults == ["fire: port gone"] and not fake.ready
    with pytest.raises(StimulatorError, match="not armed"):
        fake.fire()


def test_fail_next_fire_with_a_bug_is_not_a_fault(fake: FakeStimulator) -> None:
    fake.set_intensity(40.0)
    fake.arm()
    fake.fail_next_fire(RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        fake.fire()
    assert fake.fault is None and fake.delivered == []
    fake.fire()
    assert len(fake.delivered) == 1


def test_pulses_per_trigger_fault_delivers_more_than_it_reads(clock: Clock) -> None:
    f = FakeStimulator(clock=clock, pulses_per_trigger_fault=2)
    f.open()
    f.set_intensity(50.0)
    f.arm()
    f.fire()
    dev = f.device
    assert dev is not None and dev.pulses_per_trigger == 1
    assert len(f.delivered) == 2


def test_read_device_needs_an_open_device(clock: Clock) -> None:
    f = FakeStimulator(clock=clock)
    with pytest.raises(StimulatorError, match="not open"):
        f.read_device()
    f.open()
    f.read_device()
    assert f.reads == 1
    f.close()
    f.close()
    with pytest.raises(StimulatorError):
        f.fire()
